"""Strict config: unknown keys, wrong types and bad values fail with the key and the file."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ldm_vae.config import Config, LDMConfig, from_dict, load_config, to_dict
from ldm_vae.errors import UserError

from .conftest import ROOT, TINY_KL, TINY_VQ


def test_shipped_configs_load():
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    for path in paths:
        schema = LDMConfig if "ldm" in path.stem else Config
        assert isinstance(load_config(path, schema=schema), schema), path
    assert {p.stem for p in paths} >= {"kl_f4_fashion", "vq_f4_fashion", "ldm_fashion", "tiny_ldm"}


def test_ldm_config_is_checked_like_the_autoencoder_config(tmp_path):
    with pytest.raises(UserError, match="'train.disc_lr'"):  # the LDM trainer has no discriminator
        load_config(None, ["train.disc_lr=1e-4"], LDMConfig)
    with pytest.raises(UserError, match="'model.attention_levels'"):
        load_config(None, ["model.attention_levels=[3]"], LDMConfig)
    with pytest.raises(UserError, match="'diffusion.beta_start' must be below"):
        load_config(None, ["diffusion.beta_start=0.1"], LDMConfig)
    with pytest.raises(UserError, match="'diffusion.label_dropout' must be in"):
        load_config(None, ["diffusion.label_dropout=1.5"], LDMConfig)
    cfg = load_config(None, [], LDMConfig)
    assert (cfg.train.adam_beta1, cfg.train.adam_beta2) == (0.9, 0.999)  # not the GAN betas of train-vae


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 10\n")
    with pytest.raises(UserError, match=r"bad\.yaml.*'train\.max_stepz'"):
        load_config(bad)


@pytest.mark.parametrize("text, key", [
    ("train:\n  batch_size: 8.5\n", "train.batch_size"),
    ("train:\n  batch_size: true\n", "train.batch_size"),
    ("model:\n  block_out_channels: 32\n", "model.block_out_channels"),
    ("data:\n  source: mnist\n", "data.source"),
    ("train:\n  lr: -1\n", "train.lr"),
    ("data:\n  resolution: 30\n", "data.resolution"),
    ("loss: 3\n", "loss"),
])
def test_wrong_types_and_values(tmp_path, text, key):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(bad)


def test_overrides_are_typed_and_strict():
    cfg = load_config(TINY_KL, ["train.max_steps=500", "train.lr=3e-4", "data.random_flip=false",
                                "model.block_out_channels=[8,16]"])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.data.random_flip) == (500, 3e-4, False)
    assert cfg.model.block_out_channels == [8, 16]
    with pytest.raises(UserError, match="train.max_stepz"):
        load_config(TINY_KL, ["train.max_stepz=5"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_config(TINY_KL, ["train.max_steps"])


def test_settings_of_the_other_model_kind_are_refused():
    # a quantizer option on a KL model, or a KL option on a VQ model, would be silently ignored
    with pytest.raises(UserError, match="quantizer.beta do not apply to model.kind 'kl'"):
        load_config(TINY_KL, ["quantizer.beta=0.5"])
    with pytest.raises(UserError, match="model.num_vq_embeddings do not apply"):
        load_config(TINY_KL, ["model.num_vq_embeddings=64"])
    with pytest.raises(UserError, match="loss.kl_weight do not apply to model.kind 'vq'"):
        load_config(TINY_VQ, ["loss.kl_weight=1e-5"])
    with pytest.raises(UserError, match="needs 'model.num_vq_embeddings'"):
        load_config(TINY_VQ, ["model.num_vq_embeddings=null"])
    with pytest.raises(UserError, match="quantizer.ema_decay"):
        load_config(TINY_VQ, ["quantizer.ema_decay=1.5"])


def test_round_trip_through_dict():
    for path in (TINY_KL, TINY_VQ):
        cfg = load_config(path)
        assert from_dict(to_dict(cfg), "x") == cfg


def test_cli_reports_config_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian: {}\n")
    proc = subprocess.run([sys.executable, "-m", "ldm_vae", "train-vae", str(bad), "--output-dir", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "'trian'" in proc.stderr and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing written for a rejected config
