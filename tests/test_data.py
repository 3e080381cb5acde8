"""Data sources: shapes, ranges, labels, determinism and error messages (CPU, no network)."""

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_vae.data import sources as data
from ldm_vae.data.config import DataConfig
from ldm_vae.data.sources import build_dataset
from ldm_vae.errors import UserError
from ldm_vae.files import make_grid, save_image


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, image_magic: int = 2051):
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">iiii", image_magic, n, rows, cols) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">ii", 2049, n) + labels.astype(np.uint8).tobytes())


@pytest.fixture
def fmnist(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    train[0] = 0
    train[0, :, :14] = 255  # asymmetric: left half white, so a flip is visible
    write_idx(tmp_path, "train", train, np.arange(20) % 10)
    write_idx(tmp_path, "t10k", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), np.arange(10)[::-1] % 10)
    return tmp_path


def fm_cfg(path, **kw):
    return DataConfig(source="fashion-mnist", path=str(path), resolution=32, **kw)


def test_fashion_mnist_items(fmnist):
    ds = build_dataset(fm_cfg(fmnist), "train", train=False)
    assert len(ds) == 20 and ds.has_labels and ds.dataset_id == "zalando-datasets/fashion_mnist"
    assert "train" in ds.description and "20 images" in ds.description and "32x32" in ds.description
    item = ds[3]
    x = item["pixel_values"]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    assert item["label"].dtype == torch.int64 and item["label"].shape == () and item["label"].item() == 3
    # the asymmetric image stays left-white / right-black after resizing
    x0 = ds[0]["pixel_values"]
    assert x0[0, :, :4].min() > 0.9 and x0[0, :, -4:].max() < -0.9

    test = build_dataset(fm_cfg(fmnist), "test", train=False)
    assert len(test) == 10 and test[0]["label"].item() == 9
    assert len(build_dataset(fm_cfg(fmnist, max_images=5), "train", train=True)) == 5


def test_fashion_mnist_default_collate(fmnist):
    batch = next(iter(torch.utils.data.DataLoader(build_dataset(fm_cfg(fmnist), "train", True), batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["label"].shape == (4,)


def test_fashion_mnist_flip_only_when_train(fmnist):
    cfg = fm_cfg(fmnist)
    plain = build_dataset(cfg, "train", train=False)[0]["pixel_values"]
    train_ds, eval_ds = build_dataset(cfg, "train", train=True), build_dataset(cfg, "train", train=False)
    flipped = 0
    for epoch in range(10):
        train_ds.set_epoch(epoch)
        flipped += torch.equal(train_ds[0]["pixel_values"], plain.flip(-1))
        assert torch.equal(eval_ds[0]["pixel_values"], plain)
    assert 0 < flipped < 10
    # augmentation depends on (seed, epoch, index) only, not on the global RNG (resume relies on it)
    train_ds.set_epoch(3)
    a = torch.stack([train_ds[i]["pixel_values"] for i in range(8)])
    torch.manual_seed(123)
    assert torch.equal(a, torch.stack([train_ds[i]["pixel_values"] for i in range(8)]))
    other_seed = build_dataset(cfg, "train", train=True)
    other_seed.seed, other_seed.epoch = 1, 3
    assert not torch.equal(a, torch.stack([other_seed[i]["pixel_values"] for i in range(8)]))
    no_flip = build_dataset(fm_cfg(fmnist, random_flip=False), "train", train=True)
    assert all(torch.equal(no_flip[0]["pixel_values"], plain) for _ in range(10))


def test_fashion_mnist_errors(fmnist, tmp_path):
    with pytest.raises(UserError, match="train, test"):
        build_dataset(fm_cfg(fmnist), "validation", train=False)
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="nowhere"):
        build_dataset(fm_cfg(missing), "train", train=False)
    bad = tmp_path / "bad"
    write_idx(bad, "train", np.zeros((2, 28, 28), np.uint8), np.zeros(2), image_magic=1234)
    with pytest.raises(UserError, match="magic 1234"):
        build_dataset(fm_cfg(bad), "train", train=False)
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz"):
        build_dataset(fm_cfg(bad), "test", train=False)


def test_fashion_mnist_offline_fallback_message(monkeypatch, tmp_path):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host\nmore lines")

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as e:
        build_dataset(DataConfig(source="fashion-mnist"), "train", train=False)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "data.path" in msg and "no route to host" in msg
    assert "more lines" not in msg


@pytest.mark.skipif(not Path(data.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_real():
    ds = build_dataset(DataConfig(source="fashion-mnist", resolution=32), "train", train=False)
    assert len(ds) == 60000 and data.FASHION_MNIST_DIR in ds.description
    labels = [ds[i]["label"].item() for i in range(0, 60000, 6000)]
    assert all(0 <= v <= 9 for v in labels)
    assert ds[0]["pixel_values"].shape == (3, 32, 32)


@pytest.fixture
def image_folder(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # keep ~/.cache clean
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    specs = {"cat": [((40, 30), "RGB"), ((50, 64), "L")], "dog": [((33, 33), "RGBA"), ((80, 20), "RGB")]}
    for cls, items in specs.items():
        (root / cls).mkdir(parents=True)
        for k, (size, mode) in enumerate(items):
            channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
            arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze()
            Image.fromarray(arr, mode).save(root / cls / f"{k}.png")
    return root


def test_imagefolder(image_folder):
    cfg = DataConfig(source="imagefolder", path=str(image_folder), resolution=16, center_crop=False)
    for train in (False, True):
        ds = build_dataset(cfg, "train", train=train)
        assert len(ds) == 4 and ds.has_labels and ds.dataset_id == "imagefolder"
        labels = set()
        for i in range(len(ds)):
            item = ds[i]
            assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
            assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
            labels.add(item["label"].item())
        assert labels == {0, 1}
    ds = build_dataset(cfg, "train", train=False)
    assert torch.equal(ds[3]["pixel_values"], ds[3]["pixel_values"])  # deterministic when not training
    assert len(build_dataset(DataConfig(source="imagefolder", path=str(image_folder), max_images=2),
                             "train", train=False)) == 2
    unlabeled = build_dataset(DataConfig(source="imagefolder", path=str(image_folder), label_column=None),
                              "train", train=False)
    assert not unlabeled.has_labels and unlabeled[0]["label"].item() == -1


def test_decoded_image_cache_gives_the_same_items(image_folder):
    """data.decoded_cache_mb keeps resized images from the build-time scan; items (random
    crops and flips included) are the ones decoding on every access gives, also when the
    budget holds only some of the images."""
    def items(cache_mb: float, train: bool):
        cfg = DataConfig(source="imagefolder", path=str(image_folder), resolution=16, center_crop=False,
                         decoded_cache_mb=cache_mb)
        ds = build_dataset(cfg, "train", train=train, seed=3)
        ds.set_epoch(2)
        return ds, [ds[i]["pixel_values"] for i in range(len(ds))]

    for train in (True, False):
        none, plain = items(0, train)
        full, cached = items(2048, train)
        some, partly = items(3 * 16 * 40 / 2**20, train)  # a budget (in MB) that holds only the first images
        assert len(none.decoded) == 0 and len(full.decoded) == 4 and 0 < len(some.decoded) < 4
        for a, b, c in zip(plain, cached, partly):
            assert torch.equal(a, b) and torch.equal(a, c)


def test_imagefolder_errors(image_folder, tmp_path):
    with pytest.raises(UserError, match="available: train"):
        build_dataset(DataConfig(source="imagefolder", path=str(image_folder)), "test", train=False)
    with pytest.raises(UserError, match="missing-folder"):
        build_dataset(DataConfig(source="imagefolder", path=str(tmp_path / "missing-folder")), "train", False)
    with pytest.raises(UserError, match="columns: image, label"):
        build_dataset(DataConfig(source="imagefolder", path=str(image_folder), image_column="img"), "train", False)


def test_photos():
    cfg = DataConfig(source="photos", resolution=32, photos_per_epoch=10)
    ds = build_dataset(cfg, "train", train=True)
    assert len(ds) == 10 and ds.has_labels and ds.dataset_id == "skimage-photos"
    item = ds[0]
    assert item["pixel_values"].shape == (3, 32, 32) and -1 <= item["pixel_values"].min()
    assert item["pixel_values"].max() <= 1 and 0 <= item["label"].item() < len(data.PHOTO_NAMES)
    # RGB: channels differ
    assert not torch.equal(item["pixel_values"][0], item["pixel_values"][1])
    a = ds[0]["pixel_values"]
    torch.manual_seed(0)
    assert torch.equal(a, ds[0]["pixel_values"])
    ds.set_epoch(1)  # a new epoch draws new crops
    assert not torch.equal(a, ds[0]["pixel_values"])
    # train split without training: deterministic per index
    frozen = build_dataset(cfg, "train", train=False)
    assert torch.equal(frozen[4]["pixel_values"], frozen[4]["pixel_values"])

    t1, t2 = build_dataset(cfg, "test", train=False), build_dataset(cfg, "test", train=False)
    assert len(t1) == 16 * len(data.PHOTO_NAMES)
    for i in (0, 17, len(t1) - 1):
        assert torch.equal(t1[i]["pixel_values"], t2[i]["pixel_values"])
    assert t1[17]["label"].item() == 1
    assert len(build_dataset(DataConfig(source="photos", max_images=3), "test", False)) == 3
    with pytest.raises(UserError, match="train, test"):
        build_dataset(cfg, "validation", train=False)


def test_photos_without_scikit_image_name_the_extra(monkeypatch):
    monkeypatch.setattr(data, "_PHOTOS", [])  # nothing loaded yet
    for name in ("skimage", "skimage.data"):  # `import skimage.data` raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(UserError, match=r'data.source=photos needs scikit-image .*pip install "ldm-vae\[photos\]"'):
        build_dataset(DataConfig(source="photos", resolution=32), "train", train=True)


def test_hub_dataset_ids_for_model_cards():
    """A card's `datasets:` holds Hub ids: Fashion-MNIST's (also read from local idx files), a
    hub source's name; the photos and local image folders have none."""
    assert data.hub_dataset_id("fashion-mnist") == data.FASHION_MNIST_HUB == "zalando-datasets/fashion_mnist"
    assert data.hub_dataset_id("hub", "someone/pics") == "someone/pics"
    assert data.hub_dataset_id("photos") is None and data.hub_dataset_id("imagefolder", None) is None


def test_make_grid_and_save_image(tmp_path):
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    grid = make_grid(images, nrow=3, padding=2)
    assert grid.shape == (3, 2 * 10 + 2, 3 * 10 + 2)
    assert torch.equal(grid[:, 2:10, 2:10], images[0]) and torch.equal(grid[:, 12:20, 22:30], images[5])
    assert (grid[:, 0, :] == 1).all() and (grid[:, :, 0] == 1).all()

    path = tmp_path / "sub" / "dir" / "grid.png"
    save_image(images, path, nrow=3)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 22)
    save_image(images[0], tmp_path / "one.png")
    with Image.open(tmp_path / "one.png") as im:
        assert im.size == (8, 8)
        back = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1
    assert (back - images[0]).abs().max() <= 1 / 127.5 + 1e-6


def test_hub_failure_names_dataset(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise OSError("Couldn't reach 'someone/some_dataset' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="someone/some_dataset") as e:
        build_dataset(DataConfig(source="hub", name="someone/some_dataset"), "train", train=False)
    assert "internet" in str(e.value)


def test_hub_wraps_loaded_dataset(monkeypatch):
    import datasets

    images = [Image.new("RGB", (24, 18), (255, 0, 0)), Image.new("L", (18, 30), 128)]
    fake = datasets.Dataset.from_dict({"img": images, "caption": ["a", "b"]},
                                      features=datasets.Features({"img": datasets.Image(),
                                                                  "caption": datasets.Value("string")}))
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or fake)
    cfg = DataConfig(source="hub", name="someone/pics", image_column="img", label_column="caption", resolution=8)
    ds = build_dataset(cfg, "validation", train=True)
    assert calls[0][1] == {"path": "someone/pics", "split": "validation", "streaming": False}
    assert ds.dataset_id == "someone/pics" and not ds.has_labels and "someone/pics" in ds.description
    item = ds[0]
    assert item["pixel_values"].shape == (3, 8, 8) and item["label"].item() == -1
    assert torch.allclose(item["pixel_values"][0], torch.ones(8, 8)) and (item["pixel_values"][1] == -1).all()
    with pytest.raises(UserError, match="columns: img, caption"):
        build_dataset(DataConfig(source="hub", name="someone/pics"), "train", train=False)
