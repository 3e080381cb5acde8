#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one call, sized for a short lease on one H100/H200:
#
#   OUT=reports/bench-gpu bash scripts/gpu_bench.sh
#
# Needs python3 with a CUDA torch and ldm-vae's dependencies. Wheels in .whl/ (diffusers and
# what it needs beyond the machine's image) are installed into /tmp/site first, and the
# Fashion-MNIST idx files in .gpu_data/ are copied where the Debian package puts them, when
# the machine has neither. Each comparison runs under its own time limit, so one that hangs
# (a long compile) costs only its own rows; results go to $OUT/<comparison>/<name>.json.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-reports/bench-gpu}
logs=$(mktemp -d)  # one log per comparison, appended to $out/all.log (a lease returns few files)
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
fm=/usr/share/datasets/fashion-mnist
if [ -d .gpu_data ] && [ ! -f $fm/train-images-idx3-ubyte.gz ]; then
  mkdir -p $fm && cp .gpu_data/*.gz $fm/
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,driver_version --format=csv
python3 -c "import torch, diffusers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'accelerate', accelerate.__version__)"

bench() {  # bench NAME SECONDS ARGS...: one comparison under a time limit
  local name=$1 limit=$2
  shift 2
  echo "== $name: scripts/bench.py $* (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" python3 scripts/bench.py "$@" --out "$out/$name" >"$logs/$name.log" 2>&1
  echo "-- exit $? after $((SECONDS - t0)) s"
  cat "$logs/$name.log" >>"$out/all.log"
  grep -E "^\||^[a-z-]+: comparison" "$logs/$name.log" || tail -n 15 "$logs/$name.log"
}

# (e) MFU of the real trainer, SD-VAE's KL-f8 layout, 256x256, batch 32, bf16
bench ae-mfu 120 ae-mfu --warmup 5 --repeats 15
# (a) at the size users train: ours vs the plain reference loop, same layout, bf16, GAN phase
bench ae-step-256 130 ae-step --layout sd-vae --resolution 256 --batch-size 32 --precision bf16 --workers 8 \
  --warmup 5 --repeats 15
# encode/decode images/s at 256, 512, 1024 through stock diffusers calls: fp32, bf16, channels_last
bench codec 70 codec --warmup 3 --repeats 10
# (b) LDM step on cached latents vs encoding 256x256 images on the fly with the SD-VAE-sized encoder
bench ldm-cache-256 70 ldm-cache --layout sd-vae --resolution 256 --images 2048 --workers 8 --warmup 3 --repeats 20
# (d) LDM sampling (untrained default networks: the cost does not depend on the weights)
bench sampling 40 sampling --repeats 3
# (e) again with torch.compile, last: compiling may not fit the lease
bench ae-mfu-compile 140 ae-mfu --warmup 5 --repeats 15 --compile
