"""Build the diffusers autoencoder from config, and the thin training wrapper around it.

Architecture lives in diffusers (`AutoencoderKL`); everything here is wiring. The wrapper
exists so that one forward call through the DDP-wrapped module returns what the losses
need (reconstruction and posterior parameters): calling `unwrap_model(vae)` for the
forward, as diffusers' research `train_autoencoderkl.py` does, bypasses DDP's gradient
synchronisation.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn

from .config import ModelConfig


def downsampling_factor(cfg: ModelConfig) -> int:
    return 2 ** (len(cfg.block_out_channels) - 1)


def build_autoencoder(cfg: ModelConfig, sample_size: int) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
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
    )


class KLAutoencoder(nn.Module):
    """Training view of an `AutoencoderKL`: x -> (reconstruction, posterior mean, log-variance)."""

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
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        recon = self.vae.decode(z).sample
        return recon, mean, logvar
