"""The pipelines of latent diffusion runs: stock diffusers classes, so exported folders load
with `from_pretrained` alone (no `pipeline.py`, no `trust_remote_code`).

- Class-conditional (a `UNet2DModel` or a `DiTTransformer2DModel`): diffusers' `DiTPipeline`.
  It calls its `transformer` as `net(latents, timestep=t, class_labels=labels).sample`, which
  UNet2DModel takes too; its null class for guidance is the hard-coded label 1000, which is
  the null label every class-conditional network of ours is trained with
  (networks.NULL_LABEL). It guides where `guidance_scale > 1` (Ho & Salimans 2022,
  arXiv:2207.12598) and decodes `latents / scaling_factor`.
- Text-conditional (a `UNet2DConditionModel` with a CLIP text encoder and tokenizer, see
  text.py): diffusers' `StableDiffusionPipeline` without a safety checker. Its unconditional
  prompt for guidance is "" (the caption the trainer drops to); it guides where
  `guidance_scale > 1`.
- Unconditional (a `UNet2DModel`): diffusers' `LDMPipeline` (`vqvae`, `unet`, `scheduler`),
  which also decodes `latents / scaling_factor`.

None of them reads a `shift_factor`: the autoencoder in these pipelines has its shift folded
into its 1x1 convolutions (autoencoder.models.fold_shift), the same function read correctly.
Loading logs diffusers' type note where the component is not the one the class annotates
(a UNet2DModel as DiTPipeline's `transformer`, an AutoencoderKL as LDMPipeline's `vqvae`):
the calls above are all the pipelines make of them.

`ClassConditionalPipeline`, `TextToImagePipeline` and `UnconditionalPipeline` are those
classes with one calling convention for ldm-vae's own commands (`class_labels`, `batch_size`,
`output_type="pt"`, `num_classes`, `use_solver`); export.py writes their folders as the stock
classes.
"""

from __future__ import annotations

import torch
import transformers
from diffusers import (
    DDIMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    ImagePipelineOutput,
    LDMPipeline,
)

from .text import class_prompt

# diffusers' Stable Diffusion module imports transformers' CLIPImageProcessor (its safety
# checker's), which logs a warning on every import where torchvision is missing; we never
# use it, so it is imported with transformers' logging at errors only.
_verbosity = transformers.logging.get_verbosity()
transformers.logging.set_verbosity_error()
try:
    from diffusers import StableDiffusionPipeline
finally:
    transformers.logging.set_verbosity(_verbosity)

# Sampler settings for latents: no x0 clipping (scaled latents are not confined to [-1, 1])
# and timesteps that include the last training step ("trailing", Lin et al. 2023,
# arXiv:2305.08891), so few-step sampling starts from pure noise. "trailing" ignores
# steps_offset; it is 1 because StableDiffusionPipeline rewrites any other value with a
# deprecation warning.
_TRAILING = {"timestep_spacing": "trailing", "steps_offset": 1}
SOLVERS = {
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False, **_TRAILING}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2, **_TRAILING}),
}


def make_scheduler(solver: str, config):
    """A `solver` scheduler ('ddim' or 'dpm++') with the training noise schedule in `config`."""
    cls, settings = SOLVERS[solver]
    return cls.from_config(config, **settings)


class _Ours:
    """What ldm-vae's commands read of either pipeline."""

    def use_solver(self, solver: str) -> None:
        """Switch to 'ddim' or 'dpm++' (same noise schedule and prediction type)."""
        self.scheduler = make_scheduler(solver, self.scheduler.config)


class ClassConditionalPipeline(_Ours, DiTPipeline):
    """Stock DiTPipeline whose `num_classes` is the number of entries of `id2label` (the
    dataset's class names)."""

    def __init__(self, transformer, vae, scheduler, id2label: dict | None = None):
        super().__init__(transformer, vae, scheduler, id2label)
        self.id2label = {int(k): v for k, v in (id2label or {}).items()}

    @property
    def num_classes(self) -> int:
        return len(self.id2label)

    @property
    def denoiser(self):
        return self.transformer

    @property
    def autoencoder(self):
        return self.vae

    def __call__(self, class_labels=None, batch_size: int | None = None, guidance_scale: float = 3.0, **kwargs):
        """DiTPipeline's call; `batch_size` is the number of labels (accepted for one calling
        convention with the unconditional pipeline), `output_type` "pt" gives [0, 1] NCHW."""
        if class_labels is None:
            raise ValueError(f"this pipeline is class-conditional: pass class_labels (0..{self.num_classes - 1})")
        labels = torch.as_tensor(class_labels).long().reshape(-1)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"class_labels must be in 0..{self.num_classes - 1}, got {labels.tolist()}")
        return super().__call__(labels.tolist(), guidance_scale=guidance_scale, **kwargs)


class TextToImagePipeline(_Ours, StableDiffusionPipeline):
    """Stock StableDiffusionPipeline (build it with safety_checker=None, feature_extractor=None,
    requires_safety_checker=False); `class_names`, where the model trained on templates over
    them, turn `class_labels` into their prompts ("a photo of a {class}")."""

    class_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names or [])

    @property
    def denoiser(self):
        return self.unet

    @property
    def autoencoder(self):
        return self.vae

    def __call__(self, class_labels=None, prompt=None, batch_size: int | None = None, guidance_scale: float = 3.0,
                 **kwargs):
        """StableDiffusionPipeline's call on `prompt` (a string or one per image), or on the
        prompts of `class_labels`; `batch_size` is their number."""
        if class_labels is not None:
            labels = torch.as_tensor(class_labels).long().reshape(-1).tolist()
            if not self.num_classes or min(labels) < 0 or max(labels) >= self.num_classes:
                raise ValueError(f"class_labels must be in 0..{self.num_classes - 1}, got {labels}" if self.num_classes
                                 else "this model was trained on captions, not classes: pass prompt")
            prompt = [class_prompt(self.class_names[c]) for c in labels]
        if prompt is None:
            raise ValueError("this pipeline is text-conditional: pass prompt (or class_labels)")
        return super().__call__(prompt=prompt, guidance_scale=guidance_scale, **kwargs)


class UnconditionalPipeline(_Ours, LDMPipeline):
    """Stock LDMPipeline with ldm-vae's calling convention."""

    num_classes = 0

    @property
    def denoiser(self):
        return self.unet

    @property
    def autoencoder(self):
        return self.vqvae

    def __call__(self, class_labels=None, batch_size: int = 1, guidance_scale: float | None = None,
                 output_type: str = "pil", **kwargs):
        """LDMPipeline's call (`guidance_scale` has no use without classes); `output_type`
        "pt" gives [0, 1] NCHW tensors (LDMPipeline itself returns numpy or PIL)."""
        if class_labels is not None:
            raise ValueError("this pipeline is unconditional: pass batch_size, not class_labels")
        return_dict = kwargs.pop("return_dict", True)
        images = super().__call__(batch_size=batch_size, output_type="np" if output_type == "pt" else output_type,
                                  return_dict=False, **kwargs)[0]
        if output_type == "pt":
            images = torch.from_numpy(images).permute(0, 3, 1, 2)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
