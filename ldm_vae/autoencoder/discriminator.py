"""PatchGAN discriminator (Isola et al. 2017, arXiv:1611.07004), as used by taming/LDM.

Layout follows pix2pix's NLayerDiscriminator (4x4 convs, stride 2, LeakyReLU 0.2, one
logit per patch), with GroupNorm instead of BatchNorm: BatchNorm keeps per-rank running
statistics under DDP (they drift apart without SyncBatchNorm) and mixes real and fake
images when both go through one batch, which the trainer does on purpose (one forward per
backward keeps DDP happy). GroupNorm is per-sample, so batching real+fake is exact.
"""

from __future__ import annotations

from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels: the largest group count under
    that limit that divides `channels` (any width works, e.g. 36 * 4 = 144 -> 24 groups)."""
    limit = max(1, min(32, channels // 4))
    groups = max(g for g in range(1, limit + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for i in range(1, n_layers + 1):
            prev, mult = mult, min(2**i, 8)
            # the last of these keeps stride 1, as in pix2pix: a larger receptive field
            # without shrinking the patch grid further
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       _norm(channels * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x):
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    # pix2pix/taming initialisation: N(0, 0.02) convs, N(1, 0.02) norm scales
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
