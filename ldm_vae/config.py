"""Typed configuration: dataclasses, strict YAML loading and dotted KEY=VALUE overrides.

Strictness is the point (nanoGPT's configurator refuses unknown keys; LlamaGen's
`vq_train.py` shows what happens without it: flags that nothing reads). An unknown key,
a wrong type or an out-of-range value raises `UserError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError


@dataclass
class DataConfig:
    # fashion-mnist | imagefolder | hub | photos (see ldm_vae/data.py)
    source: str = "fashion-mnist"
    # fashion-mnist: folder with the idx .gz files; imagefolder: the image folder root
    path: Optional[str] = None
    # hub: the dataset name on the Hugging Face hub (needs internet)
    name: Optional[str] = None
    image_column: str = "image"
    label_column: Optional[str] = "label"
    train_split: str = "train"
    test_split: str = "test"
    resolution: int = 32
    # true: resize the short side and center-crop; false: resize and random-crop
    center_crop: bool = True
    random_flip: bool = True
    # use only the first N images of each split (tiny smoke runs); null: all
    max_images: Optional[int] = None
    # imagefolder/hub: files that cannot be decoded are skipped and listed; above this share
    # of the split, stop before training
    max_bad_fraction: float = 0.05
    # photos: how many random crops make one epoch
    photos_per_epoch: int = 2048
    num_workers: int = 0
    # imagefolder/hub: keep each file's decoded, resized image in memory, filled when the
    # dataset is built (every file is decoded then anyway, to find bad ones), up to this many
    # MB per process; later accesses only crop and flip. 0: decode on every access
    decoded_cache_mb: int = 2048


@dataclass
class ModelConfig:
    # kl: diffusers AutoencoderKL; vq: diffusers VQModel (trained with ldm_vae/quantize.py)
    kind: str = "kl"
    in_channels: int = 3
    out_channels: int = 3
    # one entry per resolution level; the downsampling factor is 2 ** (len - 1)
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    # vq only: codebook size, and the code dimension of the lookup (VQModel's 1x1
    # quant_conv / post_quant_conv project latent_channels <-> vq_embed_dim; null: no
    # projection width change, vq_embed_dim = latent_channels)
    num_vq_embeddings: Optional[int] = None
    vq_embed_dim: Optional[int] = None


@dataclass
class QuantizerConfig:
    """The training-time vector quantizer of `model.kind: vq` (ldm_vae/quantize.py)."""

    # commitment weight beta on ||z - sg(e)||^2 (van den Oord et al. 2017, arXiv:1711.00937,
    # eq. 3); the codebook term ||sg(z) - e||^2 has weight codebook_weight
    beta: float = 0.25
    codebook_weight: float = 1.0
    # cosine lookup: codes and encoder outputs l2-normalised (ViT-VQGAN, arXiv:2110.04627;
    # LlamaGen, arXiv:2406.06525). The codebook is stored normalised, so stock VQModel's
    # Euclidean lookup picks the same codes.
    l2_normalize: bool = True
    # k-means initialisation of the codebook from encoder outputs of the first batches
    kmeans_init: bool = True
    kmeans_batches: int = 16
    kmeans_iters: int = 10
    # dead-code restart: a code not picked for this many steps is re-seeded from current
    # encoder outputs (as in Jukebox, arXiv:2005.00341); 0 disables
    restart_after_steps: int = 100
    # > 0: codebook by EMA of its assigned encoder outputs (arXiv:1711.00937, app. A.1)
    # instead of by gradients of the codebook term; 0: gradients
    ema_decay: float = 0.0
    # entropy penalty (MaskGIT/MAGVIT-v2, arXiv:2310.05737): mean per-token entropy minus
    # the entropy of the batch-averaged soft assignment; needs a [tokens x codes] matrix
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    # the logged `usage` is the share of codes picked at least once in the last N steps
    usage_window: int = 100


@dataclass
class LossConfig:
    # Reconstruction: means over pixels. 1.0 * L1 (+ rec_l2 * L2).
    rec_l1: float = 1.0
    rec_l2: float = 0.0
    # LPIPS (Zhang et al. 2018, arXiv:1801.03924); 0 turns the perceptual term off.
    perceptual_weight: float = 1.0
    lpips_net: str = "vgg"
    # torchvision-format backbone weights (e.g. vgg16-397923af.pth); null: torch hub cache
    lpips_weights: Optional[str] = None
    # what to do when the backbone weights are missing and cannot be downloaded:
    # error (stop before training) | skip (train without the perceptual term, loudly)
    lpips_if_missing: str = "error"
    # ONLY for tests: a random, untrained backbone. Meaningless as a perceptual metric.
    lpips_random_backbone: bool = False
    # KL: closed-form sum over latent dims per image, divided by the number of pixel
    # values (3*H*W) so that 1e-6 means what it means in LDM (per-image sums there).
    kl_weight: float = 1.0e-6
    # linear warm-up of the KL weight from 0 over this many steps (0: none)
    kl_warmup_steps: int = 0
    # free bits (Kingma et al. 2016, arXiv:1606.04934): per-channel KL floor in nats per
    # latent position; 0 disables
    free_bits: float = 0.0
    # log-variance clamp of the posterior (diffusers clamps to [-30, 20] as well)
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    # PatchGAN (Isola et al. 2017, arXiv:1611.07004), as in taming/LDM
    disc_weight: float = 0.5
    # the step from which the GAN term is in the autoencoder's loss (LDM's meaning)
    disc_start: int = 5000
    # the discriminator trains alone for this many steps before disc_start, so the GAN term
    # starts from an informative discriminator rather than a random one. Not enough alone at
    # a high LR: the autoencoder can still overpower it (see configs/kl_f4_fashion.yaml)
    disc_pretrain_steps: int = 0
    # hinge | vanilla
    disc_loss: str = "hinge"
    disc_layers: int = 3
    disc_channels: int = 64
    # adaptive weight (Esser et al. 2021, arXiv:2012.09841, eq. 7), clamped to [0, max]
    adaptive_weight: bool = True
    adaptive_weight_max: float = 1.0e4
    # LeCam regularisation (Tseng et al. 2021, arXiv:2104.03310); 0 disables
    lecam_weight: float = 0.0
    lecam_decay: float = 0.999


@dataclass
class OptimConfig:
    """The optimisation and bookkeeping settings both trainers share (`train:`)."""

    batch_size: int = 32
    max_steps: int = 2000
    grad_accum_steps: int = 1
    lr: float = 1.0e-4
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    weight_decay: float = 0.0
    lr_warmup_steps: int = 100
    # the trained model's LR schedule (diffusers.optimization.get_scheduler) over max_steps:
    # constant_with_warmup | cosine | linear
    lr_scheduler: str = "constant_with_warmup"
    max_grad_norm: float = 1.0
    # no | bf16 | fp16; weights stay fp32 (autocast), see train_vae.py
    mixed_precision: str = "no"
    # EMA of the weights; 0 turns EMA off (export then uses raw weights)
    ema_decay: float = 0.999
    # a step with non-finite gradients is skipped; this many in a row stop the run
    max_consecutive_skips: int = 25
    # the networks' inputs (pixel batches; the LDM's noisy latents) in channels_last memory
    # format, which the activations then keep: what GPU tensor-core convolutions prefer.
    # Weights stay contiguous (safetensors saves only contiguous tensors), and random draws
    # keep their order. No measurable gain on CPU (BENCHMARKS.md).
    channels_last: bool = False
    # torch.compile the networks in place (Module.compile: checkpoints and exports are
    # unchanged); the first steps are slow while it compiles. No gain on CPU (BENCHMARKS.md).
    compile: bool = False
    log_every: int = 10
    # a picture (reconstructions / samples) every N steps
    image_every: int = 500
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 2


@dataclass
class TrainConfig(OptimConfig):
    # the discriminator's LR; its schedule is constant_with_warmup
    disc_lr: float = 1.0e-4


@dataclass
class ExportConfig:
    # images of the train split encoded to measure scaling/shift factors
    scale_num_images: int = 4096
    scale_batch_size: int = 128
    license: str = "mit"


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


@dataclass
class UNetConfig:
    """diffusers UNet2DModel on the latents (channels and size come from the cache)."""

    # one entry per resolution level of the latent (8x8 latents: 8, 4, 2 with three levels)
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    layers_per_block: int = 2
    # levels (0 = full latent resolution) whose blocks have self-attention
    attention_levels: list[int] = field(default_factory=lambda: [1, 2])
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    dropout: float = 0.0


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    # linear (DDPM, Ho et al. 2020) | scaled_linear (LDM/SD) | cosine (Nichol & Dhariwal
    # 2021, arXiv:2102.09672; diffusers' squaredcos_cap_v2)
    beta_schedule: str = "linear"
    beta_start: float = 1.0e-4
    beta_end: float = 0.02
    # epsilon | v_prediction (Salimans & Ho 2022, arXiv:2202.00512)
    prediction_type: str = "epsilon"
    # condition on the cache's labels; the extra "null" class (index num_classes) replaces
    # a label with probability label_dropout, for classifier-free guidance (Ho & Salimans
    # 2022, arXiv:2207.12598)
    class_conditional: bool = True
    label_dropout: float = 0.1


@dataclass
class SampleConfig:
    """How the training-time sample grids are drawn (`solver` is also `ldm-vae sample`'s default
    for the run)."""

    # dpm++ (DPM-Solver++(2M), Lu et al. 2022, arXiv:2211.01095) | ddim (Song et al. 2020)
    solver: str = "dpm++"
    steps: int = 20
    guidance_scale: float = 3.0
    # the grid has one row per class (or one row, unconditional) of this many images
    per_class: int = 8


@dataclass
class LDMTrainConfig(OptimConfig):
    batch_size: int = 128
    max_steps: int = 3000
    lr: float = 2.0e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    ema_decay: float = 0.999


@dataclass
class LDMConfig:
    """`ldm-vae train-ldm`: a diffusers UNet2DModel trained on a latent cache."""

    seed: int = 0
    # the latent cache (`ldm-vae encode`); `--latents` sets it
    latents: Optional[str] = None
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: LDMTrainConfig = field(default_factory=LDMTrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


# Choices and ranges are checked at load time, so a typo fails here, not hours into a run.
# The `train:` section's rules are shared by both trainers.
_OPTIM_CHOICES = {
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.lr_scheduler": ("constant_with_warmup", "cosine", "linear"),
}
_OPTIM_POSITIVE = ("train.batch_size", "train.max_steps", "train.grad_accum_steps", "train.max_consecutive_skips",
                   "train.lr", "train.log_every", "train.image_every", "train.checkpoint_every",
                   "train.checkpoints_total_limit")
_OPTIM_NON_NEGATIVE = ("train.weight_decay", "train.lr_warmup_steps", "train.max_grad_norm")
_OPTIM_UNIT_INTERVAL = ("train.ema_decay", "train.adam_beta1", "train.adam_beta2")

CHOICES = {
    "data.source": ("fashion-mnist", "imagefolder", "hub", "photos"),
    "model.kind": ("kl", "vq"),
    "loss.lpips_net": ("vgg", "alex"),
    "loss.lpips_if_missing": ("error", "skip"),
    "loss.disc_loss": ("hinge", "vanilla"),
    **_OPTIM_CHOICES,
}
POSITIVE = ("data.resolution", "data.photos_per_epoch", "model.latent_channels", "model.layers_per_block",
            "model.norm_num_groups", "model.num_vq_embeddings", "model.vq_embed_dim", "loss.disc_layers",
            "loss.disc_channels", "train.disc_lr", "quantizer.kmeans_batches",
            "quantizer.kmeans_iters", "quantizer.entropy_temperature", "quantizer.usage_window",
            "export.scale_num_images", "export.scale_batch_size", *_OPTIM_POSITIVE)
NON_NEGATIVE = ("data.num_workers", "data.decoded_cache_mb", "loss.rec_l1", "loss.rec_l2", "loss.perceptual_weight",
                "loss.kl_weight", "loss.kl_warmup_steps", "loss.free_bits", "loss.disc_weight", "loss.disc_start",
                "loss.disc_pretrain_steps", "loss.lecam_weight", "quantizer.beta", "quantizer.codebook_weight",
                "quantizer.restart_after_steps", "quantizer.entropy_weight", *_OPTIM_NON_NEGATIVE)
UNIT_INTERVAL = ("data.max_bad_fraction", "loss.lecam_decay", "quantizer.ema_decay", *_OPTIM_UNIT_INTERVAL)

# diffusers' name of each beta schedule
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
LDM_CHOICES = {
    "diffusion.beta_schedule": tuple(BETA_SCHEDULES),
    "diffusion.prediction_type": ("epsilon", "v_prediction"),
    "sample.solver": ("dpm++", "ddim"),
    **_OPTIM_CHOICES,
}
LDM_POSITIVE = ("model.layers_per_block", "model.attention_head_dim", "model.norm_num_groups",
                "diffusion.num_train_timesteps", "diffusion.beta_start", "diffusion.beta_end", "sample.steps",
                "sample.per_class", *_OPTIM_POSITIVE)
LDM_NON_NEGATIVE = ("model.dropout", "sample.guidance_scale", *_OPTIM_NON_NEGATIVE)
LDM_UNIT_INTERVAL = ("diffusion.label_dropout", *_OPTIM_UNIT_INTERVAL)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return `value` as type `tp` or raise a UserError naming `key` and `source`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, source)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads `1e-4` (no dot) as a string; accept what float() reads
        try:
            return float(value)
        except ValueError:
            pass
    # bool is a subclass of int: `batch_size: true` must not pass as 1
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise UserError(f"{source}: '{key}' must be {tp.__name__}, got {value!r} ({type(value).__name__})")


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: '{prefix or 'the top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise UserError(f"{source}: unknown key '{where}{unknown[0]}' (known keys: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key, source)
        else:
            kwargs[name] = _coerce(value, tp, key, source)
    return cls(**kwargs)


def _check_ranges(cfg: Any, source: str, choices: dict, positive: tuple, non_negative: tuple,
                  unit_interval: tuple) -> None:
    for key, allowed in choices.items():
        value = get_key(cfg, key)
        if value not in allowed:
            raise UserError(f"{source}: '{key}' must be one of {', '.join(allowed)}, got {value!r}")
    for keys, ok, what in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                           (unit_interval, lambda v: 0 <= v < 1, "in [0, 1)")):
        for key in keys:
            value = get_key(cfg, key)
            if value is not None and not ok(value):
                raise UserError(f"{source}: '{key}' must be {what}, got {value!r}")


def _validate(cfg: Config | LDMConfig, source: str) -> None:
    if isinstance(cfg, LDMConfig):
        _validate_ldm(cfg, source)
        return
    _check_ranges(cfg, source, CHOICES, POSITIVE, NON_NEGATIVE, UNIT_INTERVAL)
    factor = 2 ** (len(cfg.model.block_out_channels) - 1)
    if cfg.data.resolution % factor:
        raise UserError(f"{source}: 'data.resolution' ({cfg.data.resolution}) must be divisible by the "
                        f"downsampling factor {factor} (2 ** (len(model.block_out_channels) - 1))")
    for c in cfg.model.block_out_channels:
        if c % cfg.model.norm_num_groups:
            raise UserError(f"{source}: every 'model.block_out_channels' entry must be divisible by "
                            f"'model.norm_num_groups' ({cfg.model.norm_num_groups}), got {c}")
    if cfg.data.source in ("imagefolder",) and not cfg.data.path:
        raise UserError(f"{source}: data.source 'imagefolder' needs 'data.path' (the image folder)")
    if cfg.data.source == "hub" and not cfg.data.name:
        raise UserError(f"{source}: data.source 'hub' needs 'data.name' (a dataset name on the hub)")
    if cfg.loss.logvar_min >= cfg.loss.logvar_max:
        raise UserError(f"{source}: 'loss.logvar_min' must be below 'loss.logvar_max'")
    _validate_kind(cfg, source)


# Settings that mean something for one model kind only: setting them for the other kind is
# an error rather than a silently ignored flag.
KL_ONLY = ("loss.kl_weight", "loss.kl_warmup_steps", "loss.free_bits", "loss.logvar_min", "loss.logvar_max")
VQ_ONLY = ("model.num_vq_embeddings", "model.vq_embed_dim",
           *(f"quantizer.{f.name}" for f in dataclasses.fields(QuantizerConfig)))


def _validate_kind(cfg: Config, source: str) -> None:
    kind, defaults = cfg.model.kind, Config()
    foreign = KL_ONLY if kind == "vq" else VQ_ONLY
    changed = [k for k in foreign if get_key(cfg, k) != get_key(defaults, k)]
    if changed:
        raise UserError(f"{source}: {', '.join(changed)} do not apply to model.kind '{kind}'; remove them")
    if kind == "vq" and cfg.model.num_vq_embeddings is None:
        raise UserError(f"{source}: model.kind 'vq' needs 'model.num_vq_embeddings' (the codebook size, e.g. 8192)")


def _validate_ldm(cfg: LDMConfig, source: str) -> None:
    _check_ranges(cfg, source, LDM_CHOICES, LDM_POSITIVE, LDM_NON_NEGATIVE, LDM_UNIT_INTERVAL)
    m = cfg.model
    if not m.block_out_channels or any(c <= 0 or c % m.norm_num_groups for c in m.block_out_channels):
        raise UserError(f"{source}: 'model.block_out_channels' must be positive multiples of 'model.norm_num_groups' "
                        f"({m.norm_num_groups}), got {m.block_out_channels}")
    bad = [i for i in m.attention_levels if not 0 <= i < len(m.block_out_channels)]
    if bad:
        raise UserError(f"{source}: 'model.attention_levels' {bad} are not levels of 'model.block_out_channels' "
                        f"(0..{len(m.block_out_channels) - 1})")
    if cfg.diffusion.beta_start >= cfg.diffusion.beta_end:
        raise UserError(f"{source}: 'diffusion.beta_start' must be below 'diffusion.beta_end'")


def get_key(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set_dotted(raw: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{source}: '{dotted}' goes through '{part}', which is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=1` -> ('a.b', 1). Values are parsed as YAML, so `lr=1e-4`, `flip=false`, `[8,16]` work."""
    out = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}' must look like KEY=VALUE, e.g. train.max_steps=500")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as e:
            raise UserError(f"override '{item}': the value is not valid YAML ({e.problem})") from None
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None, overrides: list[str] = (), schema: type = Config) -> Any:
    """Load a YAML config (or the defaults when `path` is None) and apply KEY=VALUE overrides;
    `schema` is Config (autoencoders) or LDMConfig (latent diffusion)."""
    raw: Any = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML: {e}") from None
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(raw, key, value, f"{source} (override {key}={value!r})")
    return from_dict(raw, source, schema)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(raw: dict, source: str, schema: type = Config) -> Any:
    cfg = _build(schema, raw, "", source)
    _validate(cfg, source)
    return cfg
