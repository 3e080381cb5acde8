"""Sampling from a latent diffusion run or pipeline folder, and the pipeline export.

`ldm-vae sample` and `ldm-vae export-pipeline` build the same `LatentDiffusionPipeline`
(pipeline.py) from a run's newest checkpoint: the EMA UNet, the autoencoder that made the
latent cache (checked by fingerprint) and a sampler built from the training noise
schedule. The export writes it with `save_pretrained`, copies pipeline.py next to it and
names it in model_index.json, so stock diffusers loads the folder with
`DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` and generates the same
images for the same seed (tested).
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import torch
import yaml
from diffusers import UNet2DModel
from diffusers.schedulers import SchedulerMixin
from tqdm.auto import tqdm

from . import config as config_lib
from . import pipeline as pipeline_module
from .checkpoint import find_checkpoint, read_state
from .config import LDMConfig
from .data import save_image
from .errors import UserError
from .export import CARD_TEMPLATES, atomic_folder
from .latents import load_cache_autoencoder
from .models import load_autoencoder
from .pipeline import LatentDiffusionPipeline, make_scheduler
from .train_ldm import noise_schedule

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
    cfg: LDMConfig = config_lib.from_dict(state["config"], f"{checkpoint}/trainer_state.json", LDMConfig)
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


def export_pipeline(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a run's pipeline as a diffusers folder (atomically)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; choose another folder or pass --overwrite")
    pipe, info = load_run_pipeline(run_dir, solver="dpm++")
    with atomic_folder(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.copy(pipeline_module.__file__, tmp / "pipeline.py")
        index = json.loads((tmp / MODEL_INDEX).read_text())
        # [module file, class]: diffusers loads the class from the folder's pipeline.py
        index["_class_name"] = ["pipeline", LatentDiffusionPipeline.__name__]
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2))
        cache = info["cache"]
        record = {"checkpoint": info["checkpoint"], "step": info["step"], "latents": str(info["config"].latents),
                  "autoencoder": cache["autoencoder"], "class_names": cache.get("class_names"),
                  "final_logs": info["logs"]}
        (tmp / "ldm_vae.json").write_text(json.dumps(record, indent=2))
        (tmp / "training_config.yaml").write_text(config_lib.to_yaml(info["config"]))
        (tmp / "README.md").write_text(_card(pipe, info, out_dir))
    return out_dir


def _card(pipe: LatentDiffusionPipeline, info: dict, out_dir: Path) -> str:
    cfg: LDMConfig = info["config"]
    cache = info["cache"]
    n = pipe.num_classes
    names = cache.get("class_names") or [str(i) for i in range(n)]
    classes = ", ".join(f"{i} = {name}" for i, name in enumerate(names[:n])) if n else "unconditional"
    metadata = {"library_name": "diffusers", "license": "mit", "pipeline_tag": "unconditional-image-generation",
                "tags": ["ldm-vae", "latent-diffusion", "class-conditional" if n else "unconditional"],
                "datasets": [cache["dataset_id"]]}
    shape = "x".join(str(s) for s in cache["latent_shape"])
    fields = dict(
        metadata=yaml.safe_dump(metadata, sort_keys=False).strip(),
        title=f"Latent diffusion on {cache['dataset_id']} ({'class-conditional' if n else 'unconditional'})",
        dataset=cache["dataset"], path=str(out_dir), classes=classes,
        call=("class_labels=[%d] * 8, guidance_scale=%g" % (min(3, n - 1), cfg.sample.guidance_scale)) if n
        else "batch_size=8",
        autoencoder=f"{type(pipe.vae).__name__} from {cache['autoencoder']}", latent_shape=shape,
        scaling=f"{pipe.vae.config.scaling_factor:.6g}",
        shift=f"{getattr(pipe.vae.config, 'shift_factor', None) or 0:.6g}",
        parameters=f"{sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f} M",
        steps=info["step"], batch=cfg.train.batch_size,
        schedule=f"{cfg.diffusion.beta_schedule}, {cfg.diffusion.num_train_timesteps} steps, "
                 f"{cfg.diffusion.prediction_type} prediction",
        dropout=cfg.diffusion.label_dropout,
        ema="EMA (decay %g)" % cfg.train.ema_decay if cfg.train.ema_decay > 0 else "raw (EMA off)",
        loss=f"{info['logs']['loss']:.4g}" if "loss" in info["logs"] else "n/a",
        config=config_lib.to_yaml(cfg).strip(),
    )
    return string.Template((CARD_TEMPLATES / "ldm_pipeline.md").read_text()).substitute(fields)
