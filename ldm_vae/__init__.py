"""ldm-vae: train latent-diffusion autoencoders with Accelerate and export them to diffusers."""

__version__ = "0.1.0"
