"""LatentDiffusionPipeline: class-conditional latent diffusion with classifier-free guidance.

This file imports only torch and diffusers: `ldm-vae export-pipeline` copies it into the
pipeline folder, so stock diffusers loads the folder without ldm-vae installed:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("pipelines/fashion", trust_remote_code=True)
    images = pipe(class_labels=[3] * 8, guidance_scale=3.0, num_inference_steps=20,
                  generator=torch.Generator().manual_seed(0)).images

Components: `unet` (UNet2DModel), `vae` (AutoencoderKL or VQModel) and `scheduler`. The
UNet works on scaled latents `(z - shift_factor) * scaling_factor`; decoding undoes that
once, with the factors in the autoencoder's own config (a VQModel has no shift_factor).
A class-conditional UNet has `num_class_embeds = num_classes + 1`: the last class is the
"null" label the model was trained with for classifier-free guidance (Ho & Salimans 2022,
arXiv:2207.12598).

`LatentDiTPipeline` is diffusers' stock `DiTPipeline` with the same interface for ldm-vae's
own commands (`num_classes`, `use_solver`, `batch_size`); a DiT run exports as a plain
`DiTPipeline` folder, which needs no file of ours.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    ImagePipelineOutput,
)
from diffusers.utils.torch_utils import randn_tensor

# Sampler settings for latents: no x0 clipping (scaled latents are not confined to [-1, 1])
# and timesteps that include the last training step ("trailing", Lin et al. 2023,
# arXiv:2305.08891), so few-step sampling starts from pure noise.
SOLVERS = {
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False, "timestep_spacing": "trailing"}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                            "timestep_spacing": "trailing"}),
}


def make_scheduler(solver: str, config):
    """A `solver` scheduler ('ddim' or 'dpm++') with the training noise schedule in `config`."""
    cls, settings = SOLVERS[solver]
    return cls.from_config(config, **settings)


class LatentDiffusionPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet, vae, scheduler):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        """0 for an unconditional UNet; the null label is `num_classes`."""
        n = self.unet.config.num_class_embeds
        return n - 1 if n else 0

    def use_solver(self, solver: str) -> None:
        """Switch to 'ddim' or 'dpm++' (same noise schedule and prediction type)."""
        self.scheduler = make_scheduler(solver, self.scheduler.config)

    def predict(self, latents: torch.Tensor, t, class_labels: Optional[torch.Tensor], guidance_scale: float):
        """The model output; with class labels and guidance_scale != 1, the guided
        uncond + s * (cond - uncond), from one batched pass over [cond; uncond]."""
        if class_labels is None:
            return self.unet(latents, t).sample
        if guidance_scale == 1.0:
            return self.unet(latents, t, class_labels=class_labels).sample
        null = torch.full_like(class_labels, self.num_classes)
        cond, uncond = self.unet(torch.cat([latents, latents]), t,
                                 class_labels=torch.cat([class_labels, null])).sample.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]: the scaling is undone here, once."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents / self.vae.config.scaling_factor + shift
        return self.vae.decode(z.to(self.vae.dtype)).sample.clamp(-1, 1)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Optional[Union[int, list[int], torch.Tensor]] = None,
        batch_size: Optional[int] = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        generator: Optional[torch.Generator] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate images. `class_labels` (int or list, one per image) for a class-conditional
        UNet; `batch_size` images for an unconditional one. `output_type`: "pil", "np"
        (float [0, 1], NHWC) or "pt" (float [0, 1], NCHW)."""
        device = self._execution_device
        labels = None
        if self.num_classes:
            if class_labels is None:
                raise ValueError(f"this pipeline is class-conditional: pass class_labels (0..{self.num_classes - 1})")
            labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"class_labels must be in 0..{self.num_classes - 1}, got {labels.tolist()}")
            batch_size = len(labels)
        elif class_labels is not None:
            raise ValueError("this pipeline is unconditional: pass batch_size, not class_labels")
        batch_size = batch_size or 1
        cfg = self.unet.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(latents, t)
            output = self.predict(model_input, t, labels, guidance_scale)
            latents = self.scheduler.step(output, t, latents, generator=generator).prev_sample
        images = (self.decode_latents(latents).float() + 1) / 2
        if output_type == "pt":
            result = images
        else:
            result = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=result) if return_dict else (result,)


class LatentDiTPipeline(DiTPipeline):
    """Stock DiTPipeline (null label 1000, guidance where guidance_scale > 1, decoding
    `latents / scaling_factor`: the exported autoencoder has its shift folded in) with
    `num_classes` = the number of entries of `id2label` (the dataset's class names)."""

    def __init__(self, transformer, vae, scheduler, id2label: dict | None = None):
        super().__init__(transformer, vae, scheduler, id2label)
        self.id2label = {int(k): v for k, v in (id2label or {}).items()}

    @property
    def num_classes(self) -> int:
        return len(self.id2label)

    use_solver = LatentDiffusionPipeline.use_solver

    def __call__(self, class_labels=None, batch_size: int | None = None, guidance_scale: float = 3.0, **kwargs):
        """DiTPipeline's call with LatentDiffusionPipeline's arguments (`batch_size` is the
        number of labels; `output_type` "pt" gives [0, 1] NCHW tensors)."""
        if class_labels is None:
            raise ValueError(f"this pipeline is class-conditional: pass class_labels (0..{self.num_classes - 1})")
        labels = torch.as_tensor(class_labels).long().reshape(-1)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"class_labels must be in 0..{self.num_classes - 1}, got {labels.tolist()}")
        return super().__call__(labels.tolist(), guidance_scale=guidance_scale, **kwargs)

