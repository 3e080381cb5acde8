"""data.streaming (issue 22): train-vae reads a split as a stream (here a local image folder
through datasets' streaming=True, as a hub dataset would be read): the items are those of the
scanned dataset, unusable files are skipped and counted as they are read, the epoch order
depends only on (seed, epoch), and an interrupted run resumes to identical weights (CPU, no
network, tiny folders)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ldm_vae.autoencoder.config import Config
from ldm_vae.autoencoder.export import training_data
from ldm_vae.autoencoder.train import train
from ldm_vae.config import FieldError, load_config
from ldm_vae.data import sources
from ldm_vae.data.config import DataConfig
from ldm_vae.data.sources import StreamImages, build_dataset, first_items
from ldm_vae.errors import UserError

from .conftest import TINY_KL, TINY_VQ, TwoProcessJob


@pytest.fixture
def folder(image_folder, tmp_path, monkeypatch):
    """conftest's image folder (two classes of 11 small PNGs, one of them not an image), copied
    (a test may break more files); caches under tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("LDM_VAE_CACHE", str(tmp_path / "ldm-vae-cache"))
    return shutil.copytree(image_folder, tmp_path / "images")


def stream_cfg(folder, **kw) -> DataConfig:
    return DataConfig(**{"source": "imagefolder", "path": str(folder), "resolution": 16, "center_crop": False,
                         "max_bad_fraction": 0.5, "streaming": True, "shuffle_buffer": 8, **kw})


def test_an_unshuffled_stream_gives_the_scanned_items_and_counts_what_it_skips(folder):
    stream = build_dataset(stream_cfg(folder), "train", train=False, stream=True)
    assert isinstance(stream, StreamImages) and stream.class_names == ["cat", "dog"]
    scanned = build_dataset(stream_cfg(folder, streaming=False, shuffle_buffer=1000), "train", train=False)
    items = first_items(stream, 100)
    assert len(items) == len(scanned) == 21 and [p.split("/")[-1] for p, _ in scanned.bad] == ["03.png"]
    for i, item in enumerate(items):
        assert torch.equal(item["pixel_values"], scanned[i]["pixel_values"]) and item["label"] == scanned[i]["label"]
    assert [int(item["skipped"]) for item in items] == [0, 0, 0, 1] + [0] * 17  # the bad row, before item 3


def test_a_shuffled_stream_is_a_function_of_seed_and_epoch(folder):
    def order(seed, epoch):
        stream = build_dataset(stream_cfg(folder), "train", train=True, seed=seed, stream=True)
        stream.set_epoch(epoch)
        return torch.stack([item["pixel_values"] for item in first_items(stream, 100)])

    first = order(0, 0)
    assert len(first) == 21 and torch.equal(order(0, 0), first)  # crops and flips included
    assert not torch.equal(order(0, 1), first) and not torch.equal(order(1, 0), first)


def test_too_many_bad_rows_stop_the_stream_once_enough_are_read(folder, monkeypatch):
    monkeypatch.setattr(sources, "STREAM_MIN_ROWS", 10)  # up to 2 bad rows among the first 10 at 0.2
    for k in (5, 6, 7):
        (folder / "cat" / f"{k:02d}.png").write_bytes(b"")
    stream = build_dataset(stream_cfg(folder, max_bad_fraction=0.2), "train", train=False, stream=True)
    with pytest.raises(UserError, match=r"3 of the first 7 rows read cannot be used.*max_bad_fraction=0.2"):
        first_items(stream, 100)


def test_streaming_settings_are_checked(folder):
    with pytest.raises(UserError, match="data.streaming=true is read by train-vae only"):
        build_dataset(stream_cfg(folder), "test", train=False)  # encode, eval: by index
    with pytest.raises(FieldError, match="shuffle_buffer"):
        stream_cfg(folder, streaming=False)
    with pytest.raises(FieldError, match="decoded_cache_mb"):
        stream_cfg(folder, decoded_cache_mb=0)
    with pytest.raises(FieldError, match="streaming"):
        DataConfig(source="fashion-mnist", streaming=True)


def test_streamed_training_resumes_to_identical_weights_across_an_epoch_end(folder, tmp_path):
    """21 usable images in batches of 4: 5 batches per epoch. A checkpoint at step 6 lies in the
    second epoch; resuming from it replays the stream to there and ends where the whole run does."""
    cfg = load_config(TINY_KL, ["data.source=imagefolder", f"data.path={folder}", "data.streaming=true",
                                "data.shuffle_buffer=8", "data.max_bad_fraction=0.5",
                                "train.batch_size=4", "train.max_steps=10", "train.checkpoint_every=6",
                                "train.log_every=2",
                                "train.image_every=100", "loss.disc_start=4"], Config)
    out = tmp_path / "run"
    run = train(cfg, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10 and "streamed" in summary["data"]
    # the bad file is read once per epoch; its count rides on the next item, which drop_last may drop
    assert 1 <= summary["bad_images"]["count"] <= 2
    # the export measured its scale on the stream's first images; eval and encode read the split by index
    stats = json.loads((out / "export" / "ldm_vae.json").read_text())["latent_stats"]
    assert stats["num_images"] == 21 and stats["scaling_factor"] > 0
    assert training_data(out / "export").streaming is False
    state = torch.load(out / "checkpoint-6" / "trainer_extra.pt", weights_only=True)["stream_position"]
    assert (int(state["epoch"]), int(state["batches"])) == (1, 1)

    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(out / "checkpoint-6", part / "checkpoint-6")
    shutil.copy(out / "config.yaml", part / "config.yaml")
    resumed = train(cfg, part, resume="latest")
    assert resumed.summary["steps_this_session"] == 4
    for name in ("autoencoder", "discriminator"):
        a, b = getattr(run, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed.summary["final_logs"]["loss"] == run.summary["final_logs"]["loss"]


STREAM_TWO_PROCESSES = TwoProcessJob("stream", TINY_KL, (
    "data.source=imagefolder", "data.path={image_folder}", "data.streaming=true", "data.shuffle_buffer=8",
    "data.max_bad_fraction=0.5", "train.batch_size=2", "train.max_steps=8", "loss.disc_start=4",
    "train.checkpoint_every=8", "train.image_every=8"))


@pytest.mark.parametrize("two_process_run", [STREAM_TWO_PROCESSES], indirect=True, ids=["stream"])
def test_two_processes_train_on_one_stream_with_identical_state(two_process_run):
    """Under `accelerate launch` the main process reads the stream and each process gets its half
    of every batch (batches of 2 per process: 5 steps per epoch of 21 images)."""
    r0, r1 = two_process_run.ranks
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    summary = json.loads((two_process_run.out / "summary.json").read_text())
    assert 1 <= summary["bad_images"]["count"] <= 2 and "streamed" in summary["data"]


def test_a_vq_tokenizer_initialises_its_codebook_from_a_stream(folder, tmp_path):
    """k-means init reads the stream's first batches (a stream has no index)."""
    cfg = load_config(TINY_VQ, ["data.source=imagefolder", f"data.path={folder}", "data.streaming=true",
                                "data.shuffle_buffer=8", "train.batch_size=4", "train.max_steps=2",
                                "loss.disc_start=100"], Config)
    run = train(cfg, tmp_path / "vq")
    assert run.summary["steps"] == 2 and "streamed" in run.summary["data"]
    assert (tmp_path / "vq" / "export" / "ldm_vae.json").is_file()
