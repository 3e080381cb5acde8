"""What the autoencoder and latent diffusion trainers share: the run folder rules, the
Accelerator set-up, the non-finite step guard, EMA swapping and the metric log.

Each trainer keeps its own visible loop (train_vae.py, train_ldm.py); this module holds
only the parts whose behaviour must be the same in both (the reliability guarantees in
the README are stated once and tested for both).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration

from . import config as config_lib
from .checkpoint import complete_checkpoints, read_state, save_checkpoint
from .config import OptimConfig
from .errors import UserError

logger = get_logger(__name__)


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


def check_resume_compatible(cfg: Any, checkpoint: Path, fixed: tuple[str, ...]) -> None:
    """The config keys in `fixed` change what the checkpoint's tensors mean: they must match."""
    saved = config_lib.from_dict(read_state(checkpoint)["config"], f"{checkpoint}/trainer_state.json", type(cfg))
    changed = [k for k in fixed if config_lib.get_key(saved, k) != config_lib.get_key(cfg, k)]
    if changed:
        raise UserError(f"cannot resume {checkpoint}: {', '.join(changed)} differ from the checkpoint's config; "
                        f"resume with the run's own config ({checkpoint.parent / 'config.yaml'})")


def make_accelerator(tc: OptimConfig, output_dir: Path) -> Accelerator:
    return Accelerator(
        gradient_accumulation_steps=tc.grad_accum_steps,
        mixed_precision=tc.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # the sampler's order depends only on (seed, epoch): resume can replay it exactly
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def start_run_dir(accelerator: Accelerator, output_dir: Path, cfg: Any, overwrite: bool) -> None:
    """Main process: delete the old run (`--overwrite`, only now that every input was
    checked), then write the resolved config."""
    if not accelerator.is_main_process:
        return
    if overwrite and output_dir.exists():
        shutil.rmtree(output_dir)
        logger.info(f"--overwrite: deleted the previous run in {output_dir}")
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))


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


def save_run_checkpoint(accelerator: Accelerator, output_dir: Path, cfg: Any, step: int, state: dict,
                        model: torch.nn.Module, subfolder: str, ema, ema_params: list, extra_state: dict) -> None:
    """A full checkpoint (checkpoint.save_checkpoint) that also holds the resolved config and
    the EMA weights of `model` as a diffusers folder `subfolder` (what exports read)."""
    def write_extra(folder: Path) -> None:
        (folder / "config.yaml").write_text(config_lib.to_yaml(cfg))
        with ema_weights(ema, ema_params):
            model.save_pretrained(folder / subfolder)

    state = {"step": step, **state, "config": config_lib.to_dict(cfg)}
    path = save_checkpoint(accelerator, output_dir, step, state, write_extra, cfg.train.checkpoints_total_limit,
                           extra_state)
    logger.info(f"saved {path}", main_process_only=True)


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


def run_summary(accelerator: Accelerator, tc: OptimConfig, step: int, start_step: int, t_start: float,
                guard: NonFiniteGuard, last_logs: dict, **details) -> dict:
    """What every run's summary.json holds, plus the trainer's `details`."""
    return {
        "steps": step,
        "steps_this_session": step - start_step,
        "wall_time_s": round(time.perf_counter() - t_start, 1),
        "images_per_step": tc.batch_size * accelerator.num_processes * tc.grad_accum_steps,
        "num_processes": accelerator.num_processes,
        "mixed_precision": tc.mixed_precision,
        **details,
        "skipped_steps": int(guard.total),
        "final_logs": last_logs,
    }
