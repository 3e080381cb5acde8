"""Build the diffusers autoencoder from config, and the thin training wrappers around it.

Architecture lives in diffusers (`AutoencoderKL`, `VQModel`); everything here is wiring.
The wrappers exist so that one forward call through the DDP-wrapped module returns what
the losses need (reconstruction and the latent's regulariser inputs): calling
`unwrap_model(vae)` for the forward, as diffusers' research `train_autoencoderkl.py`
does, bypasses DDP's gradient synchronisation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import AutoencoderKL, VQModel
from torch import nn

from ..errors import UserError
from .config import Config, ModelConfig
from .quantize import VectorQuantizer, nearest_code

MODEL_CLASSES = {"kl": AutoencoderKL, "vq": VQModel}


def load_autoencoder(path: str | Path) -> AutoencoderKL | VQModel:
    """Stock diffusers model of an export folder, by the class named in its config.json;
    weights from safetensors only (never a pickle)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path} is not a diffusers model folder (no config.json); pass an export folder")
    name = json.loads(cfg_file.read_text()).get("_class_name")
    classes = {cls.__name__: cls for cls in MODEL_CLASSES.values()}
    if name not in classes:
        raise UserError(f"{path} holds a {name}; ldm-vae handles {' and '.join(classes)}")
    try:
        return classes[name].from_pretrained(path, use_safetensors=True)
    except OSError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load {path}: {reason} (ldm-vae reads safetensors weights only)") from None


def build_autoencoder(cfg: ModelConfig, sample_size: int) -> AutoencoderKL | VQModel:
    n = len(cfg.block_out_channels)
    extra = {}
    if cfg.kind == "vq":
        extra = dict(num_vq_embeddings=cfg.num_vq_embeddings, vq_embed_dim=cfg.vq_embed_dim)
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


def build_training_model(cfg: Config) -> nn.Module:
    """The autoencoder in its training wrapper (`KLAutoencoder` or `VQAutoencoder`)."""
    vae = build_autoencoder(cfg.model, cfg.data.resolution)
    if cfg.model.kind == "kl":
        return KLAutoencoder(vae, cfg.loss.logvar_min, cfg.loss.logvar_max)
    codebook = vae.quantize.embedding.weight
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


@torch.no_grad()
def reconstruct(vae: AutoencoderKL | VQModel, x: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction the way stock diffusers computes it (posterior mean /
    `decode(encode(x).latents)`, which quantizes with VQModel's own lookup)."""
    if isinstance(vae, VQModel):
        return vae.decode(vae.encode(x).latents).sample
    return vae.decode(vae.encode(x).latent_dist.mean).sample


def code_indices(vq: VQModel, latents: torch.Tensor) -> torch.Tensor:
    """[B, h, w] codebook indices of `VQModel.encode(x).latents` (memory-safe Euclidean
    lookup, the same choice as VQModel's own cdist lookup)."""
    b, d, h, w = latents.shape
    flat = latents.permute(0, 2, 3, 1).reshape(-1, d)
    return nearest_code(flat, vq.quantize.embedding.weight).view(b, h, w)


class GaussianLatent(NamedTuple):
    mean: torch.Tensor
    logvar: torch.Tensor


class KLAutoencoder(nn.Module):
    """Training view of an `AutoencoderKL`: x -> (reconstruction, GaussianLatent(mean, logvar))."""

    def __init__(self, vae: AutoencoderKL, logvar_min: float = -30.0, logvar_max: float = 20.0):
        super().__init__()
        self.vae = vae
        self.logvar_min, self.logvar_max = logvar_min, logvar_max

    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight, where the adaptive GAN weight is measured."""
        return self.vae.decoder.conv_out.weight

    def forward(self, x: torch.Tensor, sample_posterior: bool = True):
        posterior = self.vae.encode(x).latent_dist
        mean = posterior.mean
        # diffusers already clamps to [-30, 20]; the configured clamp may be tighter.
        logvar = posterior.logvar.clamp(self.logvar_min, self.logvar_max)
        z = mean
        if sample_posterior:
            # randn of the shape, not randn_like: a channels_last `mean` would reorder the draw
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        recon = self.vae.decode(z).sample
        return recon, GaussianLatent(mean, logvar)


class VQAutoencoder(nn.Module):
    """Training view of a `VQModel`: x -> (reconstruction, QuantizerOutput).

    Encoder and 1x1 `quant_conv` as in VQModel.encode, our quantizer on VQModel's own
    codebook, then VQModel.decode on the already-quantized latents (force_not_quantize).
    """

    def __init__(self, vae: VQModel, quantizer: VectorQuantizer):
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
