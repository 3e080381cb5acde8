#!/usr/bin/env bash
# An RGB autoencoder end to end on the offline photograph corpus (data.source=wallpapers): set
# up .venv if needed, train configs/kl_f4_wallpapers.yaml (KL-f4, 4 latent channels, 64x64;
# about an hour on a 2-core CPU), then evaluate its export on the 5 held-out photographs:
# RUN_DIR/eval gets PSNR, SSIM, colour cast, border ratio and the pictures (README, "Evaluation").
#
#   bash scripts/rgb_quickstart.sh [RUN_DIR [KEY=VALUE ...]]      (RUN_DIR: runs/rgb)
#
# KEY=VALUE are config overrides, e.g. data.wallpaper_art=true, or train.max_steps=1600
# loss.disc_start=1100 (about half the time, 0.9 dB lower). Run it again after an
# interruption: training resumes from the newest checkpoint, and a finished run is evaluated,
# not retrained. With a GPU and your own photos, the same training is
# `accelerate launch -m ldm_vae train-vae kl_f4_wallpapers data.source=imagefolder
# data.path=DIR --output-dir RUN_DIR`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
run=${1:-runs/rgb}
[ $# -gt 0 ] && shift

if [ ! -f "$run/export/config.json" ]; then
  resume=()
  compgen -G "$run/checkpoint-*" >/dev/null && resume=(--resume latest)
  ldm-vae train-vae kl_f4_wallpapers "$@" --output-dir "$run" "${resume[@]}"
fi
ldm-vae eval "$run/export" --out "$run/eval" --overwrite
