"""The Accelerate training loop for latent diffusion: a diffusers UNet2DModel on cached latents.

Per batch: latents z (scaled once by LatentDataset; a KL cache gives a fresh posterior
sample per epoch), noise, uniform timesteps, DDPM forward process
`add_noise(z, noise, t)`, and an MSE between the UNet's output and the target (noise for
epsilon prediction, v = a_t * noise - s_t * z for v-prediction). With class conditioning,
each label is replaced by the null class with probability `diffusion.label_dropout`, so
the same UNet also learns the unconditional model that classifier-free guidance needs.

The run folder, checkpoints, resume, non-finite step guard and metric log are the
autoencoder trainer's (training.py, checkpoint.py): the same guarantees, the same tests.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import find_checkpoint, load_checkpoint, read_state
from .config import BETA_SCHEDULES, DiffusionConfig, LDMConfig
from .data import save_image
from .errors import UserError
from .latents import LatentDataset, load_cache_autoencoder, read_cache
from .models import build_unet
from .pipeline import LatentDiffusionPipeline, make_scheduler
from .training import (
    MetricLog,
    NonFiniteGuard,
    check_output_dir,
    check_resume_compatible,
    ema_step,
    ema_weights,
    make_accelerator,
    make_adamw,
    run_summary,
    save_run_checkpoint,
    start_run_dir,
)

logger = get_logger(__name__)

# what in a cache decides what the UNet learns: a resumed run must train on the same latents
CACHE_IDENTITY = ("fingerprint", "data", "split", "num_images", "flipped", "latent_shape")


def noise_schedule(dc: DiffusionConfig) -> DDPMScheduler:
    """The training noise schedule; samplers are built from its config (pipeline.make_scheduler)."""
    return DDPMScheduler(num_train_timesteps=dc.num_train_timesteps, beta_schedule=BETA_SCHEDULES[dc.beta_schedule],
                         beta_start=dc.beta_start, beta_end=dc.beta_end, prediction_type=dc.prediction_type,
                         clip_sample=False)


def conditioning(cfg: LDMConfig, meta: dict) -> int | None:
    """The number of classes the UNet is conditioned on (None: unconditional)."""
    if not cfg.diffusion.class_conditional:
        return None
    if not meta.get("has_labels"):
        raise UserError(f"diffusion.class_conditional is true but the latent cache {cfg.latents} has no labels "
                        f"({meta['dataset']}); set diffusion.class_conditional=false")
    return meta["num_classes"]


def preview_labels(cfg: LDMConfig, num_classes: int | None) -> torch.Tensor | None:
    """One row of `sample.per_class` images per class."""
    if not num_classes:
        return None
    return torch.arange(num_classes).repeat_interleave(cfg.sample.per_class)


def train_ldm(cfg: LDMConfig, output_dir: str | Path, resume: str | None = None, overwrite: bool = False) -> dict:
    """Train the latent diffusion UNet described by `cfg` on the cache `cfg.latents` into
    `output_dir`; returns the run summary."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir, resume, overwrite)
    if not cfg.latents:
        raise UserError("no latent cache given: pass --latents DIR (made by `ldm-vae encode MODEL_DIR --out DIR`)")
    meta = read_cache(cfg.latents)
    vae = load_cache_autoencoder(meta).eval()  # decodes the sample grids; refused if it changed
    num_classes = conditioning(cfg, meta)
    tc = cfg.train
    accelerator = make_accelerator(tc, output_dir)
    checkpoint = find_checkpoint(output_dir, resume) if resume else None
    if checkpoint is not None:
        check_resume_compatible(cfg, checkpoint, ("model", "diffusion"))
        saved = read_state(checkpoint)["cache"]
        if {k: saved.get(k) for k in CACHE_IDENTITY} != {k: meta.get(k) for k in CACHE_IDENTITY}:
            raise UserError(f"cannot resume {checkpoint}: it was trained on the latents of {saved['autoencoder']} "
                            f"({saved['dataset']}), not on those in {cfg.latents}; pass the run's own --latents")

    dataset = LatentDataset(cfg.latents, seed=cfg.seed)
    noise_scheduler = noise_schedule(cfg.diffusion)
    set_seed(cfg.seed)  # the same initial weights and sampler seed on every process
    unet = build_unet(cfg.model, meta["latent_shape"], num_classes)
    opt = make_adamw(unet.parameters(), tc.lr, tc, accelerator.device)
    lr_sched = get_scheduler(tc.lr_scheduler, opt, num_warmup_steps=tc.lr_warmup_steps,
                             num_training_steps=tc.max_steps)  # stepped once per optimizer step (see train_vae)
    loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True, generator=torch.Generator())
    if tc.compile:
        unet.compile()  # in place: the state dict keeps its keys
    unet, opt, loader = accelerator.prepare(unet, opt, loader)
    if len(loader) == 0:
        raise UserError(f"the latent cache has {len(dataset)} latents, fewer than one batch per process "
                        f"({tc.batch_size} x {accelerator.num_processes}); lower train.batch_size")
    device = accelerator.device
    raw_unet = accelerator.unwrap_model(unet)
    ema_params = list(raw_unet.parameters())
    ema = EMAModel(ema_params, decay=tc.ema_decay) if tc.ema_decay > 0 else None
    if ema is not None:
        ema.to(device)
    extra_state = {"lr_sched": lr_sched, **({"ema": ema} if ema else {})}
    set_seed(cfg.seed, device_specific=True)  # a different noise stream per process from here on

    step = 0
    if checkpoint is not None:
        step = load_checkpoint(accelerator, checkpoint, extra_state)  # also every process's RNG
        if ema is not None:
            ema.to(device)
        logger.info(f"resumed from {checkpoint} at step {step}", main_process_only=True)
    start_run_dir(accelerator, output_dir, cfg, overwrite)
    if accelerator.is_main_process:
        n_params = sum(p.numel() for p in raw_unet.parameters())
        logger.info(f"latents: {len(dataset)} x {meta['latent_shape']} of {meta['dataset']} by {meta['autoencoder']}; "
                    f"UNet {n_params / 1e6:.2f} M parameters, "
                    f"{f'{num_classes} classes' if num_classes else 'unconditional'}")
    accelerator.init_trackers("train_ldm")
    vae.to(device)
    images_per_step = tc.batch_size * accelerator.num_processes * tc.grad_accum_steps

    def save(at_step: int, logs: dict) -> None:
        save_run_checkpoint(accelerator, output_dir, cfg, at_step, {"images_per_step": images_per_step, "logs": logs,
                                                                    "cache": meta},
                            raw_unet, "unet", ema, ema_params, extra_state)

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")  # a few eval calls: compiling them costs more than it saves
    def write_samples(at_step: int) -> None:
        raw_unet.eval()
        pipe = LatentDiffusionPipeline(raw_unet, vae, make_scheduler(cfg.sample.solver, noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        labels = preview_labels(cfg, num_classes)
        with ema_weights(ema, ema_params), accelerator.autocast():
            images = pipe(class_labels=labels, batch_size=8 * cfg.sample.per_class,
                          num_inference_steps=cfg.sample.steps, guidance_scale=cfg.sample.guidance_scale,
                          generator=torch.Generator().manual_seed(cfg.seed), output_type="pt").images
        raw_unet.train()
        save_image(images * 2 - 1, output_dir / "samples" / f"samples_{at_step:07d}.png", nrow=cfg.sample.per_class)
        tb = accelerator.get_tracker("tensorboard", unwrap=True)
        tb.add_images("EMA samples (one row per class)", images, at_step)

    guard = NonFiniteGuard(accelerator, tc.max_consecutive_skips)
    metrics, last_logs = MetricLog(accelerator, output_dir, images_per_step), {}
    t_start, start_step = time.perf_counter(), step
    progress = tqdm(total=tc.max_steps, initial=step, desc="train-ldm", disable=not accelerator.is_local_main_process)
    epoch, skip = divmod(step * tc.grad_accum_steps, len(loader))
    timesteps = cfg.diffusion.num_train_timesteps
    unet.train()
    while step < tc.max_steps:
        loader.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            z, labels = batch["latents"], batch["label"]
            noise = torch.randn_like(z)
            t = torch.randint(0, timesteps, (len(z),), device=z.device)
            noisy = noise_scheduler.add_noise(z, noise, t)
            if tc.channels_last:  # the UNet's input only: the noise draw keeps its order
                noisy = noisy.contiguous(memory_format=torch.channels_last)
            target = noise if cfg.diffusion.prediction_type == "epsilon" else noise_scheduler.get_velocity(z, noise, t)
            if num_classes:
                drop = torch.rand(len(z), device=z.device) < cfg.diffusion.label_dropout
                labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
            with accelerator.accumulate(unet):
                with accelerator.autocast():
                    pred = unet(noisy, t, class_labels=labels if num_classes else None).sample
                loss = F.mse_loss(pred.float(), target.float())  # fp32 loss under autocast
                accelerator.backward(loss)
                ok = None  # an accumulation micro-step: no optimizer step
                logs = {"loss": loss.detach()}
                if accelerator.sync_gradients:
                    logs["grad_norm"] = accelerator.clip_grad_norm_(unet.parameters(), tc.max_grad_norm or math.inf)
                    ok = guard.finite(logs["grad_norm"])  # a device flag: no host sync
                guard.optimizer_step(opt, ok)
                opt.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            lr_sched.step()  # the LR schedule follows the step count, skipped steps included
            ok = guard.end_step(step, ok)
            if ema is not None:
                ema_step(ema, ema_params, ok)
            step += 1
            progress.update(1)
            metrics.add(logs, ok)
            if step % tc.log_every == 0 or step == tc.max_steps:
                last_logs = metrics.flush(step, {"lr": lr_sched.get_last_lr()[0],
                                                 "skipped_steps": guard.check(step, output_dir)})
                progress.set_postfix({k: f"{last_logs[k]:.4g}" for k in ("loss", "grad_norm") if k in last_logs})
            if (step % tc.image_every == 0 or step == tc.max_steps) and accelerator.is_main_process:
                write_samples(step)
            if step % tc.checkpoint_every == 0 or step == tc.max_steps:
                guard.check(step, output_dir)  # never checkpoint past a run of non-finite steps
                save(step, last_logs)
            if step >= tc.max_steps:
                break
        epoch, skip = epoch + 1, 0
    progress.close()

    summary = run_summary(accelerator, tc, step, start_step, t_start, guard, last_logs, latents=str(cfg.latents),
                          autoencoder=meta["autoencoder"], num_classes=num_classes)
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    summary["process_index"] = accelerator.process_index
    summary["models"] = {"unet": raw_unet, "ema": ema}
    accelerator.end_training()
    return summary
