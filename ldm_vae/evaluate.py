"""Reconstruction metrics of an exported autoencoder, computed on what stock diffusers gives.

PSNR and SSIM are per image on [0, 1] pixels (data_range=1), then averaged. For a VQ model
also codebook usage (share of codes picked at least once over the evaluated images) and
the perplexity of the code histogram.
"""

from __future__ import annotations

import torch
from diffusers import VQModel
from torch.utils.data import DataLoader, Subset
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm.auto import tqdm

from .models import code_indices, reconstruct


@torch.no_grad()
def reconstruction_metrics(vae, dataset, num_images: int | None = None, batch_size: int = 250,
                           device: str | torch.device = "cpu") -> tuple[dict, torch.Tensor]:
    """(metrics, a grid tensor of the first 16 originals over their reconstructions)."""
    n = len(dataset) if num_images is None else min(num_images, len(dataset))
    vae = vae.to(device).eval()
    is_vq = isinstance(vae, VQModel)
    hits = torch.zeros(vae.config.num_vq_embeddings if is_vq else 0, dtype=torch.long, device=device)
    psnr, ssim, grid = [], [], None
    for batch in tqdm(DataLoader(Subset(dataset, range(n)), batch_size=batch_size), desc="reconstructing"):
        x = batch["pixel_values"].to(device)
        if is_vq:
            latents = vae.encode(x).latents
            recon = vae.decode(latents).sample  # stock decode: VQModel's own lookup
            hits += torch.bincount(code_indices(vae, latents).flatten(), minlength=len(hits))
        else:
            recon = reconstruct(vae, x)
        recon = recon.float().clamp(-1, 1)
        x01, r01 = (x + 1) / 2, (recon + 1) / 2
        psnr.append(peak_signal_noise_ratio(r01, x01, data_range=1.0, reduction="none", dim=(1, 2, 3)))
        ssim.append(structural_similarity_index_measure(r01, x01, data_range=1.0, reduction="none"))
        if grid is None:
            grid = torch.cat([x[:16], recon[:16]]).cpu()
    metrics = {"num_images": n, "psnr_db": torch.cat(psnr).mean().item(), "ssim": torch.cat(ssim).mean().item()}
    if is_vq:
        p = hits[hits > 0].double() / hits.sum()
        metrics.update(codebook_size=len(hits), codes_used=int((hits > 0).sum()),
                       codebook_usage=(hits > 0).float().mean().item(),
                       codebook_perplexity=torch.exp(-(p * p.log()).sum()).item())
    return metrics, grid
