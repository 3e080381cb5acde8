"""`ldm-vae export-pipeline`: a train-ldm run as a diffusers pipeline folder.

The pipeline of the run's newest checkpoint (sample.py) is written with `save_pretrained`.
A DiT run becomes a stock `DiTPipeline` folder (its `id2label` the dataset's class names in
model_index.json): `DiTPipeline.from_pretrained(dir)`, no code of ours. A UNet run has no
stock class-conditional pipeline: pipeline.py is copied next to it and named in
model_index.json, so stock diffusers loads the folder with
`DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`. Both generate the same
images for the same seed as `ldm-vae sample` (tested).

The exported autoencoder has its `shift_factor` folded into its 1x1 convolutions
(`fold_shift`): stock pipelines (StableDiffusionPipeline, DiTPipeline, ...) decode
`latents / scaling_factor` and ignore a shift, so the folder's autoencoder encodes to
`z - shift` and decodes from it, with `shift_factor` 0: the same function, read correctly by
any pipeline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusers import DiTPipeline
from huggingface_hub import ModelCard, ModelCardData

from .. import config as config_lib
from ..autoencoder.models import fold_shift
from ..data.sources import hub_dataset_id
from ..files import atomic_folder, refuse_nonempty, render_card
from . import pipeline as pipeline_module
from .config import LDMConfig
from .pipeline import LatentDiffusionPipeline, LatentDiTPipeline
from .sample import MODEL_INDEX, load_run_pipeline


def export_pipeline(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
                    repo_id: str | None = None) -> Path:
    """Write a run's pipeline as a diffusers folder (atomically); with `repo_id`, the model
    card's snippets load from that Hub repo (the folder is to be pushed there)."""
    out_dir = Path(out_dir)
    if not overwrite:
        refuse_nonempty(out_dir)
    pipe, info = load_run_pipeline(run_dir, solver="dpm++")
    shift = info["cache"]["shift_factor"] or 0.0  # the cache's: a DiT run's pipeline has it folded in already
    pipe.register_modules(vae=fold_shift(pipe.vae))
    with atomic_folder(out_dir) as tmp:
        if isinstance(pipe, LatentDiTPipeline):
            DiTPipeline(pipe.transformer, pipe.vae, pipe.scheduler).save_pretrained(tmp, safe_serialization=True)
            index = json.loads((tmp / MODEL_INDEX).read_text())
            # DiTPipeline.from_pretrained passes it to __init__: `pipe.labels`, `get_label_ids`
            index["id2label"] = {str(k): name for k, name in pipe.id2label.items()}
        else:
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
        _card(pipe, info, out_dir, repo_id, shift).save(tmp / "README.md")
    return out_dir


def _card(pipe: LatentDiffusionPipeline, info: dict, out_dir: Path, repo_id: str | None, shift: float) -> ModelCard:
    """The pipeline's README.md; its snippets load from `repo_id` if given, else from `out_dir`."""
    cfg: LDMConfig = info["config"]
    cache = info["cache"]
    n = pipe.num_classes
    names = cache.get("class_names") or [str(i) for i in range(n)]
    classes = ", ".join(f"{i} = {name}" for i, name in enumerate(names[:n])) if n else "unconditional"
    data = cache["data"]  # the cache's data options: the source and, for the hub source, its name
    hub_id = hub_dataset_id(data["source"], data.get("name"))
    metadata = ModelCardData(library_name="diffusers", license=cfg.export.license,
                             pipeline_tag="unconditional-image-generation",
                             tags=["ldm-vae", "latent-diffusion", "class-conditional" if n else "unconditional"],
                             datasets=[hub_id] if hub_id else None)  # photos, image folders: on no hub
    # `ldm-vae sample` reads a local folder: from the Hub, download one first
    local = str(out_dir) if repo_id is None else repo_id.split("/")[-1]
    sample = f"`ldm-vae sample {local} --num-images 64 --guidance-scale 3 --out samples/`"
    shape = "x".join(str(s) for s in cache["latent_shape"])
    where = repo_id or str(out_dir)
    call = ("class_labels=[%d] * 8, guidance_scale=%g" % (min(3, n - 1), cfg.sample.guidance_scale)) if n \
        else "batch_size=8"
    dit = isinstance(pipe, LatentDiTPipeline)
    net = pipe.transformer if dit else pipe.unet
    fields = dict(
        title=f"Latent diffusion on {cache['dataset_id']} ({'class-conditional' if n else 'unconditional'})",
        dataset=cache["dataset"], path=where, classes=classes,
        sample_command=sample if repo_id is None else f"`hf download {repo_id} --local-dir {local}`, then {sample}",
        use=_dit_use(where, call) if dit else _unet_use(where, call),
        network_class=type(net).__name__, subfolder="transformer" if dit else "unet",
        autoencoder=f"{type(pipe.vae).__name__} from {cache['autoencoder']}", latent_shape=shape,
        scaling=f"{pipe.vae.config.scaling_factor:.6g}",
        shift=f"{shift:.6g}",
        parameters=f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M",
        steps=info["step"], batch=cfg.train.batch_size,
        schedule=f"{cfg.diffusion.beta_schedule}, {cfg.diffusion.num_train_timesteps} steps, "
                 f"{cfg.diffusion.prediction_type} prediction",
        dropout=cfg.diffusion.label_dropout,
        ema="EMA (decay %g)" % cfg.train.ema_decay if cfg.train.ema_decay > 0 else "raw (EMA off)",
        loss=f"{info['logs']['loss']:.4g}" if "loss" in info["logs"] else "n/a",
        config=config_lib.to_yaml(cfg).strip(),
    )
    return render_card("ldm_pipeline.md", metadata, fields)


def _dit_use(where: str, call: str) -> str:
    return f"""A stock diffusers `DiTPipeline`, no code of ours:

```python
import torch
from diffusers import DiTPipeline

pipe = DiTPipeline.from_pretrained("{where}")
print(pipe.labels)                         # class name -> label
images = pipe({call}, num_inference_steps=20,
              generator=torch.Generator().manual_seed(0)).images   # PIL images
```

DiTPipeline guides only where `guidance_scale` > 1 (1 samples the conditional model); larger
values trade diversity for class fidelity. Its scheduler is DPM-Solver++; any diffusers
scheduler `from_config(pipe.scheduler.config)` works with the same noise schedule."""


def _unet_use(where: str, call: str) -> str:
    return f"""The folder holds its pipeline class in `pipeline.py` (it imports only torch and
diffusers; diffusers has no stock class-conditional UNet pipeline); stock diffusers loads it
with `trust_remote_code=True`:

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{where}", trust_remote_code=True)
images = pipe({call}, num_inference_steps=20,
              generator=torch.Generator().manual_seed(0)).images   # PIL images
pipe.use_solver("ddim")                    # DDIM instead of DPM-Solver++ (e.g. 50 steps)
```

`guidance_scale` 1 samples the conditional model without guidance; larger values trade
diversity for class fidelity."""
