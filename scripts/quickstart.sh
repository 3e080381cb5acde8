#!/usr/bin/env bash
# The README's main job, end to end on Fashion-MNIST: set up .venv if needed, then
# `ldm-vae demo`: train the KL-f4 autoencoder, export it for diffusers, evaluate it, cache
# the train split's latents, train the class-conditional latent diffusion model, sample
# every class, export the diffusers pipeline, and write demo/REPORT.md (pictures, metrics,
# the time of each stage). About 50 minutes on a 2-core CPU VM (README, "Measured: the
# demo"); pass --quick for a 1-minute smoke run, --out DIR for another folder, --overwrite
# to replace a previous demo.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
ldm-vae demo "$@"
