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

# dion_sanitizer_stage <build dir>: configure a CPU-only ASan+UBSan build (no CUDA, no MPI), build the
# CPU test binary and the fuzz-corpus replay, run them (ctest labels unit and fuzz). Returns ctest's
# status. DION_SANITIZE (address,undefined) and DION_SANITIZE_BUILD_TYPE (Release: -O3 -DNDEBUG, plus
# -g1 from DION_SANITIZE) override.
dion_sanitizer_stage() {
  local build_dir="$1" log rc
  shift
  DION_CUDA=OFF DION_BUILD_TYPE="${DION_SANITIZE_BUILD_TYPE:-Release}" dion_configure "$build_dir" \
    -DDION_SANITIZE="${DION_SANITIZE:-address,undefined}" -DDION_ENABLE_MPI=OFF -DDION_ENABLE_NCCL=OFF \
    -DDION_BUILD_EXAMPLES=OFF -DDION_BUILD_BENCH=OFF -DDION_BUILD_TOOLS=OFF -DDION_INSTALL=OFF || return $?
  dion_build "$build_dir" --target dion_tests dion_fuzz_replay || return $?
  dion_sanitizer_env
  log="$build_dir/ctest.log"
  ctest --test-dir "$build_dir" --output-on-failure --no-tests=error -j "$DION_JOBS" -L '^(unit|fuzz)$' "$@" \
    2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  return "$rc"
}
