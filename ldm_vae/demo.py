"""`ldm-vae demo`: the whole path on Fashion-MNIST, end to end, with a report.

Stages (each timed): train the KL-VAE (configs/kl_f4_fashion.yaml, shortened) and export
it; train the domain feature extractor for Fréchet distances; evaluate the autoencoder on
the test split; encode the train split; train the class-conditional LDM
(configs/ldm_fashion.yaml); sample every class; measure Fréchet distances and the
classifier's accuracy on the samples; export the pipeline and check that stock diffusers
reloads it and generates the same images. OUT/REPORT.md shows the pictures and numbers.

The full demo takes about 50 minutes on a 2-core CPU VM (README, "Measured: the demo");
`--quick` runs the same stages on tiny sizes in about a minute (it checks the path, not the
quality).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .autoencoder.config import Config
from .autoencoder.train import train
from .config import load_config
from .data.sources import build_dataset
from .diffusion.config import LDMConfig
from .diffusion.export import export_pipeline
from .diffusion.latents import encode_dataset
from .diffusion.sample import generate, image_generators, load_run_pipeline
from .diffusion.train import train_ldm
from .evaluation.features import train_fd_features
from .evaluation.frechet import frechet_result, images01, load_fd_features
from .evaluation.report import EvalOptions, run_eval
from .files import refuse_nonempty, save_image

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    vae_overrides: list[str]
    fd_steps: int
    eval_images: int
    bound_images: int
    encode_images: int | None  # None: the whole train split
    ldm_overrides: list[str]
    fd_samples: int
    sample_steps: int = 20
    # classifier-free guidance of the samples, the lowest that keeps the class accuracy above
    # 90%: with the plain loss that was 2.5 (README, "the demo": 3.0 gave sample FD 6.8x the
    # reconstructions' at 93% accuracy, 2.5 gave 5.0x at 91.5%, 2.0 3.6x at 88.2%); with the
    # Min-SNR-5 loss (MIN_SNR) 2.0 keeps 91.8% and 91.6% on two training seeds at 3.0x
    # (README, "the LDM's loss weighting"; the plain loss's LDMs at 2.0: 87.6%, 87.4%)
    guidance_scale: float = 2.0


# The decoder learns to reconstruct from noised latents (l-DeTok, arXiv:2507.15856): in the
# diffusability study (README, "Diffusability") it was the one regulariser that improved the
# LDM's samples (-29% sample FD, +3 points of class accuracy) at a cost of 1.3 dB PSNR.
LATENT_NOISE = "diffusability.latent_noise_max=0.3"
# Min-SNR-5 loss weighting of the LDM (Hang et al. 2023, arXiv:2303.09556): on the demo's
# latents, two training seeds each, 10,000 samples at guidance 2.5, it raised the class
# accuracy from 90.4% (both seeds) to 94.6% and 94.1% at an unchanged sample FD (0.480 and
# 0.503 against 0.546 and 0.483), which lets the guidance come down (Plan.guidance_scale;
# README, "the LDM's loss weighting").
MIN_SNR = "diffusion.snr_gamma=5"
# the default config shortened to fit the demo's budget, GAN phase scaled along (also the
# study's base recipe, scripts/diffusability_study.py)
SHORT_RECIPE = ["train.max_steps=900", "loss.disc_start=650", "loss.disc_pretrain_steps=100",
                "train.checkpoint_every=300", "train.image_every=300"]
FULL = Plan(
    vae_overrides=[*SHORT_RECIPE, LATENT_NOISE],
    fd_steps=500, eval_images=10_000, bound_images=256, encode_images=None,
    ldm_overrides=[MIN_SNR], fd_samples=10_000)
QUICK = Plan(
    vae_overrides=["data.max_images=512", "train.max_steps=20", "loss.disc_start=15", "loss.disc_pretrain_steps=5",
                   "train.log_every=5", "train.checkpoint_every=20", "train.image_every=20",
                   "export.scale_num_images=256", LATENT_NOISE],
    fd_steps=30, eval_images=200, bound_images=16, encode_images=512,
    ldm_overrides=[MIN_SNR, "train.max_steps=30", "train.batch_size=32", "train.log_every=5",
                   "train.image_every=30", "train.checkpoint_every=30", "sample.per_class=2"],
    fd_samples=200, sample_steps=10)


class Stages:
    """Times each stage; the table goes into the report."""

    def __init__(self):
        self.rows: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        logger.info(f"demo stage: {name}")
        t0 = time.perf_counter()
        yield
        self.rows.append((name, time.perf_counter() - t0))
        logger.info(f"demo stage: {name}: done in {self.rows[-1][1]:.0f} s")


@torch.no_grad()
def class_accuracy(fd, samples: torch.Tensor, labels: list[int], num_classes: int) -> list[float]:
    """Per class, the share of the samples drawn for it (images in [0, 1]) that the domain
    extractor's classifier (`fd`, load_fd_features) assigns to it."""
    predicted = torch.cat([fd.network.module.logits(samples[i:i + 500] * 2 - 1).argmax(1)
                           for i in range(0, len(samples), 500)])
    wanted = torch.tensor(labels)
    return [(predicted[wanted == c] == c).float().mean().item() for c in range(num_classes)]


def run_demo(out: Path, quick: bool = False, overwrite: bool = False, data_path: str | None = None) -> Path:
    """Run every stage into `out`; returns the path of REPORT.md."""
    if not overwrite:
        refuse_nonempty(out, what=" (a previous demo?)")
    plan = QUICK if quick else FULL
    data_override = [f"data.path={data_path}"] if data_path else []
    vae_cfg = load_config("kl_f4_fashion", data_override + plan.vae_overrides, Config)  # the bundled configs
    test_ds = build_dataset(vae_cfg.data, "test", train=False)  # fails here, before anything is deleted
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    stages = Stages()
    t_start = time.perf_counter()

    with stages("train the KL-VAE and export it"):
        vae_summary = train(vae_cfg, out / "vae").summary
    export = out / "vae" / "export"
    data = dataclasses.replace(vae_cfg.data, random_flip=False, max_images=plan.encode_images)

    with stages("train the Fréchet feature extractor"):
        fd_meta = train_fd_features(dataclasses.replace(vae_cfg.data, max_images=None), out / "features",
                                    "fashion_mnist", steps=plan.fd_steps)

    with stages("evaluate the autoencoder on the test split"):
        eval_report = run_eval([str(export)], out / "eval",
                               EvalOptions(num_images=plan.eval_images, fd_features=str(out / "features"),
                                           bound_images=plan.bound_images),
                               source="fashion-mnist", data_path=data_path, update_card=True)
    recon = eval_report["results"][0]["metrics"]

    with stages("encode the train split"):
        cache = encode_dataset(export, data, "train", out / "latents")

    with stages("train the class-conditional LDM"):
        ldm_cfg = load_config("ldm_fashion", [f"latents={out / 'latents'}", *plan.ldm_overrides], LDMConfig)
        ldm_summary = train_ldm(ldm_cfg, out / "ldm").summary

    pipe, _ = load_run_pipeline(out / "ldm", solver="dpm++")
    num_classes = pipe.num_classes
    names = cache.get("class_names") or [str(c) for c in range(num_classes)]
    with stages(f"sample every class ({plan.fd_samples} images)"):
        grid_labels = [c for c in range(num_classes) for _ in range(10)]
        grid = generate(pipe, len(grid_labels), grid_labels, plan.sample_steps, plan.guidance_scale, 0, 100)
        save_image(grid * 2 - 1, out / "samples_grid.png", nrow=10)
        labels = [i % num_classes for i in range(plan.fd_samples)]
        samples = generate(pipe, plan.fd_samples, labels, plan.sample_steps, plan.guidance_scale, 1, 250)

    with stages("Fréchet distances and class accuracy of the samples"):
        fd = load_fd_features(out / "features")
        fd_name = fd.name
        real = images01(test_ds, 10_000)
        train_images = images01(build_dataset(dataclasses.replace(vae_cfg.data, max_images=None), "train",
                                             train=False), len(real))
        real_features = fd.features(real)
        fd_samples = frechet_result(real_features, fd.features(samples), bootstrap=100)
        fd_train = frechet_result(real_features, fd.features(train_images), bootstrap=100)
        per_class = class_accuracy(fd, samples, labels, num_classes)

    with stages("export the pipeline and reload it with stock diffusers"):
        export_pipeline(out / "ldm", out / "pipeline")
        from diffusers import DiTPipeline

        stock = DiTPipeline.from_pretrained(str(out / "pipeline"))
        stock.set_progress_bar_config(disable=True)
        check_labels = list(range(num_classes))
        theirs = stock(class_labels=check_labels, num_inference_steps=plan.sample_steps,
                       guidance_scale=plan.guidance_scale, generator=image_generators(0, range(num_classes)),
                       output_type="pt").images
        ours = generate(pipe, num_classes, check_labels, plan.sample_steps, plan.guidance_scale, 0, num_classes,
                        progress=False)
        stock_diff = (theirs.cpu() - ours).abs().max().item()

    total = time.perf_counter() - t_start
    results = {
        "quick": quick, "total_s": round(total, 1), "stages": [{"stage": n, "seconds": round(s, 1)}
                                                               for n, s in stages.rows],
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
        "autoencoder": {"steps": vae_summary["steps"], "perceptual": vae_summary["perceptual"],
                        "psnr_db": recon["psnr_db"], "ssim": recon["ssim"], fd_name: recon.get(fd_name),
                        "ci95": recon.get("ci95", {}).get(fd_name),
                        "num_images": recon["num_images"], "unavailable": recon.get("unavailable", {})},
        "fd_features": {"steps": plan.fd_steps, "test_accuracy": fd_meta["test_accuracy"]},
        "latents": {"num": cache["num_images"], "shape": cache["latent_shape"],
                    "scaling_factor": cache["scaling_factor"], "shift_factor": cache["shift_factor"]},
        "ldm": {"steps": ldm_summary["steps"], "final_loss": ldm_summary["final_logs"].get("loss"),
                "train_s": ldm_summary["wall_time_s"], "snr_gamma": ldm_cfg.diffusion.snr_gamma},
        "samples": {"num": len(samples), "solver": "dpm++", "steps": plan.sample_steps,
                    "guidance_scale": plan.guidance_scale, f"{fd_name}_samples": fd_samples["value"],
                    f"{fd_name}_train_images": fd_train["value"],
                    "ci95": {f"{fd_name}_samples": fd_samples["ci95"], f"{fd_name}_train_images": fd_train["ci95"]}, "class_accuracy": sum(per_class) / len(per_class),
                    "class_accuracy_per_class": dict(zip(names, per_class))},
        "stock_diffusers_max_abs_diff": stock_diff,
    }
    (out / "report.json").write_text(json.dumps(results, indent=2))
    report = out / "REPORT.md"
    report.write_text(_report(results, fd_name, names, plan, len(real)))
    return report


def _interval(ci: list | None) -> str:
    return "–" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _report(r: dict, fd_name: str, names: list[str], plan: Plan, num_real: int) -> str:
    ae, s, ldm = r["autoencoder"], r["samples"], r["ldm"]
    stage_rows = "\n".join(f"| {x['stage']} | {x['seconds']:.0f} s |" for x in r["stages"])
    class_rows = "\n".join(f"| {i} | {name} | {100 * acc:.1f}% |"
                           for i, (name, acc) in enumerate(s["class_accuracy_per_class"].items()))
    unavailable = "".join(f"\n- `{k}` unavailable: {why}" for k, why in ae["unavailable"].items())
    quick = ("\n> **--quick run**: tiny sizes and few steps; it checks that every stage works, the pictures and "
             "numbers mean nothing.\n" if r["quick"] else "")
    return f"""# ldm-vae demo: Fashion-MNIST, end to end
{quick}
Total: **{r['total_s'] / 60:.1f} min** on {r['machine']}.

| stage | time |
|---|---|
{stage_rows}

## Autoencoder (KL-f4, {ae['steps']} steps)

Perceptual term: {ae['perceptual']}. Latent regulariser: the decoder also learns from noised
latents (`{LATENT_NOISE}`, l-DeTok), chosen by the diffusability study (README).

| test images | PSNR dB | SSIM | {fd_name} of reconstructions |
|---|---|---|---|
| {ae['num_images']} | {ae['psnr_db']:.2f} | {ae['ssim']:.4f} | {ae[fd_name]:.4f} |
{unavailable}

Reconstructions (top: test images, bottom: reconstructions), from `eval/`:

![reconstructions](eval/reconstructions.png)

## Latent diffusion ({ldm['steps']} steps, final loss {ldm['final_loss']:.4f})

{r['latents']['num']} latents of shape {r['latents']['shape']}, scaled by {r['latents']['scaling_factor']:.4f}.
Loss: the MSE weighted by Min-SNR-{ldm['snr_gamma']:g} (`diffusion.snr_gamma`), chosen by measurement (README).
Samples: DPM-Solver++ {s['steps']} steps, guidance scale {s['guidance_scale']:g}, one row per class
(top to bottom: {', '.join(names)}):

![samples](samples_grid.png)

| Fréchet distance in the `{fd_name}` feature space (to {num_real} test images) | value | 95% interval |
|---|---|---|
| {s['num']} LDM samples ({s['num'] // len(names)} per class) | {s[f'{fd_name}_samples']:.4f} | {_interval(s['ci95'][f'{fd_name}_samples'])} |
| the autoencoder's reconstructions of the test images | {ae[fd_name]:.4f} | {_interval(ae['ci95'])} |
| {num_real} real train images (the floor) | {s[f'{fd_name}_train_images']:.4f} | {_interval(s['ci95'][f'{fd_name}_train_images'])} |

The intervals are basic bootstrap intervals (100 resamples of both image sets): they bracket
the distance between the distributions, which a distance on finite sets overestimates.

The feature extractor is a small classifier trained here for {r['fd_features']['steps']} steps
(test accuracy {100 * r['fd_features']['test_accuracy']:.1f}%); the distances are `{fd_name}`, not FID.
Its classifier recognises the class asked for in **{100 * s['class_accuracy']:.1f}%** of the samples:

| label | class | samples classified as their class |
|---|---|---|
{class_rows}

## Pipeline

`pipeline/` loads with stock diffusers, no code of ours:

```python
import torch
from diffusers import DiTPipeline
pipe = DiTPipeline.from_pretrained("pipeline")
images = pipe(class_labels=[0, 1, 2], guidance_scale={s['guidance_scale']:g}, num_inference_steps={s['steps']},
              generator=torch.Generator().manual_seed(0)).images
```

Stock diffusers given the per-image noise of `ldm-vae sample --seed 0`
(`generator=ldm_vae.diffusion.sample.image_generators(0, range(N))` for N images) vs `ldm-vae sample`: max
abs difference
{r['stock_diffusers_max_abs_diff']:.3g}.

Reproduce: `ldm-vae demo{' --quick' if r['quick'] else ''}`; numbers in `report.json`.
"""
