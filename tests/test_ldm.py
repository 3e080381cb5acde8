"""Latent diffusion: guidance, scaling applied once, the trainer learns, sampling, and the
exported pipeline in stock diffusers generates exactly what `ldm-vae sample` generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline, LDMPipeline
from PIL import Image

from ldm_vae.autoencoder.models import fold_shift, load_autoencoder
from ldm_vae.cli import main
from ldm_vae.diffusion.config import UNetConfig
from ldm_vae.diffusion.export import export_pipeline
from ldm_vae.diffusion.networks import NULL_LABEL, build_unet, noise_schedule
from ldm_vae.diffusion.pipeline import make_scheduler
from ldm_vae.diffusion.sample import (
    generate,
    image_generators,
    load_pipeline,
    run_pipeline,
    sample_labels,
)
from ldm_vae.diffusion.train import train_ldm
from ldm_vae.errors import UserError

from .conftest import (
    TINY_LDM,
    assert_trains_the_same,
    fake_hub,
    files_in,
    pushed_card,
    train_recording,
)


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

    scheduler = make_scheduler("ddim", noise_schedule(DiffusionConfig()).config)
    return run_pipeline(unet, vae, scheduler, [str(c) for c in range(num_classes)] if num_classes else None), vae


def test_the_stock_pipeline_guides_with_the_null_label_and_decodes_the_scaling_once(tiny_cache):
    """A class-conditional UNet in diffusers' DiTPipeline: each step's model output is
    uncond + s * (cond - uncond) with the null label 1000 the trainer drops labels to (at s = 1,
    the conditional prediction alone), and the images are the autoencoder's decoding of
    latents / scaling_factor + shift_factor: checked against a sampling loop written here."""
    pipe, vae = _tiny_pipeline(tiny_cache)
    unet, sched = pipe.denoiser, pipe.scheduler
    assert unet.config.num_class_embeds == NULL_LABEL + 1 == 1001
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    assert scale != 1.0 and shift != 0.0  # measured at export, so a double application or a lost shift would show
    labels = torch.tensor([0, 3, 3, 9])
    for s in (1.0, 3.0):
        x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        sched.set_timesteps(3)
        with torch.no_grad():
            for t in sched.timesteps:
                cond = unet(x, t, class_labels=labels).sample
                uncond = unet(x, t, class_labels=torch.full_like(labels, NULL_LABEL)).sample
                assert not torch.allclose(cond, uncond)  # the null class really is another input
                x = sched.step(cond if s == 1 else uncond + s * (cond - uncond), t, x).prev_sample
            expected = (vae.decode(x / scale + shift).sample.clamp(-1, 1) + 1) / 2
        got = pipe(class_labels=labels, num_inference_steps=3, guidance_scale=s,
                   generator=torch.Generator().manual_seed(5), output_type="pt").images
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)  # the folded shift: float rounding


def test_folding_the_shift_keeps_the_autoencoders_function(tiny_cache):
    """The exported pipeline's autoencoder (issue 16: stock pipelines ignore shift_factor) encodes
    to z - shift and decodes from it, with shift_factor 0; the variance and scale are unchanged."""
    vae = _tiny_pipeline(tiny_cache)[1]
    shift = vae.config.shift_factor
    folded = fold_shift(vae)
    assert folded.config.shift_factor == 0 and vae.config.shift_factor == shift != 0  # a copy, not in place
    assert folded.config.scaling_factor == vae.config.scaling_factor
    x, z = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ours, theirs = vae.encode(x).latent_dist, folded.encode(x).latent_dist
        torch.testing.assert_close(theirs.mean, ours.mean - shift, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs.std, ours.std)
        torch.testing.assert_close(folded.decode(z - shift).sample, vae.decode(z).sample, atol=1e-5, rtol=0)
    assert fold_shift(folded) is folded  # nothing left to fold


def test_trainer_loss_drops_and_writes_sample_grids(ldm_run):
    out, summary = ldm_run
    logged = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(10, 61, 10))
    assert logged[-1]["loss"] < 0.85 * logged[0]["loss"], [r["loss"] for r in logged]
    assert summary["num_classes"] == 10 and summary["skipped_steps"] == 0
    grid = Image.open(out / "samples" / "samples_0000060.png")
    assert grid.size[1] > grid.size[0]  # one row per class: 10 rows of 2 (sample.per_class)


def _spy_on_training(monkeypatch) -> list[dict]:
    """Records each training step of a run as it really happens: the batch's labels, what
    add_noise got (latents z, noise, timesteps t), the labels the UNet got and the loss target.
    Preview grids run under no_grad and are not recorded."""
    from diffusers import DDPMScheduler, UNet2DModel

    from ldm_vae.diffusion.train import LDMTrainer

    steps: list[dict] = []
    real_step, real_add = LDMTrainer.train_step, DDPMScheduler.add_noise
    real_forward, real_mse = UNet2DModel.forward, torch.nn.functional.mse_loss

    def train_step(self, batch, step):
        steps.append({"batch_labels": batch["label"].clone()})
        out = real_step(self, batch, step)
        steps[-1]["loss"] = out[1]["loss"]
        return out

    def add_noise(self, z, noise, t):
        steps[-1].update(z=z.clone(), noise=noise.clone(), t=t.clone())
        return real_add(self, z, noise, t)

    def forward(self, sample, timestep, class_labels=None, **kwargs):
        if torch.is_grad_enabled():
            steps[-1]["labels"] = None if class_labels is None else class_labels.clone()
        return real_forward(self, sample, timestep, class_labels=class_labels, **kwargs)

    def mse_loss(pred, target, *args, **kwargs):
        steps[-1].update(pred=pred.detach().clone(), target=target.detach().clone())
        return real_mse(pred, target, *args, **kwargs)

    monkeypatch.setattr(LDMTrainer, "train_step", train_step)
    monkeypatch.setattr(DDPMScheduler, "add_noise", add_noise)
    monkeypatch.setattr(UNet2DModel, "forward", forward)
    monkeypatch.setattr(torch.nn.functional, "mse_loss", mse_loss)
    return steps


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_every_schedule_and_prediction_type_trains(tiny_ldm_cfg, tmp_path, monkeypatch, prediction):
    schedule = {"epsilon": "cosine", "v_prediction": "scaled_linear"}[prediction]
    cfg = tiny_ldm_cfg("train.max_steps=8", "train.log_every=1", "train.image_every=8", "train.checkpoint_every=8",
                       "train.lr=3e-3", "train.lr_warmup_steps=0", "sample.steps=1",
                       f"diffusion.prediction_type={prediction}",
                       f"diffusion.beta_schedule={schedule}", "diffusion.beta_start=0.00085",
                       "diffusion.beta_end=0.012")
    steps = _spy_on_training(monkeypatch)
    summary = train_ldm(cfg, tmp_path / "run").summary
    assert summary["steps"] == len(steps) == 8 and np.isfinite(summary["final_logs"]["loss"])
    # the target the UNet learns: the noise, or v = sqrt(abar_t) noise - sqrt(1 - abar_t) z
    # (Salimans & Ho 2022), computed here from the schedule, not by the trainer's own call
    abar = noise_schedule(cfg.diffusion).alphas_cumprod
    for s in steps:
        a = abar[s["t"]].view(-1, 1, 1, 1)
        expected = s["noise"] if prediction == "epsilon" else a.sqrt() * s["noise"] - (1 - a).sqrt() * s["z"]
        torch.testing.assert_close(s["target"], expected)
    # and it learns it: the logged loss falls (deterministic with the seed; v-prediction on
    # this low-noise schedule falls least, about 7%)
    logged = (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in logged]
    assert np.mean(losses[-3:]) < 0.97 * np.mean(losses[:3]), losses
    pipe = load_pipeline(tmp_path / "run", solver="ddim")
    assert pipe.scheduler.config.prediction_type == prediction


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weighting_is_the_x0_error_weighted_by_min_snr_gamma(prediction):
    """Min-SNR-gamma (Hang et al. 2023): whatever the network predicts, the weighted loss is
    min(SNR_t, gamma) times the squared error of the clean latent that prediction implies
    (x0 = (x_t - s eps) / a, or x0 = a x_t - s v), per image; gamma above every SNR leaves
    the epsilon loss as it was."""
    from ldm_vae.diffusion.config import DiffusionConfig
    from ldm_vae.diffusion.train import diffusion_loss

    dc = DiffusionConfig(prediction_type=prediction, snr_gamma=5.0)
    sched = noise_schedule(dc)
    g = torch.Generator().manual_seed(0)
    z, noise, pred = (torch.randn(64, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.arange(0, 1000, 1000 // 64)[:64]  # nearly clean to pure noise: SNR 1e4 .. 4e-5
    abar = sched.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x_t = a * z + s * noise
    target = noise if prediction == "epsilon" else a * noise - s * z
    x0_hat = (x_t - s * pred) / a if prediction == "epsilon" else a * x_t - s * pred
    snr = (abar / (1 - abar)).flatten()
    assert snr.max() > 5 > snr.min()  # both sides of gamma are tested
    expected = (snr.clamp(max=5) * (x0_hat - z).square().flatten(1).mean(1)).mean()
    got = diffusion_loss(pred, target.float(), t, sched, dc)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=0)
    if prediction == "epsilon":
        plain = DiffusionConfig(prediction_type=prediction)
        torch.testing.assert_close(diffusion_loss(pred, target.float(), t, sched,
                                                  DiffusionConfig(prediction_type=prediction, snr_gamma=1e9)),
                                   diffusion_loss(pred, target.float(), t, sched, plain))


def test_the_trainer_weights_its_loss_by_min_snr(tiny_ldm_cfg, tmp_path, monkeypatch):
    """`diffusion.snr_gamma` reaches the training step: each logged loss is the per-image MSE
    of that step's prediction weighted by min(SNR_t, gamma) / SNR_t."""
    cfg = tiny_ldm_cfg("train.max_steps=3", "train.log_every=1", "train.image_every=100",
                       "train.checkpoint_every=100", "sample.steps=1", "diffusion.snr_gamma=5")
    steps = _spy_on_training(monkeypatch)
    train_ldm(cfg, tmp_path / "run")
    abar = noise_schedule(cfg.diffusion).alphas_cumprod
    for s in steps:
        snr = abar[s["t"]] / (1 - abar[s["t"]])
        per_image = (s["pred"] - s["target"]).square().flatten(1).mean(1)
        torch.testing.assert_close(s["loss"], (snr.clamp(max=5) / snr * per_image).mean())
    assert len(steps) == 3


def test_labels_are_dropped_to_the_null_class_at_the_configured_rate(tiny_ldm_cfg, tmp_path, monkeypatch):
    """Classifier-free guidance training: each label becomes the null class (label 1000)
    with probability diffusion.label_dropout, independently; the others are left alone."""
    common = ("train.batch_size=128", "train.image_every=100", "train.checkpoint_every=100", "sample.steps=1",
              "sample.per_class=1")
    for rate, max_steps in ((0.3, 3), (0.0, 1)):
        steps = _spy_on_training(monkeypatch)
        train_ldm(tiny_ldm_cfg(*common, f"train.max_steps={max_steps}", f"diffusion.label_dropout={rate}"),
                  tmp_path / f"run{rate}")
        given = torch.cat([s["batch_labels"] for s in steps])
        used = torch.cat([s["labels"] for s in steps])
        dropped = used != given
        assert given.max() < 10 and (used[dropped] == NULL_LABEL).all()  # only ever the null class
        n, k = len(given), int(dropped.sum())
        # a binomial(n, rate) count, to within 4.5 standard deviations (384 labels at 0.3: 75..155)
        assert abs(k - n * rate) <= 4.5 * (n * rate * (1 - rate)) ** 0.5, (k, n, rate)
        monkeypatch.undo()
    assert k == 0 and n == 128  # rate 0: not one label replaced


def test_unconditional_training_and_sampling(tiny_ldm_cfg, tmp_path):
    train_ldm(tiny_ldm_cfg("train.max_steps=4", "train.image_every=4", "train.checkpoint_every=4",
                           "diffusion.conditioning=none", "export.license=apache-2.0"), tmp_path / "run")
    pipe = load_pipeline(tmp_path / "run")
    assert pipe.num_classes == 0 and pipe.unet.config.num_class_embeds is None
    card = (export_pipeline(tmp_path / "run", tmp_path / "pipe") / "README.md").read_text()
    assert "license: apache-2.0" in card and "pipeline_tag: unconditional-image-generation" in card
    assert 'LDMPipeline.from_pretrained("' in card and "trust_remote_code" not in card
    images = generate(pipe, 3, sample_labels(0, None, 3), 2, 1.0, 0, 3, progress=False)
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    # the folder is a stock LDMPipeline that generates the same images
    stock = LDMPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert type(stock) is LDMPipeline and stock.vqvae.config.shift_factor == 0
    theirs = stock(batch_size=3, num_inference_steps=2, generator=image_generators(0, range(3)),
                   output_type="np").images
    torch.testing.assert_close(torch.from_numpy(theirs).permute(0, 3, 1, 2), images, atol=1e-5, rtol=0)
    torch.testing.assert_close(generate(load_pipeline(tmp_path / "pipe"), 3, None, 2, 1.0, 0, 3, progress=False),
                               images, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="unconditional"):
        sample_labels(0, [1], 3)


def test_stock_diffusers_generates_the_same_images_as_ldm_vae_sample(ldm_run, tiny_cache, tmp_path):
    out, _ = ldm_run
    export_pipeline(out, tmp_path / "pipe")
    stock = DiTPipeline.from_pretrained(str(tmp_path / "pipe"))  # a UNet as its `transformer`
    assert type(stock) is DiTPipeline and type(stock.transformer).__name__ == "UNet2DModel"
    assert not (tmp_path / "pipe" / "pipeline.py").exists() and stock.labels["Dress"] == 3
    labels = [3, 3, 0, 9]
    theirs = stock(class_labels=labels, num_inference_steps=5, guidance_scale=3.0,
                   generator=image_generators(7, range(4)), output_type="pt").images
    ours = load_pipeline(out)  # built from the run's checkpoint, not from the export
    # the run's autoencoder has its shift folded into its biases on load: equal up to float rounding
    assert json.loads((tiny_cache / "cache.json").read_text())["shift_factor"] != 0
    assert stock.vae.config.shift_factor == 0
    torch.testing.assert_close(generate(ours, 4, labels, 5, 3.0, 7, 4, progress=False), theirs, atol=1e-5, rtol=0)
    # the same through the command line (in this process: a new one would spend ~10 s importing torch),
    # compared as the PNGs it writes
    assert main(["sample", str(out), "--num-images", "4", "--steps", "5", "--seed", "7", "--batch-size", "4",
                 "--out", str(tmp_path / "png"), *[a for c in labels for a in ("--class-label", str(c))]]) == 0
    pil = stock(class_labels=labels, num_inference_steps=5, guidance_scale=3.0,
                generator=image_generators(7, range(4))).images
    for i, image in enumerate(pil):
        written = np.asarray(Image.open(tmp_path / "png" / f"sample_{i:05d}.png"))
        assert np.abs(written.astype(int) - np.asarray(image).astype(int)).max() <= 1  # PNG rounding only
    assert (tmp_path / "png" / "grid.png").is_file()
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert 'DiTPipeline.from_pretrained("' in card and "trust_remote_code" not in card and "3 = Dress" in card
    assert "The pipeline's `transformer` is a `UNet2DModel`" in card


def test_a_dit_that_diffusers_dit_pipeline_could_not_run_is_refused():
    from ldm_vae.diffusion.config import DiTConfig
    from ldm_vae.diffusion.networks import build_dit

    with pytest.raises(UserError, match="cannot be cut into dit.patch_size=3 patches"):
        build_dit(DiTConfig(patch_size=3), [4, 8, 8], 10)
    with pytest.raises(UserError, match="network: dit is class-conditional and this cache has no classes"):
        build_dit(DiTConfig(), [4, 8, 8], None)
    # more classes than DiTPipeline's null label leaves room for, whichever the network
    with pytest.raises(UserError, match="network: dit takes at most 1000 classes"):
        build_dit(DiTConfig(), [4, 8, 8], 1001)
    with pytest.raises(UserError, match="network: unet takes at most 1000 classes"):
        build_unet(UNetConfig(), [4, 8, 8], 1001)


def test_a_dit_run_exports_as_a_stock_dit_pipeline_that_samples_like_ldm_vae_sample(tiny_ldm_cfg, tiny_cache, tmp_path):
    """network: dit trains diffusers' DiTTransformer2DModel on the cache (its loss falls); its
    null class is DiTPipeline's hard-coded 1000 and only the trainer drops labels; the export
    is a plain DiTPipeline folder (no pipeline.py, no remote code, the class names as
    id2label) that generates the images `ldm-vae sample` generates from the run."""
    from diffusers import DiTPipeline

    cfg = tiny_ldm_cfg("network=dit", "dit.num_layers=2", "dit.num_attention_heads=2", "dit.attention_head_dim=16",
                       "train.max_steps=40", "train.log_every=10", "train.image_every=40",
                       "train.checkpoint_every=40")
    run = train_ldm(cfg, tmp_path / "run")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.85 * losses[0], losses
    assert (tmp_path / "run" / "samples" / "samples_0000040.png").is_file()  # the preview, through DiTPipeline
    labels_embedding = run.unet.transformer_blocks[0].norm1.emb.class_embedder
    assert labels_embedding.embedding_table.num_embeddings == NULL_LABEL + 1 == 1001
    assert labels_embedding.dropout_prob == 0  # the trainer's seeded dropout only
    export_pipeline(tmp_path / "run", tmp_path / "pipe")
    assert not (tmp_path / "pipe" / "pipeline.py").exists()
    stock = DiTPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert type(stock) is DiTPipeline and stock.labels["Dress"] == 3 and stock.vae.config.shift_factor == 0
    labels = [3, 3, 0, 9]
    theirs = stock(class_labels=labels, num_inference_steps=5, guidance_scale=3.0,
                   generator=image_generators(7, range(4)), output_type="pt").images
    for source in (tmp_path / "run", tmp_path / "pipe"):  # ldm-vae's pipeline of the run, and of the folder
        ours = generate(load_pipeline(source), 4, labels, 5, 3.0, 7, 4, progress=False)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)  # the run folds its vae on load: rounding
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert 'DiTPipeline.from_pretrained("' in card and "trust_remote_code" not in card
    assert "DiTTransformer2DModel" in card and "3 = Dress" in card
    shift = json.loads((tiny_cache / "cache.json").read_text())["shift_factor"]
    assert shift != 0 and f"the autoencoder's mean {shift:.6g}, which is folded" in card


@pytest.mark.parametrize("solver", ["dpm++", "ddim"])
def test_samplers_use_trailing_timesteps_and_never_clip_latents(ldm_run, solver):
    """README: DPM-Solver++(2M) by default (or DDIM), "trailing" timesteps so sampling starts
    from pure noise, and latents are never clipped (scaled latents are not confined to [-1, 1])."""
    out, _ = ldm_run
    sched = load_pipeline(out, solver=None if solver == "dpm++" else solver).scheduler  # dpm++: the run's default
    if solver == "dpm++":
        assert type(sched).__name__ == "DPMSolverMultistepScheduler"
        assert sched.config.algorithm_type == "dpmsolver++" and sched.config.solver_order == 2
    else:
        assert type(sched).__name__ == "DDIMScheduler"
    sched.set_timesteps(4)
    assert sched.config.timestep_spacing == "trailing"
    assert sched.timesteps.tolist() == [99, 74, 49, 24] and sched.config.num_train_timesteps == 100
    # Decisive: a model whose every x0 prediction is x0 (values up to ~9) must end at x0. Any
    # clipping (clip_sample, thresholding) of the predicted latents ends within about [-1, 1].
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * sched.init_noise_sigma
    x0 = 3 * torch.randn(2, 4, 8, 8, generator=g)
    for t in sched.timesteps:
        abar = sched.alphas_cumprod[t]
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()  # the noise that makes x0 the prediction
        x = sched.step(eps, t, x).prev_sample
    # DPM-Solver++ lands on x0; DDIM (set_alpha_to_one false) stops one training step short of it
    torch.testing.assert_close(x, x0, atol=1e-4 if solver == "dpm++" else 0.15, rtol=0)
    assert x0.abs().max() > 5


def test_exported_pipeline_loads_and_generates_without_ldm_vae(ldm_run, tmp_path):
    """The folder loads with stock DiTPipeline in a Python where ldm_vae cannot be imported (it
    is installed in this venv, editable, so block it), outside the repository, and generates."""
    out, _ = ldm_run
    folder = export_pipeline(out, tmp_path / "pipe")
    code = """
import sys
sys.modules["ldm_vae"] = None  # any `import ldm_vae...` now raises ImportError
import torch
from diffusers import DiTPipeline
pipe = DiTPipeline.from_pretrained(sys.argv[1])
image = pipe(class_labels=[3], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
             output_type="np").images
assert image.shape == (1, 16, 16, 3) and 0 <= image.min() and image.max() <= 1, image.shape
assert not [m for m in sys.modules if m.startswith("ldm_vae.")]
s = pipe.scheduler
print(type(pipe).__module__, type(s).__name__, s.config.algorithm_type, s.config.timestep_spacing)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, scheduler, algorithm, spacing = proc.stdout.split()[-4:]
    # diffusers' own class, with the DPM-Solver++ scheduler the folder saved
    assert module.startswith("diffusers.pipelines.dit"), module
    assert (scheduler, algorithm, spacing) == ("DPMSolverMultistepScheduler", "dpmsolver++", "trailing")


def test_a_pipeline_folder_of_another_kind_is_refused_by_name(tmp_path):
    """ldm-vae sample reads the stock folders export-pipeline writes; an older export (its own
    pipeline.py, named in model_index.json) is told to export again, not crashed on."""
    for name, expected in ((["pipeline", "LatentDiffusionPipeline"], "export the run again"),
                           ("KandinskyPipeline", "holds a KandinskyPipeline folder")):
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": name}))
        with pytest.raises(UserError, match=expected):
            load_pipeline(tmp_path)


def test_export_pipeline_refuses_to_overwrite(ldm_run, tmp_path):
    out, _ = ldm_run
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        export_pipeline(out, tmp_path / "pipe")
    assert (tmp_path / "pipe" / "keep.txt").read_text() == "mine"


def test_cli_export_pipeline_pushes_the_folder_and_its_card_names_the_repo(ldm_run, tmp_path, monkeypatch,
                                                                           capsys):
    """--push-to-hub (the Hub replaced by fakes): exactly the pipeline folder goes to the repo, and
    the card loads it from there; offline, the error says so and the folder stays complete."""
    from huggingface_hub.utils import httpx

    out, _ = ldm_run
    calls = fake_hub(monkeypatch)
    dest = tmp_path / "pipe"
    assert main(["export-pipeline", str(out), str(dest), "--push-to-hub", "someone/ldm-tiny"]) == 0
    files = files_in(dest)
    assert {"README.md", "model_index.json"} <= set(files) and "pipeline.py" not in files
    card = pushed_card(calls, dest, "someone/ldm-tiny")
    assert card.data.to_dict() == {"datasets": ["zalando-datasets/fashion_mnist"], "library_name": "diffusers",
                                   "license": "mit", "pipeline_tag": "unconditional-image-generation",
                                   "tags": ["ldm-vae", "latent-diffusion", "class-conditional"]}
    assert 'DiTPipeline.from_pretrained("someone/ldm-tiny")' in card.text
    # `ldm-vae sample` reads a local folder: the card downloads one first
    assert "`hf download someone/ldm-tiny --local-dir ldm-tiny`, then `ldm-vae sample ldm-tiny" in card.text

    fake_hub(monkeypatch, error=httpx.ConnectError("[Errno -2] Name or service not known"))
    assert main(["export-pipeline", str(out), str(dest), "--push-to-hub", "someone/ldm-tiny", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "(ConnectError: [Errno -2] Name or service not known)" in err
    assert f"complete at {dest}; push it later with `hf upload someone/ldm-tiny {dest}`" in err
    assert files_in(dest) == files



def test_ldm_channels_last_trains_the_same_unet(tiny_ldm_cfg, tmp_path, monkeypatch):
    """train.channels_last changes how the LDM step runs, not what it computes: the plain
    run's first gradient, and it ends where the plain run ends (no warm-up: the weights move).
    (train.compile is `unet.compile()`; compiled training is compared for the autoencoder in
    test_train.py: a second cold inductor compile would cost two minutes of the suite.)"""
    import ldm_vae.diffusion.train as trainer

    overrides = ("train.max_steps=3", "train.log_every=1", "train.image_every=100", "train.lr_warmup_steps=0")
    runs = {}
    for flag in ("plain", "channels_last"):
        cfg = tiny_ldm_cfg(*overrides, *([f"train.{flag}=true"] if flag != "plain" else []))
        runs[flag] = train_recording(monkeypatch, trainer, lambda cfg=cfg, flag=flag: train_ldm(cfg, tmp_path / flag))
    assert json.loads((tmp_path / "channels_last" / "summary.json").read_text())["skipped_steps"] == 0
    assert_trains_the_same(runs["plain"], runs["channels_last"], "channels_last")
