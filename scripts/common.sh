# shellcheck shell=bash
# Shared by scripts/test, scripts/demo and scripts/build-gpu (sourced, not run).
#
#   dion_install_packages [extra...]   install the Debian packages that are missing (apt-get update
#                                      first, only when something is missing)
#   dion_configure <build dir> [cmake args...]
#                                      configure a Release build: MPI on, CUDA on when
#                                      /usr/local/cuda/bin/nvcc exists (so CUDA code is compiled)
#   dion_build <build dir> [cmake --build args...]
#
# Environment: DION_BUILD_TYPE (Release), DION_JOBS (number of cores), CMAKE_GENERATOR (CMake's
# default), DION_NVCC (/usr/local/cuda/bin/nvcc), DION_CUDA=ON|OFF|AUTO (ON when nvcc exists).

DION_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DION_JOBS="${DION_JOBS:-$(nproc 2>/dev/null || echo 2)}"
DION_BUILD_TYPE="${DION_BUILD_TYPE:-Release}"
DION_NVCC="${DION_NVCC:-/usr/local/cuda/bin/nvcc}"

# What the build, the tests and the demo need, from Debian 12 packages only.
DION_PACKAGES=(cmake make g++ libeigen3-dev catch2 libopenmpi-dev openmpi-bin nlohmann-json3-dev
               python3-matplotlib zlib1g-dev)

dion_log() { printf '[dion] %s\n' "$*" >&2; }

dion_install_packages() {
  local wanted=("${DION_PACKAGES[@]}" "$@") missing=() pkg
  for pkg in "${wanted[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$pkg")
    fi
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    dion_log "not a Debian system: make sure these (or their equivalents) are installed: ${missing[*]}"
    return 0
  fi
  dion_log "installing missing Debian packages: ${missing[*]}"
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo -n)
    else
      dion_log "not root and no sudo: install these packages first: ${missing[*]}"
      return 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

dion_configure() {
  local build_dir="$1"
  shift
  local args=(-S "$DION_ROOT" -B "$build_dir" "-DCMAKE_BUILD_TYPE=$DION_BUILD_TYPE" -DDION_ENABLE_MPI=ON)
  local cuda="${DION_CUDA:-}"
  if [ -z "$cuda" ]; then
    if [ -x "$DION_NVCC" ]; then cuda=ON; else cuda=AUTO; fi
  fi
  args+=("-DDION_ENABLE_CUDA=$cuda")
  if [ "$cuda" != OFF ] && [ -x "$DION_NVCC" ]; then
    args+=("-DCMAKE_CUDA_COMPILER=$DION_NVCC")
  fi
  dion_log "cmake ${args[*]} $*"
  cmake "${args[@]}" "$@"
}

dion_build() {
  local build_dir="$1"
  shift
  dion_log "cmake --build $build_dir -j $DION_JOBS $*"
  cmake --build "$build_dir" -j "$DION_JOBS" "$@"
}

# Open MPI refuses root and more ranks than cores unless told; CI runs as root on 2 cores.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1

# --- Sanitizer stage (scripts/test; RELIABILITY.md S1, C10) -----------------------------------------
# dion_sanitizer_env: the runtime options of an ASan/UBSan run (non-recovering build: DION_SANITIZE).
# Leaks are checked; Open MPI's known leaks are suppressed (tests/sanitizers/lsan-openmpi.supp).
dion_sanitizer_env() {
  export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:detect_odr_violation=2:abort_on_error=0:halt_on_error=1}"
  export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
  export LSAN_OPTIONS="${LSAN_OPTIONS:-suppressions=$DION_ROOT/tests/sanitizers/lsan-openmpi.supp:fast_unwind_on_malloc=0}"
}

# dion_sanitizer_stage <build dir>: configure a CPU-only ASan+UBSan build (no CUDA; MPI on), build the
# CPU test binary, the fuzz-corpus replay and the two MPI suites that matter most for memory safety
# (dion_mpi_distributed, dion_mpi_checkpoint), run the CPU ones (ctest labels unit and fuzz), then the
# MPI runs named by DION_SANITIZE_MPI_TESTS (default: both suites at 2 ranks and the checkpoint suite at
# 4 ranks). Returns the first failing ctest's status. DION_SANITIZE (address,undefined) and
# DION_SANITIZE_BUILD_TYPE (Release: -O3 -DNDEBUG, plus -g1 from DION_SANITIZE) override;
# DION_SANITIZE_MPI=0 leaves MPI out (configured without it, as before).
#
# MPI runs under ASan: every rank gets the sanitizer options through mpiexec (-x ASAN_OPTIONS -x
# LSAN_OPTIONS -x UBSAN_OPTIONS, baked into DION_MPIEXEC_FLAGS of the sanitizer build). Leak detection
# stays on for them too: Open MPI 4.1 leaks ~120 KB in its own components at MPI_Finalize (libopen-rte,
# libopen-pal, libmpi, libhwloc, libevent, ...), which tests/sanitizers/lsan-openmpi.supp suppresses
# (measured clean with Debian 12's Open MPI 4.1.4: 2 and 4 ranks). An Open MPI build that leaks through
# other components can turn leak detection off for the MPI runs only: DION_SANITIZE_MPI_LEAKS=0
# (ASAN_OPTIONS=...:detect_leaks=0 for them; every other ASan/UBSan check stays on).
dion_sanitizer_stage() {
  local build_dir="$1" rc mpi="${DION_SANITIZE_MPI:-1}"
  shift
  local targets=(dion_tests dion_fuzz_replay)
  local mpi_flag=OFF
  if [ "$mpi" != 0 ]; then
    mpi_flag=ON
    targets+=(dion_mpi_distributed dion_mpi_checkpoint)
  fi
  DION_CUDA=OFF DION_BUILD_TYPE="${DION_SANITIZE_BUILD_TYPE:-Release}" dion_configure "$build_dir" \
    -DDION_SANITIZE="${DION_SANITIZE:-address,undefined}" -DDION_ENABLE_MPI="$mpi_flag" -DDION_ENABLE_NCCL=OFF \
    -DDION_BUILD_EXAMPLES=OFF -DDION_BUILD_BENCH=OFF -DDION_BUILD_TOOLS=OFF -DDION_INSTALL=OFF \
    "-DDION_MPIEXEC_FLAGS=-x;ASAN_OPTIONS;-x;LSAN_OPTIONS;-x;UBSAN_OPTIONS" || return $?
  dion_build "$build_dir" --target "${targets[@]}" || return $?
  rm -f "$build_dir/ctest-mpi.log"
  dion_sanitizer_env
  ctest --test-dir "$build_dir" --output-on-failure --no-tests=error -j "$DION_JOBS" -L '^(unit|fuzz)$' "$@" \
    2>&1 | tee "$build_dir/ctest.log"
  rc=${PIPESTATUS[0]}
  if [ "$mpi" != 0 ] && [ "$#" -eq 0 ]; then
    local mpi_rc mpi_asan="$ASAN_OPTIONS"
    if [ "${DION_SANITIZE_MPI_LEAKS:-1}" = 0 ]; then mpi_asan="$mpi_asan:detect_leaks=0"; fi
    ASAN_OPTIONS="$mpi_asan" \
      ctest --test-dir "$build_dir" --output-on-failure --no-tests=error \
      -R "${DION_SANITIZE_MPI_TESTS:-^dion_mpi_(distributed_np2|checkpoint_np2|checkpoint)\$}" 2>&1 |
      tee "$build_dir/ctest-mpi.log"
    mpi_rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then rc=$mpi_rc; fi
  fi
  return "$rc"
}
