"""The diffusability study on Fashion-MNIST: which latent regularisers and which compression
make the latent diffusion model's samples better, at equal autoencoder steps and equal LDM
compute.

    python scripts/diffusability_study.py --out studies/diffusability [--seeds 0 1] [--only baseline scale_eq]

Every variant is the demo's autoencoder recipe (configs/kl_f4_fashion.yaml, shortened as
`ldm-vae demo` does, without its regulariser) with a few overrides, trained for the same steps; each export is then
measured by `ldm-vae diffusability` with the same proxy LDM recipe (steps x batch fixed,
the UNet sized to the latents by one rule) and the same test images. The study resumes:
a trained variant and a finished measurement are skipped, an interrupted training run
continues from its last checkpoint. OUT/STUDY.md has the table (mean over seeds, and the
spread), OUT/study.json every number, OUT/spectrum.png the latent spectra.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from ldm_vae.autoencoder.config import Config
from ldm_vae.autoencoder.train import train
from ldm_vae.config import load_config
from ldm_vae.demo import FULL, SHORT_RECIPE
from ldm_vae.diffusability import DiffusabilityOptions, ProxyRecipe, run_diffusability
from ldm_vae.evaluation.latent_space import save_spectrum_plot
from ldm_vae.evaluation.features import train_fd_features
from ldm_vae.run.checkpoint import complete_checkpoints

# name -> (what it tests, overrides of the demo's autoencoder recipe[, overrides of the proxy
# LDM's recipe]). Variants with the same autoencoder overrides share one trained autoencoder.
VARIANTS = {
    "baseline": ("KL-f4, 4 channels, kl_weight 1e-6 (the demo's recipe without a regulariser)", []),
    "kl_1e-4": ("a 100x stronger KL term", ["loss.kl_weight=1e-4"]),
    "kl_1e-3": ("a 1000x stronger KL term", ["loss.kl_weight=1e-3"]),
    "scale_eq": ("scale equivariance 0.5 (Skorokhodov et al. 2025)", ["diffusability.scale_equivariance=0.5"]),
    "eq_vae": ("scale equivariance 0.5 + rotations/flips (EQ-VAE)",
               ["diffusability.scale_equivariance=0.5", "diffusability.equivariance_rotations=true"]),
    "latent_noise": ("decoder on noised latents, tau <= 0.3 (l-DeTok; the demo's autoencoder)",
                     ["diffusability.latent_noise_max=0.3"]),
    "latent_noise_0.1": ("decoder on noised latents, tau <= 0.1", ["diffusability.latent_noise_max=0.1"]),
    "channel_mask": ("channel masking p 0.5 (DC-AE 1.5)", ["diffusability.channel_mask_prob=0.5"]),
    # the LDM recipe, on the baseline autoencoder
    "ldm_v_cosine": ("LDM: v-prediction, cosine schedule", [],
                     ["diffusion.prediction_type=v_prediction", "diffusion.beta_schedule=cosine"]),
    "ldm_wide": ("LDM: UNet width 128", [], ["@width=128"]),
    "ldm_lr1e-3": ("LDM: lr 1e-3", [], ["train.lr=1e-3"]),
    # the compression sweep of the LDM paper (Rombach et al. 2022, Fig. 6) at 32x32
    "f2c2": ("f2, 2 channels (16x16x2)", ["model.block_out_channels=[32,64]", "model.latent_channels=2"]),
    "f2c4": ("f2, 4 channels (16x16x4)", ["model.block_out_channels=[32,64]", "model.latent_channels=4"]),
    "f4c8": ("f4, 8 channels (8x8x8)", ["model.latent_channels=8"]),
    "f8c8": ("f8, 8 channels (4x4x8)", ["model.block_out_channels=[32,64,128,128]", "model.latent_channels=8"]),
    "f8c16": ("f8, 16 channels (4x4x16)", ["model.block_out_channels=[32,64,128,128]", "model.latent_channels=16"]),
}


def autoencoder_of(name: str) -> str:
    """The run name of a variant's autoencoder: the first variant with the same overrides."""
    return next(n for n, v in VARIANTS.items() if v[1] == VARIANTS[name][1])


def proxy_of(name: str, base: ProxyRecipe) -> ProxyRecipe:
    """The proxy LDM recipe of a variant: `@width=W` sets the UNet width, the rest are config overrides."""
    ldm = VARIANTS[name][2] if len(VARIANTS[name]) > 2 else []
    width = [int(o.split("=")[1]) for o in ldm if o.startswith("@width=")]
    return dataclasses.replace(base, width=width[0] if width else base.width,
                               extra=[o for o in ldm if not o.startswith("@")])


COLUMNS = [("psnr_db", "PSNR dB", "reconstruction", "{:.2f}"), ("ssim", "SSIM", "reconstruction", "{:.4f}"),
           ("fd_fashion_mnist", "recon FD", "reconstruction", "{:.4f}"),
           ("fd_fashion_mnist_samples", "sample FD", "generation", "{:.4f}"),
           ("fd_fashion_mnist_ratio_to_reconstructions", "samples/recon", "generation", "{:.1f}"),
           ("class_accuracy", "class acc.", "generation", "{:.3f}"),
           ("high_freq_share", "latent HF share", "diffusability", "{:.3f}"),
           ("equivariance_decoder_psnr_db", "D(down z) PSNR", "diffusability", "{:.2f}"),
           ("equivariance_encoder_rel_error", "E equiv. error", "diffusability", "{:.3f}"),
           ("ae_train_s", "AE s", "time", "{:.0f}"), ("ldm_train_s", "LDM s", "generation", "{:.0f}")]


def train_variant(name: str, seed: int, runs: Path, extra: list[str]) -> tuple[Path, dict]:
    """Train (or finish, or reuse) one variant's autoencoder; returns (run folder, summary)."""
    run = runs / f"{autoencoder_of(name)}-s{seed}"
    if (run / "summary.json").is_file() and (run / "export" / "config.json").is_file():
        return run, json.loads((run / "summary.json").read_text())
    cfg = load_config("kl_f4_fashion", [*SHORT_RECIPE, *VARIANTS[name][1], f"seed={seed}", *extra], Config)
    resumable = bool(complete_checkpoints(run))
    return run, train(cfg, run, resume="latest" if resumable else None,
                      overwrite=run.exists() and not resumable).summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="studies/diffusability")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), help="a subset of the variants")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--num-images", type=int, default=10_000, help="test images (and FD reference images)")
    p.add_argument("--ldm-steps", type=int, default=1800)
    p.add_argument("--ldm-batch-size", type=int, default=128)
    p.add_argument("--samples-per-class", type=int, default=1000)
    p.add_argument("--fd-steps", type=int, default=FULL.fd_steps,
                   help="training steps of the study's domain feature extractor (default: the demo's)")
    p.add_argument("--data-path", help="Fashion-MNIST idx folder (default: the Debian package)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra overrides for every autoencoder")
    args = p.parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    extra = [*([f"data.path={args.data_path}"] if args.data_path else []), *args.overrides]
    base = load_config("kl_f4_fashion", [*SHORT_RECIPE, *extra], Config)
    features = out / "features"
    if not features.exists():  # the demo's domain extractor (a folder, written atomically), trained once per study
        out.mkdir(parents=True, exist_ok=True)
        train_fd_features(dataclasses.replace(base.data, max_images=None), features, "fashion_mnist",
                          steps=args.fd_steps, device=device)
    recipe = ProxyRecipe(steps=args.ldm_steps, batch_size=args.ldm_batch_size,
                         samples_per_class=args.samples_per_class)
    rows = {}
    # seeds outermost: an interrupted study already has every variant once
    for seed in args.seeds:
        for name in args.only or VARIANTS:
            key = f"{name}-s{seed}"
            measured = out / "measures" / key / "metrics.json"
            if not measured.is_file():
                t0 = time.perf_counter()
                run, summary = train_variant(name, seed, out / "runs", extra)
                opts = DiffusabilityOptions(num_images=args.num_images, device=device, seed=seed,
                                            fd_features=str(features), proxy=proxy_of(name, recipe))
                report = run_diffusability([str(run / "export")], measured.parent, opts, overwrite=True)
                report["results"][0]["time"] = {"ae_train_s": summary["wall_time_s"],
                                                "measure_s": time.perf_counter() - t0 - summary["wall_time_s"]}
                measured.write_text(json.dumps(report, indent=2))
            rows[key] = json.loads(measured.read_text())["results"][0]
            write_study(out, rows, args)  # the table so far


def write_study(out: Path, rows: dict, args) -> None:
    by_variant: dict[str, list[dict]] = {}
    for key, r in rows.items():
        by_variant.setdefault(key.rsplit("-s", 1)[0], []).append(r)
    lines = ["| variant | what | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 3) + "|"]
    table = {}
    for name, results in by_variant.items():
        cells, table[name] = [], {}
        for key, _, section, fmt in COLUMNS:
            values = [r.get(section, {}).get(key) for r in results]
            values = [v for v in values if v is not None]
            if not values:
                cells.append("–")
                continue
            mean = statistics.fmean(values)
            table[name][key] = {"mean": mean, "values": values}
            spread = f" ({fmt.format(min(values))}–{fmt.format(max(values))})" if len(values) > 1 else ""
            cells.append(fmt.format(mean) + spread)
        lines.append(f"| {name} | {VARIANTS[name][0]} | {len(results)} | " + " | ".join(cells) + " |")
    first = [{**r, "label": key.rsplit("-s", 1)[0]} for key, r in rows.items() if key.endswith(f"-s{args.seeds[0]}")]
    save_spectrum_plot(first, out / "spectrum.png")
    text = (f"# Diffusability study (Fashion-MNIST 32x32)\n\nCommand: `python scripts/diffusability_study.py "
            f"{' '.join(sys.argv[1:])}`; proxy LDM {args.ldm_steps} steps x batch "
            f"{args.ldm_batch_size}, {args.samples_per_class} samples per class, {args.num_images} test images. "
            f"Mean over seeds (min–max).\n\n" + "\n".join(lines) + "\n\n![spectra](spectrum.png)\n")
    (out / "STUDY.md").write_text(text)
    (out / "study.json").write_text(json.dumps({"table": table, "rows": rows}, indent=2))
    logging.info(f"{len(rows)} runs measured; table in {out / 'STUDY.md'}")


if __name__ == "__main__":
    main()
