"""Fréchet distances: FID on torch-fidelity's Inception, and the same statistics on a domain
feature extractor (written by `ldm-vae train-fd-features`, evaluation/features.py).

A metric whose weights or package are missing is returned as unavailable with the reason,
never as a number.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..errors import UserError


class _Features(nn.Module):
    """Adapts a TorchScript extractor (images in [-1, 1] at its resolution) to torchmetrics."""

    def __init__(self, module: nn.Module, resolution: int, num_features: int):
        super().__init__()
        self.module, self.resolution, self.num_features = module, resolution, num_features

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        x = x01 * 2 - 1
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.module(x).float()


def load_fd_features(path: str | Path) -> tuple[str, nn.Module]:
    """(metric name, module) of a TorchScript extractor written by `ldm-vae train-fd-features`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--fd-features {path} does not exist; train one with `ldm-vae train-fd-features`")
    extra = {"ldm_vae.json": ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as e:  # not a TorchScript archive
        raise UserError(f"--fd-features {path} is not a TorchScript file ({e.__class__.__name__}); "
                        f"train one with `ldm-vae train-fd-features`") from None
    try:
        meta = json.loads(extra["ldm_vae.json"])
        name, resolution, dim = meta["name"], int(meta["resolution"]), int(meta["num_features"])
    except (ValueError, KeyError):
        raise UserError(f"--fd-features {path} has no ldm_vae.json metadata (name, resolution, "
                        f"num_features); write it with `ldm-vae train-fd-features`") from None
    return f"fd_{name}", _Features(module.eval(), resolution, dim)


def build_fid(weights: str | None):
    """(torchmetrics FID metric, None) or (None, reason it is unavailable)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=2048, normalize=True, antialias=False,
                                        feature_extractor_weights_path=weights), None
    except ModuleNotFoundError as e:
        return None, (f"torch-fidelity is not installed ({e}); `pip install torch-fidelity` (it needs a working "
                      f"torchvision) to compute rFID")
    except Exception as e:  # the weight download failed (offline) or the file is unreadable
        where = weights or "the torch hub cache (weights pt_inception-2015-12-05-6726825d.pth)"
        return None, (f"FID Inception weights could not be loaded from {where}: {e.__class__.__name__}: {e}; "
                      f"pass --fid-weights PATH")


def frechet_metric(extractor: nn.Module):
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=extractor, normalize=True)


def frechet_distance(metric, real01: torch.Tensor, fake01: torch.Tensor, batch_size: int = 500) -> float:
    """The Fréchet distance between two image sets in [0, 1] with a torchmetrics FID-style
    metric (reset first; batches moved to the metric's device)."""
    metric.reset()
    for images, real in ((real01, True), (fake01, False)):
        for i in range(0, len(images), batch_size):
            metric.update(images[i:i + batch_size].to(metric.device), real=real)
    return metric.compute().item()


@torch.no_grad()
def images01(dataset, n: int, batch_size: int = 500) -> torch.Tensor:
    """The first n images of `dataset` in [0, 1], as Fréchet metrics take them."""
    loader = DataLoader(Subset(dataset, range(min(n, len(dataset)))), batch_size=batch_size)
    return torch.cat([(b["pixel_values"] + 1) / 2 for b in loader])
