#!/usr/bin/env bash
# Everything a session lent a GPU should run, in one command from the repository root, within
# BUDGET seconds (default 480: 8 minutes on a bare GPU machine, wheel installation included).
# Steps, most important first, each under its own timeout (cut to what is left of the budget;
# a step that would get less than 10 s is skipped and listed in $OUT/skipped.log):
#   setup     40 s  install .whl/*.whl and the stripped Ray (.whl/ray-core.tar.xz) into /tmp/site
#   full     170 s  benchmarks.full at full size (s/iteration per phase, peak memory vs the memory
#                   plan, FLOPs per asset, batching gain, dtype / SDPA; torch.compile not measured)
#   pipeline 100 s  benchmarks.pipeline on CUDA: Ray actors + 4 concurrent optimiser tasks
#   tests     45 s  pytest -m gpu except the gsplat tests
#   guidance  25 s  benchmarks.guidance
#   optimize  40 s  benchmarks.optimize, NeRF
#   gsplat    60 s  gsplat's first-use CUDA compile, its GPU tests and benchmarks.optimize on splats
# Logs and JSON go to $OUT (the device tool's folder) or benchmarks/out/gpu. With the device tool:
#   bash benchmarks/gpu_wheels.sh                        # here, once: .whl/ (git-ignored, ~38 MB)
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=540)
# then fill benchmarks/RESULTS.md §3 with the card named (gpu.txt). Skip steps with
# SKIP="gsplat pipeline" (space-separated). gsplat compiles its kernels on first use (minutes): if
# its step times out, rerun SKIP="full pipeline tests guidance optimize" on the same warm machine
# (the compiled kernels stay in ~/.cache/torch_extensions there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
SKIP=${SKIP:-}
BUDGET=${BUDGET:-480}
mkdir -p "$OUT"
: > "$OUT/skipped.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0

step() {  # step NAME TIMEOUT_S COMMAND...: run unless skipped, log to $OUT/NAME.log, keep going on failure
  local name=$1 limit=$2; shift 2
  case " $SKIP " in *" $name "*) echo "skipped $name" | tee -a "$OUT/skipped.log"; return;; esac
  local left=$((BUDGET - SECONDS - 5))
  if [ "$left" -lt 10 ]; then echo "skipped $name: the ${BUDGET} s budget is spent" | tee -a "$OUT/skipped.log"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit} s): $*"; local began=$SECONDS
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  local note=""; [ "$rc" = 124 ] && note=" (timed out)"
  echo "== $name: exit $rc after $((SECONDS - began)) s$note" | tee -a "$OUT/$name.log"
}

# without .whl/ (a machine with the project's packages installed) setup has nothing to do
step setup 40 bash -c 'ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: the installed packages are used"; exit 0; }; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && if [ -f .whl/ray-core.tar.xz ]; then tar -xJf .whl/ray-core.tar.xz -C /tmp/site; fi'
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"

step full 170 python3 -m benchmarks.full --device cuda --no-compile --out "$OUT/full.json"
step pipeline 100 python3 -m benchmarks.pipeline --device cuda --size full --concurrency 4 --iterations 4 --sequential-assets 1 --out "$OUT/pipeline.json"
# Modules that need MLflow (absent on the device image) fail to collect; the rest still run.
step tests 45 python3 -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors --ignore=tests/test_splats_gpu.py -o addopts="-ra"
step guidance 25 python3 -m benchmarks.guidance --device cuda --out "$OUT/guidance.json"
step optimize 40 python3 -m benchmarks.optimize --device cuda --representations nerf --out "$OUT/optimize.json"
step gsplat 60 bash -c "python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts=-ra tests/test_splats_gpu.py && python3 -m benchmarks.optimize --device cuda --representations splats --out '$OUT/optimize_splats.json'"
echo "session: $SECONDS s of the ${BUDGET} s budget"
