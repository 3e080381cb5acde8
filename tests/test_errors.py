"""User mistakes end with one line that names the problem and the fix, exit code 2, no traceback,
and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import TINY_KL, TINY_LDM, TINY_VQ


def _cases(tmp, fashion, cache):
    run = ["train-vae", str(TINY_KL), f"data.path={fashion}", "--output-dir"]
    ldm = ["train-ldm", str(TINY_LDM), "--output-dir", str(tmp / "r")]
    empty = tmp / "empty"  # created by the test
    return {
        "missing config file": (["train-vae", str(tmp / "nope.yaml"), "--output-dir", str(tmp / "r")],
                                "does not exist"),
        "unknown config key": ([*run, str(tmp / "r"), "train.max_stepz=3"], "unknown key 'train.max_stepz'"),
        "wrong type": ([*run, str(tmp / "r"), "train.batch_size=eight"], "'train.batch_size' must be int"),
        "out-of-range value": ([*run, str(tmp / "r"), "train.lr=-1"], "'train.lr' must be > 0"),
        "missing data path": (["train-vae", str(TINY_KL), "data.source=imagefolder", f"data.path={tmp / 'nodata'}",
                               "--output-dir", str(tmp / "r")], "image folder does not exist"),
        "missing Fashion-MNIST folder": (["train-vae", str(TINY_KL), f"data.path={tmp / 'nofashion'}",
                                          "--output-dir", str(tmp / "r")], "folder does not exist"),
        "wrong split": ([*run, str(tmp / "r"), "data.train_split=validation"], "validation"),
        "size not divisible": ([*run, str(tmp / "r"), "data.resolution=17"], "must be divisible by the downsampling"),
        "missing LPIPS weights": ([*run, str(tmp / "r"), "loss.lpips_random_backbone=false",
                                   f"loss.lpips_weights={tmp / 'vgg16.pth'}"], "does not exist"),
        "resume without a checkpoint": ([*run, str(empty), "--resume", "latest"], "no complete checkpoint"),
        "resume and overwrite": ([*run, str(tmp / "r"), "--resume", "latest", "--overwrite"], "pass one of them"),
        "vq without codebook size": (["train-vae", str(TINY_VQ), f"data.path={fashion}",
                                      "model.num_vq_embeddings=null", "--output-dir", str(tmp / "r")],
                                     "'model.num_vq_embeddings' is needed by model.kind 'vq'"),
        "option of the other model kind": ([*run, str(tmp / "r"), "quantizer.beta=0.5"], "does not apply"),
        "option the data source does not read": ([*run, str(tmp / "r"), "data.photos_per_epoch=10"],
                                                 "'data.photos_per_epoch' does not apply to data.source"),
        "batch larger than the data": ([*run, str(tmp / "r"), "data.max_images=4", "train.batch_size=8"],
                                       "fewer than one batch"),
        "export of a non-run": (["export", str(empty), str(tmp / "e")], "no complete checkpoint"),
        "eval of a non-model": (["eval", str(empty), "--out", str(tmp / "ev")], "not a diffusers model folder"),
        "train-ldm without a cache": (ldm, "no latent cache given"),
        "train-ldm on a non-cache": ([*ldm, "--latents", str(empty)], "is not a latent cache"),
        "cache of a changed autoencoder": ([*ldm, "--latents", str(tmp / "stale-cache")],
                                           "changed since the latent cache was made"),
        "unknown noise schedule": ([*ldm, "--latents", str(cache), "diffusion.beta_schedule=quadratic"],
                                   "'diffusion.beta_schedule' must be one of"),
        "sample of a non-run": (["sample", str(empty), "--out", str(tmp / "e")], "no complete checkpoint"),
        "run folder locked on another host": ([*run, str(tmp / "locked"), "--resume", "latest"],
                                              "is locked by a run on host elsewhere"),
        "a stop signal that cannot be caught": ([*run, str(tmp / "r"), "train.stop_signals=[SIGKILL]"],
                                                "not a signal a process can catch"),
    }


CASE_NAMES = list(_cases(Path("/unused"), "/unused", "/unused"))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_user_mistakes_give_one_clear_line(case, tmp_path, fake_fashion, tiny_cache, capsys):
    """In this process (a subprocess per case cost 10 s of imports each; test_config checks the
    exit code and stderr of a real `python -m ldm_vae` process): any exception other than the
    UserError that main() turns into the one line fails the test, as a traceback would."""
    from ldm_vae.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "locked").mkdir()  # a run on another machine holds it (run/lock.py)
    (tmp_path / "locked" / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "earlier"}))
    # a cache whose autoencoder was re-exported since (its fingerprint no longer matches)
    shutil.copytree(tiny_cache, tmp_path / "stale-cache")
    meta = json.loads((tmp_path / "stale-cache" / "cache.json").read_text())
    (tmp_path / "stale-cache" / "cache.json").write_text(json.dumps({**meta, "fingerprint": "0" * 64}))
    args, expected = _cases(tmp_path, fake_fashion, tiny_cache)[case]
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    stderr = capsys.readouterr().err
    assert code == 2, (case, stderr[-2000:])
    error_lines = [line for line in stderr.splitlines() if line.startswith("ldm-vae: error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], (case, stderr[-2000:])
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists() and not (tmp_path / "ev").exists()
