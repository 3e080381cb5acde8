"""Benchmark: our quantizer vs a plain one, at several codebook sizes (issue 3's table).

For each codebook size, trains configs/vq_f4_fashion.yaml twice for the same steps:
  ours  - l2-normalised 8-dim codes, k-means init, dead-code restarts (the config as is)
  plain - the same model with quantizer.l2_normalize=false quantizer.kmeans_init=false
          quantizer.restart_after_steps=0 (Euclidean lookup, random init, no restarts)
then runs `ldm-vae eval` on each export (stock diffusers `VQModel`) over the whole
Fashion-MNIST test split: codebook usage (share of codes picked at least once), code
perplexity, PSNR, SSIM (reports in OUT/eval/<name>). Writes OUT/results.json and
OUT/results.md.

    python scripts/vq_compare.py --out reports/vq_compare                 # 6 runs, ~80 min on 2 CPU cores
    python scripts/vq_compare.py --out reports/vq_quick --sizes 1024 train.max_steps=600

Runs go to OUT/runs/<name>; a finished run (with an export) is reused, not retrained.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from ldm_vae.evaluation.report import EvalOptions, run_eval

PLAIN = ["quantizer.l2_normalize=false", "quantizer.kmeans_init=false", "quantizer.restart_after_steps=0"]

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--out", required=True)
parser.add_argument("--config", default="configs/vq_f4_fashion.yaml")
parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192, 16384])
parser.add_argument("--num-images", type=int, default=0, help="test images to evaluate (0: the whole split)")
parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every run")
args = parser.parse_args()
out = Path(args.out)
device = "cuda" if torch.cuda.is_available() else "cpu"
rows = []
for size in args.sizes:
    for variant, extra in (("ours", []), ("plain", PLAIN)):
        name = f"{variant}-{size}"
        run = out / "runs" / name
        overrides = [f"model.num_vq_embeddings={size}", *extra, *args.overrides]
        if not (run / "export" / "config.json").exists():
            cmd = [sys.executable, "-m", "ldm_vae", "train-vae", args.config, "--output-dir", str(run), *overrides]
            if run.exists():
                cmd += ["--resume", "latest"]
            subprocess.run(cmd, check=True)
        opts = EvalOptions(num_images=args.num_images or None, device=device)
        report = run_eval([str(run / "export")], out / "eval" / name, opts, overwrite=True)
        metrics = report["results"][0]["metrics"]
        summary = json.loads((run / "summary.json").read_text())
        rows.append({"name": name, "variant": variant, "codebook_size": size, "steps": summary["steps"],
                     "train_wall_s": summary["wall_time_s"], "overrides": overrides,
                     "train_usage_last_window": summary["final_logs"].get("usage"),
                     **{k: metrics[k] for k in ("num_images", "psnr_db", "ssim", "codes_used", "codebook_usage",
                                                "codebook_perplexity")}})
        print(json.dumps(rows[-1]), flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))

lines = ["| codebook | quantizer | usage (test split) | codes used | perplexity | PSNR dB | SSIM |",
         "|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['codebook_size']} | {r['variant']} | {100 * r['codebook_usage']:.1f}% | {r['codes_used']} | "
                 f"{r['codebook_perplexity']:.0f} | {r['psnr_db']:.2f} | {r['ssim']:.3f} |")
table = "\n".join(lines)
(out / "results.md").write_text(f"{table}\n\n{rows[0]['num_images']} test images; {rows[0]['steps']} steps per run.\n")
print(table)
