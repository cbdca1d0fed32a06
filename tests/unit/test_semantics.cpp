// Semantics of SPEC §5 and DESIGN's views, for every optimizer: determinism; num_heads equals a 3-D
// parameter; split_sizes equals separate block parameters; state names, shapes, dtypes and zero
// initialization; megabatching and workspace chunking change nothing; strided parameters equal
// packed copies and their padding is never written (A11); bf16 parameters; flatten; set_lr; mixed
// and per-group hyperparameters.
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "backend_env.hpp"
#include "catch_compat.hpp"
#include "test_util.hpp"

using dion::Algorithm;
using dion::AdjustLr;
using dion::GroupOptions;
using dion::Options;
using dion::Shape;

namespace {

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
template <class B, class F>
void for_each_muon_family(F&& f) {
  f.template operator()<dion::Muon<B>>();
  f.template operator()<dion::NorMuon<B>>();
  f.template operator()<dion::Dion2<B>>();
  f.template operator()<dion::NorDion2<B>>();
}

const char* alg_name(Algorithm a) { return dion::algorithm_name(a); }

bool results_equal(const dion_test::RunResult& a, const dion_test::RunResult& b) {
  if (a.params.size() != b.params.size()) return false;
  for (std::size_t i = 0; i < a.params.size(); ++i)
    if (!dion_test::bits_equal(a.params[i], b.params[i])) return false;
  return dion_test::snapshots_equal(a.state, b.state);
}

}  // namespace

TEMPLATE_TEST_CASE("semantics: two identical runs are bitwise equal (D1)", "[semantics][determinism]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  for_each_optimizer<TestType>([&]<class Opt>() {
    INFO(alg_name(Opt::default_algorithm));
    const auto pb = dion_test::make_problem({{"a", {48, 32}}, {"b", {32, 48}}, {"c", {48, 32}}}, 3, 71);
    const Options o{.rank_fraction = 0.5};
    const auto r1 = dion_test::run_problem<Opt>(env, o, pb, 3);
    const auto r2 = dion_test::run_problem<Opt>(env, o, pb, 3);
    CHECK(results_equal(r1, r2));
    for (std::size_t i = 0; i < pb.params.size(); ++i) CHECK_FALSE(dion_test::bits_equal(r1.params[i], pb.init[i]));
  });
}

TEMPLATE_TEST_CASE("semantics: num_heads = H on an (H*h, in) weight equals a 3-D (H, h, in) parameter",
                   "[semantics][num_heads]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const int H = 4;
  const auto pb2 = dion_test::make_problem({{"w", {4 * 8, 16}}}, 3, 72);
  dion_test::Problem pb3 = pb2;
  pb3.params[0].shape = Shape{4, 8, 16};
  struct Variant {
    const char* name;
    Options o;
  };
  for (const auto& v : {Variant{"defaults", Options{}}, Variant{"nesterov", Options{.nesterov = true}},
                        Variant{"fraction 0.5", Options{.fraction = 0.5}}, Variant{"fraction 1.0", Options{.fraction = 1.0}}}) {
    for_each_muon_family<TestType>([&]<class Opt>() {
      const auto used = dion::detail::keys_used(Opt::default_algorithm);
      if (v.o.nesterov && !(used & dion::detail::kNesterov)) return;
      if (v.o.fraction != 0.25 && !(used & dion::detail::kFraction)) return;
      INFO(alg_name(Opt::default_algorithm) << ", " << v.name);
      const auto heads = dion_test::run_problem<Opt>(env, v.o, pb2, 3, GroupOptions{.num_heads = H});
      const auto three = dion_test::run_problem<Opt>(env, v.o, pb3, 3);
      CHECK(dion_test::bits_equal(heads.params[0], three.params[0]));
      CHECK(dion_test::bits_equal(heads.state.at("w/momentum"), three.state.at("w/momentum")));
      if (heads.state.count("w/variance_neuron")) {
        CHECK(heads.state_shapes.at("w/variance_neuron") == std::vector<std::int64_t>{32, 1});
        CHECK(three.state_shapes.at("w/variance_neuron") == std::vector<std::int64_t>{4, 8, 1});
        CHECK(dion_test::bits_equal(heads.state.at("w/variance_neuron"), three.state.at("w/variance_neuron")));
      }
      // and it is not the same as treating the weight as one matrix
      const auto whole = dion_test::run_problem<Opt>(env, v.o, pb2, 3);
      CHECK(dion_test::max_abs_diff(whole.params[0], heads.params[0]) > 1e-4);
      // num_heads = 1 is the default
      const auto one = dion_test::run_problem<Opt>(env, v.o, pb2, 3, GroupOptions{.num_heads = 1});
      CHECK(dion_test::bits_equal(one.params[0], whole.params[0]));
    });
  }
}

TEMPLATE_TEST_CASE("semantics: split_sizes equals separate block parameters (Muon, NorMuon)", "[semantics][split_sizes]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  struct Variant {
    const char* name;
    Options o;
    std::vector<std::int64_t> split;
    bool normuon_too;
  };
  const Variant v = GENERATE(Variant{"spectral", Options{}, {32, 16, 16}, true},
                             Variant{"rms", Options{.adjust_lr = AdjustLr::rms_norm}, {32, 16, 16}, true},
                             Variant{"none", Options{.adjust_lr = AdjustLr::none}, {32, 16, 16}, false},
                             Variant{"nesterov", Options{.nesterov = true}, {32, 16, 16}, false},
                             Variant{"equal blocks", Options{}, {16, 16, 16, 16}, false});
  INFO("variant " << v.name);
  const int steps = 3;
  const auto fused = dion_test::make_problem({{"qkv", {64, 32}}}, steps, 73);
  dion_test::Problem blocks;
  std::int64_t r0 = 0;
  for (std::size_t b = 0; b < v.split.size(); ++b) {
    const std::int64_t h = v.split[b];
    blocks.params.push_back({dion_test::indexed("blk", b), {h, 32}});
    blocks.init.emplace_back(fused.init[0].begin() + r0 * 32, fused.init[0].begin() + (r0 + h) * 32);
    r0 += h;
  }
  blocks.grads.resize(steps);
  for (int k = 0; k < steps; ++k) {
    r0 = 0;
    for (const auto h : v.split) {
      const auto& g = fused.grads[static_cast<std::size_t>(k)][0];
      blocks.grads[static_cast<std::size_t>(k)].emplace_back(g.begin() + r0 * 32, g.begin() + (r0 + h) * 32);
      r0 += h;
    }
  }
  auto check = [&]<class Opt>(bool nor) {
    INFO((nor ? "normuon" : "muon"));
    const auto f = dion_test::run_problem<Opt>(env, v.o, fused, steps, GroupOptions{.split_sizes = v.split});
    const auto s = dion_test::run_problem<Opt>(env, v.o, blocks, steps);
    CHECK(f.state_shapes.at("qkv/momentum") == std::vector<std::int64_t>{64, 32});  // momentum stays fused
    r0 = 0;
    for (std::size_t b = 0; b < v.split.size(); ++b) {
      INFO("block " << b);
      const std::int64_t h = v.split[b];
      const std::vector<float> fb(f.params[0].begin() + r0 * 32, f.params[0].begin() + (r0 + h) * 32);
      // the same orthogonalized block; only lr·s_full·(s_block/s_full) vs lr·s_block rounds differently
      CHECK(dion_test::max_abs_diff(fb, s.params[b]) < 1e-6);
      CHECK(dion_test::max_abs_diff(fb, blocks.init[b]) > 1e-3);
      const auto& fm = f.state.at("qkv/momentum");
      CHECK(dion_test::bits_equal(std::vector<float>(fm.begin() + r0 * 32, fm.begin() + (r0 + h) * 32),
                                  s.state.at(dion_test::indexed("blk", b) + "/momentum")));
      if (nor) {
        // SPEC 1.2 step 11: a block's stored V is split_scale² times a separate parameter's
        const double sf = dion_test::adjust_factor(v.o.adjust_lr, 64, 32), sb = dion_test::adjust_factor(v.o.adjust_lr, h, 32);
        const double scale2 = (sb / sf) * (sb / sf);
        const auto& fv = f.state.at("qkv/variance_neuron");
        const auto& sv = s.state.at(dion_test::indexed("blk", b) + "/variance_neuron");
        for (std::int64_t i = 0; i < h; ++i)
          CHECK(fv[static_cast<std::size_t>(r0 + i)] == Approx(scale2 * sv[static_cast<std::size_t>(i)]).epsilon(1e-5));
      }
      r0 += h;
    }
  };
  check.template operator()<dion::Muon<TestType>>(false);
  if (v.normuon_too) check.template operator()<dion::NorMuon<TestType>>(true);
}

TEMPLATE_TEST_CASE("semantics: state names, shapes and dtypes after registration; zero before the first step",
                   "[semantics][state]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  auto w = env.template alloc<float>(64 * 32);
  auto w3 = env.template alloc<float>(2 * 8 * 16);
  auto b = env.template alloc<float>(32);
  auto c = env.template alloc<float>(32);
  auto h = env.template alloc<dion::bf16>(48 * 16);
  struct Expect {
    std::string name;
    std::vector<std::int64_t> shape;
    dion::DType dtype;
  };
  using dion::DType;
  auto check = [&]<class Opt>(const std::vector<Expect>& expect) {
    INFO(alg_name(Opt::default_algorithm));
    Opt opt{env.backend(), {.rank_fraction = 0.5}};
    auto g = opt.add_group();
    g.add("w", env.view(w, {64, 32}));
    if (Opt::default_algorithm != Algorithm::dion) g.add("w3", env.view(w3, {2, 8, 16}));
    g.add("h", env.view(h, {48, 16}));
    opt.add_group({.algorithm = Algorithm::adamw}).add("b", env.view(b, {32}));
    opt.add_group({.algorithm = Algorithm::lion}).add("c", env.view(c, {32}));
    const auto st = opt.state();
    REQUIRE(st.size() == expect.size());
    for (std::size_t i = 0; i < st.size(); ++i) {
      INFO("state " << i << ": " << st[i].name);
      CHECK(st[i].name == expect[i].name);
      CHECK(st[i].key == expect[i].name.substr(expect[i].name.find('/') + 1));
      std::vector<std::int64_t> shp;
      for (int d = 0; d < st[i].view.shape.ndim; ++d) shp.push_back(st[i].view.shape[d]);
      CHECK(shp == expect[i].shape);
      CHECK(st[i].view.dtype == expect[i].dtype);
      const auto v = opt.read_state(st[i].name);
      if (st[i].key != "Q")
        for (float e : v) REQUIRE(e == 0.0f);
    }
    CHECK(opt.param_names() == (Opt::default_algorithm == Algorithm::dion
                                    ? std::vector<std::string>{"w", "h", "b", "c"}
                                    : std::vector<std::string>{"w", "w3", "h", "b", "c"}));
    CHECK(opt.state_bytes() > 0);
  };
  const std::vector<Expect> scalar_tail{{"b/momentum", {32}, DType::f32},
                                        {"b/variance", {32}, DType::f32},
                                        {"b/step_dev", {}, DType::f32},
                                        {"c/momentum", {32}, DType::f32}};
  auto with_tail = [&](std::vector<Expect> e) {
    e.insert(e.end(), scalar_tail.begin(), scalar_tail.end());
    return e;
  };
  check.template operator()<dion::Muon<TestType>>(with_tail(
      {{"w/momentum", {64, 32}, DType::f32}, {"w3/momentum", {2, 8, 16}, DType::f32}, {"h/momentum", {48, 16}, DType::bf16}}));
  check.template operator()<dion::Dion2<TestType>>(with_tail(
      {{"w/momentum", {64, 32}, DType::f32}, {"w3/momentum", {2, 8, 16}, DType::f32}, {"h/momentum", {48, 16}, DType::bf16}}));
  const std::vector<Expect> nor{{"w/momentum", {64, 32}, DType::f32},
                                {"w/variance_neuron", {64, 1}, DType::f32},
                                {"w3/momentum", {2, 8, 16}, DType::f32},
                                {"w3/variance_neuron", {2, 8, 1}, DType::f32},
                                {"h/momentum", {48, 16}, DType::bf16},
                                {"h/variance_neuron", {48, 1}, DType::bf16}};
  check.template operator()<dion::NorMuon<TestType>>(with_tail(nor));
  check.template operator()<dion::NorDion2<TestType>>(with_tail(nor));
  // Dion: Q is (min(m, n), r) — (n, r) here, r = 0.5·min; no step_dev key (microsoft/dion keeps it on the host)
  check.template operator()<dion::Dion<TestType>>({{"w/momentum", {64, 32}, DType::f32},
                                                   {"w/Q", {32, 16}, DType::f32},
                                                   {"h/momentum", {48, 16}, DType::bf16},
                                                   {"h/Q", {16, 8}, DType::bf16},
                                                   {"b/momentum", {32}, DType::f32},
                                                   {"b/variance", {32}, DType::f32},
                                                   {"c/momentum", {32}, DType::f32}});
  // precision policies decide the state types
  dion::Muon<TestType, dion::SingleProcess, dion::precision::Fp32> f32{env.backend()};
  f32.add_group().add("h", env.view(h, {48, 16}));
  CHECK(f32.state("h/momentum").view.dtype == DType::f32);
  dion::NorMuon<TestType, dion::SingleProcess, dion::precision::Bf16States> b16{env.backend()};
  b16.add_group().add("w", env.view(w, {64, 32}));
  CHECK(b16.state("w/momentum").view.dtype == DType::bf16);
  CHECK(b16.state("w/variance_neuron").view.dtype == DType::bf16);
}

TEMPLATE_TEST_CASE("semantics: after one Muon step the momentum equals the gradient exactly", "[semantics][muon]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const auto pb = dion_test::make_problem({{"a", {64, 128}}, {"b", {128, 64}}}, 1, 74);
  const auto r = dion_test::run_problem<dion::Muon<TestType>>(env, Options{}, pb, 1);
  CHECK(dion_test::bits_equal(r.state.at("a/momentum"), pb.grads[0][0]));
  CHECK(dion_test::bits_equal(r.state.at("b/momentum"), pb.grads[0][1]));
}

TEMPLATE_TEST_CASE("semantics: megabatching (5 same-shape parameters) equals each parameter alone",
                   "[semantics][megabatch]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  for_each_optimizer<TestType>([&]<class Opt>() {
    INFO(alg_name(Opt::default_algorithm));
    const auto pb = dion_test::make_problem(
        {{"p0", {32, 48}}, {"p1", {32, 48}}, {"p2", {32, 48}}, {"p3", {32, 48}}, {"p4", {32, 48}}}, 3, 75);
    const Options o{.rank_fraction = 0.5};
    const auto together = dion_test::run_problem<Opt>(env, o, pb, 3);
    for (std::size_t i = 0; i < pb.params.size(); ++i) {
      INFO("parameter " << i);
      dion_test::Problem one;
      one.params = {pb.params[i]};
      one.init = {pb.init[i]};
      for (const auto& g : pb.grads) one.grads.push_back({g[i]});
      const auto alone = dion_test::run_problem<Opt>(env, o, one, 3);
      CHECK(dion_test::bits_equal(together.params[i], alone.params[0]));
      for (const auto& [k, v] : alone.state) CHECK(dion_test::bits_equal(together.state.at(k), v));
    }
  });
}

TEMPLATE_TEST_CASE("semantics: a tiny workspace_limit_bytes (one matrix per chunk) gives bitwise the same result",
                   "[semantics][workspace]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  for_each_optimizer<TestType>([&]<class Opt>() {
    INFO(alg_name(Opt::default_algorithm));
    std::vector<dion_test::ParamSpec> ps{{"p0", {24, 40}}, {"p1", {24, 40}}, {"p2", {24, 40}}, {"q", {40, 24}}};
    if (Opt::default_algorithm != Algorithm::dion) ps.push_back({"batched", {3, 24, 40}});  // split across chunks
    const auto pb = dion_test::make_problem(ps, 3, 76);
    Options big{.rank_fraction = 0.5};
    Options small = big;
    small.workspace_limit_bytes = 1;
    const auto a = dion_test::run_problem<Opt>(env, big, pb, 3);
    const auto b = dion_test::run_problem<Opt>(env, small, pb, 3);
    CHECK(results_equal(a, b));
    // and the workspace really is smaller (one matrix instead of the whole same-shape batch)
    if constexpr (!dion::is_scalar_algorithm(Opt::default_algorithm)) {
      auto x = env.template alloc<float>(5 * 24 * 40);
      Opt oa{env.backend(), big}, ob{env.backend(), small};
      auto ga = oa.add_group();
      auto gb = ob.add_group();
      for (int i = 0; i < 5; ++i) {
        ga.add(dion_test::indexed("p", i), env.view(x, {24, 40}, -1, -1, static_cast<std::size_t>(i * 960)));
        gb.add(dion_test::indexed("p", i), env.view(x, {24, 40}, -1, -1, static_cast<std::size_t>(i * 960)));
      }
      CHECK(ob.workspace_bytes() < oa.workspace_bytes());
    }
  });
}

TEMPLATE_TEST_CASE("semantics: strided parameters equal packed copies, and the padding is never written (A11)",
                   "[semantics][strided]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  for_each_optimizer<TestType>([&]<class Opt>() {
    INFO(alg_name(Opt::default_algorithm));
    const bool dion_alg = Opt::default_algorithm == Algorithm::dion;
    const Shape s = dion_alg ? Shape{24, 40} : Shape{2, 24, 40};
    const auto L = dion_test::layout_of(s);
    const std::int64_t ld = L.cols + 5, bs = L.rows * ld + 13;  // padding after each row and each matrix
    const auto pb = dion_test::make_problem({{"w", s}}, 3, 77);
    // packed run
    const auto packed = dion_test::run_problem<Opt>(env, {.rank_fraction = 0.5}, pb, 3);
    // strided run: sentinel values in the padding
    const std::size_t total = static_cast<std::size_t>(L.batch * bs);
    std::vector<float> xs(total, 12345.0f), gs(total, -777.0f);
    auto scatter = [&](std::vector<float>& dst, const std::vector<float>& src) {
      for (std::int64_t b = 0; b < L.batch; ++b)
        for (std::int64_t i = 0; i < L.rows; ++i)
          for (std::int64_t j = 0; j < L.cols; ++j)
            dst[static_cast<std::size_t>(b * bs + i * ld + j)] = src[static_cast<std::size_t>((b * L.rows + i) * L.cols + j)];
    };
    scatter(xs, pb.init[0]);
    auto x = env.upload(xs);
    auto g = env.upload(gs);
    Opt opt{env.backend(), {.rank_fraction = 0.5}};
    opt.add_group().add("w", env.view(x, s, ld, bs), env.view(g, s, ld, bs));
    for (int k = 0; k < 3; ++k) {
      std::vector<float> gk = gs;
      scatter(gk, pb.grads[static_cast<std::size_t>(k)][0]);
      env.write(g, gk);
      opt.step();
    }
    const auto got = env.download(x);
    std::vector<float> expect(total, 12345.0f);
    scatter(expect, packed.params[0]);
    CHECK(dion_test::bits_equal(got, expect));
    for (const auto& [k, v] : packed.state) CHECK(dion_test::bits_equal(opt.read_state(k), v));
  });
}

TEMPLATE_TEST_CASE("semantics: bf16 parameters and gradients work and follow the fp32 run", "[semantics][bf16]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  for_each_optimizer<TestType>([&]<class Opt>() {
    INFO(alg_name(Opt::default_algorithm));
    auto pb = dion_test::make_problem({{"a", {32, 48}}, {"b", {48, 32}}}, 3, 78, 0.1f);
    for (auto& v : pb.init) v = dion_test::round_bf16(v);
    for (auto& s : pb.grads)
      for (auto& v : s) v = dion_test::round_bf16(v);
    // fraction 1.0: Dion2's top-k selection is discontinuous (bf16 momentum near-ties pick other
    // slices than fp32), so compare with every slice selected
    const Options o{.lr = 0.1f, .fraction = 1.0, .rank_fraction = 0.5};
    const auto f32 = dion_test::run_problem<Opt>(env, o, pb, 3);
    Opt opt{env.backend(), o};
    auto grp = opt.add_group();
    std::vector<dion_test::DeviceBuffer<dion::bf16, TestType>> xs, gs;
    for (std::size_t i = 0; i < 2; ++i) {
      xs.push_back(env.upload(dion_test::to_bf16(pb.init[i])));
      gs.push_back(env.template alloc<dion::bf16>(pb.numel(i)));
      grp.add(pb.params[i].name, env.view(xs[i], pb.params[i].shape), env.view(gs[i], pb.params[i].shape));
    }
    for (int k = 0; k < 3; ++k) {
      for (std::size_t i = 0; i < 2; ++i) env.write(gs[i], dion_test::to_bf16(pb.grads[static_cast<std::size_t>(k)][i]));
      opt.step();
    }
    for (std::size_t i = 0; i < 2; ++i) {
      INFO("parameter " << pb.params[i].name);
      const auto got = dion_test::from_bf16(env.download(xs[i]));
      REQUIRE(dion_test::all_finite(got));
      const std::vector<double> ref(f32.params[i].begin(), f32.params[i].end());
      const double err = dion_test::update_rel_err(got, ref, pb.init[i]);
      INFO("update error vs the fp32 run " << err);
      CHECK(err < 0.1);
      CHECK(opt.state(pb.params[i].name + "/momentum").view.dtype == dion::DType::bf16);
    }
  });
}

TEMPLATE_TEST_CASE("semantics: flatten orthogonalizes a 3-D parameter as one (d0, d1*d2) matrix",
                   "[semantics][flatten]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const auto pb3 = dion_test::make_problem({{"w", {8, 4, 6}}, {"v", {8, 4, 6}}}, 3, 79);
  dion_test::Problem pb2 = pb3;
  pb2.params[0].shape = Shape{8, 24};
  pb2.params[1].shape = Shape{8, 24};
  auto check = [&]<class Opt>() {
    INFO(alg_name(Opt::default_algorithm));
    const auto flat = dion_test::run_problem<Opt>(env, Options{.flatten = true}, pb3, 3);
    const auto two = dion_test::run_problem<Opt>(env, Options{}, pb2, 3);
    const auto batched = dion_test::run_problem<Opt>(env, Options{}, pb3, 3);
    for (std::size_t i = 0; i < 2; ++i) {
      // per parameter, never across the two same-shape parameters (SPEC deliberate difference 1)
      CHECK(dion_test::bits_equal(flat.params[i], two.params[i]));
      CHECK(dion_test::max_abs_diff(flat.params[i], batched.params[i]) > 1e-4);
    }
  };
  check.template operator()<dion::Muon<TestType>>();
  check.template operator()<dion::Dion2<TestType>>();
}

TEMPLATE_TEST_CASE("semantics: set_lr and set_weight_decay change the next update exactly like construction values",
                   "[semantics][lr]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  for_each_optimizer<TestType>([&]<class Opt>() {
    INFO(alg_name(Opt::default_algorithm));
    const auto pb = dion_test::make_problem({{"w", {32, 48}}}, 3, 80);
    auto run = [&](float lr0, float lr_later, float wd_later) {
      Opt opt{env.backend(), {.lr = lr0, .rank_fraction = 0.5}};
      auto x = env.upload(pb.init[0]);
      auto g = env.template alloc<float>(pb.numel(0));
      opt.add_group().add("w", env.view(x, {32, 48}), env.view(g, {32, 48}));
      for (int k = 0; k < 3; ++k) {
        if (k == 1) {
          opt.set_lr(0, lr_later);
          opt.set_weight_decay(0, wd_later);
          CHECK(opt.lr(0) == lr_later);
          CHECK(opt.weight_decay(0) == wd_later);
        }
        env.write(g, pb.grads[static_cast<std::size_t>(k)][0]);
        opt.step();
      }
      return env.download(x);
    };
    const auto constant = run(0.01f, 0.01f, 0.01f);
    const auto scheduled = run(0.01f, 0.003f, 0.2f);
    const auto scheduled2 = run(0.01f, 0.003f, 0.2f);
    CHECK(dion_test::bits_equal(scheduled, scheduled2));
    CHECK(dion_test::max_abs_diff(constant, scheduled) > 1e-4);
    // set before the first step == given at construction
    Opt a{env.backend(), {.lr = 0.05f, .rank_fraction = 0.5}}, b{env.backend(), {.rank_fraction = 0.5}};
    auto xa = env.upload(pb.init[0]), xb = env.upload(pb.init[0]);
    auto g = env.upload(pb.grads[0][0]);
    a.add_group().add("w", env.view(xa, {32, 48}), env.view(g, {32, 48}));
    b.add_group().add("w", env.view(xb, {32, 48}), env.view(g, {32, 48}));
    b.set_lr(0, 0.05f);
    a.step();
    b.step();
    CHECK(dion_test::bits_equal(env.download(xa), env.download(xb)));
  });
}

TEMPLATE_TEST_CASE("semantics: groups keep their own algorithm and hyperparameters", "[semantics][groups]",
                   DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  const auto pb = dion_test::make_problem({{"w", {32, 48}}, {"frozen", {32, 48}}, {"bias", {48}}}, 3, 81);
  auto check = [&]<class Opt>(Algorithm scalar) {
    INFO(alg_name(Opt::default_algorithm) << " + " << alg_name(scalar));
    Opt opt{env.backend()};
    auto xw = env.upload(pb.init[0]), xf = env.upload(pb.init[1]), xb = env.upload(pb.init[2]);
    auto gw = env.template alloc<float>(pb.numel(0)), gf = env.template alloc<float>(pb.numel(1)),
         gb = env.template alloc<float>(pb.numel(2));
    opt.add_group().add("w", env.view(xw, {32, 48}), env.view(gw, {32, 48}));
    opt.add_group({.lr = 0.0f}).add("frozen", env.view(xf, {32, 48}), env.view(gf, {32, 48}));
    opt.add_group({.algorithm = scalar, .lr = 3e-3f}).add("bias", env.view(xb, {48}), env.view(gb, {48}));
    for (int k = 0; k < 3; ++k) {
      env.write(gw, pb.grads[static_cast<std::size_t>(k)][0]);
      env.write(gf, pb.grads[static_cast<std::size_t>(k)][1]);
      env.write(gb, pb.grads[static_cast<std::size_t>(k)][2]);
      opt.step();
    }
    CHECK(opt.step_count(0) == 3);
    CHECK(opt.step_count(2) == 3);
    CHECK(dion_test::bits_equal(env.download(xf), pb.init[1]));  // lr = 0 in its own group only
    // the matrix group equals the optimizer alone; the scalar group equals Lion / AdamW alone
    dion_test::Problem pw;
    pw.params = {pb.params[0]};
    pw.init = {pb.init[0]};
    for (const auto& g : pb.grads) pw.grads.push_back({g[0]});
    CHECK(dion_test::bits_equal(env.download(xw), dion_test::run_problem<Opt>(env, Options{}, pw, 3).params[0]));
    dion_test::Problem pbias;
    pbias.params = {pb.params[2]};
    pbias.init = {pb.init[2]};
    for (const auto& g : pb.grads) pbias.grads.push_back({g[2]});
    const auto alone = scalar == Algorithm::lion
                           ? dion_test::run_problem<dion::Lion<TestType>>(env, Options{.lr = 3e-3f}, pbias, 3)
                           : dion_test::run_problem<dion::AdamW<TestType>>(env, Options{.lr = 3e-3f}, pbias, 3);
    CHECK(dion_test::bits_equal(env.download(xb), alone.params[0]));
  };
  check.template operator()<dion::Muon<TestType>>(Algorithm::adamw);
  check.template operator()<dion::NorMuon<TestType>>(Algorithm::lion);
  check.template operator()<dion::Dion2<TestType>>(Algorithm::adamw);
  check.template operator()<dion::NorDion2<TestType>>(Algorithm::lion);
  check.template operator()<dion::Dion<TestType>>(Algorithm::adamw);
}

TEMPLATE_TEST_CASE("semantics: registering parameters and groups after steps, and repointing gradients",
                   "[semantics][groups]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  for_each_optimizer<TestType>([&]<class Opt>() {
    INFO(alg_name(Opt::default_algorithm));
    const auto pb = dion_test::make_problem({{"w", {32, 48}}, {"v", {32, 48}}, {"late", {64, 96}}}, 4, 82);
    // reference: w and v alone, 4 steps
    dion_test::Problem two;
    two.params = {pb.params[0], pb.params[1]};
    two.init = {pb.init[0], pb.init[1]};
    for (const auto& g : pb.grads) two.grads.push_back({g[0], g[1]});
    const Options o{.rank_fraction = 0.5};
    const auto ref = dion_test::run_problem<Opt>(env, o, two, 4);
    // the same, but after 2 steps a larger parameter (no gradient) and a new group join, and the
    // gradients are repointed to fresh buffers with set_grad
    Opt opt{env.backend(), o};
    auto xw = env.upload(pb.init[0]), xv = env.upload(pb.init[1]), xl = env.upload(pb.init[2]);
    auto gw = env.template alloc<float>(pb.numel(0)), gv = env.template alloc<float>(pb.numel(1));
    auto gw2 = env.template alloc<float>(pb.numel(0)), gv2 = env.template alloc<float>(pb.numel(1));
    opt.add_group().add("w", env.view(xw, {32, 48}), env.view(gw, {32, 48})).add("v", env.view(xv, {32, 48}), env.view(gv, {32, 48}));
    for (int k = 0; k < 4; ++k) {
      if (k == 2) {
        const auto ws = opt.workspace_bytes();
        opt.group(0).add("late", env.view(xl, {64, 96}));
        opt.add_group({.algorithm = Algorithm::lion});
        CHECK(opt.workspace_bytes() >= ws);
        opt.set_grad("w", env.view(gw2, {32, 48}));
        opt.set_grad("v", env.view(gv2, {32, 48}));
      }
      env.write(k < 2 ? gw : gw2, pb.grads[static_cast<std::size_t>(k)][0]);
      env.write(k < 2 ? gv : gv2, pb.grads[static_cast<std::size_t>(k)][1]);
      opt.step();
    }
    CHECK(dion_test::bits_equal(env.download(xw), ref.params[0]));
    CHECK(dion_test::bits_equal(env.download(xv), ref.params[1]));
    CHECK(dion_test::bits_equal(env.download(xl), pb.init[2]));
    for (const auto& [k, v] : ref.state) CHECK(dion_test::bits_equal(opt.read_state(k), v));
  });
}

namespace {
/// 3 steps, copy every exported state tensor and the group step counters into a fresh optimizer over
/// the same parameter memory, 2 more steps: must equal 5 uninterrupted steps bitwise.
template <class Opt, class B>
void check_resume(dion_test::BackendEnv<B>& env) {
  INFO(alg_name(Opt::default_algorithm));
  const auto pb = dion_test::make_problem({{"w", {32, 48}}, {"v", {48, 32}}, {"bias", {48}}}, 5, 83);
  const Options o{.rank_fraction = 0.5};
  auto build = [&](Opt& opt, std::vector<dion_test::DeviceBuffer<float, B>>& xs,
                   std::vector<dion_test::DeviceBuffer<float, B>>& gs) {
    for (std::size_t i = 0; i < 3; ++i) {
      xs.push_back(env.upload(pb.init[i]));
      gs.push_back(env.template alloc<float>(pb.numel(i)));
    }
    opt.add_group()
        .add("w", env.view(xs[0], {32, 48}), env.view(gs[0], {32, 48}))
        .add("v", env.view(xs[1], {48, 32}), env.view(gs[1], {48, 32}));
    opt.add_group({.algorithm = Algorithm::adamw}).add("bias", env.view(xs[2], {48}), env.view(gs[2], {48}));
  };
  auto step = [&](Opt& opt, std::vector<dion_test::DeviceBuffer<float, B>>& gs, int k) {
    for (std::size_t i = 0; i < 3; ++i) env.write(gs[i], pb.grads[static_cast<std::size_t>(k)][i]);
    opt.step();
  };
  Opt a{env.backend(), o};
  std::vector<dion_test::DeviceBuffer<float, B>> xa, ga;
  build(a, xa, ga);
  for (int k = 0; k < 5; ++k) step(a, ga, k);

  Opt b{env.backend(), o};
  std::vector<dion_test::DeviceBuffer<float, B>> xb, gb;
  build(b, xb, gb);
  for (int k = 0; k < 3; ++k) step(b, gb, k);
  Opt c{env.backend(), o};  // the "restored" optimizer over b's parameter memory
  c.add_group()
      .add("w", env.view(xb[0], {32, 48}), env.view(gb[0], {32, 48}))
      .add("v", env.view(xb[1], {48, 32}), env.view(gb[1], {48, 32}));
  c.add_group({.algorithm = Algorithm::adamw}).add("bias", env.view(xb[2], {48}), env.view(gb[2], {48}));
  for (const auto& s : b.state()) c.write_state(s.name, b.read_state(s.name));
  for (int g = 0; g < b.num_groups(); ++g) c.set_step_count(g, b.step_count(g));
  for (int k = 3; k < 5; ++k) step(c, gb, k);
  for (std::size_t i = 0; i < 3; ++i) {
    INFO("parameter " << pb.params[i].name);
    CHECK(dion_test::bits_equal(env.download(xa[i]), env.download(xb[i])));
  }
}
}  // namespace

TEMPLATE_TEST_CASE("semantics: resuming from the exported state and step counts continues bitwise (C1 via state())",
                   "[semantics][state][resume]", DION_TEST_BACKENDS) {
  // Everything a checkpoint needs is reachable through state() / write_state() and the group step
  // counters (Dion: see the next test case).
  dion_test::BackendEnv<TestType> env;
  check_resume<dion::Muon<TestType>>(env);
  check_resume<dion::NorMuon<TestType>>(env);
  check_resume<dion::Dion2<TestType>>(env);
  check_resume<dion::NorDion2<TestType>>(env);
  check_resume<dion::Lion<TestType>>(env);
  check_resume<dion::AdamW<TestType>>(env);
}

// Dion's AdamW groups take the group step for bias correction (SPEC 1.8), restored by set_step_count.
TEMPLATE_TEST_CASE("semantics: resuming Dion (with an AdamW group) from the exported state continues bitwise",
                   "[semantics][state][resume][dion]", DION_TEST_BACKENDS) {
  dion_test::BackendEnv<TestType> env;
  check_resume<dion::Dion<TestType>>(env);
}
