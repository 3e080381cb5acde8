"""Latent cache: a dataset split encoded once by an exported autoencoder, as safetensors shards.

A latent diffusion model trains on latents, not pixels; encoding every image every epoch
would spend most of each step in the encoder. `ldm-vae encode` writes:

    OUT/shard-00000.safetensors ...   KL: "mean", "std" (the posterior, so training draws a
                                      fresh sample each time, not one frozen sample);
                                      VQ: "latents" (`encode(x).latents`, which
                                      `VQModel.decode` quantizes); "labels" when the source
                                      has them; "*_flipped" twins when data.random_flip is on
    OUT/cache.json                    what was encoded with what: the autoencoder's path and
                                      fingerprint, scaling/shift factors, shapes, counts

Shards are written atomically one by one and cache.json last, so an interrupted run
continues where it stopped, and a finished cache is reused (the command is idempotent).
Latents are stored UNSCALED; `LatentDataset` applies `(z - shift) * scale` exactly once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from diffusers import VQModel
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..autoencoder.models import load_autoencoder
from ..data.config import DataConfig
from ..data.sources import build_dataset
from ..errors import UserError
from ..files import disk_full, sha256, write_failed

CACHE_FILE = "cache.json"
PARTIAL_FILE = "cache.partial.json"


def fingerprint(model_dir: str | Path) -> str:
    """sha256 of an export's config.json and weights: a cache belongs to exactly these."""
    return sha256(Path(model_dir) / "config.json", Path(model_dir) / "diffusion_pytorch_model.safetensors")


def _shard_path(out: Path, i: int) -> Path:
    return out / f"shard-{i:05d}.safetensors"


@torch.no_grad()
def encode_dataset(model_dir: str | Path, data: DataConfig, split: str, out: str | Path, batch_size: int = 256,
                   shard_size: int = 10_000, device: str = "cpu", overwrite: bool = False) -> dict:
    """Encode `split` of `data` with the autoencoder in `model_dir` into `out`; returns cache.json's content."""
    out, model_dir = Path(out), Path(model_dir).resolve()
    vae = load_autoencoder(model_dir).to(device).eval()
    dataset = build_dataset(data, split, train=False)  # centre crops, no random flip: flips are stored
    meta = {
        "autoencoder": str(model_dir), "fingerprint": fingerprint(model_dir), "kind": type(vae).__name__,
        "scaling_factor": vae.config.scaling_factor, "shift_factor": getattr(vae.config, "shift_factor", None),
        "data": _data_key(data), "dataset": dataset.description, "dataset_id": dataset.dataset_id,
        "split": split, "num_images": len(dataset), "flipped": data.random_flip,
        "has_labels": dataset.has_labels, "class_names": dataset.class_names, "shard_size": shard_size,
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
    if overwrite:
        for f in [*out.glob("shard-*.safetensors"), out / CACHE_FILE, out / PARTIAL_FILE]:
            f.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTIAL_FILE).write_text(json.dumps(key))

    num_shards = -(-len(dataset) // shard_size)
    todo = [i for i in range(num_shards) if not _shard_path(out, i).is_file()]
    progress = tqdm(total=len(dataset), initial=(num_shards - len(todo)) * shard_size, desc="encoding latents")
    for i in todo:
        rows = range(i * shard_size, min((i + 1) * shard_size, len(dataset)))
        tensors: dict[str, list[torch.Tensor]] = {}
        for batch in DataLoader(Subset(dataset, rows), batch_size=batch_size):
            x = batch["pixel_values"].to(device)
            for suffix, images in (("", x), ("_flipped", x.flip(-1))) if data.random_flip else (("", x),):
                for name, value in _encode(vae, images).items():
                    tensors.setdefault(name + suffix, []).append(value.float().cpu())
            if dataset.has_labels:
                tensors.setdefault("labels", []).append(batch["label"])
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
    first = load_file(str(_shard_path(out, 0)))
    meta["latent_shape"] = list(first["mean" if "mean" in first else "latents"].shape[1:])
    if dataset.has_labels:
        meta["num_classes"] = int(max(int(load_file(str(_shard_path(out, i)))["labels"].max())
                                      for i in range(num_shards))) + 1
    meta["shards"] = [_shard_path(out, i).name for i in range(num_shards)]
    meta["shard_sha256"] = [sha256(_shard_path(out, i)) for i in range(num_shards)]  # checked when read
    tmp = out / f".tmp-{CACHE_FILE}"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / CACHE_FILE)  # the cache is complete from here on
    (out / PARTIAL_FILE).unlink(missing_ok=True)
    return meta


def _data_key(data: DataConfig) -> dict:
    raw = dataclasses.asdict(data)
    for key in ("num_workers", "decoded_cache_mb"):  # how images are loaded does not change what is encoded
        raw.pop(key)
    return raw


def _encode(vae, x: torch.Tensor) -> dict:
    if isinstance(vae, VQModel):
        return {"latents": vae.encode(x).latents}
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


def _verified_shard(cache_dir: Path, meta: dict, i: int) -> dict[str, torch.Tensor]:
    """Shard i's tensors, refused when the file is not the one the cache recorded (caches
    written before checksums were recorded are read unverified). Read once: hashed and
    loaded from the same bytes."""
    path = cache_dir / meta["shards"][i]
    if not path.is_file():
        raise UserError(f"{path} is missing: the latent cache is incomplete; re-encode it with `ldm-vae encode ... "
                        f"--overwrite`")
    data = path.read_bytes()
    if "shard_sha256" in meta and hashlib.sha256(data).hexdigest() != meta["shard_sha256"][i]:
        raise UserError(f"{path} is corrupt (its sha256 is not the one recorded in {CACHE_FILE} when it was "
                        f"written); re-encode the cache with `ldm-vae encode ... --overwrite`")
    return load_safetensors(data)


class LatentDataset(Dataset):
    """Items {"latents": scaled latent [C, h, w], "label": int64} from a latent cache.

    KL caches give a fresh posterior sample per (seed, epoch, batch), VQ caches the stored
    latents; with flips, the flipped twin is taken half the time. The scaling (and shift)
    of the autoencoder is applied here, once.
    """

    def __init__(self, cache_dir: str | Path, seed: int = 0):
        self.meta = read_cache(cache_dir)
        shards = [_verified_shard(Path(cache_dir), self.meta, i) for i in range(len(self.meta["shards"]))]
        self.tensors = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
        self.scale = self.meta["scaling_factor"]
        self.shift = self.meta["shift_factor"] or 0.0
        self.seed, self.epoch = seed, 0
        self.kl = "mean" in self.tensors

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

        def pick(name: str) -> torch.Tensor:
            plain = self.tensors[name][idx]
            if not flip.any():
                return plain
            return torch.where(flip.view(-1, 1, 1, 1), self.tensors[name + "_flipped"][idx], plain)

        if self.kl:
            mean, std = pick("mean"), pick("std")
            z = mean + std * torch.randn(mean.shape, generator=g)
        else:
            z = pick("latents")
        labels = self.tensors["labels"][idx] if "labels" in self.tensors else torch.full((len(idx),), -1)
        z = (z - self.shift) * self.scale
        return [{"latents": z[k], "label": labels[k]} for k in range(len(idx))]
