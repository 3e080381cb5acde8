"""`train:`: the optimisation and bookkeeping settings both trainers share."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from ..config import non_negative, one_of, positive, unit_interval
from ..errors import UserError

MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULERS = ("constant_with_warmup", "cosine", "linear")
# accelerate's trackers (accelerate.utils.LoggerType), every installed one, or none
REPORT_TO = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio", "all",
             "none")


@dataclass
class OptimConfig:
    """The `train:` section; each trainer subclasses it with its own defaults."""

    batch_size: int = 32
    max_steps: int = 2000
    grad_accum_steps: int = 1
    lr: float = 1.0e-4
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    weight_decay: float = 0.0
    lr_warmup_steps: int = 100
    # the trained model's LR schedule (diffusers.optimization.get_scheduler) over max_steps:
    # constant_with_warmup | cosine | linear
    lr_scheduler: str = "constant_with_warmup"
    max_grad_norm: float = 1.0
    # no | bf16 | fp16; weights stay fp32 (autocast), see run/trainer.py
    mixed_precision: str = "no"
    # EMA of the weights; 0 turns EMA off (export then uses raw weights)
    ema_decay: float = 0.999
    # a step with non-finite gradients is skipped; this many in a row stop the run
    max_consecutive_skips: int = 25
    # the networks' inputs (pixel batches; the LDM's noisy latents) in channels_last memory
    # format, which the activations then keep: what GPU tensor-core convolutions prefer.
    # Weights stay contiguous (safetensors saves only contiguous tensors), and random draws
    # keep their order. No measurable gain on CPU (BENCHMARKS.md).
    channels_last: bool = False
    # torch.compile the networks in place (Module.compile: checkpoints and exports are
    # unchanged); the first steps are slow while it compiles. No gain on CPU (BENCHMARKS.md).
    compile: bool = False
    log_every: int = 10
    # where losses, pictures and the resolved config (as hyperparameters) also go, besides
    # logs/metrics.jsonl (always written): an accelerate tracker, "all" installed ones, "none"
    report_to: str = "tensorboard"
    # a picture (reconstructions / samples) every N steps
    image_every: int = 500
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 2
    # signals (a scheduler's preemption notice) that stop the run at the next log step with a
    # checkpoint, exit code 75; continue with --resume latest. [] leaves them to Python.
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])

    def __post_init__(self):
        one_of(self, "mixed_precision", MIXED_PRECISION)
        one_of(self, "lr_scheduler", LR_SCHEDULERS)
        one_of(self, "report_to", REPORT_TO)
        for name in self.stop_signals:
            if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
                raise UserError(f"train.stop_signals: {name!r} is not a signal a process can catch (e.g. SIGTERM, "
                                f"SIGUSR1, SIGINT)")
        positive(self, "batch_size", "max_steps", "grad_accum_steps", "max_consecutive_skips", "lr", "log_every",
                 "image_every", "checkpoint_every", "checkpoints_total_limit")
        non_negative(self, "weight_decay", "lr_warmup_steps", "max_grad_norm")
        unit_interval(self, "ema_decay", "adam_beta1", "adam_beta2")
