// The Eigen backend: the CPU executor and the reference every other backend is tested against.
// Matrix products and factorizations go through Eigen on float copies; bf16 operands are widened
// and results rounded to bf16 once, which is what a bf16 GEMM with fp32 accumulation does.
// Element-wise kernels are plain loops over strided views (64-bit indexing throughout).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <utility>
#include <vector>

// Eigen's own asserts vanish under NDEBUG; every shape dion hands Eigen is checked by dion first.
#include <Eigen/Cholesky>
#include <Eigen/Dense>
#include <Eigen/QR>

#include "dion/core/bf16.hpp"
#include "dion/core/concepts.hpp"
#include "dion/core/error.hpp"
#include "dion/core/random.hpp"
#include "dion/core/view.hpp"

namespace dion {


namespace detail {
template <class T>
inline float ld_f(const T& v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return bf16::to_float(v.bits);
}
template <class T>
inline T st_f(float f) {
  if constexpr (std::is_same_v<T, float>) return f;
  else return bf16::from_bits(bf16::from_float(f));
}
using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Owning, zero-initialized, 64-byte aligned host allocation.
class HostRawBuffer {
 public:
  HostRawBuffer() = default;
  explicit HostRawBuffer(std::size_t bytes) : bytes_(bytes) {
    if (bytes == 0) return;
    const std::size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded);
    if (!p) throw Error(errc::internal, concat("EigenBackend: cannot allocate ", bytes, " bytes"));
    std::memset(p, 0, rounded);
    ptr_.reset(p);
  }
  void* data() const { return ptr_.get(); }
  std::size_t bytes() const { return bytes_; }

 private:
  struct Free {
    void operator()(void* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<void, Free> ptr_;
  std::size_t bytes_ = 0;
};
}  // namespace detail

/// CPU backend over Eigen. Holds only the step predicate (set_skip); cheap to construct.
class EigenBackend {
 public:
  using Space = HostSpace;
  using RawBuffer = detail::HostRawBuffer;
  static constexpr const char* name = "eigen";

  // ---------------------------------------------------------------- memory
  RawBuffer alloc_bytes(std::size_t bytes) { return RawBuffer(bytes); }
  void copy_to_host(const void* src, void* dst, std::size_t bytes) { if (bytes) std::memcpy(dst, src, bytes); }
  void copy_from_host(const void* src, void* dst, std::size_t bytes) { if (bytes) std::memcpy(dst, src, bytes); }
  void synchronize() {}
  /// True when device flags can be read on the host cheaply (no stream to drain).
  static constexpr bool host_visible = true;

  // ---------------------------------------------------------------- step predicate
  /// While a predicate is set and *flag != 0, the element-wise operations (every op that writes a
  /// parameter or optimizer state: copy, fill, momentum, updates, add_into, guard, random fills)
  /// do nothing. Products, reductions and factorizations still run (as on the CUDA backend, where
  /// vendor-library calls cannot be predicated); their outputs are scratch. This is how a step
  /// skipped for a non-finite gradient is decided in backend memory without a host round trip.
  void set_skip(const int* flag) { skip_ = flag; }
  /// x ← 0 if the predicate is set and raised (the operands of a product that accumulates into
  /// state, so that the product adds exact zeros on a skipped step).
  template <class T>
  void zero_if_skip(Mat<T> x) {
    if (!skipped()) return;
    const T z = detail::st_f<T>(0.0f);
    for_each1(x, [&](T& e) { e = z; });
  }
  /// *counter += *flag (never predicated).
  void accumulate_flag(const int* flag, std::int64_t* counter) { *counter += *flag; }

  template <class TS, class TD>
  void copy(Mat<TS> src, Mat<TD> dst) {
    if (skipped()) return;
    check_same(src, dst, "copy");
    for_each2(src, dst, [](const TS& s, TD& d) { d = detail::st_f<TD>(detail::ld_f(s)); });
  }
  template <class T>
  void fill(Mat<T> x, float v) {
    if (skipped()) return;
    const T tv = detail::st_f<T>(v);
    for_each1(x, [&](T& e) { e = tv; });
  }

  // ---------------------------------------------------------------- products
  /// C = alpha·op(A)·op(B) + beta·C per matrix of the batch; fp32 accumulation, one rounding to TC.
  template <class TA, class TB, class TC>
  void gemm(Op ta, Op tb, float alpha, Mat<TA> A, Mat<TB> B, float beta, Mat<TC> C) {
    const auto m = ta == Op::N ? A.rows : A.cols, k = ta == Op::N ? A.cols : A.rows;
    const auto k2 = tb == Op::N ? B.rows : B.cols, n = tb == Op::N ? B.cols : B.rows;
    DION_CHECK(k == k2 && C.rows == m && C.cols == n && A.batch == C.batch && B.batch == C.batch,
               ShapeMismatch, "gemm: op(A) ", m, "x", k, ", op(B) ", k2, "x", n, ", C ", C.rows, "x", C.cols,
               ", batches ", A.batch, "/", B.batch, "/", C.batch);
    for (std::int64_t b = 0; b < C.batch; ++b) {
      detail::RowMatF a = load(A.at(b)), bb = load(B.at(b));
      detail::RowMatF c(m, n);
      if (k == 0) c.setZero();
      else if (ta == Op::N && tb == Op::N) c.noalias() = a * bb;
      else if (ta == Op::T && tb == Op::N) c.noalias() = a.transpose() * bb;
      else if (ta == Op::N && tb == Op::T) c.noalias() = a * bb.transpose();
      else c.noalias() = a.transpose() * bb.transpose();
      store_axpby(C.at(b), alpha, c, beta);
    }
  }
  /// Symmetric Gram product: A = X·Xᵀ (t = N) or Xᵀ·X (t = T) per matrix.
  template <class T>
  void gram(Op t, Mat<T> X, Mat<T> A) {
    const auto s = t == Op::N ? X.rows : X.cols;
    DION_CHECK(A.rows == s && A.cols == s && A.batch == X.batch, ShapeMismatch, "gram: output ", A.rows, "x",
               A.cols, " for ", s, "x", s);
    for (std::int64_t b = 0; b < X.batch; ++b) {
      detail::RowMatF x = load(X.at(b));
      detail::RowMatF a(s, s);
      if (t == Op::N) a.noalias() = x * x.transpose();
      else a.noalias() = x.transpose() * x;
      store_axpby(A.at(b), 1.0f, a, 0.0f);
    }
  }
  /// B = b·A + c·A·A for symmetric A (the quintic step's polynomial).
  template <class T>
  void sym_poly(Mat<T> A, float b, float c, Mat<T> Bm) {
    check_same(A, Bm, "sym_poly");
    for (std::int64_t i = 0; i < A.batch; ++i) {
      detail::RowMatF a = load(A.at(i));
      detail::RowMatF r = c * (a * a) + b * a;
      store_axpby(Bm.at(i), 1.0f, r, 0.0f);
    }
  }

  // ---------------------------------------------------------------- reductions
  /// Frobenius norm of each matrix (overflow-safe: scaled accumulation in double).
  template <class T>
  void frob_norms(Mat<T> X, float* out) {
    for (std::int64_t b = 0; b < X.batch; ++b) {
      double scale = 0, ssq = 1;
      bool bad = false;
      for (std::int64_t i = 0; i < X.rows; ++i)
        for (std::int64_t j = 0; j < X.cols; ++j) {
          const double v = std::fabs(static_cast<double>(detail::ld_f(X(b, i, j))));
          if (std::isnan(v) || std::isinf(v)) {
            bad = true;
            continue;
          }
          if (v == 0) continue;
          if (scale < v) {
            ssq = 1 + ssq * (scale / v) * (scale / v);
            scale = v;
          } else {
            ssq += (v / scale) * (v / scale);
          }
        }
      if (bad) {
        out[b] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      out[b] = static_cast<float>(scale * std::sqrt(ssq));
    }
  }
  /// X_b ← X_b / (mult·norm_b + eps), rounded to T.
  template <class T>
  void scale_by_norm(Mat<T> X, const float* norms, float mult, float eps) {
    if (skipped()) return;
    for (std::int64_t b = 0; b < X.batch; ++b) {
      const float d = mult * norms[b] + eps;
      for_each1(X.at(b), [&](T& e) { e = detail::st_f<T>(detail::ld_f(e) / d); });
    }
  }
  /// flag ← 1 if any element of X is NaN or Inf (flag is not cleared first).
  template <class T>
  void nonfinite_flag(Mat<T> X, int* flag) {
    bool bad = false;
    for_each1(X, [&](T& e) { bad = bad || !is_finite_bits(e); });
    if (bad) *flag = 1;
  }

  // ---------------------------------------------------------------- Muon family element-wise
  /// M ← mu·M + G;  U ← (nesterov ? mu·M + G : M), rounded to TU.
  template <class TG, class TM, class TU>
  void muon_momentum(Mat<TG> G, Mat<TM> M, Mat<TU> U, float mu, bool nesterov) {
    if (skipped()) return;
    check_same(G, M, "muon_momentum");
    check_same(M, U, "muon_momentum");
    for (std::int64_t b = 0; b < M.batch; ++b)
      for (std::int64_t i = 0; i < M.rows; ++i)
        for (std::int64_t j = 0; j < M.cols; ++j) {
          const float g = detail::ld_f(detail::st_f<TM>(detail::ld_f(G(b, i, j))));
          const float m = detail::ld_f(detail::st_f<TM>(std::fma(mu, detail::ld_f(M(b, i, j)), g)));  // as torch
          M(b, i, j) = detail::st_f<TM>(m);
          U(b, i, j) = detail::st_f<TU>(nesterov ? mu * m + g : m);
        }
  }
  /// Decoupled weight decay and update: X ← X − lr·wd·X·[mask] − lr·lr_scale·O,
  /// mask = 1 unless cautious, then [X⊙O ≥ 0].
  template <class TX, class TO>
  void apply_update(Mat<TX> X, Mat<TO> O, const float* lr, const float* wd, float lr_scale, bool cautious) {
    if (skipped()) return;
    check_same(X, O, "apply_update");
    const float l = *lr, w = *wd, step = l * lr_scale;
    for_each2(O, X, [&](const TO& o_, TX& x_) {
      const float x = detail::ld_f(x_), o = detail::ld_f(o_);
      const float decay = (!cautious || x * o >= 0) ? l * w * x : 0.0f;
      x_ = detail::st_f<TX>(x - decay - step * o);
    });
  }
  /// NorMuon (SPEC §1.2 steps 5-12) fused with the update: per matrix, O' = o_scale·O,
  /// V ← V + (1−β2)(mean_j O'² − V), Ô = O'/(√V + 1e-8) rescaled to ‖O'‖_F, X ← decay − lr·s·Ô.
  template <class TX, class TO, class TV>
  void normuon_update(Mat<TX> X, Mat<TO> O, Mat<TV> V, float beta2, float o_scale, const float* lr, const float* wd,
                      float lr_scale, bool cautious) {
    if (skipped()) return;
    check_same(X, O, "normuon_update");
    DION_CHECK(V.rows == X.rows && V.cols == 1 && V.batch == X.batch, ShapeMismatch, "normuon_update: V ", V.rows,
               "x", V.cols, " for ", X.rows, " rows");
    std::vector<float> f(static_cast<std::size_t>(X.rows));
    for (std::int64_t b = 0; b < X.batch; ++b) {
      double nf2 = 0, nh2 = 0;
      for (std::int64_t i = 0; i < X.rows; ++i) {
        double ss = 0;
        for (std::int64_t j = 0; j < X.cols; ++j) {
          const float o = detail::ld_f(detail::st_f<TV>(o_scale * detail::ld_f(O(b, i, j))));
          ss += static_cast<double>(o) * o;
        }
        const float r = X.cols ? static_cast<float>(ss / static_cast<double>(X.cols)) : 0.0f;
        float v = detail::ld_f(V(b, i, 0));
        v = v + (1.0f - beta2) * (r - v);
        V(b, i, 0) = detail::st_f<TV>(v);
        v = detail::ld_f(V(b, i, 0));
        const float inv = 1.0f / (std::sqrt(v) + 1e-8f);
        f[static_cast<std::size_t>(i)] = inv;
        nf2 += ss;
        nh2 += ss * static_cast<double>(inv) * inv;
      }
      const float nf = static_cast<float>(std::sqrt(nf2));
      const float nh = std::max(static_cast<float>(std::sqrt(nh2)), 1e-8f);
      const float rescale = nf / nh;
      const float l = *lr, w = *wd, step = l * lr_scale;
      for (std::int64_t i = 0; i < X.rows; ++i) {
        const float fi = f[static_cast<std::size_t>(i)] * rescale;
        for (std::int64_t j = 0; j < X.cols; ++j) {
          const float o = detail::ld_f(detail::st_f<TV>(o_scale * detail::ld_f(O(b, i, j)))) * fi;
          const float x = detail::ld_f(X(b, i, j));
          const float decay = (!cautious || x * o >= 0) ? l * w * x : 0.0f;
          X(b, i, j) = detail::st_f<TX>(x - decay - step * o);
        }
      }
    }
  }

  // ---------------------------------------------------------------- Dion2 / NorDion2
  /// Per matrix: indices of the k slices (rows if `rows`, else columns) with the largest L1 norm,
  /// written to idx[b·k + t] in ascending index order.
  template <class TM>
  void select_topk(Mat<TM> M, bool rows, std::int64_t k, std::int64_t* idx) {
    const std::int64_t S = rows ? M.rows : M.cols;
    DION_CHECK(k >= 0 && k <= S, InvalidArgument, "select_topk: k = ", k, " for ", S, " slices");
    std::vector<float> norms(static_cast<std::size_t>(S));
    std::vector<std::int64_t> order(static_cast<std::size_t>(S));
    // dion's canonical order for slice L1 norms (the CUDA backend computes the same bits): element l
    // of a slice goes to partial sum l mod 32 in index order, then the butterfly
    // p[i] ← p[i] + p[i xor o], o = 16, 8, 4, 2, 1
    std::vector<float> part(static_cast<std::size_t>(S) * 32);
    auto butterfly = [](float* p) {
      float q[32];
      for (int o = 16; o > 0; o >>= 1) {
        for (int i = 0; i < 32; ++i) q[i] = p[i] + p[i ^ o];
        std::copy(q, q + 32, p);
      }
      return p[0];
    };
    for (std::int64_t b = 0; b < M.batch; ++b) {
      std::fill(part.begin(), part.end(), 0.0f);
      for (std::int64_t i = 0; i < M.rows; ++i)
        for (std::int64_t j = 0; j < M.cols; ++j) {
          const std::int64_t s = rows ? i : j, l = rows ? j : i;
          float& acc = part[static_cast<std::size_t>(s * 32 + l % 32)];
          acc = acc + std::fabs(detail::ld_f(M(b, i, j)));
        }
      for (std::int64_t s = 0; s < S; ++s)
        norms[static_cast<std::size_t>(s)] = butterfly(part.data() + s * 32);
      std::iota(order.begin(), order.end(), std::int64_t{0});
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](std::int64_t a, std::int64_t c) {
        const float na = norms[static_cast<std::size_t>(a)], nc = norms[static_cast<std::size_t>(c)];
        return na > nc || (na == nc && a < c);
      });
      std::sort(order.begin(), order.begin() + k);
      std::copy(order.begin(), order.begin() + k, idx + b * k);
    }
  }
  /// U_b ← the selected slices of M_b (k×cols if rows, rows×k otherwise), then M[sel] ← decay·M[sel].
  template <class TM, class TU>
  void gather_slices(Mat<TM> M, const std::int64_t* idx, std::int64_t k, bool rows, float decay, Mat<TU> U) {
    if (skipped()) return;
    for (std::int64_t b = 0; b < M.batch; ++b)
      for (std::int64_t t = 0; t < k; ++t) {
        const std::int64_t s = idx[b * k + t];
        const std::int64_t len = rows ? M.cols : M.rows;
        for (std::int64_t e = 0; e < len; ++e) {
          TM& m = rows ? M(b, s, e) : M(b, e, s);
          const float v = detail::ld_f(m);
          if (rows) U(b, t, e) = detail::st_f<TU>(v);
          else U(b, e, t) = detail::st_f<TU>(v);
          m = detail::st_f<TM>(decay * v);
        }
      }
  }
  /// Dion2 update: X ← (1 − lr·wd)·X everywhere, then X[sel] ← X[sel] − lr·s·O.
  template <class TX, class TO>
  void dion2_update(Mat<TX> X, Mat<TO> O, const std::int64_t* idx, std::int64_t k, bool rows, const float* lr,
                    const float* wd, float lr_scale) {
    if (skipped()) return;
    const float l = *lr, w = *wd, a = 1.0f - l * w, step = l * lr_scale;
    for_each1(X, [&](TX& x) { x = detail::st_f<TX>(a * detail::ld_f(x)); });
    for (std::int64_t b = 0; b < X.batch; ++b)
      for (std::int64_t t = 0; t < k; ++t) {
        const std::int64_t s = idx[b * k + t];
        const std::int64_t len = rows ? X.cols : X.rows;
        for (std::int64_t e = 0; e < len; ++e) {
          TX& x = rows ? X(b, s, e) : X(b, e, s);
          const float o = detail::ld_f(rows ? O(b, t, e) : O(b, e, t));
          x = detail::st_f<TX>(detail::ld_f(x) - step * o);
        }
      }
  }
  /// NorDion2 update (SPEC §1.4 steps 7-8): fp32 normalization of the k selected rows with the
  /// gathered neuron variance, scatter of V, decay of all of X and update of the selected rows.
  template <class TX, class TO, class TV>
  void nordion2_update(Mat<TX> X, Mat<TO> O, Mat<TV> V, const std::int64_t* idx, std::int64_t k, float beta2,
                       const float* lr, const float* wd, float lr_scale) {
    if (skipped()) return;
    const float l = *lr, w = *wd, a = 1.0f - l * w, step = l * lr_scale;
    for_each1(X, [&](TX& x) { x = detail::st_f<TX>(a * detail::ld_f(x)); });
    std::vector<float> f(static_cast<std::size_t>(k));
    for (std::int64_t b = 0; b < X.batch; ++b) {
      double nf2 = 0, nh2 = 0;
      for (std::int64_t t = 0; t < k; ++t) {
        const std::int64_t s = idx[b * k + t];
        double ss = 0;
        for (std::int64_t j = 0; j < X.cols; ++j) {
          const float o = detail::ld_f(O(b, t, j));
          ss += static_cast<double>(o) * o;
        }
        const float r = X.cols ? static_cast<float>(ss / static_cast<double>(X.cols)) : 0.0f;
        float v = detail::ld_f(V(b, s, 0));
        v = v + (1.0f - beta2) * (r - v);  // lerp in fp32
        const float inv = 1.0f / (std::sqrt(v) + 1e-8f);
        V(b, s, 0) = detail::st_f<TV>(v);
        f[static_cast<std::size_t>(t)] = inv;
        nf2 += ss;
        nh2 += ss * static_cast<double>(inv) * inv;
      }
      const float rescale =
          static_cast<float>(std::sqrt(nf2)) / std::max(static_cast<float>(std::sqrt(nh2)), 1e-8f);
      for (std::int64_t t = 0; t < k; ++t) {
        const std::int64_t s = idx[b * k + t];
        const float fi = f[static_cast<std::size_t>(t)] * rescale;
        for (std::int64_t j = 0; j < X.cols; ++j) {
          TX& x = X(b, s, j);
          x = detail::st_f<TX>(detail::ld_f(x) - step * (detail::ld_f(O(b, t, j)) * fi));
        }
      }
    }
  }

  // ---------------------------------------------------------------- scalar optimizers
  /// Lion (SPEC §1.8): U = sign(β1·M + (1−β1)·G); M ← β2·M + (1−β2)·G; decay; X ← X − lr·U.
  template <class TX, class TG, class TM>
  void lion_update(Mat<TX> X, Mat<TG> G, Mat<TM> M, const float* lr, const float* wd, float beta1, float beta2,
                   bool cautious) {
    if (skipped()) return;
    check_same(X, G, "lion_update");
    check_same(X, M, "lion_update");
    const float l = *lr, w = *wd;
    for (std::int64_t b = 0; b < X.batch; ++b)
      for (std::int64_t i = 0; i < X.rows; ++i)
        for (std::int64_t j = 0; j < X.cols; ++j) {
          const float g = detail::ld_f(detail::st_f<TM>(detail::ld_f(G(b, i, j))));
          const float m = detail::ld_f(M(b, i, j));
          const float c = beta1 * m + (1.0f - beta1) * g;
          const float u = c > 0 ? 1.0f : (c < 0 ? -1.0f : 0.0f);
          M(b, i, j) = detail::st_f<TM>(beta2 * m + (1.0f - beta2) * g);
          const float x = detail::ld_f(X(b, i, j));
          const float decay = (!cautious || x * u >= 0) ? l * w * x : 0.0f;
          X(b, i, j) = detail::st_f<TX>(x - decay - l * u);
        }
  }
  /// AdamW (SPEC §1.8, torch fused semantics): t ← t+1 (fp32 counter), decoupled decay, moments,
  /// bias-corrected step; cautious decay applies only where M_new⊙X_old ≥ 0.
  template <class TX, class TG, class TM, class TV>
  void adamw_update(Mat<TX> X, Mat<TG> G, Mat<TM> M, Mat<TV> V, float* step, bool advance_step, const float* lr,
                    const float* wd, float beta1, float beta2, float eps, bool cautious) {
    if (skipped()) return;
    check_same(X, G, "adamw_update");
    check_same(X, M, "adamw_update");
    check_same(X, V, "adamw_update");
    if (advance_step) *step += 1.0f;
    const double t = *step;
    const float l = *lr, w = *wd;
    const float bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta1), t));
    const float bc2s = static_cast<float>(std::sqrt(1.0 - std::pow(static_cast<double>(beta2), t)));
    const float step_size = l / bc1;
    for (std::int64_t b = 0; b < X.batch; ++b)
      for (std::int64_t i = 0; i < X.rows; ++i)
        for (std::int64_t j = 0; j < X.cols; ++j) {
          const float g = detail::ld_f(G(b, i, j));
          const float x0 = detail::ld_f(X(b, i, j));
          float m = detail::ld_f(M(b, i, j)), v = detail::ld_f(V(b, i, j));
          m = std::fma(1.0f - beta1, g - m, m);     // torch's lerp form of β1·m + (1−β1)·g
          v = std::fma((1.0f - beta2) * g, g, beta2 * v);  // torch's mul_ then addcmul_
          M(b, i, j) = detail::st_f<TM>(m);
          V(b, i, j) = detail::st_f<TV>(v);
          const float decay = (!cautious || m * x0 >= 0) ? l * w * x0 : 0.0f;
          const float x = x0 - decay;
          const float denom = std::sqrt(v) / bc2s + eps;
          X(b, i, j) = detail::st_f<TX>(x - step_size * m / denom);
        }
  }

  // ---------------------------------------------------------------- Dion
  /// M ← M + G (G rounded to M's type first).
  template <class TM, class TG>
  void add_into(Mat<TM> M, Mat<TG> G) {
    if (skipped()) return;
    check_same(M, G, "add_into");
    for_each2(G, M, [](const TG& g, TM& m) {
      m = detail::st_f<TM>(detail::ld_f(m) + detail::ld_f(detail::st_f<TM>(detail::ld_f(g))));
    });
  }
  /// flags[b] ← 1 if every element of M_b is zero, else 0.
  template <class TM>
  void all_zero_flags(Mat<TM> M, int* flags) {
    for (std::int64_t b = 0; b < M.batch; ++b) {
      bool zero = true;
      for_each1(M.at(b), [&](TM& e) { zero = zero && detail::ld_f(e) == 0.0f; });
      flags[b] = zero ? 1 : 0;
    }
  }
  /// Dion's guard: all-zero matrix → P ← 0, R ← Qw; otherwise non-finite entries of P and R → 0.
  template <class T>
  void dion_guard(Mat<T> P, Mat<T> R, Mat<T> Qw, const int* flags) {
    if (skipped()) return;
    for (std::int64_t b = 0; b < P.batch; ++b) {
      if (flags[b]) {
        fill(P.at(b), 0.0f);
        copy(Qw.at(b), R.at(b));
      } else {
        for_each1(P.at(b), [](T& e) { if (!is_finite_bits(e)) e = detail::st_f<T>(0.0f); });
        for_each1(R.at(b), [](T& e) { if (!is_finite_bits(e)) e = detail::st_f<T>(0.0f); });
      }
    }
  }
  /// Q[:, j] ← R[:, j] / (‖R[:, j]‖₂ + eps), norms in fp32, result rounded to TQ.
  template <class TR, class TQ>
  void col_normalize(Mat<TR> R, float eps, Mat<TQ> Q) {
    check_same(R, Q, "col_normalize");
    std::vector<float> n(static_cast<std::size_t>(R.cols));
    for (std::int64_t b = 0; b < R.batch; ++b) {
      std::fill(n.begin(), n.end(), 0.0f);
      for (std::int64_t i = 0; i < R.rows; ++i)
        for (std::int64_t j = 0; j < R.cols; ++j) {
          const float v = detail::ld_f(R(b, i, j));
          n[static_cast<std::size_t>(j)] += v * v;
        }
      for (auto& v : n) v = std::sqrt(v) + eps;
      for (std::int64_t i = 0; i < R.rows; ++i)
        for (std::int64_t j = 0; j < R.cols; ++j)
          Q(b, i, j) = detail::st_f<TQ>(detail::ld_f(R(b, i, j)) / n[static_cast<std::size_t>(j)]);
    }
  }
  /// dst_b ← src_b for every matrix b with flags[b] == want.
  template <class T>
  void copy_if_flag(const int* flags, int want, Mat<T> src, Mat<T> dst) {
    if (skipped()) return;
    for (std::int64_t b = 0; b < dst.batch; ++b)
      if (flags[b] == want) copy(src.at(b), dst.at(b));
  }

  // ---------------------------------------------------------------- factorizations (fp32)
  /// P (p×r, p ≥ r) ← the thin Q factor of its Householder QR, per matrix.
  void qr_q(Mat<float> P) {
    for (std::int64_t b = 0; b < P.batch; ++b) {
      detail::RowMatF p = load(P.at(b));
      Eigen::HouseholderQR<detail::RowMatF> qr(p);
      detail::RowMatF q = qr.householderQ() * detail::RowMatF::Identity(P.rows, P.cols);
      store_axpby(P.at(b), 1.0f, q, 0.0f);
    }
  }
  /// R (r×r) ← the R factor of the Householder QR of A (k×r, k ≥ r), per matrix.
  void qr_r(Mat<float> A, Mat<float> R) {
    for (std::int64_t b = 0; b < A.batch; ++b) {
      detail::RowMatF a = load(A.at(b));
      Eigen::HouseholderQR<detail::RowMatF> qr(a);
      detail::RowMatF r = qr.matrixQR().topRows(A.cols).triangularView<Eigen::Upper>();
      store_axpby(R.at(b), 1.0f, r, 0.0f);
    }
  }
  /// A ← U with A = Uᵀ·U (upper Cholesky); info[b] = 0 on success, i > 0 if the minor i failed.
  void cholesky_upper(Mat<float> A, int* info) {
    for (std::int64_t b = 0; b < A.batch; ++b) {
      detail::RowMatF a = load(A.at(b));
      Eigen::LLT<detail::RowMatF, Eigen::Upper> llt(a);
      if (llt.info() != Eigen::Success) {
        info[b] = 1;
        continue;
      }
      detail::RowMatF u = llt.matrixU();
      bool ok = u.allFinite();
      for (std::int64_t i = 0; ok && i < A.rows; ++i) ok = u(i, i) > 0;
      info[b] = ok ? 0 : 1;
      store_axpby(A.at(b), 1.0f, u, 0.0f);
    }
  }
  /// X ← X·U⁻¹ for upper-triangular U, per matrix.
  void trsm_right_upper(Mat<float> X, Mat<float> U) {
    for (std::int64_t b = 0; b < X.batch; ++b) {
      detail::RowMatF x = load(X.at(b)), u = load(U.at(b));
      // X U^{-1} = (U^{-T} X^T)^T
      detail::RowMatF xt = x.transpose();
      u.triangularView<Eigen::Upper>().transpose().solveInPlace(xt);
      detail::RowMatF r = xt.transpose();
      store_axpby(X.at(b), 1.0f, r, 0.0f);
    }
  }
  /// flags[b] |= (max |Q_bᵀQ_b − I| > tol): the quality check of Cholesky-QR.
  void orthogonality_check(Mat<float> Q, float tol, int* flags) {
    for (std::int64_t b = 0; b < Q.batch; ++b) {
      detail::RowMatF q = load(Q.at(b));
      detail::RowMatF g = q.transpose() * q;
      g -= detail::RowMatF::Identity(Q.cols, Q.cols);
      // a NaN/Inf anywhere must fail the check (maxCoeff's NaN handling is unspecified)
      if (!g.allFinite() || !(g.cwiseAbs().maxCoeff() <= tol)) flags[b] = 1;
    }
  }

  // ---------------------------------------------------------------- random
  /// out(b, i, j) ← stddev · N(0,1) at global index (i + row0)·global_cols + (j + col0) of stream
  /// (seed, stream + b); the same numbers on every backend and sharding.
  template <class T>
  void randn(Mat<T> out, std::uint64_t seed, std::uint64_t stream, std::int64_t row0, std::int64_t col0,
             std::int64_t global_cols, float stddev, const float* stream_step = nullptr) {
    if (skipped()) return;
    if (stream_step) stream = detail::mix64(stream, static_cast<std::uint64_t>(*stream_step));
    for (std::int64_t b = 0; b < out.batch; ++b)
      for (std::int64_t i = 0; i < out.rows; ++i)
        for (std::int64_t j = 0; j < out.cols; ++j) {
          const auto index = static_cast<std::uint64_t>((i + row0) * global_cols + (j + col0));
          out(b, i, j) =
              detail::st_f<T>(stddev * detail::normal_at(seed, stream + static_cast<std::uint64_t>(b), index));
        }
  }

 private:
  const int* skip_ = nullptr;
  bool skipped() const { return skip_ != nullptr && *skip_ != 0; }

  template <class T>
  static detail::RowMatF load(Mat<T> m) {
    detail::RowMatF r(m.rows, m.cols);
    for (std::int64_t i = 0; i < m.rows; ++i)
      for (std::int64_t j = 0; j < m.cols; ++j) r(i, j) = detail::ld_f(m(0, i, j));
    return r;
  }
  template <class T>
  static void store_axpby(Mat<T> m, float alpha, const detail::RowMatF& v, float beta) {
    for (std::int64_t i = 0; i < m.rows; ++i)
      for (std::int64_t j = 0; j < m.cols; ++j) {
        const float old = beta == 0.0f ? 0.0f : beta * detail::ld_f(m(0, i, j));
        m(0, i, j) = detail::st_f<T>(alpha * v(i, j) + old);
      }
  }
  template <class A, class B>
  static void check_same(const Mat<A>& a, const Mat<B>& b, const char* what) {
    DION_CHECK(a.batch == b.batch && a.rows == b.rows && a.cols == b.cols, ShapeMismatch, what, ": shapes (",
               a.batch, ", ", a.rows, ", ", a.cols, ") and (", b.batch, ", ", b.rows, ", ", b.cols, ") differ");
  }
  template <class T, class F>
  static void for_each1(Mat<T> x, F&& f) {
    for (std::int64_t b = 0; b < x.batch; ++b)
      for (std::int64_t i = 0; i < x.rows; ++i) {
        T* row = x.data + x.offset(b, i, 0);
        for (std::int64_t j = 0; j < x.cols; ++j) f(row[j]);
      }
  }
  template <class TA, class TB, class F>
  static void for_each2(Mat<TA> a, Mat<TB> bm, F&& f) {
    for (std::int64_t b = 0; b < a.batch; ++b)
      for (std::int64_t i = 0; i < a.rows; ++i) {
        TA* ra = a.data + a.offset(b, i, 0);
        TB* rb = bm.data + bm.offset(b, i, 0);
        for (std::int64_t j = 0; j < a.cols; ++j) f(ra[j], rb[j]);
      }
  }
};

}  // namespace dion
