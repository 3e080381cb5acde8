"""The image scan's on-disk cache (issue 22): a second build of an unchanged folder decodes
nothing up front and gives the same items; any change to the folder, a corrupt cache file or
tighter settings are noticed (CPU, no network, tiny folders)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_vae.data import sources
from ldm_vae.data.config import DataConfig
from ldm_vae.data.sources import build_dataset
from ldm_vae.errors import UserError


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """Two classes of small PNGs of different sizes and one truncated file; the datasets and
    scan caches under tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # keep ~/.cache clean
    monkeypatch.setenv("LDM_VAE_CACHE", str(tmp_path / "ldm-vae-cache"))
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls, sizes in {"cat": [(12, 10), (9, 16), (10, 10)], "dog": [(20, 9), (11, 13)]}.items():
        (root / cls).mkdir(parents=True)
        for k, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{k}.png")
    data = (root / "cat" / "0.png").read_bytes()
    (root / "dog" / "broken.png").write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture
def decodes(monkeypatch):
    """Counts calls of decode_image (each is one file read and decoded)."""
    calls = []
    real = sources.decode_image
    monkeypatch.setattr(sources, "decode_image", lambda value: calls.append(value) or real(value))
    return calls


def fresh_build(monkeypatch, cfg: DataConfig, train: bool = True, split: str = "train"):
    """build_dataset as a new process sees it: no in-process memo of earlier scans."""
    monkeypatch.setattr(sources, "_SCANS", {})
    return build_dataset(cfg, split, train=train, seed=5)


def items(ds) -> list[dict]:
    ds.set_epoch(2)
    return [ds[i] for i in range(len(ds))]


def same_items(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x["pixel_values"], y["pixel_values"]) and x["label"] == y["label"]
                                    for x, y in zip(a, b))


def cfg_of(folder, **kw) -> DataConfig:
    return DataConfig(**{"source": "imagefolder", "path": str(folder), "resolution": 8, "center_crop": False,
                         "max_bad_fraction": 0.5, **kw})


def test_second_build_reads_the_cache_and_decodes_nothing_up_front(folder, decodes, monkeypatch):
    cfg = cfg_of(folder)
    first = fresh_build(monkeypatch, cfg)
    assert len(decodes) == 6 and len(first) == 5 and len(first.decoded) == 5
    assert [p.split("/")[-1] for p, _ in first.bad] == ["broken.png"]
    assert first.scan_file.is_file() and first.scan_file.parent == sources.scan_cache_dir()
    assert folder not in first.scan_file.parents and sources.scan_cache_dir().parent == folder.parent / "ldm-vae-cache"
    assert not any(folder.rglob("*.json"))  # nothing written into the image folder (it may be read-only)
    expected = items(first)

    decodes.clear()
    second = fresh_build(monkeypatch, cfg)
    assert decodes == [] and second.scan_file == first.scan_file
    assert (second.good, second.labels, second.bad) == (first.good, first.labels, first.bad)
    assert second.description == first.description
    assert len(second.decoded) == 5 and all(x is None for x in second.decoded)  # slots, filled on first read
    assert same_items(items(second), expected)  # random crops and flips included
    assert len(decodes) == 5 and all(x is not None for x in second.decoded)
    assert same_items(items(second), expected) and len(decodes) == 5  # the slots are used

    # the same prefix of decoded images as a scanning run, whatever the budget
    for k, budget in enumerate((0, 3 * 8 * 12 / 2**20)):  # 0 MB; room for the first 10x8 image only
        monkeypatch.setenv("LDM_VAE_CACHE", str(folder.parent / f"budget-{k}"))
        scanned = fresh_build(monkeypatch, cfg_of(folder, decoded_cache_mb=budget), train=False)
        cached = fresh_build(monkeypatch, cfg_of(folder, decoded_cache_mb=budget), train=False)
        assert len(cached.decoded) == len(scanned.decoded) == k
        assert same_items(items(cached), items(scanned))


def test_a_parallel_scan_finds_what_one_process_finds(folder, monkeypatch):
    """data.num_workers scans in DataLoader workers: the same rows, labels, sizes, bad files and
    decoded prefix, in the same order, as the scan in the main process; the same cache file."""
    monkeypatch.setattr(sources, "SCAN_BATCH", 2)  # 6 rows: 3 tasks for 2 workers
    for k, budget in enumerate((2048, 3 * 8 * 12 / 2**20)):  # all decoded; the first image only
        runs = []
        for workers in (0, 2):
            monkeypatch.setenv("LDM_VAE_CACHE", str(folder.parent / f"cache-{workers}-{k}"))
            ds = fresh_build(monkeypatch, cfg_of(folder, num_workers=workers, decoded_cache_mb=budget), train=False)
            runs.append((ds, json.loads(ds.scan_file.read_text())))
        (one, one_file), (two, two_file) = runs
        assert two_file == one_file and [p.split("/")[-1] for p, _ in two.bad] == ["broken.png"]
        assert (two.good, two.labels, two.description) == (one.good, one.labels, one.description)
        assert len(two.decoded) == len(one.decoded) == (5 if k == 0 else 1)
        assert all(torch.equal(a, b) for a, b in zip(one.decoded, two.decoded))
        assert same_items(items(two), items(one))


def test_a_prefix_slot_behind_bad_rows_is_filled_on_first_read(tmp_path, monkeypatch):
    """The scan resizes row i only if i could be in the decoded prefix with no bad row before it
    (i * the smallest resized image fits data.decoded_cache_mb); bad rows push usable ones past
    that bound, and their slots are None until first read, with the same items."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("LDM_VAE_CACHE", str(tmp_path / "ldm-vae-cache"))
    root = tmp_path / "images" / "a"
    root.mkdir(parents=True)
    (root / "0.png").write_bytes(b"not an image")
    (root / "1.png").write_bytes(b"")
    rng = np.random.default_rng(0)
    for k in range(2, 5):  # 8x8: each exactly the smallest resized image at resolution 8
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{k}.png")
    cfg = cfg_of(root.parent, decoded_cache_mb=3 * 3 * 8 * 8 / 2**20, max_bad_fraction=0.5)  # room for 3
    ds = fresh_build(monkeypatch, cfg, train=False)
    assert ds.good == [2, 3, 4] and len(ds.decoded) == 3
    assert ds.decoded[0] is not None and ds.decoded[1] is not None and ds.decoded[2] is None  # row 4 >= 4
    monkeypatch.setenv("LDM_VAE_CACHE", str(tmp_path / "no-prefix"))
    plain = fresh_build(monkeypatch, cfg_of(root.parent, decoded_cache_mb=0, max_bad_fraction=0.5), train=False)
    assert same_items(items(ds), items(plain)) and ds.decoded[2] is not None


@pytest.mark.parametrize("change", ["add", "remove", "rewrite"])
def test_a_changed_folder_is_scanned_again(folder, decodes, monkeypatch, change):
    cfg = cfg_of(folder)
    first = fresh_build(monkeypatch, cfg)
    target = folder / "cat" / "1.png"
    if change == "add":
        Image.new("RGB", (10, 10), (1, 2, 3)).save(folder / "dog" / "new.png")
    elif change == "remove":
        target.unlink()
    else:  # the same size and path, other bytes, a newer mtime: now a broken file
        size, mtime = target.stat().st_size, target.stat().st_mtime_ns
        target.write_bytes(b"\0" * size)
        os.utime(target, ns=(mtime + 10**9, mtime + 10**9))
    decodes.clear()
    second = fresh_build(monkeypatch, cfg)
    assert second.scan_file != first.scan_file and second.scan_file.is_file()
    assert len(decodes) == {"add": 7, "remove": 5, "rewrite": 6}[change]  # a full rescan
    assert len(second) == {"add": 6, "remove": 4, "rewrite": 4}[change]
    assert len(second.bad) == (2 if change == "rewrite" else 1)
    decodes.clear()
    assert fresh_build(monkeypatch, cfg).good == second.good and decodes == []  # the new result is cached


def test_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(folder, decodes, monkeypatch, caplog):
    cfg = cfg_of(folder)
    first = fresh_build(monkeypatch, cfg)
    expected = items(first)
    for junk in ('{"key": {"version"', json.dumps({"good": [0]}), "[]"):
        first.scan_file.write_text(junk)
        decodes.clear()
        with caplog.at_level(logging.WARNING, logger="ldm_vae.data.sources"):
            again = fresh_build(monkeypatch, cfg)
        assert len(decodes) == 6 and "ignoring unreadable image scan cache" in caplog.text
        assert same_items(items(again), expected)
        assert json.loads(first.scan_file.read_text())["good"] == first.good  # rewritten whole
        caplog.clear()


def test_settings_that_change_the_scan_have_their_own_cache(folder, decodes, monkeypatch):
    """A lower decompression-bomb limit finds other bad files; a resolution does not rescan;
    max_bad_fraction is checked against a cached scan too."""
    first = fresh_build(monkeypatch, cfg_of(folder))
    decodes.clear()
    assert fresh_build(monkeypatch, cfg_of(folder, resolution=4)).scan_file == first.scan_file and decodes == []
    limit = Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # the 20x9 image now counts as a bomb
    small = fresh_build(monkeypatch, cfg_of(folder))
    assert small.scan_file != first.scan_file and len(decodes) == 6 and len(small) == 4
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    decodes.clear()
    with pytest.raises(UserError, match="1 of 6 files cannot be used"):
        fresh_build(monkeypatch, cfg_of(folder, max_bad_fraction=0.1))
    assert decodes == []


def test_hub_dataset_from_the_datasets_cache_is_cached(folder, decodes, monkeypatch):
    """A hub split read from the datasets cache has a stable fingerprint that keys the scan; one
    held in memory (random fingerprint) is scanned every time and cached nowhere."""
    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder))["train"]
    monkeypatch.setattr(datasets, "load_dataset", lambda **kwargs: loaded)
    cfg = DataConfig(source="hub", name="someone/pics", resolution=8, max_bad_fraction=0.5)
    first = fresh_build(monkeypatch, cfg)
    decodes.clear()
    second = fresh_build(monkeypatch, cfg)
    assert decodes == [] and second.scan_file == first.scan_file and second.good == first.good
    assert same_items(items(second), items(first))

    in_memory = datasets.Dataset.from_dict({"image": [Image.new("RGB", (9, 9))]}, features=datasets.Features(
        {"image": datasets.Image()}))
    monkeypatch.setattr(datasets, "load_dataset", lambda **kwargs: in_memory)
    decodes.clear()
    assert fresh_build(monkeypatch, cfg).scan_file is None and len(decodes) == 1


def test_cached_data_files_give_the_dataset_of_a_plain_load_dataset(tmp_path, monkeypatch, caplog):
    """An unchanged folder skips datasets' split and file resolution (its data files are read
    from the scan cache) and gets exactly what load_dataset("imagefolder", data_dir=...) gives:
    splits, rows in order, labels, class names, bad files, items; and the same arrow cache."""
    import datasets

    hf_cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)
    monkeypatch.setenv("LDM_VAE_CACHE", str(tmp_path / "ldm-vae-cache"))
    root, rng = tmp_path / "images", np.random.default_rng(1)
    for split, classes in {"train": ("dog", "cat", "emu"), "test": ("cat", "dog", "emu")}.items():
        for k, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for j in range(2 + k):
                Image.fromarray(rng.integers(0, 256, (9 + j, 11, 3), dtype=np.uint8)).save(root / split / cls / f"{j}.png")
    data = (root / "train" / "cat" / "0.png").read_bytes()
    (root / "train" / "emu" / "1.png").write_bytes(data[: len(data) // 2])
    plain = datasets.load_dataset("imagefolder", data_dir=str(root))
    assert list(plain) == ["train", "test"]

    def described(ds, split):
        """What a run gets from a split, and the rows of datasets' own table it reads."""
        paths = [v["path"] for v in ds.ds["image"]]
        return (ds.good, ds.labels, ds.class_names, ds.bad, ds.description, paths, ds.ds["label"],
                [torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(items(ds), expected[split])])

    expected, want = {}, {}
    for split in plain:  # the dataset built from the plain call, with its own scan cache
        monkeypatch.setenv("LDM_VAE_CACHE", str(tmp_path / "reference-cache"))
        monkeypatch.setattr(sources, "_SCANS", {})
        cfg = cfg_of(root)
        ref = sources.HFImages(plain[split], cfg, split, True, f"imagefolder {root}", "imagefolder",
                               sources.folder_key(root))
        ref.seed = 5
        expected[split] = items(ref)
        want[split] = described(ref, split)
        assert want[split][2] == ["cat", "dog", "emu"] and all(want[split][-1])
    assert len(want["train"][3]) == 1 and want["test"][3] == []
    monkeypatch.setenv("LDM_VAE_CACHE", str(tmp_path / "ldm-vae-cache"))

    resolve = datasets.data_files.get_data_patterns
    for run in ("resolves", "cached", "cached"):
        if run == "cached":  # no pattern resolution on an unchanged folder
            monkeypatch.setattr(datasets.data_files, "get_data_patterns", lambda *a, **k: pytest.fail("resolved"))
        for split in plain:
            assert described(fresh_build(monkeypatch, cfg_of(root), split=split), split) == want[split]
        with pytest.raises(UserError, match="no split 'validation' .available: train, test"):
            fresh_build(monkeypatch, cfg_of(root), split="validation")
    assert len(list((hf_cache / "imagefolder").iterdir())) == 2  # the plain call's and ours, built once

    listing = [f for f in sources.scan_cache_dir().glob("*.json") if '"of": "data_files"' in f.read_text()]
    assert len(listing) == 1
    listing[0].write_text('{"key": ')
    monkeypatch.setattr(datasets.data_files, "get_data_patterns", resolve)
    with caplog.at_level(logging.WARNING, logger="ldm_vae.data.sources"):
        assert described(fresh_build(monkeypatch, cfg_of(root)), "train") == want["train"]
    assert "listing the folder again" in caplog.text and '"splits"' in listing[0].read_text()  # rewritten
