"""A folder of broken and unusual image files trains without crashing: decodable files are
converted correctly, the rest are skipped, counted and listed; too many bad files stop early."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_vae.autoencoder.config import Config
from ldm_vae.autoencoder.train import train
from ldm_vae.config import load_config
from ldm_vae.data.sources import BadImage, build_dataset, decode_image
from ldm_vae.errors import UserError

from .conftest import TINY_KL


def _png(img: Image.Image, path, **kw):
    img.save(path, format="PNG", **kw)


def _zoo(folder, n_good=40):
    """Good RGB images plus one of every troublesome kind; returns the names expected to be bad."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n_good):
        _png(Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)), folder / f"good{i}.png")
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image\n")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg", format="JPEG")  # red
    _png(Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)), folder / "gray16.png")
    _png(Image.new("P", (16, 16), 3), folder / "palette.png")
    _png(Image.new("LA", (16, 16), (0, 0)), folder / "la.png")  # fully transparent black
    _png(Image.new("RGBA", (16, 16), (0, 0, 255, 255)), folder / "rgba.png")
    _png(Image.new("RGB", (1, 1), (10, 20, 30)), folder / "tiny.png")
    rotated = Image.new("RGB", (30, 10), (0, 200, 0))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(folder / "exif_rotated.jpg", format="JPEG", exif=exif)
    _png(Image.new("L", (400, 400), 128), folder / "huge.png")  # a "bomb" under the lowered test limit
    return {"truncated.jpg", "empty.png", "notes.png", "huge.png"}


@pytest.fixture
def low_bomb_limit(monkeypatch):
    # PIL refuses images above 2x this many pixels before decoding them (400x400 here)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)


def test_unusual_files_decode_to_correct_rgb(tmp_path, low_bomb_limit):
    _zoo(tmp_path / "zoo")
    z = tmp_path / "zoo"
    assert decode_image(str(z / "cmyk.jpg")).getpixel((8, 8))[0] > 200  # red stays red
    assert abs(decode_image(str(z / "gray16.png")).getpixel((8, 8))[0] - 128) <= 1  # scaled, not clipped
    assert decode_image(str(z / "la.png")).getpixel((8, 8)) == (255, 255, 255)  # transparent -> white
    assert decode_image(str(z / "rgba.png")).getpixel((8, 8)) == (0, 0, 255)
    assert decode_image(str(z / "exif_rotated.jpg")).size == (10, 30)  # EXIF rotation applied
    assert decode_image(str(z / "tiny.png")).size == (1, 1)
    for name, reason in (("truncated.jpg", None), ("empty.png", None), ("notes.png", None), ("huge.png", "bomb")):
        with pytest.raises(BadImage, match=reason):
            decode_image(str(z / name))


def test_training_on_a_folder_with_bad_files_skips_and_lists_them(tmp_path, low_bomb_limit):
    bad = _zoo(tmp_path / "zoo")
    cfg = load_config(TINY_KL, ["data.source=imagefolder", f"data.path={tmp_path / 'zoo'}", "train.max_steps=4",
                                "data.max_bad_fraction=0.2", "train.batch_size=8"], Config)
    ds = build_dataset(cfg.data, "train", train=True)
    assert {p.split("/")[-1] for p, _ in ds.bad} == bad and len(ds) == 40 + 7
    x = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
    assert x.shape[1:] == (3, 16, 16) and torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    summary = train(cfg, tmp_path / "run").summary
    assert summary["steps"] == 4 and summary["bad_images"]["count"] == 4
    listed = (tmp_path / "run" / "bad_images.txt").read_text()
    assert all(name in listed for name in bad)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["bad_images"]["count"] == 4


def test_too_many_bad_files_stop_before_training(tmp_path, low_bomb_limit):
    _zoo(tmp_path / "zoo", n_good=4)
    cfg = load_config(TINY_KL, ["data.source=imagefolder", f"data.path={tmp_path / 'zoo'}"], Config)
    with pytest.raises(UserError, match=r"4 of 15 files cannot be used as images.*max_bad_fraction"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
