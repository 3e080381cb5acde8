"""Side-by-side benchmarks, each comparison measured in one process: warm-up, repeats, median.

    python scripts/bench.py ldm-cache [--vae runs/kl/export] [--out reports/bench]

ldm-cache: one latent diffusion training step (default UNet of configs/ldm_fashion.yaml,
AdamW) on batches from a latent cache vs the same step on batches of Fashion-MNIST images
encoded on the fly by the autoencoder (posterior sample, scaled). Both include data loading.
Without --vae, an untrained autoencoder of configs/kl_f4_fashion.yaml stands in: encoding
costs the same whatever the weights.

Prints a table and writes OUT/bench.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_vae.config import LDMConfig, load_config  # noqa: E402
from ldm_vae.data import build_dataset  # noqa: E402
from ldm_vae.latents import LatentDataset, encode_dataset  # noqa: E402
from ldm_vae.models import build_autoencoder, build_unet  # noqa: E402
from ldm_vae.train_ldm import noise_schedule  # noqa: E402


def _median_step_time(step, batches, warmup: int, repeats: int) -> list[float]:
    """Seconds per step (loading the batch included) for `repeats` steps after `warmup`."""
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        step(next(batches))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _forever(loader):
    while True:
        yield from loader


def bench_ldm_cache(args) -> dict:
    vae_cfg = load_config(ROOT / "configs" / "kl_f4_fashion.yaml")
    ldm_cfg = load_config(ROOT / "configs" / "ldm_fashion.yaml", [], LDMConfig)
    bs = ldm_cfg.train.batch_size
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    if args.vae:
        vae_dir = Path(args.vae)
    else:
        torch.manual_seed(0)
        vae_dir = tmp / "vae"
        vae = build_autoencoder(vae_cfg.model, vae_cfg.data.resolution)
        vae.register_to_config(scaling_factor=1.0, shift_factor=0.0)
        vae.save_pretrained(vae_dir)
    from ldm_vae.models import load_autoencoder

    vae = load_autoencoder(vae_dir).eval()
    data = vae_cfg.data
    data.max_images = args.images
    encode_dataset(vae_dir, data, "train", tmp / "cache", batch_size=256)
    cached = DataLoader(LatentDataset(tmp / "cache"), batch_size=bs, shuffle=True, drop_last=True)
    images = build_dataset(data, "train", train=True)
    raw = DataLoader(Subset(images, range(len(images))), batch_size=bs, shuffle=True, drop_last=True)

    meta = json.loads((tmp / "cache" / "cache.json").read_text())
    torch.manual_seed(0)
    unet = build_unet(ldm_cfg.model, meta["latent_shape"], meta["num_classes"]).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=ldm_cfg.train.lr)
    sched = noise_schedule(ldm_cfg.diffusion)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0

    def unet_step(z, labels):
        noise = torch.randn_like(z)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(z),))
        loss = F.mse_loss(unet(sched.add_noise(z, noise, t), t, class_labels=labels).sample, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step_cached(batch):
        unet_step(batch["latents"], batch["label"])

    @torch.no_grad()
    def encode(x):
        return (vae.encode(x).latent_dist.sample() - shift) * scale

    def step_on_the_fly(batch):
        unet_step(encode(batch["pixel_values"]), batch["label"])

    results = {}
    for name, step, loader in (("cached latents", step_cached, cached),
                               ("images encoded on the fly", step_on_the_fly, raw)):
        times = _median_step_time(step, _forever(loader), args.warmup, args.repeats)
        results[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                         "images_per_s": bs / statistics.median(times)}
    speedup = results["images encoded on the fly"]["median_s"] / results["cached latents"]["median_s"]
    return {"comparison": "ldm-cache", "batch_size": bs, "latent_shape": meta["latent_shape"],
            "autoencoder": str(args.vae or "untrained configs/kl_f4_fashion.yaml"),
            "warmup": args.warmup, "repeats": args.repeats, "results": results, "speedup": speedup,
            "target": ">= 5x"}


BENCHES = {"ldm-cache": bench_ldm_cache}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=sorted(BENCHES))
    p.add_argument("--vae", help="an exported KL autoencoder (default: an untrained one of the default config)")
    p.add_argument("--images", type=int, default=4096, help="train images in the cache and the on-the-fly loader")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="reports/bench")
    args = p.parse_args()
    result = BENCHES[args.which](args)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                         "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    print(f"\n{args.which}, batch {result['batch_size']}, median of {args.repeats} steps after {args.warmup} warm-up\n")
    print("| variant | s/step (median) | min | max | images/s |\n|---|---|---|---|---|")
    for name, r in result["results"].items():
        print(f"| {name} | {r['median_s']:.4f} | {r['min_s']:.4f} | {r['max_s']:.4f} | {r['images_per_s']:.0f} |")
    print(f"\nspeed-up of the cached step: {result['speedup']:.2f}x (target {result['target']})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.which}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
