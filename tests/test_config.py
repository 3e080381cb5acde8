"""Strict config: unknown keys, wrong types and bad values fail with the key and the file."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ldm_vae.autoencoder.config import Config
from ldm_vae.cli import main
from ldm_vae.config import (
    bundled_configs,
    from_dict,
    load_config,
    load_saved_config,
    to_dict,
)
from ldm_vae.data.config import DataConfig
from ldm_vae.diffusion.config import LDMConfig
from ldm_vae.errors import UserError

from .conftest import ROOT, TINY_KL, TINY_VQ


def test_shipped_configs_load_by_path_and_by_name(capsys):
    paths = sorted((ROOT / "configs").glob("*.yaml"))  # the checkout's configs/ is the bundled folder
    assert {p.stem for p in paths} == set(bundled_configs()) >= {"kl_f4_fashion", "vq_f4_fashion", "ldm_fashion"}
    for path in paths:
        schema = LDMConfig if "ldm" in path.stem else Config
        by_path = load_config(path, [], schema)
        assert isinstance(by_path, schema), path
        assert load_config(path.stem, [], schema) == load_config(path.name, [], schema) == by_path
    with pytest.raises(UserError, match="bundled configs, usable by name: dc_f8_fashion, fsq_f4_fashion, kl_f4"):
        load_config("kl_f4_fashon", [], Config)
    # and the trainers' --help names every one of them
    for command in ("train-vae", "train-ldm"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert f"({', '.join(bundled_configs())})" in " ".join(capsys.readouterr().out.split()), command


def test_ldm_config_is_checked_like_the_autoencoder_config(tmp_path):
    with pytest.raises(UserError, match="'train.disc_lr'"):  # the LDM trainer has no discriminator
        load_config(None, ["train.disc_lr=1e-4"], LDMConfig)
    with pytest.raises(UserError, match="'model.attention_levels'"):
        load_config(None, ["model.attention_levels=[3]"], LDMConfig)
    with pytest.raises(UserError, match="'diffusion.beta_start' must be below"):
        load_config(None, ["diffusion.beta_start=0.1"], LDMConfig)
    with pytest.raises(UserError, match="'diffusion.label_dropout' must be in"):
        load_config(None, ["diffusion.label_dropout=1.5"], LDMConfig)
    with pytest.raises(UserError, match="'diffusion.snr_gamma' must be > 0"):
        load_config(None, ["diffusion.snr_gamma=0"], LDMConfig)
    with pytest.raises(UserError, match="'network' must be one of unet, dit"):
        load_config(None, ["network=transformer"], LDMConfig)
    with pytest.raises(UserError, match="'network' dit needs diffusion.conditioning: class"):
        load_config(None, ["network=dit", "diffusion.conditioning=text"], LDMConfig)
    with pytest.raises(UserError, match="'dit.patch_size' must be"):
        load_config(None, ["dit.patch_size=0"], LDMConfig)
    cfg = load_config(None, [], LDMConfig)
    assert (cfg.train.adam_beta1, cfg.train.adam_beta2) == (0.9, 0.999)  # not the GAN betas of train-vae


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 10\n")
    with pytest.raises(UserError, match=r"bad\.yaml.*'train\.max_stepz'"):
        load_config(bad, [], Config)


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
        load_config(bad, [], Config)


def test_overrides_are_typed_and_strict():
    cfg = load_config(TINY_KL, ["train.max_steps=500", "train.lr=3e-4", "data.random_flip=false",
                                "model.block_out_channels=[8,16]"], Config)
    assert (cfg.train.max_steps, cfg.train.lr, cfg.data.random_flip) == (500, 3e-4, False)
    assert cfg.model.block_out_channels == [8, 16]
    with pytest.raises(UserError, match="train.max_stepz"):
        load_config(TINY_KL, ["train.max_stepz=5"], Config)
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_config(TINY_KL, ["train.max_steps"], Config)


def test_settings_of_the_other_model_kind_are_refused():
    # a quantizer option on a KL model, or a KL option on a VQ model, would be silently ignored
    with pytest.raises(UserError, match="'quantizer.beta' does not apply to model.kind 'kl'"):
        load_config(TINY_KL, ["quantizer.beta=0.5"], Config)
    with pytest.raises(UserError, match="'model.num_vq_embeddings' does not apply"):
        load_config(TINY_KL, ["model.num_vq_embeddings=64"], Config)
    with pytest.raises(UserError, match="'loss.kl_weight' does not apply to model.kind 'vq'"):
        load_config(TINY_VQ, ["loss.kl_weight=1e-5"], Config)
    with pytest.raises(UserError, match="'model.num_vq_embeddings' is needed by model.kind 'vq'"):
        load_config(TINY_VQ, ["model.num_vq_embeddings=null"], Config)
    with pytest.raises(UserError, match="'quantizer.ema_decay' must be in"):
        load_config(TINY_VQ, ["quantizer.ema_decay=1.5"], Config)


@pytest.mark.parametrize("overrides, key", [
    (["data.center_crop=false"], "data.center_crop"),  # fashion-mnist is resized, never cropped
    (["data.image_column=img"], "data.image_column"),
    (["data.label_column=cls"], "data.label_column"),
    (["data.photos_per_epoch=10"], "data.photos_per_epoch"),
    (["data.max_bad_fraction=0.5"], "data.max_bad_fraction"),
    (["data.decoded_cache_mb=0"], "data.decoded_cache_mb"),
    (["data.source=photos", "data.path=/tmp"], "data.path"),
    (["data.source=photos", "data.name=x/y"], "data.name"),
])
def test_settings_the_data_source_does_not_read_are_refused(overrides, key):
    with pytest.raises(UserError, match=rf"'{key}' does not apply to data.source"):
        load_config(TINY_KL, overrides, Config)
    source = "imagefolder" if key in ("data.center_crop", "data.image_column", "data.label_column",
                                      "data.max_bad_fraction", "data.decoded_cache_mb") else None
    if source:  # the same setting is fine where it is read
        load_config(TINY_KL, [f"data.source={source}", "data.path=/some/folder", *overrides], Config)


def test_rules_live_with_their_fields():
    # a dataclass built in code is checked like one loaded from YAML
    with pytest.raises(UserError, match="'resolution' must be > 0"):
        DataConfig(resolution=0)
    with pytest.raises(UserError, match="'path' is needed by data.source 'imagefolder'"):
        DataConfig(source="imagefolder")


def test_retired_keys_load_from_saved_configs_only():
    """Configs saved before in_channels/out_channels were removed (checkpoints, exports) still
    load; a user's YAML that names them is refused like any unknown key."""
    saved = to_dict(load_config(TINY_KL, [], Config))
    old = {**saved, "model": {**saved["model"], "in_channels": 3, "out_channels": 3}}
    assert load_saved_config(old, "old checkpoint", Config) == load_config(TINY_KL, [], Config)
    with pytest.raises(UserError, match="unknown key 'model.in_channels'"):
        load_config(TINY_KL, ["model.in_channels=3"], Config)
    with pytest.raises(UserError, match="unknown key 'model.in_channels'"):  # a value it never supported
        load_saved_config({**saved, "model": {**saved["model"], "in_channels": 1}}, "old checkpoint", Config)


def test_round_trip_through_dict():
    for path in (TINY_KL, TINY_VQ):
        cfg = load_config(path, [], Config)
        assert from_dict(to_dict(cfg), "x", Config) == cfg


def test_cli_reports_config_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian: {}\n")
    proc = subprocess.run([sys.executable, "-m", "ldm_vae", "train-vae", str(bad), "--output-dir", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "'trian'" in proc.stderr and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing written for a rejected config
