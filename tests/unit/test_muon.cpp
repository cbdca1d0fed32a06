// Muon (SPEC §1.1): the optimizer against an fp64 re-implementation of the spec for every
// nesterov / cautious_wd / adjust_lr / orthogonalizer combination, in fp32 orthogonalization (tight)
// and the default bf16 orthogonalization (loose); hand-computed cautious weight decay; decoupled
// decay with the base lr; the adjust_lr factors of SPEC §0.1 / §6.3.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "backend_env.hpp"
#include "catch_compat.hpp"
#include "test_util.hpp"

using dion::AdjustLr;
using dion::Orthogonalizer;

namespace {

dion_test::Problem mixed_shapes(int steps, std::uint32_t seed) {
  return dion_test::make_problem({{"w_tall", {64, 32}}, {"w_wide", {32, 64}}, {"w_sq", {48, 48}},
                                  {"w_3d", {3, 16, 24}}, {"w_tall2", {64, 32}}},
                                 steps, seed);
}

const char* adjust_name(AdjustLr a) { return dion::adjust_lr_name(a); }

}  // namespace

TEMPLATE_TEST_CASE("muon: fp32 orthogonalization matches an fp64 reference of SPEC 1.1", "[muon]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const bool nesterov = GENERATE(false, true);
  const bool cautious = GENERATE(false, true);
  const AdjustLr adjust = GENERATE(AdjustLr::spectral_norm, AdjustLr::rms_norm, AdjustLr::none);
  const Orthogonalizer kind =
      GENERATE(Orthogonalizer::polar_express, Orthogonalizer::newton_schulz, Orthogonalizer::newton_schulz_const);
  INFO("nesterov " << nesterov << ", cautious_wd " << cautious << ", adjust_lr " << adjust_name(adjust) << ", "
                   << dion::orthogonalizer_name(kind));
  dion::Options o;
  o.lr = 0.02f;
  o.mu = 0.9f;
  o.weight_decay = 0.1f;
  o.nesterov = nesterov;
  o.cautious_wd = cautious;
  o.adjust_lr = adjust;
  o.orthogonalizer = kind;
  const int steps = 3;
  const auto pb = mixed_shapes(steps, 11);
  const auto got =
      dion_test::run_problem<dion::Muon<TestType, dion::SingleProcess, dion::precision::Fp32>>(env, o, pb, steps);
  const auto ref = dion_test::muon_family_ref(pb, steps, o, /*normuon=*/false);
  for (std::size_t i = 0; i < pb.params.size(); ++i) {
    INFO("parameter " << pb.params[i].name);
    const double err = dion_test::update_rel_err(got.params[i], ref.params[i], pb.init[i]);
    INFO("update error " << err);
    CHECK(err < 1e-4);
    CHECK(dion_test::rel_err(got.state.at(pb.params[i].name + "/momentum"), ref.momentum[i]) < 1e-6);
  }
}

TEMPLATE_TEST_CASE("muon: default precision (bf16 orthogonalization) stays within bf16 tolerance of the reference",
                   "[muon][bf16]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const bool nesterov = GENERATE(false, true);
  dion::Options o;
  o.nesterov = nesterov;
  const int steps = 3;
  const auto pb = mixed_shapes(steps, 12);
  const auto got = dion_test::run_problem<dion::Muon<TestType>>(env, o, pb, steps);
  const auto ref = dion_test::muon_family_ref(pb, steps, o, false, /*round_input_bf16=*/true);
  for (std::size_t i = 0; i < pb.params.size(); ++i) {
    INFO("parameter " << pb.params[i].name);
    const double err = dion_test::update_rel_err(got.params[i], ref.params[i], pb.init[i]);
    INFO("update error " << err);
    CHECK(err < 3e-2);
    CHECK(err > 0.0);  // bf16 really is used: not bit-identical to fp64
    // the momentum does not go through bf16
    CHECK(dion_test::rel_err(got.state.at(pb.params[i].name + "/momentum"), ref.momentum[i]) < 1e-6);
  }
}

TEMPLATE_TEST_CASE("muon: cautious weight decay, hand-computed on a 1x4 parameter", "[muon][cautious_wd]",
                   DION_TEST_BACKENDS) {
  // For a 1×n matrix the orthogonalized update is c·G/‖G‖ with c > 0 (Polar Express maps the single
  // singular value 1/1.02 to c), so the cautious mask [X⊙O ≥ 0] is [X⊙G ≥ 0]:
  // X = [1, 1, -1, -1], G = [2, -2, 2, -2] → mask [1, 0, 0, 1] (SPEC §5.2's spot check).
  dion_test::BackendEnv<TestType> env;
  const std::vector<float> x0{1.0f, 1.0f, -1.0f, -1.0f}, g{2.0f, -2.0f, 2.0f, -2.0f};
  const bool cautious = GENERATE(false, true);
  auto x = env.upload(x0);
  auto gb = env.upload(g);
  dion::Options o;
  o.lr = 0.1f;
  o.weight_decay = 0.5f;
  o.cautious_wd = cautious;
  dion::Muon<TestType, dion::SingleProcess, dion::precision::Fp32> opt{env.backend(), o};
  opt.add_group().add("w", env.view(x, {1, 4}), env.view(gb, {1, 4}));
  opt.step();
  const auto got = env.download(x);
  // c from the fp64 oracle: the same iteration on the normalized row
  const auto O = dion_test::ortho_ref(dion_test::to_matd(g, 1, 4), Orthogonalizer::polar_express);
  const double c = O(0, 0) / 0.5;  // G/‖G‖ = ±0.5
  REQUIRE(c > 0.8);
  REQUIRE(c < 1.0);
  const double s = std::sqrt(1.0 / 4.0);  // spectral_norm factor of a 1×4 matrix
  const double mask[4] = {1, cautious ? 0.0 : 1.0, cautious ? 0.0 : 1.0, 1};
  for (int j = 0; j < 4; ++j) {
    const double o_j = c * g[static_cast<std::size_t>(j)] / 4.0;
    const double expect = x0[static_cast<std::size_t>(j)] - 0.1 * 0.5 * x0[static_cast<std::size_t>(j)] * mask[j] -
                          0.1 * s * o_j;
    INFO("element " << j);
    CHECK(std::fabs(got[static_cast<std::size_t>(j)] - expect) < 1e-6);
  }
}

TEMPLATE_TEST_CASE("muon: weight decay is decoupled and uses the base lr, not the adjusted lr", "[muon]",
                   DION_TEST_BACKENDS) {
  // G = 0: the orthogonalized update is 0, only the decay X ← X·(1 − lr·wd) remains, whatever the
  // adjust_lr factor (here rms_norm: 0.2·sqrt(64) = 1.6).
  dion_test::BackendEnv<TestType> env;
  const auto x0 = dion_test::randn(64 * 16, 3);
  auto x = env.upload(x0);
  auto g = env.template alloc<float>(64 * 16);
  dion::Options o;
  o.lr = 0.1f;
  o.weight_decay = 0.5f;
  o.adjust_lr = AdjustLr::rms_norm;
  dion::Muon<TestType> opt{env.backend(), o};
  opt.add_group().add("w", env.view(x, {64, 16}), env.view(g, {64, 16}));
  opt.step();
  const auto got = env.download(x);
  REQUIRE(dion_test::all_finite(got));
  for (std::size_t i = 0; i < got.size(); ++i) CHECK(std::fabs(got[i] - x0[i] * 0.95) <= 1e-7 * std::fabs(x0[i]) + 1e-12);
}

TEMPLATE_TEST_CASE("muon: lr = 0 leaves the parameters bitwise unchanged while momentum accumulates", "[muon]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const auto pb = dion_test::make_problem({{"a", {40, 24}}, {"b", {2, 24, 40}}}, 2, 5);
  dion::Options o;
  o.lr = 0.0f;
  o.weight_decay = 0.3f;
  const auto got = dion_test::run_problem<dion::Muon<TestType>>(env, o, pb, 2);
  for (std::size_t i = 0; i < pb.params.size(); ++i) {
    CHECK(dion_test::bits_equal(got.params[i], pb.init[i]));
    const auto& m = got.state.at(pb.params[i].name + "/momentum");
    // M = mu·G0 + G1
    for (std::size_t e = 0; e < m.size(); e += 97)
      CHECK(m[e] == Approx(0.95f * pb.grads[0][i][e] + pb.grads[1][i][e]).margin(1e-6));
  }
}

TEST_CASE("muon: adjust_lr factors of SPEC 0.1 (768x768, 3072x768, 768x3072)", "[muon][adjust_lr]") {
  using dion::detail::adjust_lr_factor;
  CHECK(adjust_lr_factor(AdjustLr::spectral_norm, 768, 768) == Approx(1.0));
  CHECK(adjust_lr_factor(AdjustLr::spectral_norm, 3072, 768) == Approx(2.0));
  CHECK(adjust_lr_factor(AdjustLr::spectral_norm, 768, 3072) == Approx(0.5));
  CHECK(adjust_lr_factor(AdjustLr::rms_norm, 768, 768) == Approx(5.5426).epsilon(1e-4));
  CHECK(adjust_lr_factor(AdjustLr::rms_norm, 3072, 768) == Approx(11.0851).epsilon(1e-4));
  CHECK(adjust_lr_factor(AdjustLr::rms_norm, 768, 3072) == Approx(11.0851).epsilon(1e-4));
  CHECK(adjust_lr_factor(AdjustLr::none, 3072, 768) == 1.0f);
}

TEMPLATE_TEST_CASE("muon: a 3-D parameter is a batch of independent matrices", "[muon][3d]", DION_TEST_BACKENDS) {
  // (3, 16, 24) stepped as one 3-D parameter equals three (16, 24) parameters, bitwise
  dion_test::BackendEnv<TestType> env;
  const int steps = 3;
  const auto pb3 = dion_test::make_problem({{"w", {3, 16, 24}}}, steps, 21);
  dion_test::Problem pb2;
  for (int b = 0; b < 3; ++b) {
    pb2.params.push_back({dion_test::indexed("w", b), {16, 24}});
    pb2.init.emplace_back(pb3.init[0].begin() + b * 384, pb3.init[0].begin() + (b + 1) * 384);
  }
  pb2.grads.resize(steps);
  for (int k = 0; k < steps; ++k)
    for (int b = 0; b < 3; ++b)
      pb2.grads[static_cast<std::size_t>(k)].emplace_back(pb3.grads[static_cast<std::size_t>(k)][0].begin() + b * 384,
                                                          pb3.grads[static_cast<std::size_t>(k)][0].begin() + (b + 1) * 384);
  dion::Options o;
  o.nesterov = true;
  const auto r3 = dion_test::run_problem<dion::Muon<TestType>>(env, o, pb3, steps);
  const auto r2 = dion_test::run_problem<dion::Muon<TestType>>(env, o, pb2, steps);
  for (int b = 0; b < 3; ++b) {
    INFO("matrix " << b);
    CHECK(dion_test::bits_equal(r2.params[static_cast<std::size_t>(b)],
                                std::vector<float>(r3.params[0].begin() + b * 384, r3.params[0].begin() + (b + 1) * 384)));
  }
}

TEMPLATE_TEST_CASE("muon: a 4-D parameter is a batch over its leading dims; flatten uses (d0, d1*d2*d3)",
                   "[muon][3d][flatten]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const auto pb4 = dion_test::make_problem({{"w", {2, 3, 8, 12}}}, 2, 23);
  dion_test::Problem pb3 = pb4, pb2 = pb4;
  pb3.params[0].shape = dion::Shape{6, 8, 12};
  pb2.params[0].shape = dion::Shape{2, 288};
  const auto r4 = dion_test::run_problem<dion::Muon<TestType>>(env, {}, pb4, 2);
  const auto r3 = dion_test::run_problem<dion::Muon<TestType>>(env, {}, pb3, 2);
  CHECK(dion_test::bits_equal(r4.params[0], r3.params[0]));
  const auto f4 = dion_test::run_problem<dion::Muon<TestType>>(env, {.flatten = true}, pb4, 2);
  const auto r2 = dion_test::run_problem<dion::Muon<TestType>>(env, {}, pb2, 2);
  CHECK(dion_test::bits_equal(f4.params[0], r2.params[0]));
  CHECK(dion_test::max_abs_diff(f4.params[0], r4.params[0]) > 1e-4);
}

TEMPLATE_TEST_CASE("muon / normuon: group epsilon, orthogonalizer and ns_steps overrides reach the orthogonalizer",
                   "[muon][normuon][groups]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const int steps = 2;
  const auto pb = dion_test::make_problem({{"a", {32, 48}}, {"b", {48, 32}}}, steps, 24);
  struct Variant {
    const char* name;
    dion::GroupOptions g;
  };
  for (const auto& v : {Variant{"epsilon 20 (comparable to the norm ~39)", {.epsilon = 20.0f}},
                        Variant{"constant NS, 3 steps", {.orthogonalizer = Orthogonalizer::newton_schulz_const, .ns_steps = 3}},
                        Variant{"classic NS", {.orthogonalizer = Orthogonalizer::newton_schulz}}}) {
    for (const bool nor : {false, true}) {
      INFO(v.name << (nor ? ", normuon" : ", muon"));
      dion::Options ref_o;
      if (v.g.epsilon) ref_o.epsilon = *v.g.epsilon;
      if (v.g.orthogonalizer) ref_o.orthogonalizer = *v.g.orthogonalizer;
      if (v.g.ns_steps) ref_o.ns_steps = *v.g.ns_steps;
      const auto got =
          nor ? dion_test::run_problem<dion::NorMuon<TestType, dion::SingleProcess, dion::precision::Fp32>>(env, {}, pb, steps, v.g)
              : dion_test::run_problem<dion::Muon<TestType, dion::SingleProcess, dion::precision::Fp32>>(env, {}, pb, steps, v.g);
      const auto ref = dion_test::muon_family_ref(pb, steps, ref_o, nor);
      const auto dflt = dion_test::muon_family_ref(pb, steps, dion::Options{}, nor);
      for (std::size_t i = 0; i < pb.params.size(); ++i) {
        CHECK(dion_test::update_rel_err(got.params[i], ref.params[i], pb.init[i]) < 1e-4);
        CHECK(dion_test::update_rel_err(got.params[i], dflt.params[i], pb.init[i]) > 1e-3);
      }
    }
  }
}
