"""Reliability: nothing overwritten, non-finite steps skipped the same way on every process,
checkpoints loaded without unpickling code."""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm_vae.autoencoder.losses import AutoencoderLoss
from ldm_vae.autoencoder.train import train
from ldm_vae.diffusion.train import train_ldm
from ldm_vae.errors import UserError
from ldm_vae.run.checkpoint import EXTRA_FILE, STATE_FILE, checksums, complete_checkpoints
from ldm_vae.run.lock import LOCK_FILE, _start_time

from .conftest import TINY_KL, TINY_LDM, TwoProcessJob


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


# NaN on rank 1 only, at steps 4 and 5: both ranks must skip both steps and stay identical
NAN_TWO_PROCESSES = [
    TwoProcessJob("nan-vae", TINY_KL, ("data.path={fake_fashion}", "loss.disc_start=3", "train.max_steps=10",
                                       "train.batch_size=4"), "train-vae", nan="1:4,5"),
    TwoProcessJob("nan-ldm", TINY_LDM, ("latents={tiny_cache}", "train.max_steps=10", "train.batch_size=4"),
                  "train-ldm", nan="1:4,5")]


@pytest.mark.parametrize("two_process_run", NAN_TWO_PROCESSES, indirect=True, ids=["train-vae", "train-ldm"])
def test_two_processes_skip_the_same_nan_steps(two_process_run):
    r0, r1 = two_process_run.ranks
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.isfinite(r0[k].float()).all(), k
    summary = json.loads((two_process_run.out / "summary.json").read_text())
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


def _reseal(checkpoint: Path) -> None:
    """Record the altered files' sha256 in the marker, as a crafted checkpoint would (the
    checksums catch rot, not an attacker who controls the folder): the loaders' own checks
    must refuse it."""
    marker = checkpoint / STATE_FILE
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "checksums": checksums(checkpoint)}))


@pytest.mark.parametrize("target", [EXTRA_FILE, "optimizer.bin", "random_states_0.pkl"])
def test_crafted_pickle_in_a_checkpoint_is_refused(tiny_cfg, tmp_path, target):
    cfg = tiny_cfg("train.max_steps=4", "train.checkpoint_every=2")
    train(cfg, tmp_path / "run")
    marker = tmp_path / "pwned"
    # a checkpoint file replaced by a pickle that would run a command when loaded
    torch.save({"state": _RunsCode(marker)}, tmp_path / "run" / "checkpoint-4" / target)
    _reseal(tmp_path / "run" / "checkpoint-4")
    with pytest.raises(UserError, match="refusing to load"):
        train(tiny_cfg("train.max_steps=6", "train.checkpoint_every=2"), tmp_path / "run", resume="latest")
    assert not marker.exists()


@pytest.mark.parametrize("target", [EXTRA_FILE, "optimizer.bin", "random_states_0.pkl"])
def test_crafted_pickle_in_an_ldm_checkpoint_is_refused(tiny_ldm_cfg, tmp_path, target):
    train_ldm(tiny_ldm_cfg("train.max_steps=4", "train.checkpoint_every=2"), tmp_path / "run")
    marker = tmp_path / "pwned"
    torch.save({"state": _RunsCode(marker)}, tmp_path / "run" / "checkpoint-4" / target)
    _reseal(tmp_path / "run" / "checkpoint-4")
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
    _reseal(rng_file.parent)
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


def _lock_for(folder: Path, pid: int, host: str | None = None, start: str | None = "auto") -> None:
    """A lock as a run with `pid` (on `host`, default this one) would have written it."""
    start = _start_time(pid) if start == "auto" else start
    (folder / LOCK_FILE).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "start": start,
                                                "since": "earlier"}))


def test_one_run_per_folder_a_live_lock_refuses_and_a_stale_one_is_taken_over(tiny_cfg, tmp_path, monkeypatch):
    import ldm_vae.run.trainer as run_trainer

    run, lock = tmp_path / "run", tmp_path / "run" / LOCK_FILE
    held, save = [], run_trainer.save_checkpoint
    monkeypatch.setattr(run_trainer, "save_checkpoint",
                        lambda *a, **k: held.append(json.loads(lock.read_text())) or save(*a, **k))
    train(tiny_cfg("train.max_steps=2"), run)
    assert held[0]["pid"] == os.getpid() and held[0]["host"] == socket.gethostname() and not lock.exists()

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _lock_for(run, other.pid)
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        for resume, overwrite in (("latest", False), (None, True)):  # neither continues nor deletes a live run
            with pytest.raises(UserError, match=f"being written by a running ldm-vae run .*pid {other.pid}"):
                train(tiny_cfg("train.max_steps=4"), run, resume=resume, overwrite=overwrite)
            assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
        _lock_for(run, other.pid, start="1")  # the same pid, but another process since: stale
        assert train(tiny_cfg("train.max_steps=3"), run, resume="latest").summary["steps_this_session"] == 1
        _lock_for(run, other.pid, host="elsewhere")  # cannot be checked from here
        with pytest.raises(UserError, match=f"locked by a run on host elsewhere .*delete {lock}"):
            train(tiny_cfg("train.max_steps=4"), run, resume="latest")
    finally:
        other.kill()
        other.wait()
    _lock_for(run, other.pid)  # left by a killed run: taken over
    assert train(tiny_cfg("train.max_steps=4"), run, resume="latest").summary["steps_this_session"] == 1
    assert not lock.exists()


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_corrupt_checkpoint_is_skipped_on_resume_and_refused_elsewhere(tiny_cfg, tmp_path, caplog):
    """Every checkpoint records the sha256 of its files. --resume latest passes over one whose
    files changed (a flipped bit, a truncated file) and continues from the newest intact one;
    export, and a checkpoint named explicitly, refuse it."""
    from ldm_vae.autoencoder.export import export_run
    from ldm_vae.run.checkpoint import find_checkpoint, read_state

    run = tmp_path / "run"
    cfg = ("train.checkpoint_every=2", "train.checkpoints_total_limit=5")
    train(tiny_cfg("train.max_steps=4", *cfg), run)
    recorded = read_state(run / "checkpoint-4")["checksums"]
    assert {"model.safetensors", "optimizer.bin", EXTRA_FILE, "autoencoder/config.json"} <= set(recorded)
    _flip_a_byte(run / "checkpoint-4" / "model.safetensors")
    with pytest.raises(UserError, match="checkpoint-4 is corrupt: model.safetensors changed"):
        export_run(run, tmp_path / "export")
    with pytest.raises(UserError, match="checkpoint-4 is corrupt"):
        find_checkpoint(run, str(run / "checkpoint-4"))
    with caplog.at_level("WARNING"):
        summary = train(tiny_cfg("train.max_steps=6", *cfg), run, resume="latest").summary
    assert summary["steps_this_session"] == 4  # from checkpoint-2: checkpoint-4 was passed over
    assert "skipping" in caplog.text and "checkpoint-4" in caplog.text
    # a truncated file is caught the same way; with every checkpoint corrupt, nothing to resume
    for _, path in complete_checkpoints(run):
        (path / "optimizer.bin").write_bytes((path / "optimizer.bin").read_bytes()[:100])
    with pytest.raises(UserError, match="every checkpoint in .* is corrupt"):
        train(tiny_cfg("train.max_steps=8", *cfg), run, resume="latest")


def test_a_corrupt_latent_shard_is_refused(tiny_cache, tmp_path):
    from ldm_vae.diffusion.latents import LatentDataset

    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    assert len(json.loads((cache / "cache.json").read_text())["shard_sha256"]) == 1
    LatentDataset(cache)
    _flip_a_byte(cache / "shard-00000.safetensors")
    with pytest.raises(UserError, match="shard-00000.safetensors is corrupt"):
        LatentDataset(cache)


def test_a_stop_signal_ends_the_run_with_a_checkpoint_and_exit_code_75(tiny_ldm_cfg, tiny_cache, tmp_path,
                                                                        monkeypatch):
    """SIGTERM (a scheduler's preemption notice) during step 7: the run finishes its step, stops
    at the next log step (10) with a checkpoint there (none was due), and the CLI exits with 75;
    train.stop_signals=[] leaves the signal to Python (tests/test_resume.py: resume, two processes)."""
    from accelerate import Accelerator

    from ldm_vae.cli import main
    from ldm_vae.errors import EXIT_PREEMPTED

    backward, calls = Accelerator.backward, [0]

    def backward_then_signal(self, loss, **kwargs):
        backward(self, loss, **kwargs)
        calls[0] += 1
        if calls[0] == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Accelerator, "backward", backward_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    code = main(["train-ldm", str(TINY_LDM), f"latents={tiny_cache}", "train.max_steps=20", "train.log_every=5",
                 "train.checkpoint_every=100", "--output-dir", str(tmp_path / "run")])
    assert code == EXIT_PREEMPTED and [s for s, _ in complete_checkpoints(tmp_path / "run")] == [10]
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is the run's only
    with pytest.raises(UserError, match="not a signal a process can catch"):
        train_ldm(tiny_ldm_cfg("train.stop_signals=[SIGKILL]"), tmp_path / "other")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tiny_cfg, tmp_path, monkeypatch):
    """ENOSPC in the middle of the checkpoint-4 save (the models written, the optimizer not):
    a clear error with the path and the free space, no half-written folder left, checkpoint-2
    kept; after space is freed, --resume latest continues from it."""
    from accelerate import Accelerator

    save_state = Accelerator.save_state

    def save_then_fail(self, output_dir=None, **kwargs):
        if str(output_dir).endswith("checkpoint-4"):
            self.save_model(self._models[0], output_dir)  # part of it is on disk
            _no_space()
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_then_fail)
    run, cfg = tmp_path / "run", ("train.checkpoint_every=2", "train.checkpoints_total_limit=5")
    with pytest.raises(UserError, match=r"could not write .*\.tmp-checkpoint-4: No space left on device "
                                        r"\(.* GiB free on that filesystem\); .*checkpoint-2 is kept"):
        train(tiny_cfg("train.max_steps=6", *cfg), run)
    assert [s for s, _ in complete_checkpoints(run)] == [2] and not (run / ".tmp-checkpoint-4").exists()
    monkeypatch.setattr(Accelerator, "save_state", save_state)  # space freed
    assert train(tiny_cfg("train.max_steps=6", *cfg), run, resume="latest").summary["steps_this_session"] == 4


def test_a_full_disk_during_export_and_encode_keeps_what_was_there(tiny_cfg, tmp_path, monkeypatch, fake_fashion):
    from diffusers import AutoencoderKL

    from ldm_vae.autoencoder.export import export_run
    from ldm_vae.data.config import DataConfig
    from ldm_vae.diffusion import latents

    train(tiny_cfg("train.max_steps=2"), tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(AutoencoderKL, "save_pretrained", _no_space)
        with pytest.raises(UserError, match=r"could not write .*export2: No space left on device .*left as it was"):
            export_run(tmp_path / "run", tmp_path / "export2")
    assert not (tmp_path / "export2").exists() and not (tmp_path / ".tmp-export2").exists()
    data, save_file, shards = DataConfig(source="fashion-mnist", path=str(fake_fashion), resolution=16), \
        latents.save_file, []

    def first_shard_fits(*args, **kwargs):
        shards.append(args[1])
        return save_file(*args, **kwargs) if len(shards) == 1 else _no_space()

    with monkeypatch.context() as m:
        m.setattr(latents, "save_file", first_shard_fits)
        with pytest.raises(UserError, match=r"shard-00001.safetensors: No space left .*finished shards are kept"):
            latents.encode_dataset(tmp_path / "run" / "export", data, "test", tmp_path / "cache", shard_size=24)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [latents.PARTIAL_FILE, "shard-00000.safetensors"]
    meta = latents.encode_dataset(tmp_path / "run" / "export", data, "test", tmp_path / "cache", shard_size=24)
    assert len(meta["shards"]) == 3
