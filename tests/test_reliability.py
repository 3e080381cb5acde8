"""Reliability: nothing overwritten, non-finite steps skipped the same way on every process,
checkpoints loaded without unpickling code."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from ldm_vae.autoencoder.losses import AutoencoderLoss
from ldm_vae.autoencoder.train import train
from ldm_vae.diffusion.train import train_ldm
from ldm_vae.errors import UserError
from ldm_vae.run.checkpoint import EXTRA_FILE, complete_checkpoints

from .conftest import TINY_KL, TINY_LDM
from .test_train import _run_two_processes


def _inject_nan(monkeypatch, steps: set[int]) -> None:
    original = AutoencoderLoss.generator

    def generator(self, x, recon, latent, step, *args, **kwargs):
        loss, logs = original(self, x, recon, latent, step, *args, **kwargs)
        return (loss * float("nan") if step in steps else loss), logs

    monkeypatch.setattr(AutoencoderLoss, "generator", generator)


def test_nan_steps_are_skipped_counted_and_leave_weights_finite(tiny_cfg, tmp_path, monkeypatch):
    _inject_nan(monkeypatch, {3, 4, 9})
    run = train(tiny_cfg("train.max_steps=12", "loss.disc_start=2", "train.log_every=4"), tmp_path / "run")
    assert run.summary["steps"] == 12 and run.summary["skipped_steps"] == 3
    assert all(torch.isfinite(p).all() for p in run.autoencoder.parameters())
    assert all(torch.isfinite(p).all() for p in run.ema.shadow_params)
    assert all(math.isfinite(v) for v in run.summary["final_logs"].values())


def test_consecutive_nan_steps_stop_the_run_and_keep_the_last_good_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    _inject_nan(monkeypatch, set(range(10, 100)))
    cfg = tiny_cfg("train.max_steps=30", "train.checkpoint_every=5", "train.max_consecutive_skips=4")
    # the counters are read at log and checkpoint steps (no host sync per step): the run
    # stops at step 15, the first such step after 4 in a row, before checkpointing it
    with pytest.raises(UserError, match=r"5 consecutive steps \(10-14\).*last good checkpoint is .*checkpoint-10"):
        train(cfg, tmp_path / "run")
    # the checkpoint at step 10 holds the last finite weights and still resumes
    assert [s for s, _ in complete_checkpoints(tmp_path / "run")] == [5, 10]
    monkeypatch.undo()
    summary = train(cfg, tmp_path / "run", resume="latest").summary
    assert summary["steps"] == 30 and summary["skipped_steps"] == 0


def _inject_ldm_nan(monkeypatch, steps: set[int]) -> None:
    """NaN UNet outputs in the training forwards of these steps (one forward per step)."""
    from diffusers import UNet2DModel

    original, calls = UNet2DModel.forward, [0]

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training and torch.is_grad_enabled():
            if calls[0] in steps:
                out.sample = out.sample * float("nan")
            calls[0] += 1
        return out

    monkeypatch.setattr(UNet2DModel, "forward", forward)


def test_ldm_nan_steps_are_skipped_then_a_run_of_them_stops_training(tiny_ldm_cfg, tmp_path, monkeypatch):
    _inject_ldm_nan(monkeypatch, {2, 3, 7})
    run = train_ldm(tiny_ldm_cfg("train.max_steps=10", "train.log_every=5"), tmp_path / "run")
    assert run.summary["steps"] == 10 and run.summary["skipped_steps"] == 3
    assert all(torch.isfinite(p).all() for p in run.unet.parameters())
    assert all(torch.isfinite(p).all() for p in run.ema.shadow_params)
    assert all(math.isfinite(v) for v in run.summary["final_logs"].values())
    monkeypatch.undo()
    _inject_ldm_nan(monkeypatch, set(range(10, 100)))
    cfg = tiny_ldm_cfg("train.max_steps=30", "train.checkpoint_every=5", "train.max_consecutive_skips=4")
    with pytest.raises(UserError, match=r"5 consecutive steps \(10-14\).*last good checkpoint is .*checkpoint-10"):
        train_ldm(cfg, tmp_path / "stops")
    monkeypatch.undo()
    assert train_ldm(cfg, tmp_path / "stops", resume="latest").summary["steps"] == 30


@pytest.mark.parametrize("trainer", ["train-vae", "train-ldm"])
def test_two_processes_skip_the_same_nan_steps(tmp_path, fake_fashion, tiny_cache, trainer):
    # NaN on rank 1 only, at steps 4 and 5: both ranks must skip both steps and stay identical
    config, overrides = {"train-vae": (TINY_KL, [f"data.path={fake_fashion}", "loss.disc_start=3"]),
                         "train-ldm": (TINY_LDM, [f"latents={tiny_cache}"])}[trainer]
    r0, r1 = _run_two_processes(tmp_path, config, [*overrides, "train.max_steps=10", "train.batch_size=4"],
                                trainer, LDM_VAE_TEST_NAN="1:4,5")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.isfinite(r0[k].float()).all(), k
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["skipped_steps"] == 2


def test_overwrite_replaces_a_run_only_when_asked(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.max_steps=4")
    train(cfg, tmp_path / "run")
    with pytest.raises(UserError, match="--overwrite"):
        train(cfg, tmp_path / "run")
    with pytest.raises(UserError, match="pass one of them"):
        train(cfg, tmp_path / "run", resume="latest", overwrite=True)
    (tmp_path / "run" / "old-note.txt").write_text("from the first run")
    summary = train(tiny_cfg("train.max_steps=2"), tmp_path / "run", overwrite=True).summary
    assert summary["steps"] == 2 and not (tmp_path / "run" / "old-note.txt").exists()
    assert [s for s, _ in complete_checkpoints(tmp_path / "run")] == [2]


def test_ldm_overwrite_and_resume_on_another_cache_are_refused(tiny_ldm_cfg, tiny_cache, tmp_path):
    cfg = tiny_ldm_cfg("train.max_steps=4", "train.checkpoint_every=2")
    train_ldm(cfg, tmp_path / "run")
    with pytest.raises(UserError, match="--overwrite"):
        train_ldm(cfg, tmp_path / "run")
    # the same latents re-encoded without flips: another cache, so resuming on it is refused
    other = tmp_path / "other-cache"
    shutil.copytree(tiny_cache, other)
    meta = json.loads((other / "cache.json").read_text())
    (other / "cache.json").write_text(json.dumps({**meta, "flipped": False}))
    with pytest.raises(UserError, match="pass the run's own --latents"):
        train_ldm(tiny_ldm_cfg("train.max_steps=6", f"latents={other}"), tmp_path / "run", resume="latest")
    assert train_ldm(tiny_ldm_cfg("train.max_steps=2"), tmp_path / "run", overwrite=True).summary["steps"] == 2
    assert [s for s, _ in complete_checkpoints(tmp_path / "run")] == [2]


def test_overwrite_with_a_bad_config_deletes_nothing(tiny_cfg, tmp_path):
    """--overwrite deletes the old run only once every input was checked: a missing data
    folder and missing LPIPS backbone weights are both refused with the old run intact
    (the CLI turns the UserError into one line and exit code 2: test_errors.py)."""
    train(tiny_cfg("train.max_steps=2"), tmp_path / "run")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    for bad, message in ((["loss.lpips_random_backbone=false", "loss.lpips_weights=/nonexistent/vgg16.pth"],
                          "/nonexistent/vgg16.pth"),
                         (["data.path=/nonexistent"], "/nonexistent")):
        with pytest.raises(UserError, match=message):
            train(tiny_cfg("train.max_steps=2", *bad), tmp_path / "run", overwrite=True)
        assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before, bad


class _RunsCode:
    """Unpickling this calls os.system: what a tampered checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("target", [EXTRA_FILE, "optimizer.bin", "random_states_0.pkl"])
def test_crafted_pickle_in_a_checkpoint_is_refused(tiny_cfg, tmp_path, target):
    cfg = tiny_cfg("train.max_steps=4", "train.checkpoint_every=2")
    train(cfg, tmp_path / "run")
    marker = tmp_path / "pwned"
    # a checkpoint file replaced by a pickle that would run a command when loaded
    torch.save({"state": _RunsCode(marker)}, tmp_path / "run" / "checkpoint-4" / target)
    with pytest.raises(UserError, match="refusing to load"):
        train(tiny_cfg("train.max_steps=6", "train.checkpoint_every=2"), tmp_path / "run", resume="latest")
    assert not marker.exists()


@pytest.mark.parametrize("target", [EXTRA_FILE, "optimizer.bin", "random_states_0.pkl"])
def test_crafted_pickle_in_an_ldm_checkpoint_is_refused(tiny_ldm_cfg, tmp_path, target):
    train_ldm(tiny_ldm_cfg("train.max_steps=4", "train.checkpoint_every=2"), tmp_path / "run")
    marker = tmp_path / "pwned"
    torch.save({"state": _RunsCode(marker)}, tmp_path / "run" / "checkpoint-4" / target)
    with pytest.raises(UserError, match="refusing to load"):
        train_ldm(tiny_ldm_cfg("train.max_steps=6", "train.checkpoint_every=2"), tmp_path / "run", resume="latest")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["missing", "truncated", "another_state"])
def test_an_rng_file_that_cannot_be_restored_stops_the_resume(tiny_cfg, tmp_path, damage):
    """accelerate skips an unreadable RNG file with an info log and resumes with another RNG;
    we refuse instead, whatever the damage (a loadable file with the wrong state included)."""
    train(tiny_cfg("train.max_steps=4", "train.checkpoint_every=2", "loss.disc_start=100"), tmp_path / "run")
    rng_file = tmp_path / "run" / "checkpoint-4" / "random_states_0.pkl"
    if damage == "missing":
        rng_file.unlink()
    elif damage == "truncated":
        rng_file.write_bytes(rng_file.read_bytes()[:100])
    else:  # a well-formed file whose torch state is not the one a restore would set
        from accelerate.utils import load

        states = load(rng_file)  # weights_only, numpy's RNG state allowed
        states["torch_manual_seed"] = "not a state"
        torch.save(states, rng_file)
    with pytest.raises(UserError, match="random_states_0.pkl"):
        train(tiny_cfg("train.max_steps=6", "train.checkpoint_every=2", "loss.disc_start=100"), tmp_path / "run",
              resume="latest")


def test_crafted_pickle_as_lpips_weights_is_refused(tiny_cfg, tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "vgg16-397923af.pth"
    torch.save({"features.0.weight": _RunsCode(marker)}, weights)
    with pytest.raises(UserError, match="cannot read weights file"):
        train(tiny_cfg("loss.lpips_random_backbone=false", f"loss.lpips_weights={weights}"), tmp_path / "run")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_skip_decided_on_the_device_changes_nothing():
    """The guard's device flag (no host sync): a non-finite step leaves weights, AdamW
    moments and step count, and the EMA exactly as they were; a finite one updates them."""
    from types import SimpleNamespace

    from accelerate import PartialState
    from diffusers.training_utils import EMAModel

    from ldm_vae.run.config import OptimConfig
    from ldm_vae.run.trainer import NonFiniteGuard, ema_step, make_adamw

    PartialState()  # the guard logs through accelerate
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = make_adamw(net.parameters(), 1e-2, OptimConfig(), torch.device("cpu"))
    wrapped = SimpleNamespace(optimizer=opt, step=opt.step)  # what accelerate's wrapper exposes
    guard = NonFiniteGuard(SimpleNamespace(scaler=None, device=torch.device("cpu")), limit=3)
    ema = EMAModel(net.parameters(), decay=0.9)

    def step(scale: float) -> torch.Tensor:
        net.zero_grad()
        (net(torch.ones(2, 4)).sum() * scale).backward()
        ok = guard.finite(torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0))
        guard.optimizer_step(wrapped, ok)
        ema_step(ema, list(net.parameters()), guard.end_step(0, ok))
        return ok

    assert step(1.0)  # a real step first, so there are moments to keep
    before = copy.deepcopy((net.state_dict(), opt.state_dict(), [p.clone() for p in ema.shadow_params]))
    assert not step(float("nan"))
    after = (net.state_dict(), opt.state_dict(), ema.shadow_params)
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    for state_before, state_after in zip(before[1]["state"].values(), after[1]["state"].values()):
        assert all(torch.equal(state_after[k], state_before[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert all(torch.equal(a, b) for a, b in zip(after[2], before[2]))
    assert guard.check(2, Path("unused")) == 1
    assert step(1.0) and not torch.equal(net.weight, before[0]["weight"])
