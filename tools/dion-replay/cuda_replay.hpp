// dion-replay on the CUDA backend: the same replay (replay.hpp) with a dion::CudaBackend on a stream
// of its own. This header *defines* dion::replay::replay_cuda (the function main.cpp declares when
// built with DION_REPLAY_WITH_CUDA): include it from exactly one .cu file of a program.
#pragma once

#include <cuda_runtime.h>

#include "dion/cuda.hpp"
#include "replay.hpp"

namespace dion::replay {

Result replay_cuda(const safetensors::File& file) {
  cudaStream_t stream = nullptr;
  DION_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  struct StreamGuard {
    cudaStream_t s;
    ~StreamGuard() { cudaStreamDestroy(s); }
  } guard{stream};
  CudaBackend backend{stream};
  return replay(file, backend);
}

}  // namespace dion::replay
