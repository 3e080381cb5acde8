"""Side-by-side benchmarks, each comparison measured in one process: warm-up, repeats, median.

    python scripts/bench.py ae-step --repeats 40 [--phase gan|recon] [--compile]
    python scripts/bench.py ae-mfu  # on a GPU
    python scripts/bench.py data-loading --images 1000 --resolution 128 --repeats 3
    python scripts/bench.py ldm-cache [--vae runs/kl/export] [--out reports/bench]
    python scripts/bench.py sampling [--ldm runs/ldm]
    python scripts/bench.py tiled-decode [--vae runs/kl/export]
    python scripts/bench.py latent-memory [--sizes 10000 100000 1000000]

ae-step: one autoencoder training step in the GAN phase (generator with LPIPS and the
adaptive-weighted GAN term, then the discriminator; --phase recon: the phase before
loss.disc_start, without either), configs/kl_f4_fashion.yaml, fp32, data
loading included: the real trainer (`ldm-vae train-vae`, timed by its own throughput log)
vs a plain reference loop written here (stock AutoencoderKL, LPIPS, the same discriminator,
AdamW, no extras). Both are timed as the median of 5-step window means: the trainer logs
its throughput once per window (train.log_every=5). LPIPS has a random backbone: offline,
and it costs the same.

ae-mfu: the same trainer at 256x256, batch 32, bf16 autocast, with SD-VAE's KL-f8 layout
(128-256-512-512 channels, 2 layers per block): images/s and model FLOP utilisation
(FlopCounterMode's count of one step's forward and backward passes, times steps/s, over
the device's dense bf16 peak), eager / channels_last / torch.compile / both. Meant for a
GPU; on a CPU it runs (use a small --resolution) but has no peak to divide by.

data-loading: one epoch of an imagefolder of JPEGs (random crops of scikit-image's photos,
written to a temporary folder) through the training dataset (random crop and flip), with
and without the decoded-image cache (data.decoded_cache_mb); batch 64, no workers.

ldm-cache: one latent diffusion training step (default UNet of configs/ldm_fashion.yaml,
AdamW) on batches from a latent cache vs the same step on batches of Fashion-MNIST images
encoded on the fly by the autoencoder (posterior sample, scaled). Both include data loading.
Without --vae, an untrained autoencoder of configs/kl_f4_fashion.yaml stands in: encoding
costs the same whatever the weights.

sampling: images/s of the LDM pipeline (UNet steps with guidance, then decoding) with DDIM
at 50 steps and DPM-Solver++ at 20, batch 100. Without --ldm, untrained networks of the
default configs stand in (the cost does not depend on the weights).

tiled-decode: decoding the latent of one 1024x1024 image (a mosaic of 32x32 Fashion-MNIST
test images, encoded by the autoencoder) with and without diffusers' tiled decoding
(`enable_tiling()`, 256-pixel tiles). Each variant runs in a fresh process, whose peak
resident memory above its state before decoding is reported, with the time and the
difference to the untiled image. Both images are saved to OUT for a look at the seams.

latent-memory: peak resident memory (VmHWM) of a fresh process that builds the
LatentDataset of a synthetic KL cache (random mean and std of shape 4x8x8, labels, shards
of 10,000, a valid cache.json with checksums) of each size and draws 200 shuffled batches
of 128 through a DataLoader as the LDM trainer does; with the time to build (checksums
included) and per batch (median). Variants: the dataset (rows read per batch with pread), the
dataset before lazy reads (every shard loaded and concatenated at start), and rows read
through safetensors' safe_open(...).get_slice (memory mapped). The caches (2 GB at 10^6)
are written to a temporary folder and deleted afterwards.

Prints a table and writes OUT/<comparison>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_vae.autoencoder.config import Config  # noqa: E402
from ldm_vae.autoencoder.discriminator import PatchDiscriminator  # noqa: E402
from ldm_vae.autoencoder.models import build_autoencoder  # noqa: E402
from ldm_vae.autoencoder.perceptual import build_lpips  # noqa: E402
from ldm_vae.config import load_config  # noqa: E402
from ldm_vae.data.sources import build_dataset  # noqa: E402
from ldm_vae.diffusion.config import LDMConfig  # noqa: E402
from ldm_vae.diffusion.latents import CACHE_FILE, LatentDataset, encode_dataset  # noqa: E402
from ldm_vae.diffusion.networks import (
    build_unet,  # noqa: E402
    noise_schedule,  # noqa: E402
)
from ldm_vae.files import make_grid, save_image, sha256  # noqa: E402


def _median_step_time(step, batches, warmup: int, repeats: int) -> list[float]:
    """Seconds per step (loading the batch included) for `repeats` steps after `warmup`."""
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        step(next(batches))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _forever(loader):
    while True:
        yield from loader


def _reference_ae_step(cfg, gan: bool):
    """The plain loop of the public recipes (diffusers' train_autoencoderkl.py, taming): stock
    AutoencoderKL, LPIPS, the same PatchGAN, fp32, AdamW, and the adaptive weight from
    grad(nll) and grad(g) at the last layer before the whole loss's backward. No EMA, no
    clipping, no guard, no logging. gan=False: the phase before disc_start (no GAN term, no
    discriminator step)."""
    torch.manual_seed(cfg.seed)
    vae = build_autoencoder(cfg.model, cfg.data.resolution).train()
    disc = PatchDiscriminator(3, cfg.loss.disc_channels, cfg.loss.disc_layers).train()
    lpips = build_lpips(cfg.loss.lpips_net, random_backbone=True)  # ours equals lpips.LPIPS (tests/test_perceptual.py)
    betas = (cfg.train.adam_beta1, cfg.train.adam_beta2)
    opt_g = torch.optim.AdamW(vae.parameters(), lr=cfg.train.lr, betas=betas)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.train.disc_lr, betas=betas)
    last = vae.decoder.conv_out.weight

    def step(batch):
        x = batch["pixel_values"]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        nll = (x - recon).abs().mean() + cfg.loss.perceptual_weight * lpips(x, recon).mean()
        if not gan:
            opt_g.zero_grad()
            (nll + cfg.loss.kl_weight * posterior.kl().mean()).backward()
            opt_g.step()
            return
        g = -disc(recon).mean()
        nll_grad, = torch.autograd.grad(nll, last, retain_graph=True)
        g_grad, = torch.autograd.grad(g, last, retain_graph=True)
        weight = cfg.loss.disc_weight * (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach()
        loss = nll + cfg.loss.kl_weight * posterior.kl().mean() + weight * g
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        d_loss = 0.5 * (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean())
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()

    return step


def _ours_step_seconds(cfg, out: Path) -> list[float]:
    """Seconds per step of the real trainer (`ldm_vae.autoencoder.train.train`), one value per log
    window of train.log_every steps, from the trainer's own throughput log."""
    from ldm_vae.autoencoder.train import train

    train(cfg, out)
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [cfg.train.batch_size / r["images_per_s"] for r in rows]


def _window_means(times: list[float], k: int) -> list[float]:
    return [statistics.mean(times[i:i + k]) for i in range(0, len(times) - k + 1, k)]


AE_STEP_WINDOW = 5  # steps per timed window: the trainer logs its throughput once per window


def bench_ae_step(args) -> dict:
    gan, k = args.phase == "gan", AE_STEP_WINDOW
    warmup, repeats = -(-args.warmup // k) * k, max(k, args.repeats // k * k)  # whole windows
    n = warmup + repeats
    overrides = ["loss.lpips_random_backbone=true", f"loss.disc_start={0 if gan else n + 1}",
                 "loss.disc_pretrain_steps=0", f"train.max_steps={n}", f"train.log_every={k}", f"train.image_every={n}",
                 f"train.checkpoint_every={n}", f"data.max_images={args.images}", "export.scale_num_images=64",
                 "export.scale_batch_size=64"]
    cfg = load_config("kl_f4_fashion", overrides, Config)
    bs = cfg.train.batch_size
    images = build_dataset(cfg.data, cfg.data.train_split, train=True, seed=cfg.seed)
    loader = DataLoader(images, batch_size=bs, shuffle=True, drop_last=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    reference = _median_step_time(_reference_ae_step(cfg, gan), _forever(loader), warmup, repeats)
    times = {"reference loop": _window_means(reference, k)}
    variants = {"ldm-vae train-vae": [], "ldm-vae train-vae, train.channels_last": ["train.channels_last=true"]}
    if args.compile:
        variants["ldm-vae train-vae, train.compile"] = ["train.compile=true"]
    for i, (name, extra) in enumerate(variants.items()):
        times[name] = _ours_step_seconds(load_config("kl_f4_fashion", overrides + extra, Config),
                                         tmp / f"run{i}")[warmup // k:]
    results = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                      "images_per_s": bs / statistics.median(t)} for name, t in times.items()}
    ref = results["reference loop"]["images_per_s"]
    for r in results.values():
        r["vs_reference"] = r["images_per_s"] / ref
    phase = "GAN phase (disc_start=0)" if gan else "before disc_start (no discriminator)"
    return {"comparison": "ae-step", "config": f"configs/kl_f4_fashion.yaml, {phase}",
            "batch_size": bs, "resolution": cfg.data.resolution, "precision": "fp32",
            "lpips": f"{cfg.loss.lpips_net}, random backbone (offline; same cost as the pretrained one)",
            "warmup": warmup, "repeats": repeats, "timing": f"median of {k}-step window means",
            "results": results, "speedup": results["ldm-vae train-vae"]["vs_reference"],
            "target": ">= 1.0x, goal 1.3x"}


# dense bf16 tensor-core peaks (NVIDIA data sheets, SXM parts; without sparsity)
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
MFU_MODEL = ["model.block_out_channels=[128,256,512,512]", "model.layers_per_block=2"]  # SD-VAE's KL-f8 shape


def _step_flops(cfg, device: str) -> float:
    """FLOPs of one training step's forward and backward passes (autoencoder, LPIPS, both
    discriminator passes, the adaptive weight's gradients), counted by torch's FlopCounterMode
    on the same loss code the trainer runs. Optimizer and EMA updates are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm_vae.autoencoder.losses import AutoencoderLoss
    from ldm_vae.autoencoder.models import build_training_model

    ae = build_training_model(cfg).to(device).train()
    disc = PatchDiscriminator(3, cfg.loss.disc_channels, cfg.loss.disc_layers).to(device)
    loss_fn = AutoencoderLoss(cfg.loss, build_lpips(cfg.loss.lpips_net, random_backbone=True).to(device))
    x = torch.rand(cfg.train.batch_size, 3, cfg.data.resolution, cfg.data.resolution, device=device) * 2 - 1
    with FlopCounterMode(display=False) as counter, torch.autocast(device, dtype=torch.bfloat16):
        recon, latent = ae(x)
        disc.requires_grad_(False)
        loss, _ = loss_fn.generator(x, recon, latent, cfg.loss.disc_start, disc, ae.last_layer())
        loss.backward()
        disc.requires_grad_(True)
        real, fake = disc(torch.cat([x, recon.detach()])).chunk(2)
        loss_fn.discriminator(real, fake)[0].backward()
    return float(counter.get_total_flops())


def bench_ae_mfu(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = args.warmup + args.repeats
    overrides = [*MFU_MODEL, f"data.resolution={args.resolution}", f"train.batch_size={args.batch_size}",
                 "train.mixed_precision=bf16", "loss.lpips_random_backbone=true", "loss.disc_start=0",
                 "loss.disc_pretrain_steps=0", f"train.max_steps={n}", "train.log_every=1", f"train.image_every={n}",
                 f"train.checkpoint_every={n}", f"data.max_images={max(args.images, args.batch_size * n)}",
                 f"data.num_workers={args.workers}", "export.scale_num_images=64", "export.scale_batch_size=16"]
    cfg = load_config("kl_f4_fashion", overrides, Config)
    flops = _step_flops(cfg, device)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    variants = {"eager": [], "channels_last": ["train.channels_last=true"], "torch.compile": ["train.compile=true"],
                "channels_last + torch.compile": ["train.channels_last=true", "train.compile=true"]}
    tmp, results = Path(tempfile.mkdtemp(prefix="bench-")), {}
    for i, (variant, extra) in enumerate(variants.items()):
        times = _ours_step_seconds(load_config("kl_f4_fashion", overrides + extra, Config),
                                   tmp / f"run{i}")[args.warmup:]
        median = statistics.median(times)
        results[variant] = {"median_s": median, "images_per_s": cfg.train.batch_size / median,
                            "tflops_per_s": flops / median / 1e12,
                            "mfu": flops / median / (peak * 1e12) if peak else float("nan")}
    return {"comparison": "ae-mfu", "device": name, "bf16_peak_tflops": peak or "unknown: pass --peak-tflops",
            "model": "configs/kl_f4_fashion.yaml with " + ", ".join(MFU_MODEL), "resolution": args.resolution,
            "batch_size": args.batch_size, "precision": "bf16 autocast", "step_tflop": flops / 1e12,
            "warmup": args.warmup, "repeats": args.repeats, "results": results, "target": ">= 35% MFU on H100/H200"}


def _jpeg_folder(root: Path, count: int, size: int = 512) -> Path:
    """`count` JPEGs (random size x size crops of scikit-image's photos) in root/train."""
    import numpy as np

    from ldm_vae.data.sources import _load_photos

    photos, rng = _load_photos(), np.random.default_rng(0)
    (root / "train").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        s = min(size, w, h)
        left, top = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        photo.crop((left, top, left + s, top + s)).save(root / "train" / f"{i:05d}.jpg", quality=90)
    return root


def bench_data_loading(args) -> dict:
    root = _jpeg_folder(Path(tempfile.mkdtemp(prefix="bench-")), args.images)
    results = {}
    for name, cache_mb in (("decoded on every access", 0), ("decoded-image cache (default)", 2048)):
        cfg = load_config("kl_f4_fashion",
                          ["data.source=imagefolder", f"data.path={root}", f"data.resolution={args.resolution}",
                           "data.center_crop=false", f"data.decoded_cache_mb={cache_mb}"], Config).data
        t0 = time.perf_counter()
        ds = build_dataset(cfg, "train", train=True)
        built = time.perf_counter() - t0
        epochs = []
        for epoch in range(1 + args.repeats):  # the first epoch is a warm-up
            ds.set_epoch(epoch)
            t0 = time.perf_counter()
            for _ in DataLoader(ds, batch_size=64, shuffle=True):
                pass
            epochs.append(time.perf_counter() - t0)
        median = statistics.median(epochs[1:])
        results[name] = {"build_s": built, "epoch_median_s": median, "images_per_s": len(ds) / median}
    cached, uncached = results["decoded-image cache (default)"], results["decoded on every access"]
    ratio = cached["images_per_s"] / uncached["images_per_s"]
    return {"comparison": "data-loading", "data": f"imagefolder of {args.images} JPEGs (512x512, quality 90)",
            "resolution": args.resolution, "batch_size": 64, "num_workers": 0, "repeats": args.repeats,
            "results": results, "speedup": ratio}


def bench_ldm_cache(args) -> dict:
    vae_cfg = load_config("kl_f4_fashion", [], Config)
    ldm_cfg = load_config("ldm_fashion", [], LDMConfig)
    bs = ldm_cfg.train.batch_size
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    vae_dir = Path(args.vae) if args.vae else _untrained_autoencoder(tmp)
    from ldm_vae.autoencoder.models import load_autoencoder

    vae = load_autoencoder(vae_dir).eval()
    data = vae_cfg.data
    data.max_images = args.images
    encode_dataset(vae_dir, data, "train", tmp / "cache", batch_size=256)
    cached = DataLoader(LatentDataset(tmp / "cache"), batch_size=bs, shuffle=True, drop_last=True)
    images = build_dataset(data, "train", train=True)
    raw = DataLoader(Subset(images, range(len(images))), batch_size=bs, shuffle=True, drop_last=True)

    meta = json.loads((tmp / "cache" / "cache.json").read_text())
    torch.manual_seed(0)
    unet = build_unet(ldm_cfg.model, meta["latent_shape"], meta["num_classes"]).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=ldm_cfg.train.lr)
    sched = noise_schedule(ldm_cfg.diffusion)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0

    def unet_step(z, labels):
        noise = torch.randn_like(z)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(z),))
        loss = F.mse_loss(unet(sched.add_noise(z, noise, t), t, class_labels=labels).sample, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step_cached(batch):
        unet_step(batch["latents"], batch["label"])

    @torch.no_grad()
    def encode(x):
        return (vae.encode(x).latent_dist.sample() - shift) * scale

    def step_on_the_fly(batch):
        unet_step(encode(batch["pixel_values"]), batch["label"])

    results = {}
    for name, step, loader in (("cached latents", step_cached, cached),
                               ("images encoded on the fly", step_on_the_fly, raw)):
        times = _median_step_time(step, _forever(loader), args.warmup, args.repeats)
        results[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                         "images_per_s": bs / statistics.median(times)}
    speedup = results["images encoded on the fly"]["median_s"] / results["cached latents"]["median_s"]
    return {"comparison": "ldm-cache", "batch_size": bs, "latent_shape": meta["latent_shape"],
            "autoencoder": str(args.vae or "untrained configs/kl_f4_fashion.yaml"),
            "warmup": args.warmup, "repeats": args.repeats, "results": results, "speedup": speedup,
            "target": ">= 5x"}


def _untrained_autoencoder(tmp: Path) -> Path:
    vae_cfg = load_config("kl_f4_fashion", [], Config)
    torch.manual_seed(0)
    vae = build_autoencoder(vae_cfg.model, vae_cfg.data.resolution)
    vae.register_to_config(scaling_factor=1.0, shift_factor=0.0)
    vae.save_pretrained(tmp / "vae")
    return tmp / "vae"


def bench_sampling(args) -> dict:
    from ldm_vae.autoencoder.models import load_autoencoder
    from ldm_vae.diffusion.pipeline import LatentDiffusionPipeline, make_scheduler
    from ldm_vae.diffusion.sample import generate, load_run_pipeline

    if args.ldm:
        pipe, _ = load_run_pipeline(args.ldm)
    else:
        ldm_cfg = load_config("ldm_fashion", [], LDMConfig)
        vae = load_autoencoder(_untrained_autoencoder(Path(tempfile.mkdtemp(prefix="bench-"))))
        torch.manual_seed(0)
        unet = build_unet(ldm_cfg.model, [4, 8, 8], 10)
        pipe = LatentDiffusionPipeline(unet.eval(), vae.eval(),
                                       make_scheduler("dpm++", noise_schedule(ldm_cfg.diffusion).config))
    batch, results = 100, {}
    labels = [i % max(pipe.num_classes, 1) for i in range(batch)] if pipe.num_classes else None
    for solver, steps in (("ddim", 50), ("dpm++", 20)):
        pipe.use_solver(solver)
        generate(pipe, batch, labels, 2, 3.0, 0, batch, progress=False)  # warm-up
        times = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            generate(pipe, batch, labels, steps, 3.0, r, batch, progress=False)
            times.append(time.perf_counter() - t0)
        results[f"{solver}, {steps} steps"] = {"median_s": statistics.median(times), "min_s": min(times),
                                                "max_s": max(times), "images_per_s": batch / statistics.median(times)}
    return {"comparison": "sampling", "batch_size": batch, "guidance_scale": 3.0, "ldm": str(args.ldm or "untrained"),
            "warmup": 1, "repeats": args.repeats, "results": results}


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _decode_in_child(vae_dir: str, latents: torch.Tensor, tiled: bool) -> tuple[torch.Tensor, float, float]:
    """(image, seconds, peak resident MB above the resident memory before decoding), in a
    fresh process; the peak (VmHWM) is reset just before decoding (Linux clear_refs 5)."""
    from ldm_vae.autoencoder.models import load_autoencoder

    vae = load_autoencoder(vae_dir).eval()
    if tiled:
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = 256, 64
    with torch.no_grad():
        vae.decode(latents[..., :16, :16])  # warm-up on a small latent (kernels, allocator)
        Path("/proc/self/clear_refs").write_text("5")
        base = _rss_mb("VmRSS")
        t0 = time.perf_counter()
        image = vae.decode(latents).sample
        seconds = time.perf_counter() - t0
    return image, seconds, _rss_mb("VmHWM") - base


def bench_tiled_decode(args) -> dict:
    from ldm_vae.autoencoder.models import load_autoencoder

    vae_dir = Path(args.vae) if args.vae else _untrained_autoencoder(Path(tempfile.mkdtemp(prefix="bench-")))
    vae = load_autoencoder(vae_dir).eval()
    data = load_config("kl_f4_fashion", [], Config).data
    test = build_dataset(data, "test", train=False)
    tiles = torch.stack([test[i]["pixel_values"] for i in range(1024)])
    mosaic = make_grid(tiles, nrow=32, padding=0)[None]  # [1, 3, 1024, 1024]
    with torch.no_grad():
        latents = vae.encode(mosaic).latent_dist.mean
    ctx = multiprocessing.get_context("spawn")
    out, results = {}, {}
    for name, tiled in (("untiled", False), ("tiled (256 px tiles)", True)):
        with ctx.Pool(1) as pool:
            image, seconds, peak_mb = pool.apply(_decode_in_child, (str(vae_dir), latents, tiled))
        out[name] = image.clamp(-1, 1)
        mse = (out[name] - mosaic).pow(2).mean().item() / 4  # on [0, 1] pixels
        results[name] = {"seconds": seconds, "peak_memory_mb": peak_mb,
                         "psnr_vs_original_db": 10 * torch.log10(torch.tensor(1 / max(mse, 1e-10))).item()}
    diff = (out["tiled (256 px tiles)"] - out["untiled"]).abs() / 2  # on [0, 1] pixels
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name, image in out.items():
        save_image(image[0], Path(args.out) / f"decode_{name.split()[0]}.png")
    return {"comparison": "tiled-decode", "image": "1024x1024 mosaic of 1024 Fashion-MNIST test images",
            "latent_shape": list(latents.shape[1:]), "autoencoder": str(args.vae or "untrained"),
            "results": results, "memory_ratio": results["tiled (256 px tiles)"]["peak_memory_mb"]
            / results["untiled"]["peak_memory_mb"], "max_abs_diff": diff.max().item(),
            "mean_abs_diff": diff.mean().item(), "target": "tiled peak memory <= 1/4 of untiled"}


LATENT_SHAPE, LATENT_SHARD, LATENT_BATCH, LATENT_BATCHES = (4, 8, 8), 10_000, 128, 200


def _synthetic_latent_cache(out: Path, n: int) -> Path:
    """A KL latent cache of `n` random latents (mean, std, labels) in the format `ldm-vae encode`
    writes, with the cache.json that `read_cache` and `LatentDataset` check (checksums included)."""
    out.mkdir(parents=True)
    g, names = torch.Generator().manual_seed(0), []
    for i in range(-(-n // LATENT_SHARD)):
        rows = min(LATENT_SHARD, n - i * LATENT_SHARD)
        names.append(f"shard-{i:05d}.safetensors")
        save_file({"mean": torch.randn(rows, *LATENT_SHAPE, generator=g),
                   "std": torch.rand(rows, *LATENT_SHAPE, generator=g) + 0.01,
                   "labels": torch.randint(0, 10, (rows,), generator=g)}, str(out / names[-1]))
    meta = {"autoencoder": "none (synthetic)", "fingerprint": "synthetic", "kind": "AutoencoderKL",
            "scaling_factor": 1.0, "shift_factor": 0.0, "data": {}, "dataset": f"{n} random latents",
            "dataset_id": None, "split": "train", "num_images": n, "flipped": False, "has_labels": True,
            "class_names": [str(c) for c in range(10)], "shard_size": LATENT_SHARD,
            "latent_shape": list(LATENT_SHAPE), "num_classes": 10, "shards": names,
            "shard_sha256": [sha256(out / name) for name in names]}
    (out / CACHE_FILE).write_text(json.dumps(meta, indent=2))
    return out


class _EagerLatentDataset(LatentDataset):
    """The baseline: the dataset as it was before lazy reads, every shard loaded and
    concatenated at start (the same draws; rows indexed from memory)."""

    def __init__(self, cache_dir, seed: int = 0):
        super().__init__(cache_dir, seed)
        shards = [load_file(str(shard.path)) for shard in self.shards]
        self.tensors = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}

    def _read(self, names, rows):
        idx = torch.as_tensor([self.starts[shard] + row for shard, row in rows])
        if len(set(names)) == 1:
            return self.tensors[names[0]][idx]
        return torch.stack([self.tensors[name][i] for name, i in zip(names, idx)])


class _MappedLatentDataset(LatentDataset):
    """Rows read through safetensors' safe_open(...).get_slice: the file memory mapped, one
    handle per shard kept open."""

    def _read(self, names, rows):
        if not hasattr(self, "_slices"):
            self._handles, self._slices = {}, {}
        out = []
        for name, (shard, row) in zip(names, rows):
            if (shard, name) not in self._slices:
                if shard not in self._handles:
                    self._handles[shard] = safe_open(str(self.shards[shard].path), framework="pt")
                self._slices[shard, name] = self._handles[shard].get_slice(name)
            out.append(self._slices[shard, name][row:row + 1])
        return torch.cat(out)


LATENT_VARIANTS = {"LatentDataset (rows read per batch)": LatentDataset,
                   "before: every shard in memory": _EagerLatentDataset,
                   "safe_open + get_slice (memory mapped)": _MappedLatentDataset}


def _latent_memory_in_child(cache: str, variant: str) -> dict:
    """In a fresh process: build the dataset, draw LATENT_BATCHES batches as the LDM trainer's
    loader does (shuffled, whole batches, no workers). Resident memory after the imports, the
    peak while building and drawing (VmHWM, reset after the imports, whose transient peak would
    hide the dataset: Linux clear_refs 5), and times. Not ru_maxrss: it survives exec, so a
    spawned child reports at least its parent's peak (here: writing the caches)."""
    before = _rss_mb("VmRSS")  # torch, diffusers, ldm_vae imported
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    dataset = LATENT_VARIANTS[variant](cache, seed=0)
    built = time.perf_counter() - t0
    batches = _forever(DataLoader(dataset, batch_size=LATENT_BATCH, shuffle=True, drop_last=True,
                                  generator=torch.Generator()))
    next(batches)  # warm-up
    times = []
    for _ in range(LATENT_BATCHES):
        t0 = time.perf_counter()
        next(batches)
        times.append(time.perf_counter() - t0)
    peak = _rss_mb("VmHWM")
    return {"rss_after_imports_mb": before, "peak_rss_mb": peak, "peak_above_imports_mb": peak - before,
            "build_s": built, "ms_per_batch": statistics.median(times) * 1e3}


def bench_latent_memory(args) -> dict:
    tmp, results = Path(tempfile.mkdtemp(prefix="bench-")), {}
    ctx = multiprocessing.get_context("spawn")
    try:
        for n in sorted(args.sizes):
            cache = _synthetic_latent_cache(tmp / f"cache-{n}", n)
            for variant in LATENT_VARIANTS:
                with ctx.Pool(1) as pool:  # a fresh process each: its peak is its own
                    r = pool.apply(_latent_memory_in_child, (str(cache), variant))
                smallest = results.get(f"{variant}, {min(args.sizes)} latents", r)
                results[f"{variant}, {n} latents"] = {
                    "cache_mb": sum(f.stat().st_size for f in cache.iterdir()) / 2**20, **r,
                    "peak_vs_smallest": r["peak_rss_mb"] / smallest["peak_rss_mb"]}
            shutil.rmtree(cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    largest = f"LatentDataset (rows read per batch), {max(args.sizes)} latents"
    return {"comparison": "latent-memory", "latent_shape": list(LATENT_SHAPE), "tensors": "mean, std (fp32), labels",
            "shard_size": LATENT_SHARD, "batch_size": LATENT_BATCH, "batches": LATENT_BATCHES,
            "results": results, "growth": results[largest]["peak_vs_smallest"] - 1,
            "target": "peak RSS grows < 10% from 10^4 to 10^6 latents"}


BENCHES = {"ae-step": bench_ae_step, "ae-mfu": bench_ae_mfu, "data-loading": bench_data_loading,
           "ldm-cache": bench_ldm_cache, "sampling": bench_sampling,
           "tiled-decode": bench_tiled_decode, "latent-memory": bench_latent_memory}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=sorted(BENCHES))
    p.add_argument("--vae", help="an exported KL autoencoder (default: an untrained one of the default config)")
    p.add_argument("--ldm", help="sampling: a train-ldm run (default: untrained networks of the default configs)")
    p.add_argument("--images", type=int, default=4096,
                   help="ldm-cache: train images in the cache and the on-the-fly loader; ae-step: train images; "
                        "data-loading: JPEG files")
    p.add_argument("--warmup", type=int, default=3, help="ae-step, ldm-cache: steps before timing")
    p.add_argument("--repeats", type=int, default=20, help="ae-step, ldm-cache: steps; sampling: batches; "
                                                                     "data-loading: timed epochs")
    p.add_argument("--resolution", type=int, default=256, help="ae-mfu, data-loading: image size")
    p.add_argument("--batch-size", type=int, default=32, help="ae-mfu: images per step")
    p.add_argument("--workers", type=int, default=8, help="ae-mfu: data loader workers")
    p.add_argument("--peak-tflops", type=float, help="ae-mfu: the device's dense bf16 peak (known: H100, H200, A100)")
    p.add_argument("--phase", choices=["gan", "recon"], default="gan",
                   help="ae-step: the GAN phase, or the reconstruction phase before loss.disc_start")
    p.add_argument("--compile", action="store_true", help="ae-step: also time train.compile (slow to compile)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10**4, 10**5, 10**6],
                   help="latent-memory: latents in each synthetic cache")
    p.add_argument("--out", default="reports/bench")
    args = p.parse_args()
    result = BENCHES[args.which](args)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                         "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    print(f"\n{args.which}: " + ", ".join(f"{k} {v}" for k, v in result.items() if k not in ("results", "machine")))
    keys = list(next(iter(result["results"].values())))
    print("\n| variant | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, r in result["results"].items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.which}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
