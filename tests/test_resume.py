"""Resume parity under SIGKILL and atomic checkpoints under a kill inside the save, for
both trainers and both autoencoder kinds.

A run killed in the middle of a training step (a seeded point: the N-th backward pass) and
resumed with `--resume latest` must continue from its newest complete checkpoint (not
from step 0) and end with the same weights (autoencoder, codebook and quantizer state,
discriminator, EMA, LeCam, schedulers; UNet, EMA, schedule) and the same logged losses as
an uninterrupted run of the same seed: bit-identical on CPU, one process and two.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.data_loader import SeedableRandomSampler
from safetensors.torch import load_file

from ldm_vae.run.checkpoint import (
    EXTRA_FILE,
    STATE_FILE,
    complete_checkpoints,
    find_checkpoint,
)
from ldm_vae.run.config import OptimConfig
from ldm_vae.run.lock import LOCK_FILE
from ldm_vae.run.trainer import (
    LazySeedableRandomSampler,
    Trainer,
    make_accelerator,
    use_lazy_sampler,
)

from .conftest import ROOT, TINY_KL, TINY_LDM, TINY_VQ

STEPS = 30
COMMON = [f"train.max_steps={STEPS}", "train.checkpoint_every=5", "train.log_every=5", "train.image_every=20",
          "train.checkpoints_total_limit=20", "train.lr_scheduler=cosine"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")


@pytest.fixture(scope="module", params=["kl", "vq", "ldm"])
def trainer(request, fake_fashion, tiny_cache) -> tuple[str, Path, list[str]]:
    """(subcommand, config, overrides) of each trainer, checkpoints every 5 steps, all kept."""
    gan = ["loss.disc_start=18", "loss.disc_pretrain_steps=4", "loss.lecam_weight=0.1"]  # inside the resumed part
    return {"kl": ("train-vae", TINY_KL, [f"data.path={fake_fashion}", *COMMON, *gan]),
            # codes are restarted after the resume point too
            "vq": ("train-vae", TINY_VQ, [f"data.path={fake_fashion}", *COMMON, *gan, "quantizer.restart_after_steps=3"]),
            "ldm": ("train-ldm", TINY_LDM, [f"latents={tiny_cache}", *COMMON])}[request.param]


def _launcher(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _cli(out: Path, trainer, *extra, processes: int = 1) -> list[str]:
    command, config, overrides = trainer
    return [*_launcher(processes), "-m", "ldm_vae", command, str(config), *overrides, "--output-dir", str(out), *extra]


def _kill(out: Path, trainer, mode: str, at: int, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    """Run tests/kill_worker.py: the run SIGKILLs itself at a reproducible point (see there)."""
    command, config, overrides = trainer
    worker = [str(ROOT / "tests" / "kill_worker.py"), mode, str(at), command, str(config), str(out), *overrides, *extra]
    return subprocess.run([*_launcher(processes), *worker], env=ENV, capture_output=True, text=True, timeout=600)


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


def _assert_same_run(reference: Path, resumed: Path, where: str = "") -> None:
    ref, res = _state(reference / f"checkpoint-{STEPS}"), _state(resumed / f"checkpoint-{STEPS}")
    assert ref.keys() == res.keys()
    for k in ref:
        assert torch.equal(ref[k], res[k]), f"{k} {where}"
    assert _logged(reference) == _logged(resumed), where


def _kill_mid_step_and_resume(out: Path, trainer, processes: int = 1) -> tuple[str, int]:
    """Kill the run after a random (reported) number of backward passes, resume it, and check
    that the resumed session started at the newest complete checkpoint. Returns (the kill
    point, the step resumed from)."""
    at = random.randrange(12, STEPS)  # >= 6 steps done (a checkpoint exists), < STEPS (not finished)
    where = f"killed after backward pass {at} (rerun with that number to reproduce)"
    proc = _kill(out, trainer, "backward", at, processes=processes)
    assert proc.returncode != 0 and (out / "config.yaml").exists(), f"{where}: {proc.stderr[-2000:]}"
    resumed_from = complete_checkpoints(out)[-1][0]
    assert 5 <= resumed_from < STEPS, where
    proc = subprocess.run(_cli(out, trainer, "--resume", "latest", processes=processes), env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"{where}: {proc.stderr[-2000:]}"
    # the resumed process ran exactly the missing steps: a silent restart from step 0 would
    # end with the same weights, but not with this count
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_this_session"] == STEPS - resumed_from, where
    return where, resumed_from


@pytest.fixture(scope="module")
def reference(tmp_path_factory, trainer):
    out = tmp_path_factory.mktemp("resume") / "reference"
    subprocess.run(_cli(out, trainer), env=ENV, check=True, capture_output=True)
    return out


# KL's resume parity is checked by the kill inside a save below (the same loop without the quantizer)
@pytest.mark.parametrize("trainer", ["vq", "ldm"], indirect=True)
def test_sigkill_mid_step_then_resume_equals_the_uninterrupted_run(reference, trainer, tmp_path):
    where, resumed_from = _kill_mid_step_and_resume(tmp_path / "killed", trainer)
    _assert_same_run(reference, tmp_path / "killed", where)
    if trainer[1] == TINY_VQ:  # codes were restarted after the resume point: the restored state mattered
        restarts = load_file(reference / f"checkpoint-{STEPS}" / "model.safetensors")["quantizer.last_restart"]
        assert restarts.max() > resumed_from, where


@pytest.mark.parametrize("trainer", ["kl", "ldm"], indirect=True)
def test_kill_inside_a_checkpoint_save_keeps_the_previous_one(reference, trainer, tmp_path):
    out = tmp_path / "run"
    proc = _kill(out, trainer, "save", 15, "train.checkpoints_total_limit=1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # the half-written save is there, without its marker; the limit pruned nothing for it
    assert (out / ".tmp-checkpoint-15" / "model.safetensors").is_file()
    assert not (out / ".tmp-checkpoint-15" / STATE_FILE).exists()
    assert [s for s, _ in complete_checkpoints(out)] == [10]
    assert find_checkpoint(out, "latest") == out / "checkpoint-10"
    proc = subprocess.run(_cli(out, trainer, "--resume", "latest", "train.checkpoints_total_limit=1"),
                          env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps_this_session"] == STEPS - 10
    assert not (out / ".tmp-checkpoint-15").exists()  # replaced by the complete save of step 15
    _assert_same_run(reference, out)


@pytest.fixture(scope="module")
def reference2(tmp_path_factory, trainer):
    """The uninterrupted run with two processes."""
    out = tmp_path_factory.mktemp("resume2") / "reference"
    proc = subprocess.run(_cli(out, trainer, processes=2), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.parametrize("trainer", ["vq", "ldm"], indirect=True)
def test_two_process_sigkill_and_resume_equals_the_uninterrupted_run(reference2, trainer, tmp_path):
    where, _ = _kill_mid_step_and_resume(tmp_path / "killed", trainer, processes=2)
    _assert_same_run(reference2, tmp_path / "killed", where)  # bit-identical with two processes too (CPU, gloo)


@pytest.mark.parametrize("trainer", ["ldm"], indirect=True)  # the stop is the shared loop's, not a trainer's
def test_sigterm_on_one_rank_stops_both_at_the_next_log_step_then_resumes_identically(reference2, trainer, tmp_path):
    """A preemption notice that reaches one of two processes, in the middle of a step: both stop
    at the next log step (every 5 here) with a checkpoint there, although checkpoints are due
    every 15; exit code 75, the lock released; --resume latest ends where the uninterrupted
    run ends."""
    at = random.randrange(12, 20)  # a backward pass of steps 12..19: stops by step 20 (< STEPS)
    where = f"SIGTERM on rank 1 after backward pass {at}"
    out, every15 = tmp_path / "stopped", "train.checkpoint_every=15"
    proc = _kill(out, trainer, "sigterm", at, every15, processes=2)
    # each rank exits with code 75; accelerate launch reports that as a failure of its own
    assert proc.returncode != 0 and "continue with --resume latest" in proc.stderr, proc.stderr[-3000:]
    stopped = -(-at // 5) * 5  # one backward pass per step: the log step at or after step `at`
    assert [s for s, _ in complete_checkpoints(out)] == sorted({15, stopped}), where
    assert not (out / "summary.json").exists() and not (out / LOCK_FILE).exists(), where
    proc = subprocess.run(_cli(out, trainer, "--resume", "latest", every15, processes=2), env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"{where}: {proc.stderr[-2000:]}"
    assert json.loads((out / "summary.json").read_text())["steps_this_session"] == STEPS - stopped, where
    _assert_same_run(reference2, out, where)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["vq"], indirect=True)
def test_soak_ten_sigkills_some_inside_saves_then_resume_equals_the_uninterrupted_run(reference, trainer, tmp_path):
    """One run killed with SIGKILL at 10 random moments (mid-step, or inside a checkpoint save),
    resumed with --resume latest each time, ends bit-identical to the uninterrupted run.
    `python -m pytest -m slow tests/test_resume.py` (a few minutes on 2 cores)."""
    seed = random.randrange(10**6)
    rng, out, events = random.Random(seed), tmp_path / "soak", [f"seed {seed}"]
    for _ in range(10):
        done = complete_checkpoints(out)[-1][0] if complete_checkpoints(out) else 0
        # a folder killed before its first checkpoint is started again (the lock it left is taken over)
        start = ["--resume", "latest"] if done else ["--overwrite"] if out.exists() else []
        if rng.random() < 0.3 and done + 5 < STEPS:  # inside the save of the next checkpoint
            mode, at = "save", done + 5
        else:  # after a backward pass of this session: at least one per step, so before its end
            mode, at = "backward", rng.randrange(1, STEPS - done)
        proc = _kill(out, trainer, mode, at, *start)
        events.append(f"{mode} {at} from step {done}")
        assert proc.returncode == -signal.SIGKILL, "; ".join(events) + proc.stderr[-2000:]
    proc = subprocess.run(_cli(out, trainer, "--resume", "latest"), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, "; ".join(events) + proc.stderr[-2000:]
    _assert_same_run(reference, out, "; ".join(events))


def test_lazy_sampler_draws_accelerates_order_and_replaces_it_after_prepare(tmp_path):
    """The trainers' LazySeedableRandomSampler yields the order of Accelerate's
    SeedableRandomSampler (runs from before it resume identically) and leaves the generator where
    it did; after prepare the trainers' loader holds it and yields that order."""
    chunk = LazySeedableRandomSampler.chunk
    for n, seed, epoch in [(1, 0, 0), (chunk, 3, 1), (2 * chunk + 5, 7, 2)]:
        old, new = (cls(range(n), generator=torch.Generator(), data_seed=seed)
                    for cls in (SeedableRandomSampler, LazySeedableRandomSampler))
        old.set_epoch(epoch)
        new.set_epoch(epoch)
        assert list(new) == list(old), (n, seed, epoch)
        assert new.epoch == old.epoch == epoch + 1
        assert torch.equal(new.generator.get_state(), old.generator.get_state())

    trainer = Trainer(SimpleNamespace(train=OptimConfig(batch_size=4)), tmp_path)
    loader = make_accelerator(trainer.tc, tmp_path).prepare(trainer.make_loader(range(10)))
    use_lazy_sampler(loader)
    sampler = loader.get_sampler()
    assert type(sampler) is LazySeedableRandomSampler
    loader.set_epoch(1)
    expected = SeedableRandomSampler(range(10), generator=torch.Generator(), data_seed=sampler.initial_seed)
    expected.set_epoch(1)
    assert torch.cat(list(loader)).tolist() == list(expected)[:8]  # two whole batches of 4
