"""Stage 4, latent diffusion: the latent cache, the UNet and noise schedule, the trainer,
sampling, the pipeline class and its export."""
