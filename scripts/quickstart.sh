#!/usr/bin/env bash
# The README's main job, end to end on Fashion-MNIST: set up .venv if needed, train the
# default KL-f4 autoencoder, export it for diffusers, load the export with stock diffusers
# and evaluate it on 1000 test images (metrics, pictures, results in the model card).
# About 15 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
run="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
ldm-vae train-vae configs/kl_f4_fashion.yaml --output-dir "$run" "$@"
ldm-vae eval "$run/export" --num-images 1000 --out "$run/eval" --update-card
echo "done: checkpoints, logs and pictures in $run; diffusers export in $run/export"
