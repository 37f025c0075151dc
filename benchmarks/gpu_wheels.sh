#!/usr/bin/env bash
# Fetch, on a machine with PyPI access, the wheels a lent GPU machine lacks (the device image has
# Python 3.12 with torch, transformers, safetensors, pyarrow, scikit-image, imageio, pytest; not
# these). They land in .whl/ (git-ignored) and travel with `carry: [".whl"]` (64 MiB at most).
# imageio-ffmpeg (68 MB) is left out: the GPU tests and benchmarks write no video.
#
# Ray (for benchmarks.pipeline on CUDA): its cp312 wheel is 79 MB (201 MB installed), over the
# limit. Ray core runs without its libraries (data, train, tune, serve, rllib, llm), the Java jar
# and the dashboard's web client (the pipeline starts Ray without a dashboard), with its binaries
# stripped of symbols: 96 MB installed, ~23 MB as .whl/ray-core.tar.xz, plus ~1.5 MB of wheels
# for Ray's own dependencies. Everything together is ~38 MB.
#   bash benchmarks/gpu_wheels.sh && (device) bash benchmarks/gpu_session.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}")
"${download[@]}" -d .whl \
  "diffusers==0.42.1" "omegaconf==2.3.0" "gsplat==1.5.3" "trimesh>=4.0" "plyfile>=1.0" "fast-simplification>=0.1.7" \
  "click==8.5.1" "msgpack==1.2.4" "protobuf==7.36.2" "jsonschema==4.26.0" "jsonschema-specifications==2025.9.1" \
  "referencing==0.37.0" "rpds-py==2026.9.1" "attrs==26.1.0"
# omegaconf's parser runtime is published as an sdist only; it is pure Python, so build the wheel here.
python3 -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3"

ray_version=2.60.0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"${download[@]}" -d "$work" "ray==$ray_version"
mkdir "$work/site"
unzip -q "$work"/ray-"$ray_version"-*.whl -d "$work/site"  # unzip keeps the binaries' exec bits
(
  cd "$work/site"
  rm -rf ray/jars ray/rllib ray/data ray/train ray/tune ray/serve ray/llm ray/dashboard/client/build
  find . -name '*.js.map' -delete
  find . -type f \( -name '*.so' -o -path './ray/core/src/*' \) -exec strip --strip-unneeded {} + 2>/dev/null || true
  tar -cJf "$OLDPWD/.whl/ray-core.tar.xz" .
)
ls -la .whl && du -sh .whl
