// Every optimizer step on the CUDA backend against the same optimizer on the Eigen backend, on
// identical parameters and gradients: Muon, NorMuon, Dion2, NorDion2, Dion (rcqr, cqr, qr), Lion,
// AdamW; fp32 and bf16 parameters; precision::Fp32 and precision::Default; odd shapes (1×N, N×1,
// primes, ld > cols, 3-D batches, same-shape pairs that share one batched orthogonalization).
// Compared after 3 steps: parameters (relative to their norm, and the update relative to its norm)
// and every state tensor.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "catch_compat.hpp"
#include "gpu_common.hpp"

using dion::bf16;
using namespace dion_gpu_test;

namespace {

struct Spec {
  std::string name;
  dion::Shape shape;
  std::int64_t pad_ld = 0;  // 2-D only
};

std::vector<Spec> muon_specs() {
  return {{"a_1x33", {1, 33}}, {"b_33x1", {33, 1}},      {"c_37x53", {37, 53}},
          {"d_37x53", {37, 53}}, {"e_64x48", {64, 48}, 16}, {"f_3x17x29", {3, 17, 29}}};
}
std::vector<Spec> dion_specs() {
  return {{"a_1x33", {1, 33}},   {"b_33x1", {33, 1}},   {"c_37x53", {37, 53}}, {"d_53x37", {53, 37}},
          {"e_64x48", {64, 48}, 16}, {"f_64x64", {64, 64}}, {"g_64x64", {64, 64}}};
}
std::vector<Spec> scalar_specs() { return {{"v_37", {37}}, {"m_5x7", {5, 7}}, {"t_2x3x4", {2, 3, 4}}}; }

/// One parameter held twice: on the host (Eigen) and on the device (CUDA), same layout.
template <class T>
struct Param {
  Spec spec;
  std::int64_t rows = 1, cols = 1, ld = 1, batch = 1, span = 0;
  std::vector<T> hx, hg, x0;
  DevMem dx, dg;

  explicit Param(const Spec& s) : spec(s) {
    const auto& sh = s.shape;
    cols = sh.ndim >= 1 ? sh[sh.ndim - 1] : 1;
    rows = sh.ndim >= 2 ? sh[sh.ndim - 2] : 1;
    batch = 1;
    for (int i = 0; i + 2 < sh.ndim; ++i) batch *= sh[i];
    ld = cols + (sh.ndim == 2 ? s.pad_ld : 0);
    span = batch * rows * ld;
    hx.assign(static_cast<std::size_t>(span), from_f<T>(-5.0f));
    hg.assign(static_cast<std::size_t>(span), from_f<T>(-5.0f));
    dx = DevMem(static_cast<std::size_t>(span) * sizeof(T));
    dg = DevMem(static_cast<std::size_t>(span) * sizeof(T));
  }
  template <class F>
  void each(F&& f) {
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t j = 0; j < cols; ++j) f(static_cast<std::size_t>((b * rows + i) * ld + j));
  }
  dion::HostView hview() { return dion::host_view(hx.data(), spec.shape, spec.shape.ndim == 2 ? ld : -1); }
  dion::HostView hgview() { return dion::host_view(hg.data(), spec.shape, spec.shape.ndim == 2 ? ld : -1); }
  dion::CudaView dview() { return dion::cuda_view(static_cast<T*>(dx.p), spec.shape, spec.shape.ndim == 2 ? ld : -1); }
  dion::CudaView dgview() { return dion::cuda_view(static_cast<T*>(dg.p), spec.shape, spec.shape.ndim == 2 ? ld : -1); }
  // The previous step may still be reading the gradient: synchronize before overwriting it.
  void upload_x() {
    device_sync("upload x");
    cuda_ok(cudaMemcpy(dx.p, hx.data(), hx.size() * sizeof(T), cudaMemcpyHostToDevice), "upload x");
    device_sync("upload x");
  }
  void upload_g() {
    device_sync("upload g");
    cuda_ok(cudaMemcpy(dg.p, hg.data(), hg.size() * sizeof(T), cudaMemcpyHostToDevice), "upload g");
    device_sync("upload g");
  }
  std::vector<T> download_x() const {
    device_sync("download x");
    std::vector<T> v(hx.size());
    cuda_ok(cudaMemcpy(v.data(), dx.p, v.size() * sizeof(T), cudaMemcpyDeviceToHost), "download x");
    return v;
  }
};

struct Outcome {
  double param_rel = 0, update_rel = 0, state_rel = 0;
  bool padding_ok = true;
  std::string worst_state;
};

/// Run `steps` steps of HostOpt (Eigen) and DevOpt (CUDA) on the same data and compare.
template <class HostOpt, class DevOpt, class T>
Outcome run_case(const std::vector<Spec>& specs, const dion::Options& opts, const dion::GroupOptions& g, int steps,
                 std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  CudaEnv env;
  dion::EigenBackend cpu;
  HostOpt ho{cpu, opts};
  DevOpt dopt{*env.be, opts};
  std::vector<std::unique_ptr<Param<T>>> ps;
  auto hg = ho.add_group(g);
  auto dg = dopt.add_group(g);
  for (const auto& s : specs) {
    auto p = std::make_unique<Param<T>>(s);
    p->each([&](std::size_t o) { p->hx[o] = from_f<T>(nd(rng)); });
    p->x0 = p->hx;
    p->upload_x();
    p->upload_g();
    hg.add(s.name, p->hview(), p->hgview());
    dg.add(s.name, p->dview(), p->dgview());
    ps.push_back(std::move(p));
  }
  for (int k = 0; k < steps; ++k) {
    for (auto& p : ps) {
      p->each([&](std::size_t o) { p->hg[o] = from_f<T>(nd(rng)); });
      p->upload_g();
    }
    ho.step();
    dopt.step();
  }
  env.sync();
  Outcome out;
  for (auto& p : ps) {
    const auto got = p->download_x();
    double num = 0, den = 0, unum = 0, uden = 0;
    std::vector<char> inside(p->hx.size(), 0);
    p->each([&](std::size_t o) {
      inside[o] = 1;
      const double r = to_f(p->hx[o]), gv = to_f(got[o]), x0 = to_f(p->x0[o]);
      num += (gv - r) * (gv - r);
      den += r * r;
      unum += ((gv - x0) - (r - x0)) * ((gv - x0) - (r - x0));
      uden += (r - x0) * (r - x0);
    });
    for (std::size_t o = 0; o < inside.size(); ++o)
      if (!inside[o] && std::memcmp(&got[o], &p->hx[o], sizeof(T)) != 0) out.padding_ok = false;
    out.param_rel = std::max(out.param_rel, den > 0 ? std::sqrt(num / den) : std::sqrt(num));
    out.update_rel = std::max(out.update_rel, uden > 0 ? std::sqrt(unum / uden) : std::sqrt(unum));
  }
  for (const auto& s : ho.state()) {
    const auto a = ho.read_state(s.name);
    const auto b = dopt.read_state(s.name);
    if (s.key == "step_dev") {
      if (a != b) out.state_rel = 1;
      continue;
    }
    const double e = rel_err(b, a);
    if (e > out.state_rel || e != e) {
      out.state_rel = e != e ? 1e300 : e;
      out.worst_state = s.name;
    }
  }
  return out;
}

template <class T, class P>
void check_case(const std::string& name, const Outcome& o) {
  constexpr bool exact_setup = std::is_same_v<T, float> && std::is_same_v<P, dion::precision::Fp32>;
  const double ptol = exact_setup ? 1e-5 : 1e-2;
  const double stol = exact_setup ? 1e-4 : 5e-2;
  std::printf("step %-44s param %.2e  update %.2e  state %.2e %s\n", name.c_str(), o.param_rel, o.update_rel,
              o.state_rel, o.worst_state.c_str());
  errors().add("step param " + name, o.param_rel, ptol);
  errors().add("step state " + name, o.state_rel, stol);
  INFO(name << ": param " << o.param_rel << " update " << o.update_rel << " state " << o.state_rel << " ("
            << o.worst_state << ")");
  CHECK(o.param_rel <= ptol);
  CHECK(o.state_rel <= stol);
  CHECK(o.padding_ok);
  if constexpr (std::is_same_v<T, float>) {
    const double utol = exact_setup ? 1e-3 : 5e-2;
    errors().add("step update " + name, o.update_rel, utol);
    CHECK(o.update_rel <= utol);
  }
}

template <class T, class P>
std::string case_name(const char* alg) {
  return std::string(alg) + " " + tname<T>() + " " + (std::is_same_v<P, dion::precision::Fp32> ? "Fp32" : "Default");
}

#define DION_OPT_PAIR(Name, P) dion::Name<dion::EigenBackend, dion::SingleProcess, P>, dion::Name<dion::CudaBackend, dion::SingleProcess, P>

template <class T, class P>
void all_optimizers() {
  dion::Options base;
  base.lr = 0.02f;
  base.weight_decay = 0.1f;
  base.non_finite = dion::NonFinitePolicy::skip_step;
  {
    dion::Options o = base;
    o.nesterov = true;
    o.cautious_wd = true;
    const auto r = run_case<DION_OPT_PAIR(Muon, P), T>(muon_specs(), o, {}, 3, 11);
    check_case<T, P>(case_name<T, P>("muon"), r);
  }
  {
    const auto r = run_case<DION_OPT_PAIR(NorMuon, P), T>(muon_specs(), base, {}, 3, 12);
    check_case<T, P>(case_name<T, P>("normuon"), r);
  }
  {
    dion::Options o = base;
    o.fraction = 0.3;
    const auto r = run_case<DION_OPT_PAIR(Dion2, P), T>(muon_specs(), o, {}, 3, 13);
    check_case<T, P>(case_name<T, P>("dion2"), r);
  }
  {
    dion::Options o = base;
    o.fraction = 0.3;
    const auto r = run_case<DION_OPT_PAIR(NorDion2, P), T>(muon_specs(), o, {}, 3, 14);
    check_case<T, P>(case_name<T, P>("nordion2"), r);
  }
  for (auto qm : {dion::QrMethod::rcqr, dion::QrMethod::cqr, dion::QrMethod::qr}) {
    dion::Options o = base;
    o.rank_fraction = 0.5;
    o.qr_method = qm;
    o.cqr_warmup_steps = 0;
    const auto r = run_case<DION_OPT_PAIR(Dion, P), T>(dion_specs(), o, {}, 3, 15);
    check_case<T, P>(case_name<T, P>((std::string("dion ") + dion::qr_method_name(qm)).c_str()), r);
  }
  {
    dion::Options o = base;
    o.lr = 0.003f;
    o.cautious_wd = true;
    const auto r = run_case<DION_OPT_PAIR(Lion, P), T>(scalar_specs(), o, {}, 3, 16);
    check_case<T, P>(case_name<T, P>("lion"), r);
  }
  {
    dion::Options o = base;
    o.lr = 0.003f;
    const auto r = run_case<DION_OPT_PAIR(AdamW, P), T>(scalar_specs(), o, {}, 3, 17);
    check_case<T, P>(case_name<T, P>("adamw"), r);
  }
}

}  // namespace

TEST_CASE("cuda steps: every optimizer, fp32 params, precision::Fp32", "[gpu][step]") {
  all_optimizers<float, dion::precision::Fp32>();
}
TEST_CASE("cuda steps: every optimizer, fp32 params, precision::Default", "[gpu][step]") {
  all_optimizers<float, dion::precision::Default>();
}
TEST_CASE("cuda steps: every optimizer, bf16 params, precision::Fp32", "[gpu][step]") {
  all_optimizers<bf16, dion::precision::Fp32>();
}
TEST_CASE("cuda steps: every optimizer, bf16 params, precision::Default", "[gpu][step]") {
  all_optimizers<bf16, dion::precision::Default>();
}

TEST_CASE("cuda steps: Muon groups with lion/adamw groups, heads and flatten", "[gpu][step]") {
  // geometry variants of the Muon family: per-head and flattened 3-D
  dion::Options o;
  o.lr = 0.02f;
  {
    const auto r = run_case<DION_OPT_PAIR(Muon, dion::precision::Fp32), float>({{"qkv", {48, 40}}}, o,
                                                                              dion::GroupOptions{.num_heads = 4}, 3, 21);
    check_case<float, dion::precision::Fp32>("muon heads f32 Fp32", r);
  }
  {
    const auto r = run_case<DION_OPT_PAIR(NorMuon, dion::precision::Fp32), float>(
        {{"conv", {8, 3, 5, 5}}}, o, dion::GroupOptions{.flatten = true}, 3, 22);
    check_case<float, dion::precision::Fp32>("normuon flatten f32 Fp32", r);
  }
  {
    const auto r = run_case<DION_OPT_PAIR(Muon, dion::precision::Fp32), float>(
        {{"fused", {40, 24}}}, o, dion::GroupOptions{.split_sizes = std::vector<std::int64_t>{16, 24}}, 3, 23);
    check_case<float, dion::precision::Fp32>("muon split f32 Fp32", r);
  }
}
