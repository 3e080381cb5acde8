"""A folder of broken and unusual image files trains without crashing: decodable files are
converted correctly, the rest are skipped, counted and listed; too many bad files stop early."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ldm_vae.autoencoder.config import Config
from ldm_vae.autoencoder.train import train
from ldm_vae.config import load_config
from ldm_vae.data.sources import BadImage, build_dataset, decode_image
from ldm_vae.errors import UserError

from .conftest import TINY_KL


def _png(img: Image.Image, path, **kw):
    img.save(path, format="PNG", **kw)


# Colours chosen so that every channel differs: a swapped, dropped or greyed channel shows.
PALETTE = [(255, 0, 0), (0, 128, 255), (12, 34, 56), (250, 250, 5)]  # index 3 saved as transparent
CMYK = (30, 100, 200, 50)  # K != 0: a conversion that ignores K (or subtracts it) gives other values
TINY = (10, 20, 30)
MARK, FIELD = (255, 0, 0), (0, 200, 0)


def _palette_png(path):
    """16x16 'P' image, one palette index per quadrant (0 | 1 over 2 | 3); index 3 transparent."""
    idx = np.zeros((16, 16), np.uint8)
    idx[:8, 8:], idx[8:, :8], idx[8:, 8:] = 1, 2, 3
    img = Image.frombytes("P", (16, 16), idx.tobytes())
    img.putpalette([c for rgb in PALETTE for c in rgb])
    _png(img, path, transparency=3)
    rgb = np.array(PALETTE + [(255, 255, 255)], np.uint8)  # transparent -> composited on white
    return rgb[np.where(idx == 3, 4, idx)]  # the expected RGB array


def _exif_marked(path, orientation):
    """A 24x16 (WxH) JPEG, top-left 8x8 block MARK, the rest FIELD, with an EXIF orientation.
    Asymmetric, so rotating the wrong way moves the mark. 4:4:4 and block-aligned: the flat 8x8
    JPEG blocks decode to within 1 of the colours. Returns the expected displayed array."""
    a = np.empty((16, 24, 3), np.uint8)
    a[:], a[:8, :8] = FIELD, MARK
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, format="JPEG", exif=exif, quality=95, subsampling=0)
    # EXIF 6: the viewer turns the stored image 90 degrees clockwise; 8: counter-clockwise
    return np.rot90(a, k={6: -1, 8: 1}[orientation])


def _close(got, expected, tol=0):
    got = np.asarray(got, dtype=int)
    assert got.shape == np.shape(expected) and np.abs(got - expected).max() <= tol, (got, expected)


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
    Image.new("CMYK", (16, 16), CMYK).save(folder / "cmyk.jpg", format="JPEG")
    _png(Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)), folder / "gray16.png")
    _palette_png(folder / "palette.png")
    _png(Image.new("LA", (16, 16), (0, 0)), folder / "la.png")  # fully transparent black
    _png(Image.new("RGBA", (16, 16), (0, 0, 255, 255)), folder / "rgba.png")
    _png(Image.new("RGB", (1, 1), TINY), folder / "tiny.png")
    _exif_marked(folder / "exif_rotated.jpg", 6)
    _png(Image.new("L", (400, 400), 128), folder / "huge.png")  # a "bomb" under the lowered test limit
    return {"truncated.jpg", "empty.png", "notes.png", "huge.png"}


@pytest.fixture
def low_bomb_limit(monkeypatch):
    # PIL refuses images above 2x this many pixels before decoding them (400x400 here)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)


def test_unusual_files_decode_to_correct_rgb(tmp_path, low_bomb_limit):
    _zoo(tmp_path / "zoo")
    z = tmp_path / "zoo"
    # CMYK: PIL's conversion, (255 - C) * (255 - K) / 255 per channel, on every pixel and channel
    cmyk_rgb = Image.new("CMYK", (1, 1), CMYK).convert("RGB").getpixel((0, 0))
    _close(decode_image(str(z / "cmyk.jpg")), np.full((16, 16, 3), cmyk_rgb), tol=1)
    assert abs(decode_image(str(z / "gray16.png")).getpixel((8, 8))[0] - 128) <= 1  # scaled, not clipped
    assert decode_image(str(z / "la.png")).getpixel((8, 8)) == (255, 255, 255)  # transparent -> white
    assert decode_image(str(z / "rgba.png")).getpixel((8, 8)) == (0, 0, 255)
    # palette: each quadrant is exactly its palette colour; the transparent index is white
    _close(decode_image(str(z / "palette.png")), _palette_png(tmp_path / "p.png"))
    _close(decode_image(str(z / "tiny.png")), [[TINY]])
    # EXIF: both rotation directions, mark where the viewer (and PIL's exif_transpose) puts it
    for orientation in (6, 8):
        expected = _exif_marked(tmp_path / f"o{orientation}.jpg", orientation)
        got = decode_image(str(tmp_path / f"o{orientation}.jpg"))
        assert got.size == (16, 24)
        _close(got, expected, tol=2)
        _close(got, ImageOps.exif_transpose(Image.open(tmp_path / f"o{orientation}.jpg")).convert("RGB"))
    for name, reason in (("truncated.jpg", None), ("empty.png", None), ("notes.png", None), ("huge.png", "bomb")):
        with pytest.raises(BadImage, match=reason):
            decode_image(str(z / name))


def test_unusual_files_load_as_exact_pixel_values(tmp_path, low_bomb_limit):
    """The dataset items (resized, cropped, scaled to [-1, 1]) hold the same colours: at the
    16x16 resolution the 16x16 files are not resampled, the 1x1 file is a constant."""
    _zoo(tmp_path / "zoo", n_good=1)
    cfg = load_config(TINY_KL, ["data.source=imagefolder", f"data.path={tmp_path / 'zoo'}",
                                "data.max_bad_fraction=0.5"], Config)
    ds = build_dataset(cfg.data, "train", train=False)  # no flip, centre crop
    items = {ds.ds[r]["image"]["path"].split("/")[-1]: ds[i]["pixel_values"] for i, r in enumerate(ds.good)}
    rgb = {k: ((v + 1) * 127.5).round().permute(1, 2, 0).numpy() for k, v in items.items()}
    _close(rgb["palette.png"], _palette_png(tmp_path / "p.png"))
    _close(rgb["tiny.png"], np.broadcast_to(TINY, (16, 16, 3)))  # every pixel, every channel
    cmyk_rgb = Image.new("CMYK", (1, 1), CMYK).convert("RGB").getpixel((0, 0))
    _close(rgb["cmyk.jpg"], np.broadcast_to(cmyk_rgb, (16, 16, 3)), tol=1)
    # displayed 16x24: the centre crop keeps rows 4..19, with the mark's lower half top right
    _close(rgb["exif_rotated.jpg"], _exif_marked(tmp_path / "o6.jpg", 6)[4:20], tol=2)


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
