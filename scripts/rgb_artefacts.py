"""An RGB autoencoder's artefacts on the held-out photographs of data.source=wallpapers, in
more detail than `ldm-vae eval` gives them.

    python scripts/rgb_artefacts.py RUN/export [--resolution 64]

1. The colour cast by photograph: eval reports it over all test crops (pooled, and the mean
   of each crop's largest channel cast); this splits both by the photograph the crops come
   from, to see which colours the decoder gets wrong, next to how rare each photograph's
   colours are in the training photographs (`rare colours`: the share of its pixels whose
   CIELAB bin, 10 L x 8 a* x 8 b* units, holds under 1e-4 of the training photographs' pixels,
   each training photograph weighted the same; at 160 px on the longer side).
2. The error by distance from the border: mean |reconstruction - image| on each ring of
   pixels k = 0, 1, ... from the nearest border, over the interior's (k >= 8, eval's band). Eval's
   border ratio averages the whole 8-pixel band, which dilutes a frame one or two pixels wide.

Same reconstruction as eval (the posterior mode for KL, clamped to [-1, 1]) and the same
per-crop cast (ldm_vae.evaluation.metrics.color_cast_255).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ldm_vae.autoencoder.models import load_autoencoder
from ldm_vae.data.config import DataConfig
from ldm_vae.data.sources import build_dataset
from ldm_vae.evaluation.metrics import BORDER_BAND, color_cast_255

LAB_BINS = [np.arange(0, 101, 10), np.arange(-128, 129, 8), np.arange(-128, 129, 8)]
RARE = 1e-4


def _lab_bins(photo) -> tuple[np.ndarray, ...]:
    """Each pixel's CIELAB bin index (L, a*, b*), at 160 px on the longer side."""
    import skimage.color  # the wallpapers source needs scikit-image already

    img = photo.convert("RGB")
    img.thumbnail((160, 160))
    lab = skimage.color.rgb2lab(np.asarray(img) / 255.0).reshape(-1, 3)
    return tuple(np.clip(np.digitize(lab[:, k], e) - 1, 0, len(e) - 2) for k, e in enumerate(LAB_BINS))


def rare_colour_share(train_photos, photos) -> list[float]:
    """For each of `photos`, the share of its pixels in CIELAB bins that hold under RARE of the
    training photographs' pixels (each training photograph weighs the same)."""
    density = np.zeros([len(e) - 1 for e in LAB_BINS])
    for p in train_photos:
        idx = _lab_bins(p)
        np.add.at(density, idx, 1.0 / (len(idx[0]) * len(train_photos)))
    return [float(np.mean(density[_lab_bins(p)] < RARE)) for p in photos]


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
    rare = rare_colour_share(build_dataset(DataConfig(source="wallpapers", resolution=args.resolution), "train",
                                           train=False).photos, ds.photos)
    print("| photograph | crops | cast R / G / B (1/255) | per-image cast (1/255) | rare colours |\n|---|---|---|---|---|")
    for k, name in enumerate(ds.names):  # the test split's image index runs fastest
        c = cast[k::len(ds.names)]
        r, g, b = c.mean(0).tolist()
        print(f"| {name} | {len(c)} | {r:+.1f} / {g:+.1f} / {b:+.1f} | {c.abs().amax(1).mean():.1f} | {rare[k]:.1%} |")
    print(f"| all | {len(cast)} | {' / '.join(f'{v:+.1f}' for v in cast.mean(0).tolist())} | "
          f"{cast.abs().amax(1).mean():.1f} | |\n")

    error = (recon - x).abs().mean((0, 1)) * 127.5  # [H, W], 1/255
    h, w = error.shape
    rows, cols = torch.arange(h), torch.arange(w)
    ring = torch.minimum(torch.minimum(rows, h - 1 - rows)[:, None], torch.minimum(cols, w - 1 - cols)[None, :])
    interior = error[ring >= BORDER_BAND].mean()
    print(f"error by distance from the border, over the interior's ({interior:.2f}/255 at >= {BORDER_BAND} px):")
    print("| pixels from the border | " + " | ".join(str(k) for k in range(BORDER_BAND)) + " |")
    print("|---" * (BORDER_BAND + 1) + "|")
    print("| error / interior | " + " | ".join(f"{error[ring == k].mean() / interior:.2f}" for k in range(BORDER_BAND))
          + " |")


if __name__ == "__main__":
    main()
