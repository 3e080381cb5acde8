"""The latent diffusion trainer (`ldm-vae train-ldm`): the run skeleton of run/trainer.py with
a diffusers UNet2DModel's (or DiTTransformer2DModel's, `network: dit`) step on cached latents.

Per batch: latents z (scaled once by LatentDataset; a KL cache gives a fresh posterior
sample per epoch), noise, uniform timesteps, DDPM forward process
`add_noise(z, noise, t)`, and an MSE between the network's output and the target (noise for
epsilon prediction, v = a_t * noise - s_t * z for v-prediction). With class conditioning,
each label is replaced by the null class with probability `diffusion.label_dropout`, so
the same network also learns the unconditional model that classifier-free guidance needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import DiTTransformer2DModel, UNet2DModel
from diffusers.optimization import get_scheduler

from ..errors import UserError
from ..files import save_image
from ..run.checkpoint import read_state
from ..run.trainer import RunResult, Trainer, ema_weights, log_images, make_adamw
from .config import LDMConfig
from .latents import LatentDataset, load_cache_autoencoder, read_cache
from .networks import build_network, noise_schedule, null_label
from .pipeline import make_scheduler
from .sample import class_names, run_pipeline

logger = get_logger(__name__)

# what in a cache decides what the network learns: a resumed run must train on the same latents
CACHE_IDENTITY = ("fingerprint", "data", "split", "num_images", "flipped", "latent_shape")


@dataclass
class LDMRun(RunResult):
    unet: UNet2DModel | DiTTransformer2DModel  # the denoiser, unwrapped, raw (not EMA) weights


def train_ldm(cfg: LDMConfig, output_dir: str | Path, resume: str | None = None, overwrite: bool = False) -> LDMRun:
    """Train the latent diffusion network described by `cfg` on the cache `cfg.latents` into
    `output_dir`; see `Trainer` for `resume` and `overwrite`."""
    return LDMTrainer(cfg, output_dir, resume, overwrite).fit()


class LDMTrainer(Trainer):
    name = "train-ldm"
    resume_keys = ("network", "model", "dit", "diffusion")
    postfix_keys = ("loss", "grad_norm")

    def check_inputs(self) -> None:
        cfg = self.cfg
        if not cfg.latents:
            raise UserError("no latent cache given: pass --latents DIR (made by `ldm-vae encode MODEL_DIR --out DIR`)")
        self.meta = read_cache(cfg.latents)
        self.vae = load_cache_autoencoder(self.meta).eval()  # decodes the sample grids; refused if it changed
        self.num_classes = conditioning(cfg, self.meta)
        self.dit = cfg.network == "dit"
        self.checkpoint_model = "transformer" if self.dit else "unet"  # the diffusers pipelines' folder names

    def check_resume(self, checkpoint: Path) -> None:
        saved, meta = read_state(checkpoint)["cache"], self.meta
        if {k: saved.get(k) for k in CACHE_IDENTITY} != {k: meta.get(k) for k in CACHE_IDENTITY}:
            raise UserError(f"cannot resume {checkpoint}: it was trained on the latents of {saved['autoencoder']} "
                            f"({saved['dataset']}), not on those in {self.cfg.latents}; pass the run's own --latents")

    def build(self) -> None:
        cfg, tc, acc = self.cfg, self.tc, self.accelerator
        self.dataset = LatentDataset(cfg.latents, seed=cfg.seed)
        self.noise_scheduler = noise_schedule(cfg.diffusion)
        net = build_network(cfg, self.meta["latent_shape"], self.num_classes)
        self.null_label = null_label(net) if self.num_classes else None
        opt = make_adamw(net.parameters(), tc.lr, tc, acc.device)
        # stepped once per optimizer step (see autoencoder/train.py)
        self.lr_sched = get_scheduler(tc.lr_scheduler, opt, num_warmup_steps=tc.lr_warmup_steps,
                                      num_training_steps=tc.max_steps)
        loader = self.make_loader(self.dataset)
        if tc.compile:
            net.compile()  # in place: the state dict keeps its keys
        self.net, self.opt, self.loader = acc.prepare(net, opt, loader)
        self.model = acc.unwrap_model(self.net)
        self.ema_params = list(self.model.parameters())
        self.extra_state = {"lr_sched": self.lr_sched}
        self.vae.to(acc.device)
        self.net.train()

    def describe_data(self) -> str:
        return f"the latent cache {self.cfg.latents}"

    def log_start(self) -> None:
        meta, n = self.meta, self.num_classes
        n_params = sum(p.numel() for p in self.model.parameters())
        logger.info(f"latents: {len(self.dataset)} x {meta['latent_shape']} of {meta['dataset']} by "
                    f"{meta['autoencoder']}; {type(self.model).__name__} {n_params / 1e6:.2f} M parameters, "
                    f"{f'{n} classes' if n else 'unconditional'}")

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
            labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        with acc.accumulate(self.net):
            with acc.autocast():
                if self.dit:
                    pred = self.net(noisy, timestep=t, class_labels=labels).sample
                else:
                    pred = self.net(noisy, t, class_labels=labels if self.num_classes else None).sample
            loss = F.mse_loss(pred.float(), target.float())  # fp32 loss under autocast
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
        pipe = run_pipeline(self.model, self.vae, make_scheduler(cfg.sample.solver, self.noise_scheduler.config),
                            class_names(self.meta))
        pipe.set_progress_bar_config(disable=True)
        labels = preview_labels(cfg, self.num_classes)
        with ema_weights(self.ema, self.ema_params), acc.autocast():
            images = pipe(class_labels=labels, batch_size=8 * cfg.sample.per_class,
                          num_inference_steps=cfg.sample.steps, guidance_scale=cfg.sample.guidance_scale,
                          generator=torch.Generator().manual_seed(cfg.seed), output_type="pt").images
        self.model.train()
        save_image(images * 2 - 1, self.output_dir / "samples" / f"samples_{step:07d}.png",
                   nrow=cfg.sample.per_class)
        log_images(acc, "EMA samples (one row per class)", images, step)

    def checkpoint_info(self) -> dict:
        return {"cache": self.meta}

    def summary_details(self) -> dict:
        return {"latents": str(self.cfg.latents), "autoencoder": self.meta["autoencoder"],
                "num_classes": self.num_classes}

    def result(self, summary: dict) -> LDMRun:
        return LDMRun(summary, self.accelerator.process_index, self.ema, self.model)


def conditioning(cfg: LDMConfig, meta: dict) -> int | None:
    """The number of classes the network is conditioned on (None: unconditional)."""
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
