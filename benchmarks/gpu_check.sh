#!/usr/bin/env bash
# One-call check of the CUDA backend on a GPU machine (an H100 with its own
# torch and nvcc, no network), in under 10 minutes:
#   1. build the extension in place for the local GPU's arch (SELFATTN_CUDA_ARCHS
#      defaults to it, e.g. 9.0), then print the device and its shared memory;
#   2. the CUDA_FACTS.md self-tests of the kernels' building blocks
#      (benchmarks/gpu_selftest.py facts);
#   3. the CUDA tests (tests/test_cuda.py, tests/test_cuda_modifiers.py,
#      tests/test_cuda_build.py);
#   4. compute-sanitizer memcheck, racecheck and synccheck on small end-to-end
#      cases (benchmarks/gpu_selftest.py sanitize), when compute-sanitizer exists;
#   5. benchmarks/bench_gpu.py against SDPA's backends and FlexAttention.
# Each step has its own time limit and log in OUT_DIR; a failing step does not
# stop the later ones; the benchmark gets what is left of 560 s. Prints a step
# summary, then the benchmark table, last.
#
# usage: bash benchmarks/gpu_check.sh OUT_DIR
set -uo pipefail
START=$(date +%s)
OUT=$(mkdir -p "${1:?usage: gpu_check.sh OUT_DIR}" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

CC=$(python -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
export SELFATTN_BUILD_CUDA=1 SELFATTN_CUDA_ARCHS="${SELFATTN_CUDA_ARCHS:-$CC}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

SUMMARY=()
step() {  # step NAME LIMIT_SECONDS CMD...: runs CMD with a time limit, logs to OUT/NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (limit ${limit}s): $*"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.log"
  SUMMARY+=("$(printf '%-10s rc=%-3s %4ss' "$name" "$rc" "$(( $(date +%s) - start ))")")
  return $rc
}

if ! step build 200 python setup.py build_ext --inplace; then
  echo "build failed: see $OUT/build.log"
  printf '%s\n' "${SUMMARY[@]}"
  exit 1
fi
grep -E "spill|stack frame" "$OUT/build.log" | sort | uniq -c | sort -rn | head -5
python - <<'EOF'
import torch
p = torch.cuda.get_device_properties(0)
print(f"device {p.name}, cc {p.major}.{p.minor}, "
      f"smem/block opt-in {getattr(p, 'shared_memory_per_block_optin', '?')} B, torch {torch.__version__}")
EOF

step selftest 90 python benchmarks/gpu_selftest.py facts
step tests 150 python -m pytest -q -p no:cacheprovider --durations=5 tests/test_cuda.py \
  tests/test_cuda_modifiers.py tests/test_cuda_build.py

SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -n "$SANITIZER" ]; then
  for tool in memcheck racecheck synccheck; do
    step "$tool" 40 "$SANITIZER" --tool "$tool" --error-exitcode 1 --kernel-name kns=selfattn \
      python benchmarks/gpu_selftest.py sanitize
  done
else
  echo "compute-sanitizer not found: memcheck/racecheck/synccheck skipped"
  SUMMARY+=("sanitizer  skipped (compute-sanitizer not found)")
fi

LEFT=$(( 560 - ($(date +%s) - START) ))
if [ "$LEFT" -gt 45 ]; then
  step bench "$LEFT" python benchmarks/bench_gpu.py "$OUT" --seqlens 1024,4096,16384 \
    --time-budget $(( LEFT - 40 ))
else
  SUMMARY+=("bench      skipped (${LEFT}s left)")
fi

echo "== summary (logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
[ -f "$OUT/bench_gpu.md" ] && cat "$OUT/bench_gpu.md"
