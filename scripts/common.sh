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
