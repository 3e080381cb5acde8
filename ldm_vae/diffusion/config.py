"""The latent diffusion config (`ldm-vae train-ldm`): UNet or DiT, noise schedule, train, sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import (
    FieldError,
    multiples,
    non_negative,
    one_of,
    positive,
    unit_interval,
)
from ..run.config import OptimConfig

# diffusers' name of each beta schedule
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
SOLVER_NAMES = ("dpm++", "ddim")  # diffusion/pipeline.py builds them
CONDITIONINGS = ("class", "text", "none")


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

    def __post_init__(self):
        positive(self, "layers_per_block", "attention_head_dim", "norm_num_groups")
        non_negative(self, "dropout")
        multiples(self, "block_out_channels", "norm_num_groups", "model")
        bad = [i for i in self.attention_levels if not 0 <= i < len(self.block_out_channels)]
        if bad:
            raise FieldError("attention_levels", f"{bad} are not levels of 'model.block_out_channels' "
                             f"(0..{len(self.block_out_channels) - 1})")


@dataclass
class DiTConfig:
    """diffusers DiTTransformer2DModel on the latents (`network: dit`; Peebles & Xie 2023,
    arXiv:2212.09748): patches of `patch_size` x `patch_size` latent pixels become tokens of
    width num_attention_heads x attention_head_dim, through `num_layers` adaLN-Zero blocks."""

    patch_size: int = 2
    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    dropout: float = 0.0

    def __post_init__(self):
        positive(self, "patch_size", "num_layers", "num_attention_heads", "attention_head_dim")
        non_negative(self, "dropout")


@dataclass
class TextConfig:
    """The CLIP text encoder of a text-conditional UNet (`diffusion.conditioning: text`),
    trained with it. Without `pretrained`, its tokenizer is built from the training captions
    (diffusion/text.py) and its weights start random (sizes below)."""

    # a folder or Hub id with `tokenizer/` and `text_encoder/` subfolders (e.g. a Stable
    # Diffusion repo) to start from instead; the sizes below are then ignored
    pretrained: Optional[str] = None
    # keep the text encoder's weights fixed (only the UNet learns); for a pretrained one
    freeze: bool = False
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4

    def __post_init__(self):
        positive(self, "hidden_size", "num_layers", "num_heads")
        if self.hidden_size % self.num_heads:
            raise FieldError("hidden_size", "must be a multiple of 'text.num_heads'")
        if self.freeze and not self.pretrained:
            raise FieldError("freeze", "needs 'text.pretrained' (a random text encoder that never learns "
                                       "cannot tell captions apart)")


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
    # Min-SNR-gamma loss weighting (Hang et al. 2023, arXiv:2303.09556): each image's MSE is
    # weighted by min(SNR(t), gamma) / SNR(t) (epsilon) or / (SNR(t) + 1) (v_prediction), so
    # the nearly clean timesteps, whose noise is hard to predict and matters little to the
    # samples, stop dominating the gradient. The paper's gamma: 5. null: the plain MSE
    snr_gamma: Optional[float] = None
    # class: on the cache's labels; the "null" class (label 1000, the one diffusers'
    # DiTPipeline guides with) replaces a label with probability label_dropout.
    # text: on captions (the cache's, from data.caption_column; else "a photo of a {class}"
    # and other templates over the class names) through a CLIP text encoder (`text:`); the
    # empty caption "" (StableDiffusionPipeline's unconditional prompt) replaces a caption
    # with probability label_dropout. none: unconditional.
    # The dropout teaches the same network the unconditional model that classifier-free
    # guidance needs (Ho & Salimans 2022, arXiv:2207.12598).
    conditioning: str = "class"
    label_dropout: float = 0.1

    def __post_init__(self):
        one_of(self, "beta_schedule", tuple(BETA_SCHEDULES))
        one_of(self, "prediction_type", ("epsilon", "v_prediction"))
        one_of(self, "conditioning", CONDITIONINGS)
        positive(self, "num_train_timesteps", "beta_start", "beta_end", "snr_gamma")
        unit_interval(self, "label_dropout")
        if self.beta_start >= self.beta_end:
            raise FieldError("beta_start", "must be below 'diffusion.beta_end'")


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

    def __post_init__(self):
        one_of(self, "solver", SOLVER_NAMES)
        positive(self, "steps", "per_class")
        non_negative(self, "guidance_scale")


@dataclass
class LDMTrainConfig(OptimConfig):
    batch_size: int = 128
    max_steps: int = 3000
    lr: float = 2.0e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    ema_decay: float = 0.999


@dataclass
class PipelineExportConfig:
    # the pipeline's model card license (Hugging Face hub identifier)
    license: str = "mit"


@dataclass
class LDMConfig:
    """`ldm-vae train-ldm`: a diffusers UNet2DModel or DiTTransformer2DModel trained on a latent cache."""

    seed: int = 0
    # the latent cache (`ldm-vae encode`); `--latents` sets it
    latents: Optional[str] = None
    # unet (`model:`; UNet2DModel, or UNet2DConditionModel for text) | dit (`dit:`,
    # DiTTransformer2DModel; class-conditional only). Exported as a stock pipeline: class-
    # conditional runs as DiTPipeline, text-conditional as StableDiffusionPipeline,
    # unconditional as LDMPipeline
    network: str = "unet"
    model: UNetConfig = field(default_factory=UNetConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: LDMTrainConfig = field(default_factory=LDMTrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    export: PipelineExportConfig = field(default_factory=PipelineExportConfig)

    def __post_init__(self):
        one_of(self, "network", ("unet", "dit"))
        if self.network == "dit" and self.diffusion.conditioning != "class":
            raise FieldError("network", "dit needs diffusion.conditioning: class (DiT's adaLN blocks are "
                             "conditioned on a class; use network: unet for text or no conditioning)")
