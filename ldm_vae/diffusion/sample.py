"""Sampling (`ldm-vae sample`) from a latent diffusion run or an exported pipeline folder.

A run's pipeline is built from its newest checkpoint: the EMA UNet, the autoencoder that
made the latent cache (checked by fingerprint) and a sampler built from the training noise
schedule; export.py writes the same pipeline as a folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DModel
from diffusers.schedulers import SchedulerMixin
from tqdm.auto import tqdm

from .. import config as config_lib
from ..autoencoder.models import load_autoencoder
from ..errors import UserError
from ..files import save_image
from ..run.checkpoint import find_checkpoint, read_state
from .config import LDMConfig
from .latents import load_cache_autoencoder
from .networks import noise_schedule
from .pipeline import LatentDiffusionPipeline, make_scheduler

MODEL_INDEX = "model_index.json"


def load_run_pipeline(run_dir: str | Path, solver: str | None = None) -> tuple[LatentDiffusionPipeline, dict]:
    """(pipeline, info) of a train-ldm run's newest complete checkpoint (EMA UNet)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    checkpoint = find_checkpoint(run_dir, "latest")
    state = read_state(checkpoint)
    if "cache" not in state:
        raise UserError(f"{run_dir} is not a train-ldm run (an autoencoder run? sample from a latent diffusion run "
                        f"or an exported pipeline folder)")
    cfg: LDMConfig = config_lib.load_saved_config(state["config"], f"{checkpoint}/trainer_state.json", LDMConfig)
    vae = load_cache_autoencoder(state["cache"])
    unet = UNet2DModel.from_pretrained(checkpoint / "unet", use_safetensors=True)
    scheduler = make_scheduler(solver or cfg.sample.solver, noise_schedule(cfg.diffusion).config)
    info = {"checkpoint": str(checkpoint), "step": state["step"], "config": cfg, "cache": state["cache"],
            "logs": state.get("logs") or {}}
    return LatentDiffusionPipeline(unet.eval(), vae.eval(), scheduler), info


def load_pipeline(path: str | Path, solver: str | None = None) -> LatentDiffusionPipeline:
    """The pipeline of a train-ldm run folder or of an exported pipeline folder."""
    path = Path(path)
    if not (path / MODEL_INDEX).is_file():
        return load_run_pipeline(path, solver)[0]
    unet = UNet2DModel.from_pretrained(path / "unet", use_safetensors=True)
    vae = load_autoencoder(path / "vae")
    scheduler_cfg = SchedulerMixin.load_config(path / "scheduler")
    return LatentDiffusionPipeline(unet.eval(), vae.eval(), make_scheduler(solver or "dpm++", scheduler_cfg))


def sample_labels(num_classes: int, class_labels: list[int] | None, num_images: int) -> list[int] | None:
    """The label of each image: the given labels cycled, or every class in turn."""
    if not num_classes:
        if class_labels:
            raise UserError("this model is unconditional: leave out --class-label")
        return None
    bad = [c for c in class_labels or [] if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"--class-label {bad[0]} is not a class of this model (0..{num_classes - 1})")
    pool = class_labels or list(range(num_classes))
    return [pool[i % len(pool)] for i in range(num_images)]


@torch.no_grad()
def generate(pipe: LatentDiffusionPipeline, num_images: int, labels: list[int] | None, steps: int,
             guidance_scale: float, seed: int, batch_size: int, progress: bool = True) -> torch.Tensor:
    """[N, 3, H, W] images in [0, 1]. One generator seeded with `seed` draws every batch's
    noise in turn, so the images depend on (seed, batch_size)."""
    generator = torch.Generator().manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for start in tqdm(range(0, num_images, batch_size), desc="sampling", disable=not progress):
        n = min(batch_size, num_images - start)
        batch_labels = labels[start:start + n] if labels is not None else None
        out.append(pipe(class_labels=batch_labels, batch_size=n, num_inference_steps=steps,
                        guidance_scale=guidance_scale, generator=generator, output_type="pt").images.cpu())
    return torch.cat(out)


def write_samples(images: torch.Tensor, out: Path, nrow: int) -> None:
    """Every image as sample_NNNNN.png, and grid.png."""
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image(image * 2 - 1, out / f"sample_{i:05d}.png")
    save_image(images * 2 - 1, out / "grid.png", nrow=nrow)
