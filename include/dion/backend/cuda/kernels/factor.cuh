// Helpers around the cuBLAS / cuSOLVER factorizations: row-major ↔ column-major copies, pointer
// arrays of batched calls, R extraction and the Cholesky post-pass (zero the other triangle, turn
// cuSOLVER's devInfo and a finiteness / positive-diagonal check into the Eigen backend's info flag).
#pragma once

#include <cstdint>

#include "dion/backend/cuda/kernels/common.cuh"

namespace dion::cuda_kernels {

/// W_b (column-major rows×cols, packed) ← A_b (row-major, strided).
struct ToColMajorF {
  MRef<const float> A;
  float* W;
  i64 rows, cols;
  __device__ void operator()(i64 b, i64 i, i64 j) const { W[b * rows * cols + j * rows + i] = A(b, i, j); }
};
/// P_b ← the first `kk` columns of the column-major W_b (rows×cols), zero beyond.
struct FromColMajorF {
  MRef<float> P;
  const float* W;
  i64 rows, cols, kk;
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    P(b, i, j) = j < kk ? W[b * rows * cols + j * rows + i] : 0.0f;
  }
};
/// R_b (r×r) ← upper triangle of the column-major W_b (m×r, leading dim m).
struct ExtractRF {
  MRef<float> R;
  const float* W;
  i64 m, r;
  __device__ void operator()(i64 b, i64 i, i64 j) const { R(b, i, j) = i <= j ? W[b * m * r + j * m + i] : 0.0f; }
};

template <class T>
__global__ void fill_ptrs(T** out, T* base, i64 stride, i64 n) {
  const i64 b = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x;
  if (b < n) out[b] = base + b * stride;
}

template <int = 0>
__global__ void info_from_dev(const int* dev_info, int* info, i64 n) {
  const i64 b = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x;
  if (b < n) info[b] = dev_info[b] != 0 ? 1 : 0;
}
/// Row-major upper Cholesky factor: zero the strictly lower triangle, flag a non-finite entry or a
/// diagonal that is not > 0.
struct CholPostF {
  MRef<float> A;
  int* info;
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    float& a = A(b, i, j);
    if (i > j) {
      a = 0.0f;
    } else if (!finite(a) || (i == j && !(a > 0.0f))) {
      info[b] = 1;
    }
  }
};

}  // namespace dion::cuda_kernels

namespace dion::cuda_kernels {

// ------------------------------------------------------------------ batched Householder QR (R only)
/// Threads of qr_r_householder (16 warps: one warp per trailing column at a time).
inline constexpr int kQrThreads = 512;

__device__ __forceinline__ float warp_sumf(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/// R_b ← the R factor of the Householder QR of A_b (k×r, k ≥ r), one block per matrix, with the
/// conventions of LAPACK's xGEQRF / Eigen's HouseholderQR (beta = −sign(alpha)·‖x‖, tau = 0 where
/// the tail is zero). The working copy W (column-major, leading dimension ldw) lives in shared
/// memory (kShared: ldw = k + 1, so the transposing load is free of bank conflicts) or in global
/// scratch (ldw = k, one k×r slice per matrix). Per column j: one barrier after scaling the
/// reflector, one after the trailing update; the warp that updates column j + 1 also reduces its
/// norm for the next step.
template <bool kShared>
__global__ void __launch_bounds__(kQrThreads) qr_r_householder(MRef<const float> A, MRef<float> R, int k, int r,
                                                               float* gW) {
  extern __shared__ float qr_smem[];
  __shared__ float s_alpha, s_sigma;
  const i64 b = blockIdx.x;
  float* W;
  i64 ldw;
  if constexpr (kShared) {
    W = qr_smem;
    ldw = k + 1;
  } else {
    W = gW + b * static_cast<i64>(k) * r;
    ldw = k;
  }
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const i64 kr = static_cast<i64>(k) * r;
  for (i64 e = tid; e < kr; e += blockDim.x) {
    const i64 i = e / r, c = e - i * r;
    W[c * ldw + i] = A(b, i, c);
  }
  __syncthreads();
  if (warp == 0) {
    float s = 0.0f;
    for (int i = 1 + lane; i < k; i += 32) s = fmaf(W[i], W[i], s);
    s = warp_sumf(s);
    if (lane == 0) {
      s_sigma = s;
      s_alpha = W[0];
    }
  }
  __syncthreads();
  for (int j = 0; j < r; ++j) {
    const float alpha = s_alpha, sigma = s_sigma;
    float* Wj = W + j * ldw;
    float tau = 0.0f, beta = alpha;
    if (!(sigma <= 1.17549435e-38f)) {  // Eigen's makeHouseholder: tail² ≤ FLT_MIN → H = I (NaN goes on)
      beta = sqrtf(alpha * alpha + sigma);
      if (alpha >= 0.0f) beta = -beta;
      const float den = alpha - beta;
      for (int i = j + 1 + tid; i < k; i += blockDim.x) Wj[i] = __fdiv_rn(Wj[i], den);
      tau = __fdiv_rn(beta - alpha, beta);
    }
    __syncthreads();  // the reflector v = (1, Wj[j+1:]) is complete
    if (tid == 0) Wj[j] = beta;
    for (int c = j + 1 + warp; c < r; c += nwarps) {
      float* Wc = W + c * ldw;
      if (tau != 0.0f) {
        float d = 0.0f;
#pragma unroll 8
        for (int i = j + 1 + lane; i < k; i += 32) d = fmaf(Wj[i], Wc[i], d);
        d = warp_sumf(d) + Wc[j];
        const float t = tau * d;
        __syncwarp();
        if (lane == 0) Wc[j] -= t;
#pragma unroll 8
        for (int i = j + 1 + lane; i < k; i += 32) Wc[i] = fmaf(-t, Wj[i], Wc[i]);
        __syncwarp();
      }
      if (c == j + 1) {  // the next column's pivot and tail norm
        float s = 0.0f;
#pragma unroll 8
        for (int i = j + 2 + lane; i < k; i += 32) s = fmaf(Wc[i], Wc[i], s);
        s = warp_sumf(s);
        if (lane == 0) {
          s_sigma = s;
          s_alpha = Wc[j + 1];
        }
      }
    }
    __syncthreads();
  }
  const i64 rr = static_cast<i64>(r) * r;
  for (i64 e = tid; e < rr; e += blockDim.x) {
    const i64 i = e / r, c = e - i * r;
    R(b, i, c) = i <= c ? W[c * ldw + i] : 0.0f;
  }
}

// ------------------------------------------------------------------ blocked symmetric products
/// Pointer arrays of a blocked symmetric product C = op(X)·op(X)ᵀ over the lower block triangle:
/// entry e = b·npairs + p (pair p = (I, J), I ≥ J, row-major order of the lower triangle) gets
/// A = block I of op(X), B = block J of op(X), C = block (I, J) of C_b. `tn`: op(X) = Xᵀ (blocks
/// are column blocks of X), else row blocks.
template <class T, class TC>
__global__ void sym_block_ptrs(const T* X, i64 ldx, i64 bsx, TC* C, i64 ldc, i64 bsc, i64 bs, int nblk, bool tn,
                               i64 batch, const void** pa, const void** pb, void** pc) {
  const int npairs = nblk * (nblk + 1) / 2;
  const i64 e = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x;
  if (e >= batch * npairs) return;
  const i64 b = e / npairs;
  int p = static_cast<int>(e - b * npairs), I = 0;
  while (p > I) {
    p -= I + 1;
    ++I;
  }
  const int J = p;
  const T* xb = X + b * bsx;
  pa[e] = tn ? xb + I * bs : xb + I * bs * ldx;
  pb[e] = tn ? xb + J * bs : xb + J * bs * ldx;
  pc[e] = C + b * bsc + I * bs * ldc + J * bs;
}

/// C(i, j) ← C(j, i) for every element whose row block is above its column block (blocks of bs,
/// a multiple of 32): 32×32 tiles through shared memory, both sides coalesced. Grid (tiles, tiles,
/// batch), 32×8 threads.
template <class T>
__global__ void __launch_bounds__(256) sym_mirror(T* C, i64 ldc, i64 bsc, i64 bs) {
  __shared__ T tile[32][33];
  const i64 ti = blockIdx.y, tj = blockIdx.x;  // destination tile (rows ti, columns tj)
  const i64 tpb = bs / 32;
  if (ti / tpb >= tj / tpb) return;  // only tiles strictly above the block diagonal
  T* Cb = C + static_cast<i64>(blockIdx.z) * bsc;
  // source tile: rows tj, columns ti
  for (int y = threadIdx.y; y < 32; y += 8) tile[y][threadIdx.x] = Cb[(tj * 32 + y) * ldc + ti * 32 + threadIdx.x];
  __syncthreads();
  for (int y = threadIdx.y; y < 32; y += 8) Cb[(ti * 32 + y) * ldc + tj * 32 + threadIdx.x] = tile[threadIdx.x][y];
}

}  // namespace dion::cuda_kernels
