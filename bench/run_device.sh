#!/usr/bin/env bash
# One device-machine call for the benchmarks (run from the repository root there), with the GPU
# programs built here and carried in a git-ignored folder:
#   bench/run_device.sh <bin dir> [tests] [bench=ITEMS] ...
#     tests          dion_gpu_tests (every op and optimizer, CUDA vs Eigen) and the smoke test
#                    (TESTS_FILTER: a Catch2 filter, e.g. "[ops],[step]"; TESTS_TIMEOUT seconds)
#     bench=ITEMS    dion_cuda_bench --only ITEMS (see bench/cuda_bench.cu), JSON to $OUT/bench-N.jsonl
# Logs and JSON lines go to $OUT (or /tmp/dion-bench-out); the console gets a short summary.
set -uo pipefail
bin="${1:?bin dir}"
shift
out="${OUT:-/tmp/dion-bench-out}"
mkdir -p "$out"
export DION_REQUIRE_GPU=1
export DION_TEST_DATA_DIR="${DION_TEST_DATA_DIR:-$PWD/tests/data}"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader | tee "$out/nvidia-smi.txt"
n=0
for step in "$@"; do
  case "$step" in
    tests)
      start=$(date +%s)
      timeout "${TESTS_TIMEOUT:-240}" "$bin/dion_gpu_tests" -r compact ${TESTS_FILTER:+"$TESTS_FILTER"} >"$out/tests.log" 2>&1
      echo "== dion_gpu_tests rc=$? ($(( $(date +%s) - start )) s)"
      grep -E "failed|FAILED" "$out/tests.log" | cut -c1-300 | head -n 20
      grep -E "^(Passed|Failed|test cases)" "$out/tests.log" | tail -n 2
      [ -x "$bin/dion_gpu_smoke" ] && { timeout 60 "$bin/dion_gpu_smoke" >/dev/null 2>&1; echo "== smoke rc=$?"; }
      ;;
    bench=*)
      n=$((n + 1))
      start=$(date +%s)
      timeout "${BENCH_TIMEOUT:-400}" "$bin/dion_cuda_bench" --only "${step#bench=}" --out "$out/bench-$n.jsonl" \
        >"$out/bench-$n.log" 2>&1
      echo "== bench ${step#bench=} rc=$? ($(( $(date +%s) - start )) s)"
      # one short line per result
      sed -E 's/,"(gpu|driver_api|runtime|calib_bf16_gemm_tflops|calib_copy_tbs|flops|bytes|state_bytes|workspace_bytes|backend_scratch_bytes|device_bytes_at_registration|params|matrices|floor_from_table|first_ms|min_ms|p90_ms)":("[^"]*"|[^,}]*)//g' \
        "$out/bench-$n.log" | cut -c1-230
      ;;
  esac
done
