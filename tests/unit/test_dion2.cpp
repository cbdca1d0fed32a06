// Dion2 (SPEC §1.3) and NorDion2 = Dion3 (§1.4): against fp64 re-implementations of the spec for
// fraction / ef_decay / mu / muon_beta2 / adjust_lr; the slice selection (rows for wide and square,
// columns for tall; NorDion2 always rows; top-k by L1 norm; k = max(1, ceil(fraction·S))); error
// feedback on the selected slices only; the all-zero gradient; the Dion3 alias.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "backend_env.hpp"
#include "catch_compat.hpp"
#include "test_util.hpp"

using dion::AdjustLr;
using dion_test::MatD;

namespace {

/// Indices of the k largest L1 norms of M's rows (rows = true) or columns.
std::vector<Eigen::Index> topk(const MatD& M, bool rows, std::int64_t k) {
  const Eigen::Index S = rows ? M.rows() : M.cols();
  std::vector<double> nrm(static_cast<std::size_t>(S));
  for (Eigen::Index s = 0; s < S; ++s) nrm[static_cast<std::size_t>(s)] = rows ? M.row(s).cwiseAbs().sum() : M.col(s).cwiseAbs().sum();
  std::vector<Eigen::Index> idx(static_cast<std::size_t>(S));
  std::iota(idx.begin(), idx.end(), Eigen::Index{0});
  std::stable_sort(idx.begin(), idx.end(), [&](Eigen::Index a, Eigen::Index b) {
    return nrm[static_cast<std::size_t>(a)] > nrm[static_cast<std::size_t>(b)];
  });
  idx.resize(static_cast<std::size_t>(k));
  std::sort(idx.begin(), idx.end());
  return idx;
}

std::int64_t k_of(double fraction, std::int64_t S) {
  return std::min<std::int64_t>(S, std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(fraction * static_cast<double>(S)))));
}

/// fp64 reference of Dion2 (nor = false) or NorDion2 (nor = true) over problem pb.
dion_test::MuonRefResult dion2_ref(const dion_test::Problem& pb, int steps, const dion::Options& o, bool nor,
                                   bool round_bf16 = false) {
  dion_test::MuonRefResult res;
  for (std::size_t i = 0; i < pb.params.size(); ++i) {
    const auto L = dion_test::layout_of(pb.params[i].shape);
    const bool rows = nor || L.rows <= L.cols;
    const std::int64_t k = k_of(o.fraction, rows ? L.rows : L.cols);
    const double alr = o.lr * dion_test::adjust_factor(o.adjust_lr, static_cast<double>(L.rows), static_cast<double>(L.cols));
    const double decay = nor ? o.mu : o.ef_decay;
    std::vector<double> xo, mo, vo;
    for (std::int64_t b = 0; b < L.batch; ++b) {
      const std::int64_t off = b * L.rows * L.cols;
      MatD X = dion_test::to_matd(pb.init[i], L.rows, L.cols, off);
      MatD M = MatD::Zero(L.rows, L.cols);
      Eigen::VectorXd V = Eigen::VectorXd::Zero(L.rows);
      for (int s = 0; s < steps; ++s) {
        M += dion_test::to_matd(pb.grads[static_cast<std::size_t>(s)][i], L.rows, L.cols, off);
        const auto idx = topk(M, rows, k);
        MatD U(rows ? k : L.rows, rows ? L.cols : k);
        for (std::int64_t t = 0; t < k; ++t) {
          if (rows) {
            U.row(t) = M.row(idx[static_cast<std::size_t>(t)]);
            M.row(idx[static_cast<std::size_t>(t)]) *= decay;
          } else {
            U.col(t) = M.col(idx[static_cast<std::size_t>(t)]);
            M.col(idx[static_cast<std::size_t>(t)]) *= decay;
          }
        }
        if (round_bf16) U = U.unaryExpr([](double v) { return static_cast<double>(dion::round_bf16(static_cast<float>(v))); });
        MatD O = dion_test::ortho_ref(U, o.orthogonalizer, o.epsilon);
        if (nor) {
          Eigen::VectorXd Vs(k);
          for (std::int64_t t = 0; t < k; ++t) Vs(t) = V(idx[static_cast<std::size_t>(t)]);
          O = dion_test::normuon_normalize_ref(O, Vs, o.muon_beta2);
          for (std::int64_t t = 0; t < k; ++t) V(idx[static_cast<std::size_t>(t)]) = Vs(t);
        }
        X *= (1.0 - static_cast<double>(o.lr) * o.weight_decay);
        for (std::int64_t t = 0; t < k; ++t) {
          if (rows) X.row(idx[static_cast<std::size_t>(t)]) -= alr * O.row(t);
          else X.col(idx[static_cast<std::size_t>(t)]) -= alr * O.col(t);
        }
      }
      const auto xv = dion_test::to_vec(X), mv = dion_test::to_vec(M);
      xo.insert(xo.end(), xv.begin(), xv.end());
      mo.insert(mo.end(), mv.begin(), mv.end());
      for (Eigen::Index r = 0; r < V.size(); ++r) vo.push_back(V(r));
    }
    res.params.push_back(xo);
    res.momentum.push_back(mo);
    res.variance.push_back(vo);
  }
  return res;
}

dion_test::Problem shapes(int steps, std::uint32_t seed) {
  return dion_test::make_problem(
      {{"rows", {32, 128}}, {"cols", {128, 32}}, {"square", {48, 48}}, {"batched", {2, 16, 40}}, {"tall3d", {2, 40, 16}}},
      steps, seed);
}

/// Which row (or column) slices of a matrix differ between a and b.
std::set<std::int64_t> changed_slices(const std::vector<float>& a, const std::vector<float>& b, std::int64_t rows,
                                      std::int64_t cols, bool by_row) {
  std::set<std::int64_t> s;
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < cols; ++j)
      if (a[static_cast<std::size_t>(i * cols + j)] != b[static_cast<std::size_t>(i * cols + j)]) s.insert(by_row ? i : j);
  return s;
}

}  // namespace

TEMPLATE_TEST_CASE("dion2: fp32 orthogonalization matches an fp64 reference of SPEC 1.3", "[dion2]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const double fraction = GENERATE(0.1, 0.25, 0.5, 1.0);
  const float ef = GENERATE(0.0f, 0.5f, 0.95f, 1.0f);
  const AdjustLr adjust = GENERATE(AdjustLr::spectral_norm, AdjustLr::rms_norm);
  INFO("fraction " << fraction << ", ef_decay " << ef << ", adjust_lr " << dion::adjust_lr_name(adjust));
  dion::Options o;
  o.lr = 0.02f;
  o.weight_decay = 0.1f;
  o.fraction = fraction;
  o.ef_decay = ef;
  o.adjust_lr = adjust;
  const int steps = 3;
  const auto pb = shapes(steps, 51);
  const auto got =
      dion_test::run_problem<dion::Dion2<TestType, dion::SingleProcess, dion::precision::Fp32>>(env, o, pb, steps);
  const auto ref = dion2_ref(pb, steps, o, false);
  for (std::size_t i = 0; i < pb.params.size(); ++i) {
    INFO("parameter " << pb.params[i].name);
    const double err = dion_test::update_rel_err(got.params[i], ref.params[i], pb.init[i]);
    INFO("update error " << err);
    CHECK(err < 1e-4);
    CHECK(dion_test::rel_err(got.state.at(pb.params[i].name + "/momentum"), ref.momentum[i]) < 1e-6);
  }
}

TEMPLATE_TEST_CASE("nordion2: fp32 orthogonalization matches an fp64 reference of SPEC 1.4", "[nordion2]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const double fraction = GENERATE(0.25, 0.5, 1.0);
  const float mu = GENERATE(0.95f, 0.5f);
  const float beta2 = GENERATE(0.95f, 0.5f);
  INFO("fraction " << fraction << ", mu " << mu << ", muon_beta2 " << beta2);
  dion::Options o;
  o.lr = 0.02f;
  o.weight_decay = 0.1f;
  o.fraction = fraction;
  o.mu = mu;
  o.muon_beta2 = beta2;
  const int steps = 3;
  const auto pb = shapes(steps, 52);
  const auto got =
      dion_test::run_problem<dion::NorDion2<TestType, dion::SingleProcess, dion::precision::Fp32>>(env, o, pb, steps);
  const auto ref = dion2_ref(pb, steps, o, true);
  for (std::size_t i = 0; i < pb.params.size(); ++i) {
    const std::string& n = pb.params[i].name;
    INFO("parameter " << n);
    const double err = dion_test::update_rel_err(got.params[i], ref.params[i], pb.init[i]);
    INFO("update error " << err);
    CHECK(err < 1e-4);
    CHECK(dion_test::rel_err(got.state.at(n + "/momentum"), ref.momentum[i]) < 1e-6);
    CHECK(dion_test::rel_err(got.state.at(n + "/variance_neuron"), ref.variance[i]) < 1e-4);
  }
}

TEMPLATE_TEST_CASE("dion2 / nordion2: default precision stays within bf16 tolerance of the reference", "[dion2][bf16]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  dion::Options o;
  const int steps = 3;
  const auto pb = shapes(steps, 53);
  const auto d2 = dion_test::run_problem<dion::Dion2<TestType>>(env, o, pb, steps);
  const auto r2 = dion2_ref(pb, steps, o, false, true);
  const auto n2 = dion_test::run_problem<dion::NorDion2<TestType>>(env, o, pb, steps);
  const auto rn = dion2_ref(pb, steps, o, true, true);
  for (std::size_t i = 0; i < pb.params.size(); ++i) {
    INFO("parameter " << pb.params[i].name);
    CHECK(dion_test::update_rel_err(d2.params[i], r2.params[i], pb.init[i]) < 5e-2);
    CHECK(dion_test::update_rel_err(n2.params[i], rn.params[i], pb.init[i]) < 5e-2);
    // selection and error feedback do not depend on the orthogonalization precision
    CHECK(dion_test::rel_err(d2.state.at(pb.params[i].name + "/momentum"), r2.momentum[i]) < 1e-6);
  }
}

TEMPLATE_TEST_CASE("dion2: (32,128) selects rows and (128,32) selects columns, the top-k by L1 norm",
                   "[dion2][selection]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  struct Case {
    std::int64_t m, n;
    bool rows;
  };
  const Case c = GENERATE(Case{32, 128, true}, Case{128, 32, false}, Case{40, 40, true});
  const double fraction = GENERATE(0.25, 0.5);
  INFO(c.m << "x" << c.n << ", fraction " << fraction);
  const auto x0 = dion_test::randn(static_cast<std::size_t>(c.m * c.n), 1, 0.1f);
  auto g0 = dion_test::randn(static_cast<std::size_t>(c.m * c.n), 2);
  // make the slice norms clearly distinct: scale slice s by (1 + s/S) in a shuffled order
  const std::int64_t S = c.rows ? c.m : c.n;
  std::vector<std::int64_t> perm(static_cast<std::size_t>(S));
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937 gen(3);
  std::shuffle(perm.begin(), perm.end(), gen);
  for (std::int64_t i = 0; i < c.m; ++i)
    for (std::int64_t j = 0; j < c.n; ++j)
      g0[static_cast<std::size_t>(i * c.n + j)] *= 1.0f + static_cast<float>(perm[static_cast<std::size_t>(c.rows ? i : j)]) / static_cast<float>(S);
  auto x = env.upload(x0);
  auto g = env.upload(g0);
  dion::Options o;
  o.weight_decay = 0.0f;  // unselected slices must stay bitwise unchanged
  o.fraction = fraction;
  o.ef_decay = 0.5f;
  dion::Dion2<TestType> opt{env.backend(), o};
  opt.add_group().add("w", env.view(x, {c.m, c.n}), env.view(g, {c.m, c.n}));
  opt.step();
  const auto x1 = env.download(x);
  const std::int64_t k = k_of(fraction, S);
  const auto changed = changed_slices(x0, x1, c.m, c.n, c.rows);
  const auto other = changed_slices(x0, x1, c.m, c.n, !c.rows);
  CHECK(static_cast<std::int64_t>(changed.size()) == k);
  CHECK(static_cast<std::int64_t>(other.size()) == (c.rows ? c.n : c.m));  // selected slices change entirely
  const auto expect = topk(dion_test::to_matd(g0, c.m, c.n), c.rows, k);
  CHECK(std::vector<std::int64_t>(changed.begin(), changed.end()) == std::vector<std::int64_t>(expect.begin(), expect.end()));
  // error feedback: selected slices of M decayed by ef_decay, the others hold G exactly
  const auto M = opt.read_state("w/momentum");
  for (std::int64_t i = 0; i < c.m; ++i)
    for (std::int64_t j = 0; j < c.n; ++j) {
      const std::size_t e = static_cast<std::size_t>(i * c.n + j);
      const bool sel = changed.count(c.rows ? i : j) > 0;
      REQUIRE(M[e] == (sel ? 0.5f * g0[e] : g0[e]));
    }
}

TEMPLATE_TEST_CASE("nordion2: always selects rows (whole neurons), even for tall matrices", "[nordion2][selection]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const std::int64_t m = 128, n = 32;
  const auto x0 = dion_test::randn(static_cast<std::size_t>(m * n), 1, 0.1f);
  auto x = env.upload(x0);
  auto g = env.upload(dion_test::randn(static_cast<std::size_t>(m * n), 2));
  dion::Options o;
  o.weight_decay = 0.0f;
  o.fraction = 0.25;
  dion::NorDion2<TestType> opt{env.backend(), o};
  opt.add_group().add("w", env.view(x, {m, n}), env.view(g, {m, n}));
  opt.step();
  const auto x1 = env.download(x);
  CHECK(changed_slices(x0, x1, m, n, true).size() == 32u);  // ceil(0.25·128) rows
  CHECK(changed_slices(x0, x1, m, n, false).size() == static_cast<std::size_t>(n));
  // V changes exactly on the selected rows
  const auto V = opt.read_state("w/variance_neuron");
  const auto rows = changed_slices(x0, x1, m, n, true);
  for (std::int64_t i = 0; i < m; ++i) CHECK((V[static_cast<std::size_t>(i)] != 0.0f) == (rows.count(i) > 0));
}

TEMPLATE_TEST_CASE("nordion2: with fraction 1.0 every variance entry changes between steps 1 and 2",
                   "[nordion2][state]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const auto pb = dion_test::make_problem({{"w", {64, 128}}}, 2, 61);
  auto x = env.upload(pb.init[0]);
  auto g = env.upload(pb.grads[0][0]);
  dion::Options o;
  o.fraction = 1.0;
  dion::NorDion2<TestType> opt{env.backend(), o};
  opt.add_group().add("w", env.view(x, {64, 128}), env.view(g, {64, 128}));
  opt.step();
  const auto v1 = opt.read_state("w/variance_neuron");
  env.write(g, pb.grads[1][0]);
  opt.step();
  const auto v2 = opt.read_state("w/variance_neuron");
  REQUIRE(v1.size() == 64u);
  for (std::size_t i = 0; i < v1.size(); ++i) CHECK(v1[i] != v2[i]);
}

TEST_CASE("dion2: k = max(1, ceil(fraction * S)) in double precision (SPEC 1.3)", "[dion2][selection]") {
  CHECK(k_of(0.07, 100) == 8);  // 0.07·100 = 7.000000000000001
  CHECK(k_of(0.25, 17) == 5);
  CHECK(k_of(1e-9, 64) == 1);
  CHECK(k_of(1.0, 64) == 64);
  // the optimizer uses the same rule: 0.07 of 100 rows updates 8 rows
  dion::EigenBackend be;
  std::vector<float> x(100 * 120), g = dion_test::randn(100 * 120, 9);
  const auto x0 = x;
  dion::Options o;
  o.fraction = 0.07;
  o.weight_decay = 0.0f;
  dion::Dion2<dion::EigenBackend> opt{be, o};
  opt.add_group().add("w", dion::host_view(x.data(), {100, 120}), dion::host_view(g.data(), {100, 120}));
  opt.step();
  CHECK(changed_slices(x0, x, 100, 120, true).size() == 8u);
}

TEMPLATE_TEST_CASE("dion2 / nordion2: an all-zero gradient gives no NaN and no update", "[dion2][robustness]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const auto x0 = dion_test::randn(32 * 48, 8, 0.1f);
  auto x = env.upload(x0);
  auto x2 = env.upload(x0);
  auto g = env.template alloc<float>(32 * 48);
  auto g2 = env.template alloc<float>(32 * 48);
  dion::Options o;
  o.weight_decay = 0.0f;
  dion::Dion2<TestType> a{env.backend(), o};
  a.add_group().add("w", env.view(x, {32, 48}), env.view(g, {32, 48}));
  dion::NorDion2<TestType> b{env.backend(), o};
  b.add_group().add("w", env.view(x2, {32, 48}), env.view(g2, {32, 48}));
  for (int k = 0; k < 3; ++k) {
    a.step();
    b.step();
  }
  CHECK(dion_test::bits_equal(env.download(x), x0));
  CHECK(dion_test::bits_equal(env.download(x2), x0));
  for (float v : b.read_state("w/variance_neuron")) CHECK(v == 0.0f);
}

TEST_CASE("nordion2: Dion3 is NorDion2 (microsoft/dion alias)", "[nordion2]") {
  static_assert(std::is_same_v<dion::Dion3<dion::EigenBackend>, dion::NorDion2<dion::EigenBackend>>);
  CHECK(dion::parse_algorithm("dion3") == dion::Algorithm::nordion2);
  CHECK(dion::parse_algorithm("nordion2") == dion::Algorithm::nordion2);
  CHECK(std::string(dion::algorithm_name(dion::Algorithm::nordion2)) == "nordion2");
  dion::EigenBackend be;
  dion::Dion3<dion::EigenBackend> opt{be};
  CHECK(opt.add_group().index() == 0);
  CHECK(opt.algorithm(0) == dion::Algorithm::nordion2);
}
