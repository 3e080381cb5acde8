"""Image scan (issue 22): the first build of an imagefolder dataset (every file decoded) vs the
second (the scan read from its on-disk cache), and one epoch of reading every item.

    python scripts/bench_scan.py --sizes 1000 10000 100000
    python scripts/bench_scan.py --sizes 2000 --image-size 384 --workers 2

For each N: a temporary folder of N random images (32x32 or --image-size; half PNG, half JPEG,
10 class subfolders; one in 200 truncated), then two builds of the training dataset at 32x32, each in
a fresh process with the same HF_DATASETS_CACHE and LDM_VAE_CACHE, so neither `datasets` nor
our in-process memo remembers anything but what is on disk. Each process reports the time of
`datasets`' part of the build apart from ours: the data files of the folder's splits (resolved
by datasets' patterns the first time, read from the scan cache the second) and
`datasets.load_dataset("imagefolder")` on them (the first time it writes its arrow cache); ours
is the folder's fingerprint and the scan (or its cache read). Then one epoch of reading every
item (random crop and flip): the first run's epoch reads the images the scan kept decoded, the
second run's decodes each one on first read. With --workers W, a third fresh process scans again
(a new scan cache) in W DataLoader workers (data.num_workers). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_folder(root: Path, n: int, size: int) -> int:
    """N random size x size images in 10 class folders, one in 200 truncated; returns how many
    are broken."""
    from PIL import Image

    rng = np.random.default_rng(0)
    broken = 0
    for i in range(n):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:06d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        if i % 200 == 7:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            broken += 1
    return broken


def child(folder: str, workers: int) -> None:
    """One fresh process: build the dataset (load_dataset timed apart), then read one epoch."""
    import datasets  # noqa: F401  (imported before the clock starts: its import is not the scan)

    from ldm_vae.data import sources
    from ldm_vae.data.config import DataConfig

    load_s = []

    def timed(real):
        def call(*args, **kwargs):
            t = time.perf_counter()
            out = real(*args, **kwargs)
            load_s.append(time.perf_counter() - t)
            return out
        return call

    sources.imagefolder_data_files = timed(sources.imagefolder_data_files)
    sources._load_hf = timed(sources._load_hf)
    cfg = DataConfig(source="imagefolder", path=folder, resolution=32, center_crop=False, num_workers=workers)
    t = time.perf_counter()
    ds = sources.build_dataset(cfg, "train", train=True)
    build = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    epoch = time.perf_counter() - t
    data_files, load = load_s
    print(json.dumps({"data_files": data_files, "load_dataset": load, "ours": build - data_files - load,
                      "epoch": epoch, "items": len(ds), "bad": len(ds.bad)}))


def run_child(folder: Path, env: dict, workers: int = 0) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--workers", str(workers)], env=env,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--image-size", type=int, default=32, help="side of the generated images (the training "
                   "resolution stays 32: larger files make the scan's decoding dominate, as photos do)")
    p.add_argument("--workers", type=int, default=2,
                   help="then a third first build with the scan in this many DataLoader workers (data.num_workers); "
                        "0: skip it")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.workers)
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            broken = make_folder(tmp / "images", n, args.image_size)
            env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "hf"), "LDM_VAE_CACHE": str(tmp / "ldm-vae"),
                   "HF_DATASETS_OFFLINE": "1"}
            first, second = run_child(tmp / "images", env), run_child(tmp / "images", env)
            assert first["items"] == second["items"] == n - broken and first["bad"] == second["bad"] == broken
            parallel = None
            if args.workers:  # a fresh scan cache: the scan runs again, now in workers
                parallel = run_child(tmp / "images", {**env, "LDM_VAE_CACHE": str(tmp / "ldm-vae-2")}, args.workers)
                assert parallel["items"] == first["items"] and parallel["bad"] == broken
            rows.append((n, first, second, parallel))
    print("| N | first scan s | second scan s | speedup | data files s (first / second) | load_dataset s "
          "(first / second) | build total s (first / second) | second / first build | epoch s (first run / "
          f"second run) | first scan s, {args.workers} workers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, a, b, c in rows:
        total_a, total_b = (r["data_files"] + r["load_dataset"] + r["ours"] for r in (a, b))
        workers = "n/a" if c is None else f"{c['ours']:.2f} ({a['ours'] / c['ours']:.2f}x)"
        print(f"| {n:,} | {a['ours']:.2f} | {b['ours']:.3f} | {a['ours'] / b['ours']:.0f}x | "
              f"{a['data_files']:.2f} / {b['data_files']:.3f} | {a['load_dataset']:.2f} / {b['load_dataset']:.2f} | "
              f"{total_a:.2f} / {total_b:.2f} | {total_b / total_a:.3f} ({total_a / total_b:.0f}x) | "
              f"{a['epoch']:.2f} / {b['epoch']:.2f} | {workers} |")


if __name__ == "__main__":
    main()
