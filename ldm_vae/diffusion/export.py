"""`ldm-vae export-pipeline`: a train-ldm run as a diffusers pipeline folder.

The pipeline of the run's newest checkpoint (sample.py) is written as a folder of its stock
diffusers class (pipeline.py): a class-conditional run (UNet or DiT) as `DiTPipeline` (its
`id2label` the dataset's class names in model_index.json), a text-conditional one as
`StableDiffusionPipeline` (no safety checker), an unconditional one as `LDMPipeline`. Each
loads with `from_pretrained(dir)` alone, no code of ours and no `trust_remote_code`, and
generates the same images as `ldm-vae sample` given the same noise (`sample.image_generators`; tested).

The exported autoencoder has its `shift_factor` folded into its 1x1 convolutions
(`fold_shift`): stock pipelines (StableDiffusionPipeline, DiTPipeline, ...) decode
`latents / scaling_factor` and ignore a shift, so the folder's autoencoder encodes to
`z - shift` and decodes from it, with `shift_factor` 0: the same function, read correctly by
any pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import DiTPipeline, LDMPipeline
from huggingface_hub import ModelCard, ModelCardData

from .. import config as config_lib
from ..data.sources import hub_dataset_id
from ..files import atomic_folder, refuse_nonempty, render_card
from .config import LDMConfig
from .pipeline import (  # StableDiffusionPipeline: imported there without transformers' torchvision warning
    ClassConditionalPipeline,
    StableDiffusionPipeline,
    TextToImagePipeline,
)
from .sample import MODEL_INDEX, RECORD, Pipeline, load_run_pipeline
from .text import CAPTION_TEMPLATES, class_prompt


def export_pipeline(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
                    repo_id: str | None = None) -> Path:
    """Write a run's pipeline as a diffusers folder (atomically); with `repo_id`, the model
    card's snippets load from that Hub repo (the folder is to be pushed there)."""
    out_dir = Path(out_dir)
    if not overwrite:
        refuse_nonempty(out_dir)
    pipe, info = load_run_pipeline(run_dir, solver="dpm++")
    shift = info["cache"]["shift_factor"] or 0.0  # the cache's: the pipeline's autoencoder has it folded in
    with atomic_folder(out_dir) as tmp:
        # saved as the stock class, so model_index.json names it (not our subclass)
        if isinstance(pipe, ClassConditionalPipeline):
            DiTPipeline(pipe.transformer, pipe.vae, pipe.scheduler).save_pretrained(tmp, safe_serialization=True)
            index = json.loads((tmp / MODEL_INDEX).read_text())
            # DiTPipeline.from_pretrained passes it to __init__: `pipe.labels`, `get_label_ids`
            index["id2label"] = {str(k): name for k, name in pipe.id2label.items()}
            (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2))
        elif isinstance(pipe, TextToImagePipeline):
            StableDiffusionPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.scheduler,
                                    safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False).save_pretrained(tmp, safe_serialization=True)
        else:
            LDMPipeline(pipe.vqvae, pipe.unet, pipe.scheduler).save_pretrained(tmp, safe_serialization=True)
        cache = info["cache"]
        text = isinstance(pipe, TextToImagePipeline)
        record = {"checkpoint": info["checkpoint"], "step": info["step"], "latents": str(info["config"].latents),
                  "autoencoder": cache["autoencoder"],
                  # a text model's: the classes it has prompts for (sample.load_pipeline reads them)
                  "class_names": pipe.class_names if text else cache.get("class_names"),
                  "final_logs": info["logs"]}
        (tmp / RECORD).write_text(json.dumps(record, indent=2))
        (tmp / "training_config.yaml").write_text(config_lib.to_yaml(info["config"]))
        _card(pipe, info, out_dir, repo_id, shift).save(tmp / "README.md")
    return out_dir


def _card(pipe: Pipeline, info: dict, out_dir: Path, repo_id: str | None, shift: float) -> ModelCard:
    """The pipeline's README.md; its snippets load from `repo_id` if given, else from `out_dir`."""
    cfg: LDMConfig = info["config"]
    cache = info["cache"]
    n, kind = pipe.num_classes, cfg.diffusion.conditioning
    data = cache["data"]  # the cache's data options: the source and, for the hub source, its name
    hub_id = hub_dataset_id(data["source"], data.get("name"))
    what = {"class": "class-conditional", "text": "text-to-image", "none": "unconditional"}[kind]
    metadata = ModelCardData(library_name="diffusers", license=cfg.export.license,
                             pipeline_tag="text-to-image" if kind == "text" else "unconditional-image-generation",
                             tags=["ldm-vae", "latent-diffusion", what],
                             datasets=[hub_id] if hub_id else None)  # photos, image folders: on no hub
    # `ldm-vae sample` reads a local folder: from the Hub, download one first
    local = str(out_dir) if repo_id is None else repo_id.split("/")[-1]
    sample = f"`ldm-vae sample {local} --num-images 64 --guidance-scale 3 --out samples/`"
    where = repo_id or str(out_dir)
    net, guidance = pipe.denoiser, cfg.sample.guidance_scale
    if kind == "class":
        names = pipe.id2label
        condition = "Classes | " + ", ".join(f"{i} = {name}" for i, name in names.items())
        use = _class_use(where, f"class_labels=[{min(3, n - 1)}] * 8, guidance_scale={guidance:g}",
                         type(net).__name__)
        dropout = f"labels dropped with probability {cfg.diffusion.label_dropout} (classifier-free guidance)"
    elif kind == "text":
        prompt = class_prompt(pipe.class_names[min(3, n - 1)]) if n else "your prompt"
        trained = (f"captions \"{CAPTION_TEMPLATES[0].format('{class}')}\" and {len(CAPTION_TEMPLATES) - 1} other "
                   f"templates over the classes {', '.join(pipe.class_names)}" if n else "the dataset's captions")
        encoder = (f"from {cfg.text.pretrained}" + (", frozen" if cfg.text.freeze else ", trained with the UNet")
                   if cfg.text.pretrained else "trained from scratch with the UNet, its tokenizer's vocabulary "
                                               "built from the training captions")
        condition = (f"Text | CLIPTextModel ({sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e6:.2f} M "
                     f"parameters, {encoder}; {len(pipe.tokenizer)} tokens, at most {pipe.tokenizer.model_max_length}"
                     f" per prompt); trained on {trained}")
        use = _text_use(where, f'["{prompt}"] * 8, guidance_scale={guidance:g}')
        sample = sample.replace("--num-images", "--prompt '" + prompt + "' --num-images") if not n else sample
        dropout = f'captions dropped to "" with probability {cfg.diffusion.label_dropout} (classifier-free guidance)'
    else:
        condition, use, dropout = "Conditioning | none", _unconditional_use(where), "unconditional"
    folders = {"class": ("transformer", "vae"), "text": ("unet", "vae"), "none": ("unet", "vqvae")}[kind]
    fields = dict(
        title=f"Latent diffusion on {cache['dataset_id']} ({what})",
        dataset=cache["dataset"], path=where, condition=condition,
        sample_command=sample if repo_id is None else f"`hf download {repo_id} --local-dir {local}`, then {sample}",
        use=use, network_class=type(net).__name__, subfolder=folders[0], vae_folder=folders[1],
        autoencoder=f"{type(pipe.autoencoder).__name__} from {cache['autoencoder']}",
        latent_shape="x".join(str(s) for s in cache["latent_shape"]),
        scaling=f"{pipe.autoencoder.config.scaling_factor:.6g}",
        shift=f"{shift:.6g}",
        parameters=f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M",
        steps=info["step"], batch=cfg.train.batch_size,
        schedule=f"{cfg.diffusion.beta_schedule}, {cfg.diffusion.num_train_timesteps} steps, "
                 f"{cfg.diffusion.prediction_type} prediction",
        dropout=dropout,
        ema=f"EMA (decay {cfg.train.ema_decay:g})" if cfg.train.ema_decay > 0 else "raw (EMA off)",
        loss=f"{info['logs']['loss']:.4g}" if "loss" in info["logs"] else "n/a",
        config=config_lib.to_yaml(cfg).strip(),
    )
    return render_card("ldm_pipeline.md", metadata, fields)


def _class_use(where: str, call: str, network: str) -> str:
    note = "" if network == "DiTTransformer2DModel" else f"""

The pipeline's `transformer` is a `{network}`: DiTPipeline calls it as
`transformer(latents, timestep=t, class_labels=labels)`, which it takes, so diffusers' note
on loading that it expected a DiTTransformer2DModel is expected."""
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
scheduler `from_config(pipe.scheduler.config)` works with the same noise schedule.{note}"""


def _text_use(where: str, call: str) -> str:
    return f"""A stock diffusers `StableDiffusionPipeline` (no safety checker), no code of ours:

```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{where}")
images = pipe({call}, num_inference_steps=20,
              generator=torch.Generator().manual_seed(0)).images   # PIL images
```

The pipeline guides only where `guidance_scale` > 1, from the empty prompt "" (the caption
the model learned the unconditional distribution from). Its scheduler is DPM-Solver++; any
diffusers scheduler `from_config(pipe.scheduler.config)` works with the same noise schedule."""


def _unconditional_use(where: str) -> str:
    return f"""A stock diffusers `LDMPipeline`, no code of ours:

```python
import torch
from diffusers import LDMPipeline

pipe = LDMPipeline.from_pretrained("{where}")
images = pipe(batch_size=8, num_inference_steps=20,
              generator=torch.Generator().manual_seed(0)).images   # PIL images
```

LDMPipeline names its autoencoder `vqvae` whatever its class (diffusers notes on loading that
it expected a VQModel where it is an AutoencoderKL: the pipeline only calls its `decode`). Its
scheduler is DPM-Solver++; any diffusers scheduler `from_config(pipe.scheduler.config)` works
with the same noise schedule."""
