"""Captions (data.caption_column) travel from an image folder or hub dataset into the latent
cache: row-aligned (flipped twins too), verified like the shards, refused where they cannot be."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from ldm_vae.autoencoder.config import Config
from ldm_vae.autoencoder.models import build_autoencoder, load_autoencoder
from ldm_vae.config import load_config
from ldm_vae.data.config import DataConfig
from ldm_vae.data.sources import build_dataset, pil_to_tensor
from ldm_vae.diffusion import latents
from ldm_vae.diffusion.latents import (
    CAPTIONS_FILE,
    LatentDataset,
    encode_dataset,
    read_cache,
    read_captions,
)
from ldm_vae.errors import UserError

from .conftest import TINY_KL

# two images share a caption (captions.json holds each once); one is not ASCII
CAPTIONS = ["a red fox", "a café at night", "a red fox", "three cats", "a boat", "snow", "a kite", "rain"]


def _image_folder(root, captions=CAPTIONS, extra=None) -> list[torch.Tensor]:
    """8 noise images of 16x16 with a metadata.jsonl (file_name, text, score); their pixels."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels, lines = [], []
    for k, caption in enumerate(captions):
        img = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        img.save(root / f"{k}.png")
        pixels.append(pil_to_tensor(img))
        lines.append(json.dumps({"file_name": f"{k}.png", "text": caption, "score": k, **(extra or {}).get(k, {})}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return pixels


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An image folder with captions and a tiny untrained KL export (weights do not matter here)."""
    import datasets

    root = tmp_path_factory.mktemp("captions")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf-cache")  # keep ~/.cache clean
        pixels = _image_folder(root / "images")
        torch.manual_seed(0)
        # smaller than tiny_kl's model: one level of 8 channels, no attention (encoding only)
        model = load_config(TINY_KL, ["model.block_out_channels=[8]", "model.norm_num_groups=4",
                                      "model.mid_block_add_attention=false"], Config).model
        build_autoencoder(model, 16).save_pretrained(root / "vae")
        yield root, pixels


def _data(root, *overrides: str) -> DataConfig:
    return load_config(TINY_KL, ["data.source=imagefolder", f"data.path={root / 'images'}", "data.max_images=null",
                                 "data.caption_column=text", *overrides], Config).data


def test_captions_reach_the_cache_row_aligned(setup):
    root, pixels = setup
    data = _data(root)
    ds = build_dataset(data, "train", train=True)
    assert ds.has_captions and sorted(ds.captions) == sorted(CAPTIONS)
    assert all(ds[i]["caption"] == ds.captions[i] for i in range(len(ds)))
    # shards of 3 rows (3 + 3 + 2), batches of 2: a shard's rows come from two batches
    meta = encode_dataset(root / "vae", data, "train", root / "cache", batch_size=2, shard_size=3)
    assert meta["has_captions"] and meta["num_captions"] == 7 and len(meta["shards"]) == 3
    captions = read_captions(root / "cache", read_cache(root / "cache"))
    assert sorted(captions) == sorted(set(CAPTIONS))
    shards = [load_file(str(root / "cache" / name)) for name in meta["shards"]]
    stored = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    assert "caption_flipped" not in stored and stored["caption"].dtype == torch.int64

    # Each row's latents (and its flipped twin) are those of the image its caption belongs to:
    # find each row's image by its encoding, independently of the dataset's order.
    vae = load_autoencoder(root / "vae").eval()
    with torch.no_grad():
        x = torch.stack(pixels)
        plain, flipped = vae.encode(x).latent_dist.mean, vae.encode(x.flip(-1)).latent_dist.mean
    distance = (stored["mean"][:, None] - plain[None]).flatten(2).abs().amax(-1)  # (rows, images)
    image = distance.argmin(1)
    assert sorted(image.tolist()) == list(range(8)) and distance.amin(1).max() < 1e-4
    for r, k in enumerate(image.tolist()):
        assert captions[stored["caption"][r]] == CAPTIONS[k]
        torch.testing.assert_close(stored["mean_flipped"][r], flipped[k], atol=1e-4, rtol=1e-4)

    # LatentDataset: every item carries its row's caption index, flipped or not (the flips and
    # posterior noise drawn as LatentDataset draws them for a batch)
    cache = LatentDataset(root / "cache")
    assert cache.has_captions and cache.captions == captions
    flips = 0
    for epoch in range(4):
        cache.set_epoch(epoch)
        idx = list(range(8))
        g = torch.Generator().manual_seed(hash((0, epoch, *idx)) & (2**63 - 1))
        flip = (torch.rand(len(idx), generator=g) < 0.5).view(-1, 1, 1, 1)
        mean = torch.where(flip, stored["mean_flipped"], stored["mean"])
        std = torch.where(flip, stored["std_flipped"], stored["std"])
        expected = (mean + std * torch.randn(mean.shape, generator=g) - cache.shift) * cache.scale
        batch = cache.__getitems__(idx)
        assert torch.equal(torch.stack([b["latents"] for b in batch]), expected)
        assert [int(b["caption"]) for b in batch] == stored["caption"].tolist()
        flips += int(flip.sum())
    assert 0 < flips < 32  # both kinds of rows were checked
    batch = next(iter(DataLoader(cache, batch_size=8)))
    assert batch["caption"].dtype == torch.int64 and batch["caption"].tolist() == stored["caption"].tolist()

    # idempotent: a second encode reuses the cache
    assert encode_dataset(root / "vae", data, "train", root / "cache", batch_size=2, shard_size=3) == meta


def test_a_cache_without_captions_has_none(setup):
    root, _ = setup
    data = _data(root, "data.caption_column=null", "data.random_flip=false")
    ds = build_dataset(data, "train", train=False)
    assert not ds.has_captions and "caption" not in ds[0]
    meta = encode_dataset(root / "vae", data, "train", root / "plain", batch_size=8, shard_size=5)
    assert meta["has_captions"] is False and "caption_column" not in meta["data"]
    assert not (root / "plain" / CAPTIONS_FILE).exists()
    assert "caption" not in load_file(str(root / "plain" / meta["shards"][0]))
    cache = LatentDataset(root / "plain")
    assert not cache.has_captions and "caption" not in cache[0]
    with pytest.raises(UserError, match="has no captions"):
        read_captions(root / "plain", meta)


def test_an_interrupted_encode_resumes_with_the_same_captions(setup, tmp_path, monkeypatch):
    root, _ = setup
    data, out, original = _data(root, "data.random_flip=false"), tmp_path / "cache", latents.save_file

    def interrupted(tensors, path):
        if "shard-00001" in path:
            raise KeyboardInterrupt
        original(tensors, path)

    monkeypatch.setattr(latents, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(root / "vae", data, "train", out, batch_size=4, shard_size=3)
    monkeypatch.undo()
    written = (out / CAPTIONS_FILE).read_text()
    (out / CAPTIONS_FILE).write_text(json.dumps(["another", "list"]))
    with pytest.raises(UserError, match="captions differ"):
        encode_dataset(root / "vae", data, "train", out, batch_size=4, shard_size=3)
    (out / CAPTIONS_FILE).write_text(written)
    meta = encode_dataset(root / "vae", data, "train", out, batch_size=4, shard_size=3)
    whole = encode_dataset(root / "vae", data, "train", tmp_path / "whole", batch_size=4, shard_size=3)
    assert meta["shard_sha256"] == whole["shard_sha256"] and meta["captions_sha256"] == whole["captions_sha256"]


def test_a_tampered_captions_file_is_refused(setup, tmp_path):
    root, _ = setup
    out = tmp_path / "cache"
    meta = encode_dataset(root / "vae", _data(root, "data.random_flip=false"), "train", out, batch_size=8,
                          shard_size=8)
    captions = json.loads((out / CAPTIONS_FILE).read_text())
    (out / CAPTIONS_FILE).write_text(json.dumps([captions[1], captions[0], *captions[2:]]))  # swapped
    for read in (lambda: read_captions(out, meta), lambda: LatentDataset(out)):
        with pytest.raises(UserError, match=f"{CAPTIONS_FILE} is corrupt"):
            read()
    (out / CAPTIONS_FILE).unlink()
    with pytest.raises(UserError, match=f"{CAPTIONS_FILE} is missing"):
        LatentDataset(out)


def test_a_wrong_caption_column_names_the_columns(setup, tmp_path, monkeypatch):
    import datasets

    root, _ = setup
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    with pytest.raises(UserError, match="no caption column 'txt'.*columns: image, text, score"):
        build_dataset(_data(root, "data.caption_column=txt"), "train", train=False)
    with pytest.raises(UserError, match="column 'score' holds .*int64.*not caption strings.*columns: image, text"):
        build_dataset(_data(root, "data.caption_column=score"), "train", train=False)
    # a metadata.jsonl line without the caption: the file is named
    _image_folder(tmp_path / "images", extra={5: {"text": None}})
    with pytest.raises(UserError, match="column 'text' holds None, not a caption, for .*5.png"):
        build_dataset(_data(tmp_path), "train", train=False)


@pytest.mark.parametrize("source", ["fashion-mnist", "photos"])
def test_caption_column_is_refused_where_it_is_not_read(source):
    with pytest.raises(UserError, match=f"'data.caption_column' does not apply to data.source '{source}'"):
        load_config(TINY_KL, [f"data.source={source}", "data.caption_column=text"], Config)
    with pytest.raises(UserError, match=f"'caption_column' does not apply to data.source '{source}'"):
        DataConfig(source=source, caption_column="text")


def test_fashion_mnist_has_no_captions(fake_fashion):
    ds = build_dataset(DataConfig(path=str(fake_fashion), max_images=2), "test", train=False)
    assert not ds.has_captions and "caption" not in ds[0]


def test_hub_captions(monkeypatch):
    import datasets

    images = [Image.new("RGB", (12, 10), (255, 0, 0)), Image.new("RGB", (10, 10), (0, 0, 255))]
    fake = datasets.Dataset.from_dict({"img": images, "prompt": ["red", "blue"]},
                                      features=datasets.Features({"img": datasets.Image(),
                                                                  "prompt": datasets.Value("string")}))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    cfg = DataConfig(source="hub", name="someone/pics", image_column="img", caption_column="prompt", resolution=8)
    ds = build_dataset(cfg, "train", train=False)
    assert ds.has_captions and [ds[i]["caption"] for i in range(2)] == ["red", "blue"]
    with pytest.raises(UserError, match="no caption column 'text'.*columns: img, prompt"):
        build_dataset(DataConfig(source="hub", name="someone/pics", image_column="img", caption_column="text"),
                      "train", train=False)


def test_a_text_model_trains_on_each_rows_own_caption(setup, tmp_path, monkeypatch):
    """diffusion.conditioning=text on a captioned cache: the tokens of each image are those of
    its row's caption (or of "" where dropped); the preview prompts are the first captions."""
    from ldm_vae.diffusion.config import LDMConfig
    from ldm_vae.diffusion.text import tokenize
    from ldm_vae.diffusion.train import train_ldm

    from .conftest import TINY_LDM, text_steps

    root, _ = setup
    encode_dataset(root / "vae", _data(root), "train", tmp_path / "cache", batch_size=8)
    seen = text_steps(monkeypatch)
    cfg = load_config(TINY_LDM, [f"latents={tmp_path / 'cache'}", "diffusion.conditioning=text", "text.hidden_size=16",
                                 "text.num_heads=2", "text.num_layers=1", "train.batch_size=4", "train.max_steps=4",
                                 "train.image_every=4", "train.checkpoint_every=4", "sample.per_class=1",
                                 "sample.steps=1", "diffusion.label_dropout=0.5"], LDMConfig)
    train_ldm(cfg, tmp_path / "run")
    captions = read_captions(tmp_path / "cache", read_cache(tmp_path / "cache"))
    tokenizer = seen[0]["tokenizer"]
    empty = tokenize(tokenizer, [""])[0]
    kept = 0
    for s in seen:
        for index, tokens in zip(s["batch"]["caption"], s["tokens"]):
            if not torch.equal(tokens, empty):
                assert torch.equal(tokens, tokenize(tokenizer, [captions[index]])[0]), captions[index]
                kept += 1
    assert 0 < kept < 16  # some of the 16 captions kept, some dropped
    assert (tmp_path / "run" / "samples" / "samples_0000004.png").is_file()
