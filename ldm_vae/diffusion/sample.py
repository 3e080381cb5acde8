"""Sampling (`ldm-vae sample`) from a latent diffusion run or an exported pipeline folder.

A run's pipeline is built from its newest checkpoint: the EMA UNet or DiT, the autoencoder that
made the latent cache (checked by fingerprint) and a sampler built from the training noise
schedule; export.py writes the same pipeline as a folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from tqdm.auto import tqdm

from .. import config as config_lib
from ..autoencoder.models import fold_shift, load_autoencoder
from ..errors import UserError
from ..files import save_image
from ..run.checkpoint import find_checkpoint, read_state
from .config import LDMConfig
from .latents import load_cache_autoencoder
from .networks import noise_schedule
from .pipeline import LatentDiffusionPipeline, LatentDiTPipeline, make_scheduler

MODEL_INDEX = "model_index.json"


def class_names(meta: dict) -> list[str] | None:
    """The cache's class names (their indices where the data has none); None: unlabelled."""
    if not meta.get("has_labels"):
        return None
    return meta.get("class_names") or [str(i) for i in range(meta["num_classes"])]


def run_pipeline(net, vae, scheduler, names: list[str] | None = None):
    """The pipeline of a denoiser: LatentDiTPipeline for a DiT (the class names as its id2label;
    the autoencoder's shift folded in, as DiTPipeline decodes `latents / scaling_factor` and
    ignores a shift), else LatentDiffusionPipeline."""
    if isinstance(net, DiTTransformer2DModel):
        return LatentDiTPipeline(net, fold_shift(vae), scheduler, dict(enumerate(names)))
    return LatentDiffusionPipeline(net, vae, scheduler)


def load_run_pipeline(run_dir: str | Path, solver: str | None = None) -> tuple[LatentDiffusionPipeline, dict]:
    """(pipeline, info) of a train-ldm run's newest complete checkpoint (EMA network)."""
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
    if cfg.network == "dit":
        net = DiTTransformer2DModel.from_pretrained(checkpoint / "transformer", use_safetensors=True)
    else:
        net = UNet2DModel.from_pretrained(checkpoint / "unet", use_safetensors=True)
    scheduler = make_scheduler(solver or cfg.sample.solver, noise_schedule(cfg.diffusion).config)
    info = {"checkpoint": str(checkpoint), "step": state["step"], "config": cfg, "cache": state["cache"],
            "logs": state.get("logs") or {}}
    return run_pipeline(net.eval(), vae.eval(), scheduler, class_names(state["cache"])), info


def load_pipeline(path: str | Path, solver: str | None = None) -> LatentDiffusionPipeline:
    """The pipeline of a train-ldm run folder or of an exported pipeline folder."""
    path = Path(path)
    if not (path / MODEL_INDEX).is_file():
        return load_run_pipeline(path, solver)[0]
    index = json.loads((path / MODEL_INDEX).read_text())
    if index["_class_name"] == "DiTPipeline":
        net = DiTTransformer2DModel.from_pretrained(path / "transformer", use_safetensors=True)
    else:
        net = UNet2DModel.from_pretrained(path / "unet", use_safetensors=True)
    vae = load_autoencoder(path / "vae")
    # any scheduler class reads the saved config (a dict); make_scheduler builds the solver from it
    scheduler = make_scheduler(solver or "dpm++", DDPMScheduler.load_config(path / "scheduler"))
    names = index.get("id2label")
    return run_pipeline(net.eval(), vae.eval(), scheduler, [names[k] for k in sorted(names, key=int)] if names else None)


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
