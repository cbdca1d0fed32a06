// Device-side building blocks of the CUDA backend: strided matrix references with 64-bit offsets,
// float/bf16 loads and stores that round exactly like the Eigen backend (round to nearest even, NaN
// kept), arithmetic that the compiler may not contract into FMAs (so element-wise results match the
// host's op-by-op rounding), launch drivers and block reductions. nvcc only.
#pragma once

#if !defined(__CUDACC__)
#error "dion/backend/cuda/kernels/*.cuh hold device code: include them from a .cu file compiled by nvcc"
#endif

#include <cuda_runtime.h>

#include <cstdint>

#include "dion/core/bf16.hpp"
#include "dion/core/view.hpp"

namespace dion::cuda_kernels {

using i64 = std::int64_t;

/// A strided batch of matrices on the device: element (b, i, j) at b·bs + i·ld + j (64-bit).
template <class T>
struct MRef {
  T* p;
  i64 ld, bs;
  __device__ __forceinline__ T& operator()(i64 b, i64 i, i64 j) const { return p[b * bs + i * ld + j]; }
};
template <class T>
inline MRef<T> mref(const Mat<T, CudaSpace>& m) {
  return MRef<T>{m.data, m.ld, m.batch_stride};
}
template <class T>
inline MRef<const T> cmref(const Mat<T, CudaSpace>& m) {
  return MRef<const T>{m.data, m.ld, m.batch_stride};
}

/// The iteration space of an element-wise kernel: batch × rows × cols.
struct Dims {
  i64 batch, rows, cols;
  bool empty() const { return batch <= 0 || rows <= 0 || cols <= 0; }
};

// ------------------------------------------------------------------ loads, stores, rounding
__device__ __forceinline__ float ldf(float v) { return v; }
__device__ __forceinline__ float ldf(bf16 v) { return bf16::to_float(v.bits); }
template <class T>
__device__ __forceinline__ T stf(float f) {
  if constexpr (std::is_same_v<T, float>) return f;
  else return bf16::from_bits(bf16::from_float(f));
}
/// The value a store to T and a load back give (identity for float).
template <class T>
__device__ __forceinline__ float rnd(float f) {
  if constexpr (std::is_same_v<T, float>) return f;
  else return bf16::to_float(bf16::from_float(f));
}
__device__ __forceinline__ bool finite(float f) { return is_finite_bits(f); }
__device__ __forceinline__ bool finite(bf16 v) { return is_finite_bits(v); }

// Uncontracted IEEE arithmetic: a·b + c written with these rounds twice, like the host code.
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float dvd(float a, float b) { return __fdiv_rn(a, b); }

// ------------------------------------------------------------------ reductions
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ int warp_or(int v) { return __any_sync(0xffffffffu, v != 0) ? 1 : 0; }

/// Sum over the block (blockDim.x a multiple of 32, ≤ 1024); the result is valid in thread 0.
__device__ inline double block_sum(double v) {
  __shared__ double part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // part[] may still be read by a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  v = threadIdx.x < nw ? part[threadIdx.x] : 0.0;
  if (warp == 0) v = warp_sum(v);
  return v;
}

// ------------------------------------------------------------------ launch drivers
/// The step predicate (CudaBackend::set_skip): kernels that write parameters or optimizer state
/// return at once when it is set and raised.
__device__ __forceinline__ bool skipped(const int* skip) { return skip != nullptr && *skip != 0; }

inline constexpr int kThreads = 256;
inline constexpr int kTileCols = kThreads * 4;  // columns one block visits per work unit

/// Element-wise driver: work units are (matrix row, tile of kTileCols columns); each thread calls
/// f(b, i, j) for its elements. One 64-bit division per unit, none per element.
template <class F>
__global__ void __launch_bounds__(kThreads) ew_kernel(Dims d, i64 ntiles, F f, const int* skip) {
  if (skipped(skip)) return;
  const i64 units = d.batch * d.rows * ntiles;
  for (i64 u = blockIdx.x; u < units; u += gridDim.x) {
    const i64 R = u / ntiles, t = u - R * ntiles;
    const i64 b = R / d.rows, i = R - b * d.rows;
    const i64 j0 = t * kTileCols;
    const i64 j1 = j0 + kTileCols < d.cols ? j0 + kTileCols : d.cols;
    for (i64 j = j0 + threadIdx.x; j < j1; j += kThreads) f(b, i, j);
  }
}

/// Per-matrix driver: block k of the `bpm` blocks of matrix b (blockIdx.x = b·bpm + k) visits a
/// share of matrix b's elements, calling f(i, j).
template <class F>
__device__ __forceinline__ void visit_matrix_share(const Dims& d, i64 ntiles, int k, int bpm, F&& f) {
  const i64 units = d.rows * ntiles;
  for (i64 u = k; u < units; u += bpm) {
    const i64 i = u / ntiles, t = u - i * ntiles;
    const i64 j0 = t * kTileCols;
    const i64 j1 = j0 + kTileCols < d.cols ? j0 + kTileCols : d.cols;
    for (i64 j = j0 + threadIdx.x; j < j1; j += kThreads) f(i, j);
  }
}

inline i64 tiles_of(i64 cols) { return (cols + kTileCols - 1) / kTileCols; }

/// Grid size for ew_kernel: enough blocks to fill the device, capped (the kernel grid-strides).
inline unsigned ew_grid(const Dims& d, int sms) {
  const i64 units = d.batch * d.rows * tiles_of(d.cols);
  const i64 cap = static_cast<i64>(sms) * 16;
  return static_cast<unsigned>(units < cap ? units : cap);
}

/// Blocks per matrix for per-matrix reductions: a function of the matrix size only (never of the
/// batch), so a matrix reduces in the same order whether it comes alone or in a batch.
inline constexpr int kMaxBlocksPerMatrix = 256;
inline int blocks_per_matrix(const Dims& d) {
  const i64 units = d.rows * tiles_of(d.cols);
  const i64 elems = d.rows * d.cols;
  i64 bpm = (elems + static_cast<i64>(kThreads) * 16 - 1) / (static_cast<i64>(kThreads) * 16);
  if (bpm > units) bpm = units;
  if (bpm < 1) bpm = 1;
  if (bpm > kMaxBlocksPerMatrix) bpm = kMaxBlocksPerMatrix;
  return static_cast<int>(bpm);
}

/// Rows of all operands contiguous (ld == cols): an element-wise op that addresses every operand by
/// the same (b, i, j) may treat each matrix as one row (fewer, longer work units).
inline Dims merge_rows(Dims d, bool all_row_contiguous) {
  if (all_row_contiguous && d.rows > 1) {
    d.cols *= d.rows;
    d.rows = 1;
  }
  return d;
}

}  // namespace dion::cuda_kernels
