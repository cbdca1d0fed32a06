// Communication counters (dion::CommStats, comm/stats.hpp) under mpiexec at 1-4 ranks: every
// collective of MpiComm is counted with its exact size and ring bus bytes, and the traffic of a
// data-parallel Dion step is what SPEC §2.5 says it is — compressed sync moves (m+n)·r per matrix
// (P reduce-scattered and all-gathered, R all-reduced), full rank moves the gradients' m·n (plus
// the all-gather of P that splits the orthonormalization over the ranks).
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "catch_compat.hpp"
#include "dion/dion.hpp"
#include "dion/mpi.hpp"
#include "mpi_test_util.hpp"

using dion::CommStats;
using dion_mpi_test::world_rank;
using dion_mpi_test::world_size;

namespace {

/// Every rank's stats are the same for these collectives (sizes are global): check on every rank.
void check_op(const CommStats& s, CommStats::Op op, std::uint64_t calls, std::uint64_t bytes, double bus) {
  INFO("op " << CommStats::op_name(op));
  CHECK(s.calls[op] == calls);
  CHECK(s.bytes[op] == bytes);
  CHECK(s.bus_bytes[op] == Approx(bus).margin(1e-9));
}

}  // namespace

TEST_CASE("comm stats: every MpiComm collective is counted with its size and ring bus bytes", "[mpi][stats]") {
  const int W = world_size(), me = world_rank();
  dion::MpiComm comm(MPI_COMM_WORLD, std::chrono::seconds(60));
  CHECK(comm.stats().total_calls() == 0);
  const double w = W;
  std::vector<float> a(10, 1.0f);
  comm.all_reduce(a.data(), a.size(), dion::ReduceOp::sum);
  CHECK(a[3] == static_cast<float>(W));
  std::vector<double> b(3, 2.0);
  comm.broadcast(b.data(), b.size(), 0);
  std::vector<float> mine(4, static_cast<float>(me)), all(4 * static_cast<std::size_t>(W));
  comm.all_gather(mine.data(), all.data(), mine.size());
  comm.all_gather_inplace(all.data(), mine.size());
  std::vector<float> rs_send(6 * static_cast<std::size_t>(W), 1.0f), rs_recv(6);
  comm.reduce_scatter(rs_send.data(), rs_recv.data(), 6, dion::ReduceOp::avg);
  CHECK(rs_recv[0] == 1.0f);
  // all_to_all_v: rank i sends (i + j + 1) floats to rank j
  std::vector<int> sc(static_cast<std::size_t>(W)), sd(static_cast<std::size_t>(W)), rc(static_cast<std::size_t>(W)),
      rd(static_cast<std::size_t>(W));
  int st = 0, rt = 0;
  std::uint64_t self = 0;
  for (int j = 0; j < W; ++j) {
    sc[static_cast<std::size_t>(j)] = me + j + 1;
    rc[static_cast<std::size_t>(j)] = j + me + 1;
    sd[static_cast<std::size_t>(j)] = st;
    rd[static_cast<std::size_t>(j)] = rt;
    st += sc[static_cast<std::size_t>(j)];
    rt += rc[static_cast<std::size_t>(j)];
  }
  self = static_cast<std::uint64_t>(2 * me + 1) * 4;
  std::vector<float> send(static_cast<std::size_t>(st), 1.0f), recv(static_cast<std::size_t>(rt));
  comm.all_to_all_v(send.data(), sc, sd, recv.data(), rc, rd);

  const CommStats& s = comm.stats();
  check_op(s, CommStats::all_reduce, 1, 40, 2 * (w - 1) / w * 40);
  check_op(s, CommStats::broadcast, 1, 24, W > 1 ? 24.0 : 0.0);
  check_op(s, CommStats::all_gather, 2, 2 * 16 * static_cast<std::uint64_t>(W), (w - 1) / w * 2 * 16 * w);
  check_op(s, CommStats::reduce_scatter, 1, 24 * static_cast<std::uint64_t>(W), (w - 1) / w * 24 * w);
  check_op(s, CommStats::all_to_all, 1, static_cast<std::uint64_t>(st) * 4, static_cast<double>(st) * 4 - static_cast<double>(self));
  CHECK(s.total_calls() == 6);
  CHECK(s.total_bytes() == 40 + 24 + 32 * static_cast<std::uint64_t>(W) + 24 * static_cast<std::uint64_t>(W) +
                               static_cast<std::uint64_t>(st) * 4);
  CHECK(comm.sequence() == 6);
  comm.reset_stats();
  CHECK(comm.stats().total_calls() == 0);
  CHECK(comm.stats().total_bus_bytes() == 0.0);
  // a moved communicator keeps its counters
  comm.all_reduce(a.data(), 1, dion::ReduceOp::max);
  dion::MpiComm moved = std::move(comm);
  CHECK(moved.stats().calls[CommStats::all_reduce] == 1);
}

TEST_CASE("comm stats: a data-parallel Dion step moves (m+n)·r per matrix compressed, m·n at full rank (SPEC 2.5)",
          "[mpi][stats][dion]") {
  const int W = world_size(), me = world_rank();
  const double ring_ar = 2.0 * (W - 1) / W;
  // Same-shape groups with counts that are multiples of 1..4 ranks' padding (12 = lcm(1, 2, 3, 4)) and
  // one lone matrix (a chunk of one: P all-reduced instead of reduce-scattered + all-gathered: the
  // same ring bytes).
  struct Kind {
    std::int64_t rows, cols, count;
  };
  const std::vector<Kind> kinds = {{48, 32, 12}, {24, 64, 12}, {40, 40, 1}};
  for (const double rf : {1.0, 0.25}) {
    INFO("rank_fraction " << rf << ", world " << W);
    dion::MpiComm comm(MPI_COMM_WORLD, std::chrono::seconds(60));
    dion::EigenBackend cpu;
    std::vector<std::vector<float>> x, g;
    std::vector<dion::Shape> shapes;
    for (const auto& k : kinds)
      for (std::int64_t i = 0; i < k.count; ++i) {
        shapes.push_back({k.rows, k.cols});
        x.push_back(dion_mpi_test::values("x" + std::to_string(x.size()), 1, static_cast<std::size_t>(k.rows * k.cols), 0.02f));
        g.emplace_back(static_cast<std::size_t>(k.rows * k.cols));
      }
    dion::Dion<dion::EigenBackend, dion::MpiComm> opt{cpu, {.replicate = &comm}, {.rank_fraction = rf}};
    auto grp = opt.add_group();
    for (std::size_t i = 0; i < x.size(); ++i)
      grp.add("w" + std::to_string(i), dion::host_view(x[i].data(), shapes[i]), dion::host_view(g[i].data(), shapes[i]));
    for (int step = 0; step < 2; ++step) {
      for (std::size_t i = 0; i < g.size(); ++i) {  // in place: the optimizer holds views of g
        const auto v = dion_mpi_test::values("g" + std::to_string(i), static_cast<std::uint64_t>(100 * step + me), g[i].size());
        std::copy(v.begin(), v.end(), g[i].begin());
      }
      comm.reset_stats();
      opt.step();
    }
    const CommStats s = comm.stats();  // the second step (the first also broadcasts nothing: Q is seeded)
    double model = 0, flags = 0;
    std::uint64_t model_bytes = 0;
    for (const auto& k : kinds) {
      const std::int64_t r = static_cast<std::int64_t>(std::ceil(rf * static_cast<double>(std::min(k.rows, k.cols))));
      const bool comp = rf < 1.0 && (k.rows + k.cols) * r < k.rows * k.cols;
      model += static_cast<double>(k.count) * ring_ar * 4.0 *
               static_cast<double>(comp ? (k.rows + k.cols) * r : k.rows * k.cols);
      if (comp) flags += ring_ar * 4.0 * static_cast<double>(k.count);
      if (!comp) model_bytes += static_cast<std::uint64_t>(k.count * k.rows * k.cols) * 4;
      // uncompressed: the orthonormalization is still split over the ranks (rank j takes block j of
      // the batch, SPEC §2.5 step 4), so P (p × r, p = max(m, n)) is all-gathered: (W−1)/W of it
      if (!comp && k.count > 1)
        model += static_cast<double>(W - 1) / W * 4.0 * static_cast<double>((k.count + W - 1) / W * W) *
                 static_cast<double>(std::max(k.rows, k.cols) * r);
    }
    if (W == 1) {
      CHECK(s.total_bus_bytes() == 0.0);
      continue;
    }
    // Beyond the model: the guard's flags and the step's agreement reductions (gradient presence,
    // non-finite flag, lr/wd hash: a few all-reduces of a few bytes each).
    const double extra = s.total_bus_bytes() - model - flags;
    INFO("measured " << s.total_bus_bytes() << " bus bytes, model " << model << " + flags " << flags << ", extra "
                     << extra << "; all_reduce " << s.bus_bytes[CommStats::all_reduce] << ", reduce_scatter "
                     << s.bus_bytes[CommStats::reduce_scatter] << ", all_gather " << s.bus_bytes[CommStats::all_gather]);
    CHECK(extra >= 0.0);
    const double small = 16.0 * static_cast<double>(x.size()) + 512.0;  // a few bytes per parameter
    CHECK(extra <= ring_ar * small);
    if (rf == 1.0) {
      // full rank: the gradients' all-reduce and nothing else of size
      CHECK(s.calls[CommStats::reduce_scatter] == 0);
      CHECK(s.calls[CommStats::all_gather] == 2);  // one per multi-matrix chunk
      CHECK(s.bytes[CommStats::all_reduce] >= model_bytes);
      CHECK(static_cast<double>(s.bytes[CommStats::all_reduce]) <= static_cast<double>(model_bytes) + small);
    } else {
      // compressed: one reduce-scatter and one all-gather of P per multi-matrix chunk, no gradient
      // all-reduce; P's two moves cost what one all-reduce of P would
      CHECK(s.calls[CommStats::reduce_scatter] >= 2);
      CHECK(s.calls[CommStats::reduce_scatter] == s.calls[CommStats::all_gather]);
      CHECK(s.bus_bytes[CommStats::reduce_scatter] == Approx(s.bus_bytes[CommStats::all_gather]));
      CHECK(s.total_bus_bytes() < 0.5 * ring_ar * 4.0 * static_cast<double>(12 * (48 * 32 + 24 * 64) + 40 * 40));
    }
  }
}
