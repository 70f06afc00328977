#!/usr/bin/env bash
# Builds selfattn's CPU extension with AddressSanitizer + UndefinedBehaviorSanitizer
# in a copy of the tree (the checkout's own build is left alone) and runs a fast
# subset of the tests under it (issue #6).
#
#   tools/sanitize.sh                 # build in $SAN_DIR (default /tmp/sanbuild) and test
#   SAN_SKIP_BUILD=1 tools/sanitize.sh  # reuse the last sanitizer build
#   SAN_TESTS="tests/test_edge_cases.py" tools/sanitize.sh   # other tests
#
# Flags reach the C++ compiles through CFLAGS (torch's ninja build takes the
# compiler flags from setuptools' compiler_so, which includes $CFLAGS) and the
# link through LDFLAGS; no setup.py change is needed. The libasan runtime is
# LD_PRELOADed into python with libstdc++ (the interpreter is not instrumented);
# detect_leaks=0 because CPython leaks by design. A finding makes the script
# exit non-zero; the log is $SAN_DIR/sanitize.log. pytest runs with -s: a
# sanitizer report is written to fd 2 just before the process exits, and
# pytest's fd capture would swallow it. UBSan stops at the first finding;
# SAN_DESELECT=<pattern> deselects tests (-k "not <pattern>").
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SAN_DIR="${SAN_DIR:-/tmp/sanbuild}"
PY="${PYTHON:-python}"
LOG="$SAN_DIR/sanitize.log"
SAN_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g"

mkdir -p "$SAN_DIR"
if [ -z "${SAN_SKIP_BUILD:-}" ]; then
  # tracked and untracked-but-not-ignored files (no build/, no *.so)
  find "$SAN_DIR" -mindepth 1 -maxdepth 1 ! -name '*.log' -exec rm -rf {} +
  git -C "$SRC" ls-files -co --exclude-standard -z \
    | (cd "$SRC" && tar --null -cf - -T - 2>/dev/null) | tar -C "$SAN_DIR" -xf -
  (cd "$SAN_DIR" && rm -rf build && \
     SELFATTN_BUILD_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
     CFLAGS="$SAN_FLAGS" LDFLAGS="-fsanitize=address,undefined" \
     "$PY" setup.py build_ext --inplace > "$SAN_DIR/build.log" 2>&1) \
    || { tail -40 "$SAN_DIR/build.log"; echo "sanitize.sh: build failed"; exit 2; }
fi
# the build must really be instrumented
for so in "$SAN_DIR"/selfattn/_cpu_*.so; do
  # (grep without -q: it must read all of nm's output, or pipefail sees SIGPIPE)
  nm -D "$so" | grep __asan_init > /dev/null \
    || { echo "sanitize.sh: $so is not instrumented"; exit 2; }
done

# the tests themselves always come fresh from the checkout
rm -rf "$SAN_DIR/tests" && cp -r "$SRC/tests" "$SAN_DIR/tests"

LIBASAN="$(gcc -print-file-name=libasan.so)"
# libstdc++ right after libasan: otherwise ASan's __cxa_throw interceptor finds no
# real __cxa_throw and the first C++ exception (any RuntimeError from torch or
# selfattn) aborts with "CHECK failed: asan_interceptors.cpp ... real___cxa_throw"
LIBSTDCXX="$(gcc -print-file-name=libstdc++.so)"
TESTS="${SAN_TESTS:-tests/test_attention.py tests/test_features.py tests/test_edge_cases.py tests/test_property.py}"
cd "$SAN_DIR"
set +e
# shellcheck disable=SC2086
LD_PRELOAD="$LIBASAN $LIBSTDCXX" \
ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:print_stacktrace=1:symbolize=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:report_error_type=1" \
PYTHONPATH="$SAN_DIR" "$PY" -m pytest $TESTS -q -s -p no:cacheprovider -rfEX \
  -k "not memory${SAN_DESELECT:+ and not $SAN_DESELECT}" > "$LOG" 2>&1
rc=$?
set -e
tail -5 "$LOG"
if grep -qE "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$LOG"; then
  echo "sanitize.sh: sanitizer findings:"
  grep -nE -A30 "ERROR: AddressSanitizer|runtime error:" "$LOG" | head -120
  exit 1
fi
echo "sanitize.sh: no sanitizer findings (pytest exit code $rc); log: $LOG"
exit $rc
