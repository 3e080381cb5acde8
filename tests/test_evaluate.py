"""`ldm-vae eval`: metric functions on known values, Fréchet distances, unavailable weights,
likelihood bounds, the CLI's files and the model card update."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from ldm_vae.errors import UserError
from ldm_vae.evaluation.diagnostics import KLDiagnostics, Sums
from ldm_vae.evaluation.features import FeatureExtractor
from ldm_vae.evaluation.frechet import (
    INCEPTION_FILE,
    Frechet,
    ReferenceFeatures,
    _fd_symmetric,
    _Features,
    _Uint8,
    exact_uint8,
    fd_of_features,
    fid_protocol,
    frechet_distance,
    frechet_result,
    load_fd_features,
)
from ldm_vae.evaluation.metrics import (
    bits_per_dim,
    border_error_ratio,
    border_error_sums,
    border_mask,
    color_cast_255,
    likelihood_bounds,
    psnr,
    ssim,
)
from ldm_vae.evaluation.report import EvalOptions, load_for_comparison, run_eval

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


def test_color_cast_is_the_signed_mean_error_per_channel_in_levels():
    """+2/255 in red only: cast (2, 0, 0) levels, the same for every image; a uniform error has
    border ratio 1."""
    x = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0)) * 0.9
    r = x.clone()
    r[:, 0] += 2 / 255
    torch.testing.assert_close(color_cast_255(x, r), torch.tensor([[2.0, 0, 0]] * 3, dtype=torch.float64))
    torch.testing.assert_close(color_cast_255(r, x), -color_cast_255(x, r))  # signed: darker is negative
    ratio, reason = border_error_ratio(border_error_sums(x, r))
    assert ratio == pytest.approx(1.0) and reason is None


def test_border_band_is_8_pixels_clamped_to_a_quarter_of_the_side():
    assert border_mask(40, 40).sum() == 40 * 40 - 24 * 24  # 8-pixel band, 24 x 24 interior
    assert border_mask(16, 40).sum() == 16 * 40 - 8 * 24  # 16 rows: band 4 on top and bottom, 8 at the sides
    assert not border_mask(4, 4)[1:3, 1:3].any() and border_mask(4, 4).sum() == 12  # band 1
    # the band only: with error 0.1 there and 0.02 inside, the ratio is 5
    x = torch.full((2, 3, 32, 32), 0.5, dtype=torch.float64)  # float32 would be 1e-6 off
    r = x + torch.where(border_mask(32, 32), 0.1, 0.02)
    ratio, _ = border_error_ratio(border_error_sums(x, r))
    assert ratio == pytest.approx(5.0)
    assert border_error_sums(x, r)[[1, 3, 5]].tolist() == [2 * (32 * 32 - 16 * 16), 2 * 16 * 16, 2 * (32 * 32 - 30 * 30)]


def test_frame_ratio_is_the_outermost_ring_of_pixels_over_the_same_interior():
    """Error 0.3 on the outermost ring, 0.1 on the rest of the 8-pixel band, 0.02 inside: the frame
    ratio is 15, while the band's ratio averages the frame with the 7 inner rings."""
    x = torch.full((2, 3, 32, 32), 0.5, dtype=torch.float64)
    frame = border_mask(32, 32, 1)
    assert frame.sum() == 32 * 32 - 30 * 30 and not frame[1:31, 1:31].any()
    r = x + torch.where(frame, 0.3, torch.where(border_mask(32, 32), 0.1, 0.02))
    sums = border_error_sums(x, r)
    assert border_error_ratio(sums, "frame")[0] == pytest.approx(15.0)
    n_frame, n_band = 32 * 32 - 30 * 30, 32 * 32 - 16 * 16
    band_mean = (0.3 * n_frame + 0.1 * (n_band - n_frame)) / n_band
    assert border_error_ratio(sums)[0] == pytest.approx(band_mean / 0.02)
    ratio, reason = border_error_ratio(border_error_sums(x, x + torch.where(frame, 0.1, 0.0)), "frame")
    assert ratio is None and "frame error ratio is undefined" in reason


def test_border_ratio_pools_sums_over_images_and_an_exact_interior_is_unavailable():
    """Image A: border 0.1, interior 0.1 (ratio 1); image B: border 0.3, interior 0.01 (ratio 30).
    Pooled: 0.2 / 0.055, neither the mean of the ratios (15.5) nor of A's and B's."""
    x = torch.full((2, 3, 32, 32), 0.5, dtype=torch.float64)  # float32 would be 1e-6 off
    band = border_mask(32, 32)
    r = x.clone()
    r[0] += 0.1
    r[1] += torch.where(band, 0.3, 0.01)
    pooled = border_error_sums(x[:1], r[:1]) + border_error_sums(x[1:], r[1:])
    torch.testing.assert_close(pooled, border_error_sums(x, r))  # batches pool exactly
    ratio, _ = border_error_ratio(pooled)
    assert ratio == pytest.approx(0.2 / 0.055)
    # an exact interior (border wrong or not): undefined, with the reason; never inf or 0/0
    for r in (x + torch.where(band, 0.1, 0.0), x):
        ratio, reason = border_error_ratio(border_error_sums(x, r))
        assert ratio is None and "exactly" in reason
    assert border_error_ratio(border_error_sums(x[..., :3, :3], x[..., :3, :3] + 0.1))[0] is None  # no band


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) of two [C, H, W] images in [0, 1], written out in float64:
    11 x 11 Gaussian window with sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = 1, biased local
    (co)variances, mean of the SSIM map over channels and pixels. Borders as torchmetrics >= 2024-09
    (Lightning-AI/torchmetrics#2721) does them: reflect-pad by 5, the map over the whole image
    (not MATLAB's / skimage's 'valid' crop)."""
    t = np.arange(11) - 5.0
    g = np.exp(-t ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / g.sum() ** 2

    def blur(a):
        windows = np.lib.stride_tricks.sliding_window_view(np.pad(a, ((0, 0), (5, 5), (5, 5)), mode="reflect"),
                                                           (11, 11), axis=(1, 2))
        return np.einsum("chwij,ij->chw", windows, w)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())


def test_ssim_matches_an_independent_gaussian_11_sigma_1_5_implementation():
    """The README's SSIM convention (Gaussian window 11 / sigma 1.5, data_range 1) to 1e-5 on a
    textured pair; a 9-tap sigma-1.0 or uniform window, other constants or a 'valid' crop miss by >1e-3."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(20.0), torch.arange(24.0), indexing="ij")
    x = (0.5 + 0.3 * torch.sin(xx / 2) * torch.cos(yy / 3) + 0.15 * torch.rand(2, 3, 20, 24, generator=g)).clamp(0, 1)
    y = (0.9 * x + 0.05 + 0.1 * torch.randn(2, 3, 20, 24, generator=g)).clamp(0, 1)
    reference = [_ssim_reference(a.double().numpy(), b.double().numpy()) for a, b in zip(x, y)]
    assert all(0.3 < r < 0.95 for r in reference), reference  # neither trivial nor saturated
    torch.testing.assert_close(ssim(x, y).double(), torch.tensor(reference, dtype=torch.float64), atol=1e-5, rtol=0)


def test_frechet_distance_is_zero_on_itself_and_positive_when_shifted():
    torch.manual_seed(0)
    stand_in = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    real = torch.rand(200, 3, 16, 16)
    metric = Frechet("fd_x", _Features(stand_in, 16, 8), {})
    values = [frechet_distance(metric, real, other)["value"] for other in (real, (real + 0.3).clamp(0, 1))]
    assert abs(values[0]) < 1e-4 and values[1] > 1e-3, values


def _with_exact_moments(mean: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n float64 samples whose sample mean and UNBIASED sample covariance (what the Fréchet
    metric estimates) are exactly `mean` and `cov`: whitened Gaussian draws, recoloured."""
    w = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = w - w.mean(0)
    w = w @ torch.linalg.inv(torch.linalg.cholesky(w.T @ w / (n - 1))).T
    return mean + w @ torch.linalg.cholesky(cov).T


def test_frechet_distance_of_two_gaussians_has_the_closed_form_value():
    """d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2). With S1 = R diag(a) R^T, S2 = R diag(b) R^T
    (commuting, not diagonal), the trace is sum_i (sqrt a_i - sqrt b_i)^2 = (0.1-0.3)^2 + 0 + (0.3-0.05)^2
    = 0.1025, and |mu1 - mu2|^2 = 0.3^2 + 0.4^2 = 0.25: d^2 = 0.3525 exactly. Features are the pixels
    of 1x3 "images" through `_Features` (x01 * 2 - 1, so the features are given directly), in
    uneven batches through `frechet_distance`."""
    rotation, _ = torch.linalg.qr(torch.tensor([[1.0, 2.0, 0.5], [-1.0, 0.5, 1.0], [0.3, -0.2, 2.0]],
                                               dtype=torch.float64))
    cov1 = rotation @ torch.diag(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64) ** 2) @ rotation.T
    cov2 = rotation @ torch.diag(torch.tensor([0.3, 0.2, 0.05], dtype=torch.float64) ** 2) @ rotation.T
    f1 = _with_exact_moments(torch.zeros(3, dtype=torch.float64), cov1, 250, seed=0)
    f2 = _with_exact_moments(torch.tensor([0.3, -0.4, 0.0], dtype=torch.float64), cov2, 250, seed=1)

    def as_images(f):  # 1 x 3 images whose features 2 x - 1 are f
        return ((f + 1) / 2).float().reshape(-1, 1, 1, 3)

    network = _Features(nn.Flatten(), resolution=3, num_features=3)
    metric = Frechet("fd_x", network, {})
    assert metric.features(as_images(f1), batch_size=100).shape == (250, 3)
    assert frechet_distance(metric, as_images(f1), as_images(f2))["value"] == pytest.approx(0.3525, rel=1e-5)
    assert frechet_distance(metric, as_images(f1), as_images(f1))["value"] == pytest.approx(0.0, abs=1e-5)
    # the number torchmetrics' FID gives on the same features
    tm = FrechetInceptionDistance(feature=network, normalize=True)
    tm.update(as_images(f1), real=True)
    tm.update(as_images(f2), real=False)
    assert tm.compute().item() == pytest.approx(0.3525, rel=1e-5)


def test_bootstrap_interval_brackets_the_distributions_distance_and_narrows_with_more_images():
    """Real N(0, I_8), fake N(0.3 * 1, I_8): the distributions are 8 * 0.3^2 = 0.72 apart. FD on n
    images overestimates that (by about tr(2 S) / n); the basic bootstrap interval shifts back by
    the resamples' own excess, so it brackets 0.72 for small and large n, and narrows with n."""
    g = torch.Generator().manual_seed(0)
    results = {}
    for n in (300, 3000):
        real = torch.randn(n, 8, generator=g, dtype=torch.float64)
        fake = torch.randn(n, 8, generator=g, dtype=torch.float64) + 0.3
        results[n] = frechet_result(real, fake, bootstrap=200, seed=1)
        low, high = results[n]["ci95"]
        assert low < 0.72 < high, (n, results[n])
    assert results[300]["value"] > 0.72 + 0.02  # the finite-set excess the interval corrects for
    width = {n: r["ci95"][1] - r["ci95"][0] for n, r in results.items()}
    assert width[3000] < width[300] / 2.5, width  # ~ 1 / sqrt(n)
    assert frechet_result(real, fake, bootstrap=0)["ci95"] is None
    # the resamples' formula (symmetric eigendecompositions) is torchmetrics' distance
    assert _fd_symmetric(real[:500], fake[:700]) == pytest.approx(fd_of_features(real[:500], fake[:700]), rel=1e-9)
    # seeded: the same interval again
    assert frechet_result(real, fake, bootstrap=200, seed=1) == results[3000]


def test_reference_features_are_cached_per_images_and_network_and_checked_against_the_images(tmp_path, caplog):
    class Counting(nn.Module):
        calls = 0

        def forward(self, x01):
            Counting.calls += 1
            return x01.flatten(1)[:, :4]

    metric = Frechet("fd_x", Counting(), {"weights_sha256": "a"})
    images = torch.rand(10, 3, 4, 4)
    key = {"images": {"source": "folder", "split": "test"}, "num_images": 10}

    def stream(ref, x):
        for batch in x.split(4):
            ref.add(batch)
        return ref.finish(lambda: iter(x.split(4)))

    first = ReferenceFeatures(metric, key, tmp_path)
    features = stream(first, images)
    assert first.source == "computed" and Counting.calls == 3 and first.path.is_file()
    again = ReferenceFeatures(metric, key, tmp_path)
    assert torch.equal(stream(again, images), features) and again.source == "cached"
    assert Counting.calls == 3  # the network never ran on the real images again
    assert again.record()["images_sha256"] == first.record()["images_sha256"]
    # same settings, other images (the data changed on disk): recomputed from the images, never the old file
    changed = images.flip(0)
    stale = ReferenceFeatures(metric, key, tmp_path)
    assert torch.equal(stream(stale, changed), changed.flatten(1)[:, :4].double())
    assert stale.source == "computed" and "of other images" in caplog.text
    # other weights (protocol) or another image count: another file
    other = Frechet("fd_x", Counting(), {"weights_sha256": "b"})
    assert ReferenceFeatures(other, key, tmp_path).path != first.path
    assert ReferenceFeatures(metric, {**key, "num_images": 9}, tmp_path).path != first.path
    # an unreadable file costs a recomputation, nothing else
    first.path.write_bytes(b"truncated")
    broken = ReferenceFeatures(metric, key, tmp_path)
    assert torch.equal(stream(broken, images), features) and broken.source == "computed"


def test_rfid_sees_the_datasets_exact_pixels():
    """A dataset pixel k (stored as k / 127.5 - 1, handed to Fréchet metrics as (x + 1) / 2)
    reaches the FID network as the uint8 k, for every k; torchmetrics' normalize=True
    (`(x * 255).byte()`) turns 63 of them into k - 1."""
    k = torch.arange(256)
    x01 = (k.float() / 127.5 - 1 + 1) / 2
    assert torch.equal(exact_uint8(x01), k.to(torch.uint8))
    assert ((x01 * 255).byte() != k).sum() == 63  # what the truncation did

    class Spy(nn.Module):  # a stand-in for Inception: what does the network receive?
        num_features = 3

        def forward(self, x):
            self.seen = x
            return x.float().mean((2, 3))

    spy = Spy()
    Frechet("rfid", _Uint8(spy), {}).features(x01.reshape(1, 1, 16, 16).expand(2, 3, 16, 16))
    assert spy.seen.dtype == torch.uint8 and torch.equal(spy.seen[1, 2].flatten(), k.to(torch.uint8))


def test_fid_protocol_names_the_weights_by_hash(tmp_path, monkeypatch):
    """metrics.json's protocol: torch-fidelity's file in the hub cache by default, its sha256
    when it is there (None when not: the metric is then unavailable anyway)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    default = fid_protocol(None)
    assert default["weights"] == str(tmp_path / "hub" / "checkpoints" / INCEPTION_FILE)
    assert default["weights_sha256"] is None
    given = tmp_path / "inception.pth"
    given.write_bytes(b"stand-in weights")
    assert fid_protocol(str(given))["weights_sha256"] == hashlib.sha256(b"stand-in weights").hexdigest()


def test_fd_extractor_is_a_safetensors_folder_and_single_files_are_refused(tmp_path):
    """train-fd-features writes config.json + model.safetensors (PyTorchModelHubMixin); the
    loader rebuilds the same network; old single-file (TorchScript) extractors get a message."""
    torch.manual_seed(0)
    model = FeatureExtractor("shapes", resolution=16, num_classes=10).eval()
    model.save_pretrained(tmp_path / "fd")
    assert json.loads((tmp_path / "fd" / "config.json").read_text()) == {"name": "shapes", "resolution": 16,
                                                                       "num_classes": 10, "width": 32}
    metric = load_fd_features(tmp_path / "fd")
    x01 = torch.rand(2, 3, 16, 16)
    assert metric.name == "fd_shapes" and torch.equal(metric.network(x01), model(x01 * 2 - 1))
    assert torch.equal(metric.network.module.logits(x01), model.logits(x01))
    (tmp_path / "old.pt").write_bytes(b"PK\x03\x04 a TorchScript archive")
    with pytest.raises(UserError, match="is a file: extractors are now folders"):
        load_fd_features(tmp_path / "old.pt")
    with pytest.raises(UserError, match="no config.json"):
        load_fd_features(tmp_path)


def test_bits_per_dim_of_a_uniform_density_is_8():
    dims = 3 * 8 * 8
    assert bits_per_dim(torch.tensor([-dims * math.log(2.0)]), dims).item() == pytest.approx(8.0)


def test_active_units_count_channels_whose_mean_varies():
    kl, sums = KLDiagnostics(vae=None), Sums()
    for _ in range(4):
        mean = torch.zeros(16, 2, 2, 2)
        mean[:, 0] = torch.randn(16, 1, 1)  # channel 0 carries information, channel 1 is collapsed
        kl.posterior = SimpleNamespace(mean=mean, logvar=torch.zeros_like(mean))
        kl.observe(mean, sums)
    s = kl.summary(64, sums.total)
    assert s["active_units"] == 4 and s["latent_units"] == 8
    assert s["active_units_per_channel"] == [1.0, 0.0]
    assert s["kl_per_channel_nats"][1] == 0.0 and s["kl_per_channel_nats"][0] > 0


@pytest.fixture(scope="module")
def exports(tiny_exports):
    return tiny_exports


def test_iwae_bound_is_tighter_than_the_elbo(exports):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(exports / "kl" / "export")
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    elbo, iwae = likelihood_bounds(vae, x, k=32, sigma=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(elbo).all() and (iwae >= elbo - 1e-3 * elbo.abs()).all()


class _StubVAE:
    """What `likelihood_bounds` uses of a VAE: encode(x).latent_dist (mean, std, logvar) and decode(z).sample."""

    def __init__(self, mean: float, std: float, decode, latent_shape=(2, 2, 2)):
        self.mean, self.std, self.latent_shape, self._decode = mean, std, latent_shape, decode

    def encode(self, x):
        mean = torch.full((len(x), *self.latent_shape), self.mean)
        logvar = torch.full_like(mean, 2 * math.log(self.std))
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=(0.5 * logvar).exp(), logvar=logvar))

    def decode(self, z):
        return SimpleNamespace(sample=self._decode(z))


def _decode_from_z(z):  # a decoder whose output depends on z: 3 x 4 x 4 images
    return torch.tanh(z).mean(1, keepdim=True).repeat_interleave(2, 2).repeat_interleave(2, 3).expand(-1, 3, -1, -1)


def test_iwae_with_one_sample_is_the_elbo_and_is_exact_when_z_carries_nothing():
    """With q(z|x) = p(z) = N(0, I), KL = 0 and log p(z) - log q(z) = 0 per sample, so IWAE_1 and the
    ELBO are the same number; with a decoder that also ignores z, log p(x) = log N(x; d, sigma^2 I)
    and every bound equals it for any k: log((1/k) sum_i p(x)) = log p(x) needs the - log k."""
    x = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    elbo, iwae = likelihood_bounds(_StubVAE(0.0, 1.0, _decode_from_z), x, k=1, sigma=0.1,
                                   generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(iwae, elbo, atol=1e-9, rtol=0)

    d = torch.linspace(-0.5, 0.5, 48).reshape(1, 3, 4, 4)

    def constant(z):
        return d.expand(len(z), -1, -1, -1)

    log_px = torch.distributions.Normal(d.double(), 0.1).log_prob(x.double()).flatten(1).sum(1)
    for k in (1, 5):
        elbo, iwae = likelihood_bounds(_StubVAE(0.0, 1.0, constant), x, k=k, sigma=0.1,
                                       generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(elbo, log_px, atol=1e-9, rtol=0)
        torch.testing.assert_close(iwae, log_px, atol=1e-9, rtol=0)
    # a posterior N(0.5, 0.5^2) off the prior: the ELBO is log p(x) - KL, by hand for 8 latent units
    kl = 8 * 0.5 * (0.5 ** 2 + 0.5 ** 2 - 1 - math.log(0.5 ** 2))
    elbo, _ = likelihood_bounds(_StubVAE(0.5, 0.5, constant), x, k=3, sigma=0.1, generator=torch.Generator())
    torch.testing.assert_close(elbo, log_px - kl, atol=1e-6, rtol=0)


def test_iwae_is_the_log_mean_exp_of_the_single_sample_bounds():
    """IWAE_k = log (1/k) sum_i w_i (Burda et al. eq. 8) = logsumexp(log w) - log k. Each IWAE_1 is one
    log w_i, and k calls with k = 1 draw the same eps_i from the generator as one call with k (one
    randn of the latent shape per sample), so the k-sample bound must be the log-mean-exp of those,
    and the k-sample ELBO the mean of the single-sample ELBOs. Unequal weights (posterior
    N(0.5, 0.5^2), decoder depends on z): a dropped or wrong log k, or a plain mean, fails."""
    x = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae, k = _StubVAE(0.5, 0.5, _decode_from_z), 6
    g = torch.Generator().manual_seed(1)
    singles = [likelihood_bounds(vae, x, k=1, sigma=0.3, generator=g) for _ in range(k)]
    elbo, iwae = likelihood_bounds(vae, x, k=k, sigma=0.3, generator=torch.Generator().manual_seed(1))
    log_w = torch.stack([w for _, w in singles])
    assert (log_w.std(0) > 0.1).all()  # the weights differ: logmeanexp and mean are apart
    torch.testing.assert_close(iwae, torch.logsumexp(log_w, 0) - math.log(k), atol=1e-9, rtol=0)
    torch.testing.assert_close(elbo, torch.stack([e for e, _ in singles]).mean(0), atol=1e-9, rtol=0)
    assert (iwae > log_w.mean(0) + 1e-3).all()  # Jensen, strictly, for unequal weights


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


def test_bound_images_0_skips_the_likelihood_bounds_and_says_so(exports, tmp_path, monkeypatch):
    _offline_hub(monkeypatch, tmp_path)
    report = run_eval([str(exports / "kl" / "export")], tmp_path / "r",
                      EvalOptions(num_images=8, batch_size=8, bootstrap=0, bound_images=0, iwae_k=4))
    m = report["results"][0]["metrics"]
    for key in ("elbo_bits_per_dim", "iwae4_bits_per_dim"):
        assert key not in m and m["unavailable"][key] == "not computed (--bound-images 0)", key
    assert "lpips_vgg" in m["unavailable"]  # the instruments' reasons are kept next to them
    assert "elbo_bits_per_dim: not computed" in report["table"] and m["psnr_db"] > 0


def test_with_weights_in_the_hub_cache_eval_computes_every_metric(exports, tmp_path, monkeypatch):
    """Stand-in weights in a temporary torch hub cache, where users' downloads land: LPIPS (both
    backbones) is computed and equals our LPIPS built from those files (the lpips package gives the
    same values: test_perceptual.py), the domain FD with its interval; rFID too where torch-fidelity
    imports (it needs torchvision, which a CPU-only torch lacks: then it is unavailable, saying so).
    A second eval of the same images reuses the cached real-image features and gives equal values."""
    from ldm_vae.autoencoder.perceptual import BACKBONE_FILES, build_lpips

    from .test_perceptual import _torchvision_state

    _offline_hub(monkeypatch, tmp_path)  # nothing may come from the network
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for net in ("vgg", "alex"):
        torch.save(_torchvision_state(net), checkpoints / BACKBONE_FILES[net][0])
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    except (ImportError, RuntimeError):  # not installed, or no working torchvision under it
        fidelity = None
    if fidelity is not None:  # a random Inception under torch-fidelity's file name
        with monkeypatch.context() as patch:  # built without loading (or downloading) weights
            patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
            patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda *args, **kwargs: None)
            inception = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        torch.save(inception.state_dict(), checkpoints / INCEPTION_FILE)
    torch.manual_seed(0)
    FeatureExtractor("shapes", resolution=16, num_classes=10).save_pretrained(tmp_path / "fd")
    opts = EvalOptions(num_images=24, batch_size=8, fd_features=str(tmp_path / "fd"), bootstrap=10,
                       reference_cache=str(tmp_path / "cache"))
    vq = str(exports / "vq" / "export")
    m = run_eval([vq], tmp_path / "r1", opts)["results"][0]["metrics"]
    expected = {"lpips_vgg", "fd_shapes"} | ({"rfid"} if fidelity else set())
    assert expected <= set(m) and all(m[k] > 0 for k in expected), m
    assert set(m["unavailable"]) == {"rfid", "lpips_alex"} - expected
    # AlexNet's strides leave nothing of a 16 x 16 image at its last tap: unavailable, saying why
    assert "at least 31x31 pixels; these are 16x16" in m["unavailable"]["lpips_alex"]
    if "rfid" in m["unavailable"]:
        assert "torch-fidelity" in m["unavailable"]["rfid"]
    assert set(m["ci95"]) == expected - {"lpips_vgg"}
    _, (vae,), _, dataset = load_for_comparison([vq], "test")
    x = torch.stack([dataset[i]["pixel_values"] for i in range(24)])
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latents).sample.clamp(-1, 1)
        assert m["lpips_vgg"] == pytest.approx(build_lpips("vgg")(x, recon).mean().item(), rel=1e-4)
        # at 32 x 32 the AlexNet one is computed from its stand-in file too
        up = torch.nn.functional.interpolate(torch.cat([x, recon]), size=32)
        assert build_lpips("alex")(up[:24], up[24:]).min() > 0
    again = run_eval([vq], tmp_path / "r2", opts)["results"][0]["metrics"]
    assert {s["source"] for s in again["frechet_reference"].values()} == {"cached"}
    assert {k: again[k] for k in expected} == {k: m[k] for k in expected}


def test_cli_eval_writes_all_files_and_updates_the_cards(exports, tmp_path, fake_fashion, monkeypatch):
    from ldm_vae.cli import main

    features = tmp_path / "features"
    env = {**os.environ, "LDM_VAE_CACHE": str(tmp_path / "cache")}
    monkeypatch.setenv("LDM_VAE_CACHE", env["LDM_VAE_CACHE"])  # for the commands run in this process

    def run(*args):  # the command as users run it: its exit codes, its output
        return subprocess.run([sys.executable, "-m", "ldm_vae", *args], capture_output=True, text=True, env=env)

    # the setup and the last call run in this process (starting python and importing torch costs ~10 s a call)
    assert main(["train-fd-features", "--data", "fashion-mnist", "--data-path", str(fake_fashion), "--resolution",
                 "16", "--steps", "20", "--batch-size", "32", "--name", "shapes", "--out", str(features)]) == 0
    assert load_fd_features(features).name == "fd_shapes"

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
    # the protocol names the extractor file by its hash; rFID (unavailable offline) has none
    protocol = report["frechet_protocol"]
    assert set(protocol) == {"fd_shapes"} and "rfid" in kl_m["unavailable"]
    weights = (features / "model.safetensors").read_bytes()
    assert protocol["fd_shapes"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert protocol["fd_shapes"]["resize"].startswith("bilinear with antialias to 16x16")
    assert {"kl_per_channel_nats", "active_units", "elbo_bits_per_dim", "iwae4_bits_per_dim",
            "posterior_std_mean_per_channel", "latent_channel_std", "encode_images_per_s", "device"} <= set(kl_m)
    assert 0 < vq_m["codebook_usage"] <= 1 and len(vq_m["latent_channel_mean"]) == 4
    for m in (kl_m, vq_m):  # the artefact metrics (issue 20), in levels of 1/255 and as a ratio
        cast = [m[f"color_cast_255_{c}"] for c in "rgb"]
        assert m["color_cast_max_255"] == pytest.approx(max(map(abs, cast))) and m["border_error_ratio"] > 0
    assert "cast max /255" in proc.stdout and "per-image cast /255" in proc.stdout
    assert "border ratio" in proc.stdout and "frame ratio" in proc.stdout
    # the values are those of the first 48 test images for EVERY model of the call (the same images):
    # recomputed here from stock-loaded models, KL reconstructing from the posterior mean; and the last
    # model's domain FD on a fresh metric (the call shares one metric: not reset, it keeps the first's features)
    _, models, _, dataset = load_for_comparison([str(kl), str(vq)], "test")
    x01 = (torch.stack([dataset[i]["pixel_values"] for i in range(48)]) + 1) / 2
    assert kl_m["num_images"] == vq_m["num_images"] == 48
    for vae, m in zip(models, (kl_m, vq_m)):
        with torch.no_grad():  # in the call's batches of 16, so the numbers agree to float rounding
            posteriors = [vae.encode(x * 2 - 1) for x in x01.split(16)]
            z = [p.latent_dist.mean if hasattr(p, "latent_dist") else p.latents for p in posteriors]
            r01 = (torch.cat([vae.decode(zi).sample for zi in z]).clamp(-1, 1) + 1) / 2
        assert m["psnr_db"] == pytest.approx(psnr(x01, r01).mean().item(), abs=1e-4)
        assert m["ssim"] == pytest.approx(ssim(x01, r01).mean().item(), abs=1e-5)
        assert m["color_cast_255_g"] == pytest.approx(color_cast_255(x01, r01)[:, 1].mean().item(), abs=1e-3)
        per_image = color_cast_255(x01, r01).abs().amax(1).mean().item()
        assert m["color_cast_image_255"] == pytest.approx(per_image, abs=1e-3)
        assert m["color_cast_image_255"] >= m["color_cast_max_255"] - 1e-9  # pooled casts can only cancel
        for region in ("border", "frame"):
            ratio, _ = border_error_ratio(border_error_sums(x01, r01), region)
            assert m[f"{region}_error_ratio"] == pytest.approx(ratio, rel=1e-4)
    # vq's distance, its test images' features recomputed here: the call computed them for kl, cached them
    # (the file it names) and read them back for vq
    assert [m["frechet_reference"]["fd_shapes"]["source"] for m in (kl_m, vq_m)] == ["computed", "cached"]
    assert Path(vq_m["frechet_reference"]["fd_shapes"]["file"]).parent == tmp_path / "cache" / "frechet-reference"
    fd = frechet_distance(load_fd_features(features), x01, r01, bootstrap=20)  # r01: vq's
    assert vq_m["fd_shapes"] == pytest.approx(fd["value"], rel=1e-3, abs=1e-5)
    low, high = vq_m["ci95"]["fd_shapes"]
    assert low < high and f"[{low:.3f}, {high:.3f}]" in proc.stdout  # the table shows the interval
    assert abs(kl_m["psnr_db"] - vq_m["psnr_db"]) > 1e-3  # two different models, not one measured twice
    card = (vq / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["psnr"] == pytest.approx(vq_m["psnr_db"], abs=1e-5) and "fd_shapes" in metrics
    assert card.count("## Evaluation") == 1
    # a second run replaces the section instead of adding one, and refuses to overwrite the report
    again = run("eval", str(vq), "--out", str(out), "--num-images", "16")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert main(["eval", str(vq), "--out", str(out), "--num-images", "16", "--overwrite", "--update-card"]) == 0
    assert (vq / "README.md").read_text().count("## Evaluation") == 1
