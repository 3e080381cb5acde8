"""`ldm-vae eval`: metric functions on known values, Fréchet distances, unavailable weights,
likelihood bounds, the CLI's files and the model card update."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from ldm_vae.autoencoder.train import train
from ldm_vae.evaluation.diagnostics import KLDiagnostics
from ldm_vae.evaluation.frechet import _Features, frechet_metric, load_fd_features
from ldm_vae.evaluation.metrics import bits_per_dim, likelihood_bounds, psnr, ssim
from ldm_vae.evaluation.report import EvalOptions, run_eval

from .test_train import _offline_hub


def test_psnr_and_ssim_known_values():
    x = torch.rand(4, 3, 16, 16)
    assert torch.allclose(psnr(x, x), torch.full((4,), 100.0, dtype=torch.float64))  # capped, documented
    assert torch.allclose(ssim(x, x), torch.ones(4))
    # a constant error of 0.1 on [0, 1] pixels: MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    y = x.clamp(0, 0.8) + 0.1
    torch.testing.assert_close(psnr(x.clamp(0, 0.8), y), torch.full((4,), 20.0, dtype=torch.float64))
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert (ssim(x, noisy) < 0.9).all()


def test_frechet_distance_is_zero_on_itself_and_positive_when_shifted():
    torch.manual_seed(0)
    stand_in = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    real = torch.rand(200, 3, 16, 16)
    values = []
    for other in (real, (real + 0.3).clamp(0, 1)):
        metric = frechet_metric(_Features(stand_in, 16, 8))
        metric.update(real, real=True)
        metric.update(other, real=False)
        values.append(metric.compute().item())
    assert abs(values[0]) < 1e-4 and values[1] > 1e-3, values


def test_bits_per_dim_of_a_uniform_density_is_8():
    dims = 3 * 8 * 8
    assert bits_per_dim(torch.tensor([-dims * math.log(2.0)]), dims).item() == pytest.approx(8.0)


def test_active_units_count_channels_whose_mean_varies():
    kl = KLDiagnostics(vae=None)
    for _ in range(4):
        mean = torch.zeros(16, 2, 2, 2)
        mean[:, 0] = torch.randn(16, 1, 1)  # channel 0 carries information, channel 1 is collapsed
        kl.posterior = SimpleNamespace(mean=mean, logvar=torch.zeros_like(mean))
        kl.observe(mean)
    s = kl.summary(64)
    assert s["active_units"] == 4 and s["latent_units"] == 8
    assert s["active_units_per_channel"] == [1.0, 0.0]
    assert s["kl_per_channel_nats"][1] == 0.0 and s["kl_per_channel_nats"][0] > 0


@pytest.fixture(scope="module")
def exports(tmp_path_factory, fake_fashion):
    from ldm_vae.autoencoder.config import Config
    from ldm_vae.config import load_config

    from .conftest import TINY_KL, TINY_VQ

    root = tmp_path_factory.mktemp("eval")
    for name, path in (("kl", TINY_KL), ("vq", TINY_VQ)):
        train(load_config(path, [f"data.path={fake_fashion}", "train.max_steps=10", "loss.disc_start=100"], Config),
              root / name)
    return root


def test_iwae_bound_is_tighter_than_the_elbo(exports):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(exports / "kl" / "export")
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    elbo, iwae = likelihood_bounds(vae, x, k=32, sigma=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(elbo).all() and (iwae >= elbo - 1e-3 * elbo.abs()).all()


def test_unavailable_weights_are_reported_not_zero(exports, tmp_path, monkeypatch):
    _offline_hub(monkeypatch, tmp_path)
    report = run_eval([str(exports / "vq" / "export")], tmp_path / "r", EvalOptions(num_images=32))
    m = report["results"][0]["metrics"]
    for key in ("lpips_vgg", "lpips_alex", "rfid"):
        assert key not in m and key in m["unavailable"], key  # no value at all, and a reason
        assert len(m["unavailable"][key]) > 20
    assert "n/a" in report["table"] and m["psnr_db"] > 0 and m["codebook_usage"] > 0
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["results"][0]["metrics"]["unavailable"].keys() == m["unavailable"].keys()


def test_cli_eval_writes_all_files_and_updates_the_cards(exports, tmp_path, fake_fashion):
    features = tmp_path / "features.pt"
    def run(*args):
        return subprocess.run([sys.executable, "-m", "ldm_vae", *args], capture_output=True, text=True)

    proc = run("train-fd-features", "--data", "fashion-mnist", "--data-path", str(fake_fashion), "--resolution", "16",
               "--steps", "20", "--batch-size", "32", "--name", "shapes", "--out", str(features))
    assert proc.returncode == 0, proc.stderr[-2000:]
    name, _ = load_fd_features(features)
    assert name == "fd_shapes"

    out = tmp_path / "report"
    kl, vq = exports / "kl" / "export", exports / "vq" / "export"
    proc = run("eval", str(kl), str(vq), "--out", str(out), "--num-images", "48", "--batch-size", "16",
               "--fd-features", str(features), "--bound-images", "8", "--iwae-k", "4", "--update-card")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fd_shapes" in proc.stdout and "FID" not in proc.stdout.replace("rFID", "")
    for f in ("metrics.json", "comparison.md", "comparison_grid.png", "kl/reconstructions.png",
              "kl/error_heatmap.png", "kl/interpolation.png", "kl/prior_samples.png",
              "vq/reconstructions.png", "vq/error_heatmap.png", "vq/codebook_usage.png"):
        assert (out / f).is_file(), f
    report = json.loads((out / "metrics.json").read_text())
    assert report["split"] == "test" and report["num_images"] == 48 and "diffusers" in report["versions"]
    kl_m, vq_m = (r["metrics"] for r in report["results"])
    assert kl_m["fd_shapes"] >= 0 and vq_m["fd_shapes"] >= 0
    assert {"kl_per_channel_nats", "active_units", "elbo_bits_per_dim", "iwae4_bits_per_dim",
            "posterior_std_mean_per_channel", "latent_channel_std", "encode_images_per_s", "device"} <= set(kl_m)
    assert 0 < vq_m["codebook_usage"] <= 1 and len(vq_m["latent_channel_mean"]) == 4
    card = (vq / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["psnr"] == pytest.approx(vq_m["psnr_db"], abs=1e-5) and "fd_shapes" in metrics
    assert card.count("## Evaluation") == 1
    # a second run replaces the section instead of adding one, and refuses to overwrite the report
    again = run("eval", str(vq), "--out", str(out), "--num-images", "16")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert run("eval", str(vq), "--out", str(out), "--num-images", "16", "--overwrite", "--update-card").returncode == 0
    assert (vq / "README.md").read_text().count("## Evaluation") == 1
