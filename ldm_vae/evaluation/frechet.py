"""Fréchet distances: FID on torch-fidelity's Inception, and the same statistics on a domain
feature extractor (written by `ldm-vae train-fd-features`, evaluation/features.py).

A metric whose weights or package are missing is returned as unavailable with the reason,
never as a number.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchmetrics.image.fid import FrechetInceptionDistance

from ..errors import UserError
from ..files import sha256
from .features import FeatureExtractor


class _Features(nn.Module):
    """Adapts a feature extractor (images in [-1, 1] at its resolution) to torchmetrics."""

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
    """(metric name, module) of an extractor folder written by `ldm-vae train-fd-features`."""
    path = Path(path)
    retrain = "train one with `ldm-vae train-fd-features`"
    if path.is_file():
        raise UserError(f"--fd-features {path} is a file: extractors are now folders (safetensors weights + "
                        f"config.json; the single TorchScript files of earlier versions are not read, as torch "
                        f"deprecates TorchScript); {retrain}")
    if not (path / "config.json").is_file():
        raise UserError(f"--fd-features {path} is not an extractor folder (no config.json); {retrain}")
    try:
        model = FeatureExtractor.from_pretrained(str(path))
    except Exception as e:  # a config or weights file that does not fit the extractor
        raise UserError(f"--fd-features {path} could not be loaded ({e.__class__.__name__}: {e}); {retrain}") from None
    return f"fd_{model.name}", _Features(model.eval(), model.resolution, model.num_features)


def exact_uint8(x01: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> uint8 by rounding, so a dataset pixel k (stored as k / 127.5 - 1)
    comes back as k. torchmetrics' FID with normalize=True feeds `(x * 255).byte()`, which
    truncates: 63 of the 256 grey levels land just below k in float32 and become k - 1."""
    return x01.mul(255).round().clamp(0, 255).to(torch.uint8)


class RoundedFID(FrechetInceptionDistance):
    """torchmetrics' FID taking images in [0, 1] and handing Inception exact uint8 pixels."""

    def update(self, imgs: torch.Tensor, real: bool) -> None:
        super().update(exact_uint8(imgs), real)


# torch-fidelity's Inception weights (the TF1 FID network), as torch hub caches them
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def inception_weights_path(weights: str | None = None) -> Path:
    return Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def fid_protocol(weights: str | None) -> dict:
    """How rFID is made here, for metrics.json: two runs are comparable when these agree."""
    path = inception_weights_path(weights)
    return {"network": "torch-fidelity InceptionV3 (TF1 FID graph), 2048-d pool features",
            "weights": str(path), "weights_sha256": sha256(path) if path.is_file() else None,
            "input": "uint8, rounded from [0, 1] (a dataset pixel k is fed as k)",
            "resize": "299x299 bilinear, TF1-style, antialias off (torch-fidelity)",
            "statistics": "float64 mean and covariance (torchmetrics FrechetInceptionDistance)"}


def fd_protocol(path: str | Path, name: str, extractor: nn.Module) -> dict:
    return {"network": f"{name} (ldm-vae train-fd-features), {extractor.num_features}-d features",
            "weights": str(Path(path) / "model.safetensors"),
            "weights_sha256": sha256(Path(path) / "model.safetensors"),
            "input": "float in [-1, 1]",
            "resize": f"bilinear with antialias to {extractor.resolution}x{extractor.resolution} where the images "
                      f"differ",
            "statistics": "float64 mean and covariance (torchmetrics FrechetInceptionDistance)"}


def build_fid(weights: str | None):
    """(torchmetrics FID metric, None) or (None, reason it is unavailable)."""
    try:
        return RoundedFID(feature=2048, normalize=False, antialias=False,
                          feature_extractor_weights_path=weights), None
    except ModuleNotFoundError as e:
        return None, (f"torch-fidelity is not installed ({e}); `pip install torch-fidelity` (it needs a working "
                      f"torchvision) to compute rFID")
    except Exception as e:  # the weight download failed (offline) or the file is unreadable
        where = weights or f"the torch hub cache ({inception_weights_path()})"
        return None, (f"FID Inception weights could not be loaded from {where}: {e.__class__.__name__}: {e}; "
                      f"pass --fid-weights PATH")


def frechet_metric(extractor: nn.Module):
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
