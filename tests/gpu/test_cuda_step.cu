// Step semantics on the CUDA backend: a CUDA-graph capture of step() replays like eager steps (lr
// changed between replays is honoured), step() allocates no device memory, and 64-bit offsets (a
// bf16 batch whose elements lie beyond 2^31) are indexed correctly.
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

/// A parameter/gradient pair on the device (fp32, packed) with a host mirror for uploads.
struct DevParam {
  std::string name;
  dion::Shape shape;
  DevMem x, g;
  std::size_t n;
  DevParam(std::string nm, dion::Shape s) : name(std::move(nm)), shape(s), n(static_cast<std::size_t>(s.numel())) {
    x = DevMem(n * sizeof(float));
    g = DevMem(n * sizeof(float));
  }
  dion::CudaView xv() { return dion::cuda_view(static_cast<float*>(x.p), shape); }
  dion::CudaView gv() { return dion::cuda_view(static_cast<float*>(g.p), shape); }
  void put(DevMem& m, const std::vector<float>& v, cudaStream_t s) {
    cuda_ok(cudaStreamSynchronize(s), "put sync");  // a step in flight may still read m
    cuda_ok(cudaMemcpyAsync(m.p, v.data(), n * sizeof(float), cudaMemcpyHostToDevice, s), "put");
    cuda_ok(cudaStreamSynchronize(s), "put sync");
  }
  std::vector<float> get_x() const {
    device_sync("get");
    std::vector<float> v(n);
    cuda_ok(cudaMemcpy(v.data(), x.p, n * sizeof(float), cudaMemcpyDeviceToHost), "get");
    return v;
  }
};

std::vector<float> randv(std::mt19937& rng, std::size_t n, float s = 1.0f) {
  std::normal_distribution<float> nd(0.0f, s);
  std::vector<float> v(n);
  for (auto& e : v) e = nd(rng);
  return v;
}

/// Muon group (three matrices, two of one shape), an AdamW group and a Lion group.
template <class Opt>
struct Model {
  std::vector<std::unique_ptr<DevParam>> ps;
  void build(Opt& opt) {
    ps.push_back(std::make_unique<DevParam>("w1", dion::Shape{64, 48}));
    ps.push_back(std::make_unique<DevParam>("w2", dion::Shape{64, 48}));
    ps.push_back(std::make_unique<DevParam>("w3", dion::Shape{3, 32, 16}));
    ps.push_back(std::make_unique<DevParam>("b1", dion::Shape{37}));
    ps.push_back(std::make_unique<DevParam>("b2", dion::Shape{5, 7}));
    auto g0 = opt.add_group();
    for (int i = 0; i < 3; ++i) g0.add(ps[i]->name, ps[i]->xv(), ps[i]->gv());
    opt.add_group({.algorithm = dion::Algorithm::adamw, .lr = 0.003f}).add(ps[3]->name, ps[3]->xv(), ps[3]->gv());
    opt.add_group({.algorithm = dion::Algorithm::lion, .lr = 0.001f}).add(ps[4]->name, ps[4]->xv(), ps[4]->gv());
  }
};

}  // namespace

TEST_CASE("cuda graph: one captured step() replayed 10 times with changing lr equals 10 eager steps", "[gpu][graph]") {
  dion::Options o;
  o.lr = 0.02f;
  o.non_finite = dion::NonFinitePolicy::propagate;  // the finiteness check needs a host sync
  CudaEnv ee, ge;
  dion::Muon<dion::CudaBackend> eager{*ee.be, o};
  dion::Muon<dion::CudaBackend> graph{*ge.be, o};
  Model<dion::Muon<dion::CudaBackend>> me, mg;
  me.build(eager);
  mg.build(graph);
  std::mt19937 rng(99);
  for (std::size_t i = 0; i < me.ps.size(); ++i) {
    const auto x0 = randv(rng, me.ps[i]->n);
    me.ps[i]->put(me.ps[i]->x, x0, ee.stream);
    mg.ps[i]->put(mg.ps[i]->x, x0, ge.stream);
  }
  auto feed = [&](int step) {
    std::mt19937 r(1000 + step);
    for (std::size_t i = 0; i < me.ps.size(); ++i) {
      const auto g = randv(r, me.ps[i]->n);
      me.ps[i]->put(me.ps[i]->g, g, ee.stream);
      mg.ps[i]->put(mg.ps[i]->g, g, ge.stream);
    }
  };
  // one eager step on both (module loading, cuBLAS heuristics), then capture
  feed(0);
  eager.step();
  graph.step();
  ee.sync();
  ge.sync();

  cudaGraph_t g = nullptr;
  cudaGraphExec_t exec = nullptr;
  cuda_ok(cudaStreamBeginCapture(ge.stream, cudaStreamCaptureModeThreadLocal), "begin capture");
  graph.step();
  cuda_ok(cudaStreamEndCapture(ge.stream, &g), "end capture");
  cuda_ok(cudaGraphInstantiate(&exec, g, 0), "instantiate");

  for (int s = 1; s <= 10; ++s) {
    const float lr = 0.02f * static_cast<float>(11 - s) / 10.0f;  // a schedule: 0.02 → 0.002
    for (auto* opt : {&eager, &graph}) {
      opt->set_lr(0, lr);
      opt->set_lr(1, 0.15f * lr);
      opt->set_lr(2, 0.05f * lr);
      opt->set_weight_decay(0, 0.01f * static_cast<float>(s));
    }
    feed(s);
    eager.step();
    cuda_ok(cudaGraphLaunch(exec, ge.stream), "graph launch");
    ee.sync();
    ge.sync();
  }
  double worst = 0;
  for (std::size_t i = 0; i < me.ps.size(); ++i) {
    const double e = rel_err(mg.ps[i]->get_x(), me.ps[i]->get_x());
    INFO(me.ps[i]->name << ": graph vs eager " << e);
    CHECK(e <= 1e-6);
    worst = std::max(worst, e);
  }
  for (const auto& s : eager.state()) {
    const double e = rel_err(graph.read_state(s.name), eager.read_state(s.name));
    INFO(s.name << ": graph vs eager " << e);
    CHECK(e <= 1e-6);
    worst = std::max(worst, e);
  }
  errors().add("graph replay vs eager (10 steps, changing lr)", worst, 1e-6);
  // the AdamW step counter advanced on the device at every replay
  CHECK(graph.read_state("b1/step_dev")[0] == 11.0f);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(g);
}

namespace {
template <class Opt>
void check_no_alloc(const char* what, dion::Options o, dion::GroupOptions g, bool matrices_only) {
  CudaEnv env;
  Opt opt{*env.be, o};
  std::vector<std::unique_ptr<DevParam>> ps;
  ps.push_back(std::make_unique<DevParam>("w1", dion::Shape{64, 48}));
  ps.push_back(std::make_unique<DevParam>("w2", dion::Shape{64, 48}));
  ps.push_back(std::make_unique<DevParam>("w3", dion::Shape{37, 53}));
  ps.push_back(std::make_unique<DevParam>("w4", dion::Shape{96, 256}));
  auto grp = opt.add_group(g);
  for (auto& p : ps) grp.add(p->name, p->xv(), p->gv());
  if (!matrices_only) {
    ps.push_back(std::make_unique<DevParam>("b1", dion::Shape{37}));
    opt.add_group({.algorithm = dion::Algorithm::adamw}).add("b1", ps.back()->xv(), ps.back()->gv());
    ps.push_back(std::make_unique<DevParam>("b2", dion::Shape{3, 5}));
    opt.add_group({.algorithm = dion::Algorithm::lion}).add("b2", ps.back()->xv(), ps.back()->gv());
  }
  std::mt19937 rng(5);
  for (auto& p : ps) {
    p->put(p->x, randv(rng, p->n), env.stream);
    p->put(p->g, randv(rng, p->n), env.stream);
  }
  const std::size_t a0 = env.be->allocation_count();
  opt.step();  // the first step allocates nothing in the backend either
  env.sync();
  const std::size_t a1 = env.be->allocation_count();
  std::size_t free0 = 0, free1 = 0, total = 0;
  cuda_ok(cudaMemGetInfo(&free0, &total), "cudaMemGetInfo");
  for (int i = 0; i < 3; ++i) opt.step();
  env.sync();
  cuda_ok(cudaMemGetInfo(&free1, &total), "cudaMemGetInfo");
  const std::size_t a2 = env.be->allocation_count();
  INFO(what << ": backend allocations " << a0 << " -> " << a1 << " -> " << a2 << ", free device memory " << free0
            << " -> " << free1);
  CHECK(a1 == a0);
  CHECK(a2 == a0);
  CHECK(free1 == free0);
  errors().add(std::string("no allocation in step: ") + what,
               static_cast<double>(a2 - a0) + (free1 == free0 ? 0.0 : 1.0), 0.0);
}
}  // namespace

TEST_CASE("cuda step: no device allocation inside step() for any optimizer", "[gpu][alloc]") {
  dion::Options o;
  check_no_alloc<dion::Muon<dion::CudaBackend>>("muon", o, {}, false);
  check_no_alloc<dion::NorMuon<dion::CudaBackend, dion::SingleProcess, dion::precision::Fp32>>("normuon", o, {}, false);
  check_no_alloc<dion::Dion2<dion::CudaBackend>>("dion2", o, {}, false);
  check_no_alloc<dion::NorDion2<dion::CudaBackend>>("nordion2", o, {}, false);
  for (auto qm : {dion::QrMethod::rcqr, dion::QrMethod::cqr, dion::QrMethod::qr}) {
    dion::Options d = o;
    d.rank_fraction = 0.25;
    d.qr_method = qm;
    d.cqr_warmup_steps = 0;
    check_no_alloc<dion::Dion<dion::CudaBackend>>((std::string("dion ") + dion::qr_method_name(qm)).c_str(), d, {},
                                                  false);
  }
}

TEST_CASE("cuda 64-bit offsets: a bf16 batch whose elements lie beyond 2^31", "[gpu][int64]") {
  CudaEnv env;
  auto& be = *env.be;
  dion::EigenBackend cpu;
  const std::int64_t rows = 48, cols = 40;
  const std::int64_t stride = (std::int64_t{1} << 30) + 4099;  // matrix 2 starts at 2^31 + 8198 elements
  const std::int64_t span = 2 * stride + rows * cols;
  REQUIRE(2 * stride > (std::int64_t{1} << 31));
  DevMem big(static_cast<std::size_t>(span) * sizeof(bf16));  // ~4.3 GB
  bf16* base = static_cast<bf16*>(big.p);
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  // host reference: the same 3 matrices, packed; sentinels right after each matrix
  std::vector<bf16> hx(static_cast<std::size_t>(3 * rows * cols));
  for (auto& v : hx) v = bf16(nd(rng));
  const bf16 sentinel(123.0f);
  for (int b = 0; b < 3; ++b) {
    cuda_ok(cudaMemcpy(base + b * stride, hx.data() + b * rows * cols, rows * cols * sizeof(bf16), cudaMemcpyHostToDevice), "up");
    if (b < 2)
      cuda_ok(cudaMemcpy(base + b * stride + rows * cols, &sentinel, sizeof(bf16), cudaMemcpyHostToDevice), "sentinel");
  }
  device_sync("uploaded");
  const dion::Mat<bf16, dion::CudaSpace> Xd{base, 3, rows, cols, cols, stride};
  const auto Xh = dion::packed<bf16>(hx.data(), 3, rows, cols);
  auto fetch = [&](std::int64_t b) {
    device_sync("fetch");
    std::vector<bf16> v(static_cast<std::size_t>(rows * cols));
    cuda_ok(cudaMemcpy(v.data(), base + b * stride, v.size() * sizeof(bf16), cudaMemcpyDeviceToHost), "down");
    return v;
  };
  auto rel_vs_host = [&](const std::vector<bf16>& hostv) {
    double num = 0, den = 0;
    for (int b = 0; b < 3; ++b) {
      const auto got = fetch(b);
      for (std::int64_t e = 0; e < rows * cols; ++e) {
        const double r = static_cast<float>(hostv[static_cast<std::size_t>(b * rows * cols + e)]);
        const double gv = static_cast<float>(got[static_cast<std::size_t>(e)]);
        num += (gv - r) * (gv - r);
        den += r * r;
      }
    }
    return std::sqrt(num / den);
  };
  // reductions and element-wise ops on the strided batch
  {
    std::vector<float> hn(3);
    DevArray<float> dn(hn);
    cpu.frob_norms(Xh, hn.data());
    be.frob_norms(Xd, dn.p());
    const double e = rel_err(dn.get(), hn);
    errors().add("int64 offsets: frob_norms", e, 1e-6);
    CHECK(e <= 1e-6);
    DevArray<float> dn2(hn);
    cpu.scale_by_norm(Xh, hn.data(), 1.0f, 1e-7f);
    be.scale_by_norm(Xd, dn2.p(), 1.0f, 1e-7f);
    const double e2 = rel_vs_host(hx);
    errors().add("int64 offsets: scale_by_norm", e2, 1e-6);
    CHECK(e2 <= 1e-6);
  }
  // strided-batched GEMM with a batch stride beyond 2^31 elements: C = X·Xᵀ, packed output
  {
    std::vector<bf16> hc(static_cast<std::size_t>(3 * rows * rows));
    DevArray<bf16> dc(hc);
    cpu.gemm(dion::Op::N, dion::Op::T, 1.0f, Xh, Xh, 0.0f, dion::packed<bf16>(hc.data(), 3, rows, rows));
    be.gemm(dion::Op::N, dion::Op::T, 1.0f, Xd, Xd, 0.0f, dion::packed<bf16, dion::CudaSpace>(dc.p(), 3, rows, rows));
    const auto gc = dc.get();
    std::vector<float> a(gc.size()), b(gc.size());
    for (std::size_t i = 0; i < gc.size(); ++i) {
      a[i] = static_cast<float>(gc[i]);
      b[i] = static_cast<float>(hc[i]);
    }
    const double e = rel_err(a, b);
    errors().add("int64 offsets: gemm (batch stride > 2^31)", e, 1e-2);
    CHECK(e <= 1e-2);
  }
  // a whole Muon step on the strided bf16 parameter (precision::Fp32: fp32 orthogonalization)
  {
    std::vector<bf16> hg(hx.size());
    for (auto& v : hg) v = bf16(nd(rng));
    DevArray<bf16> dg(hg);
    dion::Options o;
    o.lr = 0.05f;
    dion::Muon<dion::EigenBackend, dion::SingleProcess, dion::precision::Fp32> ho{cpu, o};
    dion::Muon<dion::CudaBackend, dion::SingleProcess, dion::precision::Fp32> dopt{be, o};
    ho.add_group().add("x", dion::host_view(hx.data(), {3, rows, cols}), dion::host_view(hg.data(), {3, rows, cols}));
    dopt.add_group().add("x", dion::cuda_view(base, {3, rows, cols}, cols, stride),
                         dion::cuda_view(dg.p(), {3, rows, cols}));
    for (int s = 0; s < 2; ++s) {
      ho.step();
      dopt.step();
    }
    env.sync();
    const double e = rel_vs_host(hx);
    errors().add("int64 offsets: Muon step on a strided bf16 batch", e, 1e-2);
    CHECK(e <= 1e-2);
    const double em = rel_err(dopt.read_state("x/momentum"), ho.read_state("x/momentum"));
    CHECK(em <= 1e-6);
  }
  // nothing outside the matrices was written
  device_sync("sentinel");
  for (int b = 0; b < 2; ++b) {
    bf16 s;
    cuda_ok(cudaMemcpy(&s, base + b * stride + rows * cols, sizeof(bf16), cudaMemcpyDeviceToHost), "sentinel");
    CHECK(s.bits == sentinel.bits);
  }
}

namespace {
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

/// Three steps of Opt on fresh backends: parameters and every state tensor, as raw floats.
template <class Opt>
std::vector<std::vector<float>> three_steps(dion::Options o) {
  CudaEnv env;
  Opt opt{*env.be, o};
  std::vector<std::unique_ptr<DevParam>> ps;
  ps.push_back(std::make_unique<DevParam>("w1", dion::Shape{64, 48}));
  ps.push_back(std::make_unique<DevParam>("w2", dion::Shape{64, 48}));
  ps.push_back(std::make_unique<DevParam>("w3", dion::Shape{37, 53}));
  auto g = opt.add_group();
  for (auto& p : ps) g.add(p->name, p->xv(), p->gv());
  ps.push_back(std::make_unique<DevParam>("b", dion::Shape{37}));
  opt.add_group({.algorithm = dion::Algorithm::adamw}).add("b", ps.back()->xv(), ps.back()->gv());
  std::mt19937 rng(3);
  for (auto& p : ps) p->put(p->x, randv(rng, p->n), env.stream);
  for (int s = 0; s < 3; ++s) {
    for (auto& p : ps) p->put(p->g, randv(rng, p->n), env.stream);
    opt.step();
  }
  env.sync();
  std::vector<std::vector<float>> out;
  for (auto& p : ps) out.push_back(p->get_x());
  for (const auto& s : opt.state()) out.push_back(opt.read_state(s.name));
  return out;
}
}  // namespace

TEST_CASE("cuda determinism: bitwise reproducible steps; dion's own reductions do not depend on the batch",
          "[gpu][determinism]") {
  // run to run: same inputs, same bits (no floating-point atomics anywhere in dion's kernels)
  dion::Options o;
  o.non_finite = dion::NonFinitePolicy::propagate;
  CHECK(three_steps<dion::Muon<dion::CudaBackend>>(o) == three_steps<dion::Muon<dion::CudaBackend>>(o));
  CHECK(three_steps<dion::NorMuon<dion::CudaBackend>>(o) == three_steps<dion::NorMuon<dion::CudaBackend>>(o));
  CHECK(three_steps<dion::NorDion2<dion::CudaBackend>>(o) == three_steps<dion::NorDion2<dion::CudaBackend>>(o));
  dion::Options d = o;
  d.rank_fraction = 0.5;
  CHECK(three_steps<dion::Dion<dion::CudaBackend>>(d) == three_steps<dion::Dion<dion::CudaBackend>>(d));

  // batch invariance of the reductions: a matrix alone or in a batch of 3 gives the same bits
  CudaEnv env;
  auto& be = *env.be;
  std::mt19937 rng(8);
  for (std::int64_t cols : {std::int64_t{40}, std::int64_t{3000}}) {
    const std::int64_t B = 3, rows = 33;
    Pair<float> X(B, rows, cols), O(B, rows, cols), V(B, rows, 1);
    X.randomize(rng);
    O.randomize(rng);
    V.randomize(rng, 0.01f);
    for (auto& v : V.host) v = std::fabs(v);
    X.upload();
    O.upload();
    V.upload();
    DevArray<float> nb(std::vector<float>(3)), lrwd(std::vector<float>{0.02f, 0.1f});
    be.frob_norms(X.d(), nb.p());
    const auto batched = nb.get();
    be.normuon_update(X.d(), O.d(), V.d(), 0.95f, 1.0f, lrwd.p(), lrwd.p() + 1, 1.0f, false);
    const auto xb = X.download();
    for (std::int64_t b = 0; b < B; ++b) {
      Pair<float> X1(1, rows, cols), O1(1, rows, cols), V1(1, rows, 1);
      std::copy(X.host.begin() + b * rows * cols, X.host.begin() + (b + 1) * rows * cols, X1.host.begin());
      std::copy(O.host.begin() + b * rows * cols, O.host.begin() + (b + 1) * rows * cols, O1.host.begin());
      std::copy(V.host.begin() + b * rows, V.host.begin() + (b + 1) * rows, V1.host.begin());
      X1.upload();
      O1.upload();
      V1.upload();
      DevArray<float> n1(std::vector<float>(1));
      be.frob_norms(X1.d(), n1.p());
      CHECK(std::memcmp(&n1.get()[0], &batched[static_cast<std::size_t>(b)], sizeof(float)) == 0);
      be.normuon_update(X1.d(), O1.d(), V1.d(), 0.95f, 1.0f, lrwd.p(), lrwd.p() + 1, 1.0f, false);
      const auto x1 = X1.download();
      CHECK(same_bits(x1, std::vector<float>(xb.begin() + b * rows * cols, xb.begin() + (b + 1) * rows * cols)));
    }
  }
}

namespace {
/// Default policy (skip_step) under graph capture: the skip is decided on the device, so step()
/// captures; replays with a NaN or Inf gradient change nothing but the skip counter, and the graph
/// follows an eager twin step for step. `dion` uses 2-D shapes only.
template <class Opt>
void skip_under_graph(const char* what, dion::Options o, bool dion, double tol_param, double tol_state) {
  CudaEnv ee, ge;
  Opt eager{*ee.be, o};
  Opt graph{*ge.be, o};
  std::vector<std::unique_ptr<DevParam>> pe, pg;
  auto build = [&](Opt& opt, std::vector<std::unique_ptr<DevParam>>& ps) {
    ps.push_back(std::make_unique<DevParam>("w1", dion::Shape{64, 48}));
    ps.push_back(std::make_unique<DevParam>("w2", dion::Shape{64, 48}));
    ps.push_back(std::make_unique<DevParam>("w3", dion ? dion::Shape{37, 53} : dion::Shape{3, 32, 16}));
    ps.push_back(std::make_unique<DevParam>("w4", dion::Shape{48, 96}));
    ps.push_back(std::make_unique<DevParam>("b1", dion::Shape{37}));
    ps.push_back(std::make_unique<DevParam>("b2", dion::Shape{5, 7}));
    auto g0 = opt.add_group();
    for (int i = 0; i < 4; ++i) g0.add(ps[i]->name, ps[i]->xv(), ps[i]->gv());
    opt.add_group({.algorithm = dion::Algorithm::adamw, .lr = 0.003f}).add(ps[4]->name, ps[4]->xv(), ps[4]->gv());
    opt.add_group({.algorithm = dion::Algorithm::lion, .lr = 0.001f}).add(ps[5]->name, ps[5]->xv(), ps[5]->gv());
  };
  build(eager, pe);
  build(graph, pg);
  std::mt19937 rng(41);
  for (std::size_t i = 0; i < pe.size(); ++i) {
    const auto x0 = randv(rng, pe[i]->n);
    pe[i]->put(pe[i]->x, x0, ee.stream);
    pg[i]->put(pg[i]->x, x0, ge.stream);
  }
  auto feed = [&](int step) {
    std::mt19937 r(500 + step);
    for (std::size_t i = 0; i < pe.size(); ++i) {
      auto g = randv(r, pe[i]->n);
      if (step == 3 && i == 0) g[17] = std::nanf("");
      if (step == 4 && i == 4) g[3] = -INFINITY;
      if (step == 5 && i == 2) g[0] = INFINITY;
      pe[i]->put(pe[i]->g, g, ee.stream);
      pg[i]->put(pg[i]->g, g, ge.stream);
    }
  };
  auto snapshot = [&](Opt& opt, std::vector<std::unique_ptr<DevParam>>& ps) {
    std::vector<std::vector<float>> v;
    for (auto& p : ps) v.push_back(p->get_x());
    for (const auto& s : opt.state()) v.push_back(opt.read_state(s.name));
    return v;
  };
  feed(0);
  eager.step();
  graph.step();
  ee.sync();
  ge.sync();
  cudaGraph_t g = nullptr;
  cudaGraphExec_t exec = nullptr;
  cuda_ok(cudaStreamBeginCapture(ge.stream, cudaStreamCaptureModeThreadLocal), "begin capture");
  graph.step();  // a host synchronization in step() would fail the capture
  cuda_ok(cudaStreamEndCapture(ge.stream, &g), "end capture");
  cuda_ok(cudaGraphInstantiate(&exec, g, 0), "instantiate");
  int skipped = 0;
  for (int s = 1; s <= 7; ++s) {
    feed(s);
    const bool bad = s >= 3 && s <= 5;
    const auto before_e = bad ? snapshot(eager, pe) : std::vector<std::vector<float>>{};
    const auto before_g = bad ? snapshot(graph, pg) : std::vector<std::vector<float>>{};
    eager.step();
    cuda_ok(cudaGraphLaunch(exec, ge.stream), "graph launch");
    ee.sync();
    ge.sync();
    if (bad) {
      ++skipped;
      INFO(what << ": step " << s << " has a non-finite gradient");
      CHECK(snapshot(eager, pe) == before_e);  // bitwise: parameters and every state tensor
      CHECK(snapshot(graph, pg) == before_g);
      CHECK(eager.last_step_skipped());
      CHECK(graph.last_step_skipped());
    } else {
      CHECK_FALSE(eager.last_step_skipped());
    }
  }
  CHECK(eager.skipped_steps() == skipped);
  CHECK(graph.skipped_steps() == skipped);
  CHECK(eager.step_count(0) == 1 + 7 - skipped);
  CHECK(eager.step_count(1) == 1 + 7 - skipped);
  double worst = 0;
  const auto se = snapshot(eager, pe), sg = snapshot(graph, pg);
  for (std::size_t i = 0; i < se.size(); ++i) {
    const double e = rel_err(sg[i], se[i]);
    INFO(what << ": tensor " << i << ": graph vs eager " << e);
    CHECK(e <= (i < pe.size() ? tol_param : tol_state));
    if (i < pe.size()) worst = std::max(worst, e);
  }
  errors().add(std::string("skip_step under graph capture, params graph vs eager: ") + what, worst, tol_param);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(g);
}
}  // namespace

TEST_CASE("cuda graph: the default skip_step policy is captured; non-finite replays change nothing", "[gpu][graph][skip]") {
  dion::Options o;
  o.lr = 0.02f;
  REQUIRE(o.non_finite == dion::NonFinitePolicy::skip_step);
  skip_under_graph<dion::Muon<dion::CudaBackend>>("muon", o, false, 1e-6, 1e-6);
  skip_under_graph<dion::NorMuon<dion::CudaBackend>>("normuon", o, false, 1e-6, 1e-6);
  skip_under_graph<dion::Dion2<dion::CudaBackend>>("dion2", o, false, 1e-6, 1e-6);
  skip_under_graph<dion::NorDion2<dion::CudaBackend>>("nordion2", o, false, 1e-6, 1e-6);
  dion::Options d = o;
  d.rank_fraction = 0.25;
  d.qr_method = dion::QrMethod::qr;
  skip_under_graph<dion::Dion<dion::CudaBackend>>("dion qr", d, true, 1e-6, 1e-6);
  // rcqr: the captured sketch stream is the capture step's (the eager twin draws a new one each
  // step), which may flip columns of Q but leaves the weights equal
  d.qr_method = dion::QrMethod::rcqr;
  skip_under_graph<dion::Dion<dion::CudaBackend>>("dion rcqr", d, true, 1e-4, 2.1);
}
