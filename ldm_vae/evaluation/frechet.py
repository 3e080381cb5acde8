"""Fréchet distances: FID on torch-fidelity's Inception, and the same statistics on a domain
feature extractor (written by `ldm-vae train-fd-features`, evaluation/features.py).

Every distance comes with a bootstrap interval, and the real images' features are cached
(`ReferenceFeatures`): a later eval of the same images with the same network reuses them.
A metric whose weights or package are missing is returned as unavailable with the reason,
never as a number.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid
from tqdm.auto import tqdm

from ..errors import UserError
from ..files import sha256
from .features import FeatureExtractor

logger = logging.getLogger(__name__)


@dataclass
class Frechet:
    """One Fréchet metric: its name in reports, its network (images in [0, 1] -> features)
    and how it is made (`protocol`, for metrics.json: two runs compare when these agree)."""

    name: str
    network: nn.Module
    protocol: dict

    def to(self, device) -> Frechet:
        self.network.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters(), torch.empty(0)).device

    @torch.no_grad()
    def features(self, x01: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """[N, D] float64 features on the CPU, in batches on the network's device."""
        return torch.cat([self.network(x01[i:i + batch_size].to(self.device)).double().cpu()
                          for i in range(0, len(x01), batch_size)])


class _Features(nn.Module):
    """A domain extractor (images in [-1, 1] at its resolution) as a network on [0, 1] images."""

    def __init__(self, module: nn.Module, resolution: int, num_features: int):
        super().__init__()
        self.module, self.resolution, self.num_features = module, resolution, num_features

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        x = x01 * 2 - 1
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.module(x).float()


def exact_uint8(x01: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> uint8 by rounding, so a dataset pixel k (stored as k / 127.5 - 1)
    comes back as k. torchmetrics' FID with normalize=True feeds `(x * 255).byte()`, which
    truncates: 63 of the 256 grey levels land just below k in float32 and become k - 1."""
    return x01.mul(255).round().clamp(0, 255).to(torch.uint8)


class _Uint8(nn.Module):
    """torchmetrics' FID network (torch-fidelity's Inception, which takes uint8 images) on
    images in [0, 1], handed exact uint8 pixels."""

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.inception(exact_uint8(x01))


# torch-fidelity's Inception weights (the TF1 FID network), as torch hub caches them
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def inception_weights_path(weights: str | None = None) -> Path:
    return Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


STATISTICS = ("float64 mean and covariance (n - 1) of the features, distance as torchmetrics' FID; ci95: basic "
              "bootstrap interval (2 FD - the 97.5th and 2.5th percentiles of FD over resamples of both image sets "
              "with replacement): it brackets the distance between the two distributions, which FD on a finite "
              "set overestimates")


def fid_protocol(weights: str | None) -> dict:
    """How rFID is made here, for metrics.json."""
    path = inception_weights_path(weights)
    return {"network": "torch-fidelity InceptionV3 (TF1 FID graph), 2048-d pool features",
            "weights": str(path), "weights_sha256": sha256(path) if path.is_file() else None,
            "input": "uint8, rounded from [0, 1] (a dataset pixel k is fed as k)",
            "resize": "299x299 bilinear, TF1-style, antialias off (torch-fidelity)",
            "statistics": STATISTICS}


def build_fid(weights: str | None):
    """(the rFID metric, None) or (None, reason it is unavailable)."""
    try:
        inception = FrechetInceptionDistance(feature=2048, antialias=False,
                                             feature_extractor_weights_path=weights).inception
    except ModuleNotFoundError as e:
        return None, (f"torch-fidelity is not installed ({e}); `pip install torch-fidelity` (it needs a working "
                      f"torchvision) to compute rFID")
    except Exception as e:  # the weight download failed (offline) or the file is unreadable
        where = weights or f"the torch hub cache ({inception_weights_path()})"
        return None, (f"FID Inception weights could not be loaded from {where}: {e.__class__.__name__}: {e}; "
                      f"pass --fid-weights PATH")
    return Frechet("rfid", _Uint8(inception), fid_protocol(weights)), None


def load_fd_features(path: str | Path) -> Frechet:
    """The domain Fréchet metric `fd_<name>` of an extractor folder written by
    `ldm-vae train-fd-features`."""
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
    name = f"fd_{model.name}"
    protocol = {"network": f"{name} (ldm-vae train-fd-features), {model.num_features}-d features",
                "weights": str(path / "model.safetensors"), "weights_sha256": sha256(path / "model.safetensors"),
                "input": "float in [-1, 1]",
                "resize": f"bilinear with antialias to {model.resolution}x{model.resolution} where the images differ",
                "statistics": STATISTICS}
    return Frechet(name, _Features(model.eval(), model.resolution, model.num_features), protocol)


# ==============================================================================================
# Distances and their bootstrap intervals
# ==============================================================================================


def _gaussian(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = f.mean(0)
    centred = f - mean
    return mean, centred.T @ centred / (len(f) - 1)


def fd_of_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The Fréchet distance between two [N, D] feature sets (float64), as torchmetrics' FID."""
    return _compute_fid(*_gaussian(real.double()), *_gaussian(fake.double())).item()


def _fd_symmetric(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The same distance with tr (S1 S2)^1/2 = tr (R S2 R)^1/2, R = S1^1/2: two symmetric
    eigendecompositions instead of the general eigenvalues of S1 S2 (about 2x faster for
    2048-d features on a CPU), for the bootstrap's many resamples."""
    (m1, s1), (m2, s2) = _gaussian(real), _gaussian(fake)
    w, v = torch.linalg.eigh(s1)
    root = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root @ s2 @ root).clamp_min(0).sqrt().sum()
    return ((m1 - m2).square().sum() + s1.trace() + s2.trace() - 2 * cross).item()


def frechet_result(real: torch.Tensor, fake: torch.Tensor, bootstrap: int, seed: int = 0,
                   device: torch.device | str = "cpu") -> dict:
    """{"value": FD, "ci95": [low, high] or None}: the basic bootstrap interval over `bootstrap`
    resamples of both sets (with replacement; the same draws on any `device`), 0 for none. The
    resamples run on `device`: each costs two 2048 x 2048 eigendecompositions for Inception
    features, seconds on a CPU and a fraction of one on a GPU."""
    value = fd_of_features(real, fake)
    if bootstrap <= 0:
        return {"value": value, "ci95": None}
    g = torch.Generator().manual_seed(seed)
    real, fake = real.double().to(device), fake.double().to(device)
    reps = []
    for _ in tqdm(range(bootstrap), desc=f"bootstrap ({real.shape[1]}-d features)", leave=False,
                  disable=real.shape[1] < 512):
        r, f = (torch.randint(len(x), (len(x),), generator=g).to(x.device) for x in (real, fake))
        reps.append(_fd_symmetric(real[r], fake[f]))
    low, high = torch.quantile(torch.tensor(reps, dtype=torch.float64),
                               torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"value": value, "ci95": [max(2 * value - high, 0.0), 2 * value - low]}


def frechet_distance(metric: Frechet, real01: torch.Tensor, fake01: torch.Tensor, bootstrap: int = 0,
                     seed: int = 0) -> dict:
    """frechet_result of two image sets in [0, 1] (the resamples on the network's device)."""
    return frechet_result(metric.features(real01), metric.features(fake01), bootstrap, seed, metric.device)


# ==============================================================================================
# Cached reference features
# ==============================================================================================


def reference_cache_dir() -> Path:
    """$LDM_VAE_CACHE, else $XDG_CACHE_HOME/ldm-vae (~/.cache/ldm-vae), + frechet-reference."""
    root = os.environ.get("LDM_VAE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "ldm-vae"
    return Path(root).expanduser() / "frechet-reference"


class ReferenceFeatures:
    """The real images' features of one Fréchet metric, computed once per (images, network).

    The file is found by `key` (what defines the images: data settings, split, count; and the
    network's protocol with its weights' sha256). The images themselves are fingerprinted as
    they stream by (the sha256 of each image's exact uint8 pixels, then the sha256 of those
    digests in order: the same however the images are batched or split over processes); a
    cached file whose fingerprint differs (the data changed under the same settings) is
    recomputed, never used. `add` takes a batch; `observe` and `take` are its two halves, for
    batches measured on other processes (`observe` there, `take` here, in order).
    """

    def __init__(self, metric: Frechet, key: dict, cache_dir: str | Path | None = None):
        self.metric = metric
        key = {**key, "metric": metric.name, "protocol": metric.protocol, "images_sha256": "per image"}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
        self.path = Path(cache_dir or reference_cache_dir()) / f"{metric.name}-{digest}.safetensors"
        self.key = key
        self.cached = None
        if self.path.is_file():
            try:
                self.cached = load_file(self.path)
            except (OSError, SafetensorError) as e:  # a truncated or foreign file: recompute and replace it
                logger.warning("ignoring unreadable cached reference %s (%s)", self.path, e)
        self._fingerprint = hashlib.sha256()
        self._parts: list[torch.Tensor] = []
        self.source = None

    def add(self, x01: torch.Tensor) -> None:
        self.take(*self.observe(x01))

    def observe(self, x01: torch.Tensor) -> tuple[bytes, torch.Tensor | None]:
        """A batch's share of `add`: each image's sha256, and its features unless a cached file
        is there to be checked first."""
        digests = b"".join(hashlib.sha256(image.tobytes()).digest() for image in exact_uint8(x01).cpu().numpy())
        return digests, None if self.cached is not None else self.metric.features(x01).cpu()

    def take(self, digests: bytes, features: torch.Tensor | None) -> None:
        self._fingerprint.update(digests)
        if features is not None:
            self._parts.append(features)

    def finish(self, again: Callable[[], Iterable[torch.Tensor]]) -> torch.Tensor:
        """The features of every image added; `again` yields the same images once more, for
        the rare case that a cached file turns out to be of other images."""
        fingerprint = self._fingerprint.hexdigest()
        if self.cached is not None:
            if self.cached["images_sha256"].numpy().tobytes().hex() == fingerprint:
                self.source = "cached"
                return self.cached["features"]
            logger.warning("%s: the cached reference features in %s are of other images (the data changed); "
                           "recomputing them", self.metric.name, self.path)
            self._parts = [self.metric.features(x01).cpu() for x01 in again()]
        features = torch.cat(self._parts)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".tmp-{os.getpid()}-{self.path.name}")
        try:
            save_file({"features": features, "images_sha256": torch.frombuffer(bytearray.fromhex(fingerprint),
                                                                             dtype=torch.uint8)},
                      tmp, metadata={"key": json.dumps(self.key, default=str)})
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only or full cache costs a recomputation next time, nothing else
            tmp.unlink(missing_ok=True)
            logger.warning("could not cache the reference features in %s (%s)", self.path, e)
        self.source = "computed"
        return features

    def record(self) -> dict:
        """What metrics.json says about the reference."""
        return {"source": self.source, "file": str(self.path), "images_sha256": self._fingerprint.hexdigest()}


def reference_features(metric: Frechet, real01: torch.Tensor, key: dict, cache_dir: str | Path | None = None,
                       batch_size: int = 500) -> torch.Tensor:
    """The features of the image set `real01` (in [0, 1]) through the reference cache: the same
    file `eval` writes and reads for these images, so they are computed once."""
    reference = ReferenceFeatures(metric, key, cache_dir)

    def batches():
        return iter(real01.split(batch_size))

    for x01 in batches():
        reference.add(x01)
    return reference.finish(batches)


@torch.no_grad()
def images01(dataset, n: int, batch_size: int = 500) -> torch.Tensor:
    """The first n images of `dataset` in [0, 1], as Fréchet metrics take them."""
    loader = DataLoader(Subset(dataset, range(min(n, len(dataset)))), batch_size=batch_size)
    return torch.cat([(b["pixel_values"] + 1) / 2 for b in loader])
