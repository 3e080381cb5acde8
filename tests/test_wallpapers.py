"""data.source=wallpapers: whole images held out, crop shapes and ranges, a deterministic test
split, the largest of a wallpaper's resolutions, the art option and the missing-package messages.

The Debian packages are replaced by a temporary folder of small generated JPEG/WebP/PNG files
(and scikit-image's photos by small generated ones), so these run in a second without the
packages; `test_installed_packages` uses the real ones and skips where they are absent.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_vae.data import sources as data
from ldm_vae.data.config import DataConfig
from ldm_vae.data.sources import build_dataset
from ldm_vae.errors import UserError

PLASMA, MATE, GNOME = "plasma-workspace-wallpapers", "mate-backgrounds", "gnome-backgrounds"
# each fake image is one solid colour, so a crop's mean colour names the image it came from
TRAIN_PHOTOS = ("Path", "Grey", "EveningGlow")
MATE_PHOTOS = ("Dune",)  # a second package of photographs, training only
HELD_OUT_PHOTOS = ("Kite", "summer_1am")
ART = {PLASMA: ("Altai",), GNOME: ("wood-l",)}


def _colour(k: int) -> tuple[int, int, int]:
    return (20 + 37 * k) % 256, (200 - 23 * k) % 256, (90 + 59 * k) % 256


def _save(path: Path, size: tuple[int, int], colour, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    (img.convert("L") if mode == "L" else img).save(path, quality=95)


@pytest.fixture
def fake(tmp_path, monkeypatch) -> dict[str, tuple[int, int, int]]:
    """Fake packages and scikit-image photos; returns each image's colour by name."""
    plasma, mate, gnome = tmp_path / "wallpapers", tmp_path / "mate", tmp_path / "gnome"
    colours, k = {}, 0
    for name in TRAIN_PHOTOS + HELD_OUT_PHOTOS + ART[PLASMA]:
        colours[name], k = _colour(k), k + 1
        if name == "Grey":  # a grayscale JPEG: its colour is the gray level
            colours[name] = (Image.new("RGB", (1, 1), colours[name]).convert("L").getpixel((0, 0)),) * 3
        images = plasma / name / "contents" / "images"
        ext = "png" if name in ART[PLASMA] else "jpg"
        # several resolutions of one picture: only the largest (by pixels) is used
        for w, h in ((96, 60), (240, 150), (100, 200)):
            _save(images / f"{w}x{h}.{ext}", (w, h), colours[name], "L" if name == "Grey" else "RGB")
    colours["wood-l"], colours["Dune"] = _colour(k), _colour(k + 1)
    _save(gnome / "wood-l.webp", (200, 200), colours["wood-l"])
    _save(mate / "Dune.jpg", (160, 100), colours["Dune"])
    k += 2
    (gnome / "wood-l.xml").write_text("<background/>")  # a slide show, not an image: skipped
    photos = []
    for i, name in enumerate(data.PHOTO_NAMES):
        colours[name] = _colour(k + 1 + i)
        photos.append(Image.new("RGB", (90, 70), colours[name]))
    monkeypatch.setitem(data.WALLPAPER_PACKAGES, PLASMA, (str(plasma), "{}/contents/images/*"))
    monkeypatch.setitem(data.WALLPAPER_PACKAGES, MATE, (str(mate), "{}.*"))
    monkeypatch.setitem(data.WALLPAPER_PACKAGES, GNOME, (str(gnome), "{}.*"))
    monkeypatch.setattr(data, "WALLPAPER_PHOTOS",
                        {PLASMA: TRAIN_PHOTOS + HELD_OUT_PHOTOS + ("ColdRipple",), MATE: MATE_PHOTOS})  # one missing
    monkeypatch.setattr(data, "WALLPAPER_ART", ART)
    monkeypatch.setattr(data, "_load_photos", lambda source="photos": photos)
    monkeypatch.setattr(data, "_CAPPED", {})
    return colours


def _source(x: torch.Tensor, colours: dict) -> str:
    """The name of the image whose colour is nearest to the crop's mean colour."""
    mean = (x.mean((1, 2)) + 1) * 127.5
    return min(colours, key=lambda n: float(((mean - torch.tensor(colours[n], dtype=torch.float32)) ** 2).sum()))


def _cfg(**kw) -> DataConfig:
    return DataConfig(source="wallpapers", resolution=16, max_side=128, photos_per_epoch=64, **kw)


def test_train_and_test_share_no_image(fake):
    train, test = build_dataset(_cfg(), "train", train=True), build_dataset(_cfg(), "test", train=False)
    held_out = set(HELD_OUT_PHOTOS) | {"chelsea"}
    assert set(test.names) == held_out
    assert set(train.names) == set(TRAIN_PHOTOS) | set(MATE_PHOTOS) | set(data.PHOTO_NAMES) - held_out
    # by content, not only by name: every crop comes from an image of its own split
    train_seen = {_source(train[i]["pixel_values"], fake) for i in range(len(train))}
    test_seen = {_source(test[i]["pixel_values"], fake) for i in range(len(test))}
    assert test_seen == held_out and train_seen <= set(train.names) and not train_seen & test_seen
    assert len(test) == len(held_out) * test.SCALES * test.GRID**2
    # any prefix covers every held-out image (eval reads the first N items)
    short = build_dataset(_cfg(max_images=len(held_out)), "test", train=False)
    assert {_source(short[i]["pixel_values"], fake) for i in range(len(short))} == held_out


def test_crops_shape_range_and_no_labels(fake):
    ds = build_dataset(_cfg(), "train", train=True)
    assert len(ds) == 64 and not ds.has_labels and ds.class_names is None
    assert ds.dataset_id == "debian-wallpapers" and "64 random crops of 11 images" in ds.description  # 3 + 1 + 7
    for i in range(8):
        item = ds[i]
        x = item["pixel_values"]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert -1 <= x.min() and x.max() <= 1 and item["label"].item() == -1
    # Grey is a grayscale JPEG: decoded to three equal channels
    grey = ds.photos[ds.names.index("Grey")]
    assert grey.mode == "RGB" and len(set(grey.getpixel((5, 5)))) == 1
    # the largest of the three resolutions (240x150), downscaled to the longer side max_side=128
    assert ds.photos[ds.names.index("Path")].size == (128, 80)


def test_test_split_is_deterministic(fake, tmp_path):
    # textured images, so that different crops differ
    rng = np.random.default_rng(0)
    for name in HELD_OUT_PHOTOS:
        path = Path(data.WALLPAPER_PACKAGES[PLASMA][0]) / name / "contents" / "images" / "240x150.jpg"
        Image.fromarray(rng.integers(0, 256, (150, 240, 3), dtype=np.uint8)).save(path, quality=95)
    first = build_dataset(_cfg(), "test", train=False, seed=0)
    data._CAPPED.clear()  # decoded again, as another process would
    second = build_dataset(_cfg(), "test", train=False, seed=7)
    second.set_epoch(3)
    crops = torch.stack([first[i]["pixel_values"] for i in range(len(first))])
    assert torch.equal(crops, torch.stack([second[i]["pixel_values"] for i in range(len(second))]))
    assert len({c.sum().item() for c in crops}) > len(crops) // 2  # different boxes, not one crop repeated
    # the train split: new crops each epoch, the same ones for the same (seed, epoch, index)
    train = build_dataset(_cfg(), "train", train=True)
    a = train[1]["pixel_values"]
    assert torch.equal(a, train[1]["pixel_values"])
    train.set_epoch(1)
    assert not torch.equal(a, train[1]["pixel_values"])


def test_art_joins_training_only(fake):
    train = build_dataset(_cfg(wallpaper_art=True), "train", train=True)
    test = build_dataset(_cfg(wallpaper_art=True), "test", train=False)
    assert {"Altai", "wood-l"} <= set(train.names) and "art included" in train.description
    assert set(test.names) == set(HELD_OUT_PHOTOS) | {"chelsea"}


def test_missing_packages_name_the_apt_command(fake, tmp_path, monkeypatch):
    monkeypatch.setitem(data.WALLPAPER_PACKAGES, PLASMA, (str(tmp_path / "nowhere"), "{}/contents/images/*"))
    hint = r"apt-get install -y plasma-workspace-wallpapers mate-backgrounds gnome-backgrounds"
    with pytest.raises(UserError, match=rf"needs Debian's {PLASMA} \(.*nowhere does not exist\); .*{hint}"):
        build_dataset(_cfg(), "train", train=True)
    with pytest.raises(UserError, match="train, test"):
        build_dataset(_cfg(), "validation", train=False)


def test_missing_mate_only_matters_for_training(fake, tmp_path, monkeypatch):
    monkeypatch.setitem(data.WALLPAPER_PACKAGES, MATE, (str(tmp_path / "no-mate"), "{}.*"))
    test = build_dataset(_cfg(), "test", train=False)  # the held-out images are all Plasma's
    assert set(test.names) == set(HELD_OUT_PHOTOS) | {"chelsea"}
    with pytest.raises(UserError, match=f"needs Debian's {MATE} .*no-mate does not exist.*apt-get install"):
        build_dataset(_cfg(), "train", train=True)


def test_missing_gnome_only_matters_with_art(fake, tmp_path, monkeypatch):
    monkeypatch.setitem(data.WALLPAPER_PACKAGES, GNOME, (str(tmp_path / "no-gnome"), "{}.*"))
    build_dataset(_cfg(), "train", train=True)
    with pytest.raises(UserError, match=f"needs Debian's {GNOME} .*no-gnome does not exist"):
        build_dataset(_cfg(wallpaper_art=True), "train", train=True)


def test_config_rules():
    with pytest.raises(UserError, match="max_side"):
        DataConfig(source="wallpapers", resolution=256, max_side=128)
    with pytest.raises(UserError, match="'wallpaper_art' does not apply to data.source 'photos'"):
        DataConfig(source="photos", wallpaper_art=True)
    assert data.hub_dataset_id("wallpapers") is None


def _installed(package: str, names: tuple[str, ...]) -> bool:
    folder, pattern = data.WALLPAPER_PACKAGES[package]  # Lomiri's folder exists with GNOME's alone
    return any(Path(folder).glob(pattern.format(names[0])))


@pytest.mark.skipif(not all(_installed(p, n) for p, n in (*data.WALLPAPER_PHOTOS.items(), *data.WALLPAPER_ART.items())),
                    reason="the wallpaper packages are not installed")
def test_installed_packages():
    pytest.importorskip("skimage")
    cfg = DataConfig(source="wallpapers", resolution=32, photos_per_epoch=4)
    train, test = build_dataset(cfg, "train", train=True), build_dataset(cfg, "test", train=False)
    assert sorted(test.names) == sorted(data.WALLPAPERS_HELD_OUT)
    assert len(train.names) == 38 and not set(train.names) & set(test.names)
    assert all(max(img.size) <= cfg.max_side for img in train.photos + test.photos)
    assert train[0]["pixel_values"].shape == test[len(test) - 1]["pixel_values"].shape == (3, 32, 32)


def test_rare_colour_share():
    """scripts/rgb_artefacts.py's colour coverage: a photograph made of the training photographs'
    colours has no rare pixels, one of a colour they lack has only rare pixels, and a photograph
    half of each is half rare."""
    from .conftest import load_script

    pytest.importorskip("skimage")
    script = load_script("rgb_artefacts")
    green, purple = (40, 160, 60), (120, 40, 170)
    train = [Image.new("RGB", (64, 48), green), Image.new("RGB", (32, 32), (200, 200, 200))]
    half = Image.new("RGB", (64, 64), green)
    half.paste(purple, (0, 0, 32, 64))
    assert script.rare_colour_share(train, [train[0], Image.new("RGB", (40, 40), purple), half]) == [0.0, 1.0, 0.5]
