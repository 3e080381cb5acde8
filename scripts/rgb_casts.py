"""The colour cast of an RGB autoencoder per held-out photograph of data.source=wallpapers.

    python scripts/rgb_casts.py RUN/export [--resolution 64]

`ldm-vae eval` reports the cast over all test crops (pooled, and the per-image mean of each
crop's largest channel cast); this splits both by the photograph the crops come from, to
see which colours the decoder gets wrong. Same reconstruction as eval (the posterior mode for
KL, clamped to [-1, 1]) and the same per-crop cast (ldm_vae.evaluation.metrics.color_cast_255).
"""

from __future__ import annotations

import argparse

import torch

from ldm_vae.autoencoder.models import load_autoencoder
from ldm_vae.data.config import DataConfig
from ldm_vae.data.sources import build_dataset
from ldm_vae.evaluation.metrics import color_cast_255


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", help="an exported KL autoencoder folder (RUN/export)")
    p.add_argument("--resolution", type=int, default=64)
    args = p.parse_args()
    vae = load_autoencoder(args.export).eval()
    if type(vae).__name__ != "AutoencoderKL":
        raise SystemExit(f"{args.export} holds a {type(vae).__name__}; this script reads KL autoencoders")
    ds = build_dataset(DataConfig(source="wallpapers", resolution=args.resolution), "test", train=False)
    x = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(x[i:i + 45]).latent_dist.mode()).sample
                           for i in range(0, len(x), 45)]).clamp(-1, 1)
    cast = color_cast_255((x + 1) / 2, (recon + 1) / 2)  # (N, 3)
    print("| photograph | crops | cast R / G / B (1/255) | per-image cast (1/255) |\n|---|---|---|---|")
    for k, name in enumerate(ds.names):  # the test split's image index runs fastest
        c = cast[k::len(ds.names)]
        r, g, b = c.mean(0).tolist()
        print(f"| {name} | {len(c)} | {r:+.1f} / {g:+.1f} / {b:+.1f} | {c.abs().amax(1).mean():.1f} |")
    print(f"| all | {len(cast)} | {' / '.join(f'{v:+.1f}' for v in cast.mean(0).tolist())} | "
          f"{cast.abs().amax(1).mean():.1f} |")


if __name__ == "__main__":
    main()
