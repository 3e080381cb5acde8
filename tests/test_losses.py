"""Loss invariants: KL closed form, GAN loss signs and values, where gradients flow."""

from __future__ import annotations

import math

import pytest
import torch

from ldm_vae.autoencoder.discriminator import PatchDiscriminator
from ldm_vae.autoencoder.losses import (
    AutoencoderLoss,
    LeCamEMA,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    kl_divergence,
    kl_with_free_bits,
    vanilla_d_loss,
    vanilla_g_loss,
)
from ldm_vae.autoencoder.models import KLAutoencoder, build_autoencoder
from ldm_vae.autoencoder.perceptual import build_lpips


def test_kl_closed_form_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, generator=g)
    logvar = torch.randn(4, generator=g)
    std = torch.exp(0.5 * logvar)
    z = mean + std * torch.randn(400_000, 4, generator=g)
    log_q = torch.distributions.Normal(mean, std).log_prob(z)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z)
    mc = (log_q - log_p).mean(0)
    torch.testing.assert_close(kl_divergence(mean, logvar), mc, atol=0.02, rtol=0.02)


def test_kl_non_negative_and_zero_at_prior():
    g = torch.Generator().manual_seed(1)
    kl = kl_divergence(torch.randn(2, 4, 8, 8, generator=g) * 3, torch.randn(2, 4, 8, 8, generator=g) * 3)
    assert (kl >= 0).all()
    assert kl_divergence(torch.zeros(3), torch.zeros(3)).abs().max() == 0


def test_free_bits_floor_stops_gradient_below_it():
    mean = torch.zeros(2, 2, 3, 3)
    mean[:, 1] = 2.0  # channel 1 carries 2 nats per position; channel 0 none
    mean.requires_grad_(True)
    kl_map = kl_divergence(mean, torch.zeros_like(mean))
    total = kl_with_free_bits(kl_map, free_bits=0.5)
    assert total.item() == pytest.approx((0.5 + 2.0) * 9)
    total.backward()
    assert mean.grad[:, 0].abs().max() == 0  # below the floor: no pressure towards the prior
    assert mean.grad[:, 1].abs().min() > 0
    # without free bits: the plain per-image sum
    assert kl_with_free_bits(kl_map, 0.0).item() == pytest.approx(kl_map.sum((1, 2, 3)).mean().item())


def test_hinge_and_vanilla_values_and_signs():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])
    # hinge: relu(1 - real) = [0, 1], relu(1 + fake) = [0, 1] -> 0.5 * (0.5 + 0.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    assert hinge_d_loss(torch.full((3,), 5.0), torch.full((3,), -5.0)).item() == 0  # confident D: no loss
    zero = torch.zeros(3)
    assert vanilla_d_loss(zero, zero).item() == pytest.approx(math.log(2))
    assert vanilla_g_loss(zero).item() == pytest.approx(math.log(2))
    assert hinge_g_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)
    # the generator's losses fall as D rates its fakes as more real
    for g_loss in (hinge_g_loss, vanilla_g_loss):
        assert g_loss(torch.full((2,), 1.0)) < g_loss(torch.full((2,), -1.0))
    # the discriminator's losses fall as it separates real from fake
    for d_loss in (hinge_d_loss, vanilla_d_loss):
        assert d_loss(torch.full((2,), 1.0), torch.full((2,), -1.0)) < d_loss(zero[:2], zero[:2])


def _setup(tiny_cfg, **loss_overrides):
    cfg = tiny_cfg(*[f"loss.{k}={v}" for k, v in loss_overrides.items()])
    torch.manual_seed(0)
    ae = KLAutoencoder(build_autoencoder(cfg.model, cfg.data.resolution))
    disc = PatchDiscriminator(3, cfg.loss.disc_channels, cfg.loss.disc_layers)
    perceptual = build_lpips("vgg", random_backbone=True)  # RANDOM backbone: wiring test only
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    return cfg, ae, disc, AutoencoderLoss(cfg.loss, perceptual), x


def test_lpips_term_sends_gradient_to_the_decoder(tiny_cfg):
    # only the perceptual term is on: any decoder gradient must come through LPIPS
    cfg, ae, disc, loss_fn, x = _setup(tiny_cfg, rec_l1=0, kl_weight=0, perceptual_weight=1.0)
    recon, latent = ae(x)
    loss, logs = loss_fn.generator(x, recon, latent, step=0)
    assert logs["lpips"] > 0
    loss.backward()
    grad = ae.vae.decoder.conv_out.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.perceptual.parameters())  # LPIPS itself stays frozen


def test_discriminator_step_leaves_autoencoder_grads_untouched(tiny_cfg):
    cfg, ae, disc, loss_fn, x = _setup(tiny_cfg, disc_start=0)
    recon, latent = ae(x)
    for p in disc.parameters():
        p.requires_grad_(False)  # as the trainer does for the generator step
    g_loss, logs = loss_fn.generator(x, recon, latent, step=0, disc=disc, last_layer=ae.last_layer())
    g_loss.backward()
    assert all(p.grad is None for p in disc.parameters())  # the generator step trains no D weight
    assert torch.isfinite(logs["adaptive_weight"]) and logs["adaptive_weight"] > 0
    before = {n: p.grad.clone() for n, p in ae.named_parameters()}

    for p in disc.parameters():
        p.requires_grad_(True)
    logits_real, logits_fake = disc(torch.cat([x, recon.detach()])).chunk(2)
    d_loss, _ = loss_fn.discriminator(logits_real, logits_fake, LeCamEMA(0.99))
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    for n, p in ae.named_parameters():
        assert torch.equal(p.grad, before[n]), n


def test_adaptive_weight_is_finite_scale_invariant_and_clamped():
    g = torch.Generator().manual_seed(0)
    nll_grad, g_grad = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    a = adaptive_weight(nll_grad, g_grad, 1e4)
    torch.testing.assert_close(a, nll_grad.norm() / (g_grad.norm() + 1e-4))
    # the fp16 path takes gradients of scaled losses; the ratio must not change
    torch.testing.assert_close(adaptive_weight(nll_grad * 1024, g_grad * 1024, 1e4, grad_scale=1024.0), a,
                               rtol=1e-5, atol=0)
    assert adaptive_weight(nll_grad, g_grad * 1e-12, 1e4) == 1e4


@pytest.mark.parametrize("grad_scale", [1.0, 1024.0])
def test_one_pass_gan_loss_equals_the_textbook_two_pass_loss(tiny_cfg, grad_scale):
    """The generator's GAN-phase loss (one backward through LPIPS and D) has the value and
    the gradients of nll + reg + w * g with w from grad(nll) and grad(g) at the last layer,
    as taming/LDM compute it (two backwards through LPIPS and D, then the whole loss)."""
    cfg, ae, disc, loss_fn, x = _setup(tiny_cfg, disc_start=0, disc_weight=0.5, kl_weight=1e-2, rec_l1=1.0,
                                       perceptual_weight=0.5)
    disc.requires_grad_(False)
    last = ae.last_layer()

    def grads(loss):
        ae.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in ae.named_parameters() if p.grad is not None}

    torch.manual_seed(1)
    recon, latent = ae(x)
    ours, logs = loss_fn.generator(x, recon, latent, step=0, disc=disc, last_layer=last, grad_scale=grad_scale)
    ours_grads = grads(ours)

    torch.manual_seed(1)  # the same posterior sample
    recon, latent = ae(x)
    nll = (x - recon).abs().mean() + 0.5 * loss_fn.perceptual(x, recon).mean()
    reg, _ = loss_fn.latent_term(latent, 0, x[0].numel())
    g = hinge_g_loss(disc(recon))
    nll_grad, = torch.autograd.grad(nll, last, retain_graph=True)
    g_grad, = torch.autograd.grad(g, last, retain_graph=True)
    w = 0.5 * (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4 / x[0].numel()).detach()
    textbook = nll + reg + w * g
    textbook_grads = grads(textbook)

    torch.testing.assert_close(logs["adaptive_weight"], w, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours.detach(), textbook.detach(), rtol=1e-6, atol=0)
    assert ours_grads.keys() == textbook_grads.keys() and len(ours_grads) == len(list(ae.parameters()))
    for n in ours_grads:
        torch.testing.assert_close(ours_grads[n], textbook_grads[n], rtol=1e-4, atol=1e-7, msg=n)


def test_adaptive_weight_clamp_has_ldms_meaning_at_any_resolution(tiny_cfg):
    """LDM sums its NLL over the 3*H*W pixel values and clamps the adaptive weight at 1e4; our
    NLL is their mean, so the same clamp on the same model gives our weight = LDM's / (3*H*W)."""
    def weight(max_weight):
        cfg, ae, disc, loss_fn, x = _setup(tiny_cfg, disc_start=0, disc_weight=0.5,
                                           adaptive_weight_max=max_weight)
        disc.requires_grad_(False)
        torch.manual_seed(1)
        recon, latent = ae(x)
        _, logs = loss_fn.generator(x, recon, latent, step=0, disc=disc, last_layer=ae.last_layer())
        return logs["adaptive_weight"].item(), x[0].numel()

    free, pixels = weight(1e30)  # no clamp: 0.5 * LDM's weight / pixels
    ldm_unclamped = free / 0.5 * pixels
    clamp = ldm_unclamped / 2  # a clamp that binds in LDM's units, though not in ours
    assert clamp / pixels < free / 0.5 < clamp
    clamped, _ = weight(clamp)
    assert clamped == pytest.approx(0.5 * clamp / pixels, rel=1e-5)


def test_patch_discriminator_takes_any_width():
    """GroupNorm's group count divides every layer's width (36 -> 72, 144, 288 channels)."""
    for channels in (8, 36, 64, 100):
        disc = PatchDiscriminator(3, channels, 3)
        assert disc(torch.randn(2, 3, 32, 32)).shape[:2] == (2, 1)
        for norm in (m for m in disc.modules() if isinstance(m, torch.nn.GroupNorm)):
            assert norm.num_channels % norm.num_groups == 0 and norm.num_channels // norm.num_groups >= 4
    groups = [m.num_groups for m in PatchDiscriminator(3, 64, 3).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert groups == [32, 32, 32]  # the default width keeps the groups it always had


def test_discriminator_pretrains_before_the_gan_term(tiny_cfg):
    cfg = tiny_cfg("loss.disc_start=100", "loss.disc_pretrain_steps=30")
    loss_fn = AutoencoderLoss(cfg.loss, None)
    assert [loss_fn.disc_active(s) for s in (69, 70, 100)] == [False, True, True]
    assert [loss_fn.gan_active(s) for s in (70, 99, 100)] == [False, False, True]
    off = AutoencoderLoss(tiny_cfg("loss.disc_weight=0").loss, None)
    assert not off.disc_active(10**6) and not off.gan_active(10**6)
