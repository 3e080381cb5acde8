"""What an autoencoder's latent space offers a diffusion model: its power spectrum and its
scale equivariance (the measures of `ldm-vae diffusability`, ldm_vae/diffusability.py),
and the report table and model-card section of that command.

Reconstruction quality predicts generation quality poorly (Skorokhodov et al. 2025,
"Improving the Diffusability of Autoencoders", arXiv:2502.14831; EQ-VAE, arXiv:2502.09509).
On the same images for every model, this measures:

- **Latent spectrum**: the radially averaged power spectrum of each channel of the scaled
  latents `(z - shift) * scale` (z: posterior samples for KL, what the LDM trains on;
  `encode(x).latents` for VQ, `encode(x).latent` for DC), next to the spectrum of the images downsampled to the latent
  resolution (box filter), and the share of the non-DC power above half the Nyquist
  frequency (radius > 1/4 cycle per latent pixel). Skorokhodov et al. found that latents
  carry far more high-frequency power than images, and that diffusion models spend their
  capacity there.
- **Scale equivariance** (Skorokhodov et al. 2025; EQ-VAE, arXiv:2502.09509), with `down` the
  2x2 average pooling and z the posterior mean (the decoder's input at inference):
  decoder side, PSNR of `D(down(z))` against `down(x)` (an equivariant decoder turns a
  half-size latent into the half-size image); encoder side, the relative error
  `||E(down(x)) - down(E(x))||^2 / ||down(E(x)) - mean||^2` of scaled latents (0: the
  encoder commutes with downsampling).
"""


from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC, VQModel
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..autoencoder.models import deterministic_latent
from ..files import put_card_section, read_card, save_line_plot, write_card
from .metrics import psnr

HIGH_FREQUENCY = 0.25  # cycles per latent pixel: half the Nyquist frequency


# ==============================================================================================
# Spectra
# ==============================================================================================


def radial_power(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(power [C, K], radius [K]) of x [N, C, H, W]: |FFT2|^2 of each image and channel,
    averaged over images and over the frequencies of each radial bin; radius in cycles per
    pixel (0 .. 0.5 * sqrt(2)), bins of width 1/max(H, W). The mean of each (image, channel)
    is removed first, so the DC bin holds no power."""
    x = x.double()
    x = x - x.mean(dim=(2, 3), keepdim=True)
    n, c, h, w = x.shape
    power = torch.fft.fft2(x, norm="ortho").abs().pow(2).mean(0)  # [C, H, W]
    r = _radius(h, w, x.device)
    bins = (r * max(h, w)).round().long().flatten()  # [H*W]
    k = int(bins.max()) + 1
    sums = torch.zeros(c, k, dtype=torch.float64, device=x.device).index_add_(1, bins, power.flatten(1))
    counts = torch.bincount(bins, minlength=k).clamp_min(1)
    return sums / counts, torch.arange(k, dtype=torch.float64) / max(h, w)


def high_frequency_share(x: torch.Tensor) -> torch.Tensor:
    """[C]: the share of each channel's (non-DC) power at radius > 1/4 cycle per pixel."""
    x = x.double()
    x = x - x.mean(dim=(2, 3), keepdim=True)
    power = torch.fft.fft2(x, norm="ortho").abs().pow(2).sum(0)  # [C, H, W]
    high = _radius(*x.shape[2:], x.device) > HIGH_FREQUENCY
    return power[:, high].sum(1) / power.flatten(1).sum(1).clamp_min(1e-300)


def _radius(h: int, w: int, device) -> torch.Tensor:
    fy = torch.fft.fftfreq(h, device=device, dtype=torch.float64)
    fx = torch.fft.fftfreq(w, device=device, dtype=torch.float64)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Box-filter downsampling by `factor` (average of each factor x factor block)."""
    return F.avg_pool2d(x, factor) if factor > 1 else x


# ==============================================================================================
# One autoencoder: latents, spectrum, equivariance
# ==============================================================================================


class LatentView:
    """The scaled latents an LDM trains on, and the posterior mean a decoder sees at inference."""

    def __init__(self, vae):
        self.vae = vae
        self.scale = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0
        self.deterministic = isinstance(vae, (VQModel, AutoencoderDC))  # no posterior to sample

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled latents as the LDM trains on them, unscaled decoder input)."""
        if self.deterministic:
            z = deterministic_latent(self.vae, x)
            return (z - self.shift) * self.scale, z
        posterior = self.vae.encode(x).latent_dist
        return (posterior.sample(generator=generator) - self.shift) * self.scale, posterior.mean

    def scaled_mean(self, x: torch.Tensor) -> torch.Tensor:
        return (deterministic_latent(self.vae, x) - self.shift) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


@torch.no_grad()
def latent_measures(vae, dataset, num_images: int, batch_size: int, device: torch.device, seed: int = 0) -> dict:
    """Spectra, high-frequency shares and scale-equivariance errors of `vae` on the first
    `num_images` images of `dataset` (the same images for every model)."""
    vae = vae.to(device).eval()
    view = LatentView(vae)
    n = min(num_images, len(dataset))
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size)
    generator = torch.Generator(device=device).manual_seed(seed)
    widths = getattr(vae.config, "block_out_channels", None) or vae.config.encoder_block_out_channels  # DC: per side
    factor = 2 ** (len(widths) - 1)
    latents, images = [], []
    dec_psnr, enc_err, enc_var = 0.0, 0.0, 0.0
    for batch in tqdm(loader, desc="latent spectrum and equivariance", leave=False):
        x = batch["pixel_values"].to(device)
        scaled, decoder_input = view.encode(x, generator)
        latents.append(scaled.float().cpu())
        images.append(downsample(x, factor).float().cpu())  # the images at the latent resolution
        if min(decoder_input.shape[-2:]) >= 2:
            # decoder side: D(down(z)) against down(x)
            small = view.decode(downsample(decoder_input, 2)).float().clamp(-1, 1)
            dec_psnr += psnr((downsample(x, 2) + 1) / 2, (small + 1) / 2).sum().item()
            # encoder side: E(down(x)) against down(E(x)), scaled latents
            target = downsample(view.scaled_mean(x), 2).double()
            got = view.scaled_mean(downsample(x, 2)).double()
            enc_err += (got - target).pow(2).sum().item()
            enc_var += (target - target.mean()).pow(2).sum().item()
    z, img = torch.cat(latents), torch.cat(images)
    z_power, radius = radial_power(z)
    img_power, _ = radial_power(img)
    z_share, img_share = high_frequency_share(z), high_frequency_share(img)
    small = min(z.shape[-2:]) >= 2
    return {
        "num_images": n,
        "latent_shape": list(z.shape[1:]),
        "high_freq_share": z_share.mean().item(),
        "high_freq_share_per_channel": z_share.tolist(),
        "high_freq_share_images": img_share.mean().item(),
        "equivariance_decoder_psnr_db": dec_psnr / n if small else None,
        "equivariance_encoder_rel_error": enc_err / enc_var if small and enc_var > 0 else None,
        "spectrum": {"radius_cycles_per_pixel": radius.tolist(), "latent_per_channel": z_power.tolist(),
                     "images_mean_rgb": img_power.mean(0).tolist()},
    }


def save_spectrum_plot(results: list[dict], path: Path) -> None:
    """Each model's channel-averaged latent spectrum and the images' spectrum, normalised to
    unit non-DC power (so shapes, not scales, are compared), on a log scale."""
    series = {}
    for r in results:
        s = r["diffusability"]["spectrum"]
        radius = s["radius_cycles_per_pixel"][1:]
        latent = torch.tensor(s["latent_per_channel"]).mean(0)[1:]
        series[f"{r['label']} latents"] = (radius, (latent / latent.sum()).tolist())
    s = results[0]["diffusability"]["spectrum"]
    images = torch.tensor(s["images_mean_rgb"])[1:]
    series["images at the latent resolution"] = (s["radius_cycles_per_pixel"][1:], (images / images.sum()).tolist())
    save_line_plot(series, path, title="radially averaged power spectrum, normalised to sum 1 over the non-DC bins",
                   xlabel="frequency, cycles per latent pixel (0.25 = half Nyquist)", log_y=True)


# ==============================================================================================
# Report table and model card
# ==============================================================================================


TABLE = [("psnr_db", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"),
         ("high_freq_share", "latent HF share", "{:.3f}"), ("equivariance_decoder_psnr_db", "D(down z) PSNR dB",
                                                              "{:.2f}"),
         ("equivariance_encoder_rel_error", "E equivariance error", "{:.3f}")]


def _cell(value, fmt: str, ci: list | None = None) -> str:
    if value is None:
        return "–"
    return fmt.format(value) + (f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else "")


def markdown_table(results: list[dict]) -> str:
    fd_keys = sorted({k for r in results for k in r["reconstruction"] if k.startswith("fd_")})
    cols = list(TABLE)
    cols += [(k, f"{k} recon", "{:.4f}") for k in fd_keys]
    gen_cols = [(f"{k}_samples", f"{k} samples", "{:.4f}") for k in fd_keys]
    gen_cols += [(f"{k}_ratio_to_reconstructions", "samples / recon", "{:.1f}x") for k in fd_keys]
    gen_cols += [("class_accuracy", "class accuracy", "{:.1%}"), ("fid_samples", "FID samples", "{:.2f}")]
    has_gen = any("generation" in r for r in results)
    names = [c[1] for c in cols] + ([c[1] for c in gen_cols] if has_gen else [])
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in results:
        merged = {**r["reconstruction"], **r["diffusability"]}
        cells = [_cell(merged.get(k), f, r["reconstruction"].get("ci95", {}).get(k)) for k, _, f in cols]
        if has_gen:
            g = r.get("generation", {})
            cells += ["n/a" if k in g.get("unavailable", {}) else _cell(g.get(k), f, g.get("ci95", {}).get(k))
                      for k, _, f in gen_cols]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    notes = sorted({f"{k}: {v}" for r in results for k, v in r.get("generation", {}).get("unavailable", {}).items()})
    return "\n".join(lines + (["", "n/a = unavailable:"] + [f"- {n}" for n in notes] if notes else []))


CARD_BEGIN, CARD_END = "<!-- ldm-vae diffusability: begin -->", "<!-- ldm-vae diffusability: end -->"


def update_card_section(model_dir: Path, result: dict, report: dict) -> None:
    """A "Diffusability" section in the export's README.md (replaced on a new measurement)."""
    card = model_dir / "README.md"
    meta, body = read_card(card)
    recipe = report["proxy_recipe"]
    proxy = (f" The proxy LDM: the bundled `{recipe['config']}` recipe, {recipe['steps']} steps x batch "
             f"{recipe['batch_size']}, {recipe['samples_per_class']} samples per class." if recipe else "")
    section = (f"{CARD_BEGIN}\n## Diffusability\n\n`ldm-vae diffusability` on {report['dataset']}, "
               f"{report['split']} split, {report['num_images']} images.{proxy}\n\n{markdown_table([result])}\n"
               f"{CARD_END}")
    write_card(card, meta, put_card_section(body, CARD_BEGIN, CARD_END, section))
