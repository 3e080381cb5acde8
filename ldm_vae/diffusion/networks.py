"""The latent diffusion networks: diffusers `UNet2DModel` built from config, and the training
noise schedule that samplers are built from (pipeline.make_scheduler)."""

from __future__ import annotations

from diffusers import DDPMScheduler, UNet2DModel

from ..errors import UserError
from .config import BETA_SCHEDULES, DiffusionConfig, UNetConfig


def build_unet(cfg: UNetConfig, latent_shape: list[int], num_classes: int | None) -> UNet2DModel:
    """The latent diffusion UNet for latents of `latent_shape` [C, h, w]; with `num_classes`,
    a class embedding of num_classes + 1 entries (the last is the "null" class of
    classifier-free guidance)."""
    channels, size = latent_shape[0], latent_shape[1]
    levels = range(len(cfg.block_out_channels))
    if size % 2 ** (len(cfg.block_out_channels) - 1):
        raise UserError(f"latents of {size}x{size} cannot be halved {len(cfg.block_out_channels) - 1} times; use "
                        f"fewer model.block_out_channels entries")
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels),
        up_block_types=tuple("AttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels)),
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        dropout=cfg.dropout,
        num_class_embeds=num_classes + 1 if num_classes else None,
    )


def noise_schedule(dc: DiffusionConfig) -> DDPMScheduler:
    """The training noise schedule; samplers are built from its config (diffusion/pipeline.py, make_scheduler)."""
    return DDPMScheduler(num_train_timesteps=dc.num_train_timesteps, beta_schedule=BETA_SCHEDULES[dc.beta_schedule],
                         beta_start=dc.beta_start, beta_end=dc.beta_end, prediction_type=dc.prediction_type,
                         clip_sample=False)
