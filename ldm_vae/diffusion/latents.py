"""Latent cache: a dataset split encoded once by an exported autoencoder, as safetensors shards.

A latent diffusion model trains on latents, not pixels; encoding every image every epoch
would spend most of each step in the encoder. `ldm-vae encode` writes:

    OUT/shard-00000.safetensors ...   KL: "mean", "std" (the posterior, so training draws a
                                      fresh sample each time, not one frozen sample);
                                      VQ: "latents" (`encode(x).latents`, which
                                      `VQModel.decode` quantizes); DC: "latents"
                                      (`encode(x).latent`); "labels" when the source
                                      has them; "caption" (int64, an index into captions.json)
                                      when it has captions; "*_flipped" twins of the latents
                                      when data.random_flip is on (a flipped row keeps its
                                      label and caption)
    OUT/captions.json                 with data.caption_column only: the distinct captions, a
                                      JSON list of strings (`read_captions`)
    OUT/cache.json                    what was encoded with what: the autoencoder's path and
                                      fingerprint, scaling/shift factors, shapes, counts,
                                      sha256 of every shard and of captions.json

Shards are written atomically one by one and cache.json last, so an interrupted run
continues where it stopped, and a finished cache is reused (the command is idempotent).
Latents are stored UNSCALED; `LatentDataset` applies `(z - shift) * scale` exactly once.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import BinaryIO

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..autoencoder.models import deterministic_latent, load_autoencoder
from ..data.config import DataConfig
from ..data.sources import build_dataset
from ..errors import UserError
from ..files import atomic_write_text, disk_full, sha256, write_failed
from ..run.processes import process_state

CACHE_FILE = "cache.json"
PARTIAL_FILE = "cache.partial.json"
CAPTIONS_FILE = "captions.json"


def fingerprint(model_dir: str | Path) -> str:
    """sha256 of an export's config.json and weights: a cache belongs to exactly these."""
    return sha256(Path(model_dir) / "config.json", Path(model_dir) / "diffusion_pytorch_model.safetensors")


def _shard_path(out: Path, i: int) -> Path:
    return out / f"shard-{i:05d}.safetensors"


@torch.no_grad()
def encode_dataset(model_dir: str | Path, data: DataConfig, split: str, out: str | Path, batch_size: int = 256,
                   shard_size: int = 10_000, device: str = "cpu", overwrite: bool = False) -> dict:
    """Encode `split` of `data` with the autoencoder in `model_dir` into `out`; returns cache.json's content.

    Under `accelerate launch` the shards still to write are dealt out to the processes in turn
    (shard i of the list to process i mod N): a shard's rows, batches and so its bytes are the
    same whichever process encodes it, so N processes write the cache one process writes (same
    device type and threads per process). Every process checks the folder (they all fail alike), the main process alone
    deletes, and writes cache.json once every shard is on disk."""
    state = process_state()
    out, model_dir = Path(out), Path(model_dir).resolve()
    vae = load_autoencoder(model_dir).to(device).eval()
    with state.main_process_first():  # one scan of the images, then the others read its cache
        dataset = build_dataset(data, split, train=False)  # centre crops, no random flip: flips are stored
    meta = {
        "autoencoder": str(model_dir), "fingerprint": fingerprint(model_dir), "kind": type(vae).__name__,
        "scaling_factor": vae.config.scaling_factor, "shift_factor": getattr(vae.config, "shift_factor", None),
        "data": _data_key(data), "dataset": dataset.description, "dataset_id": dataset.dataset_id,
        "split": split, "num_images": len(dataset), "flipped": data.random_flip,
        "has_labels": dataset.has_labels, "class_names": dataset.class_names, "shard_size": shard_size,
        "has_captions": dataset.has_captions,
    }
    key = {k: meta[k] for k in ("fingerprint", "data", "split", "num_images", "flipped", "shard_size")}
    if (out / CACHE_FILE).is_file():
        done = json.loads((out / CACHE_FILE).read_text())
        if {k: done.get(k) for k in key} == key:
            return done  # already encoded: nothing to do
        if not overwrite:
            raise UserError(f"{out} holds latents of another autoencoder or dataset ({done['autoencoder']}, "
                            f"{done['dataset']}); choose another --out or pass --overwrite")
    if (out / PARTIAL_FILE).is_file() and json.loads((out / PARTIAL_FILE).read_text()) != key and not overwrite:
        raise UserError(f"{out} holds an unfinished cache of another autoencoder or dataset; choose another --out "
                        f"or pass --overwrite")
    num_shards = -(-len(dataset) // shard_size)
    state.wait_for_everyone()  # every process has checked the folder (and fails alike) before it changes
    if state.is_main_process:
        if overwrite:
            for f in [*out.glob("shard-*.safetensors"), out / CACHE_FILE, out / PARTIAL_FILE, out / CAPTIONS_FILE]:
                f.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / PARTIAL_FILE).write_text(json.dumps(key))
    state.wait_for_everyone()
    todo = [i for i in range(num_shards) if not _shard_path(out, i).is_file()]
    state.wait_for_everyone()  # every process has listed the shards before any writes one
    caption_index = _write_captions(out, dataset.captions, resumed=len(todo) < num_shards,
                                    write=state.is_main_process) if dataset.has_captions else None
    mine = todo[state.process_index::state.num_processes]
    progress = tqdm(total=sum(len(_shard_rows(i, shard_size, len(dataset))) for i in mine),
                    desc="encoding latents" + (f" (process 0 of {state.num_processes})" if state.num_processes > 1
                                               else ""), disable=not state.is_main_process)
    for i in mine:
        tensors: dict[str, list[torch.Tensor]] = {}
        for batch in DataLoader(Subset(dataset, _shard_rows(i, shard_size, len(dataset))), batch_size=batch_size):
            x = batch["pixel_values"].to(device)
            for suffix, images in (("", x), ("_flipped", x.flip(-1))) if data.random_flip else (("", x),):
                for name, value in _encode(vae, images).items():
                    tensors.setdefault(name + suffix, []).append(value.float().cpu())
            if dataset.has_labels:
                tensors.setdefault("labels", []).append(batch["label"])
            if dataset.has_captions:  # each row's own caption, so the column is row-aligned by construction
                tensors.setdefault("caption", []).append(
                    torch.tensor([caption_index[c] for c in batch["caption"]], dtype=torch.int64))
            progress.update(len(x))
        tmp = out / f".tmp-{_shard_path(out, i).name}"
        try:
            save_file({k: torch.cat(v).contiguous() for k, v in tensors.items()}, str(tmp))
        except Exception as err:
            full = disk_full(err, tmp)
            tmp.unlink(missing_ok=True)
            if full:
                raise write_failed(_shard_path(out, i), err, "the finished shards are kept; free space and run the "
                                                             "same `ldm-vae encode` to continue") from err
            raise
        os.replace(tmp, _shard_path(out, i))
    progress.close()
    state.wait_for_everyone()  # every shard is on disk
    if state.is_main_process:
        _finish(out, meta, num_shards, caption_index)
    state.wait_for_everyone()
    return json.loads((out / CACHE_FILE).read_text())


def _shard_rows(i: int, shard_size: int, num_images: int) -> range:
    return range(i * shard_size, min((i + 1) * shard_size, num_images))


def _finish(out: Path, meta: dict, num_shards: int, caption_index: dict[str, int] | None) -> None:
    """Complete `meta` from the shards on disk and write it as cache.json (last: the cache is
    complete from then on)."""
    first = load_file(str(_shard_path(out, 0)))
    meta["latent_shape"] = list(first["mean" if "mean" in first else "latents"].shape[1:])
    if meta["has_labels"]:
        meta["num_classes"] = int(max(int(load_file(str(_shard_path(out, i)))["labels"].max())
                                      for i in range(num_shards))) + 1
    meta["shards"] = [_shard_path(out, i).name for i in range(num_shards)]
    meta["shard_sha256"] = [sha256(_shard_path(out, i)) for i in range(num_shards)]  # checked when read
    if meta["has_captions"]:
        meta["captions_file"] = CAPTIONS_FILE
        meta["num_captions"] = len(caption_index)
        meta["captions_sha256"] = sha256(out / CAPTIONS_FILE)  # checked by read_captions
    atomic_write_text(out / CACHE_FILE, json.dumps(meta, indent=2))
    (out / PARTIAL_FILE).unlink(missing_ok=True)


def _write_captions(out: Path, captions: list[str], resumed: bool, write: bool = True) -> dict[str, int]:
    """Write (where `write`: the main process) the distinct captions (in order of first use) to
    captions.json; each caption's index in it. A resumed run must find the list its finished
    shards index into."""
    distinct = list(dict.fromkeys(captions))
    text = json.dumps(distinct, ensure_ascii=False)
    path = out / CAPTIONS_FILE
    if resumed and (not path.is_file() or path.read_text(encoding="utf-8") != text):
        raise UserError(f"{out} holds an unfinished cache whose captions differ from the dataset's now (or whose "
                        f"{CAPTIONS_FILE} is missing); re-encode it with `ldm-vae encode ... --overwrite`")
    if write and not resumed:
        atomic_write_text(path, text)
    return {c: i for i, c in enumerate(distinct)}


def _data_key(data: DataConfig) -> dict:
    raw = dataclasses.asdict(data)
    for key in ("num_workers", "decoded_cache_mb"):  # how images are loaded does not change what is encoded
        raw.pop(key)
    if raw["caption_column"] is None:  # caches written before captions existed stay reusable
        raw.pop("caption_column")
    return raw


def _encode(vae, x: torch.Tensor) -> dict:
    if not isinstance(vae, AutoencoderKL):  # a deterministic latent (VQModel before quantization, AutoencoderDC)
        return {"latents": deterministic_latent(vae, x)}
    posterior = vae.encode(x).latent_dist
    return {"mean": posterior.mean, "std": posterior.std}


def read_cache(cache_dir: str | Path, model_dir: str | Path | None = None) -> dict:
    """cache.json of a complete cache; with `model_dir`, also check the cache was made by it."""
    cache_dir = Path(cache_dir)
    if not (cache_dir / CACHE_FILE).is_file():
        hint = " (it is unfinished: run the same `ldm-vae encode` again to complete it)" \
            if (cache_dir / PARTIAL_FILE).is_file() else ""
        raise UserError(f"{cache_dir} is not a latent cache{hint}; create one with `ldm-vae encode`")
    meta = json.loads((cache_dir / CACHE_FILE).read_text())
    if model_dir is not None and fingerprint(model_dir) != meta["fingerprint"]:
        raise UserError(f"the latents in {cache_dir} were made by {meta['autoencoder']}, not by {model_dir} "
                        f"(different weights or config); re-encode with `ldm-vae encode {model_dir} ...`")
    return meta


def read_captions(cache_dir: str | Path, meta: dict) -> list[str]:
    """The captions of a cache (meta: its cache.json); a row's "caption" indexes this list.
    Refused when captions.json is not the file the cache recorded."""
    path = Path(cache_dir) / CAPTIONS_FILE
    if not meta.get("has_captions"):
        raise UserError(f"the latent cache {cache_dir} has no captions; encode a dataset with data.caption_column "
                        f"set (`ldm-vae encode ... data.caption_column=text`)")
    if not path.is_file():
        raise UserError(f"{path} is missing: the latent cache is incomplete; re-encode it with `ldm-vae encode ... "
                        f"--overwrite`")
    raw = path.read_bytes()  # hashed and parsed from the same bytes
    if hashlib.sha256(raw).hexdigest() != meta["captions_sha256"]:
        raise _corrupt(path, f"its sha256 is not the one recorded in {CACHE_FILE} when it was written")
    captions = json.loads(raw.decode("utf-8"))
    if len(captions) != meta["num_captions"] or not all(isinstance(c, str) for c in captions):
        raise _corrupt(path, f"not a list of {meta['num_captions']} strings")
    return captions


def load_cache_autoencoder(meta: dict):
    """The autoencoder a cache was made with (for decoding samples), checked by fingerprint."""
    model_dir = Path(meta["autoencoder"])
    if not (model_dir / "config.json").is_file():
        raise UserError(f"the latent cache was made by the autoencoder in {model_dir}, which no longer exists; it is "
                        f"needed to decode samples: restore it, or re-encode with `ldm-vae encode MODEL_DIR ...`")
    if fingerprint(model_dir) != meta["fingerprint"]:
        raise UserError(f"the autoencoder in {model_dir} changed since the latent cache was made (different weights "
                        f"or config); re-encode with `ldm-vae encode {model_dir} ...`")
    return load_autoencoder(model_dir)


# ==============================================================================================
# Reading a cache: rows read per batch, never whole shards
# ==============================================================================================

# safetensors' dtype names (https://github.com/huggingface/safetensors, "Format"); the cache
# writes F32 latents and I64 labels
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
# open files kept per process (per DataLoader worker): bounded whatever the cache size, and
# enough for every shard of 1.28 M latents (ImageNet) in shards of 10,000, as a shuffled batch
# touches most shards; an open file costs the kernel a little, this process nothing
MAX_OPEN_SHARDS = 128


@dataclasses.dataclass(frozen=True)
class _Column:
    """Where one tensor of a shard lies in its file: `rows` rows of `row_shape`, from byte `offset`."""
    offset: int
    rows: int
    row_shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class _Shard:
    """A verified shard file: its columns and the identity (device, inode, size, mtime) it had
    when its checksum was computed."""
    path: Path
    columns: dict[str, _Column]
    identity: tuple[int, int, int, int]


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(f"{path} is corrupt ({why}); re-encode the cache with `ldm-vae encode ... --overwrite`")


def _columns(path: Path) -> dict[str, _Column]:
    """The tensors of a safetensors file, from its header only: 8 bytes (little-endian u64 N),
    N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then the data, each
    tensor C-contiguous, so row i of a tensor starts at offset + i * row_bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise _corrupt(path, "no safetensors header")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise _corrupt(path, f"unreadable safetensors header: {err}") from err
    header.pop("__metadata__", None)
    columns = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in _DTYPES or not info["shape"]:
            raise _corrupt(path, f"{name}: unexpected dtype {info['dtype']} or shape {info['shape']}")
        column = _Column(8 + n + begin, info["shape"][0], tuple(info["shape"][1:]), _DTYPES[info["dtype"]])
        if end - begin != column.rows * column.row_bytes or 8 + n + end > size:
            raise _corrupt(path, f"{name}: its data does not match its shape {info['shape']}")
        columns[name] = column
    return columns


def _verified_shard(cache_dir: Path, meta: dict, i: int) -> _Shard:
    """Shard i, refused when the file is not the one the cache recorded (caches written before
    checksums were recorded are read unverified). The file is hashed streaming (nothing kept
    in memory); batches then read rows from it. What this does not protect against: the
    checksum is of the file as it was here, once. A file replaced later (a rename onto the
    path, a rewrite with a new mtime) is refused when it is next opened (its identity
    changed), but bytes changed in place without a new mtime, or by the disk, after the
    check are read as they are."""
    path = cache_dir / meta["shards"][i]
    if not path.is_file():
        raise UserError(f"{path} is missing: the latent cache is incomplete; re-encode it with `ldm-vae encode ... "
                        f"--overwrite`")
    identity = _identity(path.stat())  # before hashing: a file replaced while it is hashed is refused when opened
    if "shard_sha256" in meta and sha256(path) != meta["shard_sha256"][i]:
        raise UserError(f"{path} is corrupt (its sha256 is not the one recorded in {CACHE_FILE} when it was "
                        f"written); re-encode the cache with `ldm-vae encode ... --overwrite`")
    return _Shard(path, _columns(path), identity)


def _read_at(f: BinaryIO, offset: int, into: memoryview) -> int:
    """Read len(into) bytes of `f` at `offset` into `into`; the number read."""
    if hasattr(os, "pread"):  # no file position: safe on descriptors that forked DataLoader workers share
        data = os.pread(f.fileno(), len(into), offset)
    else:  # Windows has no pread; its DataLoader workers are spawned, each opening its own files
        f.seek(offset)
        data = f.read(len(into))
    into[:len(data)] = data
    return len(data)


class LatentDataset(Dataset):
    """Items {"latents": scaled latent [C, h, w], "label": int64} from a latent cache, plus
    "caption": int64 (an index into `self.captions`, see `read_captions`) when it has captions.

    KL caches give a fresh posterior sample per (seed, epoch, batch), VQ caches the stored
    latents; with flips, the flipped twin is taken half the time. The scaling (and shift)
    of the autoencoder is applied here, once.

    Memory does not grow with the cache: at most MAX_OPEN_SHARDS files are open, and a batch
    reads its rows with `os.pread` (the page cache holds the file, not this process).
    safetensors' `safe_open(...).get_slice` reads through a memory map whose touched pages
    count in this process's resident memory (about the whole file after a few hundred random
    batches, and 6 to 12 times slower per batch: scripts/bench.py latent-memory), so rows are
    located from the safetensors header and read directly.
    """

    def __init__(self, cache_dir: str | Path, seed: int = 0):
        self.meta = read_cache(cache_dir)
        self.shards = [_verified_shard(Path(cache_dir), self.meta, i) for i in range(len(self.meta["shards"]))]
        layout = {k: (c.row_shape, c.dtype) for k, c in self.shards[0].columns.items()}
        if any(layout[k] != layout.get(k + "_flipped", layout[k]) for k in layout):
            raise _corrupt(self.shards[0].path, "a flipped twin does not match its tensor")
        for shard in self.shards:
            if {k: (c.row_shape, c.dtype) for k, c in shard.columns.items()} != layout or \
                    len({c.rows for c in shard.columns.values()}) != 1:
                raise _corrupt(shard.path, f"its tensors do not match those of {self.shards[0].path.name}")
        self.starts = [0]  # global index of each shard's first row, then the total
        for shard in self.shards:
            self.starts.append(self.starts[-1] + next(iter(shard.columns.values())).rows)
        if self.starts[-1] != self.meta["num_images"]:
            raise UserError(f"{cache_dir} holds {self.starts[-1]} latents, not the {self.meta['num_images']} its "
                            f"{CACHE_FILE} records; re-encode the cache with `ldm-vae encode ... --overwrite`")
        self.scale = self.meta["scaling_factor"]
        self.shift = self.meta["shift_factor"] or 0.0
        self.seed, self.epoch = seed, 0
        self.kl = "mean" in layout
        self.has_labels = "labels" in layout
        self.has_captions = bool(self.meta.get("has_captions"))  # caches older than captions have none
        if self.has_captions != ("caption" in layout):
            state = "has no caption column" if self.has_captions else "has a caption column"
            raise _corrupt(self.shards[0].path, f"it {state}, unlike what {CACHE_FILE} records")
        self.captions = read_captions(cache_dir, self.meta) if self.has_captions else None
        self._open: collections.OrderedDict[int, BinaryIO] = collections.OrderedDict()  # shard -> file, LRU

    def __getstate__(self) -> dict:
        # open files do not travel to DataLoader workers (spawn): each worker opens its own
        return {**self.__dict__, "_open": collections.OrderedDict()}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.meta["num_images"]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A whole batch at once (torch's DataLoader calls this when it exists): one draw of
        flips and posterior noise from a generator seeded by (seed, epoch, the batch's
        indices), instead of a generator per item. The sampler's order depends only on
        (seed, epoch), so a resumed run draws the same noise for the same batches."""
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, *indices)) & (2**63 - 1))
        idx = torch.as_tensor(indices, dtype=torch.long)
        flip = torch.rand(len(idx), generator=g) < 0.5 if self.meta["flipped"] else torch.zeros(len(idx), dtype=bool)
        rows = [self._locate(int(i)) for i in indices]

        def pick(name: str) -> torch.Tensor:
            # each row from the plain or the flipped tensor: the same values, bit for bit, as
            # torch.where(flip, flipped[idx], plain[idx]) on the whole tensors
            return self._read([name + "_flipped" if f else name for f in flip.tolist()], rows)

        if self.kl:
            mean, std = pick("mean"), pick("std")  # (B, C, h, w)
            z = mean + std * torch.randn(mean.shape, generator=g)
        else:
            z = pick("latents")
        labels = self._read(["labels"] * len(rows), rows) if self.has_labels else torch.full((len(idx),), -1)
        z = (z - self.shift) * self.scale
        items = [{"latents": z[k], "label": labels[k]} for k in range(len(idx))]
        if self.has_captions:
            for item, caption in zip(items, self._read(["caption"] * len(rows), rows)):
                item["caption"] = caption
        return items

    def _locate(self, i: int) -> tuple[int, int]:
        """(shard, row in that shard) of global index i (negative i counts from the end, as in indexing)."""
        n = self.starts[-1]
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for a latent cache of {n}")
        i %= n
        shard = bisect.bisect_right(self.starts, i) - 1
        return shard, i - self.starts[shard]

    def _file(self, shard: int) -> BinaryIO:
        """Shard's open file (at most MAX_OPEN_SHARDS stay open), refused when it is not the file
        that was verified."""
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        f = open(self.shards[shard].path, "rb", buffering=0)  # noqa: SIM115 (kept open: closed on eviction)
        if _identity(os.fstat(f.fileno())) != self.shards[shard].identity:
            f.close()
            raise UserError(f"{self.shards[shard].path} changed since its checksum was verified; restart the run "
                            f"(the latent cache is checked again) or re-encode it with `ldm-vae encode ... "
                            f"--overwrite`")
        self._open[shard] = f
        if len(self._open) > MAX_OPEN_SHARDS:
            self._open.popitem(last=False)[1].close()
        return f

    def _read(self, names: list[str], rows: list[tuple[int, int]]) -> torch.Tensor:
        """Row rows[k] of tensor names[k], stacked: (B, *row_shape); one read per row."""
        first = self.shards[0].columns[names[0] if names else "labels"]
        size = first.row_bytes
        buf = bytearray(len(rows) * size)
        view = memoryview(buf)
        for k in sorted(range(len(rows)), key=rows.__getitem__):  # by shard: each file fetched once per batch
            (shard, row), column = rows[k], self.shards[rows[k][0]].columns[names[k]]
            if _read_at(self._file(shard), column.offset + row * size, view[k * size:(k + 1) * size]) != size:
                raise _corrupt(self.shards[shard].path, "shorter than its header says")
        if not buf:
            return torch.empty((0, *first.row_shape), dtype=first.dtype)
        # safetensors stores little-endian bytes, as every platform torch runs on here
        return torch.frombuffer(buf, dtype=first.dtype).view(len(rows), *first.row_shape)
