// Lion and AdamW (SPEC §1.8; RELIABILITY N2, N14, N17): hand-computed values (SPEC §5.2's cautious
// weight decay spot check, bias correction at step 1, sign(0) = 0), multi-step agreement with an
// fp64 reference, the fp32 step counter past 256 (also with bf16 parameters), zero gradients, and
// the scalar groups inside the matrix optimizers.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "backend_env.hpp"
#include "catch_compat.hpp"
#include "test_util.hpp"

using dion::Algorithm;

namespace {

/// fp64 state of a scalar optimizer run.
struct Ref {
  std::vector<double> x, m, v;
};

/// fp64 AdamW (torch fused semantics, SPEC §1.8) from step t0 (0 = fresh) over `grads`.
Ref adamw_ref(const std::vector<double>& x0, const std::vector<std::vector<float>>& grads, double lr, double wd,
              double b1, double b2, double eps, bool cautious, int t0 = 0) {
  Ref r{x0, std::vector<double>(x0.size(), 0.0), std::vector<double>(x0.size(), 0.0)};
  int t = t0;
  for (const auto& g : grads) {
    ++t;
    const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
    for (std::size_t i = 0; i < r.x.size(); ++i) {
      r.m[i] = b1 * r.m[i] + (1 - b1) * g[i];
      r.v[i] = b2 * r.v[i] + (1 - b2) * static_cast<double>(g[i]) * g[i];
      const double decay = (!cautious || r.m[i] * r.x[i] >= 0) ? lr * wd * r.x[i] : 0.0;
      r.x[i] = r.x[i] - decay - (lr / bc1) * r.m[i] / (std::sqrt(r.v[i]) / std::sqrt(bc2) + eps);
    }
  }
  return r;
}

/// fp64 Lion.
Ref lion_ref(const std::vector<double>& x0, const std::vector<std::vector<float>>& grads, double lr, double wd,
             double b1, double b2, bool cautious) {
  Ref r{x0, std::vector<double>(x0.size(), 0.0), {}};
  for (const auto& g : grads)
    for (std::size_t i = 0; i < r.x.size(); ++i) {
      const double c = b1 * r.m[i] + (1 - b1) * g[i];
      const double u = c > 0 ? 1.0 : (c < 0 ? -1.0 : 0.0);
      r.m[i] = b2 * r.m[i] + (1 - b2) * g[i];
      const double decay = (!cautious || r.x[i] * u >= 0) ? lr * wd * r.x[i] : 0.0;
      r.x[i] = r.x[i] - decay - lr * u;
    }
  return r;
}

std::vector<double> to_d(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

}  // namespace

TEMPLATE_TEST_CASE("adamw: cautious weight decay spot check of SPEC 5.2 (mask [1,0,0,1])", "[adamw][cautious_wd]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const bool cautious = GENERATE(true, false);
  const bool inside_muon = GENERATE(false, true);  // the AdamW optimizer, or an adamw group of Muon
  INFO("cautious " << cautious << ", inside Muon " << inside_muon);
  auto x = env.upload(std::vector<float>{1.0f, 1.0f, -1.0f, -1.0f});
  auto g = env.upload(std::vector<float>{2.0f, -2.0f, 2.0f, -2.0f});
  dion::Options o;
  o.lr = 0.1f;
  o.weight_decay = 0.5f;
  o.beta1 = 0.9f;
  o.beta2 = 0.999f;
  o.epsilon = 1e-8f;
  o.cautious_wd = cautious;
  if (inside_muon) {
    dion::Muon<TestType> opt{env.backend(), o};
    opt.add_group({.algorithm = Algorithm::adamw}).add("b", env.view(x, {4}), env.view(g, {4}));
    opt.step();
  } else {
    dion::AdamW<TestType> opt{env.backend(), o};
    opt.add_group().add("b", env.view(x, {4}), env.view(g, {4}));
    opt.step();
  }
  const auto got = env.download(x);
  // step 1: m = 0.1·g, v = 0.001·g², bias-corrected step = lr·g/(|g| + eps) = ±0.1
  const std::vector<double> expect = cautious ? std::vector<double>{0.85, 1.1, -1.1, -0.85}
                                              : std::vector<double>{0.85, 1.05, -1.05, -0.85};
  for (std::size_t i = 0; i < 4; ++i) {
    INFO("element " << i);
    CHECK(std::fabs(got[i] - expect[i]) < 1e-6);
  }
}

TEMPLATE_TEST_CASE("adamw: bias correction makes the first step lr-sized for any betas", "[adamw]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const float b1 = GENERATE(0.5f, 0.9f), b2 = GENERATE(0.9f, 0.999f);
  const auto x0 = dion_test::randn(37, 1);
  const auto g0 = dion_test::randn(37, 2);
  auto x = env.upload(x0);
  auto g = env.upload(g0);
  dion::Options o;
  o.lr = 0.01f;
  o.weight_decay = 0.0f;
  o.beta1 = b1;
  o.beta2 = b2;
  dion::AdamW<TestType> opt{env.backend(), o};
  opt.add_group().add("p", env.view(x, {37}), env.view(g, {37}));
  opt.step();
  const auto got = env.download(x);
  for (std::size_t i = 0; i < got.size(); ++i)
    CHECK(got[i] == Approx(x0[i] - 0.01 * g0[i] / (std::fabs(g0[i]) + 1e-8)).margin(2e-7));
  CHECK(opt.read_state("p/step_dev") == std::vector<float>{1.0f});
}

TEMPLATE_TEST_CASE("adamw: five steps match an fp64 reference", "[adamw]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const bool cautious = GENERATE(false, true);
  const auto x0 = dion_test::randn(128, 3);
  std::vector<std::vector<float>> grads;
  for (int k = 0; k < 5; ++k) grads.push_back(dion_test::randn(128, 10u + static_cast<std::uint32_t>(k)));
  auto x = env.upload(x0);
  auto g = env.template alloc<float>(128);
  dion::Options o;
  o.lr = 1e-2f;
  o.weight_decay = 0.1f;
  o.beta1 = 0.9f;
  o.beta2 = 0.999f;
  o.cautious_wd = cautious;
  dion::AdamW<TestType> opt{env.backend(), o};
  opt.add_group().add("p", env.view(x, {64, 2}), env.view(g, {64, 2}));
  for (const auto& gk : grads) {
    env.write(g, gk);
    opt.step();
  }
  // the optimizer holds its hyperparameters as floats: use the same values (0.999f ≠ 0.999)
  const auto ref = adamw_ref(to_d(x0), grads, 1e-2f, 0.1f, 0.9f, 0.999f, 1e-8f, cautious);
  const auto got = env.download(x);
  CHECK(dion_test::max_abs_diff(got, std::vector<float>(ref.x.begin(), ref.x.end())) < 1e-6);
  CHECK(dion_test::rel_err(opt.read_state("p/momentum"), ref.m) < 1e-6);
  CHECK(dion_test::rel_err(opt.read_state("p/variance"), ref.v) < 1e-6);
  CHECK(opt.read_state("p/step_dev") == std::vector<float>{5.0f});
}

TEMPLATE_TEST_CASE("adamw: the fp32 step counter keeps counting past 256, also for bf16 parameters (N14)",
                   "[adamw][bf16]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const auto x0 = dion_test::round_bf16(dion_test::randn(16, 4));
  const auto g0 = dion_test::round_bf16(dion_test::randn(16, 5));
  auto xf = env.upload(x0);
  auto gf = env.upload(g0);
  auto xb = env.upload(dion_test::to_bf16(x0));
  auto gb = env.upload(dion_test::to_bf16(g0));
  dion::Options o;
  o.lr = 0.01f;
  o.weight_decay = 0.0f;
  o.beta1 = 0.9f;
  o.beta2 = 0.999f;
  dion::AdamW<TestType> opt{env.backend(), o};
  opt.add_group().add("f", env.view(xf, {16}), env.view(gf, {16})).add("h", env.view(xb, {16}), env.view(gb, {16}));
  REQUIRE(opt.state("h/step_dev").view.dtype == dion::DType::f32);
  REQUIRE(opt.state("h/momentum").view.dtype == dion::DType::bf16);
  opt.write_state("f/step_dev", std::vector<float>{300.0f});
  opt.write_state("h/step_dev", std::vector<float>{300.0f});
  opt.step();
  CHECK(opt.read_state("f/step_dev") == std::vector<float>{301.0f});
  CHECK(opt.read_state("h/step_dev") == std::vector<float>{301.0f});  // a bf16 counter would stay at 300
  // the bias correction uses t = 301: step = lr·(0.1g/(1 − 0.9^301)) / (sqrt(0.001g²)/sqrt(1 − 0.999^301) + eps)
  const auto ref = adamw_ref(to_d(x0), {g0}, 0.01f, 0.0, 0.9f, 0.999f, 1e-8f, false, 300).x;
  const auto got = env.download(xf);
  for (std::size_t i = 0; i < got.size(); ++i) CHECK(got[i] == Approx(ref[i]).margin(1e-6));
  const auto gotb = dion_test::from_bf16(env.download(xb));
  for (std::size_t i = 0; i < gotb.size(); ++i) CHECK(gotb[i] == Approx(ref[i]).margin(1e-2));
  // the step is about 3.16·lr here (not lr): t really is 301
  CHECK(std::fabs(got[0] - x0[0]) == Approx(0.01 * 0.1 / std::sqrt(0.001) * std::sqrt(1 - std::pow(0.999, 301)) /
                                            (1 - std::pow(0.9, 301)))
                                         .epsilon(1e-3));
}

TEMPLATE_TEST_CASE("lion: hand-computed update, sign(0) = 0, cautious mask", "[lion]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const bool cautious = GENERATE(false, true);
  auto x = env.upload(std::vector<float>{1.0f, 1.0f, -1.0f, -1.0f, 0.5f});
  auto g = env.upload(std::vector<float>{2.0f, -2.0f, 2.0f, -2.0f, 0.0f});
  dion::Options o;
  o.lr = 0.1f;
  o.weight_decay = 0.5f;
  o.beta1 = 0.9f;
  o.beta2 = 0.99f;
  o.cautious_wd = cautious;
  dion::Lion<TestType> opt{env.backend(), o};
  opt.add_group().add("p", env.view(x, {5}), env.view(g, {5}));
  opt.step();
  // U = sign(0.1·G) = [1, −1, 1, −1, 0]; decay 0.05·X (masked by [X⊙U ≥ 0] if cautious); X −= 0.1·U
  const std::vector<double> expect = cautious ? std::vector<double>{0.85, 1.1, -1.1, -0.85, 0.475}
                                              : std::vector<double>{0.85, 1.05, -1.05, -0.85, 0.475};
  const auto got = env.download(x);
  for (std::size_t i = 0; i < 5; ++i) {
    INFO("element " << i);
    CHECK(std::fabs(got[i] - expect[i]) < 1e-6);
  }
  // M = β2·0 + (1 − β2)·G
  const auto m = opt.read_state("p/momentum");
  for (std::size_t i = 0; i < 5; ++i) CHECK(m[i] == Approx(0.01 * std::vector<double>{2, -2, 2, -2, 0}[i]).margin(1e-8));
  // step 2: the sign follows β1·M + (1 − β1)·G, not G: element 0 has M = 0.02, G = −0.1 →
  // 0.9·0.02 − 0.01 = 0.008 > 0, so U = +1 although G < 0
  env.write(g, std::vector<float>{-0.1f, 0.0f, 0.0f, 0.0f, 0.0f});
  const auto before = env.download(x);
  opt.step();
  const auto after = env.download(x);
  const double decay0 = (!cautious || before[0] * 1.0 >= 0) ? 0.05 * before[0] : 0.0;
  CHECK(after[0] == Approx(before[0] - decay0 - 0.1).margin(1e-6));
}

TEMPLATE_TEST_CASE("lion: several steps match an fp64 reference", "[lion]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const bool cautious = GENERATE(false, true);
  const auto x0 = dion_test::randn(96, 6);
  std::vector<std::vector<float>> grads;
  for (int k = 0; k < 4; ++k) grads.push_back(dion_test::randn(96, 20u + static_cast<std::uint32_t>(k)));
  auto x = env.upload(x0);
  auto g = env.template alloc<float>(96);
  dion::Options o;
  o.lr = 0.01f;
  o.weight_decay = 0.2f;
  o.beta1 = 0.9f;
  o.beta2 = 0.99f;
  o.cautious_wd = cautious;
  dion::Muon<TestType> opt{env.backend(), o};  // a lion group of a matrix optimizer
  opt.add_group({.algorithm = Algorithm::lion}).add("p", env.view(x, {96}), env.view(g, {96}));
  for (const auto& gk : grads) {
    env.write(g, gk);
    opt.step();
  }
  const auto ref = lion_ref(to_d(x0), grads, 0.01f, 0.2f, 0.9f, 0.99f, cautious);
  CHECK(dion_test::max_abs_diff(env.download(x), std::vector<float>(ref.x.begin(), ref.x.end())) < 1e-6);
  CHECK(dion_test::rel_err(opt.read_state("p/momentum"), ref.m) < 1e-6);
}

TEMPLATE_TEST_CASE("lion / adamw: zero gradients with wd = 0 leave the parameters bitwise unchanged (N2)",
                   "[lion][adamw][robustness]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const Algorithm alg = GENERATE(Algorithm::lion, Algorithm::adamw);
  const auto x0 = dion_test::randn(5, 7);
  auto x = env.upload(x0);
  auto g = env.template alloc<float>(5);
  dion::Options o;
  o.weight_decay = 0.0f;
  dion::NorMuon<TestType> opt{env.backend(), o};
  opt.add_group({.algorithm = alg}).add("p", env.view(x, {5, 1}), env.view(g, {5, 1}));  // torch's (5, 1)
  for (int k = 0; k < 3; ++k) opt.step();
  CHECK(dion_test::bits_equal(env.download(x), x0));
  for (float m : opt.read_state("p/momentum")) CHECK(m == 0.0f);
}

TEMPLATE_TEST_CASE("adamw: bf16 parameters and states follow the fp32 run within bf16 rounding", "[adamw][bf16]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const auto x0 = dion_test::round_bf16(dion_test::randn(64, 8));
  std::vector<std::vector<float>> grads;
  for (int k = 0; k < 3; ++k) grads.push_back(dion_test::round_bf16(dion_test::randn(64, 30u + static_cast<std::uint32_t>(k))));
  auto x = env.upload(dion_test::to_bf16(x0));
  auto g = env.template alloc<dion::bf16>(64);
  dion::Options o;
  o.lr = 0.01f;
  o.beta1 = 0.9f;
  o.beta2 = 0.999f;
  dion::AdamW<TestType> opt{env.backend(), o};
  opt.add_group().add("p", env.view(x, {64}), env.view(g, {64}));
  for (const auto& gk : grads) {
    env.write(g, dion_test::to_bf16(gk));
    opt.step();
  }
  const auto ref = adamw_ref(to_d(x0), grads, 0.01f, o.weight_decay, 0.9f, 0.999f, 1e-8f, false).x;
  const auto got = dion_test::from_bf16(env.download(x));
  REQUIRE(dion_test::all_finite(got));
  // each step rounds X to bf16 once (half an ulp: |x|·2^-8); the bf16 moments add a little more
  for (std::size_t i = 0; i < got.size(); ++i) {
    INFO("element " << i << ": " << got[i] << " vs " << ref[i]);
    CHECK(std::fabs(got[i] - ref[i]) <= 3.0 * std::fabs(ref[i]) / 256.0 + 2e-3);
  }
  CHECK_FALSE(dion_test::bits_equal(got, x0));
  CHECK(opt.read_state("p/step_dev") == std::vector<float>{3.0f});
}
