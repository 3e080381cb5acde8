"""The latent diffusion networks: diffusers `UNet2DModel` or `DiTTransformer2DModel` built from
config, which label is its "null" class, and the training noise
schedule that samplers are built from (pipeline.make_scheduler)."""

from __future__ import annotations

from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding

from ..errors import UserError
from .config import BETA_SCHEDULES, DiffusionConfig, DiTConfig, LDMConfig, UNetConfig

# diffusers' DiTPipeline feeds the hard-coded label 1000 as the unconditional class (ImageNet's
# DiT has 1000 classes): our DiTs have that many label slots, whatever the dataset's classes,
# so that the stock pipeline's null label is the one they were trained with.
DIT_NULL_LABEL = 1000


def build_network(cfg: LDMConfig, latent_shape: list[int], num_classes: int | None):
    """The denoiser `cfg.network` names, for latents of `latent_shape` [C, h, w]."""
    if cfg.network == "dit":
        return build_dit(cfg.dit, latent_shape, num_classes)
    return build_unet(cfg.model, latent_shape, num_classes)


def null_label(net) -> int:
    """The class label that means "no class" (classifier-free guidance) for `net`."""
    return DIT_NULL_LABEL if isinstance(net, DiTTransformer2DModel) else net.config.num_class_embeds - 1


def build_dit(cfg: DiTConfig, latent_shape: list[int], num_classes: int | None) -> DiTTransformer2DModel:
    """A class-conditional DiT (adaLN-Zero) with DIT_NULL_LABEL + 1 label embeddings, the last the
    null class; its own random label dropout is switched off: the trainer drops labels itself,
    from its seeded draw (LabelEmbedding's would draw from the global RNG, and add to ours)."""
    channels, size = latent_shape[0], latent_shape[1]
    if size % cfg.patch_size:
        raise UserError(f"latents of {size}x{size} cannot be cut into dit.patch_size={cfg.patch_size} patches")
    if not num_classes or num_classes > DIT_NULL_LABEL:
        raise UserError(f"network: dit needs 1..{DIT_NULL_LABEL} classes (diffusers' DiTPipeline takes label "
                        f"{DIT_NULL_LABEL} as the null class); this cache has {num_classes or 'no'} classes")
    net = DiTTransformer2DModel(
        num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
        in_channels=channels, out_channels=channels, num_layers=cfg.num_layers, dropout=cfg.dropout,
        sample_size=size, patch_size=cfg.patch_size, num_embeds_ada_norm=DIT_NULL_LABEL,
    )
    for module in net.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return net


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
