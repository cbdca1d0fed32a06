// dion over NCCL (RELIABILITY.md §1.5, SPEC §2): NcclComm's collectives on device buffers, the
// data-parallel and FSDP variants on the CUDA backend against the one-GPU optimizer, Dion's
// compressed sync, agreement (non-finite skips, configuration mismatches) and a silent rank's
// CommTimeout. One process per GPU under mpiexec (tests/nccl/nccl_main.cu); every test runs at any
// world size, the ones that need a second rank (mismatch, timeout) return early at world size 1.
//
// The parity tests reuse the MPI suite's models and drivers (tests/mpi/mpi_test_util.hpp) with a
// device store: each host tensor is mirrored in a device buffer, the optimizer works on the device
// views, and the one-GPU reference (dion::<Opt><CudaBackend>) runs on the same GPU kind, so the
// comparison isolates what distribution changes. Differences are MAX-reduced over the ranks (over
// MPI, which only carries these test verdicts) before any CHECK; rank 0 prints every measured
// difference so the device log carries the numbers.
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "dion/cuda.hpp"
#include "dion/nccl.hpp"
#include "gpu/gpu_common.hpp"
#include "mpi/mpi_test_util.hpp"
#include "nccl/nccl_world.hpp"

using namespace dion_mpi_test;
using dion_nccl_test::world;

namespace {

using dion_gpu_test::cuda_ok;
using dion_gpu_test::DevMem;

/// The device store of the parity drivers (HostMem's interface): one device buffer per key, a
/// CudaBackend on the world's stream (the stream NcclComm uses).
struct CudaMem {
  dion::CudaBackend be{world().stream};
  std::map<std::string, DevMem> bufs;
  dion::CudaBackend& backend() { return be; }
  template <class T>
  dion::CudaView put(const std::string& key, std::vector<T>& h, const dion::Shape& s) {
    const std::size_t bytes = h.size() * sizeof(T);
    auto& d = bufs[key];
    if (d.bytes != bytes) d = DevMem(bytes);
    if (bytes) cuda_ok(cudaMemcpyAsync(d.p, h.data(), bytes, cudaMemcpyHostToDevice, world().stream), "upload");
    cuda_ok(cudaStreamSynchronize(world().stream), "upload");
    return dion::cuda_view(static_cast<T*>(d.p), s);
  }
  template <class T>
  void get(const std::string& key, std::vector<T>& h) {
    const auto& d = bufs.at(key);
    if (d.bytes) cuda_ok(cudaMemcpyAsync(h.data(), d.p, d.bytes, cudaMemcpyDeviceToHost, world().stream), "download");
    cuda_ok(cudaStreamSynchronize(world().stream), "download");
  }
};

dion::NcclComm world_comm(std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
  return dion::NcclComm{world().comm, world().stream, timeout};
}

void report(const std::string& what, double d) {
  if (world().rank == 0) std::printf("[nccl W=%d] %s: %.3g\n", world().size, what.c_str(), d);
}

template <class T>
std::vector<T> download(const DevMem& d, std::size_t n) {
  std::vector<T> h(n);
  cuda_ok(cudaStreamSynchronize(world().stream), "sync");
  if (n) cuda_ok(cudaMemcpy(h.data(), d.p, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
  return h;
}
template <class T>
DevMem upload(const std::vector<T>& h) {
  DevMem d(h.size() * sizeof(T));
  if (!h.empty()) cuda_ok(cudaMemcpy(d.p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  return d;
}

/// Parameters of the distributed CUDA run within `tol` of the one-GPU run (absolute, or relative to
/// the weight change); the state tensor `exact_key` (if given) within `state_tol`.
template <template <class, class, class> class Opt>
void check_parity(const char* what, const std::vector<PSpec>& specs, const dion::Options& o, Layout layout,
                  double tol, bool relative = false, const char* exact_key = nullptr, double state_tol = 0.0,
                  const Feed& feed = Feed{}) {
  auto comm = world_comm();
  const char* key = exact_key ? exact_key : "momentum";
  std::vector<std::vector<float>> s_ref, s_got;
  const auto ref = run_single<Opt<dion::CudaBackend, dion::SingleProcess, dion::precision::Default>>(
      specs, o, feed, comm.size(), exact_key ? &s_ref : nullptr, key, CudaMem{});
  const auto got = run_dist<Opt<dion::CudaBackend, dion::NcclComm, dion::precision::Default>>(
      specs, o, feed, layout, comm, exact_key ? &s_got : nullptr, false, key, CudaMem{});
  const double d = compare(specs, got, ref, layout, comm.size(), comm.rank(), relative);
  report(std::string(what) + (relative ? ": relative update difference" : ": max difference"), d);
  INFO(what << " on " << comm.size() << " GPUs: difference " << d << " (allowed " << tol << ")");
  CHECK(d <= tol);
  if (exact_key) {
    std::vector<PSpec> st = specs;  // the state is (…, rows, 1) for variance_neuron
    if (std::string(exact_key) == "variance_neuron")
      for (auto& p : st) p.cols = 1;
    const double ds = compare(st, s_got, s_ref, layout, comm.size(), comm.rank());
    report(std::string(what) + ": state '" + exact_key + "' max difference", ds);
    INFO(what << ": state '" << exact_key << "' max difference " << ds);
    CHECK(ds <= state_tol);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
TEST_CASE("nccl: NcclComm collectives on device buffers, with their CommStats", "[nccl][comm]") {
  auto comm = world_comm();
  const int W = comm.size(), me = comm.rank();
  const auto Wz = static_cast<std::size_t>(W);
  comm.reset_stats();
  // all_reduce: sums of small integers are exact in fp32 and bf16
  {
    const std::size_t n = 1000;
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<float>(me + 1) + static_cast<float>(i % 7);
    auto d = upload(v);
    comm.all_reduce(static_cast<float*>(d.p), n, dion::ReduceOp::sum);
    const auto got = download<float>(d, n);
    int bad = 0;
    for (std::size_t i = 0; i < n; ++i)
      bad += got[i] == static_cast<float>(W * (W + 1) / 2 + W * static_cast<int>(i % 7)) ? 0 : 1;
    CHECK(sum_over_ranks(bad) == 0);
    auto d2 = upload(v);
    comm.all_reduce(static_cast<float*>(d2.p), n, dion::ReduceOp::avg);
    const auto avg = download<float>(d2, n);
    double err = 0;
    for (std::size_t i = 0; i < n; ++i)
      err = std::max(err, std::fabs(avg[i] - ((W + 1) / 2.0 + static_cast<double>(i % 7))));
    CHECK(max_over_ranks(err) <= 1e-5);
    std::vector<dion::bf16> b(n);
    for (std::size_t i = 0; i < n; ++i) b[i] = dion::bf16(static_cast<float>(me + 1) + static_cast<float>(i % 5));
    auto db = upload(b);
    comm.all_reduce(static_cast<dion::bf16*>(db.p), n, dion::ReduceOp::sum);
    const auto gb = download<dion::bf16>(db, n);
    bad = 0;
    for (std::size_t i = 0; i < n; ++i)
      bad += static_cast<float>(gb[i]) == static_cast<float>(W * (W + 1) / 2 + W * static_cast<int>(i % 5)) ? 0 : 1;
    CHECK(sum_over_ranks(bad) == 0);
  }
  // broadcast from the last rank
  {
    std::vector<float> v(77, static_cast<float>(me));
    auto d = upload(v);
    comm.broadcast(static_cast<float*>(d.p), 77, W - 1);
    const auto got = download<float>(d, 77);
    CHECK(sum_over_ranks(got[0] == static_cast<float>(W - 1) && got[76] == static_cast<float>(W - 1) ? 0 : 1) == 0);
  }
  // all_gather and its in-place form; reduce_scatter
  {
    const std::size_t c = 3;
    std::vector<float> mine(c);
    for (std::size_t i = 0; i < c; ++i) mine[i] = static_cast<float>(me * 10) + static_cast<float>(i);
    auto ds = upload(mine);
    DevMem dr(c * Wz * sizeof(float));
    comm.all_gather(static_cast<const float*>(ds.p), static_cast<float*>(dr.p), c);
    std::vector<float> buf(c * Wz, -1.0f);
    std::copy(mine.begin(), mine.end(), buf.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(me) * c));
    auto di = upload(buf);
    comm.all_gather_inplace(static_cast<float*>(di.p), c);
    const auto g1 = download<float>(dr, c * Wz), g2 = download<float>(di, c * Wz);
    int bad = 0;
    for (std::size_t r = 0; r < Wz; ++r)
      for (std::size_t i = 0; i < c; ++i) {
        const float want = static_cast<float>(r * 10 + i);
        bad += (g1[r * c + i] == want && g2[r * c + i] == want) ? 0 : 1;
      }
    std::vector<float> send(c * Wz);
    for (std::size_t b = 0; b < Wz; ++b)
      for (std::size_t i = 0; i < c; ++i) send[b * c + i] = static_cast<float>(me) + static_cast<float>(b * 100 + i);
    auto dsend = upload(send);
    DevMem drecv(c * sizeof(float));
    comm.reduce_scatter(static_cast<const float*>(dsend.p), static_cast<float*>(drecv.p), c, dion::ReduceOp::sum);
    const auto rs = download<float>(drecv, c);
    for (std::size_t i = 0; i < c; ++i)
      bad += rs[i] == static_cast<float>(W * (W - 1) / 2 + W * static_cast<int>(static_cast<std::size_t>(me) * 100 + i))
                 ? 0
                 : 1;
    CHECK(sum_over_ranks(bad) == 0);
  }
  // all_to_all_v with uneven counts, zeros included: rank s sends (s + d) % 3 values to rank d
  {
    std::vector<int> sc(Wz), sd(Wz), rc(Wz), rd(Wz);
    for (int d = 0; d < W; ++d) {
      sc[static_cast<std::size_t>(d)] = (me + d) % 3;
      rc[static_cast<std::size_t>(d)] = (d + me) % 3;
    }
    std::exclusive_scan(sc.begin(), sc.end(), sd.begin(), 0);
    std::exclusive_scan(rc.begin(), rc.end(), rd.begin(), 0);
    const auto ns = static_cast<std::size_t>(std::accumulate(sc.begin(), sc.end(), 0));
    const auto nr = static_cast<std::size_t>(std::accumulate(rc.begin(), rc.end(), 0));
    std::vector<float> send(ns);
    for (int d = 0; d < W; ++d)
      for (int k = 0; k < sc[static_cast<std::size_t>(d)]; ++k)
        send[static_cast<std::size_t>(sd[static_cast<std::size_t>(d)] + k)] = static_cast<float>(me * 1000 + d * 10 + k);
    auto dsend = upload(send);
    DevMem drecv(std::max<std::size_t>(nr, 1) * sizeof(float));
    comm.all_to_all_v(static_cast<const float*>(dsend.p), sc, sd, static_cast<float*>(drecv.p), rc, rd);
    const auto got = download<float>(drecv, nr);
    int bad = 0;
    for (int s = 0; s < W; ++s)
      for (int k = 0; k < rc[static_cast<std::size_t>(s)]; ++k)
        bad += got[static_cast<std::size_t>(rd[static_cast<std::size_t>(s)] + k)] ==
                       static_cast<float>(s * 1000 + me * 10 + k)
                   ? 0
                   : 1;
    CHECK(sum_over_ranks(bad) == 0);
  }
  // the host-side agreement collectives
  {
    CHECK(comm.all_agree(true));
    CHECK(comm.all_agree(me != W - 1) == false);
    CHECK(comm.same_everywhere(42));
    CHECK(comm.same_everywhere(static_cast<std::uint64_t>(me)) == (W == 1));
    std::int64_t v[2] = {me, 1};
    comm.host_all_reduce(v, 2, dion::ReduceOp::sum);
    CHECK((v[0] == W * (W - 1) / 2 && v[1] == W));
    std::vector<int> all(Wz, -1);
    const int mine = 7 * me;
    comm.host_all_gather(&mine, all.data(), 1);
    int bad = 0;
    for (int r = 0; r < W; ++r) bad += all[static_cast<std::size_t>(r)] == 7 * r ? 0 : 1;
    CHECK(bad == 0);
    comm.wait();
  }
  // every call above was counted, with nccl-tests' sizes
  const auto& s = comm.stats();
  CHECK(s.calls[dion::CommStats::broadcast] == 1);
  CHECK(s.bytes[dion::CommStats::broadcast] == 77 * sizeof(float));
  CHECK(s.calls[dion::CommStats::reduce_scatter] == 1);
  CHECK(s.bytes[dion::CommStats::reduce_scatter] == 3 * Wz * sizeof(float));
  CHECK(s.calls[dion::CommStats::all_gather] == 3);  // two, and host_all_gather's
  CHECK(s.calls[dion::CommStats::all_to_all] == 1);
  // 3 device all-reduces, all_agree x2, same_everywhere x2 (two each), host_all_reduce
  CHECK(s.calls[dion::CommStats::all_reduce] == 3 + 2 + 4 + 1);
  CHECK(s.bytes[dion::CommStats::all_reduce] == 2 * 1000 * sizeof(float) + 1000 * sizeof(dion::bf16) +
                                                    2 * sizeof(int) + 4 * sizeof(std::uint64_t) +
                                                    2 * sizeof(std::int64_t));
  CHECK(comm.sequence() > 0);
}

// ---------------------------------------------------------------------------------------------------
// The Muon family, data parallel: each matrix is orthogonalized whole by one GPU and all-gathered
// (SPEC §2.2-2.4). A rank's work is a subset of the shape group's batch, orthogonalized by the same
// kernels as on one GPU. One GPU: bitwise. Several: the batched GEMMs then run with fewer matrices
// per call, and cuBLAS may pick another kernel for another batch count; bound 1e-5 of the update
// (fp32 noise; a wrong assignment or gather is O(1)), the measured value printed.
TEST_CASE("nccl: Muon-family DDP on the CUDA backend equals one GPU", "[nccl][ddp][muon]") {
  const double tol = world().size == 1 ? 0.0 : 1e-5;
  const bool rel = world().size > 1;
  const auto m = ddp_model();
  check_parity<dion::Muon>("muon ddp", m, {.lr = 0.02f}, Layout::ddp, tol, rel);
  check_parity<dion::Muon>("muon ddp nesterov", m, {.lr = 0.02f, .nesterov = true}, Layout::ddp, tol, rel);
  check_parity<dion::NorMuon>("normuon ddp", m, {.lr = 0.02f}, Layout::ddp, tol, rel);
  check_parity<dion::Dion2>("dion2 ddp", m, {.lr = 0.02f, .fraction = 0.5}, Layout::ddp, tol, rel);
  check_parity<dion::NorDion2>("nordion2 ddp", m, {.lr = 0.02f, .fraction = 0.35}, Layout::ddp, tol, rel);
}

// Muon FSDP: the owner assembles exactly the rows (or columns) of every rank, uneven and empty
// shards included, and orthogonalizes the same matrix as one GPU (same bound as above).
TEST_CASE("nccl: Muon FSDP (uneven and empty row and column shards) equals one GPU", "[nccl][fsdp][muon]") {
  const double tol = world().size == 1 ? 0.0 : 1e-5;
  const bool rel = world().size > 1;
  check_parity<dion::Muon>("muon fsdp rows", fsdp_model(), {.lr = 0.02f}, Layout::fsdp, tol, rel);
  check_parity<dion::Muon>("muon fsdp rows cautious", fsdp_model(), {.lr = 0.02f, .cautious_wd = true}, Layout::fsdp,
                           tol, rel);
  check_parity<dion::Muon>("muon fsdp columns", fsdp_model(), {.lr = 0.02f}, Layout::fsdp_cols, tol, rel);
  // Dion2, global scope on wide matrices: the same rows as one GPU are selected; the momentum of
  // the unselected rows is exact, the selected rows within the same bound
  check_parity<dion::Dion2>("dion2 fsdp global f=0.35", fsdp_wide_model(),
                            {.lr = 0.02f, .fraction = 0.35, .selection_scope = dion::SelectionScope::global}, Layout::fsdp,
                            tol, rel, "momentum", world().size == 1 ? 0.0 : 1e-5);
}

// ---------------------------------------------------------------------------------------------------
// Dion, data parallel, full-rank synchronization: the optimizer averages the per-rank gradients
// (ncclAvg), then runs one GPU's arithmetic on the mean. The reference averages in fp64 on the host
// and rounds once: ~1 ulp of G, which the power iteration and QR carry into the update at the 1e-5
// level on these small matrices (the MPI suite measures 1.6e-5 at 4 ranks). Bound 1e-4.
TEST_CASE("nccl: Dion DDP full-rank sync equals one GPU on the mean gradient", "[nccl][ddp][dion]") {
  auto comm = world_comm();
  const Feed feed{.per_rank_grads = true};
  for (double rf : {1.0, 0.5}) {
    const dion::Options o{.lr = 0.02f, .rank_fraction = rf};
    const auto ref = run_single<dion::Dion<dion::CudaBackend>>(dion_ddp_model(), o, feed, comm.size(), nullptr, "momentum",
                                                               CudaMem{});
    const auto got = run_dist<dion::Dion<dion::CudaBackend, dion::NcclComm>>(dion_ddp_model(), o, feed, Layout::ddp, comm,
                                                                             nullptr, false, "momentum", CudaMem{});
    const double d = compare(dion_ddp_model(), got, ref, Layout::ddp, comm.size(), comm.rank(), true);
    report("dion ddp rank_fraction " + std::to_string(rf) + ": relative update difference", d);
    CHECK(d <= 1e-4);
  }
}

// Compressed sync (rank_fraction 1/4: P and R are averaged instead of G, SPEC §2.6): the weights
// follow one GPU on the mean gradient, each replica keeps its own momentum until
// synchronize_for_checkpoint() averages them; the collectives are the same calls and bytes as the
// MPI engine's for the same step (one algorithm, two communicators).
TEST_CASE("nccl: Dion DDP compressed sync; synchronize_for_checkpoint; the same collectives as over MPI",
          "[nccl][ddp][dion]") {
  auto comm = world_comm();
  const int W = comm.size();
  const std::vector<PSpec> specs = {{"a", 1, 32, 48}, {"b", 1, 32, 48}, {"c", 1, 32, 48}, {"d", 1, 40, 24}};
  const Feed feed{.per_rank_grads = true};
  const dion::Options o{.lr = 0.02f, .rank_fraction = 0.25};
  std::vector<std::vector<float>> m_ref, m_loc, m_sync;
  const auto ref = run_single<dion::Dion<dion::CudaBackend>>(specs, o, feed, W, &m_ref, "momentum", CudaMem{});
  comm.reset_stats();
  const auto got =
      run_dist<dion::Dion<dion::CudaBackend, dion::NcclComm>>(specs, o, feed, Layout::ddp, comm, &m_loc, false,
                                                              "momentum", CudaMem{});
  const dion::CommStats nccl_stats = comm.stats();
  const auto got2 = run_dist<dion::Dion<dion::CudaBackend, dion::NcclComm>>(specs, o, feed, Layout::ddp, comm, &m_sync,
                                                                            true, "momentum", CudaMem{});
  const double dw = compare(specs, got, ref, Layout::ddp, W, comm.rank(), true);
  const double dw2 = compare(specs, got2, ref, Layout::ddp, W, comm.rank(), true);
  const double dm_loc = rel_state_diff(m_loc, m_ref), dm_sync = rel_state_diff(m_sync, m_ref);
  report("dion compressed sync: relative update difference", std::max(dw, dw2));
  report("dion compressed sync: local momentum vs mean-gradient run (relative)", dm_loc);
  report("dion compressed sync: synchronized momentum (relative)", dm_sync);
  CHECK(dw <= 1e-4);
  CHECK(dw2 <= 1e-4);
  CHECK(dm_sync <= 1e-4);
  if (W > 1) CHECK(dm_loc > 1e-2);  // decoupled: each replica keeps its own error feedback
  CHECK(diff_from_rank0(got) == 0.0);  // the weights are bitwise the same on every rank

  // the same run over MPI on the Eigen backend issues the same collectives with the same sizes
  dion::MpiComm mpi{MPI_COMM_WORLD, std::chrono::seconds(60)};
  (void)run_dist<dion::Dion<dion::EigenBackend, dion::MpiComm>>(specs, o, feed, Layout::ddp, mpi);
  const auto& ms = mpi.stats();
  for (int op = 0; op < dion::CommStats::num_ops; ++op) {
    const auto k = static_cast<dion::CommStats::Op>(op);
    INFO(dion::CommStats::op_name(k) << ": NCCL " << nccl_stats.calls[k] << " calls, " << nccl_stats.bytes[k]
                                     << " bytes; MPI " << ms.calls[k] << " calls, " << ms.bytes[k] << " bytes");
    CHECK(nccl_stats.calls[k] == ms.calls[k]);
    CHECK(nccl_stats.bytes[k] == ms.bytes[k]);
  }
  report("dion compressed sync: bytes per 3 steps (NCCL; the MPI engine's are equal)",
         static_cast<double>(nccl_stats.total_bytes()));
}

// Dion FSDP (rows sharded, uneven and empty shards; wide matrices, the orientation one GPU also
// uses): P is a sum of per-shard products, all-reduced, so its summation order differs from one
// GEMM over all rows (~1 ulp of P). Bound 1e-4 as in the MPI suite.
TEST_CASE("nccl: Dion FSDP (uneven and empty row shards) matches one GPU", "[nccl][fsdp][dion]") {
  auto comm = world_comm();
  const std::vector<PSpec> specs = {{"a", 1, 17, 24}, {"b", 1, 1, 16}, {"c", 1, 7, 15}, {"d", 1, 12, 40},
                                    {"e", 1, 12, 40}, {"f", 1, 12, 40}};
  for (double rf : {1.0, 0.5}) {
    const dion::Options o{.lr = 0.02f, .rank_fraction = rf};
    const auto ref =
        run_single<dion::Dion<dion::CudaBackend>>(specs, o, Feed{}, comm.size(), nullptr, "momentum", CudaMem{});
    const auto got = run_dist<dion::Dion<dion::CudaBackend, dion::NcclComm>>(specs, o, Feed{}, Layout::fsdp, comm,
                                                                             nullptr, false, "momentum", CudaMem{});
    const double d = compare(specs, got, ref, Layout::fsdp, comm.size(), comm.rank(), true);
    report("dion fsdp rank_fraction " + std::to_string(rf) + ": relative update difference", d);
    CHECK(d <= 1e-4);
  }
}

// ---------------------------------------------------------------------------------------------------
// A NaN on one rank: every rank skips the step (agreed over NCCL on the device, no host sync),
// parameters, state and counters unchanged everywhere; the next clean step runs everywhere.
TEST_CASE("nccl: a non-finite gradient on one rank makes every rank skip the step", "[nccl][nonfinite]") {
  auto comm = world_comm();
  const int W = comm.size(), me = comm.rank();
  CudaMem mem;
  std::vector<float> x(8 * 16, 0.5f), g(8 * 16, 0.1f);
  dion::Muon<dion::CudaBackend, dion::NcclComm> opt{mem.backend(), {.replicate = &comm}, {}};
  opt.add_group().add("w", mem.put("x", x, {8, 16}), mem.put("g", g, {8, 16}));
  g[5] = me == W - 1 ? std::nanf("") : 0.1f;
  opt.set_grad("w", mem.put("g", g, {8, 16}));
  opt.step();
  mem.get("x", x);
  CHECK(opt.last_step_skipped());
  CHECK(opt.skipped_steps() == 1);
  CHECK(opt.step_count(0) == 0);
  CHECK(sum_over_ranks(x[0] == 0.5f && x[127] == 0.5f ? 0 : 1) == 0);
  CHECK(opt.read_state("w/momentum")[0] == 0.0f);
  g[5] = 0.1f;
  opt.set_grad("w", mem.put("g", g, {8, 16}));
  opt.step();
  mem.get("x", x);
  CHECK_FALSE(opt.last_step_skipped());
  CHECK(opt.step_count(0) == 1);
  CHECK(sum_over_ranks(x[0] != 0.5f ? 0 : 1) == 0);
}

// ---------------------------------------------------------------------------------------------------
// Disagreement at registration: a different shape on rank 0 throws ConfigMismatch on every rank
// (nothing registered anywhere); a rank whose gradient is missing makes every rank throw at step().
TEST_CASE("nccl: configuration and gradient-presence mismatches throw on every rank", "[nccl][errors]") {
  auto comm = world_comm(std::chrono::seconds(30));
  const int W = comm.size(), me = comm.rank();
  if (W == 1) return;  // nothing to disagree with
  CudaMem mem;
  std::vector<float> x(8 * 17, 0.5f), g(8 * 17, 0.1f), y(4 * 8, 0.25f), gy(4 * 8, 0.1f);
  {
    dion::Muon<dion::CudaBackend, dion::NcclComm> opt{mem.backend(), {.replicate = &comm}, {}};
    const std::int64_t cols = me == 0 ? 16 : 17;
    int caught = 0;
    try {
      opt.add_group().add("w", mem.put("x", x, {8, cols}), mem.put("g", g, {8, cols}));
    } catch (const dion::ConfigMismatch&) {
      ++caught;
    }
    CHECK(sum_over_ranks(caught) == W);
    CHECK(opt.num_params() == 0u);
  }
  {
    dion::NorMuon<dion::CudaBackend, dion::NcclComm> opt{mem.backend(), {.outer_shard = &comm}, {}};
    opt.add_group()
        .add("w", mem.put("x2", x, {8, 16}), mem.put("g2", g, {8, 16}))
        .add("v", mem.put("y", y, {4, 8}), mem.put("gy", gy, {4, 8}));
    if (me != 0) opt.clear_grad("v");
    int mismatch = 0;
    try {
      opt.step();
    } catch (const dion::ConfigMismatch&) {
      ++mismatch;
    }
    CHECK(sum_over_ranks(mismatch) == W);
    mem.get("x2", x);
    CHECK(sum_over_ranks(x[0] == 0.5f ? 0 : 1) == 0);
    opt.set_grad("v", mem.put("gy", gy, {4, 8}));
    opt.step();  // everyone agrees again
    mem.get("x2", x);
    CHECK(x[0] != 0.5f);
  }
}

// ---------------------------------------------------------------------------------------------------
// A rank that stops participating (RELIABILITY X7): the others raise CommTimeout within the deadline
// (NcclComm polls a non-blocking communicator, then aborts it), the optimizer's next step throws
// CommPoisoned at once. On a communicator split off the world for this test; the silent rank aborts
// its end afterwards. Runs last (Catch2 runs test cases in declaration order by default).
TEST_CASE("nccl: a silent rank makes the others raise CommTimeout within the deadline", "[nccl][timeout]") {
  const int W = world().size, me = world().rank;
  if (W == 1) return;
  ncclComm_t split = dion_nccl_test::split_world();
  const auto deadline = std::chrono::milliseconds(2000);
  SilentRank r;
  {
    dion::NcclComm comm{split, world().stream, deadline};
    CudaMem mem;
    std::vector<float> x(6 * 10, 0.5f), g(6 * 10, 0.1f);
    dion::Muon<dion::CudaBackend, dion::NcclComm> opt{mem.backend(), {.replicate = &comm}, {}};
    opt.add_group().add("w", mem.put("x", x, {6, 10}), mem.put("g", g, {6, 10}));
    opt.step();  // everyone participates
    comm.wait();
    MPI_Barrier(MPI_COMM_WORLD);
    r = silent_rank_0(opt, me, deadline, [&] { comm.wait(); });
    if (me != 0) CHECK(comm.poisoned());
  }
  // the silent rank's end of the communicator goes too (the others' was aborted by NcclComm)
  if (me == 0) ncclCommAbort(split);
  cuda_ok(cudaStreamSynchronize(world().stream), "sync");
  CHECK(sum_over_ranks(r.timeouts) == W - 1);
  CHECK(sum_over_ranks(r.poisoned) == W - 1);
  report("silent rank: seconds until CommTimeout (deadline 2 s)", max_over_ranks(r.waited));
  CHECK(max_over_ranks(r.waited) < 2.0 + 3.0);
}
