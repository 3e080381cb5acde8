"""The DC autoencoder (`model.kind: dc`, diffusers AutoencoderDC): config rules, then on the
tiny config, training -> export -> stock `AutoencoderDC.from_pretrained` with identical
outputs, the measured scaling, the card, eval, the latent cache, resume parity and two
processes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderDC
from safetensors.torch import load_file

from ldm_vae.autoencoder.config import Config
from ldm_vae.autoencoder.models import build_autoencoder, load_autoencoder, reconstruct
from ldm_vae.autoencoder.train import train
from ldm_vae.config import load_config
from ldm_vae.data.sources import build_dataset
from ldm_vae.diffusion.latents import LatentDataset, encode_dataset
from ldm_vae.errors import UserError
from ldm_vae.evaluation.latent_space import latent_measures
from ldm_vae.evaluation.report import EvalOptions, run_eval

from .conftest import TINY_DC, TINY_KL, TwoProcessJob
from .test_resume import STEPS, _assert_same_run
from .test_train import _offline_hub

BAD_DC_CONFIGS = {
    "model.block_out_channels=[8,16,48]": "model.block_out_channels.*multiple of 4 that divides 4x",
    "model.block_out_channels=[8,18,36]": "multiple of 4",
    "model.latent_channels=5": "model.latent_channels.*must divide the last width 32",
    "model.dc_vit_levels=4": "model.dc_vit_levels.*at most the number of levels",
    "model.attention_head_dim=12": "model.attention_head_dim.*must divide the widths",
    "data.resolution=18": "data.resolution.*divisible by the downsampling factor 4",
    "model.norm_num_groups=8": "model.norm_num_groups.*does not apply to model.kind 'dc'",
    "model.mid_block_add_attention=false": "model.mid_block_add_attention.*does not apply",
    "loss.kl_weight=1e-5": "loss.kl_weight.*does not apply to model.kind 'dc'",
    "diffusability.latent_noise_max=0.1": "diffusability.latent_noise_max.*does not apply",
    "model.num_vq_embeddings=64": "model.num_vq_embeddings.*does not apply",
    "quantizer.beta=0.5": "quantizer.beta.*does not apply to model.kind 'dc'",
}


@pytest.mark.parametrize("override", BAD_DC_CONFIGS)
def test_dc_config_refuses_what_autoencoder_dc_cannot_build_or_does_not_read(fake_fashion, override):
    with pytest.raises(UserError, match=BAD_DC_CONFIGS[override]):
        load_config(TINY_DC, [f"data.path={fake_fashion}", override], Config)


def test_dc_keys_are_refused_for_other_kinds_and_head_dim_matters_only_with_vit_levels(fake_fashion):
    for key in ("model.dc_vit_levels", "model.attention_head_dim"):
        with pytest.raises(UserError, match=f"{key}.*does not apply to model.kind 'kl'"):
            load_config(TINY_KL, [f"data.path={fake_fashion}", f"{key}=8"], Config)
    cfg = load_config(TINY_DC, [f"data.path={fake_fashion}", "model.dc_vit_levels=0", "model.attention_head_dim=5"],
                      Config)
    assert cfg.model.dc_block_types == ["ResBlock"] * 3 and cfg.model.codebook_shape is None


@pytest.fixture(scope="module")
def dc_run(tmp_path_factory, fake_fashion):
    """A STEPS-step run (GAN from step 20, checkpoints at STEPS / 2 and STEPS, as test_resume.py expects)."""
    cfg = load_config(TINY_DC, [f"data.path={fake_fashion}", f"train.max_steps={STEPS}",
                                f"train.checkpoint_every={STEPS // 2}"], Config)
    out = tmp_path_factory.mktemp("run") / "dc"
    return cfg, out, train(cfg, out)


def _test_images(cfg: Config, n: int) -> torch.Tensor:
    test = build_dataset(cfg.data, "test", train=False)
    return torch.stack([test[i]["pixel_values"] for i in range(n)])


def test_dc_trains_and_exports_to_stock_autoencoder_dc(dc_run):
    cfg, out, run = dc_run
    x = _test_images(cfg, 32)
    stock = AutoencoderDC.from_pretrained(out / "export")
    assert stock.config.encoder_block_types == ["ResBlock", "ResBlock", "EfficientViTBlock"]
    torch.manual_seed(cfg.seed)
    untrained = build_autoencoder(cfg.model, cfg.data.resolution)
    errors = [(reconstruct(vae, x) - x).abs().mean().item() for vae in (untrained, stock)]
    assert errors[1] < 0.7 * errors[0], errors
    logs = run.summary["final_logs"]
    assert {"l1", "lpips", "g_adv", "d_loss"} <= set(logs)
    assert not {"kl", "kl_weight", "usage", "vq_commitment"} & set(logs)  # no latent term, nothing logged for it
    # the trainer's model with its EMA weights is what stock diffusers loads, to the bit
    ae = run.autoencoder
    run.ema.copy_to(list(ae.vae.parameters()))
    ae.eval()
    with torch.no_grad():
        assert torch.equal(reconstruct(ae.vae, x), stock.decode(stock.encode(x).latent).sample)
        assert torch.equal(ae(x)[0], stock(x).sample)


def test_dc_scaling_factor_gives_unit_second_moment_and_the_card_says_so(dc_run):
    """scaling_factor = 1/RMS of `encode(x).latent` over the images the export measured."""
    cfg, out, _ = dc_run
    stock = AutoencoderDC.from_pretrained(out / "export")
    scale = stock.config.scaling_factor
    train_ds = build_dataset(cfg.data, cfg.data.train_split, train=False)
    n = min(cfg.export.scale_num_images, len(train_ds))
    indices = torch.linspace(0, len(train_ds) - 1, n).round().long().unique().tolist()
    x = torch.stack([train_ds[i]["pixel_values"] for i in indices])
    with torch.no_grad():
        z = stock.encode(x).latent.double() * scale
    assert z.shape[1:] == (8, 4, 4)
    torch.testing.assert_close(z.pow(2).mean().item(), 1.0, atol=1e-5, rtol=0)
    stats = json.loads((out / "export" / "ldm_vae.json").read_text())["latent_stats"]
    assert stats["scaling_factor"] == scale and "codebook_usage" not in stats
    card = (out / "export" / "README.md").read_text()
    facts = ("# DC-AE f4, 8 latent channels", "tags:\n- ldm-vae\n- autoencoder\n- dc-ae",
             "a 16 x 16 image becomes a 8x4x4 latent, 128 values",
             "8 (ResBlock), 16 (ResBlock), 32 (EfficientViTBlock)",
             f"| `scaling_factor` | {scale:.6g} (1 / root mean square", "AutoencoderDC.from_pretrained(",
             "vae.encode(x).latent * vae.config.scaling_factor", "RANDOM LPIPS backbone")
    for fact in facts:
        assert fact in card, fact


def test_eval_diffusability_and_latent_cache_of_a_dc_export(dc_run, tmp_path, monkeypatch):
    cfg, out, _ = dc_run
    export = out / "export"
    _offline_hub(monkeypatch, tmp_path)
    report = run_eval([str(export)], tmp_path / "r", EvalOptions(num_images=16, batch_size=8, bootstrap=0))
    result = report["results"][0]
    m = result["metrics"]
    assert result["kind"] == "AutoencoderDC" and m["num_images"] == 16 and m["psnr_db"] > 5 and 0 < m["ssim"] <= 1
    assert len(m["latent_channel_std"]) == 8 and min(m["latent_channel_std"]) > 0
    assert not {"codebook_usage", "active_units", "elbo_bits_per_dim"} & set(m)  # nothing KL- or VQ-specific
    assert (tmp_path / "r" / "reconstructions.png").is_file()
    measures = latent_measures(load_autoencoder(export), build_dataset(cfg.data, "test", train=False), 16, 8,
                               torch.device("cpu"))  # `ldm-vae diffusability`'s measures
    assert measures["latent_shape"] == [8, 4, 4] and measures["equivariance_decoder_psnr_db"] > 0
    # the latent cache: encode(x).latent, unscaled; LatentDataset scales it once
    meta = encode_dataset(export, cfg.data, "test", tmp_path / "cache", batch_size=32)
    assert meta["kind"] == "AutoencoderDC" and meta["latent_shape"] == [8, 4, 4] and meta["shift_factor"] is None
    stock = AutoencoderDC.from_pretrained(export)
    x = _test_images(cfg, 4)
    with torch.no_grad():
        latent = stock.encode(x).latent
    shard = load_file(tmp_path / "cache" / "shard-00000.safetensors")
    torch.testing.assert_close(shard["latents"][:4], latent, atol=1e-5, rtol=1e-5)  # batch of 32 vs 4
    item = LatentDataset(tmp_path / "cache")[0]["latents"]
    rows = shard["latents"][0], shard["latents_flipped"][0]
    assert any(torch.equal(item, row * stock.config.scaling_factor) for row in rows)


def test_resumed_dc_run_ends_bit_identical(dc_run, tmp_path):
    """Resume a copy of the run from its middle checkpoint (before the GAN starts): the same
    final state (weights, optimizers, EMA, schedulers) and the same logged losses."""
    cfg, out, _ = dc_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(f"checkpoint-{STEPS}", "export", "summary.json"))
    train(cfg, copy, resume="latest")
    _assert_same_run(out, copy)


DC_TWO_PROCESSES = TwoProcessJob("dc", TINY_DC, ("data.path={fake_fashion}", "train.max_steps=10",
                                                 "loss.disc_start=5", "train.checkpoint_every=10"))


@pytest.mark.parametrize("two_process_run", [DC_TWO_PROCESSES], indirect=True, ids=["dc"])
def test_two_process_dc_training_keeps_ranks_identical(two_process_run):
    ranks = two_process_run.ranks
    assert any(k.startswith("ema.") for k in ranks[0])
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
