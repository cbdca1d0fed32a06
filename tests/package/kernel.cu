// A consumer's CUDA translation unit (built when the cuda component and nvcc are available): dion's
// CUDA-facing headers must compile under nvcc with the C++20 that dion::cuda requests.
#if __has_include(<dion/cuda.hpp>)
#include <dion/cuda.hpp>
#endif
#include <dion/core/bf16.hpp>

#include <cstdio>

static_assert(__cplusplus >= 202002L, "dion::cuda must make nvcc compile C++20");

__global__ void round_to_bf16(const float* in, dion::bf16* out) { out[0] = dion::bf16(in[0]); }

int main() {
  std::printf("dion CUDA consumer (kernel compiled; not launched)\n");
  return 0;
}
