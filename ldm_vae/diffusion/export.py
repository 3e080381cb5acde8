"""`ldm-vae export-pipeline`: a train-ldm run as a diffusers pipeline folder.

The pipeline of the run's newest checkpoint (sample.py) is written with `save_pretrained`;
pipeline.py is copied next to it and named in model_index.json, so stock diffusers loads
the folder with `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` and
generates the same images for the same seed (tested).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import config as config_lib
from ..files import atomic_folder, refuse_nonempty, render_card
from . import pipeline as pipeline_module
from .config import LDMConfig
from .pipeline import LatentDiffusionPipeline
from .sample import MODEL_INDEX, load_run_pipeline


def export_pipeline(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a run's pipeline as a diffusers folder (atomically)."""
    out_dir = Path(out_dir)
    if not overwrite:
        refuse_nonempty(out_dir)
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
    metadata = {"library_name": "diffusers", "license": cfg.export.license,
                "pipeline_tag": "unconditional-image-generation",
                "tags": ["ldm-vae", "latent-diffusion", "class-conditional" if n else "unconditional"],
                "datasets": [cache["dataset_id"]]}
    shape = "x".join(str(s) for s in cache["latent_shape"])
    fields = dict(
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
    return render_card("ldm_pipeline.md", metadata, fields)
