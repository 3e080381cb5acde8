"""Small PNG plots drawn with Pillow (no plotting dependency for a couple of charts)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .data import make_grid
from .quantize import code_perplexity

WIDTH, HEIGHT, MARGIN = 640, 280, 44


def save_usage_histogram(counts: torch.Tensor, path: str | Path, title: str) -> None:
    """Codebook usage as a rank plot: hits per code sorted high to low, log scale.

    A healthy codebook is a long flat band; collapse shows as a cliff to zero at the
    share of codes in use.
    """
    counts = counts.detach().cpu().double()
    k = counts.numel()
    used = int((counts > 0).sum())
    ranked = counts.sort(descending=True).values
    top = math.log10(max(ranked[0].item(), 1.0)) + 0.1
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = MARGIN, 30, WIDTH - 10, HEIGHT - 30
    draw.rectangle([x0, y0, x1, y1], outline="black")
    for col in range(x1 - x0):
        lo, hi = col * k // (x1 - x0), max((col + 1) * k // (x1 - x0), col * k // (x1 - x0) + 1)
        value = ranked[lo:hi].mean().item()
        if value >= 1:
            height = (math.log10(value) + 0.1) / top * (y1 - y0)
            draw.line([(x0 + col, y1), (x0 + col, y1 - height)], fill=(40, 90, 200))
    for decade in range(int(top) + 1):
        y = y1 - (decade + 0.1) / top * (y1 - y0)
        draw.text((4, y - 6), f"1e{decade}", fill="black")
    perplexity = code_perplexity(counts).item()
    draw.text((x0, 8), f"{title}: {used}/{k} codes hit ({100 * used / k:.1f}%), perplexity {perplexity:.0f}",
              fill="black")
    draw.text((x0, y1 + 8), f"codes ranked by hits (0 .. {k - 1}); hits on a log scale", fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _heat_colors(v: torch.Tensor) -> torch.Tensor:
    """[N, H, W] in [0, 1] -> [N, 3, H, W] in [-1, 1]: black -> red -> yellow -> white."""
    r, g, b = (v * 3).clamp(0, 1), (v * 3 - 1).clamp(0, 1), (v * 3 - 2).clamp(0, 1)
    return torch.stack([r, g, b], 1) * 2 - 1


def save_heatmaps(x: torch.Tensor, recon: torch.Tensor, path: str | Path) -> None:
    """Originals, reconstructions and per-pixel error |x - recon| (mean over channels), one
    column per image. Colours are scaled to the largest error in the picture, stated on it."""
    x, recon = x.detach().float().cpu(), recon.detach().float().cpu()
    err = (x - recon).abs().mean(1) / 2  # [N, H, W], in units of the [0, 1] pixel range
    top = max(err.max().item(), 1e-8)
    rows = torch.cat([x, recon, _heat_colors(err / top)])
    grid = make_grid(rows, nrow=len(x)).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    pixels = Image.fromarray(grid.permute(1, 2, 0).numpy())
    scale = max(1, 1024 // pixels.width)  # small images are enlarged so the heat is visible
    pixels = pixels.resize((pixels.width * scale, pixels.height * scale), Image.NEAREST)
    img = Image.new("RGB", (max(pixels.width, 420), pixels.height + 22), "white")
    img.paste(pixels, (0, 22))
    ImageDraw.Draw(img).text((4, 5), f"rows: original, reconstruction, |error| (white = {top:.3f} of the pixel range)",
                             fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
