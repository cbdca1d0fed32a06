// BackendEnv<dion::CudaBackend>: the CUDA specialization of tests/backend_env.hpp, so the
// backend-generic test bodies (TEMPLATE_TEST_CASE over DION_TEST_BACKENDS) run on the GPU too. It owns
// a non-blocking stream and the backend built on it. Include from .cu test files only (it includes
// dion/cuda.hpp); a GPU test build defines DION_TEST_BACKENDS as `dion::CudaBackend`
// before including it (tests/gpu/unit_*.cu).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend_env.hpp"
#include "dion/cuda.hpp"
#include "dion/dion.hpp"

namespace dion_test {

/// The CUDA backend on a stream of its own (non-blocking: it does not synchronize with the legacy
/// default stream, as a training program's streams usually do not).
template <>
struct BackendEnv<dion::CudaBackend> : BackendEnvCommon<BackendEnv<dion::CudaBackend>, dion::CudaBackend> {
  static constexpr const char* name = "cuda";
  explicit BackendEnv(dion::CudaBackendOptions o = {}) {
    if (cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking) != cudaSuccess)
      throw std::runtime_error("BackendEnv<CudaBackend>: cudaStreamCreate failed");
    backend_ = std::make_unique<dion::CudaBackend>(stream_, o);
  }
  BackendEnv(const BackendEnv&) = delete;
  BackendEnv& operator=(const BackendEnv&) = delete;
  ~BackendEnv() {
    backend_.reset();
    if (stream_) cudaStreamDestroy(stream_);
  }
  dion::CudaBackend& backend() { return *backend_; }
  cudaStream_t stream() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<dion::CudaBackend> backend_;
};

}  // namespace dion_test
