"""Latent cache: round trip, scaling applied once, idempotent and resumable, mismatch refused; read
lazily: the same batches as the whole cache in memory gave, memory flat in the cache's size."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from ldm_vae.autoencoder.config import Config
from ldm_vae.autoencoder.models import load_autoencoder
from ldm_vae.config import load_config
from ldm_vae.diffusion import latents
from ldm_vae.diffusion.latents import (
    CACHE_FILE,
    LatentDataset,
    encode_dataset,
    load_cache_autoencoder,
    read_cache,
)
from ldm_vae.errors import UserError

from .conftest import TINY_KL


@pytest.fixture(scope="module")
def exports(tiny_exports):
    return tiny_exports


def _data(fake_fashion, flip=True):
    return load_config(TINY_KL, [f"data.path={fake_fashion}", f"data.random_flip={str(flip).lower()}"], Config).data


@pytest.fixture(scope="module")
def caches(exports, fake_fashion, tmp_path_factory):
    """Test-split caches (64 images with flips, shards of 24: 24 + 24 + 16) of both exports."""
    root = tmp_path_factory.mktemp("caches")
    for kind in ("kl", "vq"):
        encode_dataset(exports / kind / "export", _data(fake_fashion), "test", root / kind, batch_size=16,
                       shard_size=24)
    return root


def _eager(cache) -> dict[str, torch.Tensor]:
    """Every shard's tensors in memory, concatenated: what LatentDataset held before it read lazily."""
    meta = json.loads((cache / CACHE_FILE).read_text())
    shards = [load_file(str(cache / name)) for name in meta["shards"]]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_cache_round_trip_and_scaling_applied_once(exports, caches, fake_fashion, kind):
    model_dir = exports / kind / "export"
    data = _data(fake_fashion)
    meta = read_cache(caches / kind)
    assert meta["num_images"] == 64 and len(meta["shards"]) == 3 and meta["has_labels"]
    vae = load_autoencoder(model_dir).eval()
    from ldm_vae.data.sources import build_dataset

    x = torch.stack([build_dataset(data, "test", train=False)[i]["pixel_values"] for i in range(4)])
    ds, stored = LatentDataset(caches / kind), _eager(caches / kind)
    with torch.no_grad():
        if kind == "kl":
            z = vae.encode(x).latent_dist.mean
            cached = stored["mean"][:4]
            # a batch is drawn at once from a generator seeded by (seed, epoch, indices): the flips,
            # then one posterior sample each, scaled once: (mean + std * eps - shift) * scale.
            # Reproduce that draw and compare exactly (a scale applied twice or not at all fails).
            idx = [3, 1, 2]
            batch = ds.__getitems__(idx)
            g = torch.Generator().manual_seed(hash((0, 0, *idx)) & (2**63 - 1))
            flip = (torch.rand(len(idx), generator=g) < 0.5).view(-1, 1, 1, 1)
            mean = torch.where(flip, stored["mean_flipped"][idx], stored["mean"][idx])
            std = torch.where(flip, stored["std_flipped"][idx], stored["std"][idx])
            eps = torch.randn(mean.shape, generator=g)
            expected = (mean + std * eps - vae.config.shift_factor) * vae.config.scaling_factor
            assert torch.equal(torch.stack([b["latents"] for b in batch]), expected)
            assert [int(b["label"]) for b in batch] == stored["labels"][idx].tolist()
            assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(batch, ds.__getitems__(idx)))
            ds.set_epoch(1)
            assert not torch.equal(ds.__getitems__([3, 1, 2])[0]["latents"], batch[0]["latents"])
        else:
            z = vae.encode(x).latents
            cached = stored["latents"][:4]
            # VQ items are the stored latents (or their flipped twins, by the same seeded draw)
            # times the scaling factor, once; a VQModel has no shift
            assert ds.shift == 0.0
            for i in range(4):
                flip = torch.rand(1, generator=torch.Generator().manual_seed(hash((0, 0, i)) & (2**63 - 1))) < 0.5
                row = stored["latents_flipped" if flip else "latents"][i]
                assert torch.equal(ds[i]["latents"], row * vae.config.scaling_factor)
        torch.testing.assert_close(cached, z, atol=1e-5, rtol=1e-5)
        recon_cache = vae.decode(cached).sample
        recon_direct = vae.decode(z).sample
    torch.testing.assert_close(recon_cache, recon_direct, atol=1e-4, rtol=1e-4)
    assert ds[0]["label"].dtype == torch.int64 and meta["num_classes"] >= 2


class _EagerLatents(LatentDataset):
    """LatentDataset as it was before it read lazily (its __getitems__ copied verbatim): every
    shard in memory, flips taken with torch.where on the whole tensors. The reference."""

    def __init__(self, cache_dir, seed=0):
        super().__init__(cache_dir, seed)
        self.tensors = _eager(cache_dir)

    def __getitems__(self, indices):
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, *indices)) & (2**63 - 1))
        idx = torch.as_tensor(indices, dtype=torch.long)
        flip = torch.rand(len(idx), generator=g) < 0.5 if self.meta["flipped"] else torch.zeros(len(idx), dtype=bool)

        def pick(name):
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


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_lazy_reads_give_the_batches_of_the_whole_cache_in_memory(caches, kind):
    """Bit for bit (resumed runs compare losses exactly): shuffled batches of 10 that cross the
    3 shards, flips and posterior noise, two epochs, single items, a batch with no flip."""
    lazy, eager = LatentDataset(caches / kind, seed=3), _EagerLatents(caches / kind, seed=3)
    for epoch in (0, 1):
        lazy.set_epoch(epoch)
        eager.set_epoch(epoch)
        batches = [DataLoader(ds, batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(epoch))
                   for ds in (lazy, eager)]
        for a, b in zip(*batches, strict=True):
            assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["label"], b["label"])
            assert a["latents"].dtype == torch.float32 and a["label"].dtype == torch.int64
    no_flip = next(i for i in range(64) if not torch.rand(1, generator=torch.Generator().manual_seed(
        hash((3, 1, i)) & (2**63 - 1))) < 0.5)  # the one draw of a 1-item batch decides its flip
    for i in (0, 23, 24, 47, 48, 63, -1, no_flip):
        assert torch.equal(lazy[i]["latents"], eager[i]["latents"]) and lazy[i]["label"] == eager[i]["label"]
    with pytest.raises(IndexError):
        lazy[64]


def _held_bytes(obj, seen=None) -> int:
    """Bytes of the tensors and buffers reachable from obj's attributes and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(_held_bytes(k, seen) + _held_bytes(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return sum(_held_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _held_bytes(vars(obj), seen)
    return 0


def test_memory_does_not_grow_with_the_cache(exports, caches, fake_fashion, tmp_path, monkeypatch):
    """The dataset holds no tensor or buffer, before or after an epoch, for 64 or 256 cached
    latents (the eager dataset held them all), and keeps at most MAX_OPEN_SHARDS files open; a
    shard replaced after its checksum was verified is refused when it is opened."""
    big = tmp_path / "big"  # the 256 train images in 8 shards of 32
    encode_dataset(exports / "kl" / "export", _data(fake_fashion), "train", big, batch_size=64, shard_size=32)
    monkeypatch.setattr(latents, "MAX_OPEN_SHARDS", 3)
    small, large = LatentDataset(caches / "kl"), LatentDataset(big)
    assert len(large) == 256 and len(large.shards) == 8
    for ds in (small, large):
        assert _held_bytes(ds) == 0
        for _ in DataLoader(ds, batch_size=32, shuffle=True):
            assert len(ds._open) <= 3
        assert _held_bytes(ds) == 0
    # the reference holds every latent: the check bites
    assert _held_bytes(_EagerLatents(big)) >= 256 * large.shards[0].columns["mean"].row_bytes
    # a rename onto the path after the check (another cache's shard, say): refused when opened
    copy = tmp_path / "copy"
    shutil.copytree(big, copy)
    ds = LatentDataset(copy)
    shutil.copy(copy / "shard-00001.safetensors", copy / "replacement")
    os.replace(copy / "replacement", copy / "shard-00001.safetensors")
    ds[0]  # shard 0 is the one verified
    with pytest.raises(UserError, match="shard-00001.safetensors changed since its checksum was verified"):
        ds[32]


def _nudge_one_weight(model_dir):
    """Change one weight of an export by 1e-3 in place, as a re-export or a finetune would.
    Returns the file's original bytes (to put back)."""
    path = model_dir / "diffusion_pytorch_model.safetensors"
    original = path.read_bytes()
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    key = min(tensors)
    tensors[key].view(-1)[0] += 1e-3
    save_file(tensors, str(path), metadata=metadata)
    return original


def test_cache_is_resumable_idempotent_and_refuses_a_mismatch(exports, tmp_path, fake_fashion, monkeypatch):
    from ldm_vae.diffusion import latents

    # a copy of the KL export of our own: this test changes its weights (the config stays)
    kl, vq = tmp_path / "kl", exports / "vq" / "export"
    shutil.copytree(exports / "kl" / "export", kl)
    out, data = tmp_path / "cache", _data(fake_fashion, flip=False)
    original = latents.save_file

    def interrupted(tensors, path):
        if "shard-00002" in path:
            raise KeyboardInterrupt  # the run is stopped while writing the last shard
        original(tensors, path)

    monkeypatch.setattr(latents, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(kl, data, "test", out, shard_size=24)
    with pytest.raises(UserError, match="unfinished"):
        read_cache(out)
    stamp = (out / "shard-00000.safetensors").stat().st_mtime_ns
    monkeypatch.undo()
    # resuming with changed weights would mix two models' latents in one cache: refused
    weights = _nudge_one_weight(kl)
    with pytest.raises(UserError, match="unfinished cache of another autoencoder"):
        encode_dataset(kl, data, "test", out, shard_size=24)
    (kl / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    # the same command completes it without re-encoding the finished shards
    meta = encode_dataset(kl, data, "test", out, shard_size=24)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == stamp and (out / "shard-00002.safetensors").is_file()
    assert json.loads((out / CACHE_FILE).read_text())["num_images"] == 64
    # and once more: nothing to do
    assert encode_dataset(kl, data, "test", out, shard_size=24) == meta
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == stamp
    read_cache(out, kl)
    load_cache_autoencoder(meta)
    # another autoencoder: refused without --overwrite, and a cache is checked against its model
    with pytest.raises(UserError, match="another autoencoder"):
        encode_dataset(vq, data, "test", out, shard_size=24)
    with pytest.raises(UserError, match="were made by"):
        read_cache(out, vq)
    # the same autoencoder with one weight changed is another autoencoder too: reusing the
    # cache, checking it against the model and decoding its samples (train-ldm) are refused
    _nudge_one_weight(kl)
    with pytest.raises(UserError, match="another autoencoder"):
        encode_dataset(kl, data, "test", out, shard_size=24)
    with pytest.raises(UserError, match="were made by"):
        read_cache(out, kl)
    with pytest.raises(UserError, match="changed since the latent cache was made"):
        load_cache_autoencoder(meta)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == stamp  # refused before touching it
