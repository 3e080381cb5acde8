"""Latent cache: round trip, scaling applied once, idempotent and resumable, mismatch refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm_vae.autoencoder.config import Config
from ldm_vae.autoencoder.models import load_autoencoder
from ldm_vae.autoencoder.train import train
from ldm_vae.config import load_config
from ldm_vae.diffusion.latents import (
    CACHE_FILE,
    LatentDataset,
    encode_dataset,
    load_cache_autoencoder,
    read_cache,
)
from ldm_vae.errors import UserError

from .conftest import TINY_KL, TINY_VQ


@pytest.fixture(scope="module")
def exports(tmp_path_factory, fake_fashion):
    root = tmp_path_factory.mktemp("latents")
    for name, path in (("kl", TINY_KL), ("vq", TINY_VQ)):
        cfg = load_config(path, [f"data.path={fake_fashion}", "train.max_steps=6", "loss.disc_start=100"], Config)
        train(cfg, root / name)
    return root


def _data(fake_fashion, flip=True):
    return load_config(TINY_KL, [f"data.path={fake_fashion}", f"data.random_flip={str(flip).lower()}"], Config).data


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_cache_round_trip_and_scaling_applied_once(exports, tmp_path, fake_fashion, kind):
    model_dir = exports / kind / "export"
    data = _data(fake_fashion)
    meta = encode_dataset(model_dir, data, "test", tmp_path / "cache", batch_size=16, shard_size=24)
    assert meta["num_images"] == 64 and len(meta["shards"]) == 3 and meta["has_labels"]
    vae = load_autoencoder(model_dir).eval()
    from ldm_vae.data.sources import build_dataset

    x = torch.stack([build_dataset(data, "test", train=False)[i]["pixel_values"] for i in range(4)])
    ds = LatentDataset(tmp_path / "cache")
    with torch.no_grad():
        if kind == "kl":
            z = vae.encode(x).latent_dist.mean
            cached = ds.tensors["mean"][:4]
            # a batch is drawn at once from a generator seeded by (seed, epoch, indices): the flips,
            # then one posterior sample each, scaled once: (mean + std * eps - shift) * scale.
            # Reproduce that draw and compare exactly (a scale applied twice or not at all fails).
            idx = [3, 1, 2]
            batch = ds.__getitems__(idx)
            g = torch.Generator().manual_seed(hash((0, 0, *idx)) & (2**63 - 1))
            flip = (torch.rand(len(idx), generator=g) < 0.5).view(-1, 1, 1, 1)
            mean = torch.where(flip, ds.tensors["mean_flipped"][idx], ds.tensors["mean"][idx])
            std = torch.where(flip, ds.tensors["std_flipped"][idx], ds.tensors["std"][idx])
            eps = torch.randn(mean.shape, generator=g)
            expected = (mean + std * eps - vae.config.shift_factor) * vae.config.scaling_factor
            assert torch.equal(torch.stack([b["latents"] for b in batch]), expected)
            assert [int(b["label"]) for b in batch] == ds.tensors["labels"][idx].tolist()
            assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(batch, ds.__getitems__(idx)))
            ds.set_epoch(1)
            assert not torch.equal(ds.__getitems__([3, 1, 2])[0]["latents"], batch[0]["latents"])
        else:
            z = vae.encode(x).latents
            cached = ds.tensors["latents"][:4]
            # VQ items are the stored latents (or their flipped twins, by the same seeded draw)
            # times the scaling factor, once; a VQModel has no shift
            assert ds.shift == 0.0
            for i in range(4):
                flip = torch.rand(1, generator=torch.Generator().manual_seed(hash((0, 0, i)) & (2**63 - 1))) < 0.5
                stored = ds.tensors["latents_flipped" if flip else "latents"][i]
                assert torch.equal(ds[i]["latents"], stored * vae.config.scaling_factor)
        torch.testing.assert_close(cached, z, atol=1e-5, rtol=1e-5)
        recon_cache = vae.decode(cached).sample
        recon_direct = vae.decode(z).sample
    torch.testing.assert_close(recon_cache, recon_direct, atol=1e-4, rtol=1e-4)
    assert ds[0]["label"].dtype == torch.int64 and meta["num_classes"] >= 2


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
