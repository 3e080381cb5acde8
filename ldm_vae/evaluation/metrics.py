"""Reconstruction metrics and likelihood bounds, and the conventions every report states.

Conventions:
- PSNR: per image on [0, 1] pixels with data_range = 1, MSE floored at 1e-10 (so an exact
  reconstruction scores 100 dB, not inf), then averaged over images.
- SSIM: torchmetrics (>= 1.5), Gaussian window 11 / sigma 1.5, data_range = 1, borders
  reflection-padded and included, averaged over images.
- LPIPS v0.1 (ldm_vae/autoencoder/perceptual.py), VGG and AlexNet backbones, inputs in [-1, 1].
- rFID: torchmetrics `FrechetInceptionDistance`, 2048 pool features of torch-fidelity's
  FID Inception, fed uint8 pixels rounded from [0, 1], float64 statistics, images resized
  to 299 x 299 with TensorFlow-1.x-style bilinear interpolation (antialias off, as
  torch-fidelity and the LDM paper's numbers).
- Domain Fréchet distance (`--fd-features`): the same statistics on a domain extractor's
  features (`ldm-vae train-fd-features`), reported under the extractor's own name (e.g.
  `fd_fashion_mnist`). `frechet_protocol` names each network's weights by sha256.
- Every Fréchet distance has `ci95`, the basic bootstrap interval over resamples of both
  image sets (with replacement); the real images' features are cached per (images, network)
  and reused only after the images' uint8 sha256 matches (`frechet_reference`).
"""

from __future__ import annotations

import math
import platform
import time

import torch
from diffusers import AutoencoderKL
from torchmetrics.functional.image import structural_similarity_index_measure

PSNR_MSE_FLOOR = 1e-10  # caps PSNR at 100 dB for exact reconstructions


def psnr(x01: torch.Tensor, r01: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [0, 1] images (data_range 1), MSE floored at 1e-10."""
    mse = (x01.double() - r01.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(PSNR_MSE_FLOOR))


def ssim(x01: torch.Tensor, r01: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of [0, 1] images (data_range 1)."""
    return structural_similarity_index_measure(r01.float(), x01.float(), data_range=1.0, reduction="none")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done (for throughput numbers)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(x; mean, sigma^2 I) summed per image."""
    d = x[0].numel()
    return (-0.5 * ((x - mean) / sigma).pow(2).flatten(1).sum(1) - d * (math.log(sigma) + 0.5 * math.log(2 * math.pi)))


@torch.no_grad()
def likelihood_bounds(vae: AutoencoderKL, x: torch.Tensor, k: int, sigma: float, generator: torch.Generator):
    """Per image (ELBO, IWAE_k) in nats, for the decoder likelihood N(x; decode(z), sigma^2 I)
    on [-1, 1] pixels, the prior N(0, I) on the (unscaled) latents and the encoder's posterior.

    IWAE (Burda et al. 2016, arXiv:1509.00519, eq. 8): log (1/k) sum_i p(x, z_i) / q(z_i | x),
    a tighter lower bound on log p(x) than the ELBO for k > 1. Both are lower bounds.
    """
    post = vae.encode(x).latent_dist
    mean, std, logvar = post.mean.double(), post.std.double(), post.logvar.double()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    log_w, rec = [], []
    for _ in range(k):
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float64)
        z = mean + std * eps
        log_px = gaussian_log_likelihood(x.double(), vae.decode(z.float()).sample.double(), sigma)
        log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        log_qz = (-0.5 * eps.pow(2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        log_w.append(log_px + log_pz - log_qz)
        rec.append(log_px)
    elbo = torch.stack(rec).mean(0) - kl
    iwae = torch.logsumexp(torch.stack(log_w), 0) - math.log(k)
    return elbo, iwae


def bits_per_dim(log_likelihood: torch.Tensor, dims: int) -> torch.Tensor:
    """-log p(x) in bits per dimension for 8-bit data scaled to [-1, 1]: a density on [-1, 1]
    times the bin width 2/256 approximates each pixel value's probability."""
    return -(log_likelihood + dims * math.log(2 / 256)) / (dims * math.log(2))
