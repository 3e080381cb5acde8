"""Shared fixtures: a synthetic Fashion-MNIST folder and the tiny CPU config.

Tests never need the Debian data package or pretrained weights: the idx files are
written here (structured shapes, so an autoencoder has something to learn), and the
tiny config uses an explicitly RANDOM LPIPS backbone (wiring only, not a metric).
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldm_vae.autoencoder.config import Config
from ldm_vae.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "ldm_vae" / "configs"  # the bundled configs (configs/ links here)
TINY_KL = CONFIGS / "tiny_kl.yaml"
TINY_VQ = CONFIGS / "tiny_vq.yaml"
TINY_FSQ = CONFIGS / "tiny_fsq.yaml"
TINY_DC = CONFIGS / "tiny_dc.yaml"


def load_script(name: str):
    """scripts/NAME.py as a module (the scripts are not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
TINY_LDM = CONFIGS / "tiny_ldm.yaml"


def _shapes(n: int, rng: np.random.Generator) -> np.ndarray:
    """n 28x28 uint8 images of a bright rectangle and a disc on a dark background."""
    yy, xx = np.mgrid[:28, :28]
    out = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        x0, y0 = rng.integers(2, 14, size=2)
        w, h = rng.integers(6, 13, size=2)
        img = np.where((xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h), rng.integers(120, 256), 0)
        cx, cy, r = rng.integers(6, 22), rng.integers(6, 22), rng.integers(3, 7)
        img = np.maximum(img, np.where((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r, rng.integers(60, 200), 0))
        out[i] = img
    return out


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">iiii", 2051, n, h, w) + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">ii", 2049, n) + labels.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def fake_fashion(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 512), ("t10k", 64)):
        write_idx(folder, prefix, _shapes(n, rng), rng.integers(0, 10, size=n))
    return folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """An image folder of two classes, 11 small RGB PNGs each, one of them not an image."""
    from PIL import Image

    root, rng = tmp_path_factory.mktemp("image_folder"), np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir()
        for k in range(11):
            Image.fromarray(rng.integers(0, 256, (18 + k % 3, 16 + k % 4, 3), dtype=np.uint8)).save(
                root / cls / f"{k:02d}.png")
    (root / "cat" / "03.png").write_bytes(b"not an image")
    return root


@pytest.fixture
def tiny_cfg(fake_fashion):
    """tiny_kl.yaml on the synthetic data; call with extra KEY=VALUE overrides."""

    def make(*overrides: str):
        return load_config(TINY_KL, [f"data.path={fake_fashion}", *overrides], Config)

    return make


@pytest.fixture
def tiny_vq_cfg(fake_fashion):
    """tiny_vq.yaml on the synthetic data; call with extra KEY=VALUE overrides."""

    def make(*overrides: str):
        return load_config(TINY_VQ, [f"data.path={fake_fashion}", *overrides], Config)

    return make


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, fake_fashion) -> Path:
    """A latent cache (train split, 256 images, with flips) of a tiny KL autoencoder trained for 6 steps."""
    from accelerate.state import AcceleratorState

    from ldm_vae.autoencoder.train import train
    from ldm_vae.diffusion.latents import encode_dataset

    root = tmp_path_factory.mktemp("tiny_cache")
    cfg = load_config(TINY_KL, [f"data.path={fake_fashion}", "train.max_steps=6", "loss.disc_start=100"], Config)
    train(cfg, root / "vae")
    AcceleratorState._reset_state(reset_partial_state=True)
    encode_dataset(root / "vae" / "export", cfg.data, "train", root / "cache", batch_size=64)
    return root / "cache"


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory, fake_fashion) -> Path:
    """ROOT/kl/export and ROOT/vq/export: tiny KL and VQ autoencoders trained for 6 steps (no GAN),
    shared by test_latents.py and test_evaluate.py (eval --update-card rewrites their model cards)."""
    from ldm_vae.autoencoder.train import train

    root = tmp_path_factory.mktemp("exports")
    for name, path in (("kl", TINY_KL), ("vq", TINY_VQ)):
        train(load_config(path, [f"data.path={fake_fashion}", "train.max_steps=6", "loss.disc_start=100"], Config),
              root / name)
    return root


@pytest.fixture(scope="session")
def tiny_ldm_run(tmp_path_factory, tiny_cache) -> Path:
    """A tiny class-conditional LDM run (4 steps on tiny_cache), to sample from."""
    from accelerate.state import AcceleratorState

    from ldm_vae.diffusion.config import LDMConfig
    from ldm_vae.diffusion.train import train_ldm

    out = tmp_path_factory.mktemp("tiny_ldm") / "run"
    train_ldm(load_config(TINY_LDM, [f"latents={tiny_cache}", "train.max_steps=4", "train.image_every=4",
                                     "train.checkpoint_every=4"], LDMConfig), out)
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


@pytest.fixture(scope="session")
def fd_features(tmp_path_factory) -> Path:
    """An untrained (seeded) `--fd-features` extractor folder for 16x16 images: exercises the
    Fréchet distance wiring; its numbers mean nothing."""
    from ldm_vae.evaluation.features import FeatureExtractor

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("fd") / "fd"
    FeatureExtractor("shapes", resolution=16, num_classes=10).save_pretrained(out)
    return out


@pytest.fixture
def tiny_ldm_cfg(tiny_cache):
    """tiny_ldm.yaml on the tiny cache; call with extra KEY=VALUE overrides."""
    from ldm_vae.diffusion.config import LDMConfig

    def make(*overrides: str):
        return load_config(TINY_LDM, [f"latents={tiny_cache}", *overrides], LDMConfig)

    return make


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide state (e.g. mixed precision) across Accelerator objects;
    each test starts from scratch, as a new `ldm-vae` process would (accelerate's own tests do this)."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# ==============================================================================================
# Two-process training: one `accelerate launch` for every two-process test of the session
# ==============================================================================================


@dataclass(frozen=True)
class TwoProcessJob:
    """A training run under 2-process CPU DDP (tests/ddp_worker.py), or (trainer "cli") an
    `ldm-vae` command line, `overrides` its arguments. A test names its job with
    `@pytest.mark.parametrize("two_process_run", [job], indirect=True, ids=...)`; `overrides` may
    hold {fake_fashion}, {tiny_cache}, {tiny_exports}, {tiny_ldm_run}, {fd_features}, {image_folder} (session
    fixtures of those names) and {out} (the job's folder); `nan` makes the loss NaN on one rank
    ("RANK:STEP,STEP"); `delete` (cli): paths under {out} removed after the command, which then
    runs again (an interrupted run, resumed)."""

    name: str
    config: Path | None
    overrides: tuple[str, ...]
    trainer: str = "train-vae"
    nan: str | None = None
    delete: tuple[str, ...] = ()


@dataclass
class TwoProcessRun:
    """A finished job: its output folder (summary.json) and each rank's final state."""

    out: Path
    ranks: list[dict[str, torch.Tensor]]


@pytest.fixture(scope="session")
def _two_process_launch(request, tmp_path_factory, fake_fashion) -> tuple[dict[str, Path], subprocess.CompletedProcess]:
    """Runs the jobs of every selected test in one 2-process launch (two processes start in
    about 15 s on 2 cores, longer than a tiny run): each job's output folder, and the launch."""
    jobs = {}
    for item in request.session.items:
        job = getattr(item, "callspec", None) and item.callspec.params.get("two_process_run")
        if isinstance(job, TwoProcessJob):
            assert jobs.setdefault(job.name, job) == job, f"two different two-process jobs named {job.name!r}"
    paths = {"fake_fashion": fake_fashion}
    for name in ("tiny_cache", "tiny_exports", "tiny_ldm_run", "fd_features", "image_folder"):  # built where used
        if any(f"{{{name}}}" in o for job in jobs.values() for o in job.overrides):
            paths[name] = request.getfixturevalue(name)
    root = tmp_path_factory.mktemp("ddp")
    outs = {name: root / name for name in jobs}
    spec = [{"trainer": job.trainer, "config": str(job.config), "output_dir": str(outs[name]),
             "overrides": [o.format(**paths, out=outs[name]) for o in job.overrides], "nan": job.nan,
             "delete": list(job.delete)} for name, job in jobs.items()]
    (root / "jobs.json").write_text(json.dumps(spec, indent=1))
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(root / "hf"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tests" / "ddp_worker.py"), str(root / "jobs.json")]
    return outs, subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture
def two_process_run(request, _two_process_launch) -> TwoProcessRun:
    """This test's job (request.param, a TwoProcessJob) from the shared launch, checked to have
    run as two processes to the end, with the same state keys on both ranks."""
    job: TwoProcessJob = request.param
    outs, proc = _two_process_launch
    out = outs[job.name]
    # both ranks saved their state after the job's last step (a later job's failure does not undo that)
    failure = proc.stderr[max(proc.stderr.find("Traceback"), 0):][:4000]  # the first rank's traceback
    if job.trainer == "cli":  # each rank's exit code
        assert [(out / f"rank{r}.exit").read_text() if (out / f"rank{r}.exit").is_file() else None
                for r in (0, 1)] == ["0", "0"], failure
        return TwoProcessRun(out, [])
    assert (out / "rank0.safetensors").is_file() and (out / "rank1.safetensors").is_file(), failure
    summary = json.loads((out / "summary.json").read_text())
    max_steps = int(next(o.split("=")[1] for o in job.overrides if o.startswith("train.max_steps=")))
    assert summary["num_processes"] == 2 and summary["steps"] == max_steps
    ranks = [load_file(out / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    return TwoProcessRun(out, ranks)


def fake_hub(monkeypatch, error: Exception | None = None) -> list[tuple[str, str, dict]]:
    """Replace `HfApi.create_repo` and `HfApi.upload_folder` (nothing goes online): the calls, as
    (method, repo_id, keyword arguments), an upload also with the list of its folder's files;
    with `error`, create_repo raises it instead."""
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kwargs):
        if error is not None:
            raise error
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, {"folder_path": Path(folder_path), "files": files_in(folder_path),
                                                 **kwargs}))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def files_in(folder: Path) -> list[str]:
    """The files below `folder`, relative to it, sorted."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


def pushed_card(calls: list, folder: Path, repo_id: str, private: bool = False):
    """After a push to `fake_hub`: the repo was created (exist_ok, `private`) and exactly the files
    of `folder` were uploaded to it. Returns the folder's ModelCard, which must read back as
    written and name neither the local folder (its snippets load from the repo) nor PyPI."""
    from huggingface_hub import ModelCard

    assert [(c[0], c[1]) for c in calls] == [("create_repo", repo_id), ("upload_folder", repo_id)]
    assert calls[0][2] == {"exist_ok": True, "private": private}
    assert calls[1][2]["folder_path"] == folder and calls[1][2]["files"] == files_in(folder)
    text = (folder / "README.md").read_text()
    card = ModelCard.load(folder / "README.md")
    assert str(card) == text  # the metadata block reads back as written
    assert str(folder) not in card.text and "pypi.org" not in text
    return card


def text_steps(monkeypatch) -> list[dict]:
    """Records each training step of a text-conditional LDM run: its "batch", the trainer's
    "tokenizer", the text encoder's "weights" before the step, and the "tokens" the network got
    (preview sampling runs under no_grad and is not recorded)."""
    from ldm_vae.diffusion.networks import TextConditioned
    from ldm_vae.diffusion.train import LDMTrainer

    steps: list[dict] = []
    real_forward, real_step = TextConditioned.forward, LDMTrainer.train_step

    def train_step(self, batch, step):
        steps.append({"batch": {k: v.clone() for k, v in batch.items()}, "tokenizer": self.tokenizer,
                      "weights": {k: v.clone() for k, v in self.model.text_encoder.state_dict().items()}})
        return real_step(self, batch, step)

    def forward(self, noisy, t, token_ids):
        if torch.is_grad_enabled():
            steps[-1]["tokens"] = token_ids.clone()
        return real_forward(self, noisy, t, token_ids)

    monkeypatch.setattr(LDMTrainer, "train_step", train_step)
    monkeypatch.setattr(TextConditioned, "forward", forward)
    return steps


def train_recording(monkeypatch, trainer_module, run) -> dict:
    """Call `run()` (a training run) and record, for every optimizer that the trainer in
    `trainer_module` builds: "start" and "end" (its parameters flattened before and after the
    run) and "first_grad" (their gradient at its first step, flattened)."""
    optimizers, real = [], trainer_module.make_adamw

    def spy(params, *args, **kwargs):
        params = list(params)
        opt = real(params, *args, **kwargs)
        record = {"params": params, "start": _flat(params)}

        def first_step(*_):
            record.setdefault("first_grad", _flat([p.grad for p in params]))

        opt.register_step_pre_hook(first_step)
        optimizers.append(record)
        return opt

    monkeypatch.setattr(trainer_module, "make_adamw", spy)
    try:
        run()
    finally:
        monkeypatch.setattr(trainer_module, "make_adamw", real)
    return [{**r, "end": _flat(r.pop("params"))} for r in optimizers]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors]).clone()


def assert_trains_the_same(plain: list[dict], other: list[dict], what: str, grad_tol: float = 3e-5,
                           weight_tol: float = 2e-3) -> None:
    """Two runs' records (train_recording) from the same initial weights: every optimizer's
    first gradient agrees to `grad_tol` (relative norm: the step computes the same thing),
    and the weights end within `weight_tol` of the distance they moved, a real distance (> 1%
    of their norm). Float noise alone measures about 1e-6 and 1e-4 on the tiny configs."""
    assert len(plain) == len(other)
    for k, (a, b) in enumerate(zip(plain, other)):
        assert torch.equal(a["start"], b["start"]), f"{what}, optimizer {k}: another initialisation"
        grad_error = ((b["first_grad"] - a["first_grad"]).norm() / a["first_grad"].norm()).item()
        assert grad_error <= grad_tol, f"{what}, optimizer {k}: first gradient differs by {grad_error:.2e} (relative)"
        moved = (a["end"] - a["start"]).norm()
        assert moved > 0.01 * a["start"].norm(), f"{what}, optimizer {k}: the weights hardly moved ({moved:.3g})"
        drift = ((b["end"] - a["end"]).norm() / moved).item()
        assert drift <= weight_tol, f"{what}, optimizer {k}: ended {drift:.2e} of the training movement away"


@pytest.fixture(autouse=True, scope="session")
def _reference_cache(tmp_path_factory):
    """Cached Fréchet reference features go to a temporary folder, never the user's ~/.cache."""
    import os

    old = os.environ.get("LDM_VAE_CACHE")
    os.environ["LDM_VAE_CACHE"] = str(tmp_path_factory.mktemp("ldm-vae-cache"))
    yield
    if old is None:
        os.environ.pop("LDM_VAE_CACHE")
    else:
        os.environ["LDM_VAE_CACHE"] = old
