"""Reconstruction metrics and likelihood bounds, and the conventions every report states.

Conventions:
- PSNR: per image on [0, 1] pixels with data_range = 1, MSE floored at 1e-10 (so an exact
  reconstruction scores 100 dB, not inf), then averaged over images.
- SSIM: torchmetrics (>= 1.5), Gaussian window 11 / sigma 1.5, data_range = 1, borders
  reflection-padded and included, averaged over images.
- Colour cast (`color_cast_255_r/g/b`): per RGB channel, the mean of (reconstruction - image)
  over all pixels and images on [0, 1] pixels, times 255 (units of 1/255, one 8-bit level);
  signed, positive = the reconstruction is brighter in that channel. `color_cast_max_255` is
  the largest absolute value of the three. Pooled over images, opposite casts cancel (one
  image too green and one not green enough average to none), so `color_cast_image_255` is
  the mean over images of each image's largest absolute channel cast: 0 only if no image has
  a cast.
- Border error ratio (`border_error_ratio`): mean |reconstruction - image| (averaged over
  channels) in a band along all four borders over that in the interior (every other pixel).
  The band is min(8, H // 4) rows at the top and bottom and min(8, W // 4) columns at the
  sides: below 32 px the clamp keeps at least half of each side as interior. Pooled: error
  sums and pixel counts are summed over all images first (a ratio of means, not a mean of
  per-image ratios). Unavailable, with the reason, when the interior error is 0 (or the
  images are under 4x4, with no band), never inf.
- Frame error ratio (`frame_error_ratio`): the same with the outermost ring of pixels (one
  pixel wide) in place of the band, over the same interior. A frame one or two pixels wide
  shows here at its full strength; the band's ratio averages it with seven inner rings.
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


# Artefacts: colour cast and border frame (issue 20)
BORDER_BAND = 8  # pixels along each border, clamped to a quarter of the side


def color_cast_255(x01: torch.Tensor, r01: torch.Tensor) -> torch.Tensor:
    """Per image and channel, mean of (r01 - x01) over pixels in units of 1/255: [B, C], float64."""
    return 255 * (r01.double() - x01.double()).flatten(2).mean(2)


def border_mask(height: int, width: int, band: int = BORDER_BAND) -> torch.Tensor:
    """[H, W] bool, True within min(band, H // 4) rows of the top and bottom and min(band, W // 4)
    columns of the left and right: the clamp keeps at least half of each side as interior."""
    bh, bw = min(band, height // 4), min(band, width // 4)
    mask = torch.ones(height, width, dtype=torch.bool)
    mask[bh:height - bh, bw:width - bw] = False
    return mask


def border_error_sums(x01: torch.Tensor, r01: torch.Tensor, band: int = BORDER_BAND) -> torch.Tensor:
    """float64 [band |error| sum, band pixels, interior |error| sum, interior pixels, frame |error|
    sum, frame pixels] of a batch, |error| averaged over channels; the frame is the band's
    outermost ring of pixels. Sums (not means) so that batches and images pool exactly."""
    err = (r01.double() - x01.double()).abs().mean(1)  # (B, H, W)
    h, w = err.shape[-2:]
    mask, frame = border_mask(h, w, band).to(err.device), border_mask(h, w, 1).to(err.device)
    n_band, n_frame = mask.sum().double() * len(err), frame.sum().double() * len(err)
    return torch.stack([err[:, mask].sum(), n_band, err[:, ~mask].sum(), err[0].numel() * len(err) - n_band,
                        err[:, frame].sum(), n_frame])


def border_error_ratio(sums: torch.Tensor, region: str = "border") -> tuple[float | None, str | None]:
    """(mean |error| in the region / interior mean |error|, None) from summed `border_error_sums`,
    region "border" (the border band) or "frame" (its outermost ring of pixels): a ratio of pooled
    means over all images' pixels, not a mean of per-image ratios; (None, reason) when it is
    undefined (an exact interior would give inf or 0/0, never reported as a number)."""
    band, n_band, interior, n_interior, frame, n_frame = sums.tolist()
    error, n = {"border": (band, n_band), "frame": (frame, n_frame)}[region]
    if n == 0:  # the interior, at least half of each side, is never empty
        return None, "the images are under 4x4 pixels: a border band of a quarter of the side is empty"
    if interior == 0:
        return None, f"the interior is reconstructed exactly (mean error 0): the {region} error ratio is undefined"
    return (error / n) / (interior / n_interior), None


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
