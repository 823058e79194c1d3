#!/usr/bin/env bash
# The GPU checks of xdownscale in one command, for a CUDA machine that lacks the project's pure-Python
# dependencies (the project's lent GPU machine: python 3.12 and torch, no dask, cf-xarray, pint, pytest, ...).
#
# Here, once, with the project venv active (wheels into .whl/, ignored by git):
#     bash ../shared/tools/gpu-wheels.sh
#     python -m pip download -q --no-deps -d .whl pytest pluggy iniconfig packaging
# There, from the project root with .whl/ beside it (OUT: where the results go; default: results/):
#     OUT=/some/dir bash benchmarks/gpu_check.sh
# It installs the wheels into /tmp/site, runs the tests marked gpu (CUDA against the CPU: the device
# route, preserve's conjugate gradients, compiled inference, keyed noise, training) into $OUT/gpu-tests.txt
# and benchmarks/bench_gpu.py into $OUT/bench_gpu.txt and $OUT/gpu.json. About 5 minutes on an H200.
#
# QUICK=1 runs the same steps with bench_gpu.py --quick on the CPU (a check of this script, seconds).
set -uo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - <<'EOF' | tee "$OUT/machine.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0))
EOF
files=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
if python3 -c "import pytest" 2>/dev/null; then
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider $files 2>&1 | tail -40 | tee "$OUT/gpu-tests.txt"
else
  echo "pytest is not installed: download its wheels into .whl (see the header)" | tee "$OUT/gpu-tests.txt"
fi
if [ "${QUICK:-0}" = 1 ]; then
  python3 benchmarks/bench_gpu.py --quick --device cpu --json "$OUT/gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
else
  timeout 420 python3 benchmarks/bench_gpu.py --json "$OUT/gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
fi
