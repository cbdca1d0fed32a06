// Bad input (RELIABILITY A1-A12) and numerical robustness (N1-N3, N4, N12-N16), single process:
// every rejected call throws the right typed error (dion::InvalidArgument, ShapeMismatch,
// DtypeMismatch, NotSupported, NonFinite) with a message naming the field and value, and leaves
// parameters and state bitwise unchanged (memcmp snapshots, then a step compared with a twin
// optimizer that never saw the bad call). Every optimizer runs the same suite.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <pmmintrin.h>
#include <xmmintrin.h>
#define DION_TEST_HAVE_MXCSR 1
#endif

#include "backend_env.hpp"
#include "catch_compat.hpp"
#include "test_util.hpp"

using dion::Algorithm;
using dion::GroupOptions;
using dion::Options;
using dion::Shape;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

/// Call f.template operator()<Opt>() for every named optimizer on backend B.
template <class B, class F>
void for_each_optimizer(F&& f) {
  f.template operator()<dion::Muon<B>>();
  f.template operator()<dion::NorMuon<B>>();
  f.template operator()<dion::Dion2<B>>();
  f.template operator()<dion::NorDion2<B>>();
  f.template operator()<dion::Dion<B>>();
  f.template operator()<dion::Lion<B>>();
  f.template operator()<dion::AdamW<B>>();
}

template <class Opt>
constexpr bool is_matrix_optimizer() {
  return !dion::is_scalar_algorithm(Opt::default_algorithm);
}

/// An optimizer with two matrices in its default group and a bias in an adamw group, stepped a few
/// times so every state tensor holds non-trivial values.
template <class Opt, class B>
struct Fixture {
  dion_test::BackendEnv<B>& env;
  Opt opt;
  dion_test::DeviceBuffer<float, B> xa, ga, xb, gb, xc, gc;
  std::uint32_t seed = 1;

  Fixture(dion_test::BackendEnv<B>& e, const Options& o = Options{})
      : env(e),
        opt(e.backend(), o),
        xa(e.upload(dion_test::randn(24 * 16, 1, 0.1f))),
        ga(e.template alloc<float>(24 * 16)),
        xb(e.upload(dion_test::randn(16 * 24, 2, 0.1f))),
        gb(e.template alloc<float>(16 * 24)),
        xc(e.upload(dion_test::randn(16, 3, 0.1f))),
        gc(e.template alloc<float>(16)) {
    opt.add_group().add("a", e.view(xa, {24, 16}), e.view(ga, {24, 16})).add("b", e.view(xb, {16, 24}), e.view(gb, {16, 24}));
    opt.add_group({.algorithm = Algorithm::adamw}).add("c", e.view(xc, {16}), e.view(gc, {16}));
  }
  void step(int n = 1) {
    for (int k = 0; k < n; ++k) {
      env.write(ga, dion_test::randn(24 * 16, 100 + seed));
      env.write(gb, dion_test::randn(16 * 24, 200 + seed));
      env.write(gc, dion_test::randn(16, 300 + seed));
      ++seed;
      opt.step();
    }
  }
  struct Snapshot {
    std::vector<std::vector<std::byte>> params;
    std::map<std::string, std::vector<float>> state;
    std::vector<std::int64_t> steps;
    std::size_t num_params;
    int num_groups;
    std::int64_t skipped;
    std::vector<float> lrs;
  };
  Snapshot snapshot() {
    Snapshot s;
    s.params = {env.download_bytes(xa), env.download_bytes(xb), env.download_bytes(xc)};
    s.state = dion_test::state_snapshot(opt);
    s.steps = dion_test::step_counts(opt);
    s.num_params = opt.num_params();
    s.num_groups = opt.num_groups();
    s.skipped = opt.skipped_steps();
    for (int g = 0; g < opt.num_groups(); ++g) s.lrs.push_back(opt.lr(g));
    return s;
  }
  static bool same(const Snapshot& a, const Snapshot& b) {
    return a.params == b.params && dion_test::snapshots_equal(a.state, b.state) && a.steps == b.steps &&
           a.num_params == b.num_params && a.num_groups == b.num_groups && a.skipped == b.skipped &&
           dion_test::bits_equal(a.lrs, b.lrs);
  }
};

/// Run `bad` (which must throw Err with every substring in `parts`) on a stepped fixture, check
/// that nothing changed, then step it and a twin that never saw the call: they must agree bitwise.
/// `prepare` runs on both before the snapshot (e.g. to add the group a bad registration targets).
template <class Err, class Opt, class B>
void expect_rejected(dion_test::BackendEnv<B>& env, const std::string& what,
                     const std::type_identity_t<std::function<void(Fixture<Opt, B>&)>>& bad,
                     std::vector<std::string> parts,
                     const std::type_identity_t<std::function<void(Fixture<Opt, B>&)>>& prepare = {}) {
  INFO("rejected call: " << what);
  Fixture<Opt, B> f(env), twin(env);
  f.step(2);
  twin.step(2);
  if (prepare) {
    prepare(f);
    prepare(twin);
  }
  const auto before = f.snapshot();
  bool threw = false;
  try {
    bad(f);
  } catch (const Err& e) {
    threw = true;
    const std::string msg = e.what();
    INFO("message: " << msg);
    for (const auto& p : parts) CHECK(msg.find(p) != std::string::npos);
    CHECK(e.code().category() == dion::error_category());
  }
  REQUIRE(threw);
  CHECK(Fixture<Opt, B>::same(before, f.snapshot()));
  f.step();
  twin.step();
  CHECK(Fixture<Opt, B>::same(f.snapshot(), twin.snapshot()));
}

}  // namespace

// ----------------------------------------------------------------------------------- A1-A4 ranges
TEMPLATE_TEST_CASE("validation: hyperparameter ranges are checked at construction, NaN and inf included (A1-A4)",
                   "[validation]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  struct Bad {
    const char* field;
    std::function<void(Options&)> set;
    double value;
    std::uint32_t key;  // dion::detail::Uses bit: which algorithms read the field
  };
  using namespace dion::detail;
  const std::vector<Bad> table{
      {"lr", [](Options& o) { o.lr = -0.1f; }, -0.1, kLr},
      {"lr", [](Options& o) { o.lr = kNaN; }, kNaN, kLr},
      {"lr", [](Options& o) { o.lr = kInf; }, kInf, kLr},
      {"weight_decay", [](Options& o) { o.weight_decay = -0.01f; }, -0.01, kWd},
      {"weight_decay", [](Options& o) { o.weight_decay = kNaN; }, kNaN, kWd},
      {"epsilon", [](Options& o) { o.epsilon = 0.0f; }, 0.0, kEps},
      {"epsilon", [](Options& o) { o.epsilon = -1e-8f; }, -1e-8, kEps},
      {"epsilon", [](Options& o) { o.epsilon = kNaN; }, kNaN, kEps},
      {"mu", [](Options& o) { o.mu = -0.1f; }, -0.1, kMu},
      {"mu", [](Options& o) { o.mu = 1.0f; }, 1.0, kMu},
      {"mu", [](Options& o) { o.mu = 1.5f; }, 1.5, kMu},
      {"mu", [](Options& o) { o.mu = kNaN; }, kNaN, kMu},
      {"beta1", [](Options& o) { o.beta1 = 1.0f; }, 1.0, kBeta1},
      {"beta1", [](Options& o) { o.beta1 = -0.5f; }, -0.5, kBeta1},
      {"beta2", [](Options& o) { o.beta2 = kNaN; }, kNaN, kBeta2},
      {"beta2", [](Options& o) { o.beta2 = 1.5f; }, 1.5, kBeta2},
      {"muon_beta2", [](Options& o) { o.muon_beta2 = 1.0f; }, 1.0, kMuonBeta2},
      {"muon_beta2", [](Options& o) { o.muon_beta2 = kNaN; }, kNaN, kMuonBeta2},
      {"fraction", [](Options& o) { o.fraction = 0.0; }, 0.0, kFraction},
      {"fraction", [](Options& o) { o.fraction = 1.5; }, 1.5, kFraction},
      {"fraction", [](Options& o) { o.fraction = 1e12; }, 1e12, kFraction},
      {"fraction", [](Options& o) { o.fraction = std::nan(""); }, kNaN, kFraction},
      {"ef_decay", [](Options& o) { o.ef_decay = -0.1f; }, -0.1, kEfDecay},
      {"ef_decay", [](Options& o) { o.ef_decay = 1.1f; }, 1.1, kEfDecay},
      {"ef_decay", [](Options& o) { o.ef_decay = kNaN; }, kNaN, kEfDecay},
      {"rank_fraction", [](Options& o) { o.rank_fraction = 0.0; }, 0.0, kRankFrac},
      {"rank_fraction", [](Options& o) { o.rank_fraction = 1.01; }, 1.01, kRankFrac},
      {"rank_fraction", [](Options& o) { o.rank_fraction = 1e12; }, 1e12, kRankFrac},
      {"rank_fraction", [](Options& o) { o.rank_fraction = std::nan(""); }, kNaN, kRankFrac},
      {"rank_multiple_of", [](Options& o) { o.rank_multiple_of = 0; }, 0, kRankMult},
      {"power_iters", [](Options& o) { o.power_iters = 0; }, 0, kPowerIters},
      {"power_iters", [](Options& o) { o.power_iters = 101; }, 101, kPowerIters},
      {"cqr_warmup_steps", [](Options& o) { o.cqr_warmup_steps = -1; }, -1, kCqrWarm},
      {"rcqr_oversample", [](Options& o) { o.rcqr_oversample = 0.5; }, 0.5, kOversample},
      {"rcqr_oversample", [](Options& o) { o.rcqr_oversample = std::nan(""); }, kNaN, kOversample},
      {"ns_steps",
       [](Options& o) {
         o.orthogonalizer = dion::Orthogonalizer::newton_schulz_const;
         o.ns_steps = 0;
       },
       0, kNsSteps},
      {"ns_steps",
       [](Options& o) {
         o.orthogonalizer = dion::Orthogonalizer::newton_schulz_const;
         o.ns_steps = 100;
       },
       100, kNsSteps},
      {"ns_steps", [](Options& o) { o.ns_steps = 7; }, 7, kNsSteps},  // only newton_schulz_const reads it
      {"num_heads", [](Options& o) { o.num_heads = 0; }, 0, kHeads},
      {"num_heads",
       [](Options& o) {
         o.num_heads = 4;
         o.flatten = true;
       },
       4, kHeads},
      {"split_sizes", [](Options& o) { o.split_sizes = {32}; }, 1, kSplit},
      {"split_sizes", [](Options& o) { o.split_sizes = {32, 0}; }, 0, kSplit},
      {"split_sizes", [](Options& o) { o.split_sizes = {32, -1}; }, -1, kSplit},
      {"split_sizes",
       [](Options& o) {
         o.split_sizes = {16, 16};
         o.num_heads = 2;
       },
       2, kSplit},
      {"split_sizes",
       [](Options& o) {
         o.split_sizes = {16, 16};
         o.flatten = true;
       },
       1, kSplit},
      {"workspace_limit_bytes", [](Options& o) { o.workspace_limit_bytes = 0; }, 0, ~0u},
  };
  for_each_optimizer<TestType>([&]<class Opt>() {
    const Algorithm a = Opt::default_algorithm;
    const auto used = keys_used(a);
    for (const auto& b : table) {
      if (!(used & b.key)) continue;
      INFO(dion::algorithm_name(a) << ": " << b.field << " = " << b.value);
      Options o;
      b.set(o);
      bool threw = false;
      try {
        Opt opt{env.backend(), o};
      } catch (const dion::InvalidArgument& e) {
        threw = true;
        INFO("message: " << e.what());
        CHECK(std::string(e.what()).find(b.field) != std::string::npos);
      }
      CHECK(threw);
    }
    // the defaults themselves are valid
    CHECK_NOTHROW(Opt{env.backend(), Options{}});
  });
  // messages carry the value and the allowed range
  REQUIRE_THROWS_WITH((dion::Muon<TestType>{env.backend(), {.lr = -0.5f}}),
                      DION_CONTAINS("lr = -0.5") && DION_CONTAINS(">= 0"));
  REQUIRE_THROWS_WITH((dion::Muon<TestType>{env.backend(), {.lr = kNaN}}), DION_CONTAINS("lr = nan"));
  REQUIRE_THROWS_WITH((dion::Muon<TestType>{env.backend(), {.mu = 1.5f}}), DION_CONTAINS("mu = 1.5") && DION_CONTAINS("[0, 1)"));
  REQUIRE_THROWS_WITH((dion::Dion2<TestType>{env.backend(), {.fraction = 0.0}}), DION_CONTAINS("fraction = 0") && DION_CONTAINS("(0, 1]"));
  // Dion2 / NorDion2 have no split_sizes (microsoft/dion raises NotImplementedError)
  REQUIRE_THROWS_AS((dion::Dion2<TestType>{env.backend(), {.split_sizes = {16, 16}}}), dion::NotSupported);
  REQUIRE_THROWS_AS((dion::NorDion2<TestType>{env.backend(), {.split_sizes = {16, 16}}}), dion::NotSupported);
  // beta1/beta2 of a matrix optimizer are the defaults of its lion/adamw groups: checked when used
  dion::Muon<TestType> m{env.backend(), {.beta1 = 1.5f}};
  REQUIRE_THROWS_AS(m.add_group({.algorithm = Algorithm::adamw}), dion::InvalidArgument);
  REQUIRE_THROWS_WITH(m.add_group({.algorithm = Algorithm::lion}), DION_CONTAINS("beta1 = 1.5"));
  CHECK(m.num_groups() == 0);
}

TEMPLATE_TEST_CASE("validation: group overrides are range-checked, and keys the algorithm ignores are rejected",
                   "[validation]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  struct Unused {
    Algorithm in;  // optimizer
    GroupOptions g;
    const char* field;
  };
  const std::vector<Unused> unused{
      {Algorithm::muon, {.fraction = 0.5}, "fraction"},
      {Algorithm::muon, {.rank_fraction = 0.5}, "rank_fraction"},
      {Algorithm::muon, {.muon_beta2 = 0.9f}, "muon_beta2"},
      {Algorithm::muon, {.ef_decay = 0.9f}, "ef_decay"},
      {Algorithm::normuon, {.qr_method = dion::QrMethod::qr}, "qr_method"},
      {Algorithm::dion2, {.mu = 0.9f}, "mu"},
      {Algorithm::dion2, {.nesterov = true}, "nesterov"},
      {Algorithm::dion2, {.cautious_wd = true}, "cautious_wd"},
      {Algorithm::dion2, {.muon_beta2 = 0.9f}, "muon_beta2"},
      {Algorithm::nordion2, {.ef_decay = 0.5f}, "ef_decay"},
      {Algorithm::nordion2, {.nesterov = true}, "nesterov"},
      {Algorithm::dion, {.adjust_lr = dion::AdjustLr::none}, "adjust_lr"},
      {Algorithm::dion, {.nesterov = true}, "nesterov"},
      {Algorithm::dion, {.fraction = 0.5}, "fraction"},
      {Algorithm::dion, {.orthogonalizer = dion::Orthogonalizer::newton_schulz}, "orthogonalizer"},
      {Algorithm::lion, {.mu = 0.9f}, "mu"},
      {Algorithm::lion, {.epsilon = 1e-6f}, "epsilon"},
      {Algorithm::adamw, {.nesterov = true}, "nesterov"},
      {Algorithm::adamw, {.rank_fraction = 0.5}, "rank_fraction"},
  };
  for_each_optimizer<TestType>([&]<class Opt>() {
    for (const auto& u : unused) {
      if (u.in != Opt::default_algorithm) continue;
      INFO(dion::algorithm_name(u.in) << " group with " << u.field);
      Opt opt{env.backend()};
      REQUIRE_THROWS_AS(opt.add_group(u.g), dion::InvalidArgument);
      REQUIRE_THROWS_WITH(opt.add_group(u.g), DION_CONTAINS(u.field) && DION_CONTAINS("not used"));
      CHECK(opt.num_groups() == 0);
    }
    // a scalar group inside a matrix optimizer rejects matrix-only keys
    if constexpr (is_matrix_optimizer<Opt>()) {
      Opt opt{env.backend()};
      REQUIRE_THROWS_WITH(opt.add_group({.algorithm = Algorithm::adamw, .mu = 0.9f}), DION_CONTAINS("mu"));
      REQUIRE_THROWS_WITH(opt.add_group({.algorithm = Algorithm::lion, .flatten = true}), DION_CONTAINS("flatten"));
      CHECK(opt.num_groups() == 0);
    }
    // overrides are range-checked like constructor values
    Opt opt{env.backend()};
    REQUIRE_THROWS_WITH(opt.add_group({.lr = kNaN}), DION_CONTAINS("lr"));
    REQUIRE_THROWS_WITH(opt.add_group({.weight_decay = -1.0f}), DION_CONTAINS("weight_decay = -1"));
    REQUIRE_THROWS_WITH(opt.add_group({.algorithm = Algorithm::adamw, .beta2 = 1.0f}), DION_CONTAINS("beta2 = 1"));
    CHECK(opt.num_groups() == 0);
    // an algorithm this optimizer does not offer
    const Algorithm other = Opt::default_algorithm == Algorithm::muon ? Algorithm::dion : Algorithm::muon;
    REQUIRE_THROWS_AS(opt.add_group({.algorithm = other}), dion::InvalidArgument);
    REQUIRE_THROWS_WITH(opt.add_group({.algorithm = other}), DION_CONTAINS(dion::algorithm_name(other)));
    CHECK(opt.num_groups() == 0);
  });
}

TEMPLATE_TEST_CASE("validation: set_lr / set_weight_decay reject NaN, inf and negatives and keep the old value (A17)",
                   "[validation]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  for_each_optimizer<TestType>([&]<class Opt>() {
    INFO(dion::algorithm_name(Opt::default_algorithm));
    for (float bad : {kNaN, kInf, -kInf, -1e-3f}) {
      expect_rejected<dion::InvalidArgument, Opt>(env, "set_lr", [bad](auto& f) { f.opt.set_lr(0, bad); }, {"lr"});
      expect_rejected<dion::InvalidArgument, Opt>(env, "set_weight_decay",
                                                  [bad](auto& f) { f.opt.set_weight_decay(1, bad); }, {"weight_decay"});
    }
    expect_rejected<dion::InvalidArgument, Opt>(env, "set_lr on a missing group",
                                                [](auto& f) { f.opt.set_lr(7, 0.1f); }, {"group index 7"});
    expect_rejected<dion::InvalidArgument, Opt>(env, "negative step count",
                                                [](auto& f) { f.opt.set_step_count(0, -1); }, {"step count"});
  });
}

// ----------------------------------------------------------------------------------- A5-A12
TEMPLATE_TEST_CASE("validation: rejected registrations and gradients leave the optimizer bitwise unchanged (A5-A12)",
                   "[validation]", DION_TEST_BACKENDS) {
  using B = TestType;
  dion_test::BackendEnv<B> env;
  // memory the bad calls point at (outlives every fixture)
  auto spare = env.template alloc<float>(4096);
  auto spare2 = env.template alloc<float>(4096);
  auto spare_bf16 = env.template alloc<dion::bf16>(4096);
  for_each_optimizer<B>([&]<class Opt>() {
    using F = Fixture<Opt, B>;
    INFO(dion::algorithm_name(Opt::default_algorithm));
    // A9: names and duplicate memory
    expect_rejected<dion::InvalidArgument, Opt>(env, "duplicate name",
        [&](F& f) { f.opt.group(0).add("a", env.view(spare, {24, 16})); }, {"'a'", "already registered"});
    expect_rejected<dion::InvalidArgument, Opt>(env, "the same parameter memory twice (other group)",
        [&](F& f) { f.opt.group(1).add("a_again", env.view(f.xa, {24, 16})); }, {"a_again", "overlaps", "'a'"});
    expect_rejected<dion::InvalidArgument, Opt>(env, "the same parameter memory twice (same group)",
        [&](F& f) { f.opt.group(0).add("b_again", env.view(f.xb, {16, 24})); }, {"b_again", "overlaps"});
    expect_rejected<dion::InvalidArgument, Opt>(env, "empty name",
        [&](F& f) { f.opt.group(0).add("", env.view(spare, {24, 16})); }, {"name"});
    expect_rejected<dion::InvalidArgument, Opt>(env, "name with '/'",
        [&](F& f) { f.opt.group(0).add("x/y", env.view(spare, {24, 16})); }, {"'/'"});
    // A10: overlapping memory
    expect_rejected<dion::InvalidArgument, Opt>(env, "a parameter overlapping another one partially",
        [&](F& f) { f.opt.group(0).add("z", env.view(f.xa, {4, 16}, -1, -1, 300)); }, {"'z'", "overlaps", "'a'"});
    expect_rejected<dion::InvalidArgument, Opt>(env, "a parameter overlapping another's gradient",
        [&](F& f) { f.opt.group(0).add("z", env.view(f.gb, {24, 16})); }, {"'z'", "gradient of 'b'"});
    expect_rejected<dion::InvalidArgument, Opt>(env, "gradient aliasing its own parameter",
        [&](F& f) { f.opt.group(0).add("z", env.view(spare, {24, 16}), env.view(spare, {24, 16})); },
        {"'z'", "overlaps the parameter"});
    expect_rejected<dion::InvalidArgument, Opt>(env, "set_grad onto another parameter's memory",
        [&](F& f) { f.opt.set_grad("a", env.view(f.xb, {24, 16})); }, {"'a'", "overlaps parameter 'b'"});
    expect_rejected<dion::InvalidArgument, Opt>(env, "set_grad onto its own parameter",
        [&](F& f) { f.opt.set_grad("c", env.view(f.xc, {16})); }, {"'c'", "overlaps"});
    // A5: shapes
    expect_rejected<dion::ShapeMismatch, Opt>(env, "transposed gradient at registration",
        [&](F& f) { f.opt.group(0).add("z", env.view(spare, {24, 16}), env.view(spare2, {16, 24})); },
        {"'z'", "(16, 24)", "(24, 16)"});
    expect_rejected<dion::ShapeMismatch, Opt>(env, "transposed gradient in set_grad",
        [&](F& f) { f.opt.set_grad("a", env.view(spare2, {16, 24})); }, {"'a'", "(16, 24)", "(24, 16)"});
    expect_rejected<dion::ShapeMismatch, Opt>(env, "gradient with one element too many",
        [&](F& f) { f.opt.set_grad("c", env.view(spare2, {17})); }, {"'c'", "(17,)", "(16,)"});
    // A7: dtype
    expect_rejected<dion::DtypeMismatch, Opt>(env, "bf16 gradient of an fp32 parameter",
        [&](F& f) { f.opt.set_grad("a", env.view(spare_bf16, {24, 16})); }, {"'a'", "bfloat16", "float32"});
    expect_rejected<dion::DtypeMismatch, Opt>(env, "bf16 gradient at registration",
        [&](F& f) { f.opt.group(0).add("z", env.view(spare, {24, 16}), env.view(spare_bf16, {24, 16})); },
        {"'z'", "bfloat16"});
    expect_rejected<dion::InvalidArgument, Opt>(env, "set_grad of an unknown parameter",
        [&](F& f) { f.opt.set_grad("nope", env.view(spare2, {24, 16})); }, {"'nope'"});
    // A11 / A12: layouts
    expect_rejected<dion::InvalidArgument, Opt>(env, "leading dimension < cols",
        [&](F& f) { f.opt.group(0).add("z", env.view(spare, {24, 16}, 8)); }, {"'z'", "leading dimension 8"});
    expect_rejected<dion::InvalidArgument, Opt>(env, "batch stride making matrices overlap",
        [&](F& f) { f.opt.group(0).add("z", env.view(spare, {2, 8, 8}, -1, 32)); }, {"'z'", "batch stride"});
    expect_rejected<dion::InvalidArgument, Opt>(env, "null data",
        [&](F& f) { f.opt.group(0).add("z", env.view_at(static_cast<float*>(nullptr), {24, 16})); }, {"'z'", "null"});
    expect_rejected<dion::InvalidArgument, Opt>(env, "misaligned float pointer (2 bytes)",
        [&](F& f) {
          auto* p = reinterpret_cast<float*>(reinterpret_cast<char*>(spare.data()) + 2);
          f.opt.group(0).add("z", env.view_at(p, {24, 16}));
        },
        {"'z'", "aligned"});
    expect_rejected<dion::InvalidArgument, Opt>(env, "misaligned bf16 pointer (1 byte)",
        [&](F& f) {
          auto* p = reinterpret_cast<dion::bf16*>(reinterpret_cast<char*>(spare_bf16.data()) + 1);
          f.opt.group(1).add("z", env.view_at(p, {16}));
        },
        {"'z'", "aligned"});
    expect_rejected<dion::InvalidArgument, Opt>(env, "a gradient with a misaligned pointer",
        [&](F& f) {
          auto* p = reinterpret_cast<float*>(reinterpret_cast<char*>(spare.data()) + 2);
          f.opt.set_grad("c", env.view_at(p, {16}));
        },
        {"'c'", "aligned"});
    // A6: what an orthonormal update cannot take
    if constexpr (is_matrix_optimizer<Opt>()) {
      expect_rejected<dion::NotSupported, Opt>(env, "1-D parameter in a matrix group",
          [&](F& f) { f.opt.group(0).add("bias", env.view(spare, {16})); }, {"'bias'", "(16,)", "lion or adamw"});
      expect_rejected<dion::NotSupported, Opt>(env, "0-D parameter in a matrix group",
          [&](F& f) { f.opt.group(0).add("scale", env.view(spare, Shape{})); }, {"'scale'"});
    }
    if constexpr (Opt::default_algorithm == Algorithm::dion) {
      expect_rejected<dion::NotSupported, Opt>(env, "3-D parameter in a Dion group",
          [&](F& f) { f.opt.group(0).add("w3", env.view(spare, {2, 8, 8})); }, {"'w3'", "2-D"});
    }
    if constexpr (dion::is_muon_family(Opt::default_algorithm)) {
      expect_rejected<dion::InvalidArgument, Opt>(env, "num_heads not dividing dim 0",
          [&](F& f) { f.opt.group(2).add("heads", env.view(spare, {30, 16})); }, {"num_heads = 4", "30"},
          [](F& f) { f.opt.add_group({.num_heads = 4}); });
      expect_rejected<dion::InvalidArgument, Opt>(env, "num_heads on a 3-D parameter",
          [&](F& f) { f.opt.group(2).add("heads", env.view(spare, {2, 8, 16})); }, {"num_heads", "2D"},
          [](F& f) { f.opt.add_group({.num_heads = 2}); });
    }
    if constexpr (dion::is_muon_family(Opt::default_algorithm)) {
      if constexpr (Opt::default_algorithm == Algorithm::nordion2) {
        expect_rejected<dion::NotSupported, Opt>(env, "nordion2 with flatten on a 3-D parameter",
            [&](F& f) { f.opt.group(2).add("w3", env.view(spare, {2, 8, 16})); }, {"'w3'", "flatten"},
            [](F& f) { f.opt.add_group({.flatten = true}); });
      } else {
        expect_rejected<dion::InvalidArgument, Opt>(env, "flatten on a strided 3-D parameter",
            [&](F& f) { f.opt.group(2).add("w3", env.view(spare, {2, 8, 16}, 20, 200)); }, {"'w3'", "contiguous"},
            [](F& f) { f.opt.add_group({.flatten = true}); });
      }
    }
    if constexpr (Opt::default_algorithm == Algorithm::muon || Opt::default_algorithm == Algorithm::normuon) {
      expect_rejected<dion::InvalidArgument, Opt>(env, "split_sizes not summing to dim 0",
          [&](F& f) { f.opt.group(2).add("qkv", env.view(spare, {60, 32})); }, {"split_sizes", "64", "60"},
          [](F& f) { f.opt.add_group({.split_sizes = std::vector<std::int64_t>{32, 16, 16}}); });
    }
    // state access
    expect_rejected<dion::InvalidArgument, Opt>(env, "unknown state name",
        [&](F& f) { (void)f.opt.state("a/nope"); }, {"a/nope"});
    expect_rejected<dion::ShapeMismatch, Opt>(env, "write_state with the wrong size",
        [&](F& f) { f.opt.write_state("c/momentum", std::vector<float>(15, 1.0f)); }, {"15", "16"});
    expect_rejected<dion::InvalidArgument, Opt>(env, "a group index out of range",
        [&](F& f) { (void)f.opt.group(5); }, {"group index 5"});
  });
}

TEMPLATE_TEST_CASE("validation: a float pointer 4 bytes past an allocation works and matches an aligned copy (A12)",
                   "[validation]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const auto x0 = dion_test::randn(24 * 16, 4, 0.1f);
  const auto g0 = dion_test::randn(24 * 16, 5);
  std::vector<float> xs(1 + x0.size()), gs(1 + g0.size());
  std::copy(x0.begin(), x0.end(), xs.begin() + 1);
  std::copy(g0.begin(), g0.end(), gs.begin() + 1);
  auto xo = env.upload(xs), go = env.upload(gs);  // data at +4 bytes: not 16/64-byte aligned
  auto xa = env.upload(x0), ga = env.upload(g0);
  dion::Muon<TestType> a{env.backend()}, b{env.backend()};
  a.add_group().add("w", env.view(xo, {24, 16}, -1, -1, 1), env.view(go, {24, 16}, -1, -1, 1));
  b.add_group().add("w", env.view(xa, {24, 16}), env.view(ga, {24, 16}));
  a.step();
  b.step();
  const auto ro = env.download(xo);
  CHECK(dion_test::bits_equal(std::vector<float>(ro.begin() + 1, ro.end()), env.download(xa)));
}

// ----------------------------------------------------------------------------------- A8, N1-N3
TEMPLATE_TEST_CASE("validation: empty groups are allowed; missing gradients skip exactly those parameters (A8, N3)",
                   "[validation]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  for_each_optimizer<TestType>([&]<class Opt>() {
    INFO(dion::algorithm_name(Opt::default_algorithm));
    // three parameters, gradients on #0 and #2 only, plus an empty group
    const auto pb = dion_test::make_problem({{"p0", {24, 16}}, {"p1", {24, 16}}, {"p2", {16, 24}}}, 3, 7);
    Opt opt{env.backend()};
    auto g0 = opt.add_group();
    opt.add_group({.algorithm = Algorithm::lion});  // empty
    std::vector<dion_test::DeviceBuffer<float, TestType>> xs, gs;
    for (std::size_t i = 0; i < 3; ++i) {
      xs.push_back(env.upload(pb.init[i]));
      gs.push_back(env.template alloc<float>(pb.numel(i)));
      g0.add(pb.params[i].name, env.view(xs[i], pb.params[i].shape),
             i == 1 ? dion::View<typename TestType::Space>{} : env.view(gs[i], pb.params[i].shape));
    }
    const auto names_before = dion_test::state_snapshot(opt);
    const auto p1_state0 = [&] {
      std::map<std::string, std::vector<float>> s;
      for (const auto& [k, v] : names_before)
        if (k.rfind("p1/", 0) == 0) s[k] = v;
      return s;
    }();
    for (int k = 0; k < 3; ++k) {
      for (std::size_t i : {0u, 2u}) env.write(gs[i], pb.grads[static_cast<std::size_t>(k)][i]);
      opt.step();
    }
    CHECK(dion_test::bits_equal(env.download(xs[1]), pb.init[1]));
    CHECK_FALSE(dion_test::bits_equal(env.download(xs[0]), pb.init[0]));
    CHECK_FALSE(dion_test::bits_equal(env.download(xs[2]), pb.init[2]));
    const auto after = dion_test::state_snapshot(opt);
    // same state keys; p1's state exactly as registered (zero, or Dion's initial Q)
    REQUIRE(after.size() == names_before.size());
    for (const auto& [k, v] : p1_state0) {
      INFO("state " << k);
      CHECK(dion_test::bits_equal(after.at(k), v));
      if (k.find("/Q") == std::string::npos)
        for (float e : after.at(k)) REQUIRE(e == 0.0f);
    }
    // the gradient-less parameter is the same as a run without it
    dion_test::Problem pb2;
    pb2.params = {pb.params[0], pb.params[2]};
    pb2.init = {pb.init[0], pb.init[2]};
    pb2.grads.resize(3);
    for (int k = 0; k < 3; ++k) pb2.grads[static_cast<std::size_t>(k)] = {pb.grads[static_cast<std::size_t>(k)][0], pb.grads[static_cast<std::size_t>(k)][2]};
    const auto alone = dion_test::run_problem<Opt>(env, Options{}, pb2, 3);
    CHECK(dion_test::bits_equal(alone.params[0], env.download(xs[0])));
    CHECK(dion_test::bits_equal(alone.params[1], env.download(xs[2])));
  });
}

TEMPLATE_TEST_CASE("validation: a step without any gradient changes no parameter and no state (N3)", "[validation]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  for_each_optimizer<TestType>([&]<class Opt>() {
    INFO(dion::algorithm_name(Opt::default_algorithm));
    Fixture<Opt, TestType> f(env);
    f.step(2);
    for (const char* n : {"a", "b", "c"}) f.opt.clear_grad(n);
    const auto before = f.snapshot();
    f.opt.step();
    f.opt.step();
    const auto after = f.snapshot();
    CHECK(after.params == before.params);
    CHECK(dion_test::snapshots_equal(after.state, before.state));
  });
}

TEMPLATE_TEST_CASE("validation: all-zero gradients give finite results; with wd = 0 nothing moves (N1, N2)",
                   "[validation][robustness]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  for_each_optimizer<TestType>([&]<class Opt>() {
    INFO(dion::algorithm_name(Opt::default_algorithm));
    for (const Shape s : {Shape{24, 16}, Shape{16, 24}, Shape{5, 1}, Shape{1, 5}, Shape{1, 1}}) {
      INFO("shape " << s.str());
      const auto x0 = dion_test::randn(static_cast<std::size_t>(s.numel()), 9, 0.1f);
      auto x = env.upload(x0);
      auto g = env.template alloc<float>(static_cast<std::size_t>(s.numel()));
      Opt opt{env.backend(), {.weight_decay = 0.0f}};
      opt.add_group().add("w", env.view(x, s), env.view(g, s));
      for (int k = 0; k < 3; ++k) opt.step();
      CHECK(dion_test::bits_equal(env.download(x), x0));
      for (const auto& [k, v] : dion_test::state_snapshot(opt)) {
        INFO("state " << k);
        CHECK(dion_test::all_finite(v));
      }
      CHECK(dion_test::all_finite(opt.read_state("w/momentum")));
    }
  });
}

// ----------------------------------------------------------------------------------- N4
TEMPLATE_TEST_CASE("validation: non-finite gradients under skip_step, raise and propagate (N4)",
                   "[validation][nonfinite]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  using dion::NonFinitePolicy;
  for_each_optimizer<TestType>([&]<class Opt>() {
    using F = Fixture<Opt, TestType>;
    for (const float bad : {kNaN, kInf, -kInf}) {
      INFO(dion::algorithm_name(Opt::default_algorithm) << ", gradient value " << bad);
      auto g = dion_test::randn(16 * 24, 5);
      g[37] = bad;
      {  // skip_step (the default): params, state and step counters untouched; the skip is counted
        F f(env), twin(env);
        f.step(2);
        twin.step(2);
        env.write(f.gb, g);
        const auto before = f.snapshot();
        f.opt.step();
        CHECK(f.opt.last_step_skipped());
        CHECK(f.opt.skipped_steps() == 1);
        auto after = f.snapshot();
        CHECK(after.skipped == 1);
        after.skipped = before.skipped;
        CHECK(F::same(before, after));
        // the next finite step proceeds as if the bad one never happened
        f.step();
        twin.step();
        CHECK_FALSE(f.opt.last_step_skipped());
        auto fs = f.snapshot();
        fs.skipped = 0;
        CHECK(F::same(fs, twin.snapshot()));
      }
      {  // raise: NonFinite naming the parameter, nothing changed
        F f(env, Options{.non_finite = NonFinitePolicy::raise});
        f.step(2);
        env.write(f.gb, g);
        const auto before = f.snapshot();
        REQUIRE_THROWS_AS(f.opt.step(), dion::NonFinite);
        REQUIRE_THROWS_WITH(f.opt.step(), DION_CONTAINS("'b'"));
        CHECK(F::same(before, f.snapshot()));
      }
      {  // propagate: no check; the step is taken and the value reaches the state
        F f(env, Options{.non_finite = NonFinitePolicy::propagate});
        f.step(1);
        env.write(f.gb, g);
        f.opt.step();
        CHECK_FALSE(f.opt.last_step_skipped());
        CHECK(f.opt.skipped_steps() == 0);
        CHECK_FALSE(dion_test::all_finite(f.opt.read_state("b/momentum")));
        CHECK(dion_test::step_counts(f.opt) == std::vector<std::int64_t>{2, 2});
      }
    }
  });
}

TEMPLATE_TEST_CASE("validation: a NaN in a bf16 gradient is detected too", "[validation][nonfinite][bf16]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const auto x0 = dion_test::to_bf16(dion_test::randn(16 * 8, 1, 0.1f));
  auto x = env.upload(x0);
  auto gv = dion_test::to_bf16(dion_test::randn(16 * 8, 2));
  gv[5] = dion::bf16(kNaN);
  auto g = env.upload(gv);
  dion::Muon<TestType> opt{env.backend()};
  opt.add_group().add("w", env.view(x, {16, 8}), env.view(g, {16, 8}));
  opt.step();
  CHECK(opt.last_step_skipped());
  CHECK(dion_test::bits_equal(dion_test::from_bf16(env.download(x)), dion_test::from_bf16(x0)));
}

// ----------------------------------------------------------------------------------- N12, N13
TEMPLATE_TEST_CASE("validation: extreme shapes (1x1, 1xN, Nx1, 3x200, 200x3) match the reference (N12)",
                   "[validation][robustness]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const auto pb = dion_test::make_problem(
      {{"s11", {1, 1}}, {"row", {1, 50}}, {"col", {50, 1}}, {"wide", {3, 200}}, {"tall", {200, 3}}, {"b", {2, 1, 7}}}, 3, 17);
  dion::Options o;
  const bool nor = GENERATE(false, true);
  const auto got = nor ? dion_test::run_problem<dion::NorMuon<TestType, dion::SingleProcess, dion::precision::Fp32>>(env, o, pb, 3)
                       : dion_test::run_problem<dion::Muon<TestType, dion::SingleProcess, dion::precision::Fp32>>(env, o, pb, 3);
  const auto ref = dion_test::muon_family_ref(pb, 3, o, nor);
  for (std::size_t i = 0; i < pb.params.size(); ++i) {
    INFO((nor ? "normuon " : "muon ") << pb.params[i].name);
    CHECK(dion_test::update_rel_err(got.params[i], ref.params[i], pb.init[i]) < 1e-4);
  }
  // every optimizer runs on them and stays finite; Dion clamps its rank to min(m, n)
  for_each_optimizer<TestType>([&]<class Opt>() {
    INFO(dion::algorithm_name(Opt::default_algorithm));
    dion_test::Problem p2 = pb;
    if (Opt::default_algorithm == Algorithm::dion) {  // 2-D only
      p2.params.pop_back();
      p2.init.pop_back();
      for (auto& g : p2.grads) g.pop_back();
    }
    const auto r = dion_test::run_problem<Opt>(env, {.rank_multiple_of = 8}, p2, 3);
    for (std::size_t i = 0; i < p2.params.size(); ++i) {
      INFO(p2.params[i].name);
      CHECK(dion_test::all_finite(r.params[i]));
      CHECK_FALSE(dion_test::bits_equal(r.params[i], p2.init[i]));
    }
    if (Opt::default_algorithm == Algorithm::dion) {
      CHECK(r.state_shapes.at("wide/Q") == std::vector<std::int64_t>{3, 3});
      CHECK(r.state_shapes.at("tall/Q") == std::vector<std::int64_t>{3, 3});
      CHECK(r.state_shapes.at("s11/Q") == std::vector<std::int64_t>{1, 1});
    }
  });
}

TEMPLATE_TEST_CASE("validation: empty parameters (0xN, Nx0) are no-ops next to real ones (N13)",
                   "[validation][robustness]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  for_each_optimizer<TestType>([&]<class Opt>() {
    INFO(dion::algorithm_name(Opt::default_algorithm));
    auto x = env.upload(dion_test::randn(8 * 8, 1, 0.1f));
    auto g = env.upload(dion_test::randn(8 * 8, 2));
    auto e = env.template alloc<float>(1);
    auto eg = env.template alloc<float>(1);
    Opt opt{env.backend()};
    opt.add_group()
        .add("rows0", env.view(e, {0, 16}), env.view(eg, {0, 16}))
        .add("cols0", env.view_at(e.data(), Shape{16, 0}), env.view_at(eg.data(), Shape{16, 0}))
        .add("w", env.view(x, {8, 8}), env.view(g, {8, 8}));
    opt.add_group({.algorithm = Algorithm::adamw}).add("v0", env.view_at(e.data(), Shape{0}), env.view_at(eg.data(), Shape{0}));
    const auto x0 = env.download(x);
    REQUIRE_NOTHROW(opt.step());
    REQUIRE_NOTHROW(opt.step());
    CHECK_FALSE(dion_test::bits_equal(env.download(x), x0));
    CHECK(dion_test::all_finite(env.download(x)));
    CHECK(opt.state("rows0/momentum").view.shape == Shape{0, 16});
    CHECK(opt.read_state("rows0/momentum").empty());
  });
}

// ----------------------------------------------------------------------------------- N15, N16
TEST_CASE("validation: non-finite detection works on bit patterns (N16)", "[validation][nonfinite]") {
  CHECK_FALSE(dion::is_finite_bits(kNaN));
  CHECK_FALSE(dion::is_finite_bits(-kNaN));
  CHECK_FALSE(dion::is_finite_bits(kInf));
  CHECK_FALSE(dion::is_finite_bits(-kInf));
  CHECK(dion::is_finite_bits(std::numeric_limits<float>::max()));
  CHECK(dion::is_finite_bits(std::numeric_limits<float>::denorm_min()));
  CHECK(dion::is_finite_bits(-0.0f));
  CHECK_FALSE(dion::is_finite_bits(dion::bf16(kNaN)));
  CHECK_FALSE(dion::is_finite_bits(dion::bf16(kInf)));
  CHECK(dion::is_finite_bits(dion::bf16(3.0e38f)));
  CHECK(std::isnan(static_cast<float>(dion::bf16(kNaN))));  // NaN stays NaN through bf16
  // rounding to nearest even, and values past bf16's max round to inf
  CHECK(dion::round_bf16(1.0f + 1.0f / 256.0f) == 1.0f);
  CHECK(dion::round_bf16(1.0f + 3.0f / 256.0f) == 1.0f + 4.0f / 256.0f);
  CHECK(static_cast<float>(dion::bf16(256.0f)) + 1.0f == 257.0f);
  CHECK(dion::round_bf16(256.0f + 1.0f) == 256.0f);  // why counters are never bf16 (N14)
}

#if defined(DION_TEST_HAVE_MXCSR)
TEST_CASE("validation: denormal inputs give finite results with and without FTZ/DAZ (N15)", "[validation][robustness]") {
  auto run = [](bool ftz) {
    const unsigned saved = _mm_getcsr();
    _MM_SET_FLUSH_ZERO_MODE(ftz ? _MM_FLUSH_ZERO_ON : _MM_FLUSH_ZERO_OFF);
    _MM_SET_DENORMALS_ZERO_MODE(ftz ? _MM_DENORMALS_ZERO_ON : _MM_DENORMALS_ZERO_OFF);
    dion::EigenBackend be;
    auto x = dion_test::randn(32 * 16, 1, 0.1f);
    auto g = dion_test::randn(32 * 16, 2);
    for (std::size_t i = 0; i < g.size(); i += 3) g[i] = 1e-39f * (i % 2 ? 1.0f : -1.0f);  // subnormal entries
    std::vector<float> xt(x), gt(g.size(), 3e-39f);                                        // all subnormal
    dion::Muon<dion::EigenBackend> opt{be};
    opt.add_group().add("w", dion::host_view(x.data(), {32, 16}), dion::host_view(g.data(), {32, 16}));
    opt.add_group().add("t", dion::host_view(xt.data(), {32, 16}), dion::host_view(gt.data(), {32, 16}));
    dion::AdamW<dion::EigenBackend> adam{be};
    std::vector<float> xa(16, 0.5f), ga(16, 1e-40f);
    adam.add_group().add("a", dion::host_view(xa.data(), {16}), dion::host_view(ga.data(), {16}));
    opt.step();
    adam.step();
    _mm_setcsr(saved);
    x.insert(x.end(), xt.begin(), xt.end());
    x.insert(x.end(), xa.begin(), xa.end());
    return x;
  };
  const auto off = run(false), on = run(true);
  REQUIRE(dion_test::all_finite(off));
  REQUIRE(dion_test::all_finite(on));
  CHECK(dion_test::max_abs_diff(off, on) < 1e-5);
}
#endif
