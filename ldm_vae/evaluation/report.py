"""`ldm-vae eval`: reconstruction metrics, pictures and VAE diagnostics of exported
autoencoders, the report folder and the model-card results.

Every model is loaded with STOCK diffusers (`AutoencoderKL` / `VQModel` / `AutoencoderDC.from_pretrained`),
so the numbers are those of what users get. Real images and reconstructions go through
the identical pipeline (same dataset order, same [0, 1] conversion, same resize for
feature extractors). A metric that cannot be computed (missing weights, missing package)
is reported as unavailable with the reason, never as 0. The conventions are in metrics.py.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, Subset
from tqdm.auto import tqdm

from ..autoencoder.export import training_data
from ..autoencoder.models import load_autoencoder
from ..autoencoder.perceptual import (
    BACKBONE_FILES,
    MIN_SIZE,
    LPIPSWeightsMissing,
    build_lpips,
)
from ..data.sources import build_dataset
from ..errors import UserError
from ..files import (
    atomic_folder,
    put_card_section,
    read_card,
    refuse_nonempty,
    save_heatmaps,
    save_image,
    write_card,
)
from ..run.processes import (
    Process,
    derived_seed,
    gather_in_order,
    process_state,
    this_process,
)
from . import metrics as metrics_module
from .diagnostics import Sums, diagnostics_for
from .frechet import ReferenceFeatures, build_fid, frechet_result, load_fd_features
from .metrics import (
    border_error_ratio,
    border_error_sums,
    clock,
    color_cast_255,
    device_name,
    psnr,
    ssim,
)

GRID_IMAGES = 16


@dataclass
class EvalOptions:
    num_images: int | None = None
    batch_size: int = 100
    device: str = "cpu"
    lpips_weights: dict = field(default_factory=dict)  # net -> path or None (torch hub cache)
    fid_weights: str | None = None
    fd_features: str | None = None
    bootstrap: int = 100  # resamples for each Fréchet distance's interval; 0: none
    reference_cache: str | None = None  # cached real-image features; None: frechet.reference_cache_dir()
    iwae_k: int = 16
    bound_images: int = 256
    likelihood_sigma: float = 0.1
    seed: int = 0


@dataclass
class Instruments:
    """The metric networks, built once and shared by every model evaluated."""

    lpips: dict  # net -> LPIPS module
    frechet: list  # Fréchet metrics (rFID, the domain extractor's): frechet.Frechet
    unavailable: dict  # metric -> reason

    @property
    def protocol(self) -> dict:
        """Fréchet metric -> how it is made (network, weights and their sha256, input, resize)."""
        return {f.name: f.protocol for f in self.frechet}


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
    frechet = [fid] if fid is not None else []
    if fid is None:
        unavailable_metrics["rfid"] = reason
    if opts.fd_features:
        frechet.append(load_fd_features(opts.fd_features))
    return Instruments(lpips, frechet, unavailable_metrics)


def evaluate_model(vae, dataset, opts: EvalOptions, out_dir: Path | None, tools: Instruments, label: str,
                   images: dict, process: Process = (0, 1)):
    """(metrics, first originals, their reconstructions) of one model on `dataset`; writes its
    pictures into `out_dir`. `images` says which images `dataset` holds (data settings and
    split: `images_key`), the key of the cached reference features.

    Under `accelerate launch` (process: (index, count), run/processes.py) each process measures
    every count-th batch; the batches' sums and features are gathered and folded in batch
    order, so every number is the one a single process computes. The main process computes
    the metrics and writes the pictures; the others return None."""
    device = torch.device(opts.device)
    vae = vae.to(device).eval()
    n = len(dataset) if opts.num_images is None else min(opts.num_images, len(dataset))
    batches = list(BatchSampler(range(n), opts.batch_size, drop_last=False))
    mine = range(process[0], len(batches), process[1])
    kind = diagnostics_for(vae)

    size = min(dataset[0]["pixel_values"].shape[-2:])
    lpips_nets = {net: model.to(device) for net, model in tools.lpips.items() if size >= MIN_SIZE[net]}
    too_small = {f"lpips_{net}": f"LPIPS's {net} backbone needs images of at least {MIN_SIZE[net]}x{MIN_SIZE[net]} "
                                 f"pixels; these are {size}x{size} (eval with --resolution {MIN_SIZE[net]} or more)"
                 for net in tools.lpips if net not in lpips_nets}
    frechet = [f.to(device) for f in tools.frechet]
    key = {"images": images, "num_images": n}
    references = [ReferenceFeatures(f, key, opts.reference_cache) for f in frechet]

    records = []
    loader = DataLoader(dataset, batch_sampler=[batches[b] for b in mine])
    for b, batch in zip(mine, tqdm(loader, desc=f"eval {label}", leave=False, disable=process[0] != 0)):
        x = batch["pixel_values"].to(device)
        # the posterior samples of batch b, whichever process measures it
        generator = torch.Generator(device=device).manual_seed(derived_seed(opts.seed, b))
        sums = Sums()
        t0 = clock(device)
        latents, decoder_input = kind.encode(x, generator)
        t1 = clock(device)
        recon = vae.decode(decoder_input).sample
        t2 = clock(device)
        sums.add("encode_s", torch.tensor(t1 - t0))
        sums.add("decode_s", torch.tensor(t2 - t1))
        recon = recon.float().clamp(-1, 1)
        x01, r01 = (x + 1) / 2, (recon + 1) / 2
        sums.add("psnr", psnr(x01, r01).sum())
        sums.add("ssim", ssim(x01, r01).sum())
        # per image, summed: the images are equally sized, so the mean over images is the pooled one
        cast = color_cast_255(x01, r01)  # (B, C)
        sums.add("color_cast_255", cast.sum(0))  # (C,)
        sums.add("color_cast_image_255", cast.abs().amax(1).sum())
        sums.add("border_error", border_error_sums(x01, r01))
        for net, model in lpips_nets.items():
            sums.add(f"lpips_{net}", model(x, recon).sum())
        # latent statistics per channel: [B, C, h, w] -> [C, B*h*w]
        lat = latents.double().transpose(0, 1).flatten(1)
        sums.add("lat_sum", lat.sum(1))
        sums.add("lat_sq", lat.pow(2).sum(1))
        sums.add("lat_count", torch.tensor(float(lat.shape[1])))
        kind.observe(latents, sums)
        records.append((b, {"sums": sums, "fake": [f.features(r01).cpu() for f in frechet],
                            "real": [reference.observe(x01) for reference in references],
                            "grid": (x[:GRID_IMAGES].cpu(), recon[:GRID_IMAGES].cpu()) if b == 0 else None}))
    records = [record for _, record in gather_in_order(records, process)]
    if process[0] != 0:
        return None

    total = Sums()
    for record in records:
        total.merge(record["sums"])
        for reference, real in zip(references, record["real"]):
            reference.take(*real)
    t = total.total
    m = {"num_images": n, "psnr_db": t["psnr"].item() / n, "ssim": t["ssim"].item() / n}
    for net in lpips_nets:
        m[f"lpips_{net}"] = t[f"lpips_{net}"].item() / n
    cast = t["color_cast_255"] / n
    m.update({f"color_cast_255_{c}": v for c, v in zip("rgb", cast.tolist(), strict=True)})
    m["color_cast_max_255"] = cast.abs().max().item()
    m["color_cast_image_255"] = t["color_cast_image_255"].item() / n
    undefined = {}
    for region in ("border", "frame"):
        ratio, reason = border_error_ratio(t["border_error"], region)
        if ratio is None:
            undefined[f"{region}_error_ratio"] = reason
        else:
            m[f"{region}_error_ratio"] = ratio
    if frechet:
        m["ci95"], m["frechet_reference"] = {}, {}
    for k, (f, reference) in enumerate(zip(frechet, references)):
        real = reference.finish(lambda: ((b["pixel_values"].to(device) + 1) / 2 for b in
                                         DataLoader(Subset(dataset, range(n)), batch_size=opts.batch_size)))
        result = frechet_result(real, torch.cat([record["fake"][k] for record in records]), opts.bootstrap,
                                opts.seed, device)
        m[f.name], m["ci95"][f.name] = result["value"], result["ci95"]
        m["frechet_reference"][f.name] = reference.record()
    lat_mean = t["lat_sum"] / t["lat_count"]
    lat_std = (t["lat_sq"] / t["lat_count"] - lat_mean.pow(2)).clamp_min(0).sqrt()
    m["latent_channel_mean"] = lat_mean.tolist()
    m["latent_channel_std"] = lat_std.tolist()
    # per second of encoder (decoder) time, summed over the processes: one process's throughput
    m["encode_images_per_s"] = n / t["encode_s"].item()
    m["decode_images_per_s"] = n / t["decode_s"].item()
    m["device"] = device_name(device)
    m.update(kind.finish(n, t, dataset, out_dir, torch.Generator(device=device).manual_seed(opts.seed), opts))
    grid_x, grid_r = records[0]["grid"]
    save_heatmaps(grid_x, grid_r, out_dir / "error_heatmap.png")
    save_image(torch.cat([grid_x, grid_r]), out_dir / "reconstructions.png", nrow=len(grid_x))
    m["unavailable"] = {**tools.unavailable, **too_small, **undefined, **m.get("unavailable", {})}
    return m, grid_x, grid_r


# ==============================================================================================
# Reports
# ==============================================================================================


TABLE_METRICS = [("psnr_db", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("lpips_vgg", "LPIPS vgg", "{:.4f}"),
                 ("lpips_alex", "LPIPS alex", "{:.4f}"), ("rfid", "rFID", "{:.2f}"),
                 ("color_cast_max_255", "cast max /255", "{:.2f}"),
                 ("color_cast_image_255", "per-image cast /255", "{:.2f}"), ("border_error_ratio", "border ratio", "{:.2f}"),
                 ("frame_error_ratio", "frame ratio", "{:.2f}"),
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
            ci = m.get("ci95", {}).get(key)
            if m.get(key) is not None:
                cells.append(fmt.format(m[key]) + (f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else ""))
            else:
                cells.append(unav if key in m.get("unavailable", {}) else "–")
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    notes = sorted({f"{k}: {v}" for r in results for k, v in r["metrics"].get("unavailable", {}).items()})
    if notes:
        lines += ["", "n/a = unavailable:"] + [f"- {n}" for n in notes]
    if any(r["metrics"].get("ci95") for r in results):
        lines += ["", "[low, high]: 95% bootstrap interval of the Fréchet distance (metrics.json, frechet_protocol)"]
    return "\n".join(lines)


def versions() -> dict:
    import accelerate
    import diffusers
    import torchmetrics

    from .. import __version__

    return {"ldm_vae": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "torchmetrics": torchmetrics.__version__,
            "python": platform.python_version()}


def run_eval(models: list[str], out: str | Path, opts: EvalOptions, split: str = "test", source: str | None = None,
             data_path: str | None = None, data_name: str | None = None, resolution: int | None = None,
             update_card: bool = False, overwrite: bool = False) -> dict | None:
    """Evaluate `models` on the same images; write metrics.json, pictures and (several models)
    comparison.md. Under `accelerate launch` every process checks the inputs (they all fail
    alike) and measures its share of the batches (`evaluate_model`); the main process writes
    the report and returns it, the others return None."""
    out = Path(out)
    if not overwrite:
        refuse_nonempty(out)
    with process_state().main_process_first():  # one scan of the images, then the others read its cache
        paths, loaded, first, dataset = load_for_comparison(models, split, source, data_path, data_name, resolution)
    tools = build_instruments(opts)
    labels = model_labels(paths)
    process = this_process()
    if process[0] != 0:
        for label, vae in zip(labels, loaded):
            evaluate_model(vae, dataset, opts, None, tools, label, images_key(first, split), process)
        return None
    results, rows = [], []
    with atomic_folder(out) as tmp:
        for path, label, vae in zip(paths, labels, loaded):
            folder = tmp / label if len(paths) > 1 else tmp
            folder.mkdir(parents=True, exist_ok=True)
            metrics, originals, recon = evaluate_model(vae, dataset, opts, folder, tools, label,
                                                       images_key(first, split), process)
            results.append({"model": str(path), "label": label, "kind": type(vae).__name__, "metrics": metrics})
            rows.append(recon)
        # the same images for every model: the dataset order is fixed and evaluation starts at 0
        save_image(torch.cat([originals, *rows]), tmp / "comparison_grid.png", nrow=len(originals))
        report = {
            "dataset": dataset.description, "dataset_id": dataset.dataset_id, "split": split,
            "num_images": results[0]["metrics"]["num_images"], "resolution": first.resolution,
            "conventions": metrics_module.__doc__.split("Conventions:\n")[1].strip(),
            "frechet_protocol": tools.protocol,
            "grid": "comparison_grid.png: originals, then one row of reconstructions per model, same images",
            "versions": versions(), "results": results,
        }
        (tmp / "metrics.json").write_text(json.dumps(report, indent=2))
        table = markdown_table(results)
        if len(results) > 1:
            (tmp / "comparison.md").write_text(f"# {dataset.description}, {split} split\n\n{table}\n")
    if update_card:
        for r in results:
            update_model_card(Path(r["model"]), r, report)
    report["table"] = table
    return report


def load_for_comparison(models: list[str], split: str, source: str | None = None, data_path: str | None = None,
                        data_name: str | None = None, resolution: int | None = None):
    """(paths, stock-loaded models, data config, dataset): the exports in `models` and the one
    split they are all measured on (their training data unless the data options say
    otherwise); a bad folder or models of different data fail before any work."""
    paths = [Path(p) for p in models]
    loaded = [load_autoencoder(p) for p in paths]
    data_cfgs = [training_data(p, source, data_path, data_name, resolution) for p in paths]
    first = data_cfgs[0]
    if any((d.source, d.path, d.name, d.resolution) != (first.source, first.path, first.name, first.resolution)
           for d in data_cfgs[1:]):
        raise UserError("the models were trained on different data or resolutions; pass --data (and --resolution) "
                        "to measure them on the same images")
    return paths, loaded, first, build_dataset(first, split, train=False)


def images_key(data, split: str) -> dict:
    """What defines a split's images: its data settings (a local path made absolute)."""
    key = dataclasses.asdict(data)
    for how_not_what in ("num_workers", "decoded_cache_mb"):
        key.pop(how_not_what)
    if key["path"]:
        key["path"] = str(Path(key["path"]).expanduser().resolve())
    return {**key, "split": split}


def model_labels(paths: list[Path]) -> list[str]:
    # a training run's export is RUN/export: the run's name says more than "export"
    names = [p.resolve().parent.name if p.name == "export" else p.name for p in paths]
    if len(set(names)) < len(names):
        names = ["_".join(p.parts[-2:]) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i}_{n}" for i, n in enumerate(names)]
    return names


# ==============================================================================================
# Model card
# ==============================================================================================


CARD_BEGIN, CARD_END = "<!-- ldm-vae eval: begin -->", "<!-- ldm-vae eval: end -->"
CARD_METRICS = [("psnr_db", "PSNR", "psnr"), ("ssim", "SSIM", "ssim"), ("lpips_vgg", "LPIPS (VGG)", "lpips"),
                ("lpips_alex", "LPIPS (AlexNet)", "lpips"), ("rfid", "rFID", "fid"),
                ("codebook_usage", "codebook usage", "codebook_usage")]


def update_model_card(model_dir: Path, result: dict, report: dict) -> None:
    """Write the results into README.md: `model-index` metadata and an Evaluation section."""
    card = model_dir / "README.md"
    meta, body = read_card(card)
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
    write_card(card, meta, put_card_section(body, CARD_BEGIN, CARD_END, section))
