#!/usr/bin/env bash
# One device-machine call for the CUDA backend: GPU tests, the benchmark, compute-sanitizer.
# Run from the repository root on the device machine after ./scripts/build-gpu here, carrying .gpubin:
#   tests/gpu/run_on_device.sh [tests] [bench] [memcheck[=FILTER]] [initcheck[=FILTER]]   (default: tests bench)
# Full logs go to $OUT (or /tmp/dion-gpu-out); the console gets a short summary.
set -uo pipefail
out="${OUT:-/tmp/dion-gpu-out}"
mkdir -p "$out"
export DION_REQUIRE_GPU=1
export DION_TEST_DATA_DIR="${DION_TEST_DATA_DIR:-$PWD/tests/data}"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin=.gpubin/test/dion_gpu_tests
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
[ $# -eq 0 ] && set -- tests bench
for step in "$@"; do
  case "$step" in
    tests)
      start=$(date +%s)
      timeout 150 "$bin" -r compact >"$out/tests.log" 2>&1
      rc=$?
      echo "== tests rc=$rc ($(( $(date +%s) - start )) s)"
      grep -E "failed|FAILED" "$out/tests.log" | cut -c1-300 | head -n 25
      grep -E "^(Passed|Failed|test cases)" "$out/tests.log" | tail -n 2
      if [ -x .gpubin/test/dion_gpu_unit_tests ]; then
        start=$(date +%s)
        timeout 150 .gpubin/test/dion_gpu_unit_tests -r compact >"$out/unit.log" 2>&1
        echo "== unit tests (Eigen + CUDA) rc=$? ($(( $(date +%s) - start )) s)"
        grep -E "failed|FAILED" "$out/unit.log" | cut -c1-300 | head -n 15
        grep -E "^(Passed|Failed|test cases)" "$out/unit.log" | tail -n 2
      fi
      timeout 60 .gpubin/test/dion_gpu_smoke >"$out/smoke.log" 2>&1
      echo "== smoke rc=$?"
      ;;
    bench)
      timeout 90 .gpubin/bench/dion_cuda_bench "$out/bench.jsonl" >"$out/bench.log" 2>&1
      echo "== bench rc=$?"
      sed -E 's/"gpu":"[^"]*","driver":[0-9]+,"runtime":[0-9]+,"calib_bf16_gemm_tflops":[0-9]+,"calib_copy_tbs":[0-9.]+,//' "$out/bench.log" | cut -c1-260
      ;;
    memcheck*|initcheck*)
      tool="${step%%=*}"
      filter=""
      [ "$step" != "$tool" ] && filter="${step#*=}"
      extra=()
      [ "$tool" = memcheck ] && extra=(--leak-check full)
      start=$(date +%s)
      timeout 150 compute-sanitizer --tool "$tool" "${extra[@]}" --error-exitcode 9 --print-limit 20 \
        "$bin" ${filter:+"$filter"} >"$out/$tool.log" 2>&1
      rc=$?
      echo "== $tool ${filter:-all} rc=$rc ($(( $(date +%s) - start )) s)"
      grep -E "ERROR SUMMARY|LEAK SUMMARY|test cases" "$out/$tool.log" | tail -n 5
      grep -m 10 -E "^=========.*(Invalid|Uninitialized|error|Error)" "$out/$tool.log"
      ;;
  esac
done
