"""The autoencoder's config (`ldm-vae train-vae`): model, loss, quantizer, train, export,
and the `data:` section of data/config.py."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

from ..config import (
    FieldError,
    multiples,
    non_negative,
    one_of,
    positive,
    probability,
    unit_interval,
    unused,
)
from ..data.config import DataConfig
from ..run.config import OptimConfig

MODEL_KINDS = ("kl", "vq", "fsq", "lfq", "dc")
# the largest grid an fsq/lfq model may materialise as its exported codebook (Open-MAGVIT2's
# 2^18): stock VQModel.decode compares every token with every code
MAX_GRID_CODES = 2**18


@dataclass
class ModelConfig:
    """The diffusers autoencoder (RGB in, RGB out); hyper-parameters go to its config."""

    # kl: diffusers AutoencoderKL; vq: diffusers VQModel with a learned codebook
    # (autoencoder/quantize.py); fsq, lfq: diffusers VQModel whose codebook is a fixed grid
    # (autoencoder/fsq.py); dc: diffusers AutoencoderDC, a deterministic deep-compression
    # autoencoder (DC-AE, Chen et al. 2024, arXiv:2410.10733)
    kind: str = "kl"
    # one entry per resolution level; the downsampling factor is 2 ** (len - 1)
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    # blocks per level (dc: in the encoder and in the decoder alike)
    layers_per_block: int = 1
    latent_channels: int = 4
    # GroupNorm groups and the mid-block attention of the KL/VQ encoder and decoder (AutoencoderDC
    # has neither: RMSNorm, and attention in the EfficientViT levels below)
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    # vq only: codebook size, and the code dimension of the lookup (VQModel's 1x1
    # quant_conv / post_quant_conv project latent_channels <-> vq_embed_dim; null: no
    # projection width change, vq_embed_dim = latent_channels)
    num_vq_embeddings: Optional[int] = None
    vq_embed_dim: Optional[int] = None
    # fsq only: levels per code dimension (finite scalar quantization, Mentzer et al. 2023,
    # arXiv:2309.15505), e.g. [8, 8, 8, 5, 5, 5] = 64,000 codes of 6 dims
    fsq_levels: list[int] | None = None
    # lfq only: code bits K, codes {-1, +1}^K (lookup-free quantization, MAGVIT-v2,
    # arXiv:2310.05737), e.g. 14 = 16,384 codes
    lfq_bits: int | None = None
    # dc only: how many of the deepest levels use EfficientViT blocks (multi-scale linear
    # attention + GLU MBConv, DC-AE sec. 3) instead of ResBlocks; DC-AE f32 has 3 of its 6
    dc_vit_levels: int = 0
    # dc only: channels per head of the EfficientViT blocks' linear attention (AutoencoderDC's
    # attention_head_dim); it must divide the widths of those levels
    attention_head_dim: int = 32

    def __post_init__(self):
        one_of(self, "kind", MODEL_KINDS)
        positive(self, "latent_channels", "layers_per_block", "norm_num_groups", "num_vq_embeddings", "vq_embed_dim",
                 "lfq_bits", "attention_head_dim")
        non_negative(self, "dc_vit_levels")
        if self.kind == "dc":
            self._check_dc()
        else:
            multiples(self, "block_out_channels", "norm_num_groups", "model")
        if self.fsq_levels is not None and (not self.fsq_levels or min(self.fsq_levels) < 2):
            raise FieldError("model.fsq_levels", f"({self.fsq_levels}) needs at least one dimension, each with "
                             f"at least 2 levels")
        levels = self.levels
        if levels is not None and math.prod(levels) > MAX_GRID_CODES:
            raise FieldError("model.fsq_levels" if self.kind == "fsq" else "model.lfq_bits",
                             f"gives {math.prod(levels)} codes; at most {MAX_GRID_CODES} (2^18) are supported, since "
                             f"the export materialises them all as a VQModel codebook")

    def _check_dc(self) -> None:
        """What AutoencoderDC's blocks need of the widths (its asserts and reshapes, as errors naming the key)."""
        widths = self.block_out_channels
        if not widths or min(widths) <= 0:
            raise FieldError("model.block_out_channels", f"must be positive widths, got {widths}")
        # the down/up blocks' shortcuts pixel-(un)shuffle by 2 and average or repeat channels in groups
        for before, after in itertools.pairwise(widths):
            if after % 4 or (4 * before) % after:
                raise FieldError("model.block_out_channels", f"({widths}): for model.kind 'dc' each width after the "
                                 f"first must be a multiple of 4 that divides 4x the width before it ({after} after "
                                 f"{before})")
        if widths[-1] % self.latent_channels:
            raise FieldError("model.latent_channels", f"({self.latent_channels}) must divide the last width "
                             f"{widths[-1]} (AutoencoderDC's encoder/decoder shortcuts group channels by it)")
        if self.dc_vit_levels > len(widths):
            raise FieldError("model.dc_vit_levels", f"({self.dc_vit_levels}) must be at most the number of levels "
                             f"({len(widths)}, len(model.block_out_channels))")
        vit_widths = [w for w, block in zip(widths, self.dc_block_types) if block == "EfficientViTBlock"]
        if any(w % self.attention_head_dim for w in vit_widths):
            raise FieldError("model.attention_head_dim", f"({self.attention_head_dim}) must divide the widths of the "
                             f"EfficientViT levels ({vit_widths})")

    @property
    def dc_block_types(self) -> list[str]:
        """AutoencoderDC's block type per level: ResBlock, then EfficientViTBlock in the deepest `dc_vit_levels`."""
        n = len(self.block_out_channels)
        return ["EfficientViTBlock" if i >= n - self.dc_vit_levels else "ResBlock" for i in range(n)]

    @property
    def levels(self) -> list[int] | None:
        """Levels per code dimension of a grid quantizer (fsq, lfq: [2] * lfq_bits); None otherwise."""
        if self.kind == "fsq" and self.fsq_levels is not None:
            return list(self.fsq_levels)
        if self.kind == "lfq" and self.lfq_bits is not None:
            return [2] * self.lfq_bits
        return None

    @property
    def codebook_shape(self) -> tuple[int, int] | None:
        """(codes, code dimension) of VQModel's codebook; None for kl and dc."""
        if self.kind == "vq":
            return self.num_vq_embeddings, self.vq_embed_dim or self.latent_channels
        levels = self.levels
        return (math.prod(levels), len(levels)) if levels is not None else None

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class QuantizerConfig:
    """The training-time quantizer of `model.kind: vq` (autoencoder/quantize.py); fsq and lfq
    (autoencoder/fsq.py) use beta, the entropy penalty and usage_window only."""

    # commitment weight beta on ||z - sg(e)||^2 (van den Oord et al. 2017, arXiv:1711.00937,
    # eq. 3); the codebook term ||sg(z) - e||^2 has weight codebook_weight. For fsq/lfq the
    # commitment term is what keeps the latents inside the grid's [-1, 1]
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
    # (fsq/lfq: exact without it, through the grid's factorisation, see autoencoder/fsq.py)
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    # the logged `usage` is the share of codes picked at least once in the last N steps
    usage_window: int = 100

    def __post_init__(self):
        positive(self, "kmeans_batches", "kmeans_iters", "entropy_temperature", "usage_window")
        non_negative(self, "beta", "codebook_weight", "restart_after_steps", "entropy_weight")
        unit_interval(self, "ema_decay")


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
    # adaptive weight (Esser et al. 2021, arXiv:2012.09841, eq. 7), clamped to [0, max].
    # The clamp is in LDM's units, where the NLL is SUMMED over the 3*H*W pixel values: our
    # NLL is their mean, so our weight is LDM's divided by 3*H*W and so is the clamp
    # (autoencoder/losses.py). 1e4 is LDM's value, at any resolution.
    adaptive_weight: bool = True
    adaptive_weight_max: float = 1.0e4
    # LeCam regularisation (Tseng et al. 2021, arXiv:2104.03310); 0 disables
    lecam_weight: float = 0.0
    lecam_decay: float = 0.999

    def __post_init__(self):
        one_of(self, "lpips_net", ("vgg", "alex"))
        one_of(self, "lpips_if_missing", ("error", "skip"))
        one_of(self, "disc_loss", ("hinge", "vanilla"))
        positive(self, "disc_layers", "disc_channels", "adaptive_weight_max")
        non_negative(self, "rec_l1", "rec_l2", "perceptual_weight", "kl_weight", "kl_warmup_steps", "free_bits",
                     "disc_weight", "disc_start", "disc_pretrain_steps", "lecam_weight")
        unit_interval(self, "lecam_decay")


@dataclass
class DiffusabilityConfig:
    """Regularisers that shape the latent space for the diffusion model trained on it (KL
    models; all off by default). `ldm-vae diffusability` measures what they change."""

    # scale equivariance (Skorokhodov et al. 2025, arXiv:2502.14831): the decoder also
    # turns the 2x2-average-pooled latent into the 2x2-average-pooled image; the weight of that
    # term's L1 (in the reconstruction's units). It damps the latents' high frequencies.
    scale_equivariance: float = 0.0
    # EQ-VAE (Kouzelis et al. 2025, arXiv:2502.09509): the same term also under a random
    # rotation by a multiple of 90 degrees and a random horizontal flip of latent and image
    equivariance_rotations: bool = False
    # latent denoising (l-DeTok, Yang et al. 2025, arXiv:2507.15856): the decoder reconstructs
    # from z' = (1 - tau) z + tau * std(z) * eps, tau ~ U(0, latent_noise_max) per image; 0: off
    latent_noise_max: float = 0.0
    # channel masking (DC-AE 1.5, Chen et al. 2025, arXiv:2508.00413): with this probability
    # per image only the first k latent channels reach the decoder (k uniform in
    # [channel_mask_min, latent_channels]; the rest are zeroed), so the first channels learn
    # to carry the coarse image and the later ones the detail; 0: off
    channel_mask_prob: float = 0.0
    channel_mask_min: int = 1

    def __post_init__(self):
        non_negative(self, "scale_equivariance")
        probability(self, "latent_noise_max", "channel_mask_prob")
        positive(self, "channel_mask_min")


@dataclass
class TrainConfig(OptimConfig):
    # the discriminator's LR; its schedule is constant_with_warmup
    disc_lr: float = 1.0e-4

    def __post_init__(self):
        super().__post_init__()
        positive(self, "disc_lr")


@dataclass
class ExportConfig:
    # images of the train split encoded to measure scaling/shift factors
    scale_num_images: int = 4096
    scale_batch_size: int = 128
    # the model card's license (Hugging Face hub identifier)
    license: str = "mit"

    def __post_init__(self):
        positive(self, "scale_num_images", "scale_batch_size")


# Settings that mean something for some model kinds only: setting them for another kind is
# an error rather than a silently ignored flag.
GRID_QUANTIZER = ("beta", "entropy_weight", "entropy_temperature", "usage_window")  # all discrete kinds
KIND_ONLY = {
    "kl": ("loss.kl_weight", "loss.kl_warmup_steps", "loss.free_bits",
           *(f"diffusability.{f.name}" for f in dataclasses.fields(DiffusabilityConfig))),
    "vq": ("model.num_vq_embeddings", "model.vq_embed_dim",
           *(f"quantizer.{f.name}" for f in dataclasses.fields(QuantizerConfig) if f.name not in GRID_QUANTIZER)),
    "fsq": ("model.fsq_levels",),
    "lfq": ("model.lfq_bits",),
    "dc": ("model.dc_vit_levels", "model.attention_head_dim"),
}
DISCRETE_ONLY = tuple(f"quantizer.{name}" for name in GRID_QUANTIZER)
# Settings that every kind but these reads: AutoencoderDC has no GroupNorm and no mid-block
NOT_FOR_KIND = {"dc": ("model.norm_num_groups", "model.mid_block_add_attention")}
CONTINUOUS_KINDS = ("kl", "dc")  # no quantizer


@dataclass
class Config:
    """`ldm-vae train-vae`: an autoencoder trained on `data`."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    diffusability: DiffusabilityConfig = field(default_factory=DiffusabilityConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self):
        factor = self.model.downsampling_factor
        if self.data.resolution % factor:
            raise FieldError("data.resolution", f"({self.data.resolution}) must be divisible by the downsampling "
                             f"factor {factor} (2 ** (len(model.block_out_channels) - 1))")
        kind = self.model.kind
        others = [key for other, keys in KIND_ONLY.items() if other != kind for key in keys]
        others += [*(DISCRETE_ONLY if kind in CONTINUOUS_KINDS else ()), *NOT_FOR_KIND.get(kind, ())]
        unused(self, others, f"model.kind '{kind}'")
        if self.diffusability.channel_mask_min > self.model.latent_channels:
            raise FieldError("diffusability.channel_mask_min", f"({self.diffusability.channel_mask_min}) must be at "
                             f"most model.latent_channels ({self.model.latent_channels})")
        if self.diffusability.scale_equivariance > 0 and self.data.resolution // factor < 2:
            raise FieldError("diffusability.scale_equivariance", "needs latents of at least 2x2 (they are halved)")
        needed = {"vq": ("num_vq_embeddings", "the codebook size, e.g. 8192"),
                  "fsq": ("fsq_levels", "levels per code dimension, e.g. [8, 8, 8, 5, 5, 5]"),
                  "lfq": ("lfq_bits", "the code bits, e.g. 14 for 16,384 codes")}
        if kind in needed and getattr(self.model, needed[kind][0]) is None:
            name, what = needed[kind]
            raise FieldError(f"model.{name}", f"is needed by model.kind '{kind}' ({what})")
