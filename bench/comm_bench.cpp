// dion_comm_bench: the bytes each data-parallel optimizer step moves, measured by the communicator's
// own counters (dion::CommStats, comm/stats.hpp), against the model (SPEC §2.2, §2.5).
//
//   mpiexec -n 2 build/bench/dion_comm_bench [--set gpt160m] [--layers L] [--rank-fractions 0.25,0.0625]
//                                            [--steps 2] [--no-full-rank] [--out comm.jsonl]
//
// Rows (each on the same shape set, DDP over MpiComm in Mesh::replicate, Eigen backend):
//   grad all-reduce  the baseline: what plain data parallelism moves, an all-reduce (mean) of every
//                    gradient — done here through the same communicator, so it is counted the same way
//   dion rf=1        Dion at full rank: not compressed, so it averages the gradients itself (the
//                    baseline) and all-gathers P, the orthonormalization being split over the ranks
//   dion rf=x        compressed sync (replicate_mesh_grad_sync, (m+n)·r < m·n): P reduce-scattered and
//                    all-gathered, R all-reduced, the all-zero guard's flags all-reduced
//   muon             Muon DDP (gradients averaged by the caller, not counted): the all-gather of the
//                    orthogonalized bf16 blocks
// The counters are read around the last step (steady state: the first step also broadcasts Dion's Q).
// "bus" bytes are what a ring implementation moves through each rank's link (nccl-tests' busbw
// convention, CommStats): all-reduce 2(W−1)/W·S, reduce-scatter and all-gather (W−1)/W·S. The model
// column for Dion's compressed sync is 2(W−1)/W·Σ(m+n)·r·4 bytes (+ the flags), i.e. the ratio to the
// gradient all-reduce is Σ(m+n)·r / Σm·n; for Muon it is (W−1)/W·Σ_padded m·n·2. The step time is
// printed for orientation only (this is a byte count, not a timing benchmark; CPU, Eigen).
// A one-process run (-n 1) moves nothing: every row reads 0.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "dion/dion.hpp"
#include "dion/mpi.hpp"

namespace {

using dion_bench::ShapeSet;

struct Args {
  std::string set = "mini";
  int layers = 0;  // 0: the set's own
  std::vector<double> rank_fractions = {0.25, 0.0625};
  int steps = 2;
  bool full_rank = true;  // the Dion rf = 1 row (full-rank QR of every P: slow on large sets)
  std::string out;
};

int base_layers(const std::string& set) {
  if (set == "gpt160m") return 12;
  if (set == "mini") return 4;
  if (set == "tiny") return 1;
  if (set == "llama1b") return 16;
  if (set == "llama8b") return 32;
  return 1;
}

/// The set with its per-layer matrices repeated `layers` times (bytes per step scale with layers).
ShapeSet scaled(const std::string& name, int layers) {
  ShapeSet s = dion_bench::shape_set(name);
  if (layers <= 0) return s;
  const int L0 = base_layers(name);
  for (auto& k : s.kinds) k.count = std::max<std::int64_t>(1, k.count * layers / L0);
  s.name = name + "-" + std::to_string(layers) + "L";
  return s;
}

std::vector<double> parse_list(const std::string& s) {
  std::vector<double> v;
  std::stringstream ss(s);
  std::string t;
  while (std::getline(ss, t, ',')) v.push_back(std::atof(t.c_str()));
  return v;
}

/// The model's parameters and gradients (host memory; N(0, 0.02) weights, N(0, 1) gradients that
/// differ per rank and step).
struct ModelMem {
  std::vector<dion::Shape> shapes;
  std::vector<std::vector<float>> x, g;
  explicit ModelMem(const ShapeSet& s) {
    std::mt19937 gen(1);
    std::normal_distribution<float> d(0.0f, 0.02f);
    for (const auto& k : s.kinds)
      for (std::int64_t i = 0; i < k.count; ++i) {
        shapes.push_back({k.rows, k.cols});
        x.emplace_back(static_cast<std::size_t>(k.rows * k.cols));
        for (auto& v : x.back()) v = d(gen);
        g.emplace_back(static_cast<std::size_t>(k.rows * k.cols));
      }
  }
  void fill_grads(int rank, int step) {
    std::mt19937 gen(static_cast<unsigned>(1000 + 7919 * step + 104729 * rank));
    std::normal_distribution<float> d(0.0f, 1.0f);
    for (auto& gi : g)
      for (auto& v : gi) v = d(gen);
  }
  template <class Opt>
  void register_in(Opt& opt) {
    auto grp = opt.add_group();
    for (std::size_t i = 0; i < x.size(); ++i)
      grp.add("w" + std::to_string(i), dion::host_view(x[i].data(), shapes[i]), dion::host_view(g[i].data(), shapes[i]));
  }
};

struct Row {
  std::string what;
  double rank_fraction = 0;
  dion::CommStats s;
  double model_bus = 0;  // bytes per rank (bus convention)
  double step_ms = 0;
};

std::string fmt_bytes(double b) {
  char buf[64];
  if (b >= 1e9) std::snprintf(buf, sizeof buf, "%.3f GB", b / 1e9);
  else if (b >= 1e6) std::snprintf(buf, sizeof buf, "%.3f MB", b / 1e6);
  else if (b >= 1e3) std::snprintf(buf, sizeof buf, "%.2f kB", b / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f B", b);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", k.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (k == "--set") a.set = val();
    else if (k == "--layers") a.layers = std::atoi(val().c_str());
    else if (k == "--rank-fractions") a.rank_fractions = parse_list(val());
    else if (k == "--steps") a.steps = std::max(1, std::atoi(val().c_str()));
    else if (k == "--out") a.out = val();
    else if (k == "--no-full-rank") a.full_rank = false;
    else if (k == "--smoke") {
      a.set = "tiny";
      a.steps = 2;
      a.rank_fractions = {0.25};
    } else {
      std::fprintf(stderr,
                   "usage: dion_comm_bench [--set tiny|mini|gpt160m|llama1b|llama8b] [--layers L] "
                   "[--rank-fractions a,b] [--steps N] [--no-full-rank] [--out file.jsonl] [--smoke]\n");
      return 2;
    }
  }
  int rc = 0;
  {
    dion::MpiComm comm{MPI_COMM_WORLD, std::chrono::seconds(600)};
    const int W = comm.size(), me = comm.rank();
    const ShapeSet set = scaled(a.set, a.layers);
    ModelMem mem(set);
    dion::EigenBackend cpu;
    std::vector<Row> rows;
    const double ring_ar = 2.0 * (W - 1) / W, ring_ag = static_cast<double>(W - 1) / W;
    double sum_mn = 0;
    for (const auto& k : set.kinds) sum_mn += static_cast<double>(k.rows * k.cols * k.count);

    // The step loop shared by every row: counters read around the last step only.
    auto run = [&](auto& opt, const std::function<void()>& before_step) {
      dion::CommStats last;
      double ms = 0;
      for (int s = 0; s < a.steps; ++s) {
        mem.fill_grads(me, s);
        MPI_Barrier(MPI_COMM_WORLD);
        comm.reset_stats();
        const auto t0 = std::chrono::steady_clock::now();
        if (before_step) before_step();
        opt.step();
        ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        last = comm.stats();
      }
      return std::make_pair(last, ms);
    };

    {  // baseline: plain data parallelism's gradient all-reduce (mean), through the same communicator
      Row r{"grad all-reduce (baseline)"};
      comm.reset_stats();
      mem.fill_grads(me, 0);
      const auto t0 = std::chrono::steady_clock::now();
      for (auto& gi : mem.g) comm.all_reduce(gi.data(), gi.size(), dion::ReduceOp::avg);
      r.step_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      r.s = comm.stats();
      r.model_bus = ring_ar * sum_mn * 4;
      rows.push_back(r);
    }
    std::vector<double> rfs;
    if (a.full_rank) rfs.push_back(1.0);
    for (double f : a.rank_fractions)
      if (f > 0 && f < 1) rfs.push_back(f);
    const auto x0 = mem.x;  // every optimizer starts from the same parameters
    for (double rf : rfs) {
      mem.x = x0;
      dion::Dion<dion::EigenBackend, dion::MpiComm> opt{cpu, {.replicate = &comm}, {.rank_fraction = rf}};
      mem.register_in(opt);
      auto [s, ms] = run(opt, {});
      Row r{rf == 1.0 ? "dion rf=1 (gradients averaged by dion)" : "dion compressed sync", rf, s, 0, ms};
      // model: compressed matrices move 2(W-1)/W (m+n) r 4 bytes, the others their gradient's all-reduce
      for (const auto& k : set.kinds) {
        const std::int64_t mn = std::min(k.rows, k.cols);
        const std::int64_t rr = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(rf * static_cast<double>(mn))));
        const bool comp = rf < 1.0 && (k.rows + k.cols) * rr < k.rows * k.cols;
        r.model_bus += static_cast<double>(k.count) * ring_ar * 4.0 *
                       static_cast<double>(comp ? (k.rows + k.cols) * rr : k.rows * k.cols);
        // uncompressed: P is still all-gathered (the orthonormalization is split over the ranks)
        if (!comp && k.count > 1)
          r.model_bus += ring_ag * 4.0 * static_cast<double>((k.count + W - 1) / W * W) *
                         static_cast<double>(std::max(k.rows, k.cols) * rr);
      }
      rows.push_back(r);
    }
    {
      mem.x = x0;
      dion::Muon<dion::EigenBackend, dion::MpiComm> opt{cpu, {.replicate = &comm}, {}};
      mem.register_in(opt);
      auto [s, ms] = run(opt, {});
      Row r{"muon DDP (caller averages gradients)", 0, s, 0, ms};
      // the orthogonalized bf16 blocks of each shape group, padded to a multiple of W, all-gathered
      for (const auto& k : set.kinds) {
        const std::int64_t padded = k.count > 1 ? (k.count + W - 1) / W * W : 0;  // N = 1: redundant, no traffic
        r.model_bus += ring_ag * 2.0 * static_cast<double>(padded * k.rows * k.cols);
      }
      rows.push_back(r);
    }

    if (me == 0) {
      std::printf("dion_comm_bench: set %s (%lld matrices, %.1f M params), %d ranks, step %d of %d measured\n",
                  set.name.c_str(), static_cast<long long>(set.matrices()), static_cast<double>(set.params()) / 1e6, W,
                  a.steps, a.steps);
      std::printf("| what | rank fraction | calls | size S | bus bytes / rank (measured) | model | measured / model | vs baseline (bus) | model ratio | CPU step ms |\n");
      std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
      const double base = rows[0].s.total_bus_bytes();
      for (const auto& r : rows) {
        const double bus = r.s.total_bus_bytes();
        const double model_ratio = r.model_bus / std::max(1.0, rows[0].model_bus);
        std::printf("| %s | %s | %llu | %s | %s | %s | %.4f | %.4f | %.4f | %.1f |\n", r.what.c_str(),
                    r.rank_fraction > 0 ? std::to_string(r.rank_fraction).substr(0, 6).c_str() : "-",
                    static_cast<unsigned long long>(r.s.total_calls()), fmt_bytes(static_cast<double>(r.s.total_bytes())).c_str(),
                    fmt_bytes(bus).c_str(), fmt_bytes(r.model_bus).c_str(), r.model_bus > 0 ? bus / r.model_bus : 0.0,
                    base > 0 ? bus / base : 0.0, model_ratio, r.step_ms);
      }
      std::printf("\nper operation (bus bytes / rank, calls):\n");
      for (const auto& r : rows) {
        std::printf("  %-40s", r.what.c_str());
        for (int op = 0; op < dion::CommStats::num_ops; ++op)
          if (r.s.calls[static_cast<std::size_t>(op)])
            std::printf("  %s %s (%llu)", std::string(dion::CommStats::op_name(static_cast<dion::CommStats::Op>(op))).c_str(),
                        fmt_bytes(r.s.bus_bytes[static_cast<std::size_t>(op)]).c_str(),
                        static_cast<unsigned long long>(r.s.calls[static_cast<std::size_t>(op)]));
        std::printf("\n");
      }
      if (!a.out.empty()) {
        std::FILE* f = std::fopen(a.out.c_str(), "a");
        if (!f) {
          std::fprintf(stderr, "cannot open %s\n", a.out.c_str());
          rc = 1;
        } else {
          for (const auto& r : rows) {
            std::fprintf(f,
                         "{\"bench\":\"comm\",\"set\":\"%s\",\"world\":%d,\"what\":\"%s\",\"rank_fraction\":%g,"
                         "\"calls\":%llu,\"bytes\":%llu,\"bus_bytes\":%.0f,\"model_bus_bytes\":%.0f,\"step_ms\":%.2f",
                         set.name.c_str(), W, r.what.c_str(), r.rank_fraction,
                         static_cast<unsigned long long>(r.s.total_calls()),
                         static_cast<unsigned long long>(r.s.total_bytes()), r.s.total_bus_bytes(), r.model_bus, r.step_ms);
            for (int op = 0; op < dion::CommStats::num_ops; ++op)
              std::fprintf(f, ",\"%s_bus\":%.0f,\"%s_calls\":%llu",
                           std::string(dion::CommStats::op_name(static_cast<dion::CommStats::Op>(op))).c_str(),
                           r.s.bus_bytes[static_cast<std::size_t>(op)],
                           std::string(dion::CommStats::op_name(static_cast<dion::CommStats::Op>(op))).c_str(),
                           static_cast<unsigned long long>(r.s.calls[static_cast<std::size_t>(op)]));
            std::fprintf(f, "}\n");
          }
          std::fclose(f);
        }
      }
    }
  }
  MPI_Finalize();
  return rc;
}
