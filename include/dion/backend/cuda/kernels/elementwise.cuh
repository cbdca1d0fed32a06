// Element-wise functors of the CUDA backend, run by ew_kernel (kernels/common.cuh). Each computes
// exactly what the Eigen backend's loop body computes, in the same order and with the same
// roundings (uncontracted fp32 arithmetic, one rounding per store), so fp32 results agree to the
// last bit wherever no reduction is involved. lr and weight decay are read from device memory.
#pragma once

#include <cstdint>
#include <type_traits>

#include "dion/backend/cuda/kernels/common.cuh"
#include "dion/core/random.hpp"

namespace dion::cuda_kernels {

// ------------------------------------------------------------------ 4-wide loads and stores
// The vectorized driver (ew_vec4_kernel) hands a functor 4 consecutive elements of one row: fp32
// moves as one 16-byte access, bf16 as one 8-byte access. Each functor's arithmetic lives in one
// static `op` shared by the scalar and the 4-wide paths, so both compute bit for bit the same.
template <class T>
__device__ __forceinline__ void ld4(const T* p, float (&v)[4]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    v[0] = bf16::to_float(static_cast<std::uint16_t>(q.x & 0xffffu));
    v[1] = bf16::to_float(static_cast<std::uint16_t>(q.x >> 16));
    v[2] = bf16::to_float(static_cast<std::uint16_t>(q.y & 0xffffu));
    v[3] = bf16::to_float(static_cast<std::uint16_t>(q.y >> 16));
  }
}
template <class T>
__device__ __forceinline__ void st4(T* p, const float (&v)[4]) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    uint2 q;
    q.x = static_cast<unsigned>(bf16::from_float(v[0])) | (static_cast<unsigned>(bf16::from_float(v[1])) << 16);
    q.y = static_cast<unsigned>(bf16::from_float(v[2])) | (static_cast<unsigned>(bf16::from_float(v[3])) << 16);
    *reinterpret_cast<uint2*>(p) = q;
  }
}
/// A reference is fit for 4-wide access when its base and batch stride keep every 4-element group
/// aligned to 4 elements' bytes.
template <class T>
inline bool vec4_ok(const MRef<T>& m) {
  return reinterpret_cast<std::uintptr_t>(m.p) % (4 * sizeof(T)) == 0 && m.bs % 4 == 0;
}

/// 4-wide element-wise driver over merged rows (d.rows == 1, d.cols % 4 == 0): thread u handles
/// elements 4u .. 4u+3 of the flattened batch through f.vec4(b, j).
template <class F>
__global__ void __launch_bounds__(kThreads) ew_vec4_kernel(Dims d, F f, const int* skip) {
  if (skipped(skip)) return;
  const i64 per = d.cols >> 2, n = d.batch * per;
  for (i64 u = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; u < n;
       u += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 b = u / per;
    f.vec4(b, (u - b * per) << 2);
  }
}

template <class TS, class TD>
struct CopyF {
  MRef<const TS> s;
  MRef<TD> d;
  __device__ void operator()(i64 b, i64 i, i64 j) const { d(b, i, j) = stf<TD>(ldf(s(b, i, j))); }
  bool vec_ok() const { return vec4_ok(s) && vec4_ok(d); }
  __device__ void vec4(i64 b, i64 j) const {
    float v[4];
    ld4(&s(b, 0, j), v);
    st4(&d(b, 0, j), v);
  }
};
/// *flag ← 1 if any element is NaN or Inf (never cleared here).
template <class T>
struct NonfiniteF {
  MRef<const T> x;
  int* flag;
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    if (!finite(ldf(x(b, i, j)))) *flag = 1;
  }
  bool vec_ok() const { return vec4_ok(x); }
  __device__ void vec4(i64 b, i64 j) const {
    float v[4];
    ld4(&x(b, 0, j), v);
    if (!(finite(v[0]) && finite(v[1]) && finite(v[2]) && finite(v[3]))) *flag = 1;
  }
};

template <class T>
struct FillF {
  MRef<T> x;
  T v;
  __device__ void operator()(i64 b, i64 i, i64 j) const { x(b, i, j) = v; }
};

/// C ← beta·C (a GEMM with an empty inner dimension; beta = 0 writes zeros).
template <class T>
struct ScaleF {
  MRef<T> x;
  float beta;
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    x(b, i, j) = stf<T>(beta == 0.0f ? 0.0f : mul(beta, ldf(x(b, i, j))));
  }
};

/// X_b ← X_b / (mult·norm_b + eps).
template <class T>
struct ScaleByNormF {
  MRef<T> x;
  const float* norms;
  float mult, eps;
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    const float d = add(mul(mult, norms[b]), eps);
    x(b, i, j) = stf<T>(dvd(ldf(x(b, i, j)), d));
  }
};

template <class TG, class TM, class TU>
struct MuonMomentumF {
  MRef<const TG> G;
  MRef<TM> M;
  MRef<TU> U;
  float mu;
  bool nesterov;
  __device__ static void op(float gin, float min, float mu, bool nesterov, float& mout, float& uout) {
    const float g = rnd<TM>(gin);
    const float m = rnd<TM>(fmaf(mu, min, g));  // one rounding, as the Eigen backend (std::fma) and torch
    mout = m;
    uout = nesterov ? add(mul(mu, m), g) : m;
  }
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    float m, u;
    op(ldf(G(b, i, j)), ldf(M(b, i, j)), mu, nesterov, m, u);
    M(b, i, j) = stf<TM>(m);
    U(b, i, j) = stf<TU>(u);
  }
  bool vec_ok() const { return vec4_ok(G) && vec4_ok(M) && vec4_ok(U); }
  __device__ void vec4(i64 b, i64 j) const {
    float g[4], m[4], mo[4], uo[4];
    ld4(&G(b, 0, j), g);
    ld4(&M(b, 0, j), m);
#pragma unroll
    for (int k = 0; k < 4; ++k) op(g[k], m[k], mu, nesterov, mo[k], uo[k]);
    st4(&M(b, 0, j), mo);
    st4(&U(b, 0, j), uo);
  }
};

template <class TX, class TO>
struct ApplyUpdateF {
  MRef<TX> X;
  MRef<const TO> O;
  const float* lr;
  const float* wd;
  float lr_scale;
  bool cautious;
  __device__ static float op(float x, float o, float l, float w, float step, bool cautious) {
    const float decay = (!cautious || mul(x, o) >= 0.0f) ? mul(mul(l, w), x) : 0.0f;
    return sub(sub(x, decay), mul(step, o));
  }
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    const float l = *lr, w = *wd, step = mul(l, lr_scale);
    X(b, i, j) = stf<TX>(op(ldf(X(b, i, j)), ldf(O(b, i, j)), l, w, step, cautious));
  }
  bool vec_ok() const { return vec4_ok(X) && vec4_ok(O); }
  __device__ void vec4(i64 b, i64 j) const {
    const float l = *lr, w = *wd, step = mul(l, lr_scale);
    float x[4], o[4], r[4];
    ld4(&X(b, 0, j), x);
    ld4(&O(b, 0, j), o);
#pragma unroll
    for (int k = 0; k < 4; ++k) r[k] = op(x[k], o[k], l, w, step, cautious);
    st4(&X(b, 0, j), r);
  }
};

/// NorMuon's final pass: Ô = round_V(o_scale·O) / (√V + 1e-8) · rescale_b, then decay and update.
template <class TX, class TO, class TV>
struct NormuonApplyF {
  MRef<TX> X;
  MRef<const TO> O;
  MRef<const TV> V;
  const float* rescale;
  float o_scale;
  const float* lr;
  const float* wd;
  float lr_scale;
  bool cautious;
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    const float v = ldf(V(b, i, 0));
    const float inv = dvd(1.0f, add(sqrtf(v), 1e-8f));
    const float fi = mul(inv, rescale[b]);
    const float o = mul(rnd<TV>(mul(o_scale, ldf(O(b, i, j)))), fi);
    const float l = *lr, w = *wd, step = mul(l, lr_scale);
    const float x = ldf(X(b, i, j));
    const float decay = (!cautious || mul(x, o) >= 0.0f) ? mul(mul(l, w), x) : 0.0f;
    X(b, i, j) = stf<TX>(sub(sub(x, decay), mul(step, o)));
  }
};

/// Dion2 / NorDion2 gather: U gets the selected slices of M; M[sel] ← decay·M[sel]. Iterates over U.
template <class TM, class TU>
struct GatherSlicesF {
  MRef<TM> M;
  MRef<TU> U;
  const std::int64_t* idx;
  i64 k;
  bool rows;
  float decay;
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    TM& m = rows ? M(b, idx[b * k + i], j) : M(b, i, idx[b * k + j]);
    const float v = ldf(m);
    U(b, i, j) = stf<TU>(v);
    m = stf<TM>(mul(decay, v));
  }
};

/// X ← (1 − lr·wd)·X.
template <class TX>
struct DecayF {
  MRef<TX> X;
  const float* lr;
  const float* wd;
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    const float a = sub(1.0f, mul(*lr, *wd));
    X(b, i, j) = stf<TX>(mul(a, ldf(X(b, i, j))));
  }
};

/// Dion2 scatter: X[sel] ← X[sel] − lr·s·O. Iterates over O.
template <class TX, class TO>
struct Dion2ScatterF {
  MRef<TX> X;
  MRef<const TO> O;
  const std::int64_t* idx;
  i64 k;
  bool rows;
  const float* lr;
  float lr_scale;
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    const float step = mul(*lr, lr_scale);
    TX& x = rows ? X(b, idx[b * k + i], j) : X(b, i, idx[b * k + j]);
    x = stf<TX>(sub(ldf(x), mul(step, ldf(O(b, i, j)))));
  }
};

/// NorDion2 scatter: X[sel_t] ← X[sel_t] − lr·s·(O_t · f_t · rescale_b). Iterates over O (k rows).
template <class TX, class TO>
struct Nordion2ScatterF {
  MRef<TX> X;
  MRef<const TO> O;
  const std::int64_t* idx;
  const float* f;
  const float* rescale;
  i64 k;
  const float* lr;
  float lr_scale;
  __device__ void operator()(i64 b, i64 t, i64 j) const {
    const float step = mul(*lr, lr_scale);
    const float fi = mul(f[b * k + t], rescale[b]);
    TX& x = X(b, idx[b * k + t], j);
    x = stf<TX>(sub(ldf(x), mul(step, mul(ldf(O(b, t, j)), fi))));
  }
};

template <class TX, class TG, class TM>
struct LionF {
  MRef<TX> X;
  MRef<const TG> G;
  MRef<TM> M;
  const float* lr;
  const float* wd;
  float beta1, beta2;
  bool cautious;
  __device__ void op(float gin, float m, float x, float l, float w, float& mo, float& xo) const {
    const float g = rnd<TM>(gin);
    const float c = add(mul(beta1, m), mul(sub(1.0f, beta1), g));
    const float u = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
    mo = add(mul(beta2, m), mul(sub(1.0f, beta2), g));
    const float decay = (!cautious || mul(x, u) >= 0.0f) ? mul(mul(l, w), x) : 0.0f;
    xo = sub(sub(x, decay), mul(l, u));
  }
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    float mo, xo;
    op(ldf(G(b, i, j)), ldf(M(b, i, j)), ldf(X(b, i, j)), *lr, *wd, mo, xo);
    M(b, i, j) = stf<TM>(mo);
    X(b, i, j) = stf<TX>(xo);
  }
  bool vec_ok() const { return vec4_ok(X) && vec4_ok(G) && vec4_ok(M); }
  __device__ void vec4(i64 b, i64 j) const {
    const float l = *lr, w = *wd;
    float g[4], m[4], x[4], mo[4], xo[4];
    ld4(&G(b, 0, j), g);
    ld4(&M(b, 0, j), m);
    ld4(&X(b, 0, j), x);
#pragma unroll
    for (int k = 0; k < 4; ++k) op(g[k], m[k], x[k], l, w, mo[k], xo[k]);
    st4(&M(b, 0, j), mo);
    st4(&X(b, 0, j), xo);
  }
};

/// AdamW: `sc` holds {step_size = lr / (1 − β1^t), √(1 − β2^t)} computed on the device for this t.
template <class TX, class TG, class TM, class TV>
struct AdamwF {
  MRef<TX> X;
  MRef<const TG> G;
  MRef<TM> M;
  MRef<TV> V;
  const float* sc;
  const float* lr;
  const float* wd;
  float beta1, beta2, eps;
  bool cautious;
  __device__ void op(float g, float x0, float& m, float& v, float& xo, float step_size, float bc2s, float l,
                     float w) const {
    m = add(m, mul(sub(1.0f, beta1), sub(g, m)));
    v = add(mul(beta2, v), mul(mul(sub(1.0f, beta2), g), g));
    const float decay = (!cautious || mul(m, x0) >= 0.0f) ? mul(mul(l, w), x0) : 0.0f;
    const float x = sub(x0, decay);
    const float denom = add(dvd(sqrtf(v), bc2s), eps);
    xo = sub(x, dvd(mul(step_size, m), denom));
  }
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    float m = ldf(M(b, i, j)), v = ldf(V(b, i, j)), xo;
    op(ldf(G(b, i, j)), ldf(X(b, i, j)), m, v, xo, sc[0], sc[1], *lr, *wd);
    M(b, i, j) = stf<TM>(m);
    V(b, i, j) = stf<TV>(v);
    X(b, i, j) = stf<TX>(xo);
  }
  bool vec_ok() const { return vec4_ok(X) && vec4_ok(G) && vec4_ok(M) && vec4_ok(V); }
  __device__ void vec4(i64 b, i64 j) const {
    const float step_size = sc[0], bc2s = sc[1], l = *lr, w = *wd;
    float g[4], x[4], m[4], v[4], xo[4];
    ld4(&G(b, 0, j), g);
    ld4(&X(b, 0, j), x);
    ld4(&M(b, 0, j), m);
    ld4(&V(b, 0, j), v);
#pragma unroll
    for (int k = 0; k < 4; ++k) op(g[k], x[k], m[k], v[k], xo[k], step_size, bc2s, l, w);
    st4(&M(b, 0, j), m);
    st4(&V(b, 0, j), v);
    st4(&X(b, 0, j), xo);
  }
};

/// t ← t + 1 if `advance` (fp32 counter in device memory); sc ← {lr / (1 − β1^t), √(1 − β2^t)} in double.
template <int = 0>
__global__ void adamw_prepare(float* step, bool advance, const float* lr, float beta1, float beta2, float* sc,
                              const int* skip) {
  if (threadIdx.x != 0 || blockIdx.x != 0 || skipped(skip)) return;
  const float s = advance ? *step + 1.0f : *step;
  if (advance) *step = s;
  const double t = s;
  const float bc1 = static_cast<float>(1.0 - pow(static_cast<double>(beta1), t));
  const float bc2s = static_cast<float>(sqrt(1.0 - pow(static_cast<double>(beta2), t)));
  sc[0] = dvd(*lr, bc1);
  sc[1] = bc2s;
}

template <class TM, class TG>
struct AddIntoF {
  MRef<TM> M;
  MRef<const TG> G;
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    M(b, i, j) = stf<TM>(add(ldf(M(b, i, j)), rnd<TM>(ldf(G(b, i, j)))));
  }
};

/// Dion's guard on P: all-zero momentum → 0, otherwise non-finite entries → 0.
template <class T>
struct GuardPF {
  MRef<T> P;
  const int* flags;
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    T& e = P(b, i, j);
    if (flags[b] || !finite(e)) e = stf<T>(0.0f);
  }
};
/// Dion's guard on R: all-zero momentum → R ← Qw, otherwise non-finite entries → 0.
template <class T>
struct GuardRF {
  MRef<T> R;
  MRef<const T> Qw;
  const int* flags;
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    T& e = R(b, i, j);
    if (flags[b]) e = Qw(b, i, j);
    else if (!finite(e)) e = stf<T>(0.0f);
  }
};

template <class T>
struct CopyIfFlagF {
  MRef<const T> src;
  MRef<T> dst;
  const int* flags;
  int want;
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    if (flags[b] == want) dst(b, i, j) = src(b, i, j);
  }
};

/// out(b, i, j) ← stddev · N(0, 1) at global index (i + row0)·global_cols + (j + col0) of stream
/// (seed, stream + b): the host's generator (core/random.hpp), evaluated on the device.
template <class T>
struct RandnF {
  MRef<T> out;
  std::uint64_t seed, stream;
  i64 row0, col0, global_cols;
  float stddev;
  const float* step;  // nullable: the stream is mix64(stream, *step) (a step counter in device memory)
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    const auto index = static_cast<std::uint64_t>((i + row0) * global_cols + (j + col0));
    const std::uint64_t st = step ? detail::mix64(stream, static_cast<std::uint64_t>(*step)) : stream;
    out(b, i, j) = stf<T>(mul(stddev, detail::normal_at(seed, st + static_cast<std::uint64_t>(b), index)));
  }
};

// ------------------------------------------------------------------ multi-tensor launches
/// Up to K element-wise operations of one functor type on separate matrices, passed by value as one
/// kernel parameter (no device staging, nothing to synchronize; a CUDA graph captures it as is).
/// Item t runs on blocks [first[t], first[t+1]); ntiles[t] == 0 selects the 4-wide path.
template <class F, int K>
struct MultiEw {
  F f[K];
  Dims d[K];
  i64 ntiles[K];
  i64 first[K + 1];
  int n;
};
/// How many items of functor F fit one launch's parameter block (4 KiB, the classic limit).
template <class F>
constexpr int multi_capacity() {
  constexpr std::size_t per = sizeof(F) + sizeof(Dims) + 2 * sizeof(i64);
  constexpr std::size_t k = (3968 - 2 * sizeof(i64)) / per;
  return k > 64 ? 64 : static_cast<int>(k);
}
template <class F>
concept HasVec4 = requires(const F& f, i64 b, i64 j) { f.vec4(b, j); };

template <class F, int K>
__global__ void __launch_bounds__(kThreads) ew_multi_kernel(const __grid_constant__ MultiEw<F, K> a, const int* skip) {
  if (skipped(skip)) return;
  int t = 0;
  while (t + 1 < a.n && static_cast<i64>(blockIdx.x) >= a.first[t + 1]) ++t;
  const i64 nb = a.first[t + 1] - a.first[t], k = static_cast<i64>(blockIdx.x) - a.first[t];
  const Dims d = a.d[t];
  const F& f = a.f[t];
  if constexpr (HasVec4<F>) {
    if (a.ntiles[t] == 0) {
      const i64 per = d.cols >> 2, n = d.batch * per;
      for (i64 u = k * kThreads + threadIdx.x; u < n; u += nb * kThreads) {
        const i64 b = u / per;
        f.vec4(b, (u - b * per) << 2);
      }
      return;
    }
  }
  const i64 ntiles = a.ntiles[t];
  const i64 units = d.batch * d.rows * ntiles;
  for (i64 u = k; u < units; u += nb) {
    const i64 R = u / ntiles, tt = u - R * ntiles;
    const i64 b = R / d.rows, i = R - b * d.rows;
    const i64 j0 = tt * kTileCols;
    const i64 j1 = j0 + kTileCols < d.cols ? j0 + kTileCols : d.cols;
    for (i64 j = j0 + threadIdx.x; j < j1; j += kThreads) f(b, i, j);
  }
}

/// x ← 0 when the predicate is raised (launched without the predicate: it acts on a skip).
template <class T>
struct ZeroIfSkipF {
  MRef<T> x;
  const int* flag;
  __device__ void operator()(i64 b, i64 i, i64 j) const {
    if (*flag != 0) x(b, i, j) = stf<T>(0.0f);
  }
};
/// flags[j] ← v (iteration space 1 × 1 × n).
struct SetFlagsF {
  int* flags;
  int v;
  __device__ void operator()(i64, i64, i64 j) const { flags[j] = v; }
};
/// *counter += *flag (never predicated).
template <int = 0>
__global__ void accumulate_flag(const int* flag, std::int64_t* counter) {
  if (threadIdx.x == 0 && blockIdx.x == 0) *counter += *flag;
}

/// Bytes of a small host-to-device copy, passed by value as a kernel parameter (no staging memory,
/// no synchronization: the host buffer may change as soon as the launch returns).
struct InlineBytes {
  static constexpr unsigned kMax = 3968;
  unsigned char b[kMax];
};
template <int = 0>
__global__ void write_inline_bytes(unsigned char* dst, InlineBytes p, unsigned n) {
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) dst[i] = p.b[i];
}

}  // namespace dion::cuda_kernels
