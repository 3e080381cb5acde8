"""What every stage writes, written one way: image grids and small plots (Pillow only),
folders that appear only when complete, refusal of non-empty outputs, and model cards
(huggingface_hub `ModelCard`: `ModelCardData` metadata + a template that ships inside the package).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.resources
import math
import os
import shutil
import string
from pathlib import Path

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image, ImageDraw

from .errors import UserError

# ==============================================================================================
# Output folders
# ==============================================================================================


def refuse_nonempty(path: str | Path, flag: str = "--overwrite", what: str = "") -> None:
    """A folder that exists and holds files is never written into without `flag`."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path} exists and is not empty{what}; choose another folder or pass {flag} "
                        f"(nothing was changed)")


@contextlib.contextmanager
def atomic_folder(out_dir: str | Path):
    """Yields a temporary sibling folder that replaces `out_dir` only once it is complete;
    an exception inside leaves `out_dir` as it was (and removes the temporary folder); a
    full disk becomes a UserError that says so."""
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".tmp-{out_dir.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as err:
        full = disk_full(err, tmp)  # before the clean-up gives the space back
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise write_failed(out_dir, err, f"{out_dir} was left as it was; free space and run the command "
                                             f"again") from err
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _existing(path: str | Path) -> Path:
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    return where


def disk_full(err: BaseException, path: str | Path) -> bool:
    """Did a write to `path` fail for lack of space (or quota), not for a mistake in the input?
    By errno where there is one; torch.save and safetensors report a full disk as a
    RuntimeError / SafetensorError, so otherwise by their text or the space left there."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if not isinstance(err, Exception):  # KeyboardInterrupt and the like
        return False
    text = str(err)
    return (any(s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded"))
            or shutil.disk_usage(_existing(path)).free < 64 * 2**20)


def write_failed(path: str | Path, err: BaseException, then: str) -> UserError:
    """The error for a write that a full disk stopped: the path, the free space, what was kept."""
    free = shutil.disk_usage(_existing(path)).free / 2**30
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[0][:200]
    return UserError(f"could not write {path}: {reason} ({free:.2f} GiB free on that filesystem); {then}")


def sha256(*paths: str | Path) -> str:
    """sha256 of the files' bytes, read in order (one file: its usual checksum)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace a file's content in one rename (a crash leaves the old or the new file)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ==============================================================================================
# Model cards
# ==============================================================================================


def render_card(template: str, metadata: ModelCardData, fields: dict) -> ModelCard:
    """A README.md model card: `metadata` as its YAML block, then the packaged template
    `model_cards/<template>` with `fields` substituted ($name placeholders)."""
    text = importlib.resources.files("ldm_vae").joinpath("model_cards", template).read_text()
    return model_card(metadata, "\n" + string.Template(text).substitute(**fields))


def model_card(metadata: ModelCardData | dict, body: str) -> ModelCard:
    """The card of `metadata` and a Markdown `body`; ModelCardData checks the metadata (a
    `model-index` it cannot read fails here, not on the Hub)."""
    data = metadata if isinstance(metadata, ModelCardData) else ModelCardData(**metadata)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def read_card(card: Path) -> tuple[dict, str]:
    """(metadata, body) of a model card; a missing card is empty."""
    if not card.is_file():
        return {}, ""
    text = card.read_text()
    if not text.startswith("---\n") or "\n---\n" not in text[3:]:
        raise UserError(f"{card} has no YAML metadata block; cannot add to it")
    try:
        parsed = ModelCard(text)
    except (ValueError, yaml.YAMLError) as e:  # YAML syntax, or a model-index ModelCardData cannot read
        reason = str(e).strip().splitlines()[0][:200]
        raise UserError(f"{card}: its YAML metadata cannot be read ({reason}); fix or remove it") from None
    return parsed.data.to_dict(), parsed.text


def put_card_section(body: str, begin: str, end: str, section: str) -> str:
    """`body` with `section` (which starts with the marker `begin` and ends with `end`) in
    place of the one between those markers, or appended: a later run replaces its section."""
    if begin in body:
        before, rest = body.split(begin, 1)
        return before + section + rest.split(end, 1)[1]
    return body.rstrip("\n") + "\n\n" + section + "\n"


def write_card(card: Path, metadata: dict, body: str) -> None:
    """Replace a card with `metadata` and `body` in one rename."""
    atomic_write_text(card, str(model_card(metadata, body)))


# ==============================================================================================
# Pictures
# ==============================================================================================


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> torch.Tensor:
    """[N, C, H, W] -> [C, H', W'], `nrow` images per row, white (1.0) padding around each."""
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = images.new_full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), 1.0)
    for k in range(n):
        y, x = divmod(k, cols)
        top, left = padding + y * (h + padding), padding + x * (w + padding)
        grid[:, top:top + h, left:left + w] = images[k]
    return grid


def save_image(grid_or_batch: torch.Tensor, path, nrow: int = 8) -> None:
    """Save [3, H, W] or [N, 3, H, W] in [-1, 1] as a PNG (a grid for a batch)."""
    x = grid_or_batch.detach().float().cpu()
    if x.dim() == 4:
        x = make_grid(x, nrow)
    arr = x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")


WIDTH, HEIGHT, MARGIN = 640, 280, 44


def save_usage_histogram(counts: torch.Tensor, perplexity: float, path: str | Path, title: str) -> None:
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
    draw.text((x0, 8), f"{title}: {used}/{k} codes hit ({100 * used / k:.1f}%), perplexity {perplexity:.0f}",
              fill="black")
    draw.text((x0, y1 + 8), f"codes ranked by hits (0 .. {k - 1}); hits on a log scale", fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def save_line_plot(series: dict, path: str | Path, title: str, xlabel: str, log_y: bool = False) -> None:
    """Lines of `series` {name: (xs, ys)} on shared axes, a legend, y on a log scale if asked
    (non-positive values are left out there)."""
    def ty(v):
        return math.log10(v) if log_y else v

    points = {k: [(x, ty(y)) for x, y in zip(*xy) if not log_y or y > 0] for k, xy in series.items()}
    xs = [x for p in points.values() for x, _ in p] or [0.0, 1.0]
    ys = [y for p in points.values() for _, y in p] or [0.0, 1.0]
    (xmin, xmax), (ymin, ymax) = (min(xs), max(xs)), (min(ys), max(ys))
    xmax, ymax = (xmax if xmax > xmin else xmin + 1), (ymax if ymax > ymin else ymin + 1)
    legend_h = 14 * len(series)
    img = Image.new("RGB", (WIDTH, HEIGHT + legend_h), "white")
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = MARGIN + 10, 30, WIDTH - 10, HEIGHT - 30
    draw.rectangle([x0, y0, x1, y1], outline="black")

    def at(x, y):
        return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0)

    for i, (name, p) in enumerate(points.items()):
        colour = PALETTE[i % len(PALETTE)]
        if len(p) > 1:
            draw.line([at(x, y) for x, y in p], fill=colour, width=2)
        draw.line([(x0, HEIGHT + 7 + 14 * i), (x0 + 20, HEIGHT + 7 + 14 * i)], fill=colour, width=2)
        draw.text((x0 + 26, HEIGHT + 14 * i), name, fill="black")
    for v, y in ((ymin, y1), (ymax, y0)):
        draw.text((2, y - 6), f"1e{v:.1f}" if log_y else f"{v:.3g}", fill="black")
    draw.text((x0, y1 + 4), f"{xmin:.3g}", fill="black")
    draw.text((x1 - 30, y1 + 4), f"{xmax:.3g}", fill="black")
    draw.text((x0, 8), title, fill="black")
    draw.text((x0 + 60, y1 + 14), xlabel, fill="black")
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
