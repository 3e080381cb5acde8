"""Side-by-side benchmarks, each comparison measured in one process: warm-up, repeats, median.

    python scripts/bench.py ae-step --repeats 40 [--phase gan|recon] [--compile]
    python scripts/bench.py ae-step --layout sd-vae --resolution 256 --precision bf16 --workers 8  # on a GPU
    python scripts/bench.py ae-mfu [--compile]  # on a GPU
    python scripts/bench.py codec [--resolutions 256 512 1024] [--compile]
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

codec: encode and decode images/s of an untrained AutoencoderKL of SD-VAE's KL-f8 layout
through the stock diffusers calls (`encode(x).latent_dist.mean`, `decode(z).sample`, no_grad)
at each resolution, the same pixels per call at every size: fp32, bf16 autocast, bf16 with
channels_last (and compiled, with --compile); with each bf16 decode's relative L2 error
against the fp32 decode of the same latent. scripts/gpu_bench.sh runs the GPU comparisons.

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
difference to the untiled image, and the error against the original in the blend bands where
tiles meet vs elsewhere (the untiled decode on the same pixels is the control for content).
Both images are saved to OUT for a look at the seams.

latent-memory: peak resident memory (VmHWM) of a fresh process that builds the
LatentDataset of a synthetic KL cache (random mean and std of shape 4x8x8, labels, shards
of 10,000, a valid cache.json with checksums) of each size and draws 200 shuffled batches
of 128 through a DataLoader with the LDM trainer's sampler (run/trainer.py: the epoch's
order kept as a tensor); with the time to build (checksums included) and per batch
(median). Variants: the dataset (rows read per batch with pread), the
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
from ldm_vae.run.trainer import LazySeedableRandomSampler  # noqa: E402


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    """Wait for queued GPU work, so that host clocks measure it (a no-op on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_step_time(step, batches, warmup: int, repeats: int) -> list[float]:
    """Seconds per step (loading the batch included) for `repeats` steps after `warmup`."""
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        step(next(batches))
        _sync()
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
    discriminator step). train.mixed_precision=bf16: forward passes and losses under bf16
    autocast, as Accelerate runs them; train.channels_last is applied as the trainer does."""
    torch.manual_seed(cfg.seed)
    device, bf16 = _device(), cfg.train.mixed_precision == "bf16"
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    vae = build_autoencoder(cfg.model, cfg.data.resolution).to(device, memory_format=fmt).train()
    disc = PatchDiscriminator(3, cfg.loss.disc_channels, cfg.loss.disc_layers).to(device, memory_format=fmt).train()
    # ours equals lpips.LPIPS (tests/test_perceptual.py)
    lpips = build_lpips(cfg.loss.lpips_net, random_backbone=True).to(device, memory_format=fmt)
    betas = (cfg.train.adam_beta1, cfg.train.adam_beta2)
    opt_g = torch.optim.AdamW(vae.parameters(), lr=cfg.train.lr, betas=betas)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.train.disc_lr, betas=betas)
    last = vae.decoder.conv_out.weight

    def step(batch):
        x = batch["pixel_values"].to(device, non_blocking=True).contiguous(memory_format=fmt)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            nll = (x - recon).abs().mean() + cfg.loss.perceptual_weight * lpips(x, recon).mean()
            kl = posterior.kl().mean()
            g = -disc(recon).mean() if gan else None
        if not gan:
            opt_g.zero_grad()
            (nll + cfg.loss.kl_weight * kl).backward()
            opt_g.step()
            return
        nll_grad, = torch.autograd.grad(nll, last, retain_graph=True)
        g_grad, = torch.autograd.grad(g, last, retain_graph=True)
        weight = cfg.loss.disc_weight * (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach()
        loss = nll + cfg.loss.kl_weight * kl + weight * g
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
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


MFU_MODEL = ["model.block_out_channels=[128,256,512,512]", "model.layers_per_block=2"]  # SD-VAE's KL-f8 shape
AE_STEP_WINDOW = 5  # steps per timed window: the trainer logs its throughput once per window


def _layout_overrides(args) -> list[str]:
    """--layout and --resolution as overrides of configs/kl_f4_fashion.yaml."""
    return [*(MFU_MODEL if args.layout == "sd-vae" else []),
            *([f"data.resolution={args.resolution}"] if args.resolution else [])]


def bench_ae_step(args) -> dict:
    gan, k = args.phase == "gan", AE_STEP_WINDOW
    warmup, repeats = -(-args.warmup // k) * k, max(k, args.repeats // k * k)  # whole windows
    n = warmup + repeats
    overrides = ["loss.lpips_random_backbone=true", f"loss.disc_start={0 if gan else n + 1}",
                 "loss.disc_pretrain_steps=0", f"train.max_steps={n}", f"train.log_every={k}", f"train.image_every={n}",
                 f"train.checkpoint_every={n}", f"data.max_images={args.images}", "export.scale_num_images=64",
                 "export.scale_batch_size=64", f"train.mixed_precision={args.precision}", *_layout_overrides(args),
                 *([f"train.batch_size={args.batch_size}"] if args.batch_size else []),
                 *([f"data.num_workers={args.workers}"] if args.workers is not None else [])]
    cfg = load_config("kl_f4_fashion", overrides, Config)
    bs, workers = cfg.train.batch_size, cfg.data.num_workers
    images = build_dataset(cfg.data, cfg.data.train_split, train=True, seed=cfg.seed)
    loader = DataLoader(images, batch_size=bs, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
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
    model = " with " + ", ".join(MFU_MODEL) if args.layout == "sd-vae" else ""
    return {"comparison": "ae-step", "config": f"configs/kl_f4_fashion.yaml{model}, {phase}",
            "device": _device_name(), "batch_size": bs, "resolution": cfg.data.resolution,
            "precision": args.precision, "num_workers": workers,
            "lpips": f"{cfg.loss.lpips_net}, random backbone (offline; same cost as the pretrained one)",
            "warmup": warmup, "repeats": repeats, "timing": f"median of {k}-step window means",
            "results": results, "speedup": results["ldm-vae train-vae"]["vs_reference"],
            "target": ">= 1.0x, goal 1.3x"}


# dense bf16 tensor-core peaks (NVIDIA data sheets, SXM parts; without sparsity)
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


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


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def bench_ae_mfu(args) -> dict:
    device = _device()
    n, resolution, batch_size = args.warmup + args.repeats, args.resolution or 256, args.batch_size or 32
    workers = 8 if args.workers is None else args.workers
    overrides = [*MFU_MODEL, f"data.resolution={resolution}", f"train.batch_size={batch_size}",
                 "train.mixed_precision=bf16", "loss.lpips_random_backbone=true", "loss.disc_start=0",
                 "loss.disc_pretrain_steps=0", f"train.max_steps={n}", "train.log_every=1", f"train.image_every={n}",
                 f"train.checkpoint_every={n}", f"data.max_images={max(args.images, batch_size * n)}",
                 f"data.num_workers={workers}", "export.scale_num_images=64", "export.scale_batch_size=16"]
    cfg = load_config("kl_f4_fashion", overrides, Config)
    flops = _step_flops(cfg, device)
    name = _device_name()
    peak = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    variants = {"eager": [], "channels_last": ["train.channels_last=true"]}
    if args.compile:
        variants |= {"torch.compile": ["train.compile=true"],
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
            "model": "configs/kl_f4_fashion.yaml with " + ", ".join(MFU_MODEL), "resolution": resolution,
            "batch_size": batch_size, "num_workers": workers, "precision": "bf16 autocast", "step_tflop": flops / 1e12,
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
    resolution = args.resolution or 256
    root = _jpeg_folder(Path(tempfile.mkdtemp(prefix="bench-")), args.images)
    results = {}
    for name, cache_mb in (("decoded on every access", 0), ("decoded-image cache (default)", 2048)):
        cfg = load_config("kl_f4_fashion",
                          ["data.source=imagefolder", f"data.path={root}", f"data.resolution={resolution}",
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
            "resolution": resolution, "batch_size": 64, "num_workers": 0, "repeats": args.repeats,
            "results": results, "speedup": ratio}


def bench_ldm_cache(args) -> dict:
    device, workers = _device(), args.workers or 0
    vae_cfg = load_config("kl_f4_fashion", _layout_overrides(args), Config)
    ldm_cfg = load_config("ldm_fashion", [], LDMConfig)
    bs = ldm_cfg.train.batch_size
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    vae_dir = Path(args.vae) if args.vae else _untrained_autoencoder(tmp, vae_cfg)
    from ldm_vae.autoencoder.models import load_autoencoder

    vae = load_autoencoder(vae_dir).to(device).eval()
    data = vae_cfg.data
    data.max_images = args.images
    encode_dataset(vae_dir, data, "train", tmp / "cache", batch_size=max(1, min(256, 2**22 // data.resolution**2)),
                   device=device)
    loader = {"batch_size": bs, "shuffle": True, "drop_last": True, "num_workers": workers,
              "persistent_workers": workers > 0, "pin_memory": device == "cuda"}
    cached = DataLoader(LatentDataset(tmp / "cache"), **loader)
    images = build_dataset(data, "train", train=True)
    raw = DataLoader(Subset(images, range(len(images))), **loader)

    meta = json.loads((tmp / "cache" / "cache.json").read_text())
    torch.manual_seed(0)
    unet = build_unet(ldm_cfg.model, meta["latent_shape"], meta["num_classes"]).to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=ldm_cfg.train.lr)
    sched = noise_schedule(ldm_cfg.diffusion)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0

    def unet_step(z, labels):
        noise = torch.randn_like(z)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(z),), device=device)
        loss = F.mse_loss(unet(sched.add_noise(z, noise, t), t, class_labels=labels.to(device)).sample, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step_cached(batch):
        unet_step(batch["latents"].to(device), batch["label"])

    @torch.no_grad()
    def encode(x):
        return (vae.encode(x.to(device)).latent_dist.sample() - shift) * scale

    def step_on_the_fly(batch):
        unet_step(encode(batch["pixel_values"]), batch["label"])

    results = {}
    for name, step, loader in (("cached latents", step_cached, cached),
                               ("images encoded on the fly", step_on_the_fly, raw)):
        times = _median_step_time(step, _forever(loader), args.warmup, args.repeats)
        results[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                         "images_per_s": bs / statistics.median(times)}
    speedup = results["images encoded on the fly"]["median_s"] / results["cached latents"]["median_s"]
    model = " with " + ", ".join(MFU_MODEL) if args.layout == "sd-vae" else ""
    return {"comparison": "ldm-cache", "device": _device_name(), "batch_size": bs, "resolution": data.resolution,
            "latent_shape": meta["latent_shape"], "num_workers": workers,
            "autoencoder": str(args.vae or f"untrained configs/kl_f4_fashion.yaml{model}"),
            "warmup": args.warmup, "repeats": args.repeats, "results": results, "speedup": speedup,
            "target": ">= 5x"}


def _untrained_autoencoder(tmp: Path, vae_cfg: Config | None = None) -> Path:
    vae_cfg = vae_cfg or load_config("kl_f4_fashion", [], Config)
    torch.manual_seed(0)
    vae = build_autoencoder(vae_cfg.model, vae_cfg.data.resolution)
    vae.register_to_config(scaling_factor=1.0, shift_factor=0.0)
    vae.save_pretrained(tmp / "vae")
    return tmp / "vae"


def bench_sampling(args) -> dict:
    from ldm_vae.autoencoder.models import load_autoencoder
    from ldm_vae.diffusion.pipeline import make_scheduler
    from ldm_vae.diffusion.sample import generate, load_run_pipeline, run_pipeline

    if args.ldm:
        pipe, _ = load_run_pipeline(args.ldm)
    else:
        ldm_cfg = load_config("ldm_fashion", [], LDMConfig)
        vae = load_autoencoder(_untrained_autoencoder(Path(tempfile.mkdtemp(prefix="bench-"))))
        torch.manual_seed(0)
        unet = build_unet(ldm_cfg.model, [4, 8, 8], 10)
        pipe = run_pipeline(unet.eval(), vae.eval(), make_scheduler("dpm++", noise_schedule(ldm_cfg.diffusion).config),
                            [str(i) for i in range(10)])
    pipe.to(_device())
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
    return {"comparison": "sampling", "device": _device_name(), "batch_size": batch, "guidance_scale": 3.0, "ldm": str(args.ldm or "untrained"),
            "warmup": 1, "repeats": args.repeats, "results": results}


def _time_calls(fn, warmup: int, repeats: int) -> tuple[list[float], torch.Tensor]:
    """Seconds per call of fn() after `warmup` calls, and its last output."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return times, out


@torch.no_grad()
def bench_codec(args) -> dict:
    device = _device()
    cfg = load_config("kl_f4_fashion", MFU_MODEL, Config)
    torch.manual_seed(0)
    vae = build_autoencoder(cfg.model, 256).to(device).eval()
    # (bf16 autocast, channels_last, torch.compile); compiled callables are made once, per format
    variants = {"fp32": (False, False, False), "bf16 autocast": (True, False, False),
                "bf16 autocast + channels_last": (True, True, False)}
    if args.compile:
        variants["bf16 autocast + channels_last + torch.compile"] = (True, True, True)
    compiled = {}
    results = {}
    for res in args.resolutions:
        batch = max(1, (args.batch_size or 16) * 256**2 // res**2)  # the same pixels per call at every size
        x = torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(res)).to(device) * 2 - 1
        z = vae.encode(x).latent_dist.mean  # one fp32 latent, so that every variant decodes the same input
        reference = None
        for name, (bf16, channels_last, compile_) in variants.items():
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            vae.to(memory_format=fmt)
            xf, zf = x.contiguous(memory_format=fmt), z.contiguous(memory_format=fmt)
            encode, decode = vae.encode, vae.decode
            if compile_:
                encode, decode = compiled.setdefault("fns", (torch.compile(vae.encode), torch.compile(vae.decode)))
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                enc, _ = _time_calls(lambda f=encode, a=xf: f(a).latent_dist.mean, args.warmup, args.repeats)
                dec, image = _time_calls(lambda f=decode, a=zf: f(a).sample, args.warmup, args.repeats)
            image = image.float()
            reference = image if reference is None else reference
            results[f"{res}px, {name}"] = {
                "batch": batch, "encode_images_per_s": batch / statistics.median(enc),
                "decode_images_per_s": batch / statistics.median(dec),
                "decode_rel_err_vs_fp32": float((image - reference).norm() / reference.norm())}
        vae.to(memory_format=torch.contiguous_format)
    return {"comparison": "codec", "device": _device_name(),
            "model": "untrained AutoencoderKL, configs/kl_f4_fashion.yaml with " + ", ".join(MFU_MODEL),
            "calls": "stock diffusers vae.encode(x).latent_dist.mean and vae.decode(z).sample, torch.no_grad",
            "timing": "median seconds per call, synchronized", "warmup": args.warmup, "repeats": args.repeats,
            "results": results}


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


def _seam_mask(size: int, tile: int, overlap: float) -> torch.Tensor:
    """[size, size] bool: the pixels of diffusers' tiled decode (AutoencoderKL.tiled_decode)
    that blend two tiles, i.e. where the tiles' edges lie. Each output tile keeps
    `tile - blend` pixels, the first `blend` of them (after the first tile) blended with the
    previous tile's overhang."""
    blend = int(tile * overlap)
    period = tile - blend
    i = torch.arange(size)
    band = (i >= period) & (i % period < blend)
    return band[:, None] | band[None, :]


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
    # where the tiles meet; the untiled decode's error on the same pixels is the control for content
    seams = _seam_mask(mosaic.shape[-1], 256, vae.tile_overlap_factor)
    for name, tiled in (("untiled", False), ("tiled (256 px tiles)", True)):
        with ctx.Pool(1) as pool:
            image, seconds, peak_mb = pool.apply(_decode_in_child, (str(vae_dir), latents, tiled))
        out[name] = image.clamp(-1, 1)
        error = (out[name] - mosaic).abs()[0].mean(0) / 2  # [H, W], on [0, 1] pixels
        mse = (out[name] - mosaic).pow(2).mean().item() / 4
        results[name] = {"seconds": seconds, "peak_memory_mb": peak_mb,
                         "psnr_vs_original_db": 10 * torch.log10(torch.tensor(1 / max(mse, 1e-10))).item(),
                         "seam_error": error[seams].mean().item(), "inside_error": error[~seams].mean().item(),
                         "seam_over_inside": (error[seams].mean() / error[~seams].mean()).item()}
    diff = (out["tiled (256 px tiles)"] - out["untiled"]).abs() / 2  # on [0, 1] pixels
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name, image in out.items():
        save_image(image[0], Path(args.out) / f"decode_{name.split()[0]}.png")
    return {"comparison": "tiled-decode", "image": "1024x1024 mosaic of 1024 Fashion-MNIST test images",
            "latent_shape": list(latents.shape[1:]), "autoencoder": str(args.vae or "untrained"),
            "results": results, "memory_ratio": results["tiled (256 px tiles)"]["peak_memory_mb"]
            / results["untiled"]["peak_memory_mb"], "max_abs_diff": diff.max().item(),
            "mean_abs_diff": diff.mean().item(),
            "seams": f"blend bands of {int(256 * vae.tile_overlap_factor)} px where 256 px tiles meet "
                     f"({seams.float().mean().item():.0%} of the pixels); errors are mean |decoded - original| there "
                     f"and elsewhere",
            "target": "tiled peak memory <= 1/4 of untiled; seam error <= inside error"}


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
    loader does (its sampler, whole batches, no workers). Resident memory after the imports, the
    peak while building and drawing (VmHWM, reset after the imports, whose transient peak would
    hide the dataset: Linux clear_refs 5), and times. Not ru_maxrss: it survives exec, so a
    spawned child reports at least its parent's peak (here: writing the caches)."""
    before = _rss_mb("VmRSS")  # torch, diffusers, ldm_vae imported
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    dataset = LATENT_VARIANTS[variant](cache, seed=0)
    built = time.perf_counter() - t0
    # the sampler the trainer's loader holds after prepare (shuffle=True's list of n ints would count too)
    g = torch.Generator()
    batches = _forever(DataLoader(dataset, batch_size=LATENT_BATCH, drop_last=True, generator=g,
                                  sampler=LazySeedableRandomSampler(dataset, generator=g)))
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


BENCHES = {"ae-step": bench_ae_step, "ae-mfu": bench_ae_mfu, "codec": bench_codec, "data-loading": bench_data_loading,
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
    p.add_argument("--resolution", type=int,
                   help="ae-mfu, data-loading: image size (default 256); ae-step, ldm-cache: default the config's")
    p.add_argument("--batch-size", type=int, help="ae-mfu: images per step (default 32); ae-step: default the "
                                                   "config's; codec: images per call at 256 px (default 16)")
    p.add_argument("--workers", type=int, help="ae-mfu: data loader workers (default 8); ae-step: default the config's")
    p.add_argument("--layout", choices=["config", "sd-vae"], default="config",
                   help="ae-step, ldm-cache: the autoencoder of configs/kl_f4_fashion.yaml, or SD-VAE's KL-f8 "
                        "layout (128-256-512-512 channels, 2 layers per block)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="ae-step: both loops in fp32, or under bf16 autocast (the trainer's train.mixed_precision)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024], help="codec: image sizes")
    p.add_argument("--peak-tflops", type=float, help="ae-mfu: the device's dense bf16 peak (known: H100, H200, A100)")
    p.add_argument("--phase", choices=["gan", "recon"], default="gan",
                   help="ae-step: the GAN phase, or the reconstruction phase before loss.disc_start")
    p.add_argument("--compile", action="store_true",
                   help="ae-step, ae-mfu: also time train.compile; codec: also a compiled encoder/decoder "
                        "(slow to compile)")
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
