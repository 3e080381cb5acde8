"""Export a run as a diffusers folder: EMA weights (safetensors), measured latent scaling, model card.

`AutoencoderKL` / `VQModel` / `AutoencoderDC.from_pretrained(out_dir)` in stock diffusers
loads the result. The scaling factor and, for KL, the shift factor are measured on latents of
thousands of training images spread over the whole split, never one batch and never SD's
constant: for KL, posterior samples, shift = their mean and scale = 1/std; for VQ,
`encode(x).latents` (what `VQModel.decode` quantizes, and what LDM trains its diffusion model
on) and scale = 1/RMS, the uncentred root mean square, because a VQModel has no shift: the
latents are used uncentred, and 1/std would leave them a second moment of 1 + (mean/std)^2.
The same holds for DC (`encode(x).latent`; AutoencoderDC's config has no shift either).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from diffusers import AutoencoderDC, AutoencoderKL, VQModel
from huggingface_hub import ModelCard, ModelCardData
from torch.utils.data import DataLoader, IterableDataset, Subset
from tqdm.auto import tqdm

from .. import config as config_lib
from ..data.config import SOURCE_KEYS, DataConfig
from ..data.sources import build_dataset, first_items, hub_dataset_id
from ..errors import UserError
from ..files import atomic_folder, refuse_nonempty, render_card
from ..run.checkpoint import complete_checkpoints, find_checkpoint, read_state
from .config import Config
from .models import MODEL_CLASSES, code_indices, deterministic_latent
from .quantize import code_stats


def load_run(run_dir: str | Path, step: int | None = None
             ) -> tuple[AutoencoderKL | VQModel | AutoencoderDC, Config, dict, Path]:
    """(autoencoder with EMA weights, config, trainer state, checkpoint) of a run's newest complete
    checkpoint, or of its checkpoint at `step`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    if step is None:
        checkpoint = find_checkpoint(run_dir, "latest")
    else:
        found = dict(complete_checkpoints(run_dir))
        if step not in found:
            kept = ", ".join(map(str, found)) or "none"
            raise UserError(f"{run_dir} has no complete checkpoint at step {step} (complete checkpoints at steps: "
                            f"{kept}; train.checkpoints_total_limit decides how many are kept)")
        checkpoint = find_checkpoint(run_dir, str(found[step]))
    state = read_state(checkpoint)
    cfg = config_lib.load_saved_config(state["config"], f"{checkpoint}/trainer_state.json", Config)
    vae = MODEL_CLASSES[cfg.model.kind].from_pretrained(checkpoint / "autoencoder", use_safetensors=True)
    return vae, cfg, state, checkpoint


@torch.no_grad()
def measure_latent_stats(vae: AutoencoderKL | VQModel | AutoencoderDC, dataset, cfg: Config, device: torch.device,
                         seed: int = 0) -> dict:
    """Mean, std and the scaling of latents over `export.scale_num_images` images of `dataset`
    (1/std for KL, whose mean is subtracted as `shift_factor`; 1/RMS for a VQModel or an
    AutoencoderDC, which have no shift) and, for a VQModel, which share of its codebook those
    images use."""
    if isinstance(dataset, IterableDataset):
        # a stream has no index: its first images, in the split's order (train=False does not shuffle)
        images = first_items(dataset, cfg.export.scale_num_images)
    else:
        n = min(cfg.export.scale_num_images, len(dataset))
        # evenly spaced over the split, so no single class or shard dominates
        indices = torch.linspace(0, len(dataset) - 1, n).round().long().unique().tolist()
        images = Subset(dataset, indices)
    loader = DataLoader(images, batch_size=cfg.export.scale_batch_size)
    generator = torch.Generator(device=device).manual_seed(seed)
    total, total_sq, count = 0.0, 0.0, 0
    is_vq = isinstance(vae, VQModel)
    uncentred = not isinstance(vae, AutoencoderKL)  # no shift_factor in the config
    hits = torch.zeros(vae.config.num_vq_embeddings if is_vq else 0, dtype=torch.long, device=device)
    vae.to(device).eval()
    for batch in tqdm(loader, desc="measuring latent scale", leave=False):
        x = batch["pixel_values"].to(device)
        if uncentred:
            z = deterministic_latent(vae, x)
        else:
            z = vae.encode(x).latent_dist.sample(generator=generator)
        if is_vq:
            hits += torch.bincount(code_indices(vae, z).flatten(), minlength=len(hits))
        z = z.double()
        total += z.sum().item()
        total_sq += z.pow(2).sum().item()
        count += z.numel()
    mean = total / count
    std = max(total_sq / count - mean**2, 0.0) ** 0.5
    if not std > 0:
        raise UserError("the latents have zero variance; the model did not train (check the run's losses)")
    rms = (total_sq / count) ** 0.5
    stats = {"scaling_factor": 1.0 / (rms if uncentred else std), "shift_factor": mean, "std": std, "rms": rms,
             "num_values": count, "num_images": len(images)}
    if is_vq:
        usage = code_stats(hits)
        stats.update(codebook_usage=usage["codebook_usage"], codebook_perplexity=usage["codebook_perplexity"])
    return stats


def _model_card(cfg: Config, state: dict, stats: dict, vae: AutoencoderKL | VQModel | AutoencoderDC, dataset,
                where: str) -> ModelCard:
    """The export's README.md; its usage snippets load from `where` (the folder, or the Hub repo it goes to)."""
    factor = cfg.model.downsampling_factor
    res = cfg.data.resolution
    tokenizer_tags = ["image-tokenizer", "latent-diffusion"]
    kind_tags = {"kl": ["autoencoder-kl", "latent-diffusion"], "vq": ["vq-vae", *tokenizer_tags],
                 "fsq": ["fsq", *tokenizer_tags], "lfq": ["lfq", *tokenizer_tags],
                 "dc": ["dc-ae", "latent-diffusion"]}
    hub_id = hub_dataset_id(cfg.data.source, cfg.data.name)
    metadata = ModelCardData(library_name="diffusers", license=cfg.export.license,
                             tags=["ldm-vae", "autoencoder", *kind_tags[cfg.model.kind]],
                             datasets=[hub_id] if hub_id else None)  # photos, image folders: on no hub
    needs_notice = state["perceptual"].startswith(("SKIPPED", "RANDOM"))
    logs = state.get("logs") or {}
    losses = "\n".join(["| term | value |", "|---|---|"] + [f"| {k} | {v:.5g} |" for k, v in sorted(logs.items())])
    fields = dict(
        dataset=dataset.description,
        perceptual_notice=f"> **Notice:** {state['perceptual']}." if needs_notice else "",
        factor=factor, resolution=res, latent_channels=cfg.model.latent_channels,
        parameters=f"{sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M",
        steps=state["step"], images_per_step=state["images_per_step"],
        weights="EMA (decay %g)" % cfg.train.ema_decay if cfg.train.ema_decay > 0 else "raw (EMA off)",
        perceptual=state["perceptual"],
        scaling_factor=f"{stats['scaling_factor']:.6g}", shift_factor=f"{stats['shift_factor']:.6g}",
        num_values=stats["num_values"], num_images=stats["num_images"],
        path=where,
        losses=losses if logs else "(no step was logged)",
        config=config_lib.to_yaml(cfg).strip(),
    )
    latent_shape = f"{cfg.model.latent_channels}x{res // factor}x{res // factor}"
    if cfg.model.kind == "kl":
        fields.update(
            title=f"KL autoencoder f{factor}, {cfg.model.latent_channels} latent channels ({dataset.dataset_id})",
            latent_shape=latent_shape)
    elif cfg.model.kind == "dc":
        fields.update(
            title=f"DC-AE f{factor}, {cfg.model.latent_channels} latent channels ({dataset.dataset_id})",
            latent_shape=latent_shape, values_per_image=cfg.model.latent_channels * (res // factor) ** 2,
            blocks=_dc_blocks(cfg))
    else:
        q, codes = cfg.quantizer, vae.config.num_vq_embeddings
        dim = vae.config.vq_embed_dim or vae.config.latent_channels
        if cfg.train.ema_decay > 0:
            fields["weights"] += "; the codebook is the live one (not averaged, see ldm_vae/autoencoder/models.py)"
        levels = cfg.model.levels
        lookup = {"vq": "l2-normalised codes: cosine lookup" if q.l2_normalize else "Euclidean lookup",
                  "fsq": f"the fixed FSQ grid of levels {'x'.join(map(str, levels or []))}, evenly spaced in "
                         f"[-1, 1] per dimension: the nearest code is per-dimension rounding",
                  "lfq": f"the fixed LFQ codes {{-1, +1}}^{dim}: the nearest code is the sign of each dimension",
                  }[cfg.model.kind]
        fields.update(
            title=f"{cfg.model.kind.upper()} tokenizer f{factor}, {codes} codes x {dim} dims ({dataset.dataset_id})",
            grid=res // factor, tokens_per_image=(res // factor) ** 2, num_codes=codes, code_dim=dim,
            lookup=lookup,
            usage=(f"{100 * stats['codebook_usage']:.1f}% of the codes are used by the {stats['num_images']} training "
                   f"images measured for `scaling_factor` (code perplexity {stats['codebook_perplexity']:.0f})"))
    templates = {"kl": "autoencoder_kl.md", "dc": "autoencoder_dc.md"}
    return render_card(templates.get(cfg.model.kind, "vq_model.md"), metadata, fields)


def _dc_blocks(cfg: Config) -> str:
    """The DC card's architecture line: widths and the block type of each level."""
    m = cfg.model
    levels = [f"{w} ({block})" for w, block in zip(m.block_out_channels, m.dc_block_types)]
    heads = f", attention head dim {m.attention_head_dim}" if m.dc_vit_levels else ""
    return f"{', '.join(levels)}; {m.layers_per_block} block(s) per level{heads}"


def export_run(run_dir: str | Path, out_dir: str | Path, replace: bool = False, repo_id: str | None = None,
               step: int | None = None) -> Path:
    """Write the diffusers folder for `run_dir`'s newest checkpoint (or its checkpoint at `step`) to
    `out_dir` (atomically); with `repo_id`, the model card's snippets load from that Hub repo (the
    folder is to be pushed there)."""
    out_dir = Path(out_dir)
    if not replace:
        refuse_nonempty(out_dir)
    vae, cfg, state, checkpoint = load_run(run_dir, step)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dataset = build_dataset(cfg.data, cfg.data.train_split, train=False, stream=True)
    stats = measure_latent_stats(vae, dataset, cfg, device)
    if cfg.model.kind == "kl":
        vae.register_to_config(scaling_factor=stats["scaling_factor"], shift_factor=stats["shift_factor"])
    else:  # VQModel's and AutoencoderDC's configs have no shift_factor: 1/RMS scales the uncentred latents
        # (their mean is in the card)
        vae.register_to_config(scaling_factor=stats["scaling_factor"])

    with atomic_folder(out_dir) as tmp:
        vae.to("cpu").save_pretrained(tmp, safe_serialization=True)
        (tmp / "training_config.yaml").write_text(config_lib.to_yaml(cfg))
        info = {"checkpoint": str(checkpoint), "step": state["step"], "perceptual": state["perceptual"],
                "latent_stats": stats, "final_logs": state.get("logs")}
        (tmp / "ldm_vae.json").write_text(json.dumps(info, indent=2))
        _model_card(cfg, state, stats, vae, dataset, repo_id or str(out_dir)).save(tmp / "README.md")
    return out_dir


def training_data(model_dir: str | Path, source: str | None = None, path: str | None = None,
                  name: str | None = None, resolution: int | None = None) -> DataConfig:
    """The data an export was trained on (its training_config.yaml), all images of each split,
    with the given settings replacing the saved ones (what `eval` and `encode` read)."""
    model_dir = Path(model_dir)
    saved = model_dir / "training_config.yaml"
    if source is None and not saved.is_file():
        raise UserError(f"{model_dir} has no training_config.yaml; name the data with --data")
    data = (config_lib.load_saved_config(saved, str(saved), Config).data if saved.is_file() else DataConfig())
    raw, defaults = dataclasses.asdict(data), dataclasses.asdict(DataConfig())
    if source is not None and source != raw["source"]:
        # the saved source's own settings (its location, columns, ...) do not carry over
        raw.update({k: defaults[k] for keys in SOURCE_KEYS.values() for k in keys})
        raw["source"] = source
    raw.update({k: v for k, v in {"path": path, "name": name, "resolution": resolution}.items() if v is not None})
    raw["max_images"] = None
    # eval and encode read the split by index (a run trained on a stream is measured so too)
    raw["streaming"], raw["shuffle_buffer"] = False, defaults["shuffle_buffer"]
    return config_lib.from_dict(raw, "the data options", DataConfig)
