#!/usr/bin/env bash
# One run that builds, tests and benchmarks every GPU path, on a GPU machine with no network
# (Python 3.12, torch + CUDA, Triton, pybind11 and nvcc preinstalled), in at most 8 minutes: the step limits below add up to 480 s.
#
#   tools/gpu_suite.sh [RESULTS_DIR]        (default benchmarks/results/gpu)
#
# Writes build info, the pytest log and junit XML, and each benchmark's JSON + Markdown to
# RESULTS_DIR, and prints a summary table last. On a machine without a GPU it still runs end to
# end (GPU tests skip with their reason, benchmarks take their CPU shapes or say that they need
# CUDA): that is how it is
# checked before a GPU is borrowed. Each step has its own time limit, so one hung step cannot
# eat the whole budget; a failed step is reported and the suite goes on.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
STATUS="$OUT/steps.tsv"
: > "$STATUS"

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name="$1" limit="$2"; shift 2
  local t0=$(date +%s)
  echo "=== [$name] (limit ${limit}s) $*"
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%ss\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STATUS"
  echo "=== [$name] exit $rc after $(( $(date +%s) - t0 ))s"
}

# 1. build and install without network (the C++/CUDA extension compiles here; CMake if setuptools fails)
step install 95 bash -c "$PY -m pip install --no-build-isolation --no-deps -q -e . || { \
  cmake -S csrc -B build/ext -DCLINVLA_PYTHON=ON -DCLINVLA_WITH_CUDA=ON -DCLINVLA_BUILD_TESTS=OFF \
    -Dpybind11_DIR=\$($PY -m pybind11 --cmakedir) -DPython_EXECUTABLE=\$(command -v $PY) \
  && cmake --build build/ext -j 8 && cp build/ext/_C*.so clinvla_engine/; }"
step build_info 15 "$PY" -c "import json, clinvla_engine as c; print(json.dumps(c.build_info(), indent=1))"
"$PY" -c "import json, clinvla_engine as c; json.dump(c.build_info(), open('$OUT/build_info.json', 'w'), indent=1)" 2>/dev/null

# 2. the tests that need a GPU (full shapes); CPU tests are CI's job
step tests_gpu 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/tests_gpu.xml" -rs tests \
  --ignore=tests/test_export.py --ignore=tests/test_runtime.py --ignore=tests/test_engine_trt.py
step tests_engine_gpu 60 "$PY" -m pytest -q -m "gpu or trt" -p no:cacheprovider --junitxml="$OUT/tests_engine_gpu.xml" \
  -rs tests/test_runtime.py tests/test_engine_trt.py

# 3. benchmarks (each writes $OUT/<bench>.json and .md; a step cut by its limit keeps what it measured)
step bench_local_align 60 "$PY" -m benchmarks.bench_local_align --quick --out "$OUT"
step bench_topk 60 "$PY" benchmarks/bench_topk.py --part gpu --out "$OUT"
step bench_engine 70 "$PY" -m benchmarks.bench_engine --out "$OUT" --backends aoti,compile --budget-s 50
step bench_train_step 30 "$PY" -m benchmarks.bench_train_step --out "$OUT" --repeat 5

# 4. summary, printed last
echo
echo "=== summary ($(( $(date +%s) - START ))s in all) ==="
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| step | exit | time |")
print("|---|---:|---:|")
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    print(f"| {name} | {rc} | {secs} |")
print()
for p in sorted(out.glob("*.md")):
    print(p.read_text())
EOF
