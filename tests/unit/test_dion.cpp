// Dion (SPEC §1.5-1.6): against an fp64 re-implementation of the reference semantics for every
// rank_fraction / qr_method / power_iters / mu combination, on tall, wide and square parameters
// (orientation), comparing parameters, momentum and Q (up to column signs); the rank rule with
// rank_multiple_of; Q's initialization; the all-zero guard; mixed-precision states.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "backend_env.hpp"
#include "catch_compat.hpp"
#include "test_util.hpp"

using dion::QrMethod;
using dion_test::MatD;

namespace {

/// Thin orthonormal factor (Householder QR in fp64).
MatD thin_q(const MatD& p) {
  const Eigen::MatrixXd pd = p;
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(pd);
  return MatD(qr.householderQ() * Eigen::MatrixXd::Identity(p.rows(), p.cols()));
}

MatD col_normalize(const MatD& r, double eps) {
  MatD q = r;
  for (Eigen::Index j = 0; j < r.cols(); ++j) q.col(j) = r.col(j) / (r.col(j).norm() + eps);
  return q;
}

struct DionRef {
  std::vector<double> x, m, q;
};

/// SPEC §1.5 for one parameter m×n, from initial X and Q (q×r), over `grads`.
DionRef dion_ref(const std::vector<float>& x0, const std::vector<float>& q0, std::int64_t m, std::int64_t n,
                 std::int64_t r, const std::vector<const std::vector<float>*>& grads, const dion::Options& o) {
  const bool tr = m < n;
  const std::int64_t q = tr ? m : n;
  MatD X = dion_test::to_matd(x0, m, n);
  MatD M = MatD::Zero(m, n);
  MatD Q = dion_test::to_matd(q0, q, r);
  const double s = std::sqrt(static_cast<double>(m) / static_cast<double>(n));
  for (const auto* g : grads) {
    M += dion_test::to_matd(*g, m, n);
    const MatD B = tr ? MatD(M.transpose()) : M;
    MatD Qw = Q, P, R;
    for (int it = 0; it < o.power_iters; ++it) {
      P = thin_q(B * Qw);
      R = B.transpose() * P;
      Qw = R;
    }
    if (M.cwiseAbs().maxCoeff() == 0.0) {  // all-zero guard
      P.setZero();
      R = Q;
    }
    const MatD EF = P * R.transpose();  // in B's orientation
    M -= (1.0 - o.mu) * (tr ? MatD(EF.transpose()) : EF);
    const MatD Qn = col_normalize(R, o.epsilon);
    const MatD U = tr ? MatD(Qn * P.transpose()) : MatD(P * Qn.transpose());
    X = X - static_cast<double>(o.lr) * o.weight_decay * X - o.lr * s * U;
    Q = Qn;
  }
  return {dion_test::to_vec(X), dion_test::to_vec(M), dion_test::to_vec(Q)};
}

/// Relative error of Q up to the sign of each column.
double q_err(const std::vector<float>& got, const std::vector<double>& ref, std::int64_t rows, std::int64_t r) {
  double num = 0, den = 0;
  for (std::int64_t j = 0; j < r; ++j) {
    double dot = 0;
    for (std::int64_t i = 0; i < rows; ++i) dot += got[static_cast<std::size_t>(i * r + j)] * ref[static_cast<std::size_t>(i * r + j)];
    const double sg = dot < 0 ? -1 : 1;
    for (std::int64_t i = 0; i < rows; ++i) {
      const double d = sg * got[static_cast<std::size_t>(i * r + j)] - ref[static_cast<std::size_t>(i * r + j)];
      num += d * d;
      den += ref[static_cast<std::size_t>(i * r + j)] * ref[static_cast<std::size_t>(i * r + j)];
    }
  }
  return std::sqrt(num / den);
}

template <class B, class Opt = dion::Dion<B>>
void check_against_reference(dion_test::BackendEnv<B>& env, const dion::Options& o, const dion_test::Problem& pb,
                             int steps, double tol) {
  Opt opt{env.backend(), o};
  auto grp = opt.add_group();
  std::vector<dion_test::DeviceBuffer<float, B>> xs, gs;
  for (std::size_t i = 0; i < pb.params.size(); ++i) {
    xs.push_back(env.upload(pb.init[i]));
    gs.push_back(env.template alloc<float>(pb.numel(i)));
    grp.add(pb.params[i].name, env.view(xs.back(), pb.params[i].shape), env.view(gs.back(), pb.params[i].shape));
  }
  std::vector<std::vector<float>> q0;
  for (const auto& p : pb.params) q0.push_back(opt.read_state(p.name + "/Q"));
  for (int k = 0; k < steps; ++k) {
    for (std::size_t i = 0; i < pb.params.size(); ++i) env.write(gs[i], pb.grads[static_cast<std::size_t>(k)][i]);
    opt.step();
  }
  for (std::size_t i = 0; i < pb.params.size(); ++i) {
    const auto& p = pb.params[i];
    INFO("parameter " << p.name);
    const auto qs = opt.state(p.name + "/Q").view.shape;
    std::vector<const std::vector<float>*> gl;
    for (int k = 0; k < steps; ++k) gl.push_back(&pb.grads[static_cast<std::size_t>(k)][i]);
    const auto ref = dion_ref(pb.init[i], q0[i], p.shape[0], p.shape[1], qs[1], gl, o);
    const auto x = env.download(xs[i]);
    const double ex = dion_test::update_rel_err(x, ref.x, pb.init[i]);
    const double em = dion_test::rel_err(opt.read_state(p.name + "/momentum"), ref.m);
    const double eq = q_err(opt.read_state(p.name + "/Q"), ref.q, qs[0], qs[1]);
    INFO("update error " << ex << ", momentum error " << em << ", Q error " << eq);
    CHECK(ex < tol);
    CHECK(em < tol);
    CHECK(eq < tol);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("dion: matches an fp64 reference of SPEC 1.5 (rank, qr_method, power_iters, mu, orientation)",
                   "[dion]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const double rank_fraction = GENERATE(1.0, 0.5, 0.25);
  const QrMethod qr = GENERATE(QrMethod::qr, QrMethod::cqr, QrMethod::rcqr);
  const int power_iters = GENERATE(1, 2);
  const float mu = GENERATE(0.95f, 0.5f);
  INFO("rank_fraction " << rank_fraction << ", qr_method " << dion::qr_method_name(qr) << ", power_iters "
                        << power_iters << ", mu " << mu);
  dion::Options o;
  o.lr = 0.02f;
  o.weight_decay = 0.1f;
  o.rank_fraction = rank_fraction;
  o.qr_method = qr;
  o.cqr_warmup_steps = 1;  // step 1 uses rcqr, steps 2-3 Cholesky-QR
  o.power_iters = power_iters;
  o.mu = mu;
  const int steps = 3;
  const auto pb = dion_test::make_problem({{"tall", {64, 32}}, {"wide", {32, 64}}, {"square", {48, 48}}}, steps, 41);
  check_against_reference(env, o, pb, steps, 1e-4);
}

TEMPLATE_TEST_CASE("dion: Q state shape follows the rank rule and the orientation (SPEC 1.5)", "[dion][state]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  struct Case {
    std::int64_t m, n;
    double frac;
    int mult;
    std::int64_t q_rows, r;
  };
  const Case c = GENERATE(Case{768, 768, 0.5, 1, 768, 384},  // SPEC §6.3
                          Case{768, 3072, 0.5, 1, 768, 384},  // wide: transposed, Q (m, r)
                          Case{3072, 768, 0.5, 1, 768, 384},  // tall: Q (n, r)
                          Case{100, 60, 0.3, 8, 60, 24},      // 18 → multiple of 8 → 24
                          Case{100, 60, 1.0, 7, 60, 60},      // 63 capped at min(m, n)
                          Case{60, 100, 0.25, 1, 60, 15},     // transposed
                          Case{64, 64, 1e-9, 1, 64, 1},       // rounds up to 1, never 0
                          Case{50, 30, 0.07, 1, 30, 3});      // 0.07·30 = 2.1 → 3
  INFO(c.m << "x" << c.n << ", rank_fraction " << c.frac << ", rank_multiple_of " << c.mult);
  auto x = env.template alloc<float>(static_cast<std::size_t>(c.m * c.n));
  dion::Options o;
  o.rank_fraction = c.frac;
  o.rank_multiple_of = c.mult;
  dion::Dion<TestType> opt{env.backend(), o};
  opt.add_group().add("w", env.view(x, {c.m, c.n}));
  const auto q = opt.state("w/Q");
  CHECK(q.view.shape == dion::Shape{c.q_rows, c.r});
  CHECK(opt.state("w/momentum").view.shape == dion::Shape{c.m, c.n});
}

TEMPLATE_TEST_CASE("dion: initial Q is standard normal, keyed by (seed, name), independent of registration order",
                   "[dion][state][determinism]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  auto a = env.template alloc<float>(256 * 128);
  auto b = env.template alloc<float>(96 * 64);
  auto q_of = [&](std::uint64_t seed, bool swap_order) {
    dion::Options o;
    o.seed = seed;
    dion::Dion<TestType> opt{env.backend(), o};
    auto g = opt.add_group();
    if (swap_order) g.add("b", env.view(b, {96, 64})).add("a", env.view(a, {256, 128}));
    else g.add("a", env.view(a, {256, 128})).add("b", env.view(b, {96, 64}));
    return std::make_pair(opt.read_state("a/Q"), opt.read_state("b/Q"));
  };
  const auto [qa, qb] = q_of(0, false);
  const auto [qa2, qb2] = q_of(0, true);
  const auto [qa3, qb3] = q_of(1, false);
  CHECK(dion_test::bits_equal(qa, qa2));
  CHECK(dion_test::bits_equal(qb, qb2));
  CHECK_FALSE(dion_test::bits_equal(qa, qa3));
  REQUIRE(qa.size() == 128u * 128u);
  double mean = 0, var = 0;
  for (float v : qa) mean += v;
  mean /= static_cast<double>(qa.size());
  for (float v : qa) var += (v - mean) * (v - mean);
  var /= static_cast<double>(qa.size());
  CHECK(std::fabs(mean) < 0.02);
  CHECK(std::fabs(var - 1.0) < 0.03);  // not normalized (SPEC 1.5: i.i.d. standard normal)
  CHECK(dion_test::all_finite(qa));
}

TEMPLATE_TEST_CASE("dion: an all-zero gradient keeps Q (column-normalized), gives no update and no NaN",
                   "[dion][robustness]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const std::int64_t m = GENERATE(48, 24), n = 32;
  const auto x0 = dion_test::randn(static_cast<std::size_t>(m * n), 5, 0.1f);
  auto x = env.upload(x0);
  auto g = env.template alloc<float>(static_cast<std::size_t>(m * n));
  dion::Options o;
  o.weight_decay = 0.0f;
  o.rank_fraction = 0.5;
  const int power_iters = GENERATE(1, 2);
  o.power_iters = power_iters;
  dion::Dion<TestType> opt{env.backend(), o};
  opt.add_group().add("w", env.view(x, {m, n}), env.view(g, {m, n}));
  const auto q0 = opt.read_state("w/Q");
  const auto qshape = opt.state("w/Q").view.shape;
  opt.step();
  CHECK(dion_test::bits_equal(env.download(x), x0));
  for (float v : opt.read_state("w/momentum")) CHECK(v == 0.0f);
  const auto q1 = opt.read_state("w/Q");
  REQUIRE(dion_test::all_finite(q1));
  // R = Q_init, so Q_new = Q_init / (‖column‖ + eps)
  const MatD expect = col_normalize(dion_test::to_matd(q0, qshape[0], qshape[1]), 1e-8);
  CHECK((dion_test::to_matd(q1, qshape[0], qshape[1]) - expect).cwiseAbs().maxCoeff() < 1e-6);
  // a second zero step keeps the (now unit) columns
  opt.step();
  CHECK(dion_test::max_abs_diff(opt.read_state("w/Q"), q1) < 1e-6);
  CHECK(dion_test::bits_equal(env.download(x), x0));
}

TEMPLATE_TEST_CASE("dion: bf16 states (momentum, Q) stay close to the fp32 run", "[dion][bf16]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  dion::Options o;
  o.rank_fraction = 0.5;
  const int steps = 3;
  const auto pb = dion_test::make_problem({{"tall", {64, 32}}, {"wide", {32, 64}}}, steps, 43);
  const auto f32 = dion_test::run_problem<dion::Dion<TestType>>(env, o, pb, steps);
  const auto b16 =
      dion_test::run_problem<dion::Dion<TestType, dion::SingleProcess, dion::precision::Bf16States>>(env, o, pb, steps);
  for (std::size_t i = 0; i < pb.params.size(); ++i) {
    INFO("parameter " << pb.params[i].name);
    std::vector<double> ref(f32.params[i].begin(), f32.params[i].end());
    CHECK(dion_test::update_rel_err(b16.params[i], ref, pb.init[i]) < 5e-2);
    CHECK(dion_test::rel_err(b16.state.at(pb.params[i].name + "/momentum"), f32.state.at(pb.params[i].name + "/momentum")) < 2e-2);
  }
}

TEMPLATE_TEST_CASE("dion: lion and adamw groups inside Dion expose no step_dev and reject cautious_wd",
                   "[dion][scalar][state]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  auto w = env.template alloc<float>(32 * 16);
  auto b = env.template alloc<float>(16);
  auto c = env.template alloc<float>(16);
  dion::Dion<TestType> opt{env.backend()};
  opt.add_group().add("w", env.view(w, {32, 16}));
  opt.add_group({.algorithm = dion::Algorithm::adamw}).add("b", env.view(b, {16}));
  opt.add_group({.algorithm = dion::Algorithm::lion}).add("c", env.view(c, {16}));
  std::vector<std::string> names;
  for (const auto& s : opt.state()) names.push_back(s.name);
  CHECK(names == std::vector<std::string>{"w/momentum", "w/Q", "b/momentum", "b/variance", "c/momentum"});
  REQUIRE_THROWS_AS(opt.add_group({.algorithm = dion::Algorithm::adamw, .cautious_wd = true}), dion::InvalidArgument);
  REQUIRE_THROWS_WITH(opt.add_group({.algorithm = dion::Algorithm::lion, .cautious_wd = true}),
                      DION_CONTAINS("cautious_wd"));
}

TEMPLATE_TEST_CASE("dion: AdamW groups inside Dion take the group step for bias correction (SPEC 1.8)",
                   "[dion][scalar][adamw]", DION_TEST_BACKENDS) {
  // SPEC 1.8: "step_dev: 0-d fp32 device counter in the DistributedOrthoBase family; Dion uses the
  // host group["step"]". Dion's group step advances at every step() (params without a gradient
  // included), so a bias that first gets a gradient at the second step is corrected with t = 2.
  dion_test::BackendEnv<TestType> env;
  const auto x0 = dion_test::randn(16, 1);
  const auto g0 = dion_test::randn(16, 2);
  auto w = env.template alloc<float>(32 * 16);
  auto gw = env.upload(dion_test::randn(32 * 16, 3));
  auto x = env.upload(x0);
  auto g = env.upload(g0);
  dion::Options o;
  o.lr = 0.01f;
  o.weight_decay = 0.0f;
  o.beta1 = 0.9f;
  o.beta2 = 0.95f;
  dion::Dion<TestType> opt{env.backend(), o};
  opt.add_group().add("w", env.view(w, {32, 16}), env.view(gw, {32, 16}));
  opt.add_group({.algorithm = dion::Algorithm::adamw}).add("b", env.view(x, {16}));  // no gradient yet
  opt.step();
  CHECK(opt.step_count(1) == 1);
  opt.set_grad("b", env.view(g, {16}));
  opt.step();
  REQUIRE(opt.step_count(1) == 2);
  const double b1 = 0.9f, b2 = 0.95f, t = 2;
  const auto got = env.download(x);
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double m = (1 - b1) * g0[i], v = (1 - b2) * static_cast<double>(g0[i]) * g0[i];
    const double expect = x0[i] - (0.01 / (1 - std::pow(b1, t))) * m / (std::sqrt(v) / std::sqrt(1 - std::pow(b2, t)) + 1e-8);
    INFO("element " << i);
    CHECK(got[i] == Approx(expect).margin(1e-6));
  }
}
