"""End-to-end training on the tiny CPU config (synthetic data, RANDOM LPIPS backbone).

Covers: the loss really drops; export -> stock diffusers gives identical outputs and a
measured scaling factor; resume continues to the same weights; a run folder is never
overwritten; two processes end with identical weights.
"""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from torch import nn

from ldm_vae.autoencoder.models import build_autoencoder
from ldm_vae.autoencoder.train import train
from ldm_vae.cli import main
from ldm_vae.data.sources import build_dataset
from ldm_vae.errors import UserError

from .conftest import (
    TINY_KL,
    TwoProcessJob,
    assert_trains_the_same,
    fake_hub,
    files_in,
    pushed_card,
    train_recording,
)


def _recon_l1(vae, x):
    with torch.no_grad():
        return (vae.decode(vae.encode(x).latent_dist.mean).sample - x).abs().mean().item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fake_fashion):
    """One 60-step run shared by the tests below (GAN on from step 40, checkpoints every 20)."""
    from ldm_vae.autoencoder.config import Config
    from ldm_vae.config import load_config

    cfg = load_config(TINY_KL, [f"data.path={fake_fashion}", "train.max_steps=60", "loss.disc_start=40",
                                "loss.disc_pretrain_steps=10", "train.checkpoint_every=20"], Config)
    out = tmp_path_factory.mktemp("run") / "kl"
    run = train(cfg, out)
    return cfg, out, run


def test_short_run_lowers_reconstruction_loss(trained):
    cfg, out, run = trained
    summary = run.summary
    x = torch.stack([build_dataset(cfg.data, "test", train=False)[i]["pixel_values"] for i in range(32)])
    torch.manual_seed(cfg.seed)  # the trainer builds its initial weights under this seed
    initial = build_autoencoder(cfg.model, cfg.data.resolution)
    trained_vae = AutoencoderKL.from_pretrained(out / "export")
    before, after = _recon_l1(initial, x), _recon_l1(trained_vae, x)
    assert after < 0.6 * before, (before, after)
    assert summary["steps"] == 60 and set(summary["final_logs"]) >= {"l1", "lpips", "kl", "g_adv", "d_loss"}


def test_export_round_trip_matches_ema_weights(trained):
    cfg, out, run = trained
    ae, ema = copy.deepcopy(run.autoencoder), run.ema
    ema.copy_to(ae.vae.parameters())  # the trainer's EMA weights in (a copy of) the trainer's model
    ae.eval()  # as from_pretrained leaves the stock model (train mode differs by ~1e-6 in attention)
    stock = AutoencoderKL.from_pretrained(out / "export")  # stock diffusers, our export
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ours = ae.vae.decode(ae.vae.encode(x).latent_dist.mean).sample
        theirs = stock.decode(stock.encode(x).latent_dist.mean).sample
    assert torch.equal(ours, theirs)
    assert stock.config.scaling_factor != pytest.approx(0.18215)
    assert stock.config.scaling_factor > 0 and stock.config.shift_factor is not None
    # the measured factor really whitens latents of training images
    data = torch.stack([build_dataset(cfg.data, "train", train=False)[i]["pixel_values"] for i in range(128)])
    with torch.no_grad():
        z = stock.encode(data).latent_dist.sample(generator=torch.Generator().manual_seed(1))
    scaled = (z - stock.config.shift_factor) * stock.config.scaling_factor
    assert abs(scaled.std().item() - 1) < 0.1 and abs(scaled.mean().item()) < 0.1
    card = (out / "export" / "README.md").read_text()
    assert "library_name: diffusers" in card and "RANDOM LPIPS backbone" in card


def test_checkpoints_are_complete_and_pruned(trained):
    cfg, out, _ = trained
    # checkpoints at 20, 40 and 60 with train.checkpoints_total_limit 2: the oldest is pruned
    assert cfg.train.checkpoints_total_limit == 2
    names = sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-40", "checkpoint-60"]
    assert (out / "checkpoint-60" / "autoencoder" / "diffusion_pytorch_model.safetensors").is_file()
    assert any((out / "samples").glob("recon_*.png")) and any((out / "logs").rglob("events.out.tfevents*"))


def test_resume_continues_to_identical_weights(trained, tmp_path):
    cfg, out, run = trained
    # copy the run as it was at step 40 (the GAN term starts there), then resume it to step 60
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(out / "checkpoint-40", part / "checkpoint-40")
    shutil.copy(out / "config.yaml", part / "config.yaml")
    resumed = train(cfg, part, resume="latest")
    assert resumed.summary["steps"] == 60 and resumed.summary["steps_this_session"] == 20
    for name in ("autoencoder", "discriminator"):
        a, b = getattr(run, name).state_dict(), getattr(resumed, name).state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert resumed.summary["final_logs"]["loss"] == run.summary["final_logs"]["loss"]


def test_refuses_to_overwrite_a_run(trained):
    cfg, out, _ = trained
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(UserError, match="already holds a run"):
        train(cfg, out)
    assert sorted(p.name for p in out.rglob("*")) == before
    started = out.parent / "started"  # a run that died before its first checkpoint
    started.mkdir()
    (started / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(UserError, match="no complete checkpoint yet"):
        train(cfg, started)


KL_TWO_PROCESSES = TwoProcessJob("kl", TINY_KL, (
    "data.path={fake_fashion}", "train.max_steps=24", "loss.disc_start=12", "loss.lecam_weight=0.1",
    "train.batch_size=4", "train.grad_accum_steps=2", "train.checkpoint_every=12", "train.image_every=12"))


@pytest.mark.parametrize("two_process_run", [KL_TWO_PROCESSES], indirect=True, ids=["kl"])
def test_two_process_training_keeps_ranks_identical(two_process_run):
    r0, r1 = two_process_run.ranks
    assert {"ema.0", "lecam.real", "lecam.fake"} <= set(r0)
    assert r0["lecam.real"] != 0  # the LeCam EMA was updated (from process-averaged logits)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def test_cli_export_refuses_to_overwrite(trained, tmp_path, capsys):
    # in this process, as the tests below (the exit codes of `python -m ldm_vae` itself, 0 and 2
    # with the same --overwrite refusal, are checked on `eval` in test_evaluate.py)
    _, out, _ = trained
    dest = tmp_path / "exp"
    assert main(["export", str(out), str(dest)]) == 0
    AutoencoderKL.from_pretrained(dest)
    capsys.readouterr()
    assert main(["export", str(out), str(dest)]) == 2  # an unexpected exception would raise here
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err
    assert main(["export", str(out), str(dest), "--overwrite"]) == 0


def test_cli_export_step_exports_that_checkpoint_and_names_the_kept_ones(trained, tmp_path, capsys):
    from safetensors.torch import load_file

    _, out, _ = trained
    dest = tmp_path / "exp40"
    assert main(["export", str(out), str(dest), "--step", "40"]) == 0
    name = "diffusion_pytorch_model.safetensors"
    exported, saved = load_file(dest / name), load_file(out / "checkpoint-40" / "autoencoder" / name)
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    assert json.loads((dest / "ldm_vae.json").read_text())["step"] == 40
    newest = load_file(out / "export" / name)
    assert any(not torch.equal(exported[k], newest[k]) for k in saved)  # not the step-60 weights
    capsys.readouterr()
    # checkpoint-20 was pruned (checkpoints_total_limit 2): refused, naming the steps that are kept
    assert main(["export", str(out), str(tmp_path / "exp20"), "--step", "20"]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint at step 20" in err and "40, 60" in err and "Traceback" not in err
    assert not (tmp_path / "exp20").exists()


def test_cli_export_pushes_the_folder_and_its_card_names_the_repo(trained, tmp_path, monkeypatch):
    """--push-to-hub (the Hub replaced by fakes): the repo is created, exactly the export folder
    is uploaded, and the card (ModelCard metadata that reads back the same, hub dataset id, no
    dead link) loads the model from the repo."""
    cfg, out, _ = trained
    calls = fake_hub(monkeypatch)
    dest = tmp_path / "exp"
    assert main(["export", str(out), str(dest), "--push-to-hub", "someone/kl-tiny", "--private"]) == 0
    assert {"README.md", "diffusion_pytorch_model.safetensors", "config.json"} <= set(files_in(dest))
    card = pushed_card(calls, dest, "someone/kl-tiny", private=True)
    assert card.data.to_dict() == {"datasets": ["zalando-datasets/fashion_mnist"], "library_name": "diffusers",
                                   "license": cfg.export.license,
                                   "tags": ["ldm-vae", "autoencoder", "autoencoder-kl", "latent-diffusion"]}
    assert 'AutoencoderKL.from_pretrained("someone/kl-tiny")' in card.text


def test_cli_export_push_offline_says_so_and_keeps_the_folder(trained, tmp_path, monkeypatch, capsys):
    from huggingface_hub.utils import httpx

    _, out, _ = trained
    fake_hub(monkeypatch, error=httpx.ConnectError("[Errno -2] Name or service not known"))
    dest = tmp_path / "exp"
    assert main(["export", str(out), str(dest), "--push-to-hub", "someone/kl-tiny"]) == 2
    err = capsys.readouterr().err
    assert "could not push to the Hub repo someone/kl-tiny (ConnectError: [Errno -2] Name or service" in err
    assert f"complete at {dest}; push it later with `hf upload someone/kl-tiny {dest}`" in err
    assert "Traceback" not in err
    AutoencoderKL.from_pretrained(dest)  # the folder is intact, its card already names the repo
    assert 'from_pretrained("someone/kl-tiny")' in (dest / "README.md").read_text()
    # a malformed repo id, or --private alone, is refused before any export work
    assert main(["export", str(out), str(tmp_path / "e2"), "--push-to-hub", "not a repo"]) == 2
    assert main(["export", str(out), str(tmp_path / "e2"), "--private"]) == 2
    assert "--push-to-hub" in capsys.readouterr().err and not (tmp_path / "e2").exists()


def _offline_hub(monkeypatch, tmp_path):
    import urllib.error

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)


def test_missing_lpips_weights_stop_before_training(tiny_cfg, tmp_path, monkeypatch):
    from ldm_vae.autoencoder.perceptual import LPIPSWeightsMissing

    _offline_hub(monkeypatch, tmp_path)
    with pytest.raises(LPIPSWeightsMissing, match="vgg16-397923af.pth"):
        train(tiny_cfg("loss.lpips_random_backbone=false"), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written


def test_skipped_lpips_is_recorded_in_summary_and_card(tiny_cfg, tmp_path, monkeypatch):
    _offline_hub(monkeypatch, tmp_path)
    cfg = tiny_cfg("loss.lpips_random_backbone=false", "loss.lpips_if_missing=skip", "train.max_steps=4")
    summary = train(cfg, tmp_path / "run").summary
    assert summary["perceptual"].startswith("SKIPPED") and "lpips" not in summary["final_logs"]
    assert "WITHOUT the perceptual term" in (tmp_path / "run" / "export" / "README.md").read_text()


def test_bf16_autocast_run_stays_finite(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.mixed_precision=bf16", "train.max_steps=6", "loss.disc_start=3", "train.log_every=1")
    run = train(cfg, tmp_path / "run")
    logs = run.summary["final_logs"]
    assert all(math.isfinite(v) for v in logs.values()) and logs["adaptive_weight"] > 0
    # master weights stay fp32 under autocast
    assert all(p.dtype == torch.float32 for p in run.autoencoder.parameters())


def test_export_without_ema_uses_raw_weights(tiny_cfg, tmp_path):
    run = train(tiny_cfg("train.ema_decay=0", "train.max_steps=4"), tmp_path / "run")
    assert run.ema is None
    raw = run.autoencoder.vae.state_dict()
    exported = AutoencoderKL.from_pretrained(tmp_path / "run" / "export").state_dict()
    assert all(torch.equal(raw[k], exported[k]) for k in raw)
    assert "raw (EMA off)" in (tmp_path / "run" / "export" / "README.md").read_text()


def test_channels_last_and_compile_each_train_the_same_model(tiny_cfg, tmp_path, monkeypatch):
    """train.channels_last and train.compile change how the step runs, not what it computes:
    each flag alone ends GAN-phase steps (no warm-up, the weights really move) where the plain
    run ends, and the export's keys and layout are the stock ones."""
    import ldm_vae.autoencoder.train as trainer

    # Without LPIPS: its unit-normalised features make its float32 gradient ill-conditioned on
    # the flat reconstructions of an untrained decoder (3% off float64 at amplitude 1e-4, with
    # or without these flags), which would hide what the flags do.
    overrides = ("train.max_steps=3", "loss.disc_start=1", "train.log_every=1", "train.lr_warmup_steps=0",
                 "loss.perceptual_weight=0")
    # Dynamo's capture and AOT autograd (what our wiring decides: graph breaks, the eager output
    # conv, set_stance) without inductor's code generation, torch's own and tested there: a cold
    # inductor compile of these graphs takes about 100 s of the suite's 15-minute budget on 2 cores.
    compile_module = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compile_module(self, backend="aot_eager", **kw))
    runs = {}
    for flag in ("plain", "channels_last", "compile"):
        cfg = tiny_cfg(*overrides, *([f"train.{flag}=true"] if flag != "plain" else []))
        runs[flag] = train_recording(monkeypatch, trainer, lambda cfg=cfg, flag=flag: train(cfg, tmp_path / flag))
    for flag in ("channels_last", "compile"):
        assert_trains_the_same(runs["plain"], runs[flag], flag)
        summary = json.loads((tmp_path / flag / "summary.json").read_text())
        assert summary["skipped_steps"] == 0 and summary["final_logs"]["adaptive_weight"] > 0
        a = AutoencoderKL.from_pretrained(tmp_path / "plain" / "export").state_dict()
        b = AutoencoderKL.from_pretrained(tmp_path / flag / "export").state_dict()
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and b[k].is_contiguous() for k in a)


def test_report_to_chooses_the_trackers_and_logs_the_config(tiny_cfg, tmp_path, monkeypatch):
    """train.report_to: tensorboard gets the resolved config as hyperparameters; none writes
    no tracker files (metrics.jsonl stays); a tracker whose package is missing stops the run
    before it writes anything."""
    import ldm_vae.run.trainer as run_trainer

    train(tiny_cfg("train.max_steps=2", "train.lr=0.00123"), tmp_path / "tb")
    logs = tmp_path / "tb" / "logs"
    hparams = yaml.safe_load(next(logs.rglob("hparams.yml")).read_text())
    assert hparams["train.lr"] == 0.00123 and hparams["model.block_out_channels"] == "[16, 32]"
    assert hparams["train.report_to"] == "tensorboard" and list(logs.rglob("events.out.tfevents.*"))

    train(tiny_cfg("train.max_steps=2", "train.image_every=1", "train.report_to=none"), tmp_path / "none")
    logs = tmp_path / "none" / "logs"
    assert (logs / "metrics.jsonl").is_file() and not [p for p in logs.rglob("*") if p.name != "metrics.jsonl"]

    monkeypatch.setattr(run_trainer, "get_available_trackers", list)  # as without the wandb package
    with pytest.raises(UserError, match="pip install wandb"):
        train(tiny_cfg("train.max_steps=2", "train.report_to=wandb"), tmp_path / "wandb")
    assert not (tmp_path / "wandb").exists()
