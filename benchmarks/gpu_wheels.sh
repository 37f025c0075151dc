#!/usr/bin/env bash
# Fetch, on a machine with PyPI access, the wheels a lent GPU machine lacks (the device image has
# Python 3.12 with torch, transformers, safetensors, pyarrow, scikit-image, imageio, pytest; not
# these). They land in .whl/ (git-ignored), about 14 MB, and travel with `carry: [".whl"]`.
# imageio-ffmpeg (68 MB) is left out: the GPU tests and benchmarks write no video.
#   bash benchmarks/gpu_wheels.sh && (device) bash benchmarks/gpu_session.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
  "diffusers==0.42.1" "omegaconf==2.3.0" "gsplat==1.5.3" "trimesh>=4.0" "plyfile>=1.0" "fast-simplification>=0.1.7"
# omegaconf's parser runtime is published as an sdist only; it is pure Python, so build the wheel here.
python3 -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3"
ls -la .whl
