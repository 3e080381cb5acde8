"""Run under `accelerate launch`: train each job of a list in turn, saving this rank's final
state after each.

    ddp_worker.py JOBS.json

JOBS.json is a list of {"trainer": "train-vae"|"train-ldm"|"cli", "config": PATH, "output_dir": PATH,
"overrides": [KEY=VALUE, ...], "nan": null or "RANK:STEP,STEP", "delete": [PATH, ...]}; a "cli"
job runs `ldm-vae` with the arguments in "overrides" and writes each rank's exit code, and
with "delete" removes those paths (under output_dir, on rank 0) and runs the command again. One launch serves every
two-process test of a session (tests/conftest.py, `two_process_run`): starting two processes
costs more than a tiny run. "nan" makes the training loss NaN on that rank at those steps of
that job (the other ranks stay finite), to check that every rank skips the same steps.
"""

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from diffusers import UNet2DModel
from safetensors.torch import save_file

from ldm_vae.autoencoder.config import Config
from ldm_vae.autoencoder.losses import AutoencoderLoss
from ldm_vae.autoencoder.train import train
from ldm_vae.cli import main
from ldm_vae.config import load_config
from ldm_vae.diffusion.config import LDMConfig
from ldm_vae.diffusion.train import train_ldm
from ldm_vae.run.processes import process_state


@contextlib.contextmanager
def nan_losses(trainer: str, nan: str | None):
    """NaN training losses on rank RANK at steps STEP,STEP of this job ("RANK:STEP,STEP"), then
    the real loss again."""
    if not nan:
        yield
        return
    rank, steps = nan.split(":")
    nan_steps = {int(s) for s in steps.split(",")}
    mine = os.environ.get("RANK") == rank
    if trainer == "train-vae":
        owner, name = AutoencoderLoss, "generator"
        original = AutoencoderLoss.generator

        def patched(self, x, recon, latent, step, *args, **kwargs):
            loss, logs = original(self, x, recon, latent, step, *args, **kwargs)
            return (loss * float("nan") if mine and step in nan_steps else loss), logs
    else:  # one training forward per step (no accumulation): count them
        owner, name = UNet2DModel, "forward"
        original, calls = UNet2DModel.forward, [0]

        def patched(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if self.training and torch.is_grad_enabled():
                if mine and calls[0] in nan_steps:
                    out.sample = out.sample * float("nan")
                calls[0] += 1
            return out
    setattr(owner, name, patched)
    try:
        yield
    finally:
        setattr(owner, name, original)


def run_cli(output_dir: Path, argv: list[str], delete: list[str]) -> None:
    """`ldm-vae ARGV` on every rank; with `delete`, those files are then removed (as if the run
    had been interrupted) and it runs again; the identity of the files kept is recorded."""
    state = process_state()
    output_dir.mkdir(parents=True, exist_ok=True)
    code = main(argv)
    if delete and code == 0:
        state.wait_for_everyone()
        if state.is_main_process:
            for path in delete:
                (output_dir / path).unlink()
            kept = {str(f.relative_to(output_dir)): [f.stat().st_ino, f.stat().st_mtime_ns]
                    for f in sorted(output_dir.rglob("*.safetensors"))}
            (output_dir / "kept.json").write_text(json.dumps(kept))
        state.wait_for_everyone()
        code = main(argv)
    (output_dir / f"rank{state.process_index}.exit").write_text(str(code))


def run_job(trainer: str, config: str, output_dir: str, overrides: list[str], nan: str | None = None,
            delete: list[str] = ()) -> None:
    if trainer == "cli":
        run_cli(Path(output_dir), overrides, delete)
        return
    run, schema = {"train-vae": (train, Config), "train-ldm": (train_ldm, LDMConfig)}[trainer]
    with nan_losses(trainer, nan):
        result = run(load_config(config, overrides, schema), output_dir)
    modules = {"ae": result.autoencoder, "disc": result.discriminator, "lecam": result.lecam} \
        if trainer == "train-vae" else {"unet": result.unet}
    state = {f"{name}.{k}": v.reshape(-1).contiguous() for name, module in modules.items()
             for k, v in module.state_dict().items()}
    if result.ema is not None:
        state.update({f"ema.{i}": p.contiguous() for i, p in enumerate(result.ema.shadow_params)})
    save_file(state, str(Path(output_dir) / f"rank{result.process_index}.safetensors"))
    # the next job builds its Accelerator from scratch, as a new `ldm-vae` process would
    # (tests/conftest.py does the same between tests), on the same processes and process group
    AcceleratorState._reset_state()
    GradientState._reset_state()


# One process group for all the jobs: each run's end_training() would destroy it, and a second
# init_process_group on the launcher's rendezvous store can read the first group's stale gloo
# addresses (connection refused). It is destroyed after the last job instead.
destroy_process_group, PartialState.destroy_process_group = PartialState.destroy_process_group, lambda *_: None
for job in json.loads(Path(sys.argv[1]).read_text()):
    run_job(**job)
destroy_process_group(PartialState())
