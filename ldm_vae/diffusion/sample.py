"""Sampling (`ldm-vae sample`) from a latent diffusion run or an exported pipeline folder.

A run's pipeline is built from its newest checkpoint: the EMA UNet or DiT, the autoencoder that
made the latent cache (checked by fingerprint, its shift folded in) and a sampler built from the
training noise schedule; export.py writes the same pipeline as a folder of its stock class.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from diffusers import (
    DDPMScheduler,
    DiTTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from .. import config as config_lib
from ..autoencoder.models import fold_shift, load_autoencoder
from ..errors import UserError
from ..files import save_image
from ..run.checkpoint import find_checkpoint, read_state
from ..run.processes import (
    Process,
    derived_seed,
    gather_in_order,
    process_state,
    this_process,
)
from .config import LDMConfig
from .latents import load_cache_autoencoder
from .networks import TextConditioned, noise_schedule
from .pipeline import (
    ClassConditionalPipeline,
    TextToImagePipeline,
    UnconditionalPipeline,
    make_scheduler,
)

Pipeline = ClassConditionalPipeline | TextToImagePipeline | UnconditionalPipeline

MODEL_INDEX = "model_index.json"
GRID_IMAGES = 100  # grid.png: the first 100 samples (10 rows of 10 at the default --nrow)
RECORD = "ldm_vae.json"  # what export.py records of the run next to the pipeline; for a text model,
# "class_names" are the classes it has prompts for


def class_names(meta: dict) -> list[str] | None:
    """The cache's class names (their indices where the data has none); None: unlabelled."""
    if not meta.get("has_labels"):
        return None
    return meta.get("class_names") or [str(i) for i in range(meta["num_classes"])]


def run_pipeline(net, vae, scheduler, names: list[str] | None = None, tokenizer=None) -> Pipeline:
    """The pipeline of a denoiser: TextToImagePipeline for a TextConditioned UNet (and its
    `tokenizer`; `names`: the classes whose prompts it trained on), ClassConditionalPipeline
    where `names` (the class names, its id2label) are given, else UnconditionalPipeline. The
    autoencoder's shift is folded in, as all three decode `latents / scaling_factor` and
    ignore a shift."""
    vae = fold_shift(vae)
    if isinstance(net, TextConditioned):
        return text_pipeline(vae, net.text_encoder, tokenizer, net.unet, scheduler, names)
    if names:
        return ClassConditionalPipeline(net, vae, scheduler, dict(enumerate(names)))
    return UnconditionalPipeline(vae, net, scheduler)


def text_pipeline(vae, text_encoder, tokenizer, unet, scheduler, names: list[str] | None) -> TextToImagePipeline:
    pipe = TextToImagePipeline(vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                               feature_extractor=None, requires_safety_checker=False)
    pipe.class_names = names
    return pipe


def load_text_pipeline(folder: Path, vae, scheduler, names: list[str] | None) -> TextToImagePipeline:
    """The text-to-image pipeline of a checkpoint or exported folder: both hold `unet/`,
    `text_encoder/` and `tokenizer/` (StableDiffusionPipeline's names)."""
    return text_pipeline(vae, CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True).eval(),
                         CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                         UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True).eval(),
                         scheduler, names)


def prompt_classes(meta: dict) -> list[str] | None:
    """The classes a text-conditional model on the cache `meta` has prompts for: those of the
    templates it trained on (text.training_captions), none where it trained on captions."""
    return None if meta.get("has_captions") else class_names(meta)


def load_run_pipeline(run_dir: str | Path, solver: str | None = None) -> tuple[Pipeline, dict]:
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
    vae = load_cache_autoencoder(state["cache"]).eval()
    scheduler = make_scheduler(solver or cfg.sample.solver, noise_schedule(cfg.diffusion).config)
    info = {"checkpoint": str(checkpoint), "step": state["step"], "config": cfg, "cache": state["cache"],
            "logs": state.get("logs") or {}}
    conditioning = cfg.diffusion.conditioning
    if conditioning == "text":
        return load_text_pipeline(checkpoint, fold_shift(vae), scheduler, prompt_classes(state["cache"])), info
    if cfg.network == "dit":
        net = DiTTransformer2DModel.from_pretrained(checkpoint / "transformer", use_safetensors=True)
    else:
        net = UNet2DModel.from_pretrained(checkpoint / "unet", use_safetensors=True)
    names = class_names(state["cache"]) if conditioning == "class" else None
    return run_pipeline(net.eval(), vae, scheduler, names), info


# the stock class of an exported folder -> its (denoiser, autoencoder) subfolders
EXPORTED = {"DiTPipeline": ("transformer", "vae"), "LDMPipeline": ("unet", "vqvae"),
            "StableDiffusionPipeline": ("unet", "vae")}
NETWORKS = {cls.__name__: cls for cls in (UNet2DModel, DiTTransformer2DModel)}


def load_pipeline(path: str | Path, solver: str | None = None) -> Pipeline:
    """The pipeline of a train-ldm run folder or of an exported pipeline folder."""
    path = Path(path)
    if not (path / MODEL_INDEX).is_file():
        return load_run_pipeline(path, solver)[0]
    index = json.loads((path / MODEL_INDEX).read_text())
    kind = index.get("_class_name")
    if isinstance(kind, list):  # [module file, class]: a folder with its own pipeline code
        kind = kind[-1]
    if kind not in EXPORTED:
        retired = " (exported by an older ldm-vae with its own pipeline.py: export the run again)" \
            if kind == "LatentDiffusionPipeline" else ""
        raise UserError(f"{path} holds a {kind} folder, not one that `ldm-vae export-pipeline` writes "
                        f"({', '.join(EXPORTED)}){retired}")
    net_dir, vae_dir = EXPORTED[kind]
    vae = load_autoencoder(path / vae_dir).eval()
    # any scheduler class reads the saved config (a dict); make_scheduler builds the solver from it
    scheduler = make_scheduler(solver or "dpm++", DDPMScheduler.load_config(path / "scheduler"))
    if kind == "StableDiffusionPipeline":
        record = json.loads((path / RECORD).read_text()) if (path / RECORD).is_file() else {}
        return load_text_pipeline(path, vae, scheduler, record.get("class_names"))
    # the class model_index.json names: a DiTPipeline's transformer may be a UNet2DModel
    name = index[net_dir][1]
    if name not in NETWORKS:
        raise UserError(f"{path / net_dir} holds a {name}; ldm-vae samples {' and '.join(NETWORKS)}")
    net = NETWORKS[name].from_pretrained(path / net_dir, use_safetensors=True)
    names = index.get("id2label")
    return run_pipeline(net.eval(), vae, scheduler, [names[k] for k in sorted(names, key=int)] if names else None)


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


def sample_conditions(pipe: Pipeline, class_labels: list[int] | None, prompts: list[str] | None,
                      num_images: int) -> list[int] | list[str] | None:
    """Each image's condition: the given prompts cycled (a text-to-image model), else its label
    (sample_labels)."""
    text = isinstance(pipe, TextToImagePipeline)
    if prompts:
        if not text:
            raise UserError("--prompt needs a text-to-image model (diffusion.conditioning=text); this one takes "
                            + ("--class-label" if pipe.num_classes else "neither (it is unconditional)"))
        if class_labels:
            raise UserError("pass --prompt or --class-label, not both")
        return [prompts[i % len(prompts)] for i in range(num_images)]
    if text and not pipe.num_classes:
        raise UserError("this text-to-image model trained on captions: pass --prompt TEXT")
    return sample_labels(pipe.num_classes, class_labels, num_images)


def image_generators(seed: int, indices: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded by (seed, the image's index) (`derived_seed`): what a
    stock diffusers pipeline takes as `generator=` to draw exactly the noise that
    `ldm-vae sample --seed SEED` draws for those images."""
    return [torch.Generator().manual_seed(derived_seed(seed, i)) for i in indices]


@torch.no_grad()
def generate_batches(pipe: Pipeline, num_images: int, labels: list[int] | list[str] | None, steps: int,
                     guidance_scale: float, seed: int, batch_size: int, process: Process = (0, 1),
                     progress: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of the first image, [n, 3, H, W] images in [0, 1]) for batch after batch of
    images 0..num_images-1. The batches are cut at multiples of `batch_size`, and process
    (index, count) takes every count-th of them from its index on. Each image's noise comes
    from its own generator (`image_generators`), so an image is the same whichever process
    draws it: (seed, its index, its batch) decide it. `labels`: each image's class label or
    (text-to-image) prompt."""
    rank, world = process
    pipe.set_progress_bar_config(disable=True)
    starts = range(0, num_images, batch_size)[rank::world]
    for start in tqdm(starts, desc="sampling", disable=not progress or rank != 0):
        n = min(batch_size, num_images - start)
        batch = labels[start:start + n] if labels is not None else None
        condition = {"prompt": batch} if batch and isinstance(batch[0], str) else {"class_labels": batch}
        yield start, pipe(**condition, batch_size=n, num_inference_steps=steps, guidance_scale=guidance_scale,
                          generator=image_generators(seed, range(start, start + n)), output_type="pt").images.cpu()


def generate(pipe: Pipeline, num_images: int, labels: list[int] | list[str] | None, steps: int,
             guidance_scale: float, seed: int, batch_size: int, progress: bool = True) -> torch.Tensor:
    """All [N, 3, H, W] images in [0, 1], drawn in this process (`generate_batches`)."""
    return torch.cat([images for _, images in generate_batches(pipe, num_images, labels, steps, guidance_scale,
                                                               seed, batch_size, progress=progress)])


def write_samples(pipe: Pipeline, num_images: int, labels: list[int] | list[str] | None, steps: int,
                  guidance_scale: float, seed: int, batch_size: int, out: Path, nrow: int) -> None:
    """`ldm-vae sample`: every image as sample_NNNNN.png, and the first GRID_IMAGES in grid.png.
    Under `accelerate launch` each process draws and writes its share of the batches
    (`generate_batches`) and the main process writes the grid: the same files whatever the
    number of processes."""
    process = this_process()
    process_state().wait_for_everyone()  # every process has checked --out before any writes into it
    out.mkdir(parents=True, exist_ok=True)
    firsts = []
    for start, images in generate_batches(pipe, num_images, labels, steps, guidance_scale, seed, batch_size, process):
        for i, image in enumerate(images, start):
            save_image(image * 2 - 1, out / f"sample_{i:05d}.png")
        if start < GRID_IMAGES:
            firsts.append((start, images[:GRID_IMAGES - start]))
    firsts = gather_in_order(firsts, process)
    if process[0] == 0:
        save_image(torch.cat([images for _, images in firsts]) * 2 - 1, out / "grid.png", nrow=nrow)
    process_state().wait_for_everyone()  # every file is written when any process returns
