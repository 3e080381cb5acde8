"""The latent diffusion trainer (`ldm-vae train-ldm`): the run skeleton of run/trainer.py with
a diffusers UNet2DModel's (or DiTTransformer2DModel's, `network: dit`) step on cached latents.

Per batch: latents z (scaled once by LatentDataset; a KL cache gives a fresh posterior
sample per epoch), noise, uniform timesteps, DDPM forward process
`add_noise(z, noise, t)`, and an MSE between the network's output and the target (noise for
epsilon prediction, v = a_t * noise - s_t * z for v-prediction), per image weighted by
Min-SNR-gamma with `diffusion.snr_gamma`. With class conditioning,
each label is replaced by the null class with probability `diffusion.label_dropout`, so
the same network also learns the unconditional model that classifier-free guidance needs.
With text conditioning, each image's caption (its own, or a template over its class drawn
per image) is tokenized once up front; the dropout replaces it with "", and the UNet and its
text encoder learn together (text.freeze: the UNet only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr

from ..errors import UserError
from ..files import save_image
from ..run.checkpoint import read_state
from ..run.trainer import RunResult, Trainer, ema_weights, log_images, make_adamw
from .config import DiffusionConfig, LDMConfig
from .latents import LatentDataset, load_cache_autoencoder, read_cache
from .networks import NULL_LABEL, TextConditioned, build_network, noise_schedule
from .pipeline import make_scheduler
from .sample import class_names, run_pipeline
from .text import class_prompt, text_model, tokenize, training_captions

logger = get_logger(__name__)

# what in a cache decides what the network learns: a resumed run must train on the same latents
CACHE_IDENTITY = ("fingerprint", "data", "split", "num_images", "flipped", "latent_shape")


@dataclass
class LDMRun(RunResult):
    unet: UNet2DModel | DiTTransformer2DModel | TextConditioned  # the denoiser, unwrapped, raw (not EMA) weights


def train_ldm(cfg: LDMConfig, output_dir: str | Path, resume: str | None = None, overwrite: bool = False) -> LDMRun:
    """Train the latent diffusion network described by `cfg` on the cache `cfg.latents` into
    `output_dir`; see `Trainer` for `resume` and `overwrite`."""
    return LDMTrainer(cfg, output_dir, resume, overwrite).fit()


class LDMTrainer(Trainer):
    name = "train-ldm"
    resume_keys = ("network", "model", "dit", "text", "diffusion")
    postfix_keys = ("loss", "grad_norm")

    def check_inputs(self) -> None:
        cfg = self.cfg
        if not cfg.latents:
            raise UserError("no latent cache given: pass --latents DIR (made by `ldm-vae encode MODEL_DIR --out DIR`)")
        self.meta = read_cache(cfg.latents)
        self.vae = load_cache_autoencoder(self.meta).eval()  # decodes the sample grids; refused if it changed
        self.num_classes = conditioning(cfg, self.meta)
        self.dit = cfg.network == "dit"
        self.text = cfg.diffusion.conditioning == "text"
        self.checkpoint_model = "transformer" if self.dit else "unet"  # the diffusers pipelines' folder names
        if self.text:
            if not isinstance(self.vae, AutoencoderKL):
                raise UserError(f"diffusion.conditioning=text exports a StableDiffusionPipeline, which decodes with an "
                                f"AutoencoderKL; the latent cache {cfg.latents} was made by a "
                                f"{type(self.vae).__name__}. Use a KL autoencoder's cache, or conditioning=class")
            self.captions = training_captions(cfg.latents, self.meta)

    def check_resume(self, checkpoint: Path) -> None:
        saved, meta = read_state(checkpoint)["cache"], self.meta
        if {k: saved.get(k) for k in CACHE_IDENTITY} != {k: meta.get(k) for k in CACHE_IDENTITY}:
            raise UserError(f"cannot resume {checkpoint}: it was trained on the latents of {saved['autoencoder']} "
                            f"({saved['dataset']}), not on those in {self.cfg.latents}; pass the run's own --latents")

    def build(self) -> None:
        cfg, tc, acc = self.cfg, self.tc, self.accelerator
        self.dataset = LatentDataset(cfg.latents, seed=cfg.seed)
        self.noise_scheduler = noise_schedule(cfg.diffusion)
        text_encoder = None
        if self.text:
            self.tokenizer, text_encoder = text_model(cfg.text, self.captions.texts)
            text_encoder.requires_grad_(not cfg.text.freeze)
            # every caption's tokens, once: a batch indexes rows (its dropped ones take "")
            self.caption_ids = tokenize(self.tokenizer, self.captions.texts).to(acc.device)
            self.empty_ids = tokenize(self.tokenizer, [""]).to(acc.device)
        net = build_network(cfg, self.meta["latent_shape"], self.num_classes, text_encoder)
        opt = make_adamw([p for p in net.parameters() if p.requires_grad], tc.lr, tc, acc.device)
        # stepped once per optimizer step (see autoencoder/train.py)
        self.lr_sched = get_scheduler(tc.lr_scheduler, opt, num_warmup_steps=tc.lr_warmup_steps,
                                      num_training_steps=tc.max_steps)
        loader = self.make_loader(self.dataset)
        if tc.compile:
            net.compile()  # in place: the state dict keeps its keys
        self.net, self.opt, self.loader = acc.prepare(net, opt, loader)
        self.model = acc.unwrap_model(self.net)
        self.ema_params = [p for p in self.model.parameters() if p.requires_grad]
        self.extra_state = {"lr_sched": self.lr_sched}
        self.vae.to(acc.device)
        self.net.train()

    def describe_data(self) -> str:
        return f"the latent cache {self.cfg.latents}"

    def log_start(self) -> None:
        meta, n = self.meta, self.num_classes
        n_params = sum(p.numel() for p in self.model.parameters())
        if self.text:
            what = (f"{len(self.captions.texts)} captions" if not self.captions.per_class else
                    f"{self.captions.per_class} caption templates x {len(self.captions.class_names)} classes")
            net = (f"UNet2DConditionModel + CLIPTextModel ({len(self.tokenizer)} tokens"
                   f"{', frozen' if self.cfg.text.freeze else ''})")
        else:
            what, net = f"{n} classes" if n else "unconditional", type(self.model).__name__
        logger.info(f"latents: {len(self.dataset)} x {meta['latent_shape']} of {meta['dataset']} by "
                    f"{meta['autoencoder']}; {net} {n_params / 1e6:.2f} M parameters, {what}")

    # --- one optimizer step ----------------------------------------------------------------------

    def train_step(self, batch: dict, step: int):
        acc, tc, dc, sched = self.accelerator, self.tc, self.cfg.diffusion, self.noise_scheduler
        z, labels = batch["latents"], batch["label"]  # z: [B, C, h, w], already scaled
        noise = torch.randn_like(z)
        t = torch.randint(0, dc.num_train_timesteps, (len(z),), device=z.device)
        noisy = sched.add_noise(z, noise, t)
        if tc.channels_last:  # the network's input only: the noise draw keeps its order
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        target = noise if dc.prediction_type == "epsilon" else sched.get_velocity(z, noise, t)
        if self.num_classes:  # the null class for classifier-free guidance
            drop = torch.rand(len(z), device=z.device) < dc.label_dropout
            labels = torch.where(drop, torch.full_like(labels, NULL_LABEL), labels)
        elif self.text:  # the empty caption, likewise
            drop = torch.rand(len(z), device=z.device) < dc.label_dropout
            tokens = torch.where(drop[:, None], self.empty_ids, self.caption_ids[self.caption_index(batch)])
        with acc.accumulate(self.net):
            with acc.autocast():
                if self.dit:
                    pred = self.net(noisy, timestep=t, class_labels=labels).sample
                elif self.text:
                    pred = self.net(noisy, t, tokens)
                else:
                    pred = self.net(noisy, t, class_labels=labels if self.num_classes else None).sample
            loss = diffusion_loss(pred.float(), target.float(), t, sched, dc)  # fp32 under autocast
            acc.backward(loss)
            ok = None  # an accumulation micro-step: no optimizer step
            logs = {"loss": loss.detach()}
            if acc.sync_gradients:
                logs["grad_norm"] = acc.clip_grad_norm_(self.net.parameters(), tc.max_grad_norm or math.inf)
                ok = self.guard.finite(logs["grad_norm"])  # a device flag: no host sync
            self.guard.optimizer_step(self.opt, ok)
            self.opt.zero_grad(set_to_none=True)
        if not acc.sync_gradients:
            return None
        self.lr_sched.step()  # the LR schedule follows the step count, skipped steps included
        return ok, logs

    def caption_index(self, batch: dict) -> torch.Tensor:
        """Each image's row of `caption_ids`: its own caption, or a template over its class
        drawn per image."""
        per_class = self.captions.per_class
        if not per_class:
            return batch["caption"]
        labels = batch["label"]
        return labels * per_class + torch.randint(0, per_class, labels.shape, device=labels.device)

    def log_extras(self, step: int) -> dict:
        return {"lr": self.lr_sched.get_last_lr()[0]}

    # --- pictures, checkpoints, summary ----------------------------------------------------------

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")  # a few eval calls: compiling them costs more than it saves
    def preview(self, step: int) -> None:
        """A grid of EMA samples, one row of `sample.per_class` images per class."""
        acc, cfg = self.accelerator, self.cfg
        if not acc.is_main_process:
            return
        self.model.eval()
        names = self.captions.class_names if self.text else class_names(self.meta) if self.num_classes else None
        pipe = run_pipeline(self.model, self.vae, make_scheduler(cfg.sample.solver, self.noise_scheduler.config),
                            names, getattr(self, "tokenizer", None))
        pipe.set_progress_bar_config(disable=True)
        if self.text:  # the first prompt of each class, or the first 8 captions
            prompts = [class_prompt(c) for c in names] if names else self.captions.texts[:8]
            condition = {"prompt": [p for p in prompts for _ in range(cfg.sample.per_class)]}
        else:
            condition = {"class_labels": preview_labels(cfg, self.num_classes)}
        with ema_weights(self.ema, self.ema_params), acc.autocast():
            images = pipe(**condition, batch_size=8 * cfg.sample.per_class,
                          num_inference_steps=cfg.sample.steps, guidance_scale=cfg.sample.guidance_scale,
                          generator=torch.Generator().manual_seed(cfg.seed), output_type="pt").images
        self.model.train()
        save_image(images * 2 - 1, self.output_dir / "samples" / f"samples_{step:07d}.png",
                   nrow=cfg.sample.per_class)
        log_images(acc, "EMA samples (one row per class)", images, step)

    def save_models(self, folder: Path) -> None:
        if not self.text:
            return super().save_models(folder)
        # a StableDiffusionPipeline's folder names, so a checkpoint holds every part of one
        self.model.unet.save_pretrained(folder / "unet")
        self.model.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")

    def checkpoint_info(self) -> dict:
        return {"cache": self.meta}

    def summary_details(self) -> dict:
        return {"latents": str(self.cfg.latents), "autoencoder": self.meta["autoencoder"],
                "num_classes": self.num_classes}

    def result(self, summary: dict) -> LDMRun:
        return LDMRun(summary, self.accelerator.process_index, self.ema, self.model)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, sched, dc: DiffusionConfig
                   ) -> torch.Tensor:
    """The MSE between prediction and target; with `dc.snr_gamma`, each image's MSE weighted
    by Min-SNR-gamma (DiffusionConfig): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v,
    i.e. the x0-error weight min(SNR, gamma) in both parameterisations."""
    if dc.snr_gamma is None:
        return F.mse_loss(pred, target)
    snr = compute_snr(sched, t)
    weight = snr.clamp(max=dc.snr_gamma) / (snr if dc.prediction_type == "epsilon" else snr + 1)
    return (weight * F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)).mean()


def conditioning(cfg: LDMConfig, meta: dict) -> int | None:
    """The number of classes the network is conditioned on (None: unconditional)."""
    if cfg.diffusion.conditioning != "class":
        return None
    if not meta.get("has_labels"):
        raise UserError(f"diffusion.conditioning is class but the latent cache {cfg.latents} has no labels "
                        f"({meta['dataset']}); set diffusion.conditioning=none (or text, with captions)")
    return meta["num_classes"]


def preview_labels(cfg: LDMConfig, num_classes: int | None) -> torch.Tensor | None:
    """One row of `sample.per_class` images per class."""
    if not num_classes:
        return None
    return torch.arange(num_classes).repeat_interleave(cfg.sample.per_class)
