// Helpers of dion's MPI tests: deterministic data, the single-process reference run, FSDP row
// and column shards, and rank agreement for checks (RELIABILITY.md §4: never REQUIRE between collectives on
// one rank only; reduce first, then CHECK on every rank).
#pragma once

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "catch_compat.hpp"
#include "dion/mpi.hpp"

namespace dion_mpi_test {

inline int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
inline int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}
inline double max_over_ranks(double v) {
  double out = v;
  MPI_Allreduce(&v, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return out;
}
inline int sum_over_ranks(int v) {
  int out = v;
  MPI_Allreduce(&v, &out, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  return out;
}

/// A parameter of the test model: a 2-D (rows, cols) or 3-D (batch, rows, cols) matrix.
/// `transposed`: its values (initial and gradients) are those of the (batch, cols, rows) tensor of
/// the same name, each matrix transposed (an oracle: an algorithm on A against one on Aᵀ).
struct PSpec {
  std::string name;
  std::int64_t batch = 1, rows = 0, cols = 0;
  bool three_d = false;
  bool transposed = false;
  std::int64_t numel() const { return batch * rows * cols; }
  dion::Shape shape(std::int64_t r) const { return shape(r, cols); }
  dion::Shape shape(std::int64_t r, std::int64_t c) const {
    return three_d ? dion::Shape{batch, r, c} : dion::Shape{r, c};
  }
  /// The spec of the transposed tensor (same name, same values transposed).
  PSpec t() const {
    PSpec q = *this;
    std::swap(q.rows, q.cols);
    q.transposed = !transposed;
    return q;
  }
};

// --- The test models of the parity suites (tests/mpi/test_distributed.cpp, tests/nccl/) ----------
// 7x15 (x3, one without a gradient at step 2: N = 3 then 2 per shape group, uneven over W),
// 15x3 (tall, x2), a 3-D (3, 6, 10), 17x24 (x5) and 1x16 (a single matrix: redundant path).
inline std::vector<PSpec> ddp_model() {
  return {{"a", 1, 7, 15},  {"b", 1, 7, 15},  {"c", 1, 7, 15},  {"d", 1, 15, 3}, {"e", 1, 15, 3},
          {"f", 3, 6, 10, true}, {"g0", 1, 17, 24}, {"g1", 1, 17, 24}, {"g2", 1, 17, 24}, {"g3", 1, 17, 24},
          {"g4", 1, 17, 24}, {"h", 1, 1, 16}};
}
// FSDP rows: 17 rows (5,5,5,2 on 4 ranks; 6,6,5 on 3), 1 row (empty shards on every rank but 0),
// 7x15, 15x3 (tall), a 3-D (3, 10, 6) sharded along its rows, 2 more 17x24 (several per group).
inline std::vector<PSpec> fsdp_model() {
  return {{"a", 1, 17, 24}, {"b", 1, 1, 16}, {"c", 1, 7, 15}, {"d", 1, 15, 3},
          {"e", 3, 10, 6, true}, {"f", 1, 17, 24}, {"g", 1, 17, 24}};
}
// wide matrices only (Dion2 selects rows on one process too)
inline std::vector<PSpec> fsdp_wide_model() {
  return {{"a", 1, 17, 24}, {"b", 1, 1, 16}, {"c", 1, 7, 15}, {"e", 3, 10, 12, true}, {"f", 1, 17, 24}};
}
inline std::vector<PSpec> dion_ddp_model() {
  return {{"a", 1, 32, 48}, {"b", 1, 32, 48}, {"c", 1, 32, 48}, {"d", 1, 40, 24}, {"e", 1, 40, 24}, {"h", 1, 16, 16}};
}

/// Deterministic values: the same on every rank for the same (name, salt).
inline std::vector<float> values(const std::string& name, std::uint64_t salt, std::size_t n, float scale = 1.0f) {
  std::seed_seq seq{static_cast<unsigned>(dion::detail::fnv1a(name) & 0xffffffffu), static_cast<unsigned>(salt),
                    static_cast<unsigned>(salt >> 32)};
  std::mt19937 rng(seq);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

/// The full (batch, rows, cols) tensor of p for `salt` (transposed per matrix when p.transposed).
inline std::vector<float> tensor_values(const PSpec& p, std::uint64_t salt) {
  auto v = values(p.name, salt, static_cast<std::size_t>(p.numel()));
  if (!p.transposed) return v;
  std::vector<float> t(v.size());
  for (std::int64_t m = 0; m < p.batch; ++m)  // v holds (batch, cols, rows)
    for (std::int64_t i = 0; i < p.rows; ++i)
      for (std::int64_t j = 0; j < p.cols; ++j)
        t[static_cast<std::size_t>((m * p.rows + i) * p.cols + j)] = v[static_cast<std::size_t>((m * p.cols + j) * p.rows + i)];
  return t;
}
/// The initial values of parameter p.
inline std::vector<float> init_values(const PSpec& p) { return tensor_values(p, 7); }

/// Gradient of parameter `name` at `step` as seen by `rank` (rank = -1: the same on every rank).
inline std::vector<float> grad_values(const PSpec& p, int step, int rank) {
  return tensor_values(p, 1000u + static_cast<std::uint64_t>(step) * 64u + static_cast<std::uint64_t>(rank + 1));
}

/// FSDP chunking of `rows` over W ranks: rank r holds [min(r·c, rows), min((r+1)·c, rows)), c = ⌈rows/W⌉.
inline std::pair<std::int64_t, std::int64_t> fsdp_rows(std::int64_t rows, int W, int r) {
  const std::int64_t c = (rows + W - 1) / W;
  const std::int64_t a = std::min<std::int64_t>(c * r, rows), b = std::min<std::int64_t>(a + c, rows);
  return {a, b};
}
/// Rows [a, b) of every matrix of a full (batch, rows, cols) tensor.
inline std::vector<float> take_rows(const std::vector<float>& full, const PSpec& p, std::int64_t a, std::int64_t b) {
  std::vector<float> out;
  out.reserve(static_cast<std::size_t>(p.batch * (b - a) * p.cols));
  for (std::int64_t m = 0; m < p.batch; ++m)
    for (std::int64_t i = a; i < b; ++i)
      for (std::int64_t j = 0; j < p.cols; ++j)
        out.push_back(full[static_cast<std::size_t>((m * p.rows + i) * p.cols + j)]);
  return out;
}
/// Columns [a, b) of every matrix of a full (batch, rows, cols) tensor.
inline std::vector<float> take_cols(const std::vector<float>& full, const PSpec& p, std::int64_t a, std::int64_t b) {
  std::vector<float> out;
  out.reserve(static_cast<std::size_t>(p.batch * p.rows * (b - a)));
  for (std::int64_t m = 0; m < p.batch; ++m)
    for (std::int64_t i = 0; i < p.rows; ++i)
      for (std::int64_t j = a; j < b; ++j) out.push_back(full[static_cast<std::size_t>((m * p.rows + i) * p.cols + j)]);
  return out;
}
inline double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return 1e30;
  double d = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double e = std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    if (!(e <= d)) d = std::isnan(e) ? 1e30 : e;
  }
  return d;
}
/// max |Δa − Δb| / max |Δb| of the weight changes from x0.
inline double update_rel_diff(const std::vector<float>& a, const std::vector<float>& b, const std::vector<float>& x0) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double da = static_cast<double>(a[i]) - x0[i], db = static_cast<double>(b[i]) - x0[i];
    num = std::max(num, std::fabs(da - db));
    den = std::max(den, std::fabs(db));
  }
  if (std::isnan(num)) return 1e30;
  return den > 0 ? num / den : num;
}

/// max over ranks of max |m − ref| over the tensors, relative to max |ref| (state comparisons).
inline double rel_state_diff(const std::vector<std::vector<float>>& m, const std::vector<std::vector<float>>& ref) {
  double d = 0, scale = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    d = std::max(d, max_abs_diff(m[i], ref[i]));
    for (float v : ref[i]) scale = std::max(scale, static_cast<double>(std::fabs(v)));
  }
  return max_over_ranks(d) / scale;
}
/// max over ranks and tensors of |v − rank 0's v|: 0 when every rank holds bitwise the same.
inline double diff_from_rank0(const std::vector<std::vector<float>>& v) {
  double d = 0;
  for (const auto& t : v) {
    auto r0 = t;
    MPI_Bcast(r0.data(), static_cast<int>(r0.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
    d = std::max(d, max_abs_diff(t, r0));
  }
  return max_over_ranks(d);
}

/// What the other ranks saw while rank 0 was silent (silent_rank_0).
struct SilentRank {
  int timeouts = 0, poisoned = 0;  ///< on this rank: CommTimeout from the step, CommPoisoned from the next
  double waited = 0;               ///< seconds until the CommTimeout
  std::string message;             ///< the CommTimeout's text
};
/// The silent-rank protocol (RELIABILITY X7): rank 0 stops participating for three deadlines; every
/// other rank calls opt.step() then `finish()` (e.g. a wait for the stream), expecting CommTimeout,
/// then a second step(), expecting CommPoisoned.
template <class Opt, class Finish>
SilentRank silent_rank_0(Opt& opt, int me, std::chrono::milliseconds deadline, Finish finish) {
  SilentRank r;
  if (me == 0) {
    std::this_thread::sleep_for(deadline * 3);
    return r;
  }
  const auto t0 = std::chrono::steady_clock::now();
  try {
    opt.step();
    finish();
  } catch (const dion::CommTimeout& e) {
    ++r.timeouts;
    r.message = e.what();
  }
  r.waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  try {
    opt.step();
  } catch (const dion::CommPoisoned&) {
    ++r.poisoned;
  }
  return r;
}

/// How a test step feeds gradients.
struct Feed {
  int steps = 3;
  bool drop_second_on_step2 = true;  ///< the 2nd parameter has no gradient at step 2 (on every rank)
  bool per_rank_grads = false;       ///< each rank its own gradient; the reference uses the mean
};

/// Mean over ranks 0..W-1 of the per-rank gradients (the single-process reference of a
/// data-parallel run with different gradients per rank).
inline std::vector<float> mean_grad(const PSpec& p, int step, int W) {
  std::vector<double> acc(static_cast<std::size_t>(p.numel()), 0.0);
  for (int r = 0; r < W; ++r) {
    const auto g = grad_values(p, step, r);
    for (std::size_t i = 0; i < acc.size(); ++i) acc[i] += g[i];
  }
  std::vector<float> out(acc.size());
  for (std::size_t i = 0; i < acc.size(); ++i) out[i] = static_cast<float>(acc[i] / W);
  return out;
}

/// Values rounded to the element type T of a test run (float: unchanged; bf16: round to nearest even).
template <class T>
std::vector<T> as_elems(const std::vector<float>& v) {
  std::vector<T> out;
  out.reserve(v.size());
  for (float f : v) out.push_back(T(f));
  return out;
}
template <class T>
std::vector<float> as_floats(const std::vector<T>& v) {
  std::vector<float> out;
  out.reserve(v.size());
  for (const T& e : v) out.push_back(static_cast<float>(e));
  return out;
}

/// Where a test run keeps its tensors. HostMem: in the host vectors themselves, on the Eigen
/// backend. tests/nccl/ has a device store with the same interface (CUDA backend): put() uploads a
/// host vector into the device buffer of `key` and returns a view of it, get() downloads it.
/// The store key of tensor `role` ("x", "g") of parameter `name`.
inline std::string mem_key(const char* role, const std::string& name) {
  std::string k(role);
  k += '/';
  k += name;
  return k;
}
struct HostMem {
  dion::EigenBackend be;
  dion::EigenBackend& backend() { return be; }
  template <class T>
  dion::HostView put(const std::string& /*key*/, std::vector<T>& h, const dion::Shape& s) {
    return dion::host_view(h.data(), s);
  }
  template <class T>
  void get(const std::string& /*key*/, std::vector<T>& /*h*/) {}
};

/// The single-process reference: plain dion::<Opt> (on Mem's backend, the Eigen backend by default)
/// on the full tensors, parameters and gradients of element type T (float or dion::bf16). Returns
/// the parameters after `feed.steps` steps (and the momentum when `momenta` is given).
template <class Opt, class T = float, class Mem = HostMem>
std::vector<std::vector<float>> run_single(const std::vector<PSpec>& specs, const dion::Options& opts, const Feed& feed,
                                           int W, std::vector<std::vector<float>>* momenta = nullptr,
                                           const char* key = "momentum", Mem&& mem = Mem{}) {
  std::vector<std::vector<T>> x(specs.size()), g(specs.size());
  Opt opt{mem.backend(), opts};
  auto grp = opt.add_group();
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const auto& p = specs[i];
    x[i] = as_elems<T>(init_values(p));
    g[i].assign(x[i].size(), T(0.0f));
    grp.add(p.name, mem.put(mem_key("x", p.name), x[i], p.shape(p.rows)), mem.put(mem_key("g", p.name), g[i], p.shape(p.rows)));
  }
  for (int s = 1; s <= feed.steps; ++s) {
    for (std::size_t i = 0; i < specs.size(); ++i) {
      const auto& p = specs[i];
      g[i] = as_elems<T>(feed.per_rank_grads ? mean_grad(p, s, W) : grad_values(p, s, -1));
      if (feed.drop_second_on_step2 && s == 2 && i == 1) opt.clear_grad(p.name);
      else opt.set_grad(p.name, mem.put(mem_key("g", p.name), g[i], p.shape(p.rows)));
    }
    opt.step();
  }
  if (momenta) {
    momenta->clear();
    for (const auto& p : specs) momenta->push_back(opt.read_state(p.name + "/" + key));
  }
  std::vector<std::vector<float>> out;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    mem.get(mem_key("x", specs[i].name), x[i]);
    out.push_back(as_floats(x[i]));
  }
  return out;
}

/// How a distributed test run lays out its parameters: DDP (whole on every rank), FSDP rows
/// (ShardSpec dim -2) or FSDP columns (dim -1), both with FSDP's contiguous chunking.
enum class Layout { ddp, fsdp, fsdp_cols };

/// The [a, b) of p's sharded dim this rank holds (the whole dim for DDP).
inline std::pair<std::int64_t, std::int64_t> local_range(const PSpec& p, Layout layout, int W, int me) {
  if (layout == Layout::fsdp) return fsdp_rows(p.rows, W, me);
  if (layout == Layout::fsdp_cols) return fsdp_rows(p.cols, W, me);
  return {0, p.rows};
}
/// This rank's piece [a, b) (from local_range) of a full tensor of p.
inline std::vector<float> take_local(const std::vector<float>& full, const PSpec& p, Layout layout, std::int64_t a,
                                     std::int64_t b) {
  return layout == Layout::fsdp_cols ? take_cols(full, p, a, b) : take_rows(full, p, a, b);
}
inline dion::Shape local_shape(const PSpec& p, Layout layout, std::int64_t a, std::int64_t b) {
  return layout == Layout::fsdp_cols ? p.shape(p.rows, b - a) : p.shape(b - a);
}
inline dion::ShardSpec local_spec(const PSpec& p, Layout layout, std::int64_t a, std::int64_t b) {
  if (layout == Layout::fsdp) return {.dim = -2, .global_length = p.rows, .offset = a, .local_length = b - a};
  if (layout == Layout::fsdp_cols) return {.dim = -1, .global_length = p.cols, .offset = a, .local_length = b - a};
  return {};
}

/// The distributed run: Mesh{.replicate} (DDP, full tensors on every rank) or Mesh{.outer_shard}
/// (FSDP, rows or columns sharded with FSDP chunking) over `comm` (MpiComm, or NcclComm in
/// tests/nccl), parameters and gradients of element type T kept by Mem. Returns this rank's (local)
/// parameters.
template <class Opt, class T = float, class Comm = dion::MpiComm, class Mem = HostMem>
std::vector<std::vector<float>> run_dist(const std::vector<PSpec>& specs, const dion::Options& opts, const Feed& feed,
                                         Layout layout, Comm& comm,
                                         std::vector<std::vector<float>>* momenta = nullptr, bool sync_ckpt = false,
                                         const char* key = "momentum", Mem&& mem = Mem{}) {
  const int W = comm.size(), me = comm.rank();
  std::vector<std::vector<T>> x(specs.size()), g(specs.size());
  std::vector<std::pair<std::int64_t, std::int64_t>> range(specs.size());
  dion::Mesh<Comm> mesh;
  if (layout == Layout::ddp) mesh.replicate = &comm;
  else mesh.outer_shard = &comm;
  Opt opt{mem.backend(), mesh, opts};
  auto grp = opt.add_group();
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const auto& p = specs[i];
    range[i] = local_range(p, layout, W, me);
    const auto [a, b] = range[i];
    x[i] = as_elems<T>(take_local(init_values(p), p, layout, a, b));
    g[i].assign(x[i].size(), T(0.0f));
    const dion::Shape sh = local_shape(p, layout, a, b);
    grp.add(p.name, mem.put(mem_key("x", p.name), x[i], sh), mem.put(mem_key("g", p.name), g[i], sh), local_spec(p, layout, a, b));
  }
  for (int s = 1; s <= feed.steps; ++s) {
    for (std::size_t i = 0; i < specs.size(); ++i) {
      const auto& p = specs[i];
      const auto [a, b] = range[i];
      g[i] = as_elems<T>(take_local(grad_values(p, s, feed.per_rank_grads ? me : -1), p, layout, a, b));
      if (feed.drop_second_on_step2 && s == 2 && i == 1) opt.clear_grad(p.name);
      else opt.set_grad(p.name, mem.put(mem_key("g", p.name), g[i], local_shape(p, layout, a, b)));
    }
    opt.step();
  }
  if (sync_ckpt) opt.synchronize_for_checkpoint();
  if (momenta) {
    momenta->clear();
    for (const auto& p : specs) momenta->push_back(opt.read_state(p.name + "/" + key));
  }
  std::vector<std::vector<float>> out;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    mem.get(mem_key("x", specs[i].name), x[i]);
    out.push_back(as_floats(x[i]));
  }
  return out;
}

/// max over ranks of max |local − reference slice| over every parameter (or of the relative
/// difference of the weight change when `relative`).
inline double compare(const std::vector<PSpec>& specs, const std::vector<std::vector<float>>& local,
                      const std::vector<std::vector<float>>& ref, Layout layout, int W, int me, bool relative = false) {
  double d = 0;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const auto [a, b] = local_range(specs[i], layout, W, me);
    const auto want = take_local(ref[i], specs[i], layout, a, b);
    if (relative) {
      const auto x0 = take_local(init_values(specs[i]), specs[i], layout, a, b);
      d = std::max(d, update_rel_diff(local[i], want, x0));
    } else {
      d = std::max(d, max_abs_diff(local[i], want));
    }
  }
  return max_over_ranks(d);
}

}  // namespace dion_mpi_test
