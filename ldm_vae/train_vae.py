"""The Accelerate training loop for autoencoders: one readable loop.

Per batch, inside ONE `accelerator.accumulate(ae, disc)`:
  1. autoencoder step: recon + LPIPS + KL or VQ terms (+ adaptive-weighted GAN term once
     `loss.disc_start` is reached, through a frozen, unwrapped discriminator so no
     discriminator gradient is produced);
  2. discriminator step (from `disc_start - disc_pretrain_steps` on): one forward of
     [real; recon.detach()] through the DDP-wrapped discriminator, so nothing reaches the
     autoencoder's gradients.
A VQ model's quantizer then updates its bookkeeping (usage, EMA codebook, restarts) from
the same forward, identically on every process (see quantize.py).
Weights stay fp32 under autocast (never cast trainable weights to half precision). Steps
are counted on `sync_gradients`. Data order, RNG, EMA, LeCam state and schedulers are in
every checkpoint, so `--resume latest` continues the same run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .checkpoint import find_checkpoint, load_checkpoint
from .config import Config
from .data import build_dataset, save_image
from .discriminator import PatchDiscriminator
from .errors import UserError
from .losses import AutoencoderLoss, LeCamEMA
from .models import build_training_model, ema_parameters, reconstruct
from .perceptual import LPIPSWeightsMissing, build_lpips
from .plots import save_usage_histogram
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

NOTICE_RULE = "!" * 88


def build_perceptual(cfg: Config):
    """(LPIPS module or None, one-line status recorded in the summary and the model card)."""
    lc = cfg.loss
    if lc.perceptual_weight == 0:
        return None, "off (loss.perceptual_weight=0)"
    try:
        net = build_lpips(lc.lpips_net, lc.lpips_weights, lc.lpips_random_backbone)
    except LPIPSWeightsMissing as e:
        if lc.lpips_if_missing == "error":
            raise
        status = (f"SKIPPED: the pretrained LPIPS '{lc.lpips_net}' backbone weights were not available, so this "
                  f"model was trained WITHOUT the perceptual term (loss.lpips_if_missing=skip)")
        logger.warning(f"\n{NOTICE_RULE}\n{status}.\n{e}\n{NOTICE_RULE}", main_process_only=True)
        return None, status
    if net.random_backbone:
        return net, ("RANDOM LPIPS backbone (loss.lpips_random_backbone=true): tests the wiring only, "
                     "not a perceptual loss")
    return net, f"LPIPS ({lc.lpips_net}, pretrained backbone)"


@torch.no_grad()
def _kmeans_init(cfg: Config, accelerator: Accelerator, vae, quantizer, train_ds) -> None:
    """k-means of the (initial) encoder's outputs on `quantizer.kmeans_batches` batches per process."""
    n = cfg.quantizer.kmeans_batches * cfg.train.batch_size
    start = accelerator.process_index * n  # each process encodes its own images
    indices = [i % len(train_ds) for i in range(start, start + n)]
    loader = DataLoader(Subset(train_ds, indices), batch_size=cfg.train.batch_size)
    d = vae.config.vq_embed_dim or vae.config.latent_channels
    z = [vae.encode(b["pixel_values"].to(accelerator.device)).latents.float().permute(0, 2, 3, 1).reshape(-1, d)
         for b in tqdm(loader, desc="k-means init: encoding", disable=not accelerator.is_local_main_process)]
    quantizer.kmeans_init(torch.cat(z), vae.quantize.embedding.weight)
    logger.info(f"codebook initialised by k-means on {sum(len(t) for t in z) * accelerator.num_processes} "
                f"encoder outputs", main_process_only=True)


def _compile(ae: torch.nn.Module, disc: torch.nn.Module, perceptual: torch.nn.Module | None) -> None:
    """torch.compile in place (train.compile). The decoder's output convolution stays eager:
    the adaptive GAN weight takes gradients at it alone, and in a compiled graph that would
    run the whole compiled backward."""
    vae = ae.vae
    for module in (vae.encoder, vae.decoder.mid_block, *vae.decoder.up_blocks, disc, perceptual):
        if module is not None:
            module.compile()


def _set_requires_grad(module: torch.nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def train(cfg: Config, output_dir: str | Path, resume: str | None = None, overwrite: bool = False) -> dict:
    """Train the autoencoder described by `cfg` into `output_dir`; returns the run summary.

    `overwrite=True` deletes a run already in `output_dir` (after the config, data and
    weights have been checked, so a mistake there deletes nothing)."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir, resume, overwrite)
    tc = cfg.train
    accelerator = make_accelerator(tc, output_dir)
    perceptual, perceptual_status = build_perceptual(cfg)  # fails before any training work
    checkpoint = find_checkpoint(output_dir, resume) if resume else None
    if checkpoint is not None:
        # these change what the checkpoint's tensors mean (the EMA codebook mode adds buffers)
        check_resume_compatible(cfg, checkpoint, ("model", "data.resolution", "quantizer.l2_normalize",
                                                  "quantizer.ema_decay"))

    train_ds = build_dataset(cfg.data, cfg.data.train_split, train=True, seed=cfg.seed)
    bad_images = getattr(train_ds, "bad", [])  # (file, reason) skipped by imagefolder/hub sources
    try:
        preview_ds = build_dataset(cfg.data, cfg.data.test_split, train=False)
    except UserError:  # a source without a test split: preview training images instead
        preview_ds = build_dataset(cfg.data, cfg.data.train_split, train=False)
    preview = torch.stack([preview_ds[i]["pixel_values"] for i in range(min(8, len(preview_ds)))])

    # Same seed on every process for everything built here (weights, sampler seed) ...
    set_seed(cfg.seed)
    ae = build_training_model(cfg)
    disc = PatchDiscriminator(cfg.model.out_channels, cfg.loss.disc_channels, cfg.loss.disc_layers)
    lecam = LeCamEMA(cfg.loss.lecam_decay)
    opt_ae = make_adamw(ae.parameters(), tc.lr, tc, accelerator.device)
    opt_d = make_adamw(disc.parameters(), tc.disc_lr, tc, accelerator.device)
    # Not passed to prepare(): accelerate would step them once per process; we step them
    # once per optimizer step, so `lr_warmup_steps` means optimizer steps.
    sched_ae = get_scheduler(tc.lr_scheduler, opt_ae, num_warmup_steps=tc.lr_warmup_steps,
                             num_training_steps=tc.max_steps)
    sched_d = get_scheduler("constant_with_warmup", opt_d, num_warmup_steps=tc.lr_warmup_steps)
    # A generator of its own: creating an epoch's iterator draws a seed from it, and that
    # draw must not come from the global RNG (it would shift the noise stream on resume).
    loader = DataLoader(train_ds, batch_size=tc.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
                        generator=torch.Generator())
    if tc.compile:
        _compile(ae, disc, perceptual)
    ae, disc, opt_ae, opt_d, loader = accelerator.prepare(ae, disc, opt_ae, opt_d, loader)
    if len(loader) == 0:
        raise UserError(f"the training split has {len(train_ds)} images, fewer than one batch per process "
                        f"({tc.batch_size} x {accelerator.num_processes}); lower train.batch_size")
    device = accelerator.device
    if perceptual is not None:
        perceptual.to(device)
    lecam.to(device)
    vae = accelerator.unwrap_model(ae).vae
    quantizer = getattr(accelerator.unwrap_model(ae), "quantizer", None)
    ema_params = ema_parameters(vae)  # the same tensors for the whole run (a VQ codebook is not among them)
    ema = EMAModel(ema_params, decay=tc.ema_decay) if tc.ema_decay > 0 else None
    if ema is not None:
        ema.to(device)
    # saved and loaded by checkpoint.py (weights_only), not accelerate's pickled custom objects
    extra_state = {"sched_ae": sched_ae, "sched_d": sched_d, "lecam": lecam, **({"ema": ema} if ema else {})}
    # ... and a different seed per process from here on (posterior noise, augmentation).
    set_seed(cfg.seed, device_specific=True)

    step = 0
    if checkpoint is not None:
        step = load_checkpoint(accelerator, checkpoint, extra_state)  # also every process's RNG
        if ema is not None:
            ema.to(device)
        logger.info(f"resumed from {checkpoint} at step {step}", main_process_only=True)
    if quantizer is not None and not quantizer.initialized:
        _kmeans_init(cfg, accelerator, vae, quantizer, train_ds)

    start_run_dir(accelerator, output_dir, cfg, overwrite)
    if accelerator.is_main_process:
        logger.info(f"data: {train_ds.description}; perceptual: {perceptual_status}")
        if bad_images:
            (output_dir / "bad_images.txt").write_text("".join(f"{path}\t{why}\n" for path, why in bad_images))
            logger.warning(f"{len(bad_images)} files of the training split cannot be used as images and are skipped; "
                           f"see {output_dir / 'bad_images.txt'}")
    accelerator.init_trackers("train_vae")

    loss_fn = AutoencoderLoss(cfg.loss, perceptual)
    raw_disc = accelerator.unwrap_model(disc)
    last_layer = accelerator.unwrap_model(ae).last_layer()
    images_per_step = tc.batch_size * accelerator.num_processes * tc.grad_accum_steps

    def save(at_step: int, logs: dict) -> None:
        save_run_checkpoint(accelerator, output_dir, cfg, at_step, {"images_per_step": images_per_step, "logs": logs,
                                                                    "perceptual": perceptual_status},
                            vae, "autoencoder", ema, ema_params, extra_state)

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")  # a few eval calls: compiling them costs more than it saves
    def write_preview(at_step: int) -> None:
        vae.eval()
        with ema_weights(ema, ema_params), accelerator.autocast():
            x = preview.to(device)
            recon = reconstruct(vae, x).float().clamp(-1, 1)
        vae.train()
        grid = torch.cat([x.float(), recon])
        path = output_dir / "samples" / f"recon_{at_step:07d}.png"
        save_image(grid, path, nrow=len(x))
        tb = accelerator.get_tracker("tensorboard", unwrap=True)
        tb.add_images("reconstruction (top: input, bottom: EMA recon)", (grid + 1) / 2, at_step)
        if quantizer is not None:
            since = (at_step - 1) // tc.image_every * tc.image_every + 1  # hist was reset after the last grid
            save_usage_histogram(quantizer.hist, output_dir / "codebook_usage.png",
                                 f"codebook hits, steps {since}-{at_step}")
            tb.add_histogram("codebook hits per code", quantizer.hist.float().cpu(), at_step)

    guard = NonFiniteGuard(accelerator, tc.max_consecutive_skips)
    metrics, last_logs = MetricLog(accelerator, output_dir, images_per_step), {}
    t_start, start_step = time.perf_counter(), step
    progress = tqdm(total=tc.max_steps, initial=step, desc="train-vae", disable=not accelerator.is_local_main_process)
    epoch, skip = divmod(step * tc.grad_accum_steps, len(loader))
    ae.train()
    disc.train()
    while step < tc.max_steps:
        loader.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            x = batch["pixel_values"]
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            gan, train_d = loss_fn.gan_active(step), loss_fn.disc_active(step)
            with accelerator.accumulate(ae, disc):
                # 1. autoencoder
                with accelerator.autocast():
                    recon, latent = ae(x)
                    _set_requires_grad(raw_disc, False)
                    grad_scale = accelerator.scaler.get_scale() if (gan and accelerator.scaler) else 1.0
                    g_loss, logs = loss_fn.generator(x, recon, latent, step, raw_disc if gan else None,
                                                     last_layer, grad_scale)
                accelerator.backward(g_loss)
                ae_ok = None  # an accumulation micro-step: no optimizer step
                if accelerator.sync_gradients:
                    logs["grad_norm_ae"] = accelerator.clip_grad_norm_(ae.parameters(), tc.max_grad_norm or math.inf)
                    ae_ok = guard.finite(logs["grad_norm_ae"])  # a device flag: no host sync
                guard.optimizer_step(opt_ae, ae_ok)
                opt_ae.zero_grad(set_to_none=True)
                if quantizer is not None:
                    if ae_ok is not None:  # only an optimizer step moves the codebook
                        quantizer.renormalize_(vae.quantize.embedding.weight, ae_ok)
                    logs.update(quantizer.update(latent, vae.quantize.embedding.weight, step))
                # 2. discriminator, on detached reconstructions
                if train_d:
                    _set_requires_grad(raw_disc, True)
                    with accelerator.autocast():
                        logits_real, logits_fake = disc(torch.cat([x, recon.detach()])).chunk(2)
                        d_loss, d_logs = loss_fn.discriminator(logits_real, logits_fake, lecam)
                    accelerator.backward(d_loss)
                    if cfg.loss.lecam_weight > 0:
                        # averaged over processes so every rank keeps the same LeCam state
                        lecam.update(accelerator.reduce(d_logs["logits_real"], "mean"),
                                     accelerator.reduce(d_logs["logits_fake"], "mean"))
                    d_ok = None
                    if accelerator.sync_gradients:
                        d_logs["grad_norm_d"] = accelerator.clip_grad_norm_(disc.parameters(),
                                                                            tc.max_grad_norm or math.inf)
                        d_ok = guard.finite(d_logs["grad_norm_d"])
                    guard.optimizer_step(opt_d, d_ok)
                    opt_d.zero_grad(set_to_none=True)
                    logs.update(d_logs)
            if not accelerator.sync_gradients:
                continue
            # the LR schedule follows the step count, skipped steps included
            sched_ae.step()
            if train_d:
                sched_d.step()
            ok = guard.end_step(step, ae_ok & d_ok if train_d else ae_ok)
            if ema is not None:
                ema_step(ema, ema_params, ok)
            step += 1
            progress.update(1)
            metrics.add(logs, ok)
            if step % tc.log_every == 0 or step == tc.max_steps:
                last_logs = metrics.flush(step, {"lr": sched_ae.get_last_lr()[0], "kl_weight": loss_fn.kl_weight(step),
                                                 "skipped_steps": guard.check(step, output_dir)})
                progress.set_postfix({k: f"{last_logs[k]:.4g}" for k in
                                      ("loss", "l1", "lpips", "kl", "usage", "perplexity", "g_adv", "d_loss")
                                      if k in last_logs})
            if step % tc.image_every == 0 or step == tc.max_steps:
                if accelerator.is_main_process:
                    write_preview(step)
                if quantizer is not None:
                    quantizer.hist.zero_()  # on every rank: the histogram covers one image interval
            if step % tc.checkpoint_every == 0 or step == tc.max_steps:
                guard.check(step, output_dir)  # never checkpoint past a run of non-finite steps
                save(step, last_logs)
            if step >= tc.max_steps:
                break
        epoch, skip = epoch + 1, 0
    progress.close()

    summary = run_summary(accelerator, tc, step, start_step, t_start, guard, last_logs, data=train_ds.description,
                          perceptual=perceptual_status,
                          bad_images={"count": len(bad_images),
                                      "files": [f"{p}: {why}" for p, why in bad_images[:100]]})
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if bad_images:
            listed = "; ".join(f"{p}: {why}" for p, why in bad_images[:10]) + (" ..." if len(bad_images) > 10 else "")
            logger.warning(f"{len(bad_images)} unusable files were skipped (all in {output_dir / 'bad_images.txt'}): "
                           f"{listed}")
        from .export import export_run  # the export reads the checkpoint just written

        export_run(output_dir, output_dir / "export", replace=True)
    accelerator.wait_for_everyone()
    summary["process_index"] = accelerator.process_index
    summary["models"] = {"ae": accelerator.unwrap_model(ae), "disc": raw_disc, "ema": ema, "lecam": lecam}
    accelerator.end_training()  # closes the trackers (and the process group under DDP)
    return summary
