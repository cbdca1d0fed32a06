// Reductions of the CUDA backend: per-matrix Frobenius norms (double accumulation: exact enough
// and overflow-free for any float input), non-finite and all-zero flags, NorMuon / NorDion2 row
// statistics, Dion's column normalization, Cholesky-QR quality checks. One launch per op over the
// whole batch (plus a tiny finishing launch where a per-matrix scalar is derived). No floating-point
// atomics: partial results go to scratch and are summed in a fixed order, so results are bitwise
// reproducible run to run and do not depend on the batch a matrix comes in.
#pragma once

#include <cstdint>

#include "dion/backend/cuda/kernels/common.cuh"

namespace dion::cuda_kernels {

__device__ __forceinline__ bool finite_d(double a) { return a <= 1.7976931348623157e308 && a >= -1.7976931348623157e308; }

/// part[b·bpm + k] ← Σ x² over block k's share of matrix b (bpm blocks per matrix).
template <class T>
__global__ void __launch_bounds__(kThreads) frob_partial(MRef<const T> x, Dims d, i64 ntiles, int bpm, double* part) {
  const i64 b = blockIdx.x / bpm;
  const int k = static_cast<int>(blockIdx.x - b * bpm);
  double s = 0;
  visit_matrix_share(d, ntiles, k, bpm, [&](i64 i, i64 j) {
    const double v = ldf(x(b, i, j));
    s += v * v;
  });
  s = block_sum(s);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}
/// out[b] ← √(Σ_k part[b·bpm + k]) summed in order, NaN where an element was NaN or Inf (the Eigen
/// backend's convention).
template <int = 0>
__global__ void frob_finish(const double* part, int bpm, float* out, i64 n) {
  const i64 b = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x;
  if (b >= n) return;
  double a = 0;
  for (int k = 0; k < bpm; ++k) a += part[b * bpm + k];
  out[b] = finite_d(a) ? static_cast<float>(sqrt(a)) : __int_as_float(0x7fc00000);
}

template <int = 0>
__global__ void set_flags(int* flags, i64 n, int v) {
  const i64 b = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x;
  if (b < n) flags[b] = v;
}
template <class T>
struct NonzeroClearsF {
  MRef<const T> x;
  int* flags;
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    if (ldf(x(b, i, j)) != 0.0f) flags[b] = 0;
  }
};

/// NorMuon, per row (one warp each): ss = Σ_j round_V(o_scale·O)² (double), V ← lerp(V, ss/cols),
/// stat[2R] = ss, stat[2R+1] = ss / (√V + 1e-8)² with V as stored (R = b·rows + i).
template <class TO, class TV>
__global__ void __launch_bounds__(kThreads) normuon_rows(MRef<const TO> O, MRef<TV> V, Dims d, float o_scale,
                                                         float beta2, double* stat, const int* skip) {
  if (skipped(skip)) return;
  const int lane = threadIdx.x & 31;
  const i64 nrows = d.batch * d.rows;
  const i64 w0 = (blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x) >> 5;
  const i64 nw = (gridDim.x * static_cast<i64>(blockDim.x)) >> 5;
  for (i64 R = w0; R < nrows; R += nw) {
    const i64 b = R / d.rows, i = R - b * d.rows;
    double ss = 0;
    for (i64 j = lane; j < d.cols; j += 32) {
      const double o = rnd<TV>(mul(o_scale, ldf(O(b, i, j))));
      ss += o * o;
    }
    ss = warp_sum(ss);
    if (lane == 0) {
      const float r = d.cols ? static_cast<float>(ss / static_cast<double>(d.cols)) : 0.0f;
      float v = ldf(V(b, i, 0));
      v = add(v, mul(sub(1.0f, beta2), sub(r, v)));
      V(b, i, 0) = stf<TV>(v);
      v = rnd<TV>(v);
      const float inv = dvd(1.0f, add(sqrtf(v), 1e-8f));
      stat[2 * R] = ss;
      stat[2 * R + 1] = ss * static_cast<double>(inv) * inv;
    }
  }
}

/// NorDion2, per selected row t of matrix b (one warp each): ss = Σ_j O(b,t,j)², V[s] ← lerp in fp32,
/// f[b·k+t] = 1/(√v + 1e-8) of the fp32 v (before V's rounding), row statistics as for NorMuon.
template <class TO, class TV>
__global__ void __launch_bounds__(kThreads) nordion2_rows(MRef<const TO> O, MRef<TV> V, const std::int64_t* idx,
                                                          i64 batch, i64 k, i64 cols, float beta2, float* f,
                                                          double* stat, const int* skip) {
  if (skipped(skip)) return;
  const int lane = threadIdx.x & 31;
  const i64 nrows = batch * k;
  const i64 w0 = (blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x) >> 5;
  const i64 nw = (gridDim.x * static_cast<i64>(blockDim.x)) >> 5;
  for (i64 R = w0; R < nrows; R += nw) {
    const i64 b = R / k, t = R - b * k;
    double ss = 0;
    for (i64 j = lane; j < cols; j += 32) {
      const double o = ldf(O(b, t, j));
      ss += o * o;
    }
    ss = warp_sum(ss);
    if (lane == 0) {
      const i64 s = idx[b * k + t];
      const float r = cols ? static_cast<float>(ss / static_cast<double>(cols)) : 0.0f;
      float v = ldf(V(b, s, 0));
      v = add(v, mul(sub(1.0f, beta2), sub(r, v)));
      const float inv = dvd(1.0f, add(sqrtf(v), 1e-8f));
      V(b, s, 0) = stf<TV>(v);
      f[b * k + t] = inv;
      stat[2 * R] = ss;
      stat[2 * R + 1] = ss * static_cast<double>(inv) * inv;
    }
  }
}

/// rescale[b] ← ‖O‖ / max(‖Ô‖, 1e-8) from the `rows` row statistics of matrix b, summed in row
/// order like the Eigen backend (std::max's NaN behaviour).
/// One block per matrix (the former one thread per matrix walked all rows serially: latency-bound,
/// most of NorMuon's extra time on gpt160m). Double sums: the order changes only the last bits of
/// a double, far below the float result's rounding.
template <int = 0>
__global__ void __launch_bounds__(kThreads) rescale_finish(const double* stat, i64 rows, float* rescale, i64 n) {
  const i64 b = blockIdx.x;
  if (b >= n) return;
  double f2 = 0, h2 = 0;
  for (i64 i = threadIdx.x; i < rows; i += blockDim.x) {
    f2 += stat[2 * (b * rows + i)];
    h2 += stat[2 * (b * rows + i) + 1];
  }
  const double nf2 = block_sum(f2);
  const double nh2 = block_sum(h2);
  if (threadIdx.x != 0) return;
  const float nf = static_cast<float>(sqrt(nf2));
  const float h = static_cast<float>(sqrt(nh2));
  const float nh = h < 1e-8f ? 1e-8f : h;
  rescale[b] = dvd(nf, nh);
}

/// L1 norms of slices in dion's canonical order (the Eigen backend computes the same bits): element l
/// of a slice goes to partial sum l mod 32 (fp32, in index order), then the 32 partials combine by
/// the butterfly p[i] ← p[i] + p[i xor o], o = 16, 8, 4, 2, 1 (every p[i] ends equal; addition
/// commutes). Rows: one warp per row, lane = partial, coalesced.
template <class T>
__global__ void __launch_bounds__(kThreads) slice_l1_rows(MRef<const T> M, i64 batch, i64 rows, i64 cols,
                                                          float* norms) {
  const int lane = threadIdx.x & 31;
  const i64 n = batch * rows;
  const i64 w0 = (blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x) >> 5;
  const i64 nw = (gridDim.x * static_cast<i64>(blockDim.x)) >> 5;
  for (i64 e = w0; e < n; e += nw) {
    const i64 b = e / rows, s = e - b * rows;
    float acc = 0.0f;
#pragma unroll 4
    for (i64 l = lane; l < cols; l += 32) acc = add(acc, fabsf(ldf(M(b, s, l))));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc = add(acc, __shfl_xor_sync(0xffffffffu, acc, o));
    if (lane == 0) norms[e] = acc;
  }
}
/// Columns: a block per 32 columns (lane = column, coalesced along rows); warp w accumulates the
/// partials w, w+8, w+16, w+24; warp 0 combines them with the butterfly.
template <class T>
__global__ void __launch_bounds__(kThreads) slice_l1_cols(MRef<const T> M, i64 batch, i64 rows, i64 cols,
                                                          float* norms) {
  __shared__ float part[32][33];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarp = kThreads / 32;
  const i64 cb = (cols + 31) / 32;
  for (i64 blk = blockIdx.x; blk < batch * cb; blk += gridDim.x) {
    const i64 b = blk / cb, c = (blk - b * cb) * 32 + lane;
    for (int v = warp; v < 32; v += nwarp) {
      float acc = 0.0f;
      if (c < cols) {
#pragma unroll 4
        for (i64 l = v; l < rows; l += 32) acc = add(acc, fabsf(ldf(M(b, l, c))));
      }
      part[v][lane] = acc;
    }
    __syncthreads();
    if (warp == 0 && c < cols) {
      float p[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) p[i] = part[i][lane];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        float q[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) q[i] = add(p[i], p[i ^ o]);
#pragma unroll
        for (int i = 0; i < 32; ++i) p[i] = q[i];
      }
      norms[b * cols + c] = p[0];
    }
    __syncthreads();
  }
}

/// Exclusive prefix of a 0/1 flag over the block, in thread order, and the block's total.
/// Uses `sh` (≥ 33 unsigned of shared memory). Every thread of the block must call it.
__device__ inline unsigned block_scan_flag(bool flag, unsigned* sh, unsigned* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const unsigned in_warp = __popc(ballot & ((1u << lane) - 1u));
  __syncthreads();
  if (lane == 0) sh[warp] = __popc(ballot);
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned acc = 0;
    for (int w = 0; w < nw; ++w) {
      const unsigned c = sh[w];
      sh[w] = acc;
      acc += c;
    }
    sh[32] = acc;
  }
  __syncthreads();
  *total = sh[32];
  return sh[warp] + in_warp;
}

/// Per matrix (one block each): the k slices of largest norm (ties: lower index first), written to
/// idx[b·k + t] in ascending index order. Radix select on the norms' bit patterns (non-negative
/// floats order like their bits), then one ordered pass with block scans.
template <int = 0>
__global__ void __launch_bounds__(kThreads) topk_select(const float* norms, i64 S, i64 k, std::int64_t* idx) {
  const i64 b = blockIdx.x;
  const unsigned* key = reinterpret_cast<const unsigned*>(norms + b * S);
  __shared__ unsigned hist[256];
  __shared__ unsigned s_prefix;
  __shared__ unsigned long long s_need;
  __shared__ unsigned scan[33];
  unsigned prefix = 0, mask = 0;
  unsigned long long need = static_cast<unsigned long long>(k);
  for (int pass = 3; pass >= 0; --pass) {
    for (int t = threadIdx.x; t < 256; t += blockDim.x) hist[t] = 0;
    __syncthreads();
    const int shift = 8 * pass;
    for (i64 s = threadIdx.x; s < S; s += blockDim.x) {
      const unsigned u = key[s];
      if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long acc = 0;
      int dgt = 255;
      for (; dgt > 0; --dgt) {
        if (acc + hist[dgt] >= need) break;
        acc += hist[dgt];
      }
      s_prefix = prefix | (static_cast<unsigned>(dgt) << shift);
      s_need = need - acc;
    }
    __syncthreads();
    prefix = s_prefix;
    need = s_need;
    mask |= 255u << shift;
    __syncthreads();
  }
  const unsigned T = prefix;  // the k-th largest key; `need` keys equal to T are taken, lowest index first
  unsigned long long base_eq = 0, base_sel = 0;
  for (i64 c0 = 0; c0 < S; c0 += blockDim.x) {
    const i64 s = c0 + threadIdx.x;
    const unsigned u = s < S ? key[s] : 0u;
    const bool eq = s < S && u == T, gt = s < S && u > T;
    unsigned tot_eq, tot_sel;
    const unsigned eq_rank = block_scan_flag(eq, scan, &tot_eq);
    const bool sel = gt || (eq && base_eq + eq_rank < need);
    const unsigned pos = block_scan_flag(sel, scan, &tot_sel);
    if (sel) idx[b * k + static_cast<i64>(base_sel + pos)] = s;
    base_eq += tot_eq;
    base_sel += tot_sel;
  }
}

/// Q[:, j] ← R[:, j] / (‖R[:, j]‖₂ + eps), one thread per column, fp32 sum in row order.
template <class TR, class TQ>
__global__ void __launch_bounds__(kThreads) col_normalize_k(MRef<const TR> R, MRef<TQ> Q, i64 batch, i64 rows,
                                                            i64 cols, float eps) {
  const i64 n = batch * cols;
  for (i64 e = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; e < n;
       e += gridDim.x * static_cast<i64>(blockDim.x)) {
    const i64 b = e / cols, j = e - b * cols;
    float acc = 0.0f;
    // the sum stays in row order (bitwise the Eigen backend's); unrolling only lets the loads overlap
#pragma unroll 8
    for (i64 i = 0; i < rows; ++i) {
      const float v = ldf(R(b, i, j));
      acc = add(acc, mul(v, v));
    }
    const float nrm = add(sqrtf(acc), eps);
#pragma unroll 8
    for (i64 i = 0; i < rows; ++i) Q(b, i, j) = stf<TQ>(dvd(ldf(R(b, i, j)), nrm));
  }
}

/// flags[b] ← 1 where some |G_b − I| entry exceeds tol or is NaN (G = QᵀQ, packed r×r).
struct OrthCheckF {
  MRef<const float> G;
  float tol;
  int* flags;
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    const float d = sub(G(b, i, j), i == j ? 1.0f : 0.0f);
    if (!(fabsf(d) <= tol)) flags[b] = 1;
  }
};

}  // namespace dion::cuda_kernels
