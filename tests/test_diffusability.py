"""Diffusability: the measures' invariants (spectra, equivariance), the regularisers'
invariants, and `ldm-vae diffusability` end to end on tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL

from ldm_vae.autoencoder.config import Config, DiffusabilityConfig
from ldm_vae.autoencoder.losses import AutoencoderLoss, LossConfig, equivariance_loss
from ldm_vae.autoencoder.models import KLAutoencoder, build_autoencoder, channel_mask, noised_latent
from ldm_vae.autoencoder.train import train
from ldm_vae.config import load_config
from ldm_vae.errors import UserError
from ldm_vae.diffusability import DiffusabilityOptions, ProxyRecipe, run_diffusability
from ldm_vae.evaluation.latent_space import _radius, high_frequency_share, latent_measures, radial_power

from .conftest import TINY_KL, TINY_VQ

# ==============================================================================================
# Spectra
# ==============================================================================================


def test_white_noise_has_a_flat_spectrum_and_the_area_share_of_high_frequencies():
    x = torch.randn(256, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    power, radius = radial_power(x)
    assert power.shape == (2, len(radius)) and radius[1] == pytest.approx(1 / 16)
    # ortho FFT: white noise of variance 1 has power 1 at every frequency but DC (mean removed)
    assert power[:, 0].abs().max() < 1e-20
    torch.testing.assert_close(power[:, 1:], torch.ones_like(power[:, 1:]), atol=0.12, rtol=0)
    area = ((_radius(16, 16, "cpu") > 0.25).sum() / (16 * 16 - 1)).item()
    torch.testing.assert_close(high_frequency_share(x), torch.full((2,), area, dtype=torch.float64), atol=0.01, rtol=0)


def test_high_frequency_share_of_a_smooth_wave_is_zero_and_of_a_checkerboard_one():
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    smooth = (torch.cos(2 * torch.pi * xx / 16) + 5)[None, None]  # one cycle per image, plus an offset
    checker = ((-1.0) ** (xx + yy))[None, None]  # the Nyquist frequency
    assert high_frequency_share(smooth).item() < 1e-12
    assert high_frequency_share(checker).item() == pytest.approx(1.0)
    power, radius = radial_power(smooth)
    assert radius[power[0].argmax()].item() == pytest.approx(1 / 16)  # all power in the first ring


# ==============================================================================================
# Equivariance: an exactly equivariant autoencoder scores perfectly, a real one does not
# ==============================================================================================


class _Identity(torch.nn.Module):
    """An 'autoencoder' whose latent is the image itself (f1, 3 channels): exactly equivariant
    to pooling, rotations and flips."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0, shift_factor=0.0, block_out_channels=[8])
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # so .to() and .eval() work

    def encode(self, x):
        dist = SimpleNamespace(mean=x, logvar=torch.full_like(x, -30.0), sample=lambda generator=None: x)
        return SimpleNamespace(latent_dist=dist)

    def decode(self, z):
        return SimpleNamespace(sample=z + self.anchor)


def _images(n=8, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_an_exactly_equivariant_autoencoder_has_zero_equivariance_loss_and_error():
    x = _images()
    reg = DiffusabilityConfig(scale_equivariance=1.0, equivariance_rotations=True)
    ae = KLAutoencoder(_Identity(), reg).train()
    for _ in range(4):  # several random rotations and flips
        _, latent = ae(x, sample_posterior=False)
        assert latent.equivariance is not None
        assert equivariance_loss(*latent.equivariance).item() == 0.0
    dataset = [{"pixel_values": xi} for xi in x]
    m = latent_measures(_Identity(), dataset, len(x), 4, torch.device("cpu"))
    assert m["equivariance_decoder_psnr_db"] == pytest.approx(100.0)  # the PSNR cap of an exact match
    assert m["equivariance_encoder_rel_error"] == 0.0


def test_equivariance_term_is_positive_for_a_real_decoder_and_trains_encoder_and_decoder(tiny_cfg):
    cfg = tiny_cfg("diffusability.scale_equivariance=1.0")
    vae = build_autoencoder(cfg.model, cfg.data.resolution)
    ae = KLAutoencoder(vae, cfg.diffusability).train()
    x = _images(4, 16)
    recon, latent = ae(x)
    assert latent.equivariance.decoded.shape == latent.equivariance.target.shape == (4, 3, 8, 8)
    pixels = x[0].numel()
    with_eq, logs = AutoencoderLoss(LossConfig(), None, equivariance_weight=2.0).latent_term(latent, 0, pixels)
    without, _ = AutoencoderLoss(LossConfig(), None).latent_term(latent._replace(equivariance=None), 0, pixels)
    assert logs["equivariance"] > 0
    assert with_eq.item() == pytest.approx(without.item() + 2.0 * logs["equivariance"].item())
    equivariance_loss(*latent.equivariance).backward()  # the term reaches both networks
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0 and vae.decoder.conv_out.weight.grad.abs().sum() > 0
    ae.eval()  # inference: no regulariser work at all
    assert ae(x)[1].equivariance is None


# ==============================================================================================
# Latent noise and channel masks
# ==============================================================================================


def test_noised_latent_is_the_interpolation_to_noise_at_a_per_image_tau():
    z = torch.randn(6, 4, 8, 8) * 3 + 1
    torch.manual_seed(5)
    got = noised_latent(z, 0.5)
    torch.manual_seed(5)  # the same draws, in the same order
    tau = torch.rand(6, 1, 1, 1) * 0.5
    eps = torch.randn(z.shape)
    torch.testing.assert_close(got, (1 - tau) * z + tau * z.std() * eps, rtol=0, atol=0)
    assert tau.max() <= 0.5 and torch.equal(noised_latent(z, 0.0), z)


def test_channel_mask_keeps_the_first_k_channels_and_zeroes_the_rest():
    torch.manual_seed(0)
    z = torch.randn(4000, 6, 2, 2)
    mask = channel_mask(z, prob=0.5, min_channels=2)
    kept = mask[:, :, 0, 0].sum(1).long()  # k per image
    # a prefix of ones then zeros: the first k channels, never a later channel alone
    assert torch.equal(mask[:, :, 0, 0], (torch.arange(6) < kept[:, None]).float())
    assert kept.min() == 2 and kept.max() == 6
    masked = (kept < 6).float().mean().item()  # k = 6 is also drawn with probability 1/5 when masking
    assert masked == pytest.approx(0.5 * 4 / 5, abs=0.03)
    assert set(kept[kept < 6].tolist()) == {2, 3, 4, 5}
    assert torch.equal(channel_mask(z, prob=0.0, min_channels=2), torch.ones(4000, 6, 1, 1))


def test_regularisers_only_act_in_training_mode_and_are_kl_only(tiny_cfg, fake_fashion):
    cfg = tiny_cfg("diffusability.latent_noise_max=0.5", "diffusability.channel_mask_prob=1.0")
    vae = build_autoencoder(cfg.model, cfg.data.resolution)
    ae = KLAutoencoder(vae, cfg.diffusability).eval()
    x = _images(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(ae(x, sample_posterior=False)[0], vae.decode(vae.encode(x).latent_dist.mean).sample)
    with pytest.raises(UserError, match="diffusability.scale_equivariance.*model.kind 'vq'"):
        load_config(TINY_VQ, [f"data.path={fake_fashion}", "diffusability.scale_equivariance=0.5"], Config)
    with pytest.raises(UserError, match="channel_mask_min"):
        tiny_cfg("diffusability.channel_mask_min=5")  # more than the 4 latent channels


def test_a_run_with_every_regulariser_trains_exports_and_loads_in_stock_diffusers(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.max_steps=6", "loss.disc_start=3", "diffusability.scale_equivariance=0.5",
                   "diffusability.equivariance_rotations=true", "diffusability.latent_noise_max=0.3",
                   "diffusability.channel_mask_prob=0.5", "train.log_every=2")
    run = train(cfg, tmp_path / "run")
    assert run.summary["skipped_steps"] == 0 and run.summary["final_logs"]["equivariance"] > 0
    stock = AutoencoderKL.from_pretrained(tmp_path / "run" / "export")
    assert stock.config.latent_channels == 4  # the regularisers change training, not the architecture


# ==============================================================================================
# Diagnostics that say what they show
# ==============================================================================================


def test_training_samples_the_posterior_exactly_as_diffusers_does(tiny_cfg, fake_fashion):
    """One posterior for training, the export, the latent cache and eval: diffusers' (its
    log-variance clamp), so a training sample is `latent_dist.mean + latent_dist.std * eps`."""
    cfg = tiny_cfg()
    vae = build_autoencoder(cfg.model, cfg.data.resolution)
    ae = KLAutoencoder(vae).train()
    x = _images(2, 16)
    with torch.no_grad():
        torch.manual_seed(3)
        recon, _ = ae(x)
        torch.manual_seed(3)
        dist = vae.encode(x).latent_dist
        expected = vae.decode(dist.mean + dist.std * torch.randn(dist.mean.shape)).sample
    torch.testing.assert_close(recon, expected, rtol=0, atol=0)
    # the retired clamp: a saved config holding diffusers' values loads, a user's setting is refused
    from ldm_vae.config import load_saved_config, to_dict

    saved = to_dict(cfg)
    saved["loss"].update(logvar_min=-30.0, logvar_max=20.0)
    assert load_saved_config(saved, "old run", Config) == cfg
    with pytest.raises(UserError, match="unknown key 'loss.logvar_min'"):
        load_config(TINY_KL, [f"data.path={fake_fashion}", "loss.logvar_min=-10"], Config)


# ==============================================================================================
# The command, end to end
# ==============================================================================================


def test_diffusability_command_measures_two_models_and_writes_report_and_card(tiny_cache, fake_fashion, tmp_path,
                                                                               monkeypatch):
    from ldm_vae.cli import main
    from ldm_vae.data.config import DataConfig
    from ldm_vae.evaluation.features import train_fd_features

    export = tiny_cache.parent / "vae" / "export"
    other = tmp_path / "eq"
    train(load_config(TINY_KL, [f"data.path={fake_fashion}", "train.max_steps=6", "loss.disc_start=100",
                                "diffusability.scale_equivariance=1.0"], Config), other)
    train_fd_features(DataConfig(source="fashion-mnist", path=str(fake_fashion), resolution=16), tmp_path / "fd",
                      "shapes", steps=5, batch_size=32)
    out = tmp_path / "report"
    args = [str(export), str(other / "export"), "--out", str(out), "--num-images", "32", "--batch-size", "16",
            "--fd-features", str(tmp_path / "fd"), "--ldm-config", "tiny_ldm", "--ldm-steps", "3",
            "--ldm-batch-size", "16", "--ldm-width", "16", "--samples-per-class", "2", "--sample-steps", "2",
            "--update-card"]
    monkeypatch.setenv("LDM_VAE_CACHE", str(tmp_path / "cache"))  # nothing cached before this call
    assert main(["diffusability", *args]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert [r["label"] for r in report["results"]] == ["vae", "eq"]
    for r in report["results"]:
        d, g = r["diffusability"], r["generation"]
        assert 0 < d["high_freq_share"] < 1 and d["latent_shape"] == [4, 8, 8]
        assert d["num_images"] == r["reconstruction"]["num_images"] == 32  # the same images for every measure
        assert d["equivariance_decoder_psnr_db"] > 0 and d["equivariance_encoder_rel_error"] > 0
        assert g["ldm_steps"] == 3 and g["num_samples"] == 20 and 0 <= g["class_accuracy"] <= 1
        # the test images' features were computed once, for the samples, and read back by each model's eval
        assert r["reconstruction"]["frechet_reference"]["fd_shapes"]["source"] == "cached"
        low, high = g["ci95"]["fd_shapes_samples"]  # every Fréchet distance has its interval
        assert g["fd_shapes_samples"] > 0 and 0 <= low < high
        assert r["reconstruction"]["ci95"]["fd_shapes"][0] < r["reconstruction"]["ci95"]["fd_shapes"][1]
        assert g["fd_shapes_ratio_to_reconstructions"] == pytest.approx(
            g["fd_shapes_samples"] / r["reconstruction"]["fd_shapes"])
        assert "fid_samples" in g["unavailable"] or g["fid_samples"] > 0  # never a silent number
        assert "## Diffusability" in (Path(r["model"]) / "README.md").read_text()
    assert (out / "spectrum.png").is_file() and (out / "vae" / "samples.png").is_file()
    assert (out / "vae" / "prior_samples.png").is_file() and (out / "vae" / "aggregate_gaussian_samples.png").is_file()
    table = (out / "table.md").read_text()
    assert "samples / recon" in table and f"[{low:.4f}, {high:.4f}]" in table
    assert not (tmp_path / ".work-report").exists()  # the proxy runs are removed once the report is complete
    assert ProxyRecipe(width=16).unet([4, 8, 8]) == ["model.block_out_channels=[16, 32]", "model.attention_levels=[1]"]
    # a second run into the same folder is refused; --no-proxy skips the LDM
    assert main(["diffusability", *args]) == 2
    report = run_diffusability([str(export)], tmp_path / "spec", DiffusabilityOptions(num_images=16, proxy=None))
    assert "generation" not in report["results"][0]


# ==============================================================================================
# The study script: it resumes
# ==============================================================================================


def test_study_skips_what_is_finished_and_measures_only_what_is_missing(fake_fashion, tmp_path, monkeypatch):
    """scripts/diffusability_study.py at tiny sizes: variants that share an autoencoder train it
    once, and a second call reuses the feature extractor, the runs and the measurements."""
    import functools
    import sys

    from .conftest import load_script

    study = load_script("diffusability_study")
    out = tmp_path / "study"
    argv = ["diffusability_study.py", "--out", str(out), "--only", "baseline", "ldm_wide", "--num-images", "16",
            "--ldm-steps", "2", "--ldm-batch-size", "8", "--samples-per-class", "1", "--fd-steps", "3",
            "--data-path", str(fake_fashion), "train.max_steps=2", "train.batch_size=8", "loss.disc_start=100",
            "train.checkpoint_every=2", "train.image_every=2", "export.scale_num_images=16", "data.max_images=64"]
    monkeypatch.setattr(sys, "argv", argv)
    # the study's recipe on the tiny LDM config: seconds, not minutes (the study sets steps and batch)
    monkeypatch.setattr(study, "ProxyRecipe", functools.partial(ProxyRecipe, config="tiny_ldm", width=16,
                                                                 sample_steps=2))
    study.main()
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["baseline-s0"]  # ldm_wide reuses it
    wide = json.loads((out / "measures" / "ldm_wide-s0" / "metrics.json").read_text())["results"][0]
    assert wide["generation"]["unet"][0] == "model.block_out_channels=[128, 256]"  # its proxy LDM is wider
    first = json.loads((out / "study.json").read_text())["table"]

    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"{name} ran again")
        return call

    # a finished study: nothing trains or measures again, the table is the same
    for name in ("train", "train_fd_features", "run_diffusability"):
        monkeypatch.setattr(study, name, refuse(name))
    study.main()
    assert json.loads((out / "study.json").read_text())["table"] == first

    # an interrupted one (a measurement missing): only that one runs, on the trained autoencoder
    (out / "measures" / "ldm_wide-s0" / "metrics.json").unlink()
    calls = []

    def measure(models, *args, **kwargs):
        calls.append(models)
        return run_diffusability(models, *args, **kwargs)

    monkeypatch.setattr(study, "run_diffusability", measure)
    study.main()
    assert calls == [[str(out / "runs" / "baseline-s0" / "export")]]
    table = json.loads((out / "study.json").read_text())["table"]
    assert set(table) == {"baseline", "ldm_wide"} and table["baseline"] == first["baseline"]
    assert "| ldm_wide |" in (out / "STUDY.md").read_text()
