#!/usr/bin/env bash
# One run that builds, tests and benchmarks every GPU path, on a GPU machine with no network
# (Python 3.12, torch + CUDA, Triton, pybind11 and nvcc preinstalled), in well under 8 minutes.
#
#   tools/gpu_suite.sh [RESULTS_DIR]        (default benchmarks/results/gpu)
#
# Writes build info, the pytest log and junit XML, and each benchmark's JSON + Markdown to
# RESULTS_DIR, and prints a summary table last. On a machine without a GPU it still runs end to
# end (GPU tests skip with their reason, benchmarks take their CPU shapes): that is how it is
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

# 1. build and install without network (the C++/CUDA extension compiles here)
step install 240 "$PY" -m pip install --no-build-isolation --no-deps -q -e .
step build_info 30 "$PY" -c "import json, clinvla_engine as c; print(json.dumps(c.build_info(), indent=1))"
"$PY" -c "import json, clinvla_engine as c; json.dump(c.build_info(), open('$OUT/build_info.json', 'w'), indent=1)" 2>/dev/null

# 2. the tests that need a GPU (full shapes); CPU tests are CI's job
step tests_gpu 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/tests_gpu.xml" -rs tests

# 3. benchmarks (each writes $OUT/<bench>.json and .md)
step bench_local_align 150 "$PY" -m benchmarks.bench_local_align --quick --out "$OUT"
step bench_train_step 90 "$PY" -m benchmarks.bench_train_step --out "$OUT" --repeat 5

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
