// Polar-factor approximations for the Muon family (SPEC §0.2), generic over any Backend.
// Each matrix of the batch is orthogonalized on its own. Tall matrices (rows > cols) use the
// transposed algebra A = XᵀX, X ← a·X + X·B, which equals transposing, iterating and transposing
// back, without moving data.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <utility>

#include "dion/core/options.hpp"
#include "dion/core/concepts.hpp"
#include "dion/core/view.hpp"

namespace dion::ortho {

struct Coeffs {
  float a, b, c;
};

/// Polar Express (arXiv 2505.16932; 5 iterations, safety factor 1.02 baked into all but the last).
inline constexpr std::array<Coeffs, 5> polar_express_coeffs{{
    {8.156554524902461f, -22.48329292557795f, 15.878769915207462f},
    {4.042929935166739f, -2.808917465908714f, 0.5000178451051316f},
    {3.8916678022926607f, -2.772484153217685f, 0.5060648178503393f},
    {3.285753657755655f, -2.3681294933425376f, 0.46449024233003106f},
    {2.3465413258596377f, -1.7097828382687081f, 0.42323551169305323f},
}};
/// microsoft/dion's classic quintic Newton–Schulz, one (a, b, c) per iteration.
inline constexpr std::array<Coeffs, 5> newton_schulz_coeffs{{
    {4.0848f, -6.8946f, 2.9270f},
    {3.9505f, -6.3029f, 2.6377f},
    {3.7418f, -5.5913f, 2.3037f},
    {2.8769f, -3.1427f, 1.2046f},
    {2.8366f, -3.0525f, 1.2012f},
}};
/// Keller Jordan's constant coefficients (muon_reference.py), repeated ns_steps times.
inline constexpr Coeffs newton_schulz_const_coeffs{3.4445f, -4.7750f, 2.0315f};

/// Scratch an orthogonalization of `batch` matrices of rows×cols needs, in elements of its type:
/// a second X (ping-pong) and two s×s matrices, s = min(rows, cols).
inline std::int64_t scratch_elems(std::int64_t batch, std::int64_t rows, std::int64_t cols) {
  const std::int64_t s = rows < cols ? rows : cols;
  return batch * (rows * cols + 2 * s * s);
}

/// Orthogonalize every matrix of X in place (the result is written back into X).
/// `scratch` holds scratch_elems() elements of T; `norms` holds X.batch floats (backend memory).
template <class Backend, class T>
void orthogonalize(Backend& be, Orthogonalizer kind, int ns_steps, float eps, Mat<T, typename Backend::Space> X,
                   T* scratch, float* norms) {
  using M = Mat<T, typename Backend::Space>;
  if (X.empty()) return;
  const bool tall = X.rows > X.cols;
  const std::int64_t s = tall ? X.cols : X.rows;
  M X2 = packed<T, typename Backend::Space>(scratch, X.batch, X.rows, X.cols);
  M A = packed<T, typename Backend::Space>(scratch + X.batch * X.rows * X.cols, X.batch, s, s);
  M B = packed<T, typename Backend::Space>(A.data + X.batch * s * s, X.batch, s, s);

  const float mult = kind == Orthogonalizer::polar_express ? 1.02f : 1.0f;
  be.frob_norms(X, norms);
  be.scale_by_norm(X, norms, mult, eps);

  M cur = X, nxt = X2;
  auto iterate = [&](const Coeffs& k) {
    be.gram(tall ? Op::T : Op::N, cur, A);  // A = XᵀX (tall) or X·Xᵀ
    be.sym_poly(A, k.b, k.c, B);            // B = b·A + c·A²
    be.copy(cur, nxt);
    if (tall) be.gemm(Op::N, Op::N, 1.0f, cur, B, k.a, nxt);  // X ← a·X + X·B
    else be.gemm(Op::N, Op::N, 1.0f, B, cur, k.a, nxt);       // X ← a·X + B·X
    std::swap(cur, nxt);
  };
  switch (kind) {
    case Orthogonalizer::polar_express:
      for (const auto& k : polar_express_coeffs) iterate(k);
      break;
    case Orthogonalizer::newton_schulz:
      for (const auto& k : newton_schulz_coeffs) iterate(k);
      break;
    case Orthogonalizer::newton_schulz_const:
      for (int i = 0; i < ns_steps; ++i) iterate(newton_schulz_const_coeffs);
      break;
  }
  if (cur.data != X.data) be.copy(cur, X);
}

}  // namespace dion::ortho
