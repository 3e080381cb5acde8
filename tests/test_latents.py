"""Latent cache: round trip, scaling applied once, idempotent and resumable, mismatch refused."""

from __future__ import annotations

import json

import pytest
import torch

from ldm_vae.autoencoder.config import Config
from ldm_vae.autoencoder.models import load_autoencoder
from ldm_vae.autoencoder.train import train
from ldm_vae.config import load_config
from ldm_vae.diffusion.latents import (
    CACHE_FILE,
    LatentDataset,
    encode_dataset,
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
            # a training item is a posterior sample, scaled once: (z - shift) * scale
            item = ds[0]["latents"]
            unscaled = item / vae.config.scaling_factor + vae.config.shift_factor
            assert (unscaled - cached[0]).abs().max() <= 6 * ds.tensors["std"][0].max() + 1e-6
            # a batch is drawn at once: deterministic per (seed, epoch, indices), each item a
            # posterior sample around its own mean or its flipped twin's
            batch = ds.__getitems__([3, 1, 2])
            assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(batch, ds.__getitems__([3, 1, 2])))
            for item, i in zip(batch, [3, 1, 2]):
                unscaled = item["latents"] / vae.config.scaling_factor + vae.config.shift_factor
                near = [(unscaled - ds.tensors[k][i]).abs().max() <= 6 * ds.tensors["std"][i].max() + 1e-6
                        for k in ("mean", "mean_flipped")]
                assert any(near) and item["label"] == ds.tensors["labels"][i]
            ds.set_epoch(1)
            assert not torch.equal(ds.__getitems__([3, 1, 2])[0]["latents"], batch[0]["latents"])
        else:
            z = vae.encode(x).latents
            cached = ds.tensors["latents"][:4]
            # VQ items are the stored latents times the scaling factor, once
            flips = [ds[i]["latents"] for i in range(4)]
            for i, item in enumerate(flips):
                options = [cached[i] * vae.config.scaling_factor,
                           ds.tensors["latents_flipped"][i] * vae.config.scaling_factor]
                assert any(torch.allclose(item, o) for o in options)
        torch.testing.assert_close(cached, z, atol=1e-5, rtol=1e-5)
        recon_cache = vae.decode(cached).sample
        recon_direct = vae.decode(z).sample
    torch.testing.assert_close(recon_cache, recon_direct, atol=1e-4, rtol=1e-4)
    assert ds[0]["label"].dtype == torch.int64 and meta["num_classes"] >= 2


def test_cache_is_resumable_idempotent_and_refuses_a_mismatch(exports, tmp_path, fake_fashion, monkeypatch):
    from ldm_vae.diffusion import latents

    kl, vq = exports / "kl" / "export", exports / "vq" / "export"
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
    # the same command completes it without re-encoding the finished shards
    meta = encode_dataset(kl, data, "test", out, shard_size=24)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == stamp and (out / "shard-00002.safetensors").is_file()
    assert json.loads((out / CACHE_FILE).read_text())["num_images"] == 64
    # and once more: nothing to do
    assert encode_dataset(kl, data, "test", out, shard_size=24) == meta
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == stamp
    # another autoencoder: refused without --overwrite, and a cache is checked against its model
    with pytest.raises(UserError, match="another autoencoder"):
        encode_dataset(vq, data, "test", out, shard_size=24)
    with pytest.raises(UserError, match="were made by"):
        read_cache(out, vq)
    read_cache(out, kl)
