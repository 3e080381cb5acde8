#!/usr/bin/env bash
# Create .venv (once) and install ldm-vae with everything it needs. Idempotent; sourced by
# scripts/quickstart.sh and scripts/test.sh. Needs only python3 (>= 3.10) and pip access.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and pinned: an unpinned `torch` requirement makes pip fetch the newest
# release with several GB of CUDA packages; on this project's CPU machines 2.13.0 is the
# local CPU wheel. Set TORCH_SPEC to choose another build.
python -c "import torch" 2>/dev/null || pip install -q "${TORCH_SPEC:-torch==2.13.0}"

# A constraint keeps whatever torch is installed: no dependency may replace it.
torch_version=$(python -c "import torch; print(torch.__version__.split('+')[0])")
pip install -q -c <(echo "torch==${torch_version}") -e ".[test,photos]"

# A CUDA torch has a matching torchvision on PyPI, which makes rFID (torch-fidelity) and the
# lpips package installable: every metric works there. Not on a CPU-only torch (below).
if python -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
  pip install -q -c <(echo "torch==${torch_version}") -e ".[eval,test,photos]"
fi

# lpips: the tests compare ldm_vae's LPIPS with it (ldm_vae reads the same head files from
# torchmetrics). It declares torchvision, whose PyPI wheels are CUDA builds that fail to
# import next to a CPU-only torch (and a broken torchvision breaks diffusers and
# torchmetrics imports); ldm-vae never imports either, so lpips comes without dependencies.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('lpips') is None)" \
  || pip install -q --no-deps "lpips>=0.1.4"

# Fashion-MNIST from Debian (offline); without it ldm-vae falls back to the hub copy.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # not fatal: the tests write their own data, and training can use the hub copy
    { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } >/dev/null \
      || echo "note: could not install dataset-fashion-mnist; ldm-vae will try the hub copy." >&2
  else
    echo "note: Fashion-MNIST idx files not found; run 'apt-get install dataset-fashion-mnist' as root," \
         "or ldm-vae will try the hub copy (needs internet)." >&2
  fi
fi

# Debian's wallpapers (offline RGB photographs, data.source=wallpapers; gnome-backgrounds for
# data.wallpaper_art). Not fatal: the tests write their own images, and the other sources work.
wallpapers="plasma-workspace-wallpapers mate-backgrounds lomiri-wallpapers-16.04 gnome-backgrounds"
if [ ! -d /usr/share/wallpapers/Kite ] || [ ! -d /usr/share/backgrounds/mate/nature ] \
   || [ ! -f /usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg ] || [ ! -d /usr/share/backgrounds/gnome ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # shellcheck disable=SC2086
    { apt-get update -qq && apt-get install -y -qq $wallpapers; } >/dev/null \
      || echo "note: could not install $wallpapers; data.source=wallpapers will not work." >&2
  else
    echo "note: Debian wallpapers not found; run 'apt-get install $wallpapers'" \
         "as root for data.source=wallpapers (the other sources work without them)." >&2
  fi
fi
