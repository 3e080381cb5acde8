"""The latent diffusion networks: diffusers `UNet2DModel`, `DiTTransformer2DModel` or (text)
`UNet2DConditionModel` with its CLIP text encoder, built from config; their "null" class,
and the training noise schedule that samplers are built from (pipeline.make_scheduler)."""

from __future__ import annotations

import torch
from diffusers import (
    DDPMScheduler,
    DiTTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.models.embeddings import LabelEmbedding

from ..errors import UserError
from .config import BETA_SCHEDULES, DiffusionConfig, DiTConfig, LDMConfig, UNetConfig

# diffusers' DiTPipeline, which runs every class-conditional export of ours (pipeline.py), feeds
# the hard-coded label 1000 as the unconditional class (ImageNet's DiT has 1000 classes): every
# class-conditional network has 1001 label slots, whatever the dataset's classes, so that the
# stock pipeline's null label is the one it was trained with. The unused slots cost
# (1000 - classes) x embedding width parameters, get no gradient and are set to zero.
NULL_LABEL = 1000


def build_network(cfg: LDMConfig, latent_shape: list[int], num_classes: int | None, text_encoder=None):
    """The denoiser `cfg.network` names, for latents of `latent_shape` [C, h, w]; with a
    `text_encoder`, a TextConditioned UNet around it."""
    if cfg.network == "dit":
        return build_dit(cfg.dit, latent_shape, num_classes)
    if text_encoder is not None:
        return TextConditioned(build_text_unet(cfg.model, latent_shape, text_encoder.config.hidden_size),
                               text_encoder)
    return build_unet(cfg.model, latent_shape, num_classes)


class TextConditioned(torch.nn.Module):
    """A text-conditional UNet and its text encoder as one module, trained together: the
    UNet's cross-attention reads the encoder's last hidden states of the caption tokens, as
    StableDiffusionPipeline feeds them (diffusion/text.py, `tokenize`)."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, t, encoder_hidden_states=self.text_encoder(token_ids)[0]).sample


def _check_levels(cfg: UNetConfig, size: int) -> None:
    if size % 2 ** (len(cfg.block_out_channels) - 1):
        raise UserError(f"latents of {size}x{size} cannot be halved {len(cfg.block_out_channels) - 1} times; use "
                        f"fewer model.block_out_channels entries")


@torch.no_grad()
def _zero_unused_labels(table: torch.nn.Embedding, num_classes: int) -> None:
    """Rows num_classes..NULL_LABEL-1 of a label embedding are never looked up: zero, not noise
    (which would be most of the network's weight norm for a small dataset's classes)."""
    table.weight[num_classes:NULL_LABEL] = 0


def _check_classes(num_classes: int | None, network: str) -> None:
    if num_classes and num_classes > NULL_LABEL:
        raise UserError(f"network: {network} takes at most {NULL_LABEL} classes (diffusers' DiTPipeline, which "
                        f"runs class-conditional exports, takes label {NULL_LABEL} as the null class); this cache "
                        f"has {num_classes}")


def build_dit(cfg: DiTConfig, latent_shape: list[int], num_classes: int | None) -> DiTTransformer2DModel:
    """A class-conditional DiT (adaLN-Zero) with NULL_LABEL + 1 label embeddings, the last the
    null class; its own random label dropout is switched off: the trainer drops labels itself,
    from its seeded draw (LabelEmbedding's would draw from the global RNG, and add to ours)."""
    channels, size = latent_shape[0], latent_shape[1]
    if size % cfg.patch_size:
        raise UserError(f"latents of {size}x{size} cannot be cut into dit.patch_size={cfg.patch_size} patches")
    if not num_classes:
        raise UserError("network: dit is class-conditional and this cache has no classes; use network: unet")
    _check_classes(num_classes, "dit")
    net = DiTTransformer2DModel(
        num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
        in_channels=channels, out_channels=channels, num_layers=cfg.num_layers, dropout=cfg.dropout,
        sample_size=size, patch_size=cfg.patch_size, num_embeds_ada_norm=NULL_LABEL,
    )
    for module in net.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
            _zero_unused_labels(module.embedding_table, num_classes)
    return net


def build_unet(cfg: UNetConfig, latent_shape: list[int], num_classes: int | None) -> UNet2DModel:
    """The latent diffusion UNet for latents of `latent_shape` [C, h, w]; with `num_classes`,
    a class embedding of NULL_LABEL + 1 entries (the last is the "null" class of
    classifier-free guidance)."""
    _check_classes(num_classes, "unet")
    channels, size = latent_shape[0], latent_shape[1]
    _check_levels(cfg, size)
    levels = range(len(cfg.block_out_channels))
    net = UNet2DModel(
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
        num_class_embeds=NULL_LABEL + 1 if num_classes else None,
    )
    if num_classes:
        _zero_unused_labels(net.class_embedding, num_classes)
    return net


def build_text_unet(cfg: UNetConfig, latent_shape: list[int], cross_attention_dim: int) -> UNet2DConditionModel:
    """The UNet of `build_unet` with cross-attention to text states of width
    `cross_attention_dim` at its attention levels (and in its middle block). (Adding the
    attention-pooled states to the time embedding, diffusers' `addition_embed_type="text"`,
    made the demo's samples worse at 600 steps: scripts/ldm_compare.py, README.)"""
    channels, size = latent_shape[0], latent_shape[1]
    _check_levels(cfg, size)
    levels = range(len(cfg.block_out_channels))
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D"
                               for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D"
                             for i in reversed(levels)),
        # UNet2DConditionModel reads `attention_head_dim` as the number of heads (a diffusers
        # naming legacy): per level, the count that gives heads of cfg.attention_head_dim channels
        attention_head_dim=tuple(max(1, c // cfg.attention_head_dim) for c in cfg.block_out_channels),
        norm_num_groups=cfg.norm_num_groups,
        dropout=cfg.dropout,
        cross_attention_dim=cross_attention_dim,
    )


def noise_schedule(dc: DiffusionConfig) -> DDPMScheduler:
    """The training noise schedule; samplers are built from its config (diffusion/pipeline.py, make_scheduler)."""
    return DDPMScheduler(num_train_timesteps=dc.num_train_timesteps, beta_schedule=BETA_SCHEDULES[dc.beta_schedule],
                         beta_start=dc.beta_start, beta_end=dc.beta_end, prediction_type=dc.prediction_type,
                         clip_sample=False)
