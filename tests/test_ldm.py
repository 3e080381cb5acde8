"""Latent diffusion: guidance, scaling applied once, the trainer learns, sampling, and the
exported pipeline in stock diffusers generates exactly what `ldm-vae sample` generates."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from ldm_vae.autoencoder.models import load_autoencoder
from ldm_vae.diffusion.config import UNetConfig
from ldm_vae.diffusion.export import export_pipeline
from ldm_vae.diffusion.networks import build_unet, noise_schedule
from ldm_vae.diffusion.pipeline import LatentDiffusionPipeline, make_scheduler
from ldm_vae.diffusion.sample import generate, load_pipeline, sample_labels
from ldm_vae.diffusion.train import train_ldm
from ldm_vae.errors import UserError

from .conftest import TINY_LDM


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory, tiny_cache):
    from ldm_vae.config import load_config
    from ldm_vae.diffusion.config import LDMConfig

    out = tmp_path_factory.mktemp("ldm") / "run"
    summary = train_ldm(load_config(TINY_LDM, [f"latents={tiny_cache}", "train.max_steps=60", "train.log_every=10",
                                               "train.image_every=60", "train.checkpoint_every=60"], LDMConfig),
                        out).summary
    return out, summary


def _tiny_pipeline(tiny_cache, num_classes=10):
    meta = json.loads((tiny_cache / "cache.json").read_text())
    torch.manual_seed(0)
    unet = build_unet(UNetConfig(block_out_channels=[16, 32], layers_per_block=1, attention_levels=[1],
                                 attention_head_dim=8, norm_num_groups=8), meta["latent_shape"], num_classes).eval()
    vae = load_autoencoder(meta["autoencoder"]).eval()
    from ldm_vae.diffusion.config import DiffusionConfig

    return LatentDiffusionPipeline(unet, vae, make_scheduler("ddim", noise_schedule(DiffusionConfig()).config))


def test_guidance_scale_one_is_the_conditional_prediction(tiny_cache):
    pipe = _tiny_pipeline(tiny_cache)
    x, t, labels = torch.randn(4, 4, 8, 8), torch.tensor(500), torch.tensor([0, 3, 3, 9])
    with torch.no_grad():
        cond = pipe.unet(x, t, class_labels=labels).sample
        uncond = pipe.unet(x, t, class_labels=torch.full_like(labels, 10)).sample
        assert torch.equal(pipe.predict(x, t, labels, 1.0), cond)
        # the batched [cond; uncond] pass equals separate passes, combined as uncond + s (cond - uncond)
        torch.testing.assert_close(pipe.predict(x, t, labels, 3.0), uncond + 3.0 * (cond - uncond))
        assert not torch.allclose(cond, uncond)  # the null class really is another input


def test_decoding_undoes_the_scaling_once(tiny_cache):
    pipe = _tiny_pipeline(tiny_cache)
    vae = pipe.vae
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    assert scale != 1.0 and shift != 0.0  # measured at export, so a double application would show
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = vae.decode(z).sample.clamp(-1, 1)
        torch.testing.assert_close(pipe.decode_latents((z - shift) * scale), expected)


def test_trainer_loss_drops_and_writes_sample_grids(ldm_run):
    out, summary = ldm_run
    logged = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(10, 61, 10))
    assert logged[-1]["loss"] < 0.85 * logged[0]["loss"], [r["loss"] for r in logged]
    assert summary["num_classes"] == 10 and summary["skipped_steps"] == 0
    grid = Image.open(out / "samples" / "samples_0000060.png")
    assert grid.size[1] > grid.size[0]  # one row per class: 10 rows of 2 (sample.per_class)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_every_schedule_and_prediction_type_trains(tiny_ldm_cfg, tmp_path, prediction):
    schedule = {"epsilon": "cosine", "v_prediction": "scaled_linear"}[prediction]
    summary = train_ldm(tiny_ldm_cfg("train.max_steps=6", "train.log_every=3", "train.image_every=6",
                                     "train.checkpoint_every=6", f"diffusion.prediction_type={prediction}",
                                     f"diffusion.beta_schedule={schedule}", "diffusion.beta_start=0.00085",
                                     "diffusion.beta_end=0.012"), tmp_path / "run").summary
    assert summary["steps"] == 6 and np.isfinite(summary["final_logs"]["loss"])
    pipe = load_pipeline(tmp_path / "run", solver="ddim")
    assert pipe.scheduler.config.prediction_type == prediction


def test_unconditional_training_and_sampling(tiny_ldm_cfg, tmp_path):
    train_ldm(tiny_ldm_cfg("train.max_steps=4", "train.image_every=4", "train.checkpoint_every=4",
                           "diffusion.class_conditional=false", "export.license=apache-2.0"), tmp_path / "run")
    pipe = load_pipeline(tmp_path / "run")
    assert pipe.num_classes == 0 and pipe.unet.config.num_class_embeds is None
    card = (export_pipeline(tmp_path / "run", tmp_path / "pipe") / "README.md").read_text()
    assert "license: apache-2.0" in card and "pipeline_tag: unconditional-image-generation" in card
    images = generate(pipe, 3, sample_labels(0, None, 3), 2, 1.0, 0, 2, progress=False)
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    with pytest.raises(UserError, match="unconditional"):
        sample_labels(0, [1], 3)


def test_stock_diffusers_generates_the_same_images_as_ldm_vae_sample(ldm_run, tmp_path):
    out, _ = ldm_run
    export_pipeline(out, tmp_path / "pipe")
    stock = DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), trust_remote_code=True)
    assert type(stock).__name__ == "LatentDiffusionPipeline" and type(stock) is not LatentDiffusionPipeline
    labels = [3, 3, 0, 9]
    theirs = stock(class_labels=labels, num_inference_steps=5, guidance_scale=3.0,
                   generator=torch.Generator().manual_seed(7), output_type="pt").images
    ours = load_pipeline(out)  # built from the run's checkpoint, not from the export
    assert torch.equal(generate(ours, 4, labels, 5, 3.0, 7, 4, progress=False), theirs)
    # the same through the command line, compared as the PNGs it writes
    proc = subprocess.run([sys.executable, "-m", "ldm_vae", "sample", str(out), "--num-images", "4", "--steps", "5",
                           "--seed", "7", "--batch-size", "4", "--out", str(tmp_path / "png"),
                           *[a for c in labels for a in ("--class-label", str(c))]], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pil = stock(class_labels=labels, num_inference_steps=5, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(7)).images
    for i, image in enumerate(pil):
        written = np.asarray(Image.open(tmp_path / "png" / f"sample_{i:05d}.png"))
        assert np.abs(written.astype(int) - np.asarray(image).astype(int)).max() <= 1  # PNG rounding only
    assert (tmp_path / "png" / "grid.png").is_file()
    # DDIM from the stock pipeline, through the folder's own class
    stock.use_solver("ddim")
    assert type(stock.scheduler).__name__ == "DDIMScheduler" and stock.scheduler.config.clip_sample is False
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert "trust_remote_code=True" in card and "3 = Dress" in card


def test_export_pipeline_refuses_to_overwrite(ldm_run, tmp_path):
    out, _ = ldm_run
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        export_pipeline(out, tmp_path / "pipe")
    assert (tmp_path / "pipe" / "keep.txt").read_text() == "mine"



def test_ldm_channels_last_and_compile_train_the_same_unet(tiny_ldm_cfg, tmp_path):
    """The speed options change how the LDM step runs, not what it computes."""
    overrides = ("train.max_steps=3", "train.log_every=1", "train.image_every=100")
    plain = train_ldm(tiny_ldm_cfg(*overrides), tmp_path / "plain")
    fast = train_ldm(tiny_ldm_cfg(*overrides, "train.channels_last=true", "train.compile=true"), tmp_path / "fast")
    assert fast.summary["skipped_steps"] == 0
    unets = [dict(s.unet.named_parameters()) for s in (plain, fast)]
    assert unets[0].keys() == unets[1].keys()
    for k in unets[0]:
        torch.testing.assert_close(unets[1][k], unets[0][k], rtol=1e-3, atol=1e-4, msg=k)
