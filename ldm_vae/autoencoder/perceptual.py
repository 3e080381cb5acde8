"""LPIPS perceptual distance (Zhang et al. 2018, arXiv:1801.03924) without torchvision.

This reproduces `lpips.LPIPS(net, version='0.1')` (lpips=True, spatial=False, inputs in
[-1, 1]) exactly; tests/test_perceptual.py checks it against the lpips package itself.

Why not just `import lpips`: lpips imports torchvision, and torchvision's PyPI wheels are
CUDA builds that fail to import against a CPU-only torch; a broken torchvision then also
breaks diffusers and torchmetrics. So the backbones are rebuilt here with torchvision's
`features` layer indices, which lets torchvision checkpoints (vgg16-397923af.pth,
alexnet-owt-7be5be79.pth) load unchanged, and the small linear-head weight files are read
from torchmetrics (a dependency), which ships lpips' v0.1 files byte for byte (their sha256
is checked on load).
"""

from __future__ import annotations

import importlib.util
import urllib.error
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..files import sha256

BACKBONE_FILES = {
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
}
# Indices into torchvision's `features` after which lpips reads a feature map
# (vgg: relu1_2 .. relu5_3; alex: relu1 .. relu5), and the channels there.
_TAPS = {"vgg": (3, 8, 15, 22, 29), "alex": (1, 4, 7, 9, 11)}
_CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}
# The smallest image side each backbone takes up to its last tap: VGG's four 2x2 pools, and
# AlexNet's stride-4 conv and two 3x3 stride-2 pools, each of which needs 3 pixels left.
MIN_SIZE = {"vgg": 16, "alex": 31}
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class LPIPSWeightsMissing(UserError):
    """The ImageNet backbone weights are neither given, cached nor downloadable."""


def _features(net: str) -> nn.Sequential:
    # inplace=False: a tap must keep its value after the next layer has run.
    if net == "vgg":
        layers, cin = [], 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
                cin = v
    else:
        layers = [
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=False),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=False),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2),
        ]
    return nn.Sequential(*layers[: _TAPS[net][-1] + 1])


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a checkpoint, pickled code: all fixable by the user
        raise UserError(f"cannot read weights file {path}: {err}") from err


class LPIPS(nn.Module):
    """Frozen LPIPS v0.1. `forward(x, y)` takes images in [-1, 1] and returns [N] float32."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        if net not in _TAPS:
            raise ValueError(f"LPIPS net must be one of {sorted(_TAPS)}, got {net!r}")
        self.net = net
        # Built on meta and filled from a local generator, so every instance starts from
        # the same random backbone and the global RNG is left alone.
        with torch.device("meta"):
            self.backbone = _features(net)
            self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS[net])
        self.to_empty(device="cpu")
        g = torch.Generator().manual_seed(0)
        for m in self.backbone:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=g)
                nn.init.zeros_(m.bias)
        for head in self.heads:
            nn.init.zeros_(head.weight)
        # lpips' ScalingLayer: [-1, 1] inputs to ImageNet-normalised ones.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), False)
        self.random_backbone = True
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # A loss network: never in training mode, whatever the caller's model does.
        return super().train(False)

    def load_heads(self, state: dict) -> None:
        # lpips' NetLinLayer is Sequential(Dropout, Conv2d): the conv is `model.1`.
        self.heads.load_state_dict({f"{k}.weight": state[f"lin{k}.model.1.weight"] for k in range(5)})

    def load_backbone(self, state: dict, source: str) -> None:
        feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        try:
            self.backbone.load_state_dict(feats)
        except RuntimeError as err:  # missing keys or wrong shapes: another net, or not torchvision's
            detail = " ".join(str(err).split())[:300]  # the CLI prints a UserError as one line
            raise UserError(f"{source} is not a torchvision {self.net} checkpoint: {detail}") from err
        self.random_backbone = False

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out, taps = (x - self.shift) / self.scale, [], _TAPS[self.net]
        for i, layer in enumerate(self.backbone):
            h = layer(h)
            if i in taps:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        total = 0
        taps = zip(self._taps(x), self._taps(y), self.heads)
        # float32 from the normalisation on: in fp16 the sum of squares over 512 channels overflows.
        with torch.autocast(x.device.type, enabled=False):
            for a, b, head in taps:
                a, b = a.float(), b.float()
                a = a / (torch.sqrt(torch.sum(a**2, dim=1, keepdim=True)) + 1e-10)
                b = b / (torch.sqrt(torch.sum(b**2, dim=1, keepdim=True)) + 1e-10)
                total = total + F.conv2d((a - b) ** 2, head.weight.float()).mean(dim=(2, 3))
        return total.flatten()


# sha256 of lpips' weights/v0.1/<net>.pth, which torchmetrics ships unchanged
HEAD_SHA256 = {"vgg": "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
               "alex": "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"}


def _head_file(net: str) -> Path:
    """torchmetrics' copy of lpips' linear heads, found without importing torchmetrics."""
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("LPIPS's linear heads come from the torchmetrics package: pip install torchmetrics")
    path = Path(spec.submodule_search_locations[0]) / "functional" / "image" / "lpips_models" / f"{net}.pth"
    if not path.is_file():
        raise UserError(f"torchmetrics has no {path}; reinstall it: pip install --force-reinstall torchmetrics")
    if sha256(path) != HEAD_SHA256[net]:
        raise UserError(f"{path} is not lpips' v0.1 {net} head file (sha256 differs); reinstall torchmetrics: "
                        f"pip install --force-reinstall torchmetrics")
    return path


def build_lpips(net: str = "vgg", weights: str | None = None, random_backbone: bool = False) -> LPIPS:
    """LPIPS with lpips' v0.1 heads and torchvision ImageNet backbone weights.

    random_backbone=True keeps LPIPS's seed-0 random backbone: for tests only, meaningless as
    a metric. Backbone weights: `weights`, else the torch hub cache, else a download.
    """
    model = LPIPS(net)
    model.load_heads(_load(_head_file(net)))
    if random_backbone:
        return model
    filename, url = BACKBONE_FILES[net]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    path = Path(weights).expanduser() if weights is not None else cache / filename
    if weights is not None and not path.is_file():
        raise UserError(f"LPIPS ({net}) weights file {path} does not exist (expected torchvision's {filename})")
    if path.is_file():
        model.load_backbone(_load(path), str(path))
        return model
    try:
        state = torch.hub.load_state_dict_from_url(
            url, progress=False, map_location="cpu", weights_only=True, check_hash=True
        )
    except (OSError, urllib.error.URLError, RuntimeError) as err:
        raise LPIPSWeightsMissing(
            f"LPIPS ({net}) needs the ImageNet backbone weights {filename}: they are not in {cache} "
            f"and could not be downloaded from {url} ({err}). Download that file and place it in "
            f"{cache}, or give its path with loss.lpips_weights=PATH; or train without the "
            f"perceptual term: loss.perceptual_weight=0 (or loss.lpips_if_missing=skip to do so "
            f"whenever the weights are missing)."
        ) from err
    model.load_backbone(state, url)
    return model
