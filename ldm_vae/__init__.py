"""ldm-vae: train latent-diffusion autoencoders with Accelerate and export them to diffusers."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # imported on first use, so `ldm-vae --help` does not pay for torch and diffusers
    if name == "Tokenizer":
        from .autoencoder.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'ldm_vae' has no attribute {name!r}")
