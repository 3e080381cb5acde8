"""Reconstruction PSNR/SSIM (and, for VQ, codebook usage) of an export on its test split.

Loads the export with STOCK diffusers (`AutoencoderKL` / `VQModel.from_pretrained`), so the
numbers are those of what users get. Writes metrics.json and a grid (originals over
reconstructions). A stop-gap until `ldm-vae eval`.

    python scripts/recon_eval.py runs/kl/export --num-images 1000 --out reports/kl
"""

import argparse
import json
import time
from pathlib import Path

import torch

from ldm_vae.config import load_config
from ldm_vae.data import build_dataset, save_image
from ldm_vae.evaluate import reconstruction_metrics
from ldm_vae.models import MODEL_CLASSES

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("export_dir")
parser.add_argument("--num-images", type=int, default=1000, help="first N test images (0: all)")
parser.add_argument("--batch-size", type=int, default=250)
parser.add_argument("--out", required=True)
args = parser.parse_args()

cfg = load_config(Path(args.export_dir) / "training_config.yaml")
vae = MODEL_CLASSES[cfg.model.kind].from_pretrained(args.export_dir)
dataset = build_dataset(cfg.data, cfg.data.test_split, train=False)
t0 = time.perf_counter()
device = "cuda" if torch.cuda.is_available() else "cpu"
metrics, grid = reconstruction_metrics(vae, dataset, args.num_images or None, args.batch_size, device)
metrics = {"export": args.export_dir, "data": dataset.description, **metrics,
           "seconds": round(time.perf_counter() - t0, 1)}
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
(out / "metrics.json").write_text(json.dumps(metrics, indent=2))
save_image(grid, out / "reconstructions.png", nrow=16)
print(json.dumps(metrics, indent=2))
