"""`ldm-vae eval`: reconstruction metrics, pictures and VAE diagnostics of exported autoencoders.

Every model is loaded with STOCK diffusers (`AutoencoderKL` / `VQModel.from_pretrained`),
so the numbers are those of what users get. Real images and reconstructions go through
the identical pipeline (same dataset order, same [0, 1] conversion, same resize for
feature extractors). A metric that cannot be computed (missing weights, missing package)
is reported as unavailable with the reason, never as 0.

Conventions:
- PSNR: per image on [0, 1] pixels with data_range = 1, MSE floored at 1e-10 (so an exact
  reconstruction scores 100 dB, not inf), then averaged over images.
- SSIM: torchmetrics, Gaussian window 11 / sigma 1.5, data_range = 1, averaged over images.
- LPIPS v0.1 (ldm_vae/perceptual.py), VGG and AlexNet backbones, inputs in [-1, 1].
- rFID: torchmetrics `FrechetInceptionDistance`, 2048 pool features of torch-fidelity's
  FID Inception, float64 statistics, images resized to 299 x 299 with TensorFlow-1.x-style
  bilinear interpolation (antialias off, as torch-fidelity and the LDM paper's numbers).
- Domain Fréchet distance (`--fd-features`): the same statistics on a TorchScript
  extractor's features, reported under the extractor's own name (e.g. `fd_fashion_mnist`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from diffusers import AutoencoderKL, VQModel
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchmetrics.functional.image import structural_similarity_index_measure
from tqdm.auto import tqdm

from . import config as config_lib
from .data import build_dataset, save_image
from .errors import UserError
from .models import code_indices, load_autoencoder
from .perceptual import BACKBONE_FILES, LPIPSWeightsMissing, build_lpips
from .plots import save_heatmaps, save_usage_histogram
from .quantize import code_stats

PSNR_MSE_FLOOR = 1e-10  # caps PSNR at 100 dB for exact reconstructions
GRID_IMAGES = 16
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016 (arXiv:1509.00519), sec. 5.2


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


# --- Fréchet distances -----------------------------------------------------------------------

class _Features(nn.Module):
    """Adapts a TorchScript extractor (images in [-1, 1] at its resolution) to torchmetrics."""

    def __init__(self, module: nn.Module, resolution: int, num_features: int):
        super().__init__()
        self.module, self.resolution, self.num_features = module, resolution, num_features

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        x = x01 * 2 - 1
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.module(x).float()


def load_fd_features(path: str | Path) -> tuple[str, nn.Module]:
    """(metric name, module) of a TorchScript extractor written by `ldm-vae train-fd-features`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--fd-features {path} does not exist; train one with `ldm-vae train-fd-features`")
    extra = {"ldm_vae.json": ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as e:  # not a TorchScript archive
        raise UserError(f"--fd-features {path} is not a TorchScript file ({e.__class__.__name__}); "
                        f"train one with `ldm-vae train-fd-features`") from None
    try:
        meta = json.loads(extra["ldm_vae.json"])
        name, resolution, dim = meta["name"], int(meta["resolution"]), int(meta["num_features"])
    except (ValueError, KeyError):
        raise UserError(f"--fd-features {path} has no ldm_vae.json metadata (name, resolution, "
                        f"num_features); write it with `ldm-vae train-fd-features`") from None
    return f"fd_{name}", _Features(module.eval(), resolution, dim)


def build_fid(weights: str | None):
    """(torchmetrics FID metric, None) or (None, reason it is unavailable)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=2048, normalize=True, antialias=False,
                                        feature_extractor_weights_path=weights), None
    except ModuleNotFoundError as e:
        return None, (f"torch-fidelity is not installed ({e}); `pip install torch-fidelity` (it needs a working "
                      f"torchvision) to compute rFID")
    except Exception as e:  # the weight download failed (offline) or the file is unreadable
        where = weights or "the torch hub cache (weights pt_inception-2015-12-05-6726825d.pth)"
        return None, (f"FID Inception weights could not be loaded from {where}: {e.__class__.__name__}: {e}; "
                      f"pass --fid-weights PATH")


def frechet_metric(extractor: nn.Module):
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=extractor, normalize=True)


# --- one model -------------------------------------------------------------------------------

@dataclass
class _Sums:
    """float64 running sums (so 10 000s of images do not lose precision) and extremes."""

    n: int = 0
    total: dict = field(default_factory=dict)

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().double().cpu()
        self.total[key] = self.total[key] + value if key in self.total else value.clone()

    def extreme(self, key: str, value: torch.Tensor, fn) -> None:
        value = value.detach().double().cpu()
        self.total[key] = fn(self.total[key], value) if key in self.total else value.clone()


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


@dataclass
class EvalOptions:
    num_images: int | None = None
    batch_size: int = 100
    device: str = "cpu"
    lpips_weights: dict = field(default_factory=dict)  # net -> path or None (torch hub cache)
    fid_weights: str | None = None
    fd_features: str | None = None
    iwae_k: int = 16
    bound_images: int = 256
    likelihood_sigma: float = 0.1
    seed: int = 0


@dataclass
class Instruments:
    """The metric networks, built once and shared by every model evaluated."""

    lpips: dict  # net -> LPIPS module
    fid: object | None  # torchmetrics FID, or None
    fd: tuple | None  # (metric name, torchmetrics Fréchet metric on the domain extractor), or None
    unavailable: dict  # metric -> reason


def build_instruments(opts: EvalOptions) -> Instruments:
    lpips, unavailable_metrics = {}, {}
    for net in ("vgg", "alex"):
        try:
            lpips[net] = build_lpips(net, opts.lpips_weights.get(net))
        except LPIPSWeightsMissing:
            unavailable_metrics[f"lpips_{net}"] = (
                f"the pretrained {net} backbone weights ({BACKBONE_FILES[net][0]}) are not in the torch hub cache and "
                f"could not be downloaded; pass --lpips-{net}-weights PATH")
    fid, reason = build_fid(opts.fid_weights)
    if fid is None:
        unavailable_metrics["rfid"] = reason
    fd = None
    if opts.fd_features:
        name, extractor = load_fd_features(opts.fd_features)
        fd = (name, frechet_metric(extractor))
    return Instruments(lpips, fid, fd, unavailable_metrics)


def evaluate_model(vae, dataset, opts: EvalOptions, out_dir: Path, tools: Instruments, label: str):
    """(metrics, first originals, their reconstructions) of one model on `dataset`; writes its
    pictures into `out_dir`."""
    device = torch.device(opts.device)
    vae = vae.to(device).eval()
    is_vq = isinstance(vae, VQModel)
    n = len(dataset) if opts.num_images is None else min(opts.num_images, len(dataset))
    loader = DataLoader(Subset(dataset, range(n)), batch_size=opts.batch_size)
    generator = torch.Generator(device=device).manual_seed(opts.seed)

    lpips_nets = {net: model.to(device) for net, model in tools.lpips.items()}
    fid = tools.fid
    fd_name, fd = tools.fd or (None, None)
    for metric in (fid, fd):
        if metric is not None:
            metric.reset()
            metric.to(device)

    sums = _Sums()
    hits = torch.zeros(vae.config.num_vq_embeddings if is_vq else 0, dtype=torch.long, device=device)
    t_enc = t_dec = 0.0
    grid_x = grid_r = None
    for batch in tqdm(loader, desc=f"eval {label}", leave=False):
        x = batch["pixel_values"].to(device)
        t0 = _sync(device)
        if is_vq:
            latents = vae.encode(x).latents
        else:
            posterior = vae.encode(x).latent_dist
            latents = posterior.sample(generator=generator)
        t1 = _sync(device)
        recon = vae.decode(latents).sample if is_vq else vae.decode(posterior.mean).sample
        t2 = _sync(device)
        t_enc, t_dec = t_enc + t1 - t0, t_dec + t2 - t1
        recon = recon.float().clamp(-1, 1)
        x01, r01 = (x + 1) / 2, (recon + 1) / 2
        sums.n += len(x)
        sums.add("psnr", psnr(x01, r01).sum())
        sums.add("ssim", ssim(x01, r01).sum())
        for net, model in lpips_nets.items():
            sums.add(f"lpips_{net}", model(x, recon).sum())
        for metric in (fid, fd):
            if metric is not None:
                metric.update(x01, real=True)
                metric.update(r01, real=False)
        # latent statistics per channel (samples for KL, as the scaling factor is measured)
        lat = latents.double().transpose(0, 1).flatten(1)
        sums.add("lat_sum", lat.sum(1))
        sums.add("lat_sq", lat.pow(2).sum(1))
        sums.add("lat_count", torch.tensor(float(lat.shape[1])))
        if is_vq:
            hits += torch.bincount(code_indices(vae, latents).flatten(), minlength=len(hits))
        else:
            _add_kl_diagnostics(sums, posterior)
        if grid_x is None:
            grid_x, grid_r = x[:GRID_IMAGES].cpu(), recon[:GRID_IMAGES].cpu()

    m = {"num_images": n, "psnr_db": sums.total["psnr"].item() / n, "ssim": sums.total["ssim"].item() / n}
    for net in lpips_nets:
        m[f"lpips_{net}"] = sums.total[f"lpips_{net}"].item() / n
    if fid is not None:
        m["rfid"] = fid.compute().item()
    if fd is not None:
        m[fd_name] = fd.compute().item()
    count = sums.total["lat_count"]
    lat_mean = sums.total["lat_sum"] / count
    lat_std = (sums.total["lat_sq"] / count - lat_mean.pow(2)).clamp_min(0).sqrt()
    m["latent_channel_mean"] = lat_mean.tolist()
    m["latent_channel_std"] = lat_std.tolist()
    m["encode_images_per_s"] = n / t_enc
    m["decode_images_per_s"] = n / t_dec
    m["device"] = device_name(device)
    if is_vq:
        m.update(code_stats(hits))
        save_usage_histogram(hits, out_dir / "codebook_usage.png", f"codebook hits on {n} images")
    else:
        m.update(_kl_summary(sums, n))
        m.update(_kl_pictures_and_bounds(vae, dataset, opts, out_dir, generator))
    save_heatmaps(grid_x, grid_r, out_dir / "error_heatmap.png")
    save_image(torch.cat([grid_x, grid_r]), out_dir / "reconstructions.png", nrow=len(grid_x))
    m["unavailable"] = dict(tools.unavailable)
    return m, grid_x, grid_r


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _add_kl_diagnostics(sums: _Sums, posterior) -> None:
    mean, logvar = posterior.mean.double(), posterior.logvar.double()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar)  # [B, C, H, W]
    sums.add("kl_channel", kl.sum(dim=(2, 3)).sum(0))  # nats per channel, summed over positions
    # activity of each latent unit (channel, position): the variance over images of E[z|x]
    sums.add("mu_sum", mean.sum(0))
    sums.add("mu_sq", mean.pow(2).sum(0))
    std = (0.5 * logvar).exp()
    sums.add("std_sum", std.sum(dim=(0, 2, 3)))
    sums.add("std_count", torch.tensor(float(std[:, 0].numel())))
    sums.extreme("std_min", std.amin(dim=(0, 2, 3)), torch.minimum)
    sums.extreme("std_max", std.amax(dim=(0, 2, 3)), torch.maximum)


def _kl_summary(sums: _Sums, n: int) -> dict:
    t = sums.total
    mu_var = (t["mu_sq"] / n - (t["mu_sum"] / n).pow(2)).clamp_min(0)  # [C, H, W]
    active_units = mu_var > ACTIVE_UNIT_THRESHOLD
    return {
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


@torch.no_grad()
def _kl_pictures_and_bounds(vae: AutoencoderKL, dataset, opts: EvalOptions, out_dir: Path,
                            generator: torch.Generator) -> dict:
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
    # prior samples: z ~ N(0, I) mapped to the latent scale the autoencoder expects
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    shape = (64, *za.shape[1:])
    z = torch.randn(shape, generator=generator, device=device) / scale + shift
    save_image(vae.decode(z).sample.clamp(-1, 1).cpu(), out_dir / "prior_samples.png", nrow=8)
    # ELBO and IWAE bounds on a subset
    n = min(opts.bound_images, len(dataset))
    elbo, iwae = [], []
    for batch in DataLoader(Subset(dataset, range(n)), batch_size=opts.batch_size):
        e, w = likelihood_bounds(vae, batch["pixel_values"].to(device), opts.iwae_k, opts.likelihood_sigma,
                                 generator)
        elbo.append(e.cpu())
        iwae.append(w.cpu())
    dims = dataset[0]["pixel_values"].numel()
    return {
        "likelihood": (f"decoder N(x; decode(z), {opts.likelihood_sigma}^2 I) on [-1, 1] pixels, prior N(0, I), "
                       f"{n} images; bits/dim use bin width 2/256; both are BOUNDS (ELBO <= IWAE <= log p(x)), "
                       f"reported as upper bounds on bits/dim"),
        "elbo_bits_per_dim": bits_per_dim(torch.cat(elbo), dims).mean().item(),
        f"iwae{opts.iwae_k}_bits_per_dim": bits_per_dim(torch.cat(iwae), dims).mean().item(),
    }


# --- reports ---------------------------------------------------------------------------------

TABLE_METRICS = [("psnr_db", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("lpips_vgg", "LPIPS vgg", "{:.4f}"),
                 ("lpips_alex", "LPIPS alex", "{:.4f}"), ("rfid", "rFID", "{:.2f}"),
                 ("codebook_usage", "codebook usage", "{:.1%}"), ("codebook_perplexity", "code perplexity", "{:.0f}"),
                 ("active_units", "active units", "{}"), ("elbo_bits_per_dim", "ELBO bits/dim", "{:.3f}")]


def _table_columns(results: list[dict]) -> list[tuple]:
    cols = list(TABLE_METRICS)
    for r in results:  # domain Fréchet distances, under their own names
        cols += [(k, k, "{:.3f}") for k in r["metrics"] if k.startswith("fd_") and (k, k, "{:.3f}") not in cols]
    return cols


def markdown_table(results: list[dict]) -> str:
    cols = _table_columns(results)
    unav = "n/a"
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in results:
        m = r["metrics"]
        cells = []
        for key, _, fmt in cols:
            if m.get(key) is not None:
                cells.append(fmt.format(m[key]))
            else:
                cells.append(unav if key in m.get("unavailable", {}) else "–")
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    notes = sorted({f"{k}: {v}" for r in results for k, v in r["metrics"].get("unavailable", {}).items()})
    if notes:
        lines += ["", "n/a = unavailable:"] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def versions() -> dict:
    import accelerate
    import diffusers
    import torchmetrics

    from . import __version__

    return {"ldm_vae": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "torchmetrics": torchmetrics.__version__,
            "python": platform.python_version()}


def resolve_data(model_path: Path, source: str | None, data_path: str | None, data_name: str | None,
                 resolution: int | None) -> config_lib.DataConfig:
    """The export's own training data settings (training_config.yaml), overridden by the command line."""
    saved = model_path / "training_config.yaml"
    if source is None and not saved.is_file():
        raise UserError(f"{model_path} has no training_config.yaml; name the data with --data")
    raw = dataclasses.asdict(config_lib.load_config(saved).data if saved.is_file() else config_lib.DataConfig())
    if source is not None and source != raw["source"]:
        raw["path"] = raw["name"] = None  # the saved location belongs to the saved source
    raw.update({k: v for k, v in {"source": source, "path": data_path, "name": data_name,
                                  "resolution": resolution}.items() if v is not None})
    raw["max_images"] = None
    return config_lib.from_dict({"data": raw}, "ldm-vae eval options").data


def run_eval(models: list[str], out: str | Path, opts: EvalOptions, split: str = "test", source: str | None = None,
             data_path: str | None = None, data_name: str | None = None, resolution: int | None = None,
             update_card: bool = False, overwrite: bool = False) -> dict:
    """Evaluate `models` on the same images; write metrics.json, pictures and (several models) comparison.md."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    paths = [Path(p) for p in models]
    loaded = [load_autoencoder(p) for p in paths]  # fail on a bad folder before any work
    data_cfgs = [resolve_data(p, source, data_path, data_name, resolution) for p in paths]
    first = data_cfgs[0]
    if any((d.source, d.path, d.name, d.resolution) != (first.source, first.path, first.name, first.resolution)
           for d in data_cfgs[1:]):
        raise UserError("the models were trained on different data or resolutions; pass --data (and --resolution) "
                        "to evaluate them on the same images")
    dataset = build_dataset(first, split, train=False)
    tools = build_instruments(opts)
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    labels = _labels(paths)
    results, rows = [], []
    for path, label, vae in zip(paths, labels, loaded):
        folder = tmp / label if len(paths) > 1 else tmp
        folder.mkdir(parents=True, exist_ok=True)
        metrics, originals, recon = evaluate_model(vae, dataset, opts, folder, tools, label)
        results.append({"model": str(path), "label": label, "kind": type(vae).__name__, "metrics": metrics})
        rows.append(recon)
    # the same images for every model: the dataset order is fixed and evaluation starts at 0
    save_image(torch.cat([originals, *rows]), tmp / "comparison_grid.png", nrow=len(originals))
    report = {
        "dataset": dataset.description, "dataset_id": dataset.dataset_id, "split": split,
        "num_images": results[0]["metrics"]["num_images"], "resolution": first.resolution,
        "conventions": __doc__.split("Conventions:\n")[1].strip(),
        "grid": "comparison_grid.png: originals, then one row of reconstructions per model, same images",
        "versions": versions(), "results": results,
    }
    (tmp / "metrics.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(results)
    if len(results) > 1:
        (tmp / "comparison.md").write_text(f"# {dataset.description}, {split} split\n\n{table}\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    if update_card:
        for r in results:
            update_model_card(Path(r["model"]), r, report)
    report["table"] = table
    return report


def _labels(paths: list[Path]) -> list[str]:
    # a training run's export is RUN/export: the run's name says more than "export"
    names = [p.resolve().parent.name if p.name == "export" else p.name for p in paths]
    if len(set(names)) < len(names):
        names = ["_".join(p.parts[-2:]) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i}_{n}" for i, n in enumerate(names)]
    return names


# --- model card --------------------------------------------------------------------------------

CARD_BEGIN, CARD_END = "<!-- ldm-vae eval: begin -->", "<!-- ldm-vae eval: end -->"
CARD_METRICS = [("psnr_db", "PSNR", "psnr"), ("ssim", "SSIM", "ssim"), ("lpips_vgg", "LPIPS (VGG)", "lpips"),
                ("lpips_alex", "LPIPS (AlexNet)", "lpips"), ("rfid", "rFID", "fid"),
                ("codebook_usage", "codebook usage", "codebook_usage")]


def update_model_card(model_dir: Path, result: dict, report: dict) -> None:
    """Write the results into README.md: `model-index` metadata and an Evaluation section."""
    card = model_dir / "README.md"
    text = card.read_text() if card.is_file() else "---\n---\n"
    if not text.startswith("---\n") or "\n---\n" not in text[3:]:
        raise UserError(f"{card} has no YAML metadata block; cannot add evaluation results")
    head, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(head) or {}
    m = result["metrics"]
    metrics = [{"type": mtype, "name": f"{name} ({report['split']}, {m['num_images']} images)",
                "value": round(m[key], 6)} for key, name, mtype in CARD_METRICS if m.get(key) is not None]
    metrics += [{"type": k, "name": k, "value": round(m[k], 6)} for k in m if k.startswith("fd_")]
    meta["model-index"] = [{"name": result["label"], "results": [{
        "task": {"type": "image-to-image", "name": "image reconstruction"},
        "dataset": {"name": report["dataset_id"], "type": report["dataset_id"], "split": report["split"]},
        "metrics": metrics}]}]
    section = (f"{CARD_BEGIN}\n## Evaluation\n\n`ldm-vae eval` on {report['dataset']}, {report['split']} split, "
               f"{m['num_images']} images ({m['device']}):\n\n{markdown_table([result])}\n{CARD_END}")
    if CARD_BEGIN in body:
        before, rest = body.split(CARD_BEGIN, 1)
        body = before + section + rest.split(CARD_END, 1)[1]
    else:
        body = body.rstrip("\n") + "\n\n" + section + "\n"
    new = "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body
    tmp = card.with_name(".tmp-README.md")
    tmp.write_text(new)
    os.replace(tmp, card)
