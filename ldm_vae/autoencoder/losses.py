"""Autoencoder losses: small pure functions, and one object that combines them.

Conventions (stated because the public recipes mix them up):
- Reconstruction terms (L1, L2, LPIPS) are MEANS over pixels and images.
- The KL is the closed-form KL(q(z|x) || N(0, I)) SUMMED over latent dimensions per image
  and averaged over images; that is the value logged as `kl`. In the total loss it is
  divided by the number of pixel values per image (3*H*W). LDM sums its NLL over pixels
  and uses kl_weight 1e-6; dividing both sides by 3*H*W gives our form, so the same
  1e-6 means the same trade-off here, at any resolution.
- A VQ model's latent term is the quantizer's own (codebook + beta * commitment, means
  over latent elements, see quantize.py), added to the loss unweighted.
- A DC model (AutoencoderDC) has no latent term: its latent is deterministic and, as in
  DC-AE (arXiv:2410.10733), unregularised.
- The GAN term is scaled by the adaptive weight of Esser et al. 2021 (arXiv:2012.09841,
  eq. 7), measured at the decoder's last layer in fp32, with one backward through LPIPS
  and the discriminator per step, not two (`AutoencoderLoss._adaptive_gan_loss`). With
  our mean NLL the weight is LDM's (summed NLL) divided by 3*H*W, and so is its clamp:
  `loss.adaptive_weight_max` keeps LDM's meaning (1e4) at any resolution.

The loss object exposes `generator(...)` and `discriminator(...)`, each returning
`(loss, logs)` with detached scalar logs; it never logs or steps anything itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LossConfig
from .models import DCLatent
from .quantize import QuantizerOutput


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(N(mean, exp(logvar)) || N(0, 1)) per element (same shape as mean)."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_with_free_bits(kl_map: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Per-image KL sum for the loss, with a per-channel floor of `free_bits` nats per position.

    Free bits (Kingma et al. 2016, arXiv:1606.04934): the KL of each latent channel,
    averaged over the batch and positions, is not pushed below the floor, which keeps
    channels from collapsing onto the prior. The floor stops the gradient, not the value.
    """
    n, c, h, w = kl_map.shape
    if free_bits <= 0:
        return kl_map.sum(dim=(1, 2, 3)).mean()
    per_channel = kl_map.mean(dim=(0, 2, 3))
    return per_channel.clamp(min=free_bits).sum() * h * w


def equivariance_loss(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the decoding of a transformed latent and the transformed image
    (Skorokhodov et al. 2025, arXiv:2502.14831): 0 for an equivariant autoencoder."""
    return (decoded.float() - target.float()).abs().mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    # -log sigmoid(real) - log(1 - sigmoid(fake)), written with softplus for stability
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def vanilla_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    # the non-saturating form: -log sigmoid(fake) (Goodfellow et al. 2014, sec. 3)
    return F.softplus(-logits_fake).mean()


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
G_LOSSES = {"hinge": hinge_g_loss, "vanilla": vanilla_g_loss}


def adaptive_weight(nll_grad: torch.Tensor, g_grad: torch.Tensor, max_weight: float,
                    grad_scale: float = 1.0) -> torch.Tensor:
    """||grad nll|| / (||grad g|| + 1e-4), clamped to [0, max_weight], in fp32, from the two
    losses' gradients at the last layer.

    Under fp16 both gradients are of losses multiplied by the loss scaler's scale (so the
    fp16 backward does not underflow to zero); `grad_scale` is that scale and the ratio is
    the same.
    """
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4 * grad_scale)
    return weight.clamp(0.0, max_weight).detach()


def lecam_reg(logits_real: torch.Tensor, logits_fake: torch.Tensor,
              ema_real: torch.Tensor, ema_fake: torch.Tensor) -> torch.Tensor:
    """LeCam regularisation (Tseng et al. 2021, arXiv:2104.03310, eq. 3)."""
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


class LeCamEMA(nn.Module):
    """EMA of the discriminator's mean outputs, kept as buffers so checkpoints carry them.

    The trainer passes means that are already averaged over processes, so every rank
    holds the same values.
    """

    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("real", torch.zeros(()))
        self.register_buffer("fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, mean_real: torch.Tensor, mean_fake: torch.Tensor) -> None:
        # a non-finite step (which the trainer skips) must not poison the averages
        for ema, value in ((self.real, mean_real), (self.fake, mean_fake)):
            value = value.float()
            ema.copy_(torch.where(torch.isfinite(value), torch.lerp(ema, value, 1 - self.decay), ema))


class AutoencoderLoss:
    """Reconstruction + LPIPS + latent term (KL, VQ or none) + adaptive-weighted PatchGAN loss."""

    def __init__(self, cfg: LossConfig, perceptual: nn.Module | None, equivariance_weight: float = 0.0):
        self.cfg = cfg
        # diffusability.scale_equivariance: a latent regulariser, so outside the adaptive weight's NLL
        self.equivariance_weight = equivariance_weight
        # None when the perceptual term is off or skipped (see autoencoder/train.py, build_perceptual)
        self.perceptual = perceptual
        self.g_adv = G_LOSSES[cfg.disc_loss]
        self.d_adv = D_LOSSES[cfg.disc_loss]

    def gan_active(self, step: int) -> bool:
        """Whether the GAN term is in the autoencoder's loss at `step`."""
        return self.cfg.disc_weight > 0 and step >= self.cfg.disc_start

    def disc_active(self, step: int) -> bool:
        """Whether the discriminator trains at `step` (from disc_start - disc_pretrain_steps)."""
        return self.cfg.disc_weight > 0 and step >= self.cfg.disc_start - self.cfg.disc_pretrain_steps

    def kl_weight(self, step: int) -> float:
        if self.cfg.kl_warmup_steps <= 0:
            return self.cfg.kl_weight
        return self.cfg.kl_weight * min(1.0, step / self.cfg.kl_warmup_steps)

    def latent_term(self, latent, step: int, pixels: int) -> tuple[torch.Tensor, dict]:
        """KL (for a `GaussianLatent`, plus its equivariance term if it carries one), the
        quantizer's loss (for a `QuantizerOutput`) or nothing (for a `DCLatent`: zero, no logs)."""
        if isinstance(latent, QuantizerOutput):
            return latent.loss, dict(latent.logs)
        if isinstance(latent, DCLatent):
            return torch.zeros((), device=latent.latent.device), {}
        kl_map = kl_divergence(latent.mean, latent.logvar)
        logs = {"kl": kl_map.sum(dim=(1, 2, 3)).mean()}
        loss = self.kl_weight(step) * kl_with_free_bits(kl_map, self.cfg.free_bits) / pixels
        if latent.equivariance is not None:
            eq = equivariance_loss(*latent.equivariance)
            loss = loss + self.equivariance_weight * eq
            logs["equivariance"] = eq
        return loss, logs

    def generator(self, x: torch.Tensor, recon: torch.Tensor, latent, step: int,
                  disc: nn.Module | None = None, last_layer: torch.Tensor | None = None,
                  grad_scale: float = 1.0):
        """The autoencoder's loss; `latent` is what the training wrapper returned next to
        `recon`. `disc` must be frozen (no parameter requires grad)."""
        cfg = self.cfg
        x, recon_f = x.float(), recon.float()
        l1 = (x - recon_f).abs().mean()
        l2 = (x - recon_f).pow(2).mean()
        nll = cfg.rec_l1 * l1 + cfg.rec_l2 * l2
        logs = {"l1": l1, "l2": l2}
        if self.perceptual is not None and cfg.perceptual_weight > 0:
            p = self.perceptual(x, recon_f).mean()
            nll = nll + cfg.perceptual_weight * p
            logs["lpips"] = p
        pixels = x[0].numel()  # 3*H*W: what turns LDM's per-image sums into our means
        reg, reg_logs = self.latent_term(latent, step, pixels)
        loss = nll + reg
        logs.update(reg_logs)
        logs["nll"] = nll
        if self.gan_active(step):
            assert disc is not None and last_layer is not None
            g = self.g_adv(disc(recon).float())
            weight = cfg.disc_weight
            if cfg.adaptive_weight:
                loss, weight = self._adaptive_gan_loss(recon, nll, reg, g, last_layer, grad_scale, pixels)
            else:
                loss = loss + weight * g
            logs["g_adv"] = g
            logs["adaptive_weight"] = torch.as_tensor(weight, dtype=torch.float32)
        logs["loss"] = loss
        return loss, {k: v.detach() for k, v in logs.items()}

    def _adaptive_gan_loss(self, recon, nll, reg, g, last_layer, grad_scale, pixels):
        """(loss, weight) for nll + reg + weight * g with the adaptive weight, where the
        loss's value is that sum and its gradient is the sum's gradient, computed with ONE
        backward through LPIPS and the discriminator instead of two.

        The public recipes take grad(nll) and grad(g) at the last layer (two backwards through
        LPIPS and the discriminator), then backward the whole loss (both again). Here the
        gradients of nll and g with respect to the reconstruction are taken once; the last
        layer's gradients follow from them through the output convolution alone; and the
        returned loss's backward starts from their weighted sum at the reconstruction.
        """
        # No retain_graph: the LPIPS and discriminator graphs are done with after this.
        nll_at_recon, = torch.autograd.grad(nll * grad_scale, recon)
        g_at_recon, = torch.autograd.grad(g * grad_scale, recon)
        nll_grad, = torch.autograd.grad(recon, last_layer, nll_at_recon, retain_graph=True)
        g_grad, = torch.autograd.grad(recon, last_layer, g_at_recon, retain_graph=True)
        # the clamp in our units: LDM's weight (of a NLL summed over `pixels` values) / pixels
        max_weight = self.cfg.adaptive_weight_max / pixels
        weight = self.cfg.disc_weight * adaptive_weight(nll_grad, g_grad, max_weight, grad_scale)
        at_recon = (nll_at_recon.float() + weight * g_at_recon.float()) / grad_scale
        surrogate = reg + (recon.float() * at_recon).sum()  # its gradient is the full loss's
        value = (nll + reg + weight * g).detach()
        return surrogate + (value - surrogate.detach()), weight

    def discriminator(self, logits_real: torch.Tensor, logits_fake: torch.Tensor, lecam: LeCamEMA | None = None):
        """The discriminator's loss on logits of real images and DETACHED reconstructions."""
        logits_real, logits_fake = logits_real.float(), logits_fake.float()
        loss = self.d_adv(logits_real, logits_fake)
        logs = {"d_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        if lecam is not None and self.cfg.lecam_weight > 0:
            reg = lecam_reg(logits_real, logits_fake, lecam.real, lecam.fake)
            loss = loss + self.cfg.lecam_weight * reg
            logs["lecam"] = reg
        return loss, {k: v.detach() for k, v in logs.items()}
