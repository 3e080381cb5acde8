"""The autoencoder trainer (`ldm-vae train-vae`): the run skeleton of run/trainer.py with
the autoencoder's two-network step.

Per batch, inside ONE `accelerator.accumulate(ae, disc)`:
  1. autoencoder step: recon + LPIPS + KL or VQ terms, none for DC (+ adaptive-weighted GAN term once
     `loss.disc_start` is reached, through a frozen, unwrapped discriminator so no
     discriminator gradient is produced);
  2. discriminator step (from `disc_start - disc_pretrain_steps` on): one forward of
     [real; recon.detach()] through the DDP-wrapped discriminator, so nothing reaches the
     autoencoder's gradients.
Once per optimizer step (not per accumulation micro-step) a VQ model's quantizer updates
its bookkeeping (usage, EMA codebook, restarts) from the step's forwards, identically on
every process (see quantize.py), and the LeCam averages move.
Weights stay fp32 under autocast (never cast trainable weights to half precision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.optimization import get_scheduler
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset
from tqdm.auto import tqdm

from ..data.sources import build_dataset, first_items
from ..errors import UserError
from ..files import save_image, save_usage_histogram
from ..run.trainer import RunResult, Trainer, ema_weights, log_images, make_adamw
from .config import Config
from .discriminator import PatchDiscriminator
from .losses import AutoencoderLoss, LeCamEMA
from .models import build_training_model, ema_parameters, reconstruct
from .perceptual import LPIPSWeightsMissing, build_lpips
from .quantize import code_perplexity

logger = get_logger(__name__)

NOTICE_RULE = "!" * 88


@dataclass
class AutoencoderRun(RunResult):
    autoencoder: nn.Module  # the training wrapper (KLAutoencoder / VQAutoencoder / DCAutoencoder), unwrapped
    discriminator: nn.Module
    lecam: LeCamEMA


def train(cfg: Config, output_dir: str | Path, resume: str | None = None, overwrite: bool = False) -> AutoencoderRun:
    """Train the autoencoder described by `cfg` into `output_dir` (and export it to
    `output_dir/export`); see `Trainer` for `resume` and `overwrite`."""
    return AutoencoderTrainer(cfg, output_dir, resume, overwrite).fit()


class AutoencoderTrainer(Trainer):
    name = "train-vae"
    # these change what a checkpoint's tensors mean (the EMA codebook mode adds buffers)
    resume_keys = ("model", "data.resolution", "quantizer.l2_normalize", "quantizer.ema_decay")
    checkpoint_model = "autoencoder"
    postfix_keys = ("loss", "l1", "lpips", "kl", "equivariance", "usage", "perplexity", "g_adv", "d_loss")

    def check_inputs(self) -> None:
        self.perceptual, self.perceptual_status = build_perceptual(self.cfg)  # fails before any training work

    def build(self) -> None:
        cfg, tc, acc = self.cfg, self.tc, self.accelerator
        # the main process first: it downloads (hub) and scans the images once and caches the
        # result, which the other processes then read instead of decoding every file again
        with acc.main_process_first():
            self.dataset = build_dataset(cfg.data, cfg.data.train_split, train=True, seed=cfg.seed, stream=True)
            try:
                preview_ds = build_dataset(cfg.data, cfg.data.test_split, train=False, stream=True)
            except UserError:  # a source without a test split: preview training images instead
                preview_ds = build_dataset(cfg.data, cfg.data.train_split, train=False, stream=True)
            preview = first_items(preview_ds, 8)
        self.bad_images = getattr(self.dataset, "bad", [])  # (file, reason) skipped by imagefolder/hub scans
        self.preview_images = torch.stack([item["pixel_values"] for item in preview])

        ae = build_training_model(cfg)
        disc = PatchDiscriminator(3, cfg.loss.disc_channels, cfg.loss.disc_layers)
        self.lecam = LeCamEMA(cfg.loss.lecam_decay)
        opt_ae = make_adamw(ae.parameters(), tc.lr, tc, acc.device)
        opt_d = make_adamw(disc.parameters(), tc.disc_lr, tc, acc.device)
        # Not passed to prepare(): accelerate would step them once per process; we step them
        # once per optimizer step, so `lr_warmup_steps` means optimizer steps.
        self.sched_ae = get_scheduler(tc.lr_scheduler, opt_ae, num_warmup_steps=tc.lr_warmup_steps,
                                      num_training_steps=tc.max_steps)
        self.sched_d = get_scheduler("constant_with_warmup", opt_d, num_warmup_steps=tc.lr_warmup_steps)
        loader = self.make_loader(self.dataset, cfg.data.num_workers)
        if tc.compile:
            _compile(ae, disc, self.perceptual)
        # the order of prepare() fixes the file names in checkpoints (model_0, optimizer_1, ...)
        self.ae, self.disc, self.opt_ae, self.opt_d, self.loader = acc.prepare(ae, disc, opt_ae, opt_d, loader)
        if self.perceptual is not None:
            self.perceptual.to(acc.device)
        self.lecam.to(acc.device)
        self.raw_ae, self.raw_disc = acc.unwrap_model(self.ae), acc.unwrap_model(self.disc)
        self.model = self.raw_ae.vae
        self.quantizer = getattr(self.raw_ae, "quantizer", None)
        self.ema_params = ema_parameters(self.model)  # the same tensors all run (a VQ codebook is not among them)
        # saved and loaded by checkpoint.py (weights_only), not accelerate's pickled custom objects
        self.extra_state = {"sched_ae": self.sched_ae, "sched_d": self.sched_d, "lecam": self.lecam}
        self.loss_fn = AutoencoderLoss(cfg.loss, self.perceptual, cfg.diffusability.scale_equivariance)
        self.last_layer = self.raw_ae.last_layer()
        self.lecam_means: list[torch.Tensor] = []  # [real, fake] per micro-step, averaged at the optimizer step
        self.ae.train()
        self.disc.train()

    def describe_data(self) -> str:
        return f"the training split ({self.dataset.description})"

    def after_load(self) -> None:
        if self.quantizer is not None and not self.quantizer.initialized:
            _kmeans_init(self.cfg, self.accelerator, self.model, self.quantizer, self.dataset)

    def log_start(self) -> None:
        logger.info(f"data: {self.dataset.description}; perceptual: {self.perceptual_status}")
        if self.bad_images:
            (self.output_dir / "bad_images.txt").write_text("".join(f"{p}\t{why}\n" for p, why in self.bad_images))
            logger.warning(f"{len(self.bad_images)} files of the training split cannot be used as images and are "
                           f"skipped; see {self.output_dir / 'bad_images.txt'}")

    # --- one optimizer step ----------------------------------------------------------------------

    def train_step(self, batch: dict, step: int):
        acc, tc, loss_fn, guard = self.accelerator, self.tc, self.loss_fn, self.guard
        x = batch["pixel_values"]
        if tc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        gan, train_d = loss_fn.gan_active(step), loss_fn.disc_active(step)
        with acc.accumulate(self.ae, self.disc):
            # 1. autoencoder
            with acc.autocast():
                recon, latent = self.ae(x)
                _set_requires_grad(self.raw_disc, False)
                grad_scale = acc.scaler.get_scale() if (gan and acc.scaler) else 1.0
                g_loss, logs = loss_fn.generator(x, recon, latent, step, self.raw_disc if gan else None,
                                                 self.last_layer, grad_scale)
            acc.backward(g_loss)
            ae_ok = None  # an accumulation micro-step: no optimizer step
            if acc.sync_gradients:
                logs["grad_norm_ae"] = acc.clip_grad_norm_(self.ae.parameters(), tc.max_grad_norm or math.inf)
                ae_ok = guard.finite(logs["grad_norm_ae"])  # a device flag: no host sync
            guard.optimizer_step(self.opt_ae, ae_ok)
            self.opt_ae.zero_grad(set_to_none=True)
            if self.quantizer is not None:
                self.quantizer.observe(latent)
            # 2. discriminator, on detached reconstructions
            d_ok = None
            if train_d:
                _set_requires_grad(self.raw_disc, True)
                with acc.autocast():
                    logits_real, logits_fake = self.disc(torch.cat([x, recon.detach()])).chunk(2)
                    d_loss, d_logs = loss_fn.discriminator(logits_real, logits_fake, self.lecam)
                acc.backward(d_loss)
                if self.cfg.loss.lecam_weight > 0:
                    self.lecam_means.append(torch.stack([d_logs["logits_real"], d_logs["logits_fake"]]))
                if acc.sync_gradients:
                    d_logs["grad_norm_d"] = acc.clip_grad_norm_(self.disc.parameters(), tc.max_grad_norm or math.inf)
                    d_ok = guard.finite(d_logs["grad_norm_d"])
                guard.optimizer_step(self.opt_d, d_ok)
                self.opt_d.zero_grad(set_to_none=True)
                logs.update(d_logs)
        if not acc.sync_gradients:
            return None

        # once per optimizer step: the codebook's bookkeeping and the LeCam averages
        if self.quantizer is not None:
            codebook = self.model.quantize.embedding.weight
            stepped = ae_ok
            if acc.scaler is not None:  # under fp16 the GradScaler decides (Accelerate reads it on the host)
                stepped = ae_ok & (not self.opt_ae.step_was_skipped)
            self.quantizer.renormalize_(codebook, stepped)  # only an optimizer step moves the codebook
            # a skipped step leaves the quantizer's state as it leaves the weights
            q_logs, restarted = self.quantizer.update(codebook, step, stepped)
            # a re-seeded code starts afresh: its old AdamW moments would push it away from the
            # encoder output it was just set to
            reset_adam_rows(self.opt_ae, codebook, restarted)
            logs.update(q_logs)
        if self.lecam_means:
            # averaged over micro-steps and processes, so every rank keeps the same LeCam state
            real, fake = acc.reduce(torch.stack(self.lecam_means).mean(0), "mean")
            self.lecam.update(real, fake)
            self.lecam_means.clear()
        # the LR schedule follows the step count, skipped steps included
        self.sched_ae.step()
        if train_d:
            self.sched_d.step()
        return (ae_ok & d_ok if train_d else ae_ok), logs

    def log_extras(self, step: int) -> dict:
        extras = {"lr": self.sched_ae.get_last_lr()[0]}
        if self.cfg.model.kind == "kl":  # other kinds have no KL term to weigh
            extras["kl_weight"] = self.loss_fn.kl_weight(step)
        return extras

    # --- pictures, checkpoints, summary ----------------------------------------------------------

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")  # a few eval calls: compiling them costs more than it saves
    def preview(self, step: int) -> None:
        """Reconstructions of the preview images by the EMA weights (and the codebook's usage)."""
        acc, vae, out, q = self.accelerator, self.model, self.output_dir, self.quantizer
        if acc.is_main_process:
            vae.eval()
            with ema_weights(self.ema, self.ema_params), acc.autocast():
                x = self.preview_images.to(acc.device)
                recon = reconstruct(vae, x).float().clamp(-1, 1)
            vae.train()
            grid = torch.cat([x.float(), recon])
            save_image(grid, out / "samples" / f"recon_{step:07d}.png", nrow=len(x))
            log_images(acc, "reconstruction (top: input, bottom: EMA recon)", (grid + 1) / 2, step)
            if q is not None:
                since = (step - 1) // self.tc.image_every * self.tc.image_every + 1  # hist was reset at the last grid
                save_usage_histogram(q.hist, code_perplexity(q.hist).item(), out / "codebook_usage.png",
                                     f"codebook hits, steps {since}-{step}")
                for tracker in acc.trackers:
                    if tracker.name == "tensorboard":
                        tracker.writer.add_histogram("codebook hits per code", q.hist.float().cpu(), step)
        if q is not None:
            q.hist.zero_()  # on every rank: the histogram covers one image interval

    def checkpoint_info(self) -> dict:
        return {"perceptual": self.perceptual_status}

    def summary_details(self) -> dict:
        bad = self.bad_images  # a scan's list; a stream's files are logged as read and only counted here
        return {"data": self.dataset.description, "perceptual": self.perceptual_status,
                "bad_images": {"count": len(bad) + self.rows_skipped, "files": [f"{p}: {why}" for p, why in bad[:100]]}}

    def finish(self, summary: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        bad = self.bad_images
        if bad:
            listed = "; ".join(f"{p}: {why}" for p, why in bad[:10]) + (" ..." if len(bad) > 10 else "")
            logger.warning(f"{len(bad)} unusable files were skipped (all in {self.output_dir / 'bad_images.txt'}): "
                           f"{listed}")
        from .export import export_run  # the export reads the checkpoint just written

        export_run(self.output_dir, self.output_dir / "export", replace=True)

    def result(self, summary: dict) -> AutoencoderRun:
        return AutoencoderRun(summary, self.accelerator.process_index, self.ema, self.raw_ae, self.raw_disc,
                              self.lecam)


# ==============================================================================================
# Helpers
# ==============================================================================================


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
    if isinstance(train_ds, IterableDataset):  # a stream (data.streaming): its first items, as they come
        items = first_items(train_ds, start + n)[-n:]  # overlapping other processes' on a short stream
    else:
        items = Subset(train_ds, [i % len(train_ds) for i in range(start, start + n)])
    loader = DataLoader(items, batch_size=cfg.train.batch_size)
    d = vae.config.vq_embed_dim or vae.config.latent_channels
    z = [vae.encode(b["pixel_values"].to(accelerator.device)).latents.float().permute(0, 2, 3, 1).reshape(-1, d)
         for b in tqdm(loader, desc="k-means init: encoding", disable=not accelerator.is_local_main_process)]
    quantizer.kmeans_init(torch.cat(z), vae.quantize.embedding.weight)
    logger.info(f"codebook initialised by k-means on {sum(len(t) for t in z) * accelerator.num_processes} "
                f"encoder outputs", main_process_only=True)


@torch.no_grad()
def reset_adam_rows(optimizer, param: torch.Tensor, rows: torch.Tensor) -> None:
    """Zero the AdamW moments of `rows` of `param` (the same rows on every process)."""
    state = getattr(optimizer, "optimizer", optimizer).state.get(param)  # accelerate wraps the torch optimizer
    if not state or rows.numel() == 0:  # no step taken yet, or an EMA codebook (no optimizer state)
        return
    for key in ("exp_avg", "exp_avg_sq"):
        state[key][rows] = 0


def _compile(ae: nn.Module, disc: nn.Module, perceptual: nn.Module | None) -> None:
    """torch.compile in place (train.compile). The decoder's output convolution stays eager:
    the adaptive GAN weight takes gradients at it alone, and in a compiled graph that would
    run the whole compiled backward. (AutoencoderDC's decoder has no mid block: its levels
    are all in up_blocks.)"""
    vae = ae.vae
    mid = getattr(vae.decoder, "mid_block", None)
    for module in (vae.encoder, mid, *vae.decoder.up_blocks, disc, perceptual):
        if module is not None:
            module.compile()


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)
