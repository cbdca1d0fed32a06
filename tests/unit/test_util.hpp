// Shared helpers of dion's unit tests: seeded data, comparisons, bitwise snapshots of an optimizer's
// parameters and state, and fp64 oracles (Eigen, double precision) for the algorithms of SPEC.md.
#pragma once

#include <Eigen/Dense>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "backend_env.hpp"
#include "dion/dion.hpp"

namespace dion_test {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// ------------------------------------------------------------------------------------------ data
/// n i.i.d. N(0, scale²) floats from a fixed-seed std::mt19937.
inline std::vector<float> randn(std::size_t n, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = scale * d(gen);
  return v;
}
inline std::vector<dion::bf16> to_bf16(const std::vector<float>& v) {
  std::vector<dion::bf16> r(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) r[i] = dion::bf16(v[i]);
  return r;
}
inline std::vector<float> from_bf16(const std::vector<dion::bf16>& v) {
  std::vector<float> r(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) r[i] = static_cast<float>(v[i]);
  return r;
}
/// Round every element to bf16 and back.
inline std::vector<float> round_bf16(std::vector<float> v) {
  for (auto& x : v) x = dion::round_bf16(x);
  return v;
}

/// prefix followed by the number i ("p" + 3 → "p3"); appends rather than `"p" + std::to_string(i)`,
/// which trips GCC 12's -Wrestrict false positive in std::string::insert.
inline std::string indexed(const char* prefix, long long i) {
  std::string s(prefix);
  s += std::to_string(i);
  return s;
}

// ------------------------------------------------------------------------------------------ compare
template <class T>
bool bits_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}
inline double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return a.size() == b.size() ? m : INFINITY;
}
/// Batch invariance: a matrix orthogonalized inside a batch equals the same matrix alone. The
/// reference backend (Eigen) is bitwise batch-invariant; a library GEMM (cuBLAS) may pick another
/// kernel for another batch count, so other backends are held to fp32 rounding (1e-5 of the scale).
template <class Backend>
bool batch_invariant(const std::vector<float>& alone, const std::vector<float>& in_batch) {
  if (alone.size() != in_batch.size()) return false;
  if (std::string_view(Backend::name) == "eigen") return bits_equal(alone, in_batch);
  double scale = 0;
  for (float v : alone) scale = std::max(scale, std::fabs(static_cast<double>(v)));
  return max_abs_diff(alone, in_batch) <= 1e-5 * std::max(scale, 1.0);
}
/// ‖a − b‖ / ‖b‖ (‖a − b‖ when b = 0).
inline double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}
inline double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  return rel_err(std::vector<double>(a.begin(), a.end()), std::vector<double>(b.begin(), b.end()));
}
inline double rel_err(const std::vector<float>& a, const std::vector<double>& b) {
  return rel_err(std::vector<double>(a.begin(), a.end()), b);
}
/// Norm-wise relative error of the update: ‖(a − x0) − (b − x0)‖ / ‖b − x0‖.
inline double update_rel_err(const std::vector<float>& a, const std::vector<double>& b, const std::vector<float>& x0) {
  std::vector<double> da(a.size()), db(b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    da[i] = static_cast<double>(a[i]) - x0[i];
    db[i] = b[i] - x0[i];
  }
  return rel_err(da, db);
}
inline bool all_finite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

// ------------------------------------------------------------------------------------------ snapshots
/// Every state tensor of an optimizer, by name, as floats (bf16 widens exactly, so equality of the
/// floats' bits is equality of the stored bits).
template <class Opt>
std::map<std::string, std::vector<float>> state_snapshot(Opt& opt) {
  std::map<std::string, std::vector<float>> s;
  for (const auto& r : opt.state()) s[r.name] = opt.read_state(r.name);
  return s;
}
inline bool snapshots_equal(const std::map<std::string, std::vector<float>>& a,
                            const std::map<std::string, std::vector<float>>& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [k, v] : a) {
    const auto it = b.find(k);
    if (it == b.end() || !bits_equal(v, it->second)) return false;
  }
  return true;
}
/// Step counters of every group.
template <class Opt>
std::vector<std::int64_t> step_counts(const Opt& opt) {
  std::vector<std::int64_t> s;
  for (int g = 0; g < opt.num_groups(); ++g) s.push_back(opt.step_count(g));
  return s;
}

// ------------------------------------------------------------------------------------------ fp64 oracles
inline MatD to_matd(const std::vector<float>& v, std::int64_t rows, std::int64_t cols, std::int64_t offset = 0) {
  MatD m(rows, cols);
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < cols; ++j) m(i, j) = v[static_cast<std::size_t>(offset + i * cols + j)];
  return m;
}
inline std::vector<double> to_vec(const MatD& m) {
  std::vector<double> v(static_cast<std::size_t>(m.size()));
  for (std::int64_t i = 0; i < m.rows(); ++i)
    for (std::int64_t j = 0; j < m.cols(); ++j) v[static_cast<std::size_t>(i * m.cols() + j)] = m(i, j);
  return v;
}
/// max |X Xᵀ − I| (wide or square) or max |Xᵀ X − I| (tall).
inline double orthogonality_error(const MatD& x) {
  if (x.rows() <= x.cols()) return (x * x.transpose() - MatD::Identity(x.rows(), x.rows())).cwiseAbs().maxCoeff();
  return (x.transpose() * x - MatD::Identity(x.cols(), x.cols())).cwiseAbs().maxCoeff();
}
/// Singular values (fp64 JacobiSVD).
inline Eigen::VectorXd singular_values(const MatD& x) {
  const Eigen::MatrixXd xd = x;
  Eigen::JacobiSVD<Eigen::MatrixXd> svd(xd);
  return svd.singularValues();
}
/// The exact polar factor U Vᵀ of x (fp64 JacobiSVD).
inline MatD polar_factor(const MatD& x) {
  const Eigen::MatrixXd xd = x;
  Eigen::JacobiSVD<Eigen::MatrixXd> svd(xd, Eigen::ComputeThinU | Eigen::ComputeThinV);
  return svd.matrixU() * svd.matrixV().transpose();
}

/// The Muon family's orthogonalizer, re-implemented in fp64 from SPEC §0.2 (same coefficients, same
/// normalization, same number of iterations): the oracle for dion's fp32 orthogonalization.
inline MatD ortho_ref(MatD x, dion::Orthogonalizer kind, double eps = 1e-8, int ns_steps = 5) {
  const bool tall = x.rows() > x.cols();
  const double mult = kind == dion::Orthogonalizer::polar_express ? 1.02 : 1.0;
  x /= (mult * x.norm() + eps);
  auto iterate = [&](double a, double b, double c) {
    if (tall) {
      const MatD A = x.transpose() * x;
      const MatD B = b * A + c * A * A;
      x = a * x + x * B;
    } else {
      const MatD A = x * x.transpose();
      const MatD B = b * A + c * A * A;
      x = a * x + B * x;
    }
  };
  switch (kind) {
    case dion::Orthogonalizer::polar_express:
      for (const auto& k : dion::ortho::polar_express_coeffs) iterate(k.a, k.b, k.c);
      break;
    case dion::Orthogonalizer::newton_schulz:
      for (const auto& k : dion::ortho::newton_schulz_coeffs) iterate(k.a, k.b, k.c);
      break;
    case dion::Orthogonalizer::newton_schulz_const:
      for (int i = 0; i < ns_steps; ++i)
        iterate(dion::ortho::newton_schulz_const_coeffs.a, dion::ortho::newton_schulz_const_coeffs.b,
                dion::ortho::newton_schulz_const_coeffs.c);
      break;
  }
  return x;
}

/// SPEC §0.1 adjust_lr factor.
inline double adjust_factor(dion::AdjustLr a, double fan_out, double fan_in) {
  switch (a) {
    case dion::AdjustLr::spectral_norm: return std::sqrt(fan_out / fan_in);
    case dion::AdjustLr::rms_norm: return 0.2 * std::sqrt(std::max(fan_out, fan_in));
    case dion::AdjustLr::none: return 1.0;
  }
  return 1.0;
}

/// Decoupled weight decay + update (SPEC §1.1 steps 6-7) in fp64: X ← X − lr·wd·X·mask − alr·O.
inline MatD decay_update_ref(const MatD& x, const MatD& o, double lr, double wd, double alr, bool cautious) {
  MatD r = x;
  for (Eigen::Index i = 0; i < x.rows(); ++i)
    for (Eigen::Index j = 0; j < x.cols(); ++j) {
      const double decay = (!cautious || x(i, j) * o(i, j) >= 0) ? lr * wd * x(i, j) : 0.0;
      r(i, j) = x(i, j) - decay - alr * o(i, j);
    }
  return r;
}

/// NorMuon's normalization (SPEC §1.2 steps 6-10) in fp64; v is updated in place (m×1).
inline MatD normuon_normalize_ref(const MatD& o, Eigen::VectorXd& v, double beta2) {
  const double nf = o.norm();
  MatD oh = o;
  for (Eigen::Index i = 0; i < o.rows(); ++i) {
    const double r = o.row(i).squaredNorm() / static_cast<double>(o.cols());
    v(i) = v(i) + (1 - beta2) * (r - v(i));
    oh.row(i) /= (std::sqrt(v(i)) + 1e-8);
  }
  return oh * (nf / std::max(oh.norm(), 1e-8));
}


// ------------------------------------------------------------------------------------------ problems
/// A set of named parameters with initial values and one gradient per parameter per step.
struct ParamSpec {
  std::string name;
  dion::Shape shape;
};
struct Problem {
  std::vector<ParamSpec> params;
  std::vector<std::vector<float>> init;                // [param]
  std::vector<std::vector<std::vector<float>>> grads;  // [step][param]
  std::size_t numel(std::size_t i) const { return static_cast<std::size_t>(params[i].shape.numel()); }
};
/// Seeded problem: init ~ N(0, init_scale²), grads ~ N(0, 1).
inline Problem make_problem(std::vector<ParamSpec> params, int steps, std::uint32_t seed, float init_scale = 0.1f) {
  Problem pb;
  pb.params = std::move(params);
  for (std::size_t i = 0; i < pb.params.size(); ++i)
    pb.init.push_back(randn(pb.numel(i), seed * 7919u + static_cast<std::uint32_t>(i), init_scale));
  pb.grads.resize(static_cast<std::size_t>(steps));
  for (int k = 0; k < steps; ++k)
    for (std::size_t i = 0; i < pb.params.size(); ++i)
      pb.grads[static_cast<std::size_t>(k)].push_back(
          randn(pb.numel(i), seed * 104729u + 1000u * static_cast<std::uint32_t>(k + 1) + static_cast<std::uint32_t>(i)));
  return pb;
}

/// Final parameters and state of a run.
struct RunResult {
  std::vector<std::vector<float>> params;
  std::map<std::string, std::vector<float>> state;
  std::map<std::string, std::vector<std::int64_t>> state_shapes;
};

/// Build optimizer `Opt` on env's backend with `opts`, one group with overrides `g` holding every
/// parameter of `pb` (fp32, packed), and run `steps` steps (steps ≤ pb.grads.size()).
template <class Opt, class B>
RunResult run_problem(BackendEnv<B>& env, const dion::Options& opts, const Problem& pb, int steps,
                      const dion::GroupOptions& g = {}) {
  Opt opt{env.backend(), opts};
  auto grp = opt.add_group(g);
  std::vector<DeviceBuffer<float, B>> xs, gs;
  for (std::size_t i = 0; i < pb.params.size(); ++i) {
    xs.push_back(env.upload(pb.init[i]));
    gs.push_back(env.template alloc<float>(pb.numel(i)));
    grp.add(pb.params[i].name, env.view(xs.back(), pb.params[i].shape), env.view(gs.back(), pb.params[i].shape));
  }
  for (int k = 0; k < steps; ++k) {
    for (std::size_t i = 0; i < pb.params.size(); ++i) env.write(gs[i], pb.grads[static_cast<std::size_t>(k)][i]);
    opt.step();
  }
  RunResult r;
  for (auto& x : xs) r.params.push_back(env.download(x));
  for (const auto& s : opt.state()) {
    r.state[s.name] = opt.read_state(s.name);
    std::vector<std::int64_t> shp;
    for (int d = 0; d < s.view.shape.ndim; ++d) shp.push_back(s.view.shape[d]);
    r.state_shapes[s.name] = shp;
  }
  return r;
}


/// Number of matrices and their shape for a Muon-family parameter (batch over leading dims).
struct MatrixLayout {
  std::int64_t batch, rows, cols;
};
inline MatrixLayout layout_of(const dion::Shape& s) {
  std::int64_t b = 1;
  for (int i = 0; i + 2 < s.ndim; ++i) b *= s[i];
  return {b, s[s.ndim - 2], s[s.ndim - 1]};
}

/// fp64 reference of Muon (SPEC §1.1) or NorMuon (§1.2) on problem `pb` for `steps` steps with the
/// hyperparameters of `o` (no num_heads / split_sizes / flatten). `round_input_bf16`: round the
/// orthogonalization input to bf16 first (what the default precision policy does).
struct MuonRefResult {
  std::vector<std::vector<double>> params;    // [param] row-major
  std::vector<std::vector<double>> momentum;  // [param]
  std::vector<std::vector<double>> variance;  // [param] (NorMuon: one per row of every matrix)
};
inline MuonRefResult muon_family_ref(const Problem& pb, int steps, const dion::Options& o, bool normuon,
                                     bool round_input_bf16 = false) {
  MuonRefResult res;
  for (std::size_t i = 0; i < pb.params.size(); ++i) {
    const auto L = layout_of(pb.params[i].shape);
    const double s = adjust_factor(o.adjust_lr, static_cast<double>(L.rows), static_cast<double>(L.cols));
    std::vector<double> xout, mout, vout;
    for (std::int64_t b = 0; b < L.batch; ++b) {
      const std::int64_t off = b * L.rows * L.cols;
      MatD X = to_matd(pb.init[i], L.rows, L.cols, off);
      MatD M = MatD::Zero(L.rows, L.cols);
      Eigen::VectorXd V = Eigen::VectorXd::Zero(L.rows);
      for (int k = 0; k < steps; ++k) {
        const MatD G = to_matd(pb.grads[static_cast<std::size_t>(k)][i], L.rows, L.cols, off);
        const double mu = o.mu;
        M = mu * M + G;
        MatD U = o.nesterov ? MatD(mu * M + G) : M;
        if (round_input_bf16) U = U.unaryExpr([](double v) { return static_cast<double>(dion::round_bf16(static_cast<float>(v))); });
        MatD O = ortho_ref(U, o.orthogonalizer, o.epsilon, o.ns_steps);
        if (normuon) O = normuon_normalize_ref(O, V, o.muon_beta2);
        X = decay_update_ref(X, O, o.lr, o.weight_decay, o.lr * s, o.cautious_wd);
      }
      const auto xv = to_vec(X), mv = to_vec(M);
      xout.insert(xout.end(), xv.begin(), xv.end());
      mout.insert(mout.end(), mv.begin(), mv.end());
      for (Eigen::Index r = 0; r < V.size(); ++r) vout.push_back(V(r));
    }
    res.params.push_back(xout);
    res.momentum.push_back(mout);
    res.variance.push_back(vout);
  }
  return res;
}

}  // namespace dion_test
