// Checks the CUDA toolchain (nvcc, -std=c++20, the architecture list) and the GPU test harness:
// dion's bf16 rounding on the device equals the host's. Skipped (exit 77) without a GPU.
#include <concepts>
#include <cstdint>
#include <vector>

#include <cuda_runtime.h>

#include "catch_compat.hpp"
#include "dion/core/bf16.hpp"

static_assert(__cplusplus >= 202002L, "nvcc must compile dion's CUDA code as C++20");

template <std::floating_point T>
__global__ void to_bf16_bits(const T* in, std::uint16_t* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = dion::bf16(static_cast<float>(in[i])).bits;
}

TEST_CASE("harness: CUDA kernel matches host bf16 rounding", "[harness][gpu]") {
  const std::vector<float> in = {0.f, 1.f, -1.5f, 3.14159265f, 1e-30f, 65504.f, 1.00390625f, 3e38f};
  const int n = static_cast<int>(in.size());
  float* d_in = nullptr;
  std::uint16_t* d_out = nullptr;
  REQUIRE(cudaMalloc(&d_in, n * sizeof(float)) == cudaSuccess);
  REQUIRE(cudaMalloc(&d_out, n * sizeof(std::uint16_t)) == cudaSuccess);
  REQUIRE(cudaMemcpy(d_in, in.data(), n * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);
  to_bf16_bits<<<1, 32>>>(d_in, d_out, n);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  std::vector<std::uint16_t> out(in.size());
  REQUIRE(cudaMemcpy(out.data(), d_out, n * sizeof(std::uint16_t), cudaMemcpyDeviceToHost) == cudaSuccess);
  cudaFree(d_in);
  cudaFree(d_out);
  for (int i = 0; i < n; ++i) {
    INFO("input " << in[i]);
    CHECK(out[i] == dion::bf16(in[i]).bits);
  }
}
