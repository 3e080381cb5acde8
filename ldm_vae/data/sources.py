"""Data sources -> dicts {"pixel_values": float32 [3, R, R] in [-1, 1], "label": int64 scalar},
plus "caption": str where the dataset `has_captions` (imagefolder/hub with data.caption_column).

Sources (DataConfig.source): fashion-mnist (local idx files, else the hub copy), imagefolder
(HF `datasets` "imagefolder"), hub (a dataset name on the Hugging Face hub), photos (random
crops of the RGB photos shipped inside scikit-image's wheel; the `photos` extra) and wallpapers
(the photographs among Debian's wallpapers plus scikit-image's photos, with whole images held
out for the test split; see Wallpapers).

Augmentation randomness comes from a generator seeded by (seed, epoch, index), never from
the global RNG: an item is augmented the same way whichever process or worker loads it and
whenever it is loaded (accelerate's loader fetches one batch ahead, so global-RNG draws
would land on the wrong side of a checkpoint and break resume).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset

from ..errors import UserError
from .config import SOURCES, DataConfig

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"
_FMNIST_PREFIX = {"train": "train", "test": "t10k"}
_FMNIST_CACHE: dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
# RGB photos that ship inside the scikit-image wheel (no pooch download needed).
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
               "immunohistochemistry", "motorcycle")
_PHOTOS: list[Image.Image] = []
# HFImages: (the scan, decoded images of the first usable rows; None until first read)
_SCANS: dict[tuple, tuple[Scan, list[torch.Tensor | None]]] = {}
# Bump when the scan's rules (what is usable, what is stored) change: old cache files are never read.
SCAN_VERSION = 1
# rows per DataLoader task of a parallel scan (HFImages._scan)
SCAN_BATCH = 64
# a stream's data.max_bad_fraction counts at least this many rows (StreamImages)
STREAM_MIN_ROWS = 1000
logger = logging.getLogger(__name__)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image (any mode) -> float32 [3, H, W] in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class BadImage(Exception):
    """A file that cannot be used as an image (the message says why)."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit gray scaled (not clipped) to 8 bits, transparency composited
    on white, CMYK and palettes converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray((arr / top * 255).clip(0, 255).round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def decode_image(value) -> Image.Image:
    """Decode a file (path, bytes or a datasets Image(decode=False) dict) fully, applying its
    EXIF orientation; raises BadImage for truncated, empty, non-image or oversized files.

    The decompression-bomb guard is PIL's `Image.MAX_IMAGE_PIXELS` (89 M pixels by default),
    checked before pixel memory is allocated.
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    src = io.BytesIO(value) if isinstance(value, bytes) else value
    try:
        with warnings.catch_warnings():  # local: a bomb warning becomes an error for this call only
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(src)
            img.load()  # a full decode: truncated files fail here, not in the training loop
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"larger than the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels") from None
    except Exception as e:  # every decoder error means the same here: the file is not usable
        raise BadImage(_first_line(e)) from None
    return to_rgb(ImageOps.exif_transpose(img))  # phone photos keep their rotation in EXIF


def _maybe_flip(x: torch.Tensor, enabled: bool, g: torch.Generator) -> torch.Tensor:
    return x.flip(-1) if enabled and torch.rand((), generator=g) < 0.5 else x


class Augmented(Dataset):
    """Base of the datasets: per-item generators from (seed, epoch, index)."""

    seed, epoch = 0, 0
    class_names: list[str] | None = None  # label i's name, where the source knows it
    # items carry "caption" (data.caption_column); then `captions[i]` is item i's caption,
    # known without decoding its image
    has_captions = False
    captions: list[str] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def item_generator(self, i: int) -> torch.Generator:
        # hash() of a tuple of ints is stable across runs (PYTHONHASHSEED affects str only)
        return torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & (2**63 - 1))


def _item(x: torch.Tensor, label: int, caption: str | None = None) -> dict:
    item = {"pixel_values": x, "label": torch.tensor(label, dtype=torch.int64)}
    if caption is not None:
        item["caption"] = caption
    return item


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class TensorImages(Augmented):
    """Fashion-MNIST held in memory as uint8 [N, 1, R, R] (resized once at load)."""

    def __init__(self, images, labels, train, flip, description, dataset_id):
        self.images, self.labels = images, labels
        self.flip = train and flip
        self.has_labels, self.description, self.dataset_id = True, description, dataset_id

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i].float().div(127.5).sub(1.0).expand(3, -1, -1).contiguous()
        return _item(_maybe_flip(x, self.flip, self.item_generator(i)), int(self.labels[i]))


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """An idx file: big-endian int32 magic and `ndim` sizes, then uint8 data."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read as gzip ({_first_line(e)})") from None
    head = np.frombuffer(raw[: 4 * (1 + ndim)], dtype=">i4")
    if len(head) != 1 + ndim or head[0] != magic:
        raise UserError(f"{path}: not an idx file (magic {head[0] if len(head) else '?'}, expected {magic})")
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim))
    if data.size != math.prod(head[1:]):
        raise UserError(f"{path}: truncated ({data.size} bytes of data, header says {tuple(head[1:])})")
    return data.reshape(tuple(head[1:])).copy()


def _resize_gray(images: np.ndarray, res: int) -> torch.Tensor:
    """uint8 [N, h, w] -> uint8 [N, 1, res, res]; in chunks so float copies stay small."""
    x = torch.from_numpy(images).unsqueeze(1)
    if x.shape[-2:] == (res, res):
        return x
    out = torch.empty((len(x), 1, res, res), dtype=torch.uint8)
    for s in range(0, len(x), 4096):
        y = F.interpolate(x[s:s + 4096].float() / 255, size=(res, res), mode="bilinear",
                          antialias=True, align_corners=False)
        out[s:s + 4096] = y.clamp(0, 1).mul(255).round().to(torch.uint8)
    return out


FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


def _fashion_mnist(cfg: DataConfig, split: str, train: bool) -> TensorImages:
    if split not in _FMNIST_PREFIX:
        raise UserError(f"fashion-mnist has splits train, test; got '{split}'")
    folder = Path(cfg.path or FASHION_MNIST_DIR)
    names = [f"{_FMNIST_PREFIX[split]}-{k}-ubyte.gz" for k in ("images-idx3", "labels-idx1")]
    have_files = all((folder / n).is_file() for n in names)
    if cfg.path and not have_files:
        missing = "folder does not exist" if not folder.is_dir() else "missing " + ", ".join(
            n for n in names if not (folder / n).is_file())
        raise UserError(f"data.path {folder}: {missing} (fashion-mnist split '{split}' needs {', '.join(names)})")
    where = str(folder) if have_files else f"hub {FASHION_MNIST_HUB}"
    key = (where, split, cfg.resolution)
    if key not in _FMNIST_CACHE:
        if have_files:
            images = _read_idx(folder / names[0], 2051, 3)
            labels = _read_idx(folder / names[1], 2049, 1)
            if len(images) != len(labels):
                raise UserError(f"{folder}: {len(images)} images but {len(labels)} labels in split '{split}'")
        else:
            images, labels = _fashion_mnist_hub(split)
        _FMNIST_CACHE[key] = (_resize_gray(images, cfg.resolution), torch.from_numpy(labels.astype(np.int64)))
    images, labels = _FMNIST_CACHE[key]
    images, labels = images[: cfg.max_images], labels[: cfg.max_images]
    desc = f"Fashion-MNIST ({split}, {len(images)} images, {where}) at {cfg.resolution}x{cfg.resolution}"
    ds = TensorImages(images, labels, train, cfg.random_flip, desc, FASHION_MNIST_HUB)
    ds.class_names = FASHION_MNIST_CLASSES
    return ds


def _fashion_mnist_hub(split: str) -> tuple[np.ndarray, np.ndarray]:
    import datasets

    try:
        ds = datasets.load_dataset(FASHION_MNIST_HUB, split=split)
    except Exception as e:  # offline, hub down, ...: all fixable by the user the same ways
        raise UserError(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR} and the hub copy ({FASHION_MNIST_HUB}) failed to "
            f"load ({_first_line(e)}). Install the Debian package (as root: apt-get install dataset-fashion-mnist), "
            f"or set data.path to a folder holding the four idx .gz files, or go online") from None
    images = np.stack([np.asarray(im.convert("L"), dtype=np.uint8) for im in ds["image"]])
    return images, np.asarray(ds["label"], dtype=np.int64)


# ==============================================================================================
# Image scan and its on-disk cache
# ==============================================================================================


@dataclass
class Scan:
    """What the build-time scan of a split found; stored as JSON in the scan cache."""

    good: list[int]  # the usable rows, in order
    labels: list[int]  # their labels (-1 without a label column)
    captions: list[str] | None  # their captions, or None without data.caption_column
    bad: list[tuple[str, str]]  # (path or "row i", why it cannot be used)
    sizes: list[tuple[int, int]]  # (width, height) of each usable image, EXIF rotation applied


def scan_cache_dir() -> Path:
    """$LDM_VAE_CACHE, else $XDG_CACHE_HOME/ldm-vae (~/.cache/ldm-vae), + scans (the same root as
    evaluation/frechet.py's reference_cache_dir)."""
    root = os.environ.get("LDM_VAE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "ldm-vae"
    return Path(root).expanduser() / "scans"


def folder_digest(root: str | Path) -> str:
    """sha256 of every file's relative path, size and mtime_ns under `root`: stats only, no reads.
    Symlinks are followed (a linked file or folder counts by its target), each real folder once."""
    rows, seen, stack = [], set(), [(Path(root), "")]
    while stack:
        folder, rel = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                name = f"{rel}{entry.name}"
                if entry.is_dir():
                    st = entry.stat()
                    if (st.st_dev, st.st_ino) not in seen:  # a symlink loop is walked once
                        seen.add((st.st_dev, st.st_ino))
                        stack.append((Path(entry.path), name + "/"))
                elif entry.is_file():
                    st = entry.stat()
                    rows.append(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n")
    h = hashlib.sha256()
    for row in sorted(rows):  # scandir order depends on the file system
        h.update(row.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def folder_key(root: str | Path) -> dict:
    """What identifies an image folder's files in the cache keys: its path as given and as
    resolved (`bad` lists the files under the given name) and folder_digest."""
    return {"folder": str(root), "resolved": os.path.realpath(root), "files": folder_digest(root)}


def _resized_size(w: int, h: int, res: int) -> tuple[int, int]:
    """(width, height) of an image once its short side is at the resolution (HFImages._resized)."""
    scale = res / min(w, h)
    return max(res, round(w * scale)), max(res, round(h * scale))


def _sha256(key: dict | None) -> str | None:
    """The cache file name of a key (None: not cached)."""
    return None if key is None else hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_cached(path: Path, key: dict, parse, redo: str):
    """parse(the dict cached at `path`), or None when there is none or it cannot be used (then
    warned, saying what is done instead: `redo`)."""
    try:
        d = json.loads(path.read_text())
        if d.get("key") != key:  # a hash collision or a foreign file
            raise ValueError("written for other settings")
        return parse(d)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # truncated, edited, foreign
        logger.warning("ignoring unreadable image scan cache %s (%s); %s", path, _first_line(e), redo)
        return None


def _write_cached(path: Path, key: dict, payload: dict) -> None:
    """Temp file + rename: concurrent processes (accelerate launch) never see half a file."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, **payload}, f)
        os.replace(tmp, path)
    except OSError as e:  # a read-only or full cache costs a scan next time, nothing else
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        logger.warning("could not cache the image scan in %s (%s)", path, _first_line(e))


def _read_scan(path: Path, key: dict) -> Scan | None:
    """The cached scan at `path`, or None when there is none or it cannot be used (then warned)."""

    def parse(d: dict) -> Scan:
        scan = Scan([int(i) for i in d["good"]], [int(v) for v in d["labels"]],
                    None if d["captions"] is None else [str(c) for c in d["captions"]],
                    [(str(p), str(r)) for p, r in d["bad"]], [(int(w), int(h)) for w, h in d["sizes"]])
        if not len(scan.good) == len(scan.labels) == len(scan.sizes) or (
                scan.captions is not None and len(scan.captions) != len(scan.good)):
            raise ValueError("lists of different lengths")
        if not all(0 <= i < key["rows"] for i in scan.good):
            raise ValueError("rows out of range")
        return scan

    return _read_cached(path, key, parse, "scanning again")


def _check_columns(ds, cfg: DataConfig, dataset_id: str) -> tuple[bool, bool, list[str] | None]:
    """(has captions, has labels, class names or None) of a Hugging Face dataset or stream, after
    checking that its columns hold what data.image_column and data.caption_column name."""
    import datasets

    if cfg.image_column not in ds.column_names:
        raise UserError(f"{dataset_id}: no image column '{cfg.image_column}' (set data.image_column; "
                        f"columns: {', '.join(ds.column_names)})")
    if not isinstance(ds.features[cfg.image_column], datasets.Image):
        raise UserError(f"{dataset_id}: column '{cfg.image_column}' holds {ds.features[cfg.image_column]}, "
                        f"not images (set data.image_column; columns: {', '.join(ds.column_names)})")
    has_captions = cfg.caption_column is not None
    if has_captions:
        _check_caption_column(ds, cfg.caption_column, dataset_id)
    label_feature = ds.features.get(cfg.label_column) if cfg.label_column else None
    # Only integer labels make sense as class ids (for conditioning and model cards).
    has_labels = isinstance(label_feature, datasets.ClassLabel) or (
        isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith("int"))
    names = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
    return has_captions, has_labels, names


def _crop_item(full: torch.Tensor, cfg: DataConfig, train: bool, g: torch.Generator, label: int,
               caption: str | None) -> dict:
    """The item of a resized uint8 image: a random crop (training without data.center_crop) or
    the centre one, then a random flip in training."""
    res = cfg.resolution
    h, w = full.shape[1:]
    if train and not cfg.center_crop:
        left, top = (int(torch.randint(0, n - res + 1, (), generator=g)) for n in (w, h))
    else:
        left, top = (w - res) // 2, (h - res) // 2
    x = full[:, top:top + res, left:left + res].float() / 127.5 - 1.0
    return _item(_maybe_flip(x, train and cfg.random_flip, g), label, caption)


def _resized_pixels(img: Image.Image, res: int) -> np.ndarray:
    """uint8 [3, H, W] with the short side at `res`: the part of loading an item that does not
    depend on the epoch (HFImages keeps it in memory, up to data.decoded_cache_mb)."""
    img = img.convert("RGB").resize(_resized_size(*img.size, res), Image.BICUBIC, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()  # C order, writable


class _ScanRows(Dataset):
    """Row i of a dataset checked for HFImages._scan, in the main process or a DataLoader
    worker: (i, path or None, why it is unusable or None, label, (width, height), caption,
    the resized pixels if i < resize_below, else None)."""

    def __init__(self, ds, cfg: DataConfig, has_labels: bool, resize_below: int):
        self.ds, self.cfg, self.has_labels, self.resize_below = ds, cfg, has_labels, resize_below

    @staticmethod
    def init_worker(max_image_pixels):
        """A worker's decompression-bomb limit is the main process's, also where workers are
        spawned rather than forked."""
        def init(_worker_id: int) -> None:
            Image.MAX_IMAGE_PIXELS = max_image_pixels
        return init

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i: int):
        cfg, row = self.cfg, self.ds[i]
        value = row[cfg.image_column]
        path = value.get("path") if isinstance(value, dict) else None
        try:
            img = decode_image(value)
        except BadImage as e:
            return i, path, str(e), -1, None, None, None
        label = int(row[cfg.label_column]) if self.has_labels else -1
        caption = row[cfg.caption_column] if cfg.caption_column is not None else None
        pixels = _resized_pixels(img, cfg.resolution) if i < self.resize_below else None
        return i, path, None, label, img.size, caption, pixels


class HFImages(Augmented):
    """A Hugging Face dataset of images: resize short side, crop, flip (imagefolder and hub).

    Every file is decoded once when the dataset is first built: files that cannot be used
    (truncated, empty, not images, decompression bombs) are skipped, counted and listed in
    `self.bad`; if more than `data.max_bad_fraction` of them are bad, building fails. The scan's
    result is cached on disk (scan_cache_dir) for an image folder, keyed by its files' stats,
    and for a hub dataset read from the datasets cache, keyed by its fingerprint: a later run
    decodes nothing up front, and fills the decoded-image prefix as items are first read.
    `folder`: an image folder's folder_key, taken before it was loaded; None for a hub dataset.
    """

    def __init__(self, ds, cfg: DataConfig, split: str, train: bool, what: str, dataset_id: str,
                 folder: dict | None = None):
        import datasets

        self.has_captions, self.has_labels, class_names = _check_columns(ds, cfg, dataset_id)
        if class_names is not None:
            self.class_names = class_names
        loaded = ds
        ds = ds.select(range(min(len(ds), cfg.max_images))) if cfg.max_images is not None else ds
        # our own decoder (decode_image), so a broken file is a counted skip, not a crash
        self.ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
        self.cfg, self.train = cfg, train
        cache_key = self._cache_key(loaded, split, dataset_id, folder)
        self.scan_file = scan_cache_dir() / f"{_sha256(cache_key)}.json" if cache_key else None
        # the train and eval views of a split, and the export after training, share one scan
        key = (what, split, len(self.ds), getattr(self.ds, "_fingerprint", None), _sha256(cache_key),
               Image.MAX_IMAGE_PIXELS, cfg.resolution, cfg.decoded_cache_mb, cfg.image_column,
               cfg.label_column if self.has_labels else None, cfg.caption_column)
        if key not in _SCANS:
            scan = _read_scan(self.scan_file, cache_key) if self.scan_file else None
            if scan is None:
                scan, decoded = self._scan(split, dataset_id)
                if self.scan_file:
                    _write_cached(self.scan_file, cache_key, vars(scan))
            else:  # slots of the same prefix the scan would have decoded, filled on first read
                logger.info("%s (%s): image scan read from %s", what, split, self.scan_file)
                decoded = [None] * self._prefix_len(scan.sizes)
            _SCANS[key] = scan, decoded
        scan, self.decoded = _SCANS[key]
        self.good, self.labels, self.captions, self.bad = scan.good, scan.labels, scan.captions, scan.bad
        limit = cfg.max_bad_fraction  # checked here, not in the scan: a cached scan meets today's limit
        if len(self.ds) == 0 or len(self.bad) > limit * len(self.ds):
            listed = "; ".join(f"{p}: {r}" for p, r in self.bad[:5])
            raise UserError(f"{what} ({split}): {len(self.bad)} of {len(self.ds)} files cannot be used as images, "
                            f"more than data.max_bad_fraction={limit} ({listed}{' ...' if len(self.bad) > 5 else ''}"
                            f"); remove or fix them, or raise data.max_bad_fraction")
        skipped = f", {len(self.bad)} unusable files skipped" if self.bad else ""
        self.description = (f"{what} ({split}, {len(self.good)} images{skipped}) "
                            f"at {cfg.resolution}x{cfg.resolution}")
        self.dataset_id = dataset_id

    def _cache_key(self, loaded, split: str, dataset_id: str, folder: dict | None) -> dict | None:
        """What the scan's result depends on, or None where it cannot be told without reading
        the data (a hub dataset held in memory: its fingerprint is random per process).

        In it: the files (an image folder's paths, sizes and mtimes, or the datasets
        fingerprint of the hub split, which changes with its revision and files), the split, how
        many rows are scanned (the first ones; data.max_images), the columns read (image; label
        only if it is used; caption), the decompression-bomb limit and the decoder and loader versions (they decide what is bad
        and the row order). Not in it: resolution, crops, flips and decoded_cache_mb (how items
        are made from a usable file, not which files are usable) and max_bad_fraction (checked
        after the scan, also on a cached one).
        """
        import datasets
        import PIL

        cfg = self.cfg
        if folder is not None:
            files = folder
        elif getattr(loaded, "cache_files", None) and isinstance(getattr(loaded, "_fingerprint", None), str):
            files = {"dataset": dataset_id, "fingerprint": loaded._fingerprint}
        else:
            return None
        return {"version": SCAN_VERSION, **files, "split": split, "rows": len(self.ds),
                "image_column": cfg.image_column, "label_column": cfg.label_column if self.has_labels else None,
                "caption_column": cfg.caption_column, "max_image_pixels": Image.MAX_IMAGE_PIXELS,
                "pillow": PIL.__version__, "datasets": datasets.__version__}

    def _prefix_len(self, sizes: list[tuple[int, int]]) -> int:
        """How many usable images, from the first, fit in data.decoded_cache_mb; the scan
        (_scan) keeps exactly these decoded."""
        budget, res = self.cfg.decoded_cache_mb * 2**20, self.cfg.resolution
        for n, (w, h) in enumerate(sizes):
            budget -= 3 * math.prod(_resized_size(w, h, res))  # uint8 [3, H, W]
            if budget < 0:
                return n
        return len(sizes)

    def _scan(self, split: str, dataset_id: str) -> tuple[Scan, list[torch.Tensor | None]]:
        """Decode every row, in data.num_workers DataLoader workers when there are any: the Scan,
        and the decoded images of its _prefix_len first usable rows (a slot the workers did not
        resize, possible only after bad rows, is None and filled on first read)."""
        from tqdm.auto import tqdm

        res = self.cfg.resolution
        # usable row j can be in the prefix only if j * (smallest resized image) fits the budget
        rows = _ScanRows(self.ds, self.cfg, self.has_labels,
                         resize_below=self.cfg.decoded_cache_mb * 2**20 // (3 * res * res) + 1)
        workers = self.cfg.num_workers if len(rows) >= 2 * SCAN_BATCH else 0
        if workers:
            from torch.utils.data import DataLoader

            # in order (no sampler shuffles), a batch of rows per task: the scan is the same
            # as one process's; numpy arrays travel pickled, not as one shared-memory file each
            loader = DataLoader(rows, batch_size=SCAN_BATCH, num_workers=workers, collate_fn=list,
                                worker_init_fn=_ScanRows.init_worker(Image.MAX_IMAGE_PIXELS))
            checked = (row for batch in loader for row in batch)
        else:
            checked = map(rows.__getitem__, range(len(rows)))
        scan = Scan([], [], [] if self.has_captions else None, [], [])
        decoded, budget = [], self.cfg.decoded_cache_mb * 2**20
        for i, path, why, label, size, caption, pixels in tqdm(
                checked, total=len(rows), desc=f"checking images of {split}", leave=False, disable=len(rows) < 1000):
            if why is not None:
                scan.bad.append((path or f"row {i}", why))
                continue
            scan.good.append(i)
            scan.labels.append(label)
            scan.sizes.append(size)
            if scan.captions is not None:
                scan.captions.append(_checked_caption(caption, self.cfg, dataset_id, path or f"row {i}",
                                                      self.ds.column_names))
            if len(decoded) == len(scan.good) - 1:  # a prefix of the usable rows, as _prefix_len counts it
                budget -= 3 * math.prod(_resized_size(*size, res))
                if budget >= 0:
                    decoded.append(None if pixels is None else torch.from_numpy(pixels))
        return scan, decoded

    def __len__(self):
        return len(self.good)

    def __getitem__(self, i):
        g = self.item_generator(i)
        full = self.decoded[i] if i < len(self.decoded) else None  # no row read: the scan kept the label
        if full is None:
            full = torch.from_numpy(_resized_pixels(decode_image(self.ds[self.good[i]][self.cfg.image_column]),
                                                    self.cfg.resolution))
            if i < len(self.decoded):  # a slot of a scan read from the cache: filled on first read
                self.decoded[i] = full
        caption = self.captions[i] if self.has_captions else None
        return _crop_item(full, self.cfg, self.train, g, self.labels[i], caption)


class StreamImages(Augmented, IterableDataset):
    """A hub dataset or image folder read as a stream (data.streaming, train-vae only): nothing is
    downloaded or scanned up front. Rows are shuffled in a buffer of data.shuffle_buffer rows,
    reseeded per epoch (datasets' IterableDataset.shuffle + set_epoch), so an epoch's order
    depends only on (seed, epoch). Unusable files are skipped as they are read: each is logged
    with its path, and an item carries `skipped`, how many rows its reader skipped since its
    previous item, for the run's count. A reader stops the run once more than
    data.max_bad_fraction of its rows (counted from at least STREAM_MIN_ROWS) were bad.

    In DataLoader workers (data.num_workers) datasets deals the stream's shards to the workers;
    under `accelerate launch` the main process reads the stream and Accelerate sends each
    process its part of every batch (dispatch_batches, Accelerate's default for iterable
    datasets). The random crop and flip of an item come from (seed, epoch, its position in its
    reader's part, the reader): the same for the same settings, which is what resume needs.
    """

    def __init__(self, stream, cfg: DataConfig, split: str, train: bool, what: str, dataset_id: str):
        import datasets

        if stream.features is None:  # a hub dataset without dataset info: typed from its first row
            stream = stream._resolve_features()
        self.has_captions, self.has_labels, class_names = _check_columns(stream, cfg, dataset_id)
        if class_names is not None:
            self.class_names = class_names
        stream = stream.take(cfg.max_images) if cfg.max_images is not None else stream
        # our own decoder (decode_image), so a broken file is a counted skip, not a crash
        self.stream = stream.cast_column(cfg.image_column, datasets.Image(decode=False))
        self.cfg, self.train, self.split = cfg, train, split
        self.bad: list[tuple[str, str]] = []  # not known ahead of reading
        shuffled = f", shuffled in a buffer of {cfg.shuffle_buffer} rows" if train else ""
        self.description = (f"{what} ({split}, streamed{shuffled}; unusable files skipped as read) "
                            f"at {cfg.resolution}x{cfg.resolution}")
        self.dataset_id = dataset_id

    def __iter__(self):
        from torch.utils.data import get_worker_info

        cfg, stream = self.cfg, self.stream
        if self.train:
            stream = stream.shuffle(seed=self.seed, buffer_size=cfg.shuffle_buffer)
            stream.set_epoch(self.epoch)
        worker = get_worker_info()
        reader, readers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        seen = bad = skipped = 0
        for k, row in enumerate(stream):  # in a worker: the rows of its shards only
            value, seen = row[cfg.image_column], seen + 1
            where = (value.get("path") if isinstance(value, dict) else None) or f"row {k} of reader {reader}"
            try:
                img = decode_image(value)
            except BadImage as e:
                bad, skipped = bad + 1, skipped + 1
                logger.warning("skipping %s of %s (%s): %s", where, self.dataset_id, self.split, e)
                if bad > cfg.max_bad_fraction * max(seen, STREAM_MIN_ROWS):
                    raise UserError(f"{self.dataset_id} ({self.split}): {bad} of the first {seen} rows read cannot "
                                    f"be used as images, more than data.max_bad_fraction={cfg.max_bad_fraction}; "
                                    f"remove or fix them, or raise data.max_bad_fraction") from None
                continue
            caption = (_checked_caption(row[cfg.caption_column], cfg, self.dataset_id, where,
                                        stream.column_names) if self.has_captions else None)
            label = int(row[cfg.label_column]) if self.has_labels else -1
            full = torch.from_numpy(_resized_pixels(img, cfg.resolution))
            item = _crop_item(full, cfg, self.train, self.item_generator(k * readers + reader), label, caption)
            item["skipped"] = torch.tensor(skipped)
            skipped = 0
            yield item


def _checked_caption(caption, cfg: DataConfig, dataset_id: str, where: str, columns: list[str]) -> str:
    """A row's caption, or a stop naming the row: not a string, e.g. a metadata.jsonl line
    without the key (None)."""
    if not isinstance(caption, str):
        raise UserError(f"{dataset_id}: column '{cfg.caption_column}' holds {caption!r}, not a caption, for {where} "
                        f"(set data.caption_column; columns: {', '.join(columns)})")
    return caption


def _check_caption_column(ds, column: str, dataset_id: str) -> None:
    """data.caption_column names a column of text (each row's string is checked by the scan)."""
    import datasets

    columns = ", ".join(ds.column_names)
    if column not in ds.column_names:
        raise UserError(f"{dataset_id}: no caption column '{column}' (set data.caption_column; columns: {columns}; an "
                        f"image folder gets columns from a metadata.jsonl with file_name and e.g. text)")
    feature = ds.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise UserError(f"{dataset_id}: column '{column}' holds {feature}, not caption strings (set "
                        f"data.caption_column; columns: {columns})")


def imagefolder_data_files(path: str, folder: dict):
    """The data files of every split of image folder `path` (its folder_key: `folder`), as
    load_dataset("imagefolder", data_dir=path) resolves them (datasets' load.py,
    PackagedDatasetModuleFactory.get_module); read from the scan cache when the folder is unchanged.

    Why cached: datasets infers the splits by globbing 66 patterns over the whole folder through
    fsspec on every call, about 94% of load_dataset's time on an unchanged folder (BENCHMARKS.md,
    "Image scan"). The listing depends only on the folder's paths and on the datasets and fsspec
    versions; given the same data files, the builder infers the same labels and class names.
    """
    import datasets
    import fsspec
    from datasets.data_files import DataFilesDict, DataFilesList, get_data_patterns

    key = {"version": SCAN_VERSION, "of": "data_files", **folder, "datasets": datasets.__version__,
           "fsspec": fsspec.__version__}
    file = scan_cache_dir() / f"{_sha256(key)}.json"

    def parse(d: dict) -> DataFilesDict:
        out = DataFilesDict()
        for split, v in d["splits"].items():
            # origin_metadata (each file's mtime) goes into the builder's config hash, hence its arrow cache
            files, origin = [str(f) for f in v["files"]], [tuple(str(m) for m in meta) for meta in v["origin"]]
            if len(files) != len(origin):
                raise ValueError("lists of different lengths")
            out[split] = DataFilesList(files, origin)
        return out

    data_files = _read_cached(file, key, parse, "listing the folder again")
    if data_files is None:
        base = Path(path).expanduser().resolve().as_posix()  # as get_module resolves data_dir
        try:
            resolved = DataFilesDict.from_patterns(get_data_patterns(base), base_path=base)
        except (OSError, ValueError) as e:  # e.g. no data files (EmptyDatasetError): load_dataset's message
            raise UserError(f"could not load image folder {path} ({_first_line(e)})") from None
        # str split names, as load_dataset's sanitize_patterns makes them: a cached listing then
        # hashes as this one does, and the second run reuses the first run's arrow cache
        data_files = DataFilesDict({str(split): files for split, files in resolved.items()})
        _write_cached(file, key, {"splits": {split: {"files": list(files), "origin": files.origin_metadata}
                                             for split, files in data_files.items()}})
    return data_files


def _load_hf(what: str, hint: str = "", **kwargs):
    import datasets

    try:
        return datasets.load_dataset(**kwargs)
    except Exception as e:  # re-raised as a one-line message; the cause is named in it
        raise UserError(f"could not load {what} ({_first_line(e)}){hint}") from None


# ==============================================================================================
# Photo crops: scikit-image's photos and the wallpaper corpus
# ==============================================================================================


def _load_photos(source: str = "photos") -> list[Image.Image]:
    """scikit-image's RGB photos (PHOTO_NAMES), decoded once per process."""
    if not _PHOTOS:
        try:
            import skimage.data
        except ImportError as e:
            raise UserError(f"data.source={source} needs scikit-image ({_first_line(e)}); install it with "
                            f'pip install "ldm-vae[photos]"') from None

        for name in PHOTO_NAMES:
            arr = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
            assert arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8, (name, arr.shape, arr.dtype)
            _PHOTOS.append(Image.fromarray(arr))
    return _PHOTOS


def _check_split(source: str, split: str) -> None:
    if split not in ("train", "test"):
        raise UserError(f"{source} has splits train, test; got '{split}'")


class PhotoCrops(Augmented):
    """Square crops of photos held in memory (PIL images), resized to data.resolution.

    Subclasses say which photo and box each item is (`_box`); the crop, the resize and the flip
    are shared. `train=False` keeps the epoch at 0: a train split's crops are then the same
    every time. Label: the photo's index where `has_labels`, else -1.
    """

    def __init__(self, photos: list[Image.Image], n: int, cfg: DataConfig, split: str, train: bool):
        self.photos, self.res, self.split = photos, cfg.resolution, split
        self.flip = train and cfg.random_flip
        self.n = min(n, cfg.max_images) if cfg.max_images is not None else n

    def __len__(self):
        return self.n

    def _box(self, i: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """(photo index, left, top, side) of item i; random draws come from g."""
        raise NotImplementedError

    def _corner(self, w: int, h: int, crop: int, g: torch.Generator, cell: int | None, grid: int) -> tuple[int, int]:
        """(left, top) of a crop: random (cell None), else cell `cell` of a grid x grid lattice spanning the photo."""
        if cell is None:
            left, top = (int(torch.randint(0, n - crop + 1, (), generator=g)) for n in (w, h))
            return left, top
        row, col = divmod(cell, grid)
        return (w - crop) * col // (grid - 1), (h - crop) * row // (grid - 1)

    def __getitem__(self, i):
        g = self.item_generator(i)
        p, left, top, crop = self._box(i, g)
        patch = self.photos[p].crop((left, top, left + crop, top + crop))
        patch = patch.resize((self.res, self.res), Image.BICUBIC, reducing_gap=3.0)
        return _item(_maybe_flip(pil_to_tensor(patch), self.flip, g), p if self.has_labels else -1)


class Photos(PhotoCrops):
    """Crops of scikit-image's RGB photos. train split: random crops; test split: a fixed 4x4 grid.
    The test crops come from the same photos as the training crops (a smoke-test source; the
    wallpapers source holds whole images out)."""

    GRID = 4

    def __init__(self, cfg: DataConfig, split: str, train: bool):
        _check_split("photos", split)
        photos = _load_photos()
        n = cfg.photos_per_epoch if split == "train" else len(photos) * self.GRID**2
        super().__init__(photos, n, cfg, split, train)
        kind = "random crops" if split == "train" else f"{self.GRID}x{self.GRID} grid crops"
        self.has_labels, self.dataset_id = True, "skimage-photos"
        self.description = (f"scikit-image photos ({split}, {self.n} {kind} of {len(self.photos)} photos) "
                            f"at {self.res}x{self.res}")

    def _box(self, i, g):
        if self.split == "train":
            p, cell = int(torch.randint(0, len(self.photos), (), generator=g)), None
        else:
            p, cell = divmod(i, self.GRID**2)
        w, h = self.photos[p].size
        # Half the short side: a real-world object scale (not texture noise), yet many distinct
        # positions per photo, so 8 photos give plenty of different RGB patches for smoke tests.
        # Never below the resolution (no upsampling unless the photo itself is smaller).
        crop = min(max(min(w, h) // 2, self.res), w, h)
        return (p, *self._corner(w, h, crop, g, cell, self.GRID), crop)


# Debian packages with wallpapers: (folder, glob of one wallpaper's files given its name). A Plasma
# wallpaper ships several resolutions of the same picture; the largest one is used.
WALLPAPER_PACKAGES = {
    "plasma-workspace-wallpapers": ("/usr/share/wallpapers", "{}/contents/images/*"),
    "mate-backgrounds": ("/usr/share/backgrounds/mate/nature", "{}.*"),
    "gnome-backgrounds": ("/usr/share/backgrounds/gnome", "{}.*"),
    "lomiri-wallpapers-16.04": ("/usr/share/backgrounds", "{}.*"),
}
# The wallpapers that are photographs, chosen by looking at every one (Debian 12:
# plasma-workspace-wallpapers 5.27, all LGPL-3 by their metadata.json; mate-backgrounds 1.26, its
# `nature/` folder, GPL-2+; lomiri-wallpapers-16.04 20.04.0, Ubuntu's 2018 photo contest, each
# CC BY 4.0, CC BY-SA 4.0 or CC0 by its copyright file). The other Plasma wallpapers and all of
# gnome-backgrounds are rendered or painted art: WALLPAPER_ART (MATE's other folders are art too,
# and unused, like Lomiri's umang, analogpattern and greentock: art or a texture, not a scene).
WALLPAPER_PHOTOS = {
    "plasma-workspace-wallpapers": ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow",
                                    "FallenLeaf", "Grey", "Kite", "OneStandsOut", "Path", "summer_1am"),
    "mate-backgrounds": ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops",
                         "Storm", "TwoWings", "Wood", "YellowFlower"),
    "lomiri-wallpapers-16.04": ("Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace",
                                "Picture_1A_by_freespace", "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi",
                                "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi", "life_by_Aitzol_Berasategi",
                                "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt",
                                "sunset_by_Aitzol_Berasategi"),
}
# data.wallpaper_art adds these to the training split: each design once (Plasma's light
# `images/` folder, not `images_dark/`; GNOME's light `-l` variant; not GNOME's flat vnc-*).
WALLPAPER_ART = {
    "plasma-workspace-wallpapers": (
        "Altai", "Autumn", "Canopee", "Cascade", "Cluster", "Elarun", "Flow", "FlyingKonqui", "Honeywave", "IceCold",
        "Kay", "Kokkini", "MilkyWay", "Opal", "PastelHills", "Patak", "SafeLanding", "Shell", "Volna"),
    "gnome-backgrounds": ("adwaita-l", "grid-l", "licorice-l", "pixels-l", "symbolic-l", "truchet-l", "wood-l"),
}
# The test split: whole photographs that training never sees (5 of 43). Chosen to cover the
# failure cases of issue 20: blue sky (Kite: colour cast), a smooth gradient with reflections
# (summer_1am: borders on flat images), fine natural texture (OneStandsOut), saturated colours
# with hard edges (ColorfulCups) and fur (scikit-image's chelsea).
WALLPAPERS_HELD_OUT = ("Kite", "OneStandsOut", "summer_1am", "ColorfulCups", "chelsea")
_CAPPED: dict[tuple[str, int], Image.Image] = {}  # (file or skimage:name, max_side) -> downscaled image


def _install_hint(packages) -> str:
    return f"install as root: apt-get install -y {' '.join(packages)}"


def _wallpaper_files(package: str, names: tuple[str, ...]) -> dict[str, Path]:
    """name -> the largest file (by pixels, from its header) of each wallpaper of `package` that is
    installed; a UserError when none is."""
    folder, pattern = WALLPAPER_PACKAGES[package]
    found = {}
    for name in names:
        sizes = {}
        for f in sorted(Path(folder).glob(pattern.format(name))):
            try:
                with Image.open(f) as img:  # the header only
                    sizes[f] = img.width * img.height
            except OSError as e:  # e.g. GNOME's .xml slide shows: not an image
                logger.debug("%s: not an image (%s)", f, _first_line(e))
        if sizes:
            found[name] = max(sizes, key=sizes.get)
    if not found:
        where = "does not exist" if not Path(folder).is_dir() else "holds none of the wallpapers this source uses"
        raise UserError(f"data.source=wallpapers needs Debian's {package} ({folder} {where}); "
                        f"{_install_hint(WALLPAPER_PACKAGES)}")
    if len(found) < len(names):
        logger.warning("%s: %d of the %d wallpapers used are not installed (%s): another package version; this "
                       "corpus differs from the documented one", package, len(names) - len(found), len(names),
                       ", ".join(n for n in names if n not in found))
    return found


def _capped(key: str, max_side: int, load) -> Image.Image:
    """The image `load()` gives, downscaled (bicubic, antialiased) so its longer side is at most
    `max_side`; loaded once per process."""
    if (key, max_side) not in _CAPPED:
        img = load()
        scale = max_side / max(img.size)
        if scale < 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC,
                             reducing_gap=3.0)
        _CAPPED[key, max_side] = img
    return _CAPPED[key, max_side]


def _decode_wallpaper(path: Path) -> Image.Image:
    try:
        return decode_image(str(path))
    except BadImage as e:
        raise UserError(f"{path}: cannot be decoded ({e}); reinstall its package "
                        f"(apt-get install --reinstall)") from None


def wallpaper_corpus(split: str, art: bool, max_side: int) -> list[tuple[str, Image.Image]]:
    """(name, image with its longer side at most max_side) of the wallpapers source's split: the
    photographs in WALLPAPERS_HELD_OUT for "test", the others (and the art, if `art`) for "train"."""
    held_out = split == "test"
    files = {}
    for package, names in WALLPAPER_PHOTOS.items():
        wanted = tuple(n for n in names if (n in WALLPAPERS_HELD_OUT) == held_out)
        if wanted:  # a package that holds none of this split's images need not be installed
            files.update(_wallpaper_files(package, wanted))
    if art and not held_out:
        for package, names in WALLPAPER_ART.items():
            files.update(_wallpaper_files(package, names))
    corpus = [(name, _capped(str(path), max_side, lambda path=path: _decode_wallpaper(path)))
              for name, path in files.items()]
    photos = _load_photos("wallpapers")
    corpus += [(name, _capped(f"skimage:{name}", max_side, lambda img=img: img))
               for name, img in zip(PHOTO_NAMES, photos) if (name in WALLPAPERS_HELD_OUT) == held_out]
    return corpus


class Wallpapers(PhotoCrops):
    """Crops of an offline corpus of natural photographs: the Debian wallpapers that are
    photographs (WALLPAPER_PHOTOS: plasma-workspace-wallpapers, mate-backgrounds and
    lomiri-wallpapers-16.04) and scikit-image's photos.

    Test split: whole images held out of training (WALLPAPERS_HELD_OUT, a fixed list: never a
    crop of a training image), each cut into a fixed grid of crops at fixed scales. Train split:
    the other 38 images; with data.wallpaper_art also the rendered and painted wallpapers
    (WALLPAPER_ART, plasma-workspace-wallpapers and gnome-backgrounds), in training only, so the
    test split stays the same photographs.

    Each file is decoded once per process and kept downscaled (longer side at most
    data.max_side); crops come from that copy. A crop's side is drawn log-uniformly between
    data.resolution and the copy's short side, then resized to the resolution: from the finest
    detail the copy keeps to the whole scene, every scale equally often (the random-size crops of
    GoogLeNet's training, arXiv:1409.4842, log-uniform here). The cap sets the finest scale: at
    1024 a 2560x1600 wallpaper is downscaled at least 2.5x and a 5120x2880 one 5x; it also bounds
    memory (about 2 MB per image). Images are drawn uniformly, whatever their size. No labels:
    held-out images share no class with the training ones.

    Licences (README, "Data"): plasma-workspace-wallpapers is GPL-2+ by its Debian copyright file
    (/usr/share/doc/plasma-workspace-wallpapers/copyright), each photograph LGPL-3 by its
    metadata.json; mate-backgrounds GPL-2+ by its copyright file (/usr/share/doc/mate-backgrounds/
    copyright); lomiri-wallpapers-16.04 CC BY 4.0, CC BY-SA 4.0 or CC0 per photograph by its
    copyright file; gnome-backgrounds (art only) GPL-2+, adwaita* CC BY-SA 3.0 by its copyright
    file; scikit-image's photos public domain or CC0 by skimage.data's docstrings, except the
    motorcycle (Middlebury 2014 stereo benchmark; no licence stated).
    """

    SCALES, GRID = 3, 3  # test split: crops at 3 scales x a 3x3 grid of positions per image

    def __init__(self, cfg: DataConfig, split: str, train: bool):
        _check_split("wallpapers", split)
        corpus = wallpaper_corpus(split, cfg.wallpaper_art, cfg.max_side)
        self.names = [name for name, _ in corpus]
        n = cfg.photos_per_epoch if split == "train" else len(corpus) * self.SCALES * self.GRID**2
        super().__init__([img for _, img in corpus], n, cfg, split, train)
        self.has_labels, self.dataset_id = False, "debian-wallpapers"
        kind = ("random crops" if split == "train"
                else f"crops at {self.SCALES} scales x {self.GRID}x{self.GRID} positions")
        of = f"{len(corpus)} held-out images" if split == "test" else f"{len(corpus)} images"
        art = ", art included" if cfg.wallpaper_art and split == "train" else ""
        self.description = (f"Debian wallpaper photographs + scikit-image photos ({split}, {self.n} {kind} of {of}"
                            f"{art}) at {self.res}x{self.res}")

    def _box(self, i, g):
        if self.split == "train":
            p, cell = int(torch.randint(0, len(self.photos), (), generator=g)), None
            t = float(torch.rand((), generator=g))
        else:  # image index fastest: any prefix (data.max_images, eval's num_images) covers every image
            k, p = divmod(i, len(self.photos))
            scale, cell = divmod(k, self.GRID**2)
            t = (scale + 0.5) / self.SCALES  # the middles of equal thirds of the train split's log range
        w, h = self.photos[p].size
        # log-uniform side: from the finest detail the downscaled copy keeps (data.resolution) to
        # the whole short side; never below the resolution unless the photo itself is smaller
        lo, hi = math.log(min(self.res, w, h)), math.log(min(w, h))
        crop = min(round(math.exp(lo + (hi - lo) * t)), w, h)
        return (p, *self._corner(w, h, crop, g, cell, self.GRID), crop)


def first_items(dataset, n: int) -> list[dict]:
    """The first n items of a dataset, or of a stream's current epoch, read in this process
    (fewer if there are fewer)."""
    if isinstance(dataset, IterableDataset):
        return list(itertools.islice(iter(dataset), n))
    return [dataset[i] for i in range(min(n, len(dataset)))]


def hub_dataset_id(source: str, name: str | None = None) -> str | None:
    """The Hugging Face Hub id of a source's data (for model cards' `datasets:`), or None:
    the photos, the wallpapers and local image folders are on no hub."""
    return {"fashion-mnist": FASHION_MNIST_HUB, "hub": name}.get(source)


def build_dataset(cfg: DataConfig, split: str, train: bool, seed: int = 0, stream: bool = False) -> Augmented:
    """The dataset for `split`; `train` turns on random flips/crops (else deterministic).
    `stream`: the caller reads a StreamImages where data.streaming asks for one (train-vae);
    every other caller needs indexed items, and data.streaming makes it stop with a message."""
    if cfg.streaming and not stream:
        raise UserError("data.streaming=true is read by train-vae only: this command reads the split's images by "
                        "index; set data.streaming=false (the split is then downloaded and scanned once, and the "
                        "scan is cached)")
    dataset = _build(cfg, split, train)
    dataset.seed = seed
    return dataset


def _build(cfg: DataConfig, split: str, train: bool) -> Augmented:
    if cfg.source == "fashion-mnist":
        return _fashion_mnist(cfg, split, train)
    if cfg.source == "photos":
        return Photos(cfg, split, train)
    if cfg.source == "wallpapers":
        return Wallpapers(cfg, split, train)
    if cfg.source == "imagefolder":
        if not cfg.path or not Path(cfg.path).is_dir():
            raise UserError(f"data.path {cfg.path}: image folder does not exist")
        # taken before loading: a file that changes while it loads misses the cache next time,
        # rather than being cached under the new fingerprint with its old contents
        folder = folder_key(cfg.path)
        # All splits, to list them on a typo (a folder without split subfolders has only "train").
        splits = _load_hf(f"image folder {cfg.path}", path="imagefolder", streaming=cfg.streaming,
                          data_files=imagefolder_data_files(cfg.path, folder))
        if split not in splits:
            raise UserError(f"image folder {cfg.path} has no split '{split}' (available: {', '.join(splits)})")
        if cfg.streaming:
            return StreamImages(splits[split], cfg, split, train, f"imagefolder {cfg.path}", "imagefolder")
        return HFImages(splits[split], cfg, split, train, f"imagefolder {cfg.path}", "imagefolder", folder)
    if cfg.source == "hub":
        hint = "; hub datasets need internet (offline, use data.source=imagefolder with a local folder)"
        ds = _load_hf(f"hub dataset '{cfg.name}' split '{split}'", hint, path=cfg.name, split=split,
                      streaming=cfg.streaming)
        if cfg.streaming:
            return StreamImages(ds, cfg, split, train, f"hub dataset {cfg.name}", cfg.name)
        return HFImages(ds, cfg, split, train, f"hub dataset {cfg.name}", cfg.name)
    raise UserError(f"unknown data.source '{cfg.source}' ({', '.join(SOURCES)})")
