// NorMuon (SPEC §1.2): against an fp64 re-implementation of the spec (per-neuron variance EMA,
// normalization by sqrt(V) + 1e-8, Frobenius-preserving rescale, then Muon's decay and update) for
// nesterov / cautious_wd / adjust_lr / muon_beta2; the variance_neuron state; the all-zero-gradient
// NaN regression (microsoft/dion 2971bba, RELIABILITY N1).
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "backend_env.hpp"
#include "catch_compat.hpp"
#include "test_util.hpp"

using dion::AdjustLr;

namespace {
dion_test::Problem shapes(int steps, std::uint32_t seed) {
  return dion_test::make_problem({{"w_tall", {64, 32}}, {"w_wide", {32, 64}}, {"w_sq", {48, 48}}, {"w_3d", {2, 24, 16}}},
                                 steps, seed);
}
}  // namespace

TEMPLATE_TEST_CASE("normuon: fp32 orthogonalization matches an fp64 reference of SPEC 1.2", "[normuon]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const bool nesterov = GENERATE(false, true);
  const bool cautious = GENERATE(false, true);
  const AdjustLr adjust = GENERATE(AdjustLr::spectral_norm, AdjustLr::rms_norm, AdjustLr::none);
  const float beta2 = GENERATE(0.95f, 0.5f);
  INFO("nesterov " << nesterov << ", cautious_wd " << cautious << ", adjust_lr " << dion::adjust_lr_name(adjust)
                   << ", muon_beta2 " << beta2);
  dion::Options o;
  o.lr = 0.02f;
  o.weight_decay = 0.05f;
  o.nesterov = nesterov;
  o.cautious_wd = cautious;
  o.adjust_lr = adjust;
  o.muon_beta2 = beta2;
  const int steps = 3;
  const auto pb = shapes(steps, 31);
  const auto got =
      dion_test::run_problem<dion::NorMuon<TestType, dion::SingleProcess, dion::precision::Fp32>>(env, o, pb, steps);
  const auto ref = dion_test::muon_family_ref(pb, steps, o, /*normuon=*/true);
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

TEMPLATE_TEST_CASE("normuon: default precision stays within bf16 tolerance of the reference", "[normuon][bf16]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  dion::Options o;
  const int steps = 3;
  const auto pb = shapes(steps, 32);
  const auto got = dion_test::run_problem<dion::NorMuon<TestType>>(env, o, pb, steps);
  const auto ref = dion_test::muon_family_ref(pb, steps, o, true, /*round_input_bf16=*/true);
  for (std::size_t i = 0; i < pb.params.size(); ++i) {
    INFO("parameter " << pb.params[i].name);
    CHECK(dion_test::update_rel_err(got.params[i], ref.params[i], pb.init[i]) < 3e-2);
    CHECK(dion_test::rel_err(got.state.at(pb.params[i].name + "/variance_neuron"), ref.variance[i]) < 5e-2);
  }
}

TEMPLATE_TEST_CASE("normuon: variance_neuron is (m, 1) per matrix and holds the EMA of row mean squares",
                   "[normuon][state]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  auto x = env.upload(dion_test::randn(64 * 128, 1, 0.1f));
  auto g = env.upload(dion_test::randn(64 * 128, 2));
  auto x3 = env.upload(dion_test::randn(3 * 16 * 8, 3, 0.1f));
  auto g3 = env.upload(dion_test::randn(3 * 16 * 8, 4));
  dion::Options o;
  o.muon_beta2 = 0.9f;
  dion::NorMuon<TestType, dion::SingleProcess, dion::precision::Fp32> opt{env.backend(), o};
  opt.add_group().add("w", env.view(x, {64, 128}), env.view(g, {64, 128})).add("w3", env.view(x3, {3, 16, 8}),
                                                                                env.view(g3, {3, 16, 8}));
  const auto v = opt.state("w/variance_neuron");
  REQUIRE(v.view.shape == dion::Shape{64, 1});
  REQUIRE(opt.state("w3/variance_neuron").view.shape == dion::Shape{3, 16, 1});
  for (float e : opt.read_state("w/variance_neuron")) CHECK(e == 0.0f);
  opt.step();
  // one step from V = 0: V = (1 − β2)·mean_j O_ij², O the orthogonalized momentum (= G)
  const auto V = opt.read_state("w/variance_neuron");
  const auto O = dion_test::ortho_ref(dion_test::to_matd(env.download(g), 64, 128), dion::Orthogonalizer::polar_express);
  for (int i = 0; i < 64; ++i) {
    const double r = O.row(i).squaredNorm() / 128.0;
    CHECK(V[static_cast<std::size_t>(i)] == Approx(0.1 * r).epsilon(1e-4));
  }
}

TEMPLATE_TEST_CASE("normuon: an all-zero gradient gives no NaN and no update (RELIABILITY N1)", "[normuon][robustness]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const auto x0 = dion_test::randn(32 * 48, 8, 0.1f);
  auto x = env.upload(x0);
  auto g = env.template alloc<float>(32 * 48);  // zeros
  dion::Options o;
  o.weight_decay = 0.0f;
  dion::NorMuon<TestType> opt{env.backend(), o};
  opt.add_group().add("w", env.view(x, {32, 48}), env.view(g, {32, 48}));
  for (int k = 0; k < 3; ++k) opt.step();
  const auto got = env.download(x);
  CHECK(dion_test::bits_equal(got, x0));
  for (float v : opt.read_state("w/variance_neuron")) CHECK(v == 0.0f);
  for (float m : opt.read_state("w/momentum")) CHECK(m == 0.0f);
  CHECK_FALSE(opt.last_step_skipped());
}
