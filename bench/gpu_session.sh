#!/usr/bin/env bash
# Every GPU check of issue 10 in one `device` call (run with timeout_s 600), all output under $OUT:
#   gpu.txt          the card and driver
#   cuda_tests.txt   the CUDA-only tests (captured step == eager; merged int4 state_dict on CUDA's tiles)
#   bench_gpu.json   bench_gpu.py's phases and summary (saved after every phase), bench_gpu.log its output
# Then record the figures in bench/RESULTS.md with the date and the device.
set -uo pipefail
OUT=${OUT:-/tmp/nextstep-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/core/test_fast.py tests/core/test_merge.py -k cuda -rs \
    2>&1 | tee "$OUT/cuda_tests.txt"
"$PY" bench/bench_gpu.py --budget 420 --phase-cap 40 --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
