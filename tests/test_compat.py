"""Runs and exports written by ldm-vae before the package layout changed still resume and load.

The old code is taken from git history (the last commit of the flat layout, not weights or
files committed for the purpose); it trains a tiny run in a subprocess, and the current code
then resumes that run, exports it and reads its export.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from ldm_vae.autoencoder.config import Config
from ldm_vae.autoencoder.export import export_run, training_data
from ldm_vae.autoencoder.models import load_autoencoder
from ldm_vae.autoencoder.train import train
from ldm_vae.config import load_config

from .conftest import ROOT, TINY_KL

FLAT_LAYOUT = "72e26d386cfda5c44e63b86470f53d2408f84ad7"  # main before the stage subpackages


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, fake_fashion):
    """A 4-step tiny KL run (checkpoint-4 and export/) written by the flat-layout code."""
    has_commit = ["git", "-C", str(ROOT), "cat-file", "-e", f"{FLAT_LAYOUT}^{{commit}}"]
    if shutil.which("git") is None or subprocess.run(has_commit, capture_output=True).returncode != 0:
        pytest.skip(f"commit {FLAT_LAYOUT} is not in this checkout (a shallow clone or no git history)")
    root = tmp_path_factory.mktemp("flat")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", FLAT_LAYOUT, "ldm_vae", "configs", "model_cards"],
                             capture_output=True, check=True).stdout
    (root / "src").mkdir()
    subprocess.run(["tar", "-x", "-C", str(root / "src")], input=archive, check=True)
    env = {**os.environ, "PYTHONPATH": str(root / "src")}  # ahead of the editable install of the current code
    cmd = [sys.executable, "-m", "ldm_vae", "train-vae", root / "src" / "configs" / "tiny_kl.yaml",
           f"data.path={fake_fashion}", "train.max_steps=4", "train.checkpoint_every=4", "loss.disc_start=2",
           "--output-dir", root / "run"]
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = subprocess.run([sys.executable, "-c", "import ldm_vae.train_vae, sys; print(ldm_vae.__file__)"], env=env,
                           cwd=root, capture_output=True, text=True)
    assert probe.stdout.strip().startswith(str(root / "src")), probe  # it really was the old code
    return root / "run"


def _overrides(fake_fashion, steps):
    return [f"data.path={fake_fashion}", f"train.max_steps={steps}", "train.checkpoint_every=4", "loss.disc_start=2"]


def test_an_old_checkpoint_resumes_to_the_same_weights_as_a_new_run(old_run, fake_fashion, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(old_run, run)
    resumed = train(load_config(TINY_KL, _overrides(fake_fashion, 6), Config), run, resume="latest")
    assert resumed.summary["steps"] == 6 and resumed.summary["steps_this_session"] == 2  # from step 4, not 0
    fresh = train(load_config(TINY_KL, _overrides(fake_fashion, 6), Config), tmp_path / "fresh")
    for name in ("autoencoder", "discriminator"):
        a, b = getattr(resumed, name).state_dict(), getattr(fresh, name).state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_an_old_run_exports_and_its_export_loads(old_run, tmp_path):
    out = export_run(old_run, tmp_path / "export")
    old_export = old_run / "export"
    ours, theirs = load_autoencoder(out), load_autoencoder(old_export)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(ours.encode(x).latent_dist.mean).sample,
                                   theirs.decode(theirs.encode(x).latent_dist.mean).sample)
    assert ours.config.scaling_factor == pytest.approx(theirs.config.scaling_factor)
    data = training_data(old_export)  # its training_config.yaml still has model.in_channels
    assert data.source == "fashion-mnist" and data.resolution == 16 and data.max_images is None
