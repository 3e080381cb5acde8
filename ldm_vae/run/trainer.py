"""The run skeleton both trainers share, and the parts of a step whose behaviour must be the
same in both: the non-finite step guard, the weight EMA and the metric log.

`Trainer.fit()` is the shape of every run, top to bottom: build the Accelerator, take the
folder's lock (run/lock.py) and the stop signals, refuse a folder that holds a run, check
the inputs, check the checkpoint to resume, seed, build and prepare the models, EMA, load
the checkpoint, write the run folder, then the loop (epochs replayed from the step count,
one optimizer step per `train_step`, EMA, logs, pictures and checkpoints at their cadence,
a stop signal honoured at a log step) and the summary. A trainer subclasses it and
supplies what is its own: `build()` (datasets, models, optimizers, schedulers),
`train_step()` (one batch, its maths in plain view) and `preview()` (its picture); a few
hooks with empty defaults cover the rest (torchtitan's `Trainer.train()` / `train_step`).

The reliability guarantees in the README are stated once, here, and tested for both
trainers.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.data_loader import SeedableRandomSampler
from accelerate.logging import get_logger
from accelerate.tracking import get_available_trackers
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from .. import config as config_lib
from ..errors import Preempted, UserError
from .checkpoint import (
    complete_checkpoints,
    find_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from .config import OptimConfig
from .lock import LOCK_FILE, RunLock

logger = get_logger(__name__)


@dataclass
class RunResult:
    """What `Trainer.fit()` returns on each process: the run summary (what summary.json holds)
    and this process's EMA; each trainer adds its trained modules."""

    summary: dict
    process_index: int
    ema: EMAModel | None


# ==============================================================================================
# The skeleton
# ==============================================================================================


class Trainer:
    """One training run of `cfg` (with a `train:` OptimConfig section) into `output_dir`."""

    name = "train"  # progress bar and TensorBoard run name
    resume_keys: tuple[str, ...] = ()  # config keys that change what a checkpoint's tensors mean
    checkpoint_model = "model"  # the folder of each checkpoint that holds the EMA model (diffusers format)
    postfix_keys: tuple[str, ...] = ("loss",)  # logged values shown on the progress bar

    # set by build()
    dataset: Any  # with set_epoch(epoch), and len() unless it is a stream (an IterableDataset)
    loader: Any  # the prepared DataLoader
    model: torch.nn.Module  # the raw model whose EMA weights go into each checkpoint
    ema_params: list  # the parameters the weight EMA averages
    extra_state: dict  # name -> object with state_dict(), saved in trainer_extra.pt (weights_only)

    def __init__(self, cfg, output_dir: str | Path, resume: str | None = None, overwrite: bool = False):
        """`resume`: 'latest' or a checkpoint folder; `overwrite=True` deletes a run already in
        `output_dir` (only after the inputs were checked, so a mistake there deletes nothing)."""
        self.cfg, self.tc = cfg, cfg.train
        self.output_dir, self.resume, self.overwrite = Path(output_dir), resume, overwrite

    # --- what each trainer supplies --------------------------------------------------------------

    def check_inputs(self) -> None:
        """Fail before any work on inputs the run needs (weights, caches)."""

    def check_resume(self, checkpoint: Path) -> None:
        """Refuse a checkpoint whose run used other inputs."""

    def build(self) -> None:
        """Datasets, models, optimizers and schedulers, prepared by `self.accelerator`; sets
        dataset, loader, model, ema_params and extra_state. Runs with the same seed on every
        process."""
        raise NotImplementedError

    def after_load(self) -> None:
        """After the checkpoint (if any) is loaded, before the run folder is written."""

    def log_start(self) -> None:
        """Main process: what the run trains on, once the run folder exists."""

    def train_step(self, batch: dict, step: int) -> tuple[torch.Tensor, dict] | None:
        """One batch. On the batch that completes optimizer step `step` (after its LR
        schedulers stepped): (device flag: the step was finite, detached logs); None on
        gradient-accumulation micro-steps."""
        raise NotImplementedError

    def log_extras(self, step: int) -> dict:
        """Host values logged at log steps next to the step's means (e.g. the LR)."""
        return {}

    def preview(self, step: int) -> None:
        """Every process, every `train.image_every` steps: the trainer's picture (written by the
        main process)."""

    def checkpoint_info(self) -> dict:
        """What trainer_state.json records besides the step, logs and config."""
        return {}

    def summary_details(self) -> dict:
        return {}

    def finish(self, summary: dict) -> None:
        """Every process, after summary.json is written (the autoencoder exports itself)."""

    def result(self, summary: dict) -> RunResult:
        return RunResult(summary, self.accelerator.process_index, self.ema)

    # --- the shape of a run ----------------------------------------------------------------------

    def fit(self) -> RunResult:
        self.accelerator = make_accelerator(self.tc, self.output_dir)  # writes nothing yet
        # one run per folder (run/lock.py); a stop signal sets a flag instead of ending the process
        with RunLock(self.output_dir, self.accelerator.is_main_process), stop_requests(self.tc.stop_signals) as stop:
            self.stop_signalled = stop
            return self._fit()

    def _fit(self) -> RunResult:
        cfg, tc, out, acc = self.cfg, self.tc, self.output_dir, self.accelerator
        check_output_dir(out, self.resume, self.overwrite)
        self.check_inputs()
        checkpoint = find_checkpoint(out, self.resume, skip_corrupt=True) if self.resume else None
        if checkpoint is not None:
            check_resume_compatible(cfg, checkpoint, self.resume_keys)
            self.check_resume(checkpoint)

        # Same seed on every process for everything built here (weights, sampler seed) ...
        set_seed(cfg.seed)
        self.build()
        streamed = isinstance(self.dataset, IterableDataset)  # data.streaming: no length, no sampler
        per_step = tc.batch_size * acc.num_processes
        if streamed:  # a stream's epoch ends when the stream does: checkpoints keep where it stands
            self.extra_state["stream_position"] = position = StreamPosition()
            # prepare() hands a stream to a batch dispatcher that drops make_loader's generator; without
            # one, each epoch's iterator draws from the global RNG and resume would shift the noise stream
            getattr(self.loader, "base_dataloader", self.loader).generator = torch.Generator()
        else:
            use_lazy_sampler(self.loader)  # the epoch's order as a tensor, not n Python ints
            if len(self.loader) == 0:
                raise UserError(f"{self.describe_data()} has {len(self.dataset)} items, fewer than one batch per "
                                f"process ({tc.batch_size} x {acc.num_processes}); lower train.batch_size")
        self.ema = EMAModel(self.ema_params, decay=tc.ema_decay) if tc.ema_decay > 0 else None
        if self.ema is not None:
            self.ema.to(acc.device)
            self.extra_state["ema"] = self.ema
        # ... and a different seed per process from here on (noise, augmentation).
        set_seed(cfg.seed, device_specific=True)

        step = 0
        if checkpoint is not None:
            step = load_checkpoint(acc, checkpoint, self.extra_state)  # also every process's RNG
            if self.ema is not None:
                self.ema.to(acc.device)
            logger.info(f"resumed from {checkpoint} at step {step}", main_process_only=True)
        self.after_load()
        start_run_dir(acc, out, cfg, self.overwrite)
        if acc.is_main_process:
            self.log_start()
        acc.init_trackers(self.name.replace("-", "_"), config=tracker_config(cfg))
        self.images_per_step = per_step * tc.grad_accum_steps

        self.guard = NonFiniteGuard(acc, tc.max_consecutive_skips)
        metrics, last_logs = MetricLog(acc, out, self.images_per_step), {}
        t_start, start_step = time.perf_counter(), step
        progress = tqdm(total=tc.max_steps, initial=step, desc=self.name, disable=not acc.is_local_main_process)
        # the data order depends only on (seed, epoch): skip what the resumed steps consumed
        if streamed:
            epoch, skip = position.epoch, position.batches
        else:
            epoch, skip = divmod(step * tc.grad_accum_steps, len(self.loader))
        stop, rows_skipped = False, 0
        while step < tc.max_steps and not stop:
            self.loader.set_epoch(epoch)
            self.dataset.set_epoch(epoch)
            read = skip
            for batch in acc.skip_first_batches(self.loader, skip) if skip else self.loader:
                read += 1
                if streamed:
                    position.epoch, position.batches = epoch, read
                    rows_skipped += int(batch.pop("skipped").sum())  # unusable files met on the way
                done = self.train_step(batch, step)
                if done is None:  # a gradient-accumulation micro-step
                    continue
                ok, logs = done
                ok = self.guard.end_step(step, ok)
                if self.ema is not None:
                    ema_step(self.ema, self.ema_params, ok)
                step += 1
                progress.update(1)
                metrics.add(logs, ok)
                if step % tc.log_every == 0 or step == tc.max_steps:
                    last_logs = metrics.flush(step, {**self.log_extras(step),
                                                     "skipped_steps": self.guard.check(step, out)})
                    progress.set_postfix({k: f"{last_logs[k]:.4g}" for k in self.postfix_keys if k in last_logs})
                    # a stop signal (preemption) on any process stops every process here, together
                    stop = bool(acc.reduce(torch.tensor(int(self.stop_signalled[0]), device=acc.device), "sum") > 0)
                if step % tc.image_every == 0 or step == tc.max_steps:
                    self.preview(step)
                if step % tc.checkpoint_every == 0 or step == tc.max_steps or stop:
                    self.guard.check(step, out)  # never checkpoint past a run of non-finite steps
                    self.save(step, last_logs)
                if step >= tc.max_steps or stop:
                    break
            if read == 0:  # only a stream can end before its first batch (a sized loader was checked)
                raise UserError(f"{self.describe_data()} gave no full batch per process ({tc.batch_size} x "
                                f"{acc.num_processes}) in epoch {epoch}; lower train.batch_size")
            epoch, skip = epoch + 1, 0
        progress.close()
        if step < tc.max_steps:  # stopped by a signal, with a checkpoint of this step
            acc.end_training()
            raise Preempted(f"stopped by a signal at step {step} of {tc.max_steps}; {out / f'checkpoint-{step}'} is "
                            f"saved; continue with --resume latest")

        if streamed:  # every process's count of the rows its items skipped (a collective: all processes)
            rows_skipped = int(acc.reduce(torch.tensor(rows_skipped, device=acc.device), "sum"))
        self.rows_skipped = rows_skipped
        summary = {
            "steps": step,
            "steps_this_session": step - start_step,
            "wall_time_s": round(time.perf_counter() - t_start, 1),
            "images_per_step": self.images_per_step,
            "num_processes": acc.num_processes,
            "mixed_precision": tc.mixed_precision,
            **self.summary_details(),
            "skipped_steps": int(self.guard.total),
            "final_logs": last_logs,
        }
        if acc.is_main_process:
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        self.finish(summary)
        acc.wait_for_everyone()
        result = self.result(summary)
        acc.end_training()  # closes the trackers (and the process group under DDP)
        return result

    def describe_data(self) -> str:
        return "the training data"

    def save(self, step: int, logs: dict) -> None:
        """A full checkpoint (run/checkpoint.py) that also holds the resolved config and the EMA
        weights of `self.model` as a diffusers folder (what exports read)."""
        def write_extra(folder: Path) -> None:
            (folder / "config.yaml").write_text(config_lib.to_yaml(self.cfg))
            with ema_weights(self.ema, self.ema_params):
                self.save_models(folder)

        state = {"step": step, "images_per_step": self.images_per_step, "logs": logs, **self.checkpoint_info(),
                 "config": config_lib.to_dict(self.cfg)}
        path = save_checkpoint(self.accelerator, self.output_dir, step, state, write_extra,
                               self.tc.checkpoints_total_limit, self.extra_state)
        logger.info(f"saved {path}", main_process_only=True)

    def save_models(self, folder: Path) -> None:
        """The (EMA-swapped) model as a diffusers folder in the checkpoint `folder`."""
        self.model.save_pretrained(folder / self.checkpoint_model)

    def make_loader(self, dataset, num_workers: int = 0) -> DataLoader:
        """The training DataLoader: shuffled per epoch by a seedable sampler, whole batches
        (`accelerate.prepare` makes it Accelerate's; `fit` then makes it a LazySeedableRandomSampler).
        A stream (data.streaming) shuffles itself."""
        if isinstance(dataset, IterableDataset):
            return DataLoader(dataset, batch_size=self.tc.batch_size, drop_last=True, num_workers=num_workers,
                              pin_memory=torch.cuda.is_available())
        # A generator of its own: creating an epoch's iterator draws a seed from it, and that
        # draw must not come from the global RNG (it would shift the noise stream on resume).
        return DataLoader(dataset, batch_size=self.tc.batch_size, shuffle=True, drop_last=True,
                          num_workers=num_workers, pin_memory=torch.cuda.is_available(), generator=torch.Generator())


# ==============================================================================================
# Preemption
# ==============================================================================================

@contextlib.contextmanager
def stop_requests(names: list[str]):
    """While inside, the named signals (a scheduler's preemption notice: SLURM, Kubernetes
    send SIGTERM or SIGUSR1 before killing) only set the yielded flag; the loop stops at the
    next log step, where every process agrees. Outside the main thread signals cannot be
    handled, and they keep their default."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def request_stop(signum, frame):
        flag[0] = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.Signals[n] for n in names)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ==============================================================================================
# Run folder and Accelerator
# ==============================================================================================


def check_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to start into a folder that holds a run, unless resuming or overwriting."""
    if resume is not None and overwrite:
        raise UserError("--resume continues the run in --output-dir and --overwrite deletes it; pass one of them")
    if resume is not None or overwrite:
        return
    if complete_checkpoints(output_dir):
        raise UserError(f"{output_dir} already holds a run; continue it with --resume latest, choose another "
                        f"--output-dir, or replace it with --overwrite (nothing was changed)")
    if (output_dir / "config.yaml").exists():
        raise UserError(f"{output_dir} holds a run that has no complete checkpoint yet; replace it with "
                        f"--overwrite or choose another --output-dir (nothing was changed)")


def make_accelerator(tc: OptimConfig, output_dir: Path) -> Accelerator:
    # accelerate drops a tracker whose package is missing with a debug line: say so instead
    if tc.report_to not in ("all", "none") and tc.report_to not in map(str, get_available_trackers()):
        raise UserError(f"train.report_to={tc.report_to}, but the {tc.report_to} package is not installed: "
                        f"pip install {tc.report_to}, or choose train.report_to=tensorboard or none")
    return Accelerator(
        gradient_accumulation_steps=tc.grad_accum_steps,
        mixed_precision=tc.mixed_precision,
        log_with=None if tc.report_to == "none" else tc.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # the sampler's order depends only on (seed, epoch): resume can replay it exactly
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


class LazySeedableRandomSampler(SeedableRandomSampler):
    """Accelerate's SeedableRandomSampler (the order set by seed + epoch, the same on every
    process) that keeps an epoch's permutation as an int64 tensor and hands it out a chunk at a
    time. torch's `RandomSampler.__iter__` turns the whole permutation into Python ints: about
    48 MB per 10^6 items against 8 MB, the growth of the LDM trainer's memory with the size of its
    latent cache (BENCHMARKS.md (f)). The same draws, so the same order as before (tested)."""

    chunk = 4096  # indices turned into Python ints at a time

    def __iter__(self):
        n = len(self.data_source)
        if self.replacement or self.num_samples != n or self.generator is None:
            yield from super().__iter__()  # not what make_loader builds
            return
        # what SeedableRandomSampler.__iter__ seeds and RandomSampler.__iter__ draws
        self.generator.manual_seed(self.initial_seed + self.epoch)
        order = torch.randperm(n, generator=self.generator)  # (n,) int64
        for start in range(0, n, self.chunk):
            yield from order[start:start + self.chunk].tolist()
        # RandomSampler then draws a permutation that it slices to nothing; draw it too (into the
        # same memory): the DataLoader draws its next epoch's worker seed from this generator
        torch.randperm(n, generator=self.generator, out=order)
        self.set_epoch(self.epoch + 1)


class StreamPosition:
    """Where a streamed training split stands (data.streaming): the epoch and the batches of it
    read so far. A stream's epoch length is known only when it ends, so resume cannot derive
    this from the step count; it is saved with each checkpoint (trainer_extra.pt)."""

    def __init__(self):
        self.epoch = self.batches = 0

    def state_dict(self) -> dict:
        return {"epoch": torch.tensor(self.epoch), "batches": torch.tensor(self.batches)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])


def use_lazy_sampler(loader) -> None:
    """Give a loader from `accelerator.prepare` a LazySeedableRandomSampler in place of its
    SeedableRandomSampler. Only after prepare: prepare rebuilds every RandomSampler, subclasses
    included. Under DDP each process holds the same sampler and Accelerate splits its batches."""
    old = loader.get_sampler()
    loader.set_sampler(LazySeedableRandomSampler(old.data_source, replacement=old.replacement,
                                                 num_samples=old._num_samples, generator=old.generator,
                                                 data_seed=old.initial_seed))


def tracker_config(cfg: Any) -> dict:
    """The resolved config as the flat `section.key` values trackers take (bool, int, float,
    str; lists and None as their text)."""
    flat = {}

    def walk(prefix: str, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)

    walk("", config_lib.to_dict(cfg))
    return flat


def log_images(accelerator: Accelerator, tag: str, images01: torch.Tensor, step: int) -> None:
    """Images in [0, 1] (N, C, H, W) to every tracker that takes pictures."""
    for tracker in accelerator.trackers:
        if hasattr(tracker, "log_images"):
            tracker.log_images({tag: images01}, step=step)


def start_run_dir(accelerator: Accelerator, output_dir: Path, cfg: Any, overwrite: bool) -> None:
    """Main process: delete the old run (`--overwrite`, only now that every input was
    checked), then write the resolved config."""
    if not accelerator.is_main_process:
        return
    if overwrite and output_dir.exists():
        for item in output_dir.iterdir():
            if item.name != LOCK_FILE:  # this run's own lock stays
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        logger.info(f"--overwrite: deleted the previous run in {output_dir}")
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))



def check_resume_compatible(cfg: Any, checkpoint: Path, fixed: tuple[str, ...]) -> None:
    """The config keys in `fixed` change what the checkpoint's tensors mean: they must match."""
    saved = config_lib.load_saved_config(read_state(checkpoint)["config"], f"{checkpoint}/trainer_state.json",
                                         type(cfg))
    changed = [k for k in fixed if config_lib.get_key(saved, k) != config_lib.get_key(cfg, k)]
    if changed:
        raise UserError(f"cannot resume {checkpoint}: {', '.join(changed)} differ from the checkpoint's config; "
                        f"resume with the run's own config ({checkpoint.parent / 'config.yaml'})")


# ==============================================================================================
# What a step shares: optimizer, non-finite guard, EMA, metric log
# ==============================================================================================


def make_adamw(params, lr: float, tc: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (CPU, CUDA): one kernel for every tensor,
    about 3x faster than the per-tensor loop on CPU, and it can skip a step on the device
    (`found_inf`, see NonFiniteGuard) without a host sync."""
    return torch.optim.AdamW(params, lr=lr, betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay,
                             fused=device.type in ("cpu", "cuda"))


class NonFiniteGuard:
    """Skips optimizer steps whose gradients are not finite, and stops a run that keeps
    producing them, without a host-device sync per step.

    The decision uses the clipped-gradient norm, which is computed from gradients already
    averaged over processes, so every process skips the same steps without another
    collective. A NaN/inf loss on any process makes that norm non-finite. It stays on the
    device: the fused AdamW skips on its `found_inf` flag, the EMA, the metric log and the
    counters here are masked with it. The counters are read on the host only by `check`,
    at log steps and before checkpoints, so a run of `limit` non-finite steps stops at the
    first such step after it (never after writing a checkpoint past it). Under fp16 the
    GradScaler owns the decision (it skips the step and lowers the scale); its skips are
    counted the same way.
    """

    def __init__(self, accelerator: Accelerator, limit: int):
        self.accelerator, self.limit = accelerator, limit
        zero = torch.zeros((), dtype=torch.long, device=accelerator.device)
        self.total, self.consecutive, self.first_bad = zero, zero.clone(), zero.clone()
        self.reported = 0

    def finite(self, grad_norm: torch.Tensor) -> torch.Tensor:
        if self.accelerator.scaler is not None:  # the scaler skips non-finite steps itself
            return torch.ones((), dtype=torch.bool, device=grad_norm.device)
        return torch.isfinite(grad_norm)

    def optimizer_step(self, optimizer, ok: torch.Tensor | None) -> None:
        """`optimizer.step()` unless `ok` is False; `ok=None` on accumulation micro-steps
        (where Accelerate does not step)."""
        inner = optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps the torch one
        if ok is None or self.accelerator.scaler is not None:
            optimizer.step()
        elif inner.defaults.get("fused"):
            inner.found_inf = (~ok).float()  # read by the fused kernel, as GradScaler sets it
            try:
                optimizer.step()
            finally:
                del inner.found_inf
        elif ok:  # no fused kernel on this device: decide on the host
            optimizer.step()

    def end_step(self, step: int, ok: torch.Tensor) -> torch.Tensor:
        """Record whether the optimizer step at index `step` happened; returns that flag."""
        if self.accelerator.scaler is not None:  # Accelerate reads the scale on the host
            ok = ok & (not self.accelerator.optimizer_step_was_skipped)
        bad = (~ok).long()
        self.total = self.total + bad
        self.consecutive = (self.consecutive + 1) * bad
        self.first_bad = torch.where(self.consecutive == 1, step, self.first_bad)
        return ok

    def check(self, steps_done: int, output_dir: Path) -> int:
        """Read the counters (one host sync): warn about skips since the last check, stop a
        run of `limit` or more consecutive non-finite steps; returns the session's total."""
        total, consecutive, first_bad = torch.stack([self.total, self.consecutive, self.first_bad]).tolist()
        if total > self.reported:
            logger.warning(f"{total - self.reported} optimizer steps skipped for non-finite losses or gradients up to "
                           f"step {steps_done} ({total} in this session)", main_process_only=True)
            self.reported = total
        if consecutive >= self.limit:
            found = complete_checkpoints(output_dir)
            last = f"the last good checkpoint is {found[-1][1]}" if found else "no checkpoint was written yet"
            raise UserError(f"{consecutive} consecutive steps ({first_bad}-{steps_done - 1}) had non-finite losses or "
                            f"gradients, so training stopped; {last}. Lower train.lr, try train.mixed_precision=no or "
                            f"bf16, or check the data; the limit is train.max_consecutive_skips")
        return total


@torch.no_grad()
def ema_step(ema, params: list[torch.nn.Parameter], ok: torch.Tensor) -> None:
    """`EMAModel.step(params)` where `ok` is True, decided on the device: a skipped optimizer
    step leaves the weights as they were, and a zero weight leaves the average as it was.
    (The decay warm-up counts skipped steps too.)"""
    ema.optimization_step += 1
    ema.cur_decay_value = ema.get_decay(ema.optimization_step)
    torch._foreach_lerp_(ema.shadow_params, params, (1 - ema.cur_decay_value) * ok.float())


@contextlib.contextmanager
def ema_weights(ema, params: list[torch.nn.Parameter]):
    """Temporarily swap the EMA weights into the model (what exports and pictures use)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


class MetricLog:
    """Per-key device-side sums between log steps (no host sync in between); at a log step,
    the means over the window and over processes go to TensorBoard and logs/metrics.jsonl."""

    def __init__(self, accelerator: Accelerator, output_dir: Path, images_per_step: int):
        self.accelerator, self.images_per_step = accelerator, images_per_step
        self.path = output_dir / "logs" / "metrics.jsonl"
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, tuple] = {}
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, logs: dict, ok: torch.Tensor) -> None:
        """One optimizer step; a skipped one (`ok` False) has non-finite values and stays out
        of the means (masked on the device)."""
        for k, v in logs.items():
            total, count = self.sums.get(k, (0.0, 0.0))
            self.sums[k] = (total + torch.where(ok, v.detach().float(), 0.0), count + ok.float())
        self.steps += 1

    def flush(self, step: int, extra: dict) -> dict:
        keys = sorted(self.sums)
        logs = {}
        if keys:  # one host read: [sum, count] per key, summed over processes (the counts agree)
            stats = self.accelerator.reduce(torch.stack([torch.stack(self.sums[k]) for k in keys]), "sum").tolist()
            logs = {k: total / count for k, (total, count) in zip(keys, stats) if count > 0}
        logs["images_per_s"] = self.steps * self.images_per_step / (time.perf_counter() - self.t0)
        logs.update(extra)
        self.accelerator.log(logs, step=step)
        if self.accelerator.is_main_process:  # plain-text twin of the TensorBoard scalars
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")
        self._reset()
        return logs
