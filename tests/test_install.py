"""A wheel install works outside the checkout: configs and model-card templates are package
data, and no code reads files relative to the source tree.

The wheel is built from the checkout and installed (without dependencies) into a fresh
virtual environment that sees the test environment's packages through a plain path entry,
so the checkout's editable install is invisible there; the commands run from a folder
outside the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .conftest import ROOT


def _run(cmd: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (cmd, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    """bin/ of a venv holding only the ldm-vae wheel; every other package is the test env's."""
    root = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", ROOT],
         cwd=root)
    (wheel,) = (root / "dist").glob("ldm_vae-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root)
                .stdout.strip())
    # a plain path line: the test env's packages, but not its .pth files (the editable install)
    shared = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "test_env.pth").write_text("".join(f"{p}\n" for p in sorted(shared)))
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=root)
    return venv / "bin"


def test_the_wheel_ships_configs_and_card_templates(wheel_env, tmp_path):
    probe = ("import importlib.resources, ldm_vae; from ldm_vae.config import bundled_configs; "
             "print(ldm_vae.__file__); print(bundled_configs()); "
             "print(sorted(p.name for p in importlib.resources.files('ldm_vae').joinpath('model_cards').iterdir()))")
    where, configs, cards = _run([wheel_env / "python", "-c", probe], cwd=tmp_path).stdout.splitlines()
    assert Path(where).resolve().is_relative_to(wheel_env.parent.resolve())  # the wheel, not the checkout
    assert "kl_f4_fashion" in configs and "ldm_fashion" in configs
    assert "autoencoder_kl.md" in cards and "vq_model.md" in cards and "ldm_pipeline.md" in cards


def test_demo_and_export_run_from_a_wheel_outside_the_checkout(wheel_env, tmp_path, fake_fashion):
    """`ldm-vae demo --quick` trains, exports, evaluates, encodes, trains the LDM and exports its
    pipeline (each writes a model card from the packaged templates); `ldm-vae export` re-exports
    the autoencoder run; `train-vae` takes a bundled config by name."""
    cli = wheel_env / "ldm-vae"
    _run([cli, "demo", "--quick", "--out", "demo", "--data-path", fake_fashion], cwd=tmp_path)
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    # the exported autoencoder has the shift folded into its biases: equal up to float rounding
    assert report["stock_diffusers_max_abs_diff"] < 1e-5
    assert "ldm-vae" in (tmp_path / "demo" / "pipeline" / "README.md").read_text()
    # the demo's LDM trains with the Min-SNR-5 weighting that the README's measurement chose
    assert report["ldm"]["snr_gamma"] == 5 and "snr_gamma: 5.0" in (tmp_path / "demo" / "ldm" / "config.yaml").read_text()

    _run([cli, "export", "demo/vae", "again"], cwd=tmp_path)
    card = (tmp_path / "again" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "AutoencoderKL" in card

    _run([cli, "train-vae", "tiny_vq", f"data.path={fake_fashion}", "train.max_steps=2", "loss.disc_start=100",
          "quantizer.kmeans_batches=1", "--output-dir", "vq"], cwd=tmp_path)
    assert "VQModel" in (tmp_path / "vq" / "export" / "README.md").read_text()
