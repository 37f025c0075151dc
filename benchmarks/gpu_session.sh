#!/usr/bin/env bash
# Everything a session lent a GPU should run, in one command from the repository root:
# the GPU tests (CUDA vs CPU paths: tinycudann/torch hash grid, gsplat/torch rasteriser, fp16
# guidance, full-size models) and the CUDA benchmarks. Logs and JSON go to $OUT (the device
# tool's folder) or benchmarks/out/gpu. With the device tool:
#   bash benchmarks/gpu_wheels.sh                        # here, once: .whl/ (git-ignored)
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# then copy the tables into benchmarks/RESULTS.md §3 with the card named (gpu.txt).
# Not here: `benchmarks.pipeline --device cuda` needs Ray, whose wheel (79 MB) is over the device
# tool's 64 MiB carry limit; run it on a GPU machine with the project installed (README).
# Stages may be skipped with SKIP="tests optimize guidance full" (space-separated). gsplat compiles
# its CUDA kernels on first use (minutes); if one 10-minute call is too short, run
# SKIP="optimize guidance full" first and SKIP=tests next on the same warm machine (the compiled
# kernels stay in ~/.cache/torch_extensions there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
SKIP=${SKIP:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"
step() {  # step NAME COMMAND...: run unless skipped, log to $OUT/NAME.log, keep going on failure
  local name=$1; shift
  case " $SKIP " in *" $name "*) echo "skipped $name"; return;; esac
  echo "== $name: $*"; local began=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - began)) s" | tee -a "$OUT/$name.log"
}
# Modules that need Ray/MLflow (absent on the device image) fail to collect; the rest still run.
step tests python3 -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors -o addopts="-ra"
step optimize python3 -m benchmarks.optimize --device cuda --out "$OUT/optimize.json"
step guidance python3 -m benchmarks.guidance --device cuda --out "$OUT/guidance.json"
step full python3 -m benchmarks.full --device cuda --out "$OUT/full.json"
