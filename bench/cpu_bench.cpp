// dion's CPU (Eigen backend) benchmark: Eigen's own fp32 GEMM throughput (the reference), one Polar
// Express orthogonalization through the Eigen backend (fp32 and bf16 storage) as a fraction of it,
// and every optimizer's step on a shape set that fits a small machine; each with 1 and 2 threads
// (Eigen::setNbThreads; needs OpenMP, which the target links when CMake finds it). Host clock,
// warm-up, median of the repetitions. JSON lines, like dion_cuda_bench.
//
//   dion_cpu_bench [--out results.jsonl] [--set mini] [--threads 1,2] [--reps N] [--smoke]
//
// --smoke: tiny shapes, one repetition, checks only that everything runs (the ctest `bench_cpu_smoke`).
#include <Eigen/Core>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_common.hpp"
#include "dion/dion.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using namespace dion_bench;
using dion::bf16;
using dion::EigenBackend;
using dion::HostSpace;
using Clock = std::chrono::steady_clock;

Sink g_sink;
std::string g_env;

Stats time_it(int warm, int reps, const std::function<void()>& f, const std::function<void(int)>& prep = [](int) {}) {
  std::vector<double> t;
  double first = 0;
  for (int i = 0; i < warm + reps; ++i) {
    prep(i);
    const auto a = Clock::now();
    f();
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - a).count();
    if (i == 0) first = ms;
    if (i >= warm) t.push_back(ms);
  }
  return stats_of(std::move(t), first);
}

template <class T>
dion::Mat<T, HostSpace> pk(void* p, std::int64_t b, std::int64_t r, std::int64_t c) {
  return dion::packed<T, HostSpace>(static_cast<T*>(p), b, r, c);
}
template <class T>
void randomize(EigenBackend& be, void* p, std::int64_t n, std::uint64_t seed, float sd = 1.0f) {
  be.randn(pk<T>(p, 1, 1, n), seed, 1, 0, 0, n, sd);
}

/// Eigen's own fp32 GEMM (n×n·n×n) in GFLOP/s with the current thread count.
double eigen_gemm_gflops(std::int64_t n, int reps) {
  Eigen::MatrixXf a = Eigen::MatrixXf::Random(n, n), b = Eigen::MatrixXf::Random(n, n), c(n, n);
  const auto st = time_it(1, reps, [&] { c.noalias() = a * b; });
  return 2.0 * n * n * n / (st.median_ms * 1e-3) / 1e9;
}

template <class T>
void bench_ortho(EigenBackend& be, int threads, std::int64_t m, std::int64_t n, double gemm_gflops, int reps,
                 const char* tname) {
  const std::int64_t e = m * n;
  auto src = be.alloc_bytes(e * sizeof(T)), X = be.alloc_bytes(e * sizeof(T));
  auto scratch = be.alloc_bytes(dion::ortho::scratch_elems(1, m, n) * sizeof(T));
  auto norms = be.alloc_bytes(64);
  randomize<T>(be, src.data(), e, 3);
  // Eigen's own GEMM of the same shapes as the iteration's products (s×l · l×s), timed interleaved
  // with the orthogonalization (ABAB…) so that load from other processes hits both alike; the
  // fraction uses the minima (the least disturbed runs) as well as the medians.
  const std::int64_t sd = std::min(m, n), l = std::max(m, n);
  Eigen::MatrixXf ga = Eigen::MatrixXf::Random(sd, l), gc(sd, sd);
  std::vector<double> to, tg;
  double first = 0;
  for (int i = 0; i < reps + 1; ++i) {
    std::memcpy(X.data(), src.data(), e * sizeof(T));
    auto a = Clock::now();
    dion::ortho::orthogonalize(be, dion::Orthogonalizer::polar_express, 5, 1e-7f, pk<T>(X.data(), 1, m, n),
                               static_cast<T*>(scratch.data()), static_cast<float*>(norms.data()));
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - a).count();
    a = Clock::now();
    gc.noalias() = ga * ga.transpose();
    const double gms = std::chrono::duration<double, std::milli>(Clock::now() - a).count();
    if (i == 0) first = ms;
    else to.push_back(ms), tg.push_back(gms);
  }
  const auto st = stats_of(to, first), sg = stats_of(tg, 0);
  const double flops = ns_flops(static_cast<double>(m), static_cast<double>(n));
  const double gflop = 2.0 * sd * sd * l;
  const double gf = flops / (st.median_ms * 1e-3) / 1e9, gf_min = flops / (st.min_ms * 1e-3) / 1e9;
  const double gg = gflop / (sg.median_ms * 1e-3) / 1e9, gg_min = gflop / (sg.min_ms * 1e-3) / 1e9;
  (void)gemm_gflops;
  Json j;
  j.s("bench", "ortho").s("backend", "eigen").s("what", std::string("polar_express ") + tname + " " + std::to_string(m) + "x" + std::to_string(n))
      .i("threads", threads).stats(st).n("flops", flops).n("gflops_full_count", gf, "%.2f").n("gflops_full_count_min", gf_min, "%.2f")
      .n("eigen_gemm_gflops", gg, "%.2f").n("eigen_gemm_gflops_min", gg_min, "%.2f")
      .n("fraction_of_eigen_gemm", gf / gg, "%.3f").n("fraction_of_eigen_gemm_min", gf_min / gg_min, "%.3f").raw(g_env);
  g_sink.emit(j);
}

struct HostModel {
  ShapeSet set;
  struct P {
    std::string name;
    std::int64_t r, c, off;
  };
  std::vector<P> ps;
  EigenBackend::RawBuffer x, g[2];
  HostModel(EigenBackend& be, const ShapeSet& s) : set(s) {
    std::int64_t off = 0;
    for (const auto& k : set.kinds)
      for (std::int64_t i = 0; i < k.count; ++i) {
        ps.push_back({k.name + "." + std::to_string(i), k.rows, k.cols, off});
        off += k.rows * k.cols;
      }
    x = be.alloc_bytes(off * 4);
    randomize<float>(be, x.data(), off, 5, 0.02f);
    for (int j = 0; j < 2; ++j) {
      g[j] = be.alloc_bytes(off * 4);
      randomize<float>(be, g[j].data(), off, 100 + j);
    }
  }
  dion::HostView v(void* base, const P& p) const { return dion::host_view(static_cast<float*>(base) + p.off, {p.r, p.c}); }
  template <class Opt>
  void add(Opt& opt) {
    auto grp = opt.add_group();
    for (const auto& p : ps) grp.add(p.name, v(x.data(), p), v(g[0].data(), p));
  }
  template <class Opt>
  void rotate(Opt& opt, int i) {
    for (const auto& p : ps) opt.set_grad(p.name, v(g[i % 2].data(), p));
  }
};

template <class Opt>
void bench_step(EigenBackend& be, HostModel& model, int threads, const std::string& key, const std::string& mname,
                dion::Options o, double rf, int reps) {
  Opt opt{be, o};
  model.add(opt);
  const auto st = time_it(1, reps, [&] { opt.step(); }, [&](int i) { model.rotate(opt, i); });
  const auto md = step_model(model.set, mname, 4, 0.25, rf);
  Json j;
  j.s("bench", "step").s("backend", "eigen").s("set", model.set.name).s("dtype", "fp32").s("opt", key).i("threads", threads)
      .i("params", model.set.params()).stats(st);
  j.n("flops", md.flops).n("gflops_full_count", md.flops / (st.median_ms * 1e-3) / 1e9, "%.2f");
  j.i("state_bytes", opt.state_bytes()).i("workspace_bytes", opt.workspace_bytes()).raw(g_env);
  g_sink.emit(j);
}

std::vector<int> parse_ints(const std::string& v) {
  std::vector<int> out;
  std::stringstream ss(v);
  std::string t;
  while (std::getline(ss, t, ','))
    if (!t.empty()) out.push_back(std::atoi(t.c_str()));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string out, set = "mini";
  std::vector<int> threads{1, 2};
  int reps = 5;
  bool smoke = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) out = argv[++i];
    else if (a == "--set" && i + 1 < argc) set = argv[++i];
    else if (a == "--threads" && i + 1 < argc) threads = parse_ints(argv[++i]);
    else if (a == "--reps" && i + 1 < argc) reps = std::max(1, std::atoi(argv[++i]));
    else if (a == "--smoke") smoke = true;
    else {
      std::fprintf(stderr, "usage: dion_cpu_bench [--out f.jsonl] [--set mini|tiny|gpt160m] [--threads 1,2] [--reps N] [--smoke]\n");
      return 2;
    }
  }
  if (smoke) {
    set = "tiny";
    reps = 1;
    threads = {1};
  }
  if (!out.empty()) g_sink.f = std::fopen(out.c_str(), "w");
  int omp = 0;
#if defined(_OPENMP)
  omp = 1;
#endif
  g_env = ",\"cpu_threads_available\":" + std::to_string(std::thread::hardware_concurrency()) + ",\"openmp\":" +
          std::to_string(omp) + ",\"eigen\":\"" + std::to_string(EIGEN_WORLD_VERSION) + "." +
          std::to_string(EIGEN_MAJOR_VERSION) + "." + std::to_string(EIGEN_MINOR_VERSION) + "\"";
  try {
    for (const int t : threads) {
      Eigen::setNbThreads(t);
#if defined(_OPENMP)
      omp_set_num_threads(t);
#endif
      EigenBackend be;
      const std::int64_t gn = smoke ? 128 : 1024;
      const double gemm = eigen_gemm_gflops(gn, smoke ? 1 : 5);
      {
        Json j;
        j.s("bench", "calibration").s("backend", "eigen").i("threads", t).i("gemm_n", gn)
            .n("eigen_gemm_gflops", gemm, "%.2f").raw(g_env);
        g_sink.emit(j);
      }
      const int orep = smoke ? 1 : 7;
      if (smoke) {
        bench_ortho<float>(be, t, 64, 96, gemm, orep, "fp32");
      } else {
        bench_ortho<float>(be, t, 512, 512, gemm, orep, "fp32");
        bench_ortho<float>(be, t, 512, 1792, gemm, orep, "fp32");
        bench_ortho<float>(be, t, 768, 768, gemm, orep, "fp32");
        bench_ortho<bf16>(be, t, 512, 512, gemm, orep, "bf16");
      }
      HostModel model(be, shape_set(set));
      dion::Options o;
      o.non_finite = dion::NonFinitePolicy::propagate;
      bench_step<dion::Muon<EigenBackend>>(be, model, t, "muon", "muon", o, 0, reps);
      bench_step<dion::NorMuon<EigenBackend>>(be, model, t, "normuon", "normuon", o, 0, reps);
      {
        dion::Options d = o;
        d.fraction = 0.25;
        bench_step<dion::Dion2<EigenBackend>>(be, model, t, "dion2_a0.25", "dion2", d, 0, reps);
        bench_step<dion::NorDion2<EigenBackend>>(be, model, t, "nordion2_a0.25", "nordion2", d, 0, reps);
      }
      for (const double rf : {1.0 / 16, 0.25, 1.0}) {
        dion::Options d = o;
        d.rank_fraction = rf;
        const std::string k = rf >= 0.99 ? "dion_r1" : rf >= 0.2 ? "dion_r0.25" : "dion_r0.0625";
        bench_step<dion::Dion<EigenBackend>>(be, model, t, k, "dion", d, rf, reps);
      }
      bench_step<dion::Lion<EigenBackend>>(be, model, t, "lion", "lion", o, 0, reps);
      bench_step<dion::AdamW<EigenBackend>>(be, model, t, "adamw", "adamw", o, 0, reps);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dion_cpu_bench: %s\n", e.what());
    return 1;  // a run that throws is broken code, not a slow machine: the smoke test must see it
  }
  if (g_sink.f) std::fclose(g_sink.f);
  return 0;
}
