"""Tests for ldm_vae.perceptual (LPIPS without torchvision).

Every test uses RANDOM backbones (no ImageNet weights are available offline): the numbers
are meaningless as a perceptual metric; the tests check the computation, not its quality.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import types
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_vae.autoencoder.perceptual import (
    BACKBONE_FILES,
    HEAD_SHA256,
    LPIPS,
    LPIPSWeightsMissing,
    _head_file,
    build_lpips,
)
from ldm_vae.errors import UserError

SIZE = {"vgg": 32, "alex": 64}  # vgg: 4 poolings before relu5_3; alex: stride-4 stem


def _images(net: str, n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, SIZE[net], SIZE[net])
    return torch.rand(shape, generator=g) * 2 - 1, torch.rand(shape, generator=g) * 2 - 1


def _reference_lpips(net: str, ours: LPIPS, monkeypatch: pytest.MonkeyPatch):
    """The lpips package's own LPIPS v0.1, with the same random backbone as `ours`.

    Where torchvision is missing or broken (so `import lpips` fails), a fake torchvision
    hands lpips OUR backbone: lpips `add_module`s those very layer objects into its slices.
    """
    try:
        import lpips
    except Exception:  # torchvision missing, or a CUDA wheel failing against CPU torch
        for name in [m for m in sys.modules if m.split(".")[0] in ("lpips", "torchvision")]:
            monkeypatch.delitem(sys.modules, name)
        models = types.ModuleType("torchvision.models")
        models.vgg16 = lambda pretrained=False, **kw: types.SimpleNamespace(features=ours.backbone)
        models.alexnet = lambda pretrained=False, **kw: types.SimpleNamespace(features=ours.backbone)
        tv = types.ModuleType("torchvision")
        tv.models = models
        monkeypatch.setitem(sys.modules, "torchvision", tv)
        monkeypatch.setitem(sys.modules, "torchvision.models", models)
        import lpips

        # This lpips holds the fake torchvision: re-register its modules through
        # monkeypatch (as absent before) so that they are dropped after the test.
        for name in [m for m in sys.modules if m.split(".")[0] == "lpips"]:
            monkeypatch.setitem(sys.modules, name, sys.modules.pop(name))
        theirs = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        assert theirs.net.slice1[0] is ours.backbone[0]
        return theirs
    theirs = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    # A real torchvision built its own random backbone: copy it into ours.
    state = {k.split(".", 1)[1]: v for k, v in theirs.net.state_dict().items()}
    ours.backbone.load_state_dict(state)
    return theirs


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_matches_lpips_package(net, monkeypatch):
    """Same numbers as lpips.LPIPS(net, version='0.1'); random backbone, real heads."""
    ours = build_lpips(net, random_backbone=True)
    theirs = _reference_lpips(net, ours, monkeypatch)
    x, y = _images(net)
    with torch.no_grad():
        expected = theirs(x, y).flatten()
        got = ours(x, y)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert (got > 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_zero_for_identical_images(net):
    """Random backbone: only the zero / nonzero structure is meaningful here."""
    model = build_lpips(net, random_backbone=True)
    x, y = _images(net)
    with torch.no_grad():
        assert model(x, x).abs().max() < 1e-7
        assert (model(x, y) > 0).all()


def test_frozen_but_differentiable_in_inputs():
    """Random backbone. The module never trains, yet is usable as a loss."""
    model = build_lpips("vgg", random_backbone=True)
    assert all(not p.requires_grad for p in model.parameters())
    assert model.train() is model and not model.training
    assert not any(m.training for m in model.modules())
    x, y = _images("vgg", n=2)
    x.requires_grad_()
    model(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_channels_last_inputs_give_the_same_distance_and_input_gradient():
    """Under train.channels_last LPIPS gets channels_last images (the layout then runs through
    its convolutions): same values and input gradients as contiguous ones, on images of full
    amplitude (near-flat ones make LPIPS's float32 gradient ill-conditioned in any layout)."""
    model = build_lpips("vgg", random_backbone=True)
    x, y = _images("vgg", n=2)
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        xi = x.clone().contiguous(memory_format=memory_format).requires_grad_()
        d = model(xi, y.contiguous(memory_format=memory_format))
        d.sum().backward()
        results.append((d.detach(), xi.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=0)
    grad_error = (results[1][1] - results[0][1]).norm() / results[0][1].norm()
    assert grad_error < 5e-5, grad_error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_under_autocast(dtype):
    """Random backbone. Normalisation and heads run in float32 even under autocast."""
    model = build_lpips("alex", random_backbone=True)
    x, y = _images("alex")
    with torch.no_grad():
        full = model(x, y)
        with torch.autocast("cpu", dtype=dtype):
            low = model(x, y)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, rtol=0.05, atol=1e-3)


def test_random_backbone_is_deterministic_and_leaves_global_rng_alone():
    """Two random-backbone builds are identical; the global RNG does not move."""
    rng = torch.get_rng_state()
    a, b = build_lpips("alex", random_backbone=True), build_lpips("alex", random_backbone=True)
    assert torch.equal(rng, torch.get_rng_state())
    assert a.random_backbone and b.random_backbone
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


def test_missing_backbone_weights_say_how_to_fix(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(LPIPSWeightsMissing) as err:
        build_lpips("vgg")
    msg = str(err.value)
    filename, url = BACKBONE_FILES["vgg"]
    cache = str(tmp_path / "checkpoints")
    for part in (filename, cache, url, "loss.perceptual_weight", "loss.lpips_weights", "lpips_if_missing"):
        assert part in msg
    assert isinstance(err.value, UserError)

    missing = tmp_path / "nowhere" / "vgg16.pth"
    with pytest.raises(UserError, match="nowhere"):
        build_lpips("vgg", weights=str(missing))


def test_heads_are_lpips_files_from_torchmetrics_checked_by_sha256(monkeypatch, tmp_path):
    """The heads come from torchmetrics' copy of lpips' files (byte-identical: same bytes as
    the lpips package's, where it is installed); a missing or altered file is a clear error."""
    for net in ("vgg", "alex"):
        ours = _head_file(net)
        assert "torchmetrics" in ours.parts and hashlib.sha256(ours.read_bytes()).hexdigest() == HEAD_SHA256[net]
        lpips_spec = importlib.util.find_spec("lpips")
        if lpips_spec is not None:
            theirs = Path(lpips_spec.submodule_search_locations[0]) / "weights" / "v0.1" / f"{net}.pth"
            assert theirs.read_bytes() == ours.read_bytes()
    find_spec = importlib.util.find_spec
    fake = tmp_path / "torchmetrics"
    (fake / "functional" / "image" / "lpips_models").mkdir(parents=True)
    spec = types.SimpleNamespace(submodule_search_locations=[str(fake)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: spec if n == "torchmetrics" else find_spec(n, *a))
    with pytest.raises(UserError, match="torchmetrics has no .*alex.pth"):
        build_lpips("alex", random_backbone=True)
    altered = bytearray(ours.read_bytes())  # the real alex file, one byte changed
    altered[-1] ^= 1
    (fake / "functional" / "image" / "lpips_models" / "alex.pth").write_bytes(bytes(altered))
    with pytest.raises(UserError, match="sha256 differs"):
        build_lpips("alex", random_backbone=True)


def _torchvision_features(net: str) -> list[tuple[str, tuple]]:
    """torchvision's `vgg16().features` / `alexnet().features`, written out here from
    torchvision/models/vgg.py (cfg "D") and alexnet.py, so that our stack is compared with
    an independent description: (name, ("conv", in, out, kernel, stride, padding) |
    ("relu",) | ("pool", kernel, stride)); list index = torchvision's `features` index."""
    def conv(cin, cout, k, s, p):
        return ("conv", cin, cout, (k, k), (s, s), (p, p))

    if net == "vgg":
        layers, cin = [], 3
        for b, (width, n) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], 1):
            for j in range(1, n + 1):
                layers += [(f"conv{b}_{j}", conv(cin, width, 3, 1, 1)), (f"relu{b}_{j}", ("relu",))]
                cin = width
            layers.append((f"pool{b}", ("pool", 2, 2)))
        return layers
    return [("conv1", conv(3, 64, 11, 4, 2)), ("relu1", ("relu",)), ("pool1", ("pool", 3, 2)),
            ("conv2", conv(64, 192, 5, 1, 2)), ("relu2", ("relu",)), ("pool2", ("pool", 3, 2)),
            ("conv3", conv(192, 384, 3, 1, 1)), ("relu3", ("relu",)),
            ("conv4", conv(384, 256, 3, 1, 1)), ("relu4", ("relu",)),
            ("conv5", conv(256, 256, 3, 1, 1)), ("relu5", ("relu",)), ("pool5", ("pool", 3, 2))]


# Where lpips/pretrained_networks.py ends its five slices (the feature maps LPIPS compares).
LPIPS_TAPS = {"vgg": ["relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"],
              "alex": ["relu1", "relu2", "relu3", "relu4", "relu5"]}


def _tap_indices(net: str) -> list[int]:
    names = [name for name, _ in _torchvision_features(net)]
    return [names.index(t) for t in LPIPS_TAPS[net]]


def _describe(m: nn.Module) -> tuple:
    """Our layer in the spec's terms; the settings torchvision leaves at their defaults
    (dilation, groups, bias, padding mode, pool padding, ceil_mode) are asserted here."""
    if isinstance(m, nn.Conv2d):
        assert m.dilation == (1, 1) and m.groups == 1 and m.bias is not None and m.padding_mode == "zeros"
        return ("conv", m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
    if isinstance(m, nn.MaxPool2d):
        assert m.padding == 0 and m.dilation == 1 and not m.ceil_mode
        return ("pool", m.kernel_size, m.stride)
    assert type(m) is nn.ReLU, m
    return ("relu",)


def _torchvision_state(net: str, seed: int = 7) -> dict[str, torch.Tensor]:
    """A stand-in for torchvision's checkpoint: random values under its keys and shapes,
    built from the spec (not from our model), He-scaled so 13 layers stay finite."""
    g, state = torch.Generator().manual_seed(seed), {}
    for i, (_, d) in enumerate(_torchvision_features(net)):
        if d[0] == "conv":
            fan_in = d[1] * d[3][0] * d[3][1]
            state[f"features.{i}.weight"] = torch.randn(d[2], d[1], *d[3], generator=g) * (2 / fan_in) ** 0.5
            state[f"features.{i}.bias"] = torch.randn(d[2], generator=g) * 0.1
    state["classifier.0.weight"] = torch.randn(4, 8, generator=g)  # the rest of a real file: ignored
    return state


def _reference_taps(net: str, state: dict, h: torch.Tensor) -> list[torch.Tensor]:
    """The LPIPS feature maps, computed functionally from the state dict with torchvision's
    strides, paddings and pools."""
    out, taps = [], _tap_indices(net)
    for i, (_, d) in enumerate(_torchvision_features(net)[: taps[-1] + 1]):
        if d[0] == "conv":
            h = F.conv2d(h, state[f"features.{i}.weight"], state[f"features.{i}.bias"], stride=d[4], padding=d[5])
        elif d[0] == "relu":
            h = F.relu(h)
        else:
            h = F.max_pool2d(h, d[1], d[2])
        if i in taps:
            out.append(h)
    return out


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_backbone_has_torchvision_layout(net):
    """Layer by layer (kind, channels, kernel, stride, padding, pool), up to the last LPIPS tap,
    and the parameters under torchvision's `features.N.weight/bias` keys with its shapes."""
    ours = LPIPS(net).backbone
    spec = _torchvision_features(net)[: _tap_indices(net)[-1] + 1]
    assert [_describe(m) for m in ours] == [d for _, d in spec]
    expected = {}
    for i, (_, d) in enumerate(spec):
        if d[0] == "conv":
            expected |= {f"features.{i}.weight": (d[2], d[1], *d[3]), f"features.{i}.bias": (d[2],)}
    assert {f"features.{k}": tuple(v.shape) for k, v in ours.state_dict().items()} == expected


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_loads_torchvision_format_checkpoint(net, tmp_path):
    """A torchvision-format file loads, and the five maps LPIPS compares equal a functional
    torchvision forward of that file: a wrong stride, padding, pool or tap position fails."""
    state = _torchvision_state(net)
    path = tmp_path / BACKBONE_FILES[net][0]
    torch.save(state, path)
    model = build_lpips(net, weights=str(path))
    assert not model.random_backbone and all(not p.requires_grad for p in model.parameters())
    for k, v in model.backbone.state_dict().items():  # every tensor from the file, unchanged
        assert torch.equal(v, state[f"features.{k}"])

    x, _ = _images(net, n=2)
    with torch.no_grad():
        got = model._taps(x)
        expected = _reference_taps(net, state, (x - model.shift) / model.scale)
    assert [t.shape for t in got] == [t.shape for t in expected]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
