#!/usr/bin/env bash
# The pure-Python wheels bench/gpu_check.sh needs on a GPU machine that has torch, torchvision, timm,
# scikit-image and pytest but not this project's other dependencies; saved into .whl/ (git-ignored).
# webdataset and braceexpand are imported by index.gallery; their own needs (numpy, pyyaml) are there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  webdataset==0.2.111 braceexpand==0.1.7
ls -l .whl
