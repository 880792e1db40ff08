#!/usr/bin/env bash
# Every GPU check in one `device` call of at most 300 s (run with timeout_s 300), all output under $OUT:
#   gpu.txt          the card and driver
#   cuda_tests.txt   the CUDA-only tests (captured step == plain step, annealing on graphs; merged int4 on CUDA)
#   doctor.json      `python -m nextstep_core doctor --device cuda` (every path x format: error, speed, kernels, memory)
#   bench_gpu.json   bench_gpu.py's phases and summary (saved after every phase), bench_gpu.log its output
# Each step has its own time limit, so a slow one cannot take the others' time. Then record the figures in
# bench/RESULTS.md with the date and the device.
set -uo pipefail
OUT=${OUT:-/tmp/nextstep-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
timeout 45 "$PY" -m pytest -q -p no:cacheprovider tests/core/generation/test_graph.py tests/core/model/test_merge.py tests/core/model/test_host_embedding.py -k cuda -rs \
    2>&1 | tee "$OUT/cuda_tests.txt"
timeout 70 "$PY" -m nextstep_core doctor --device cuda --json "$OUT/doctor.json" 2>&1 | tee "$OUT/doctor.txt"
timeout 175 "$PY" bench/bench_gpu.py --budget 165 --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
