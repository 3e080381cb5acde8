"""Build the diffusers autoencoder from config, and the thin training wrappers around it.

Architecture lives in diffusers (`AutoencoderKL`, `VQModel`, `AutoencoderDC`); everything
here is wiring.
The wrappers exist so that one forward call through the DDP-wrapped module returns what
the losses need (reconstruction and the latent's regulariser inputs): calling
`unwrap_model(vae)` for the forward, as diffusers' research `train_autoencoderkl.py`
does, bypasses DDP's gradient synchronisation.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC, AutoencoderKL, VQModel
from torch import nn

from ..errors import UserError
from .config import Config, DiffusabilityConfig, ModelConfig
from .fsq import ScalarQuantizer
from .quantize import VectorQuantizer, nearest_code

# fsq and lfq are VQModels whose codebook is a fixed grid (autoencoder/fsq.py)
MODEL_CLASSES = {"kl": AutoencoderKL, "vq": VQModel, "fsq": VQModel, "lfq": VQModel, "dc": AutoencoderDC}
# the EfficientViT levels' multi-scale token aggregation: one 5x5 depthwise branch, as in every
# DC-AE release (AutoencoderDC's default qkv_multiscales for its attention levels)
DC_QKV_MULTISCALES = (5,)


def load_autoencoder(path: str | Path) -> AutoencoderKL | VQModel | AutoencoderDC:
    """Stock diffusers model of an export folder, by the class named in its config.json;
    weights from safetensors only (never a pickle)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path} is not a diffusers model folder (no config.json); pass an export folder")
    name = json.loads(cfg_file.read_text()).get("_class_name")
    classes = {cls.__name__: cls for cls in MODEL_CLASSES.values()}
    if name not in classes:
        raise UserError(f"{path} holds a {name}; ldm-vae handles {', '.join(classes)}")
    try:
        return classes[name].from_pretrained(path, use_safetensors=True)
    except OSError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load {path}: {reason} (ldm-vae reads safetensors weights only)") from None


@torch.no_grad()
def fold_shift(vae):
    """A copy of an AutoencoderKL whose posterior mean is `mean - shift_factor` and whose
    decoder takes `z - shift_factor` (its 1x1 `quant_conv` / `post_quant_conv` biases moved),
    with shift_factor 0; a model without a shift is returned as it is. The posterior's
    variance, the decoder's output and `scaling_factor` stay the same."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    if not shift:
        return vae
    if not isinstance(vae, AutoencoderKL) or not (vae.config.use_quant_conv and vae.config.use_post_quant_conv):
        raise UserError(f"cannot fold shift_factor {shift:g} into this {type(vae).__name__}: it needs the 1x1 "
                        f"quant_conv and post_quant_conv of an AutoencoderKL")
    folded = copy.deepcopy(vae)
    channels = vae.config.latent_channels
    folded.quant_conv.bias[:channels] -= shift  # the mean's half of the moments (the log-variance follows)
    # post_quant_conv(z + shift) = W z + (b + shift * sum over W's input channels)
    folded.post_quant_conv.bias += shift * folded.post_quant_conv.weight.sum(dim=(1, 2, 3))
    folded.register_to_config(shift_factor=0.0)
    return folded


def build_autoencoder(cfg: ModelConfig, sample_size: int) -> AutoencoderKL | VQModel | AutoencoderDC:
    if cfg.kind == "dc":
        return build_dc(cfg)
    n = len(cfg.block_out_channels)
    extra = {}
    if cfg.kind != "kl":
        codes, dim = cfg.codebook_shape
        extra = {"num_vq_embeddings": codes, "vq_embed_dim": dim}
    return MODEL_CLASSES[cfg.kind](
        in_channels=3,  # RGB: data sources convert every image to 3 channels
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.mid_block_add_attention,
        sample_size=sample_size,
        # Not the SD constant: 1.0 marks "not measured yet"; export measures it from data.
        scaling_factor=1.0,
        **extra,
    )


def build_dc(cfg: ModelConfig) -> AutoencoderDC:
    """AutoencoderDC with the same levels in encoder and decoder: ResBlocks, then EfficientViT
    blocks in the deepest `dc_vit_levels` levels (DC-AE, arXiv:2410.10733, sec. 3)."""
    n = len(cfg.block_out_channels)
    blocks = tuple(cfg.dc_block_types)
    scales = tuple(DC_QKV_MULTISCALES if b == "EfficientViTBlock" else () for b in blocks)
    widths, layers = tuple(cfg.block_out_channels), (cfg.layers_per_block,) * n
    return AutoencoderDC(
        in_channels=3,
        latent_channels=cfg.latent_channels,
        attention_head_dim=cfg.attention_head_dim,
        encoder_block_types=blocks, decoder_block_types=blocks,
        encoder_block_out_channels=widths, decoder_block_out_channels=widths,
        encoder_layers_per_block=layers, decoder_layers_per_block=layers,
        encoder_qkv_multiscales=scales, decoder_qkv_multiscales=scales,
        scaling_factor=1.0,  # "not measured yet": export measures it from data
    )


def build_training_model(cfg: Config) -> nn.Module:
    """The autoencoder in its training wrapper (`KLAutoencoder`, `VQAutoencoder` or `DCAutoencoder`)."""
    vae = build_autoencoder(cfg.model, cfg.data.resolution)
    if cfg.model.kind == "kl":
        return KLAutoencoder(vae, cfg.diffusability)
    if cfg.model.kind == "dc":
        return DCAutoencoder(vae)
    codebook = vae.quantize.embedding.weight
    if cfg.model.levels is not None:
        quantizer = ScalarQuantizer(cfg.model.levels, cfg.quantizer)
    else:
        quantizer = VectorQuantizer(codebook.shape[0], codebook.shape[1], cfg.quantizer, seed=cfg.seed)
    quantizer.prepare_codebook(codebook)
    return VQAutoencoder(vae, quantizer)


def ema_parameters(vae: nn.Module) -> list[nn.Parameter]:
    """The parameters the weight EMA averages: all but a VQ codebook.

    A codebook is not averaged: restarts move codes abruptly, and an average of unit-norm
    codes is not unit-norm, so an averaged codebook would disagree with the lookup. The
    export pairs the EMA encoder/decoder with the live codebook.
    """
    return [p for name, p in vae.named_parameters() if not name.startswith("quantize.")]


def deterministic_latent(vae: AutoencoderKL | VQModel | AutoencoderDC, x: torch.Tensor) -> torch.Tensor:
    """The deterministic latent stock diffusers decodes: AutoencoderKL's posterior mean,
    VQModel's `encode(x).latents` (which its `decode` quantizes), AutoencoderDC's `encode(x).latent`."""
    if isinstance(vae, VQModel):
        return vae.encode(x).latents
    if isinstance(vae, AutoencoderDC):
        return vae.encode(x).latent
    return vae.encode(x).latent_dist.mean


@torch.no_grad()
def reconstruct(vae: AutoencoderKL | VQModel | AutoencoderDC, x: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction the way stock diffusers computes it (`decode` of `deterministic_latent`)."""
    return vae.decode(deterministic_latent(vae, x)).sample


def code_indices(vq: VQModel, latents: torch.Tensor) -> torch.Tensor:
    """[B, h, w] codebook indices of `VQModel.encode(x).latents` (memory-safe Euclidean
    lookup, the same choice as VQModel's own cdist lookup)."""
    b, d, h, w = latents.shape
    flat = latents.permute(0, 2, 3, 1).reshape(-1, d)
    return nearest_code(flat, vq.quantize.embedding.weight).view(b, h, w)


class EquivariancePair(NamedTuple):
    """The decoder's output for a transformed latent and the equally transformed image."""

    decoded: torch.Tensor  # D(T(z)), [B, 3, H/2, W/2]
    target: torch.Tensor  # T(x)


class GaussianLatent(NamedTuple):
    mean: torch.Tensor
    logvar: torch.Tensor
    equivariance: EquivariancePair | None = None  # with diffusability.scale_equivariance > 0


class KLAutoencoder(nn.Module):
    """Training view of an `AutoencoderKL`: x -> (reconstruction, GaussianLatent(mean, logvar, ...)).

    In training mode the diffusability regularisers (autoencoder/config.py,
    DiffusabilityConfig) act here, on what the decoder sees: noise and channel masks on its
    input, and a second decode of the pooled latent for the equivariance term.
    """

    def __init__(self, vae: AutoencoderKL, reg: DiffusabilityConfig | None = None):
        super().__init__()
        self.vae = vae
        self.reg = reg or DiffusabilityConfig()

    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight, where the adaptive GAN weight is measured."""
        return self.vae.decoder.conv_out.weight

    def forward(self, x: torch.Tensor, sample_posterior: bool = True):
        posterior = self.vae.encode(x).latent_dist
        # diffusers' posterior (log-variance clamped to [-30, 20]): the one the export, the
        # latent cache and eval sample from, so training samples exactly as they do
        mean, logvar = posterior.mean, posterior.logvar
        z = mean
        if sample_posterior:
            # randn of the shape, not randn_like: a channels_last `mean` would reorder the draw
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        reg, eq = self.reg, None
        decoder_input = z
        if self.training and reg.latent_noise_max > 0:
            decoder_input = noised_latent(decoder_input, reg.latent_noise_max)
        if self.training and reg.channel_mask_prob > 0:
            decoder_input = decoder_input * channel_mask(decoder_input, reg.channel_mask_prob, reg.channel_mask_min)
        recon = self.vae.decode(decoder_input).sample
        if self.training and reg.scale_equivariance > 0:
            # Skorokhodov et al. 2025: D(down(z)) should be down(x); EQ-VAE adds rotations/flips
            z_small, target = F.avg_pool2d(z, 2), F.avg_pool2d(x, 2)
            if reg.equivariance_rotations:
                z_small, target = random_rotation(z_small, target)
            eq = EquivariancePair(self.vae.decode(z_small).sample, target)
        return recon, GaussianLatent(mean, logvar, eq)


def noised_latent(z: torch.Tensor, tau_max: float) -> torch.Tensor:
    """(1 - tau) z + tau * std(z) * eps with tau ~ U(0, tau_max) per image (l-DeTok's
    interpolation to noise, arXiv:2507.15856; the noise on the latents' own scale)."""
    tau = torch.rand(len(z), 1, 1, 1, device=z.device, dtype=z.dtype) * tau_max
    eps = torch.randn(z.shape, device=z.device, dtype=z.dtype)
    return (1 - tau) * z + tau * z.detach().std() * eps


def channel_mask(z: torch.Tensor, prob: float, min_channels: int) -> torch.Tensor:
    """[B, C, 1, 1] of 0/1: with probability `prob` per image, 1 for the first k channels only
    (k uniform in [min_channels, C]), else all ones (DC-AE 1.5's structured latent)."""
    b, c = z.shape[:2]
    k = torch.randint(min_channels, c + 1, (b, 1), device=z.device)
    k = torch.where(torch.rand(b, 1, device=z.device) < prob, k, c)
    return (torch.arange(c, device=z.device) < k).to(z.dtype).view(b, c, 1, 1)


def random_rotation(z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random rotation by k * 90 degrees and random horizontal flip of both (one draw
    per batch; EQ-VAE's transforms that commute with the convolutional grid)."""
    k, flip = torch.randint(4, (2,)).tolist()
    z, x = z.rot90(k, (-2, -1)), x.rot90(k, (-2, -1))
    return (z.flip(-1), x.flip(-1)) if flip % 2 else (z, x)


class VQAutoencoder(nn.Module):
    """Training view of a `VQModel`: x -> (reconstruction, QuantizerOutput).

    Encoder and 1x1 `quant_conv` as in VQModel.encode, our quantizer on VQModel's own
    codebook (learned for vq, the fixed grid for fsq/lfq), then VQModel.decode on the
    already-quantized latents (force_not_quantize).
    """

    def __init__(self, vae: VQModel, quantizer: VectorQuantizer | ScalarQuantizer):
        super().__init__()
        self.vae = vae
        self.quantizer = quantizer

    @property
    def codebook(self) -> nn.Parameter:
        return self.vae.quantize.embedding.weight

    def last_layer(self) -> torch.Tensor:
        return self.vae.decoder.conv_out.weight

    def forward(self, x: torch.Tensor):
        q = self.quantizer(self.vae.encode(x).latents, self.codebook)
        recon = self.vae.decode(q.quantized, force_not_quantize=True).sample
        return recon, q


class DCLatent(NamedTuple):
    """AutoencoderDC's latent: deterministic and unregularised (no KL, no quantizer; DC-AE
    trains with reconstruction, perceptual and GAN terms only)."""

    latent: torch.Tensor  # [B, C, H/f, W/f]


class DCAutoencoder(nn.Module):
    """Training view of an `AutoencoderDC`: x -> (decode(encode(x).latent), DCLatent)."""

    def __init__(self, vae: AutoencoderDC):
        super().__init__()
        self.vae = vae

    def last_layer(self) -> torch.Tensor:
        # a Conv2d, since layers_per_block >= 1 (with 0 blocks at the first level it would be
        # a pixel-shuffle DCUpBlock2d)
        return self.vae.decoder.conv_out.weight

    def forward(self, x: torch.Tensor):
        z = self.vae.encode(x).latent
        return self.vae.decode(z).sample, DCLatent(z)
