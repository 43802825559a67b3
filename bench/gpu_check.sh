#!/usr/bin/env bash
# The GPU checks of the triton backend, as ONE prepared run on an NVIDIA GPU machine
# (well inside 10 minutes on an H200). From the repository root:
#
#   bash bench/gpu_wheels.sh                          # here, once: the missing wheels into .whl/
#   # then on the GPU machine (device tool: carry [".whl"]):
#   bash bench/gpu_check.sh [--quick]                 # writes logs under ${OUT:-/tmp/gpu_check}
#
# 1. the CUDA tests (tests/test_kernel_triton.py, compiled kernels against the CPU reference;
#    TRITON_INTERPRET must be unset), 2. bench/bench_gpu_moe.py (its figures go in the README).
set -uo pipefail
LOGS="${OUT:-/tmp/gpu_check}"
mkdir -p "$LOGS"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing .whl/ failed"; exit 1; }
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 - <<'PY' 2>&1 | tee "$LOGS/env.txt"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PY
echo "== CUDA tests"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_triton.py -rs 2>&1 | tee "$LOGS/tests.txt"
tests_rc=${PIPESTATUS[0]}
echo "== benchmark"
timeout 420 python3 bench/bench_gpu_moe.py "$@" 2>&1 | tee "$LOGS/bench.txt"
bench_rc=${PIPESTATUS[0]}
echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc (logs in $LOGS)"
exit $(( tests_rc != 0 || bench_rc != 0 ))
