"""Reconstruction PSNR/SSIM of an exported autoencoder on its dataset's test split.

Loads the export with STOCK diffusers (`AutoencoderKL.from_pretrained`), so the numbers are
those of what users get. Writes metrics.json and a grid (originals over reconstructions).
PSNR and SSIM are per image on [0, 1] pixels (data_range=1), then averaged.

    python scripts/recon_eval.py runs/kl/export --num-images 1000 --out reports/kl
"""

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader, Subset
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm.auto import tqdm

from ldm_vae.config import load_config
from ldm_vae.data import build_dataset, save_image

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("export_dir")
parser.add_argument("--num-images", type=int, default=1000)
parser.add_argument("--batch-size", type=int, default=250)
parser.add_argument("--out", required=True)
args = parser.parse_args()

vae = AutoencoderKL.from_pretrained(args.export_dir).eval()
cfg = load_config(Path(args.export_dir) / "training_config.yaml")
dataset = build_dataset(cfg.data, cfg.data.test_split, train=False)
n = min(args.num_images, len(dataset))
psnr, ssim, first = [], [], None
t0 = time.perf_counter()
with torch.no_grad():
    for batch in tqdm(DataLoader(Subset(dataset, range(n)), batch_size=args.batch_size), desc="reconstructing"):
        x = batch["pixel_values"]
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        x01, r01 = (x + 1) / 2, (recon + 1) / 2
        psnr.append(peak_signal_noise_ratio(r01, x01, data_range=1.0, reduction="none", dim=(1, 2, 3)))
        ssim.append(structural_similarity_index_measure(r01, x01, data_range=1.0, reduction="none"))
        if first is None:
            first = torch.cat([x[:16], recon[:16]])
metrics = {
    "export": args.export_dir, "data": dataset.description, "num_images": n,
    "psnr_db": torch.cat(psnr).mean().item(), "ssim": torch.cat(ssim).mean().item(),
    "seconds": round(time.perf_counter() - t0, 1),
}
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
(out / "metrics.json").write_text(json.dumps(metrics, indent=2))
save_image(first, out / "reconstructions.png", nrow=16)
print(json.dumps(metrics, indent=2))
