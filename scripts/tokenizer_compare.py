"""Benchmark: one comparison of bottlenecks at equal steps (issue 15 item 4).

Trains (or reuses) each autoencoder config (--runs) for the same steps, then measures each
stock diffusers export on the whole Fashion-MNIST test split: `ldm-vae eval`'s PSNR, SSIM,
codebook usage and perplexity (and, with --fd-features, the domain Fréchet distance), bits per
image (tokens x log2 codes for a discrete latent), and for fsq/lfq the share of test tokens
where stock `VQModel`'s lookup picks the code our rounding picks (index parity). With --speed,
encode and decode images/s of each listed config's model (fp32, this machine's threads, batch
250 at 32x32; built untrained, since the weights do not change the cost), all measured in one
go so that they compare. Writes OUT/results.json and OUT/results.md.

    python scripts/tokenizer_compare.py --out reports/tokenizers                  # fsq, lfq: ~40 min each on 2 cores
    python scripts/tokenizer_compare.py --out reports/tokenizers --runs --speed kl vq fsq lfq dc

Runs go to OUT/runs/<name>; a finished run (with an export) is reused, not retrained.
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import VQModel

from ldm_vae.autoencoder.config import Config
from ldm_vae.autoencoder.export import training_data
from ldm_vae.autoencoder.fsq import ScalarQuantizer
from ldm_vae.autoencoder.models import (
    build_autoencoder,
    deterministic_latent,
    load_autoencoder,
)
from ldm_vae.config import load_config
from ldm_vae.data.sources import build_dataset
from ldm_vae.evaluation.report import EvalOptions, run_eval

CONFIGS = {"kl": "kl_f4_fashion", "vq": "vq_f4_fashion", "fsq": "fsq_f4_fashion", "lfq": "lfq_f4_fashion",
           "dc": "dc_f8_fashion"}
BATCH = 250

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--out", required=True)
parser.add_argument("--runs", nargs="*", default=["fsq", "lfq"], choices=list(CONFIGS))
parser.add_argument("--speed", nargs="*", default=[], choices=list(CONFIGS), help="configs to time")
parser.add_argument("--fd-features", help="a `ldm-vae train-fd-features` folder: adds the domain Fréchet distance")
parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every run")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)


@torch.no_grad()
def throughput(vae, x: torch.Tensor, repeats: int = 3) -> tuple[float, float]:
    """(encode, decode) images/s of the model on the batch x, after one warm-up batch."""
    z = deterministic_latent(vae, x)
    vae.decode(z)
    t0 = time.perf_counter()
    for _ in range(repeats):
        deterministic_latent(vae, x)
    t1 = time.perf_counter()
    for _ in range(repeats):
        vae.decode(z)
    t2 = time.perf_counter()
    return repeats * len(x) / (t1 - t0), repeats * len(x) / (t2 - t1)


@torch.no_grad()
def index_parity(vq: VQModel, levels: list[int], images: torch.Tensor) -> tuple[int, int]:
    """(tokens where stock VQModel's lookup equals our rounding, tokens) over `images`."""
    quantizer = ScalarQuantizer(levels, Config().quantizer)
    same = total = 0
    for x in images.split(100):
        h = vq.encode(x).latents
        _, _, (_, _, stock) = vq.quantize(h)
        ours = quantizer(h).indices.flatten()
        same += int((ours == stock.flatten()).sum())
        total += ours.numel()
    return same, total


rows = []
for name in args.runs:
    run = out / "runs" / name
    if not (run / "export" / "config.json").exists():
        cmd = [sys.executable, "-m", "ldm_vae", "train-vae", CONFIGS[name], "--output-dir", str(run), *args.overrides]
        subprocess.run(cmd + (["--resume", "latest"] if run.exists() else []), check=True)
    opts = EvalOptions(fd_features=args.fd_features, bootstrap=0)
    report = run_eval([str(run / "export")], out / "eval" / name, opts, overwrite=True)
    metrics = report["results"][0]["metrics"]
    cfg = load_config(run / "config.yaml", [], Config)
    vae = load_autoencoder(run / "export").eval()
    data = training_data(run / "export")  # every test image, as eval reads them
    test = build_dataset(data, data.test_split, train=False)
    images = torch.stack([test[i]["pixel_values"] for i in range(len(test))])
    with torch.no_grad():
        latent_shape = tuple(deterministic_latent(vae, images[:1]).shape[1:])
    summary = json.loads((run / "summary.json").read_text())
    row = {"name": name, "config": CONFIGS[name], "kind": cfg.model.kind, "latent_shape": latent_shape,
           "steps": summary["steps"], "train_wall_s": summary["wall_time_s"],
           **{k: metrics.get(k) for k in ("num_images", "psnr_db", "ssim", "codes_used", "codebook_usage",
                                           "codebook_perplexity") if k in metrics},
           **{k: v for k, v in metrics.items() if k.startswith("fd_")}}
    if cfg.model.codebook_shape is not None:
        codes = cfg.model.codebook_shape[0]
        row["codebook_size"] = codes
        row["bits_per_image"] = latent_shape[-1] * latent_shape[-2] * math.log2(codes)
    if cfg.model.levels is not None:
        row["index_parity"] = index_parity(vae, cfg.model.levels, images)
    rows.append(row)
    print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))

header = ("| model | latent | codes | usage (test) | perplexity | bits / image | PSNR dB | SSIM | encode img/s | "
          "decode img/s | stock index parity |")
torch.manual_seed(0)
speeds = {}
for name in args.speed:  # after the evaluations: nothing else running in this process
    cfg = load_config(CONFIGS[name], [], Config)
    vae = build_autoencoder(cfg.model, cfg.data.resolution).eval()
    x = torch.rand(BATCH, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1
    speeds[name] = throughput(vae, x)
    print(name, "encode, decode images/s:", speeds[name], flush=True)
(out / "speed.json").write_text(json.dumps({"batch": BATCH, "threads": torch.get_num_threads(), **speeds}, indent=2))

lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    parity = r.get("index_parity")
    lines.append(
        f"| {r['name']} (`configs/{r['config']}.yaml`) | {'x'.join(map(str, r['latent_shape']))} | "
        f"{r.get('codebook_size', '–')} | "
        + (f"{100 * r['codebook_usage']:.2f}% | {r['codebook_perplexity']:.0f} | {r['bits_per_image']:.0f} | "
           if "codebook_usage" in r else "– | – | – | ")
        + f"{r['psnr_db']:.2f} | {r['ssim']:.4f} | "
        + ("{:.0f} | {:.0f} | ".format(*speeds[r["name"]]) if r["name"] in speeds else "– | – | ")
        + (f"{parity[0]}/{parity[1]} |" if parity else "– |"))
lines += [f"| {name} (speed only) | | | | | | | | {enc:.0f} | {dec:.0f} | |" for name, (enc, dec) in speeds.items()
          if name not in [r["name"] for r in rows]]
table = "\n".join(lines)
(out / "results.md").write_text(f"{table}\n\nsteps: {', '.join(str(r['steps']) for r in rows)}.\n")
print(table)
