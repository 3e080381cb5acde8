"""Tests for ldm_vae.perceptual (LPIPS without torchvision).

Every test uses RANDOM backbones (no ImageNet weights are available offline): the numbers
are meaningless as a perceptual metric; the tests check the computation, not its quality.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import urllib.error

import pytest
import torch

from ldm_vae.autoencoder.perceptual import (
    BACKBONE_FILES,
    LPIPS,
    LPIPSWeightsMissing,
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


def test_missing_lpips_package_says_how_to_fix(monkeypatch):
    find_spec = importlib.util.find_spec
    hidden = lambda name, *a: None if name == "lpips" else find_spec(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    with pytest.raises(UserError, match="pip install --no-deps lpips"):
        build_lpips("alex", random_backbone=True)


def test_loads_torchvision_format_checkpoint(tmp_path):
    """A stand-in for vgg16-397923af.pth: random tensors under torchvision's key names."""
    g = torch.Generator().manual_seed(7)
    backbone = LPIPS("vgg").backbone.state_dict()
    state = {f"features.{k}": torch.randn(v.shape, generator=g) for k, v in backbone.items()}
    state["classifier.0.weight"] = torch.randn(4, 8, generator=g)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(state, path)

    model = build_lpips("vgg", weights=str(path))
    assert not model.random_backbone
    loaded = model.backbone.state_dict()
    assert set(loaded) == {k[len("features."):] for k in state if k.startswith("features.")}
    for k, v in loaded.items():
        assert torch.equal(v, state[f"features.{k}"])
    assert all(not p.requires_grad for p in model.parameters())
