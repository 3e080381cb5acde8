"""Resume parity under SIGKILL and atomic checkpoints under a kill inside the save, for
both trainers.

A run killed at a random step and resumed with `--resume latest` must end with the same
weights (autoencoder, discriminator, EMA, LeCam, schedulers; UNet, EMA, schedule) and the
same logged losses as an uninterrupted run of the same seed: bit-identical on CPU, one
process and two.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm_vae.run.checkpoint import (
    EXTRA_FILE,
    STATE_FILE,
    complete_checkpoints,
    find_checkpoint,
)

from .conftest import ROOT, TINY_KL, TINY_LDM

STEPS = 40
COMMON = [f"train.max_steps={STEPS}", "train.checkpoint_every=5", "train.log_every=5", "train.image_every=20",
          "train.checkpoints_total_limit=20", "train.lr_scheduler=cosine"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")


@pytest.fixture(scope="module", params=["train-vae", "train-ldm"])
def trainer(request, fake_fashion, tiny_cache) -> tuple[str, Path, list[str]]:
    """(subcommand, config, overrides) of each trainer, checkpoints every 5 steps, all kept."""
    if request.param == "train-vae":  # GAN phase and LeCam inside the resumed part
        return "train-vae", TINY_KL, [f"data.path={fake_fashion}", *COMMON, "loss.disc_start=18",
                                      "loss.disc_pretrain_steps=4", "loss.lecam_weight=0.1"]
    return "train-ldm", TINY_LDM, [f"latents={tiny_cache}", *COMMON]


def _cli(out: Path, trainer, *extra, processes: int = 1) -> list[str]:
    command, config, overrides = trainer
    launch = [sys.executable, "-m", "ldm_vae"]
    if processes > 1:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                  str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "-m", "ldm_vae"]
    return [*launch, command, str(config), *overrides, "--output-dir", str(out), *extra]


def _state(checkpoint: Path) -> dict:
    """Every tensor of a checkpoint: models' and optimizers' weights, EMA, LeCam, schedulers."""
    state = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        state.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    optimizers = [torch.load(f, weights_only=True) for f in sorted(checkpoint.glob("optimizer*.bin"))]
    for i, opt in enumerate(optimizers):
        for p, moments in opt["state"].items():
            state.update({f"optimizer{i}:{p}:{k}": v for k, v in moments.items()})
    extra = torch.load(checkpoint / EXTRA_FILE, weights_only=True)
    for name, value in extra.items():
        if name == "ema":
            state.update({f"ema:{i}": p for i, p in enumerate(value["shadow_params"])})
        elif "_last_lr" in value:  # an LR scheduler
            state[f"{name}:last_lr"] = torch.tensor(value["_last_lr"])
        else:  # LeCam
            state.update({f"{name}:{k}": v for k, v in value.items()})
    assert "ema:0" in state and optimizers
    return state


def _logged(run: Path) -> dict[int, dict]:
    """step -> logged values (the last record of a step wins: a resumed run logs it again)."""
    out = {}
    for line in (run / "logs" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("images_per_s")  # wall-clock, not a loss
        out[rec.pop("step")] = rec
    return out


def _assert_same_run(reference: Path, resumed: Path) -> None:
    ref, res = _state(reference / f"checkpoint-{STEPS}"), _state(resumed / f"checkpoint-{STEPS}")
    assert ref.keys() == res.keys()
    for k in ref:
        assert torch.equal(ref[k], res[k]), k
    assert _logged(reference) == _logged(resumed)


def _kill_when_checkpointed(cmd: list[str], out: Path, at_least: int) -> int:
    """Start `cmd`, SIGKILL its whole process group once a checkpoint >= at_least is complete."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = complete_checkpoints(out)
        if done and done[-1][0] >= at_least:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return done[-1][0]
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the run ended or stalled before a checkpoint >= {at_least} (exit code {proc.poll()})")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, trainer):
    out = tmp_path_factory.mktemp("resume") / "reference"
    subprocess.run(_cli(out, trainer), env=ENV, check=True, capture_output=True)
    return out


def test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(reference, trainer, tmp_path):
    seed = random.randrange(10**6)
    target = random.Random(seed).choice(range(5, STEPS - 5, 5))
    out = tmp_path / "killed"
    killed_after = _kill_when_checkpointed(_cli(out, trainer), out, target)
    assert killed_after < STEPS, f"seed {seed}"
    proc = subprocess.run(_cli(out, trainer, "--resume", "latest"), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_run(reference, out)


def test_kill_inside_a_checkpoint_save_keeps_the_previous_one(reference, trainer, tmp_path):
    out = tmp_path / "run"
    command, config, overrides = trainer
    cmd = [sys.executable, str(ROOT / "tests" / "kill_worker.py"), command, str(config), str(out), "15",
           *overrides, "train.checkpoints_total_limit=1"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # the half-written save is there, without its marker; the limit pruned nothing for it
    assert (out / ".tmp-checkpoint-15" / "model.safetensors").is_file()
    assert not (out / ".tmp-checkpoint-15" / STATE_FILE).exists()
    assert [s for s, _ in complete_checkpoints(out)] == [10]
    assert find_checkpoint(out, "latest") == out / "checkpoint-10"
    proc = subprocess.run(_cli(out, trainer, "--resume", "latest", "train.checkpoints_total_limit=1"),
                          env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / ".tmp-checkpoint-15").exists()  # replaced by the complete save of step 15
    _assert_same_run(reference, out)


def test_two_process_sigkill_and_resume_equals_the_uninterrupted_run(trainer, tmp_path):
    ref = tmp_path / "reference"
    proc = subprocess.run(_cli(ref, trainer, processes=2), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "killed"
    _kill_when_checkpointed(_cli(out, trainer, processes=2), out, 20)
    proc = subprocess.run(_cli(out, trainer, "--resume", "latest", processes=2), env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_run(ref, out)  # bit-identical with two processes too (CPU, gloo)
