"""`encode`, `eval` and `sample` under `accelerate launch` with two CPU processes give what one
process gives: the same cache bytes (also after an interrupted encode is resumed), the same
metrics and Fréchet statistics, the same images (issue 22). The two-process runs come from
the session's shared launch (conftest.py, `two_process_run`); each is repeated here in this
process, as one process."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm_vae.cli import main
from ldm_vae.diffusion.sample import generate, generate_batches, load_pipeline

from .conftest import TwoProcessJob

# 64 test images in 4 shards of 16 (each in 2 batches of 8): rank 0 encodes shards 0 and 2,
# rank 1 shards 1 and 3; then shards 1 and 2 are lost and the rerun deals them out again
ENCODE_ARGS = ("encode", "{tiny_exports}/kl/export", "--split", "test", "--data-path", "{fake_fashion}",
               "--batch-size", "8", "--shard-size", "16")
ENCODE = TwoProcessJob("encode", None, (*ENCODE_ARGS, "--out", "{out}/cache"), trainer="cli",
                       delete=("cache/shard-00001.safetensors", "cache/shard-00002.safetensors", "cache/cache.json"))
# 40 images in 5 batches of 8: 3 on rank 0, 2 on rank 1; a KL and a VQ model, a Fréchet distance
EVAL_ARGS = ("eval", "{tiny_exports}/kl/export", "{tiny_exports}/vq/export", "--data-path", "{fake_fashion}",
             "--num-images", "40", "--batch-size", "8", "--fd-features", "{fd_features}", "--bootstrap", "5",
             "--bound-images", "8", "--iwae-k", "2")
EVAL = TwoProcessJob("eval", None, (*EVAL_ARGS, "--out", "{out}/eval"), trainer="cli")
# 7 images in batches of 2: batches 0 and 2 on rank 0, 1 and 3 (one image) on rank 1
SAMPLE_ARGS = ("sample", "{tiny_ldm_run}", "--num-images", "7", "--batch-size", "2", "--steps", "2", "--seed", "3")
SAMPLE = TwoProcessJob("sample", None, (*SAMPLE_ARGS, "--out", "{out}/samples"), trainer="cli")


def _args(args: tuple[str, ...], **paths) -> list[str]:
    return [a.format(**paths) for a in args]


@contextlib.contextmanager
def one_thread():
    """As the launched processes run (OMP_NUM_THREADS=1): on a CPU the float results of a
    convolution depend on the number of threads that reduce it (oneDNN), not on the processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("two_process_run", [ENCODE], indirect=True, ids=["encode"])
def test_two_processes_encode_and_resume_the_cache_one_process_writes(two_process_run, tiny_exports, fake_fashion,
                                                                      tmp_path):
    ours = two_process_run.out / "cache"
    with one_thread():
        assert main([*_args(ENCODE_ARGS, tiny_exports=tiny_exports, fake_fashion=fake_fashion),
                     "--out", str(tmp_path / "cache")]) == 0
    meta, single = (json.loads((d / "cache.json").read_text()) for d in (ours, tmp_path / "cache"))
    assert meta == single and len(meta["shards"]) == 4
    for name in meta["shards"]:  # byte for byte
        assert (ours / name).read_bytes() == (tmp_path / "cache" / name).read_bytes(), name
    assert sorted(load_file(ours / meta["shards"][0])) == ["labels", "mean", "mean_flipped", "std", "std_flipped"]
    # the resumed run wrote only the lost shards: the others are the files of the first run
    kept = json.loads((two_process_run.out / "kept.json").read_text())
    assert sorted(kept) == ["cache/shard-00000.safetensors", "cache/shard-00003.safetensors"]
    for name, (inode, mtime) in kept.items():
        st = (two_process_run.out / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == (inode, mtime), name
    assert not (ours / "cache.partial.json").exists()


@pytest.mark.parametrize("two_process_run", [EVAL], indirect=True, ids=["eval"])
def test_two_processes_evaluate_to_the_metrics_of_one(two_process_run, tiny_exports, fake_fashion, fd_features,
                                                      tmp_path, monkeypatch):
    # a reference cache of its own: the real images' features are computed here too, not read back
    monkeypatch.setenv("LDM_VAE_CACHE", str(tmp_path / "reference-cache"))
    with one_thread():
        assert main([*_args(EVAL_ARGS, tiny_exports=tiny_exports, fake_fashion=fake_fashion, fd_features=fd_features),
                     "--out", str(tmp_path / "eval")]) == 0
    two, one = (json.loads((d / "metrics.json").read_text()) for d in (two_process_run.out / "eval", tmp_path / "eval"))
    assert len(two["results"]) == len(one["results"]) == 2
    for a, b in zip(two["results"], one["results"], strict=True):
        ma, mb = a["metrics"], b["metrics"]
        for m in (ma, mb):  # what differs between runs anyway: timings, and where the reference file is
            for key in ("encode_images_per_s", "decode_images_per_s"):
                assert m.pop(key) > 0
            assert m["frechet_reference"]["fd_shapes"].pop("file")
        assert ma["num_images"] == 40 and "fd_shapes" in ma and ma["ci95"]["fd_shapes"] is not None
        assert ma == mb, a["label"]  # every number, exactly: sums folded in the same order
    assert "codebook_usage" in two["results"][1]["metrics"] and "elbo_bits_per_dim" in two["results"][0]["metrics"]
    for name in ("comparison_grid.png", "kl/reconstructions.png", "vq/codebook_usage.png"):
        assert (two_process_run.out / "eval" / name).is_file(), name


@pytest.mark.parametrize("two_process_run", [SAMPLE], indirect=True, ids=["sample"])
def test_two_processes_sample_the_images_of_one(two_process_run, tiny_ldm_run, tmp_path):
    with one_thread():
        assert main([*_args(SAMPLE_ARGS, tiny_ldm_run=tiny_ldm_run), "--out", str(tmp_path / "samples")]) == 0
    names = [f"sample_{i:05d}.png" for i in range(7)] + ["grid.png"]
    assert sorted(p.name for p in (two_process_run.out / "samples").iterdir()) == sorted(names)
    for name in names:
        two, one = (np.asarray(Image.open(d / name)) for d in (two_process_run.out / "samples", tmp_path / "samples"))
        assert np.array_equal(two, one), name


def test_an_image_depends_on_its_seed_and_batch_not_on_which_process_draws_it(tiny_ldm_run):
    pipe = load_pipeline(tiny_ldm_run)
    labels = [0, 1, 2, 3, 4]
    whole = generate(pipe, 5, labels, 2, 3.0, 11, 2, progress=False)
    shares = [dict(generate_batches(pipe, 5, labels, 2, 3.0, 11, 2, (rank, 2), progress=False)) for rank in (0, 1)]
    assert sorted(shares[0]) == [0, 4] and sorted(shares[1]) == [2]
    assert torch.equal(torch.cat([{**shares[0], **shares[1]}[start] for start in (0, 2, 4)]), whole)
    assert not torch.equal(generate(pipe, 5, labels, 2, 3.0, 12, 2, progress=False), whole)  # the seed matters


def test_a_command_that_runs_in_one_process_refuses_accelerate_launch(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as `accelerate launch --num_processes 2` sets it
    assert main(["export-pipeline", str(tmp_path / "run"), str(tmp_path / "pipe")]) == 2
    err = capsys.readouterr().err
    assert "`ldm-vae export-pipeline` runs in one process" in err and "encode, eval, sample" in err
    assert not (tmp_path / "pipe").exists()
