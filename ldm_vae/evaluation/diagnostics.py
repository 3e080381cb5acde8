"""What each kind of autoencoder is checked for besides its reconstructions.

KL: KL per latent channel, active units (the posterior-collapse check of Burda et al. 2016),
posterior std ranges, ELBO / IWAE bounds, interpolations and prior samples. VQ: codebook
usage and perplexity, and the usage histogram. DC: nothing beyond what every model gets (its
latent is deterministic and unregularised). `diagnostics_for(vae)` picks the kind; the
evaluation loop (report.py) calls the same methods for each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderDC, AutoencoderKL, VQModel
from torch.utils.data import DataLoader, Subset

from ..autoencoder.models import code_indices
from ..autoencoder.quantize import code_perplexity, code_stats
from ..files import save_image, save_usage_histogram
from .metrics import bits_per_dim, likelihood_bounds

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016 (arXiv:1509.00519), sec. 5.2


_REDUCE = {"sum": torch.add, "min": torch.minimum, "max": torch.maximum}


@dataclass
class Sums:
    """float64 running sums (so 10 000s of images do not lose precision) and extremes; the
    partial sums of batches measured apart (by other processes) fold in with `merge`."""

    total: dict = field(default_factory=dict)
    how: dict = field(default_factory=dict)  # key -> "sum", "min" or "max"

    def add(self, key: str, value: torch.Tensor, how: str = "sum") -> None:
        value = value.detach().double().cpu()
        self.total[key] = _REDUCE[how](self.total[key], value) if key in self.total else value.clone()
        self.how[key] = how

    def merge(self, other: Sums) -> None:
        for key, value in other.total.items():
            self.add(key, value, other.how[key])


class VQDiagnostics:
    """Codebook usage of `VQModel.encode(x).latents` (what `decode` quantizes)."""

    def __init__(self, vae: VQModel):
        self.vae = vae

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents for the statistics, the decoder's input)."""
        latents = self.vae.encode(x).latents
        return latents, latents

    def observe(self, latents: torch.Tensor, sums: Sums) -> None:
        sums.add("code_hits", torch.bincount(code_indices(self.vae, latents).flatten(),
                                             minlength=self.vae.config.num_vq_embeddings))

    def finish(self, n: int, totals: dict, dataset, out_dir: Path, generator: torch.Generator, opts) -> dict:
        hits = totals["code_hits"].long()  # counts, exact in float64 below 2**53
        save_usage_histogram(hits, code_perplexity(hits).item(), out_dir / "codebook_usage.png",
                             f"codebook hits on {n} images")
        return code_stats(hits)


class KLDiagnostics:
    """Posterior statistics of an `AutoencoderKL` (latents: posterior samples, as the
    scaling factor is measured; reconstructions: from the posterior mean)."""

    def __init__(self, vae: AutoencoderKL):
        self.vae, self.posterior = vae, None

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        self.posterior = self.vae.encode(x).latent_dist
        return self.posterior.sample(generator=generator), self.posterior.mean

    def observe(self, latents: torch.Tensor, sums: Sums) -> None:
        mean, logvar = self.posterior.mean.double(), self.posterior.logvar.double()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar)  # [B, C, H, W]
        sums.add("kl_channel", kl.sum(dim=(2, 3)).sum(0))  # nats per channel, summed over positions
        # activity of each latent unit (channel, position): the variance over images of E[z|x]
        sums.add("mu_sum", mean.sum(0))
        sums.add("mu_sq", mean.pow(2).sum(0))
        std = (0.5 * logvar).exp()
        sums.add("std_sum", std.sum(dim=(0, 2, 3)))
        sums.add("std_count", torch.tensor(float(std[:, 0].numel())))
        sums.add("std_min", std.amin(dim=(0, 2, 3)), "min")
        sums.add("std_max", std.amax(dim=(0, 2, 3)), "max")

    @staticmethod
    def summary(n: int, t: dict) -> dict:
        """KL per channel, active units and posterior std ranges over the `n` images observed
        (t: the totals of `observe`'s sums)."""
        mu_var = (t["mu_sq"] / n - (t["mu_sum"] / n).pow(2)).clamp_min(0)  # [C, H, W]
        active_units = mu_var > ACTIVE_UNIT_THRESHOLD
        summary = {
            "kl_per_channel_nats": (t["kl_channel"] / n).tolist(),
            "kl_total_nats": (t["kl_channel"] / n).sum().item(),
            "active_units": int(active_units.sum()),
            "latent_units": active_units.numel(),
            "active_units_per_channel": active_units.flatten(1).double().mean(1).tolist(),
            "active_unit_threshold": ACTIVE_UNIT_THRESHOLD,
            "posterior_std_mean_per_channel": (t["std_sum"] / t["std_count"]).tolist(),
            "posterior_std_min_per_channel": t["std_min"].tolist(),
            "posterior_std_max_per_channel": t["std_max"].tolist(),
        }
        return summary

    def finish(self, n: int, totals: dict, dataset, out_dir: Path, generator: torch.Generator, opts) -> dict:
        return {**self.summary(n, totals), **kl_pictures_and_bounds(self.vae, dataset, out_dir, generator, opts.batch_size,
                                                            opts.bound_images, opts.iwae_k, opts.likelihood_sigma)}


class DCDiagnostics:
    """An `AutoencoderDC`: no posterior and no codebook to check; the per-channel mean and std
    of its latents are in every model's metrics (report.py)."""

    def __init__(self, vae: AutoencoderDC):
        self.vae = vae

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.vae.encode(x).latent
        return latent, latent

    def observe(self, latents: torch.Tensor, sums: Sums) -> None:
        pass

    def finish(self, n: int, totals: dict, dataset, out_dir: Path, generator: torch.Generator, opts) -> dict:
        return {}


def diagnostics_for(vae) -> VQDiagnostics | KLDiagnostics | DCDiagnostics:
    if isinstance(vae, AutoencoderDC):
        return DCDiagnostics(vae)
    return VQDiagnostics(vae) if isinstance(vae, VQModel) else KLDiagnostics(vae)


@torch.no_grad()
def kl_pictures_and_bounds(vae: AutoencoderKL, dataset, out_dir: Path, generator: torch.Generator, batch_size: int,
                           bound_images: int, iwae_k: int, sigma: float) -> dict:
    device = vae.device
    # interpolation: straight lines between posterior means of test image pairs
    pairs = min(8, len(dataset) // 2)
    a = torch.stack([dataset[2 * i]["pixel_values"] for i in range(pairs)]).to(device)
    b = torch.stack([dataset[2 * i + 1]["pixel_values"] for i in range(pairs)]).to(device)
    za, zb = vae.encode(a).latent_dist.mean, vae.encode(b).latent_dist.mean
    ts = torch.linspace(0, 1, 8, device=device)
    rows = [vae.decode(torch.lerp(za, zb, t)).sample.clamp(-1, 1) for t in ts]  # 8 x [pairs, ...]
    grid = torch.stack(rows, 1).flatten(0, 1)  # one row per pair, t across
    save_image(grid.cpu(), out_dir / "interpolation.png", nrow=len(ts))
    # prior samples: z ~ N(0, I), the prior of the ELBO below; and z ~ N(shift, 1/scale^2),
    # the isotropic Gaussian fitted to the aggregate posterior by the export's scaling (what a
    # diffusion model would produce if it learned only the latents' mean and variance)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    noise = torch.randn((64, *za.shape[1:]), generator=generator, device=device)
    save_image(vae.decode(noise).sample.clamp(-1, 1).cpu(), out_dir / "prior_samples.png", nrow=8)
    save_image(vae.decode(noise / scale + shift).sample.clamp(-1, 1).cpu(),
               out_dir / "aggregate_gaussian_samples.png", nrow=8)
    # ELBO and IWAE bounds on a subset
    n = min(bound_images, len(dataset))
    if n <= 0:  # each image costs iwae_k + 1 decodes; --bound-images 0 skips them
        skipped = f"not computed (--bound-images {bound_images})"
        return {"unavailable": {"elbo_bits_per_dim": skipped, f"iwae{iwae_k}_bits_per_dim": skipped}}
    elbo, iwae = [], []
    for batch in DataLoader(Subset(dataset, range(n)), batch_size=batch_size):
        e, w = likelihood_bounds(vae, batch["pixel_values"].to(device), iwae_k, sigma, generator)
        elbo.append(e.cpu())
        iwae.append(w.cpu())
    dims = dataset[0]["pixel_values"].numel()
    return {
        "likelihood": (f"decoder N(x; decode(z), {sigma}^2 I) on [-1, 1] pixels, prior N(0, I), "
                       f"{n} images; bits/dim use bin width 2/256; both are BOUNDS (ELBO <= IWAE <= log p(x)), "
                       f"reported as upper bounds on bits/dim"),
        "elbo_bits_per_dim": bits_per_dim(torch.cat(elbo), dims).mean().item(),
        f"iwae{iwae_k}_bits_per_dim": bits_per_dim(torch.cat(iwae), dims).mean().item(),
    }
