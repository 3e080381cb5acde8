"""The latent diffusion networks side by side at equal compute: the class-conditional UNet
(configs/ldm_fashion.yaml), the DiT (`network=dit`), the text-to-image UNet
(`diffusion.conditioning=text`, its prompts "a photo of a {class}") and the UNet with other
training recipes (Min-SNR-5 loss weighting, a higher LR), each trained on the same
latent cache with the same steps x batch, then `--per-class` samples of every class: the
domain Fréchet distance of the samples to the test images (with its bootstrap interval) and
how often the domain classifier recognises the class that was asked for.

    python scripts/ldm_compare.py --latents LATENTS --fd-features FEATURES --out OUT \
        [--steps 1800 --batch-size 128 --per-class 200 --set seed=1]

LATENTS: a cache of `ldm-vae encode` with labels (e.g. the demo's `latents/`); FEATURES: an
extractor of `ldm-vae train-fd-features` (e.g. the demo's `features/`). Writes OUT/compare.md,
OUT/compare.json and OUT/<variant>/ (the run and a grid of samples, one row per class);
variants whose run finished are not trained again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from ldm_vae.config import load_config
from ldm_vae.data.config import DataConfig
from ldm_vae.data.sources import build_dataset
from ldm_vae.diffusion.config import LDMConfig
from ldm_vae.diffusion.latents import read_cache
from ldm_vae.diffusion.sample import generate, load_run_pipeline
from ldm_vae.diffusion.train import train_ldm
from ldm_vae.evaluation.frechet import frechet_result, images01, load_fd_features
from ldm_vae.files import save_image

VARIANTS = {
    "UNet, class labels": [],
    "DiT, class labels": ["network=dit"],
    "UNet, text prompts": ["diffusion.conditioning=text"],
    # the UNet's training recipe, same network and compute
    "UNet, class labels, Min-SNR-5": ["diffusion.snr_gamma=5"],
    "UNet, class labels, lr 1e-3": ["train.lr=1e-3"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latents", required=True)
    p.add_argument("--fd-features", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--variant", action="append", choices=list(VARIANTS), help="default: all")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every variant, e.g. seed=1 for a second training seed "
                        "(use another --out: finished variants are not trained again)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = read_cache(args.latents)
    fd = load_fd_features(args.fd_features)
    data = DataConfig(**{k: v for k, v in meta["data"].items() if k in DataConfig.__dataclass_fields__})
    test = build_dataset(dataclasses.replace(data, max_images=None), data.test_split, train=False)
    real = fd.features(images01(test, 10_000))
    rows = json.loads((out / "compare.json").read_text()) if (out / "compare.json").is_file() else {}
    for name in args.variant or VARIANTS:
        run = out / name.replace(", ", "-").replace(" ", "_").lower()
        overrides = [*args.set, *VARIANTS[name]]
        cfg = load_config("ldm_fashion", [f"latents={args.latents}", f"train.max_steps={args.steps}",
                                          f"train.batch_size={args.batch_size}", *overrides], LDMConfig)
        if not (run / "summary.json").is_file():
            train_ldm(cfg, run, overwrite=run.exists())
        elif load_config(run / "config.yaml", [], LDMConfig) != cfg:  # the trained run's own config, row or not
            raise SystemExit(f"{run} was trained with another config than {name!r} with {overrides} (see its "
                             f"config.yaml): pass another --out")
        summary = json.loads((run / "summary.json").read_text())
        pipe, _ = load_run_pipeline(run)
        n = pipe.num_classes
        labels = [c for c in range(n) for _ in range(args.per_class)]
        t0 = time.perf_counter()
        samples = generate(pipe, len(labels), labels, 20, args.guidance_scale, 1, 250)
        sample_s = time.perf_counter() - t0
        save_image(torch.cat([samples[c * args.per_class:c * args.per_class + 8] for c in range(n)]) * 2 - 1,
                   run / "samples_grid.png", nrow=8)
        with torch.no_grad():
            predicted = torch.cat([fd.network.module.logits(samples[i:i + 500] * 2 - 1).argmax(1)
                                   for i in range(0, len(samples), 500)])
        result = frechet_result(real, fd.features(samples), bootstrap=100)
        rows[name] = {"overrides": overrides, "steps": summary["steps"], "batch": args.batch_size,
                      "parameters_m": round(sum(p.numel() for p in pipe.denoiser.parameters()) / 1e6, 3)
                      + (round(sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e6, 3)
                         if hasattr(pipe, "text_encoder") else 0),
                      "train_s": summary["wall_time_s"], "sample_s": round(sample_s, 1),
                      "final_loss": summary["final_logs"].get("loss"), fd.name: result["value"],
                      "ci95": result["ci95"], "class_accuracy": (predicted == torch.tensor(labels)).float().mean().item(),
                      "num_samples": len(samples)}
        (out / "compare.json").write_text(json.dumps(rows, indent=2))
    lines = [f"| variant | parameters | train s | {fd.name} of samples [95% CI] | class accuracy |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        ci = "[{:.3g}, {:.3g}]".format(*r["ci95"]) if r["ci95"] else ""
        lines.append(f"| {name} | {r['parameters_m']:.2f} M | {r['train_s']:.0f} | {r[fd.name]:.4g} {ci} | "
                     f"{r['class_accuracy']:.3f} |")
    head = (f"{args.steps} steps x batch {args.batch_size} on {args.latents} ({meta['dataset']}); "
            f"{args.per_class} samples per class, DPM-Solver++ 20 steps, guidance {args.guidance_scale:g}; "
            + (f"overrides {' '.join(args.set)}; " if args.set else "")
            + "text prompts \"a photo of a {class}\".\n\n")
    (out / "compare.md").write_text(head + "\n".join(lines) + "\n")
    print(head + "\n".join(lines))


if __name__ == "__main__":
    main()
