// Distributed checkpoints and resharding (checkpoint.hpp; SPEC §2.6, §4; RELIABILITY C1, C11, C12,
// C15, C16, C18, X5), under mpiexec with 1-4 ranks.
//
// A run at world size W saves at W and loads at every W' <= W (the first W' ranks of MPI_COMM_WORLD,
// split off as a communicator, and a plain single-process optimizer on rank 0), and saves at every
// W' < W (and in a single process) and loads at W: over the runs at 1, 2, 3 and 4 ranks every pair
// (W, W') of {single, 1, 2, 3, 4} is covered, in DDP and FSDP layouts (row and column shards,
// uneven and empty shards, 3-D parameters, element-wise sharded Lion/AdamW parameters) and across
// layouts (FSDP -> DDP, DDP -> FSDP, FSDP rows -> FSDP columns). Every state tensor is gathered into its global tensor (MPI_Allgatherv) after the
// save and after the load: they must be equal bitwise (C11), with the step and skip counters. Then
// M more steps must give the parameters of the uninterrupted single-process run: bitwise where the
// distributed variant itself is (SPEC §2.7: the Muon family's DDP, Muon's FSDP), else within that
// variant's tolerance (Dion). Errors: a corrupt, missing, truncated or foreign rank file, a missing
// manifest, an incompatible layout and a rank failing during save make every rank throw (no hang:
// mpiexec's --timeout), with every rank's state unchanged. Verdicts are taken on rank 0 (which takes
// part in every run) or reduced over the ranks; nothing REQUIREs between collectives.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>

#include "dion/checkpoint/checkpoint.hpp"
#include "mpi/mpi_test_util.hpp"

using namespace dion_mpi_test;
namespace ck = dion::checkpoint;
namespace fs = std::filesystem;
using dion::Algorithm;

namespace {

// ------------------------------------------------------------------------------------------------
// Plumbing: a directory every rank sees, sub-worlds, gathers, broadcasts.

/// A fresh directory under the temp dir, named by rank 0 and seen by every rank; removed at scope exit.
struct SharedDir {
  fs::path path;
  SharedDir() {
    static int n = 0;
    long long id[2] = {static_cast<long long>(::getpid()), n++};
    MPI_Bcast(id, 2, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
    path = fs::temp_directory_path() / ("dion-ckpt-mpi-" + std::to_string(id[0]) + "-" + std::to_string(id[1]));
    if (world_rank() == 0) {
      fs::remove_all(path);
      fs::create_directories(path);
    }
    MPI_Barrier(MPI_COMM_WORLD);
  }
  ~SharedDir() {
    MPI_Barrier(MPI_COMM_WORLD);
    std::error_code ec;
    if (world_rank() == 0) fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& s) const { return path / s; }
};

/// The first n ranks of MPI_COMM_WORLD as a communicator (MPI_COMM_NULL on the others). Collective.
struct Sub {
  MPI_Comm c = MPI_COMM_NULL;
  explicit Sub(int n) { MPI_Comm_split(MPI_COMM_WORLD, world_rank() < n ? 0 : MPI_UNDEFINED, world_rank(), &c); }
  ~Sub() {
    if (c != MPI_COMM_NULL) MPI_Comm_free(&c);
  }
  Sub(const Sub&) = delete;
  Sub& operator=(const Sub&) = delete;
};

std::vector<std::byte> read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::vector<char> c((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<std::byte> v(c.size());
  if (!c.empty()) std::memcpy(v.data(), c.data(), c.size());
  return v;
}
void write_bytes(const fs::path& p, std::span<const std::byte> b) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}
bool bits_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

/// The global (batch, rows, cols) tensor from every member's slices [a, b) over `c` — rows
/// (`along_rows`) or columns; a member with none contributes nothing.
std::vector<float> gather_slices(const std::vector<float>& local, std::int64_t batch, std::int64_t rows, std::int64_t cols,
                                 std::int64_t a, std::int64_t b, bool along_rows, MPI_Comm c) {
  int n = 1;
  MPI_Comm_size(c, &n);
  long long mine[2] = {a, b};
  std::vector<long long> all(2 * static_cast<std::size_t>(n));
  MPI_Allgather(mine, 2, MPI_LONG_LONG, all.data(), 2, MPI_LONG_LONG, c);
  const long long other = along_rows ? cols : rows;  // the length of one slice
  std::vector<int> counts(static_cast<std::size_t>(n)), displs(static_cast<std::size_t>(n));
  int total = 0;
  for (int j = 0; j < n; ++j) {
    counts[static_cast<std::size_t>(j)] =
        static_cast<int>(batch * (all[2 * static_cast<std::size_t>(j) + 1] - all[2 * static_cast<std::size_t>(j)]) * other);
    displs[static_cast<std::size_t>(j)] = total;
    total += counts[static_cast<std::size_t>(j)];
  }
  std::vector<float> buf(static_cast<std::size_t>(total));
  MPI_Allgatherv(local.data(), static_cast<int>(local.size()), MPI_FLOAT, buf.data(), counts.data(), displs.data(),
                 MPI_FLOAT, c);
  std::vector<float> full(static_cast<std::size_t>(batch * rows * cols));
  for (int j = 0; j < n; ++j) {
    const long long ja = all[2 * static_cast<std::size_t>(j)], jb = all[2 * static_cast<std::size_t>(j) + 1];
    const long long i0 = along_rows ? ja : 0, i1 = along_rows ? jb : rows;
    const long long k0 = along_rows ? 0 : ja, k1 = along_rows ? cols : jb;
    const float* src = buf.data() + displs[static_cast<std::size_t>(j)];
    for (long long m = 0; m < batch; ++m)
      for (long long i = i0; i < i1; ++i)
        for (long long k = k0; k < k1; ++k) full[static_cast<std::size_t>((m * rows + i) * cols + k)] = *src++;
  }
  return full;
}
/// Rows [a, b) of every member (cols are found from the members that hold rows).
std::vector<float> gather_rows(const std::vector<float>& local, std::int64_t batch, std::int64_t rows, std::int64_t a,
                               std::int64_t b, MPI_Comm c) {
  long long cols = b > a ? static_cast<long long>(local.size()) / (batch * (b - a)) : 0;
  MPI_Allreduce(MPI_IN_PLACE, &cols, 1, MPI_LONG_LONG, MPI_MAX, c);
  return gather_slices(local, batch, rows, cols, a, b, true, c);
}
/// Columns [a, b) of every member (every member knows rows and cols).
std::vector<float> gather_cols(const std::vector<float>& local, std::int64_t batch, std::int64_t rows, std::int64_t cols,
                               std::int64_t a, std::int64_t b, MPI_Comm c) {
  return gather_slices(local, batch, rows, cols, a, b, false, c);
}

using TensorMap = std::map<std::string, std::vector<float>>;

/// Broadcast a name -> values map from world rank 0 to every rank.
void bcast_map(TensorMap& m) {
  long long n = static_cast<long long>(m.size());
  MPI_Bcast(&n, 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
  auto it = m.begin();
  TensorMap out;
  for (long long i = 0; i < n; ++i) {
    std::string name;
    std::vector<float> v;
    if (world_rank() == 0) {
      name = it->first;
      v = it->second;
      ++it;
    }
    long long sz[2] = {static_cast<long long>(name.size()), static_cast<long long>(v.size())};
    MPI_Bcast(sz, 2, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
    name.resize(static_cast<std::size_t>(sz[0]));
    v.resize(static_cast<std::size_t>(sz[1]));
    MPI_Bcast(name.data(), static_cast<int>(sz[0]), MPI_CHAR, 0, MPI_COMM_WORLD);
    MPI_Bcast(v.data(), static_cast<int>(sz[1]), MPI_FLOAT, 0, MPI_COMM_WORLD);
    out.emplace(std::move(name), std::move(v));
  }
  m = std::move(out);
}

// ------------------------------------------------------------------------------------------------
// The test model and its runs.

/// A parameter: a (rows, cols) or (batch, rows, cols) matrix, or a vector of `cols` elements. FSDP
/// shards matrices along their rows (Lay::fsdp) or columns (Lay::fsdp_cols) and vectors along
/// their elements (FSDP's contiguous chunks).
struct TP {
  std::string name;
  int group = 0;  // 0: the optimizer's algorithm, 1: adamw, 2: lion
  std::int64_t batch = 1, rows = 1, cols = 1;
  bool three_d = false, vec = false;
  std::int64_t numel() const { return batch * rows * cols; }
  std::int64_t extent() const { return vec ? cols : rows; }
  dion::Shape shape(std::int64_t n) const {
    if (vec) return dion::Shape{n};
    return three_d ? dion::Shape{batch, n, cols} : dion::Shape{n, cols};
  }
  std::vector<float> slice(const std::vector<float>& full, std::int64_t a, std::int64_t b) const {
    if (vec) return {full.begin() + a, full.begin() + b};
    std::vector<float> out;
    for (std::int64_t m = 0; m < batch; ++m)
      for (std::int64_t i = a; i < b; ++i)
        for (std::int64_t j = 0; j < cols; ++j) out.push_back(full[static_cast<std::size_t>((m * rows + i) * cols + j)]);
    return out;
  }
  // column shards (a vector: its elements)
  std::int64_t extent(bool by_cols) const { return by_cols ? cols : extent(); }
  dion::Shape shape(std::int64_t n, bool by_cols) const {
    if (!by_cols || vec) return shape(n);
    return three_d ? dion::Shape{batch, rows, n} : dion::Shape{rows, n};
  }
  std::vector<float> slice(const std::vector<float>& full, std::int64_t a, std::int64_t b, bool by_cols) const {
    if (!by_cols || vec) return slice(full, a, b);
    std::vector<float> out;
    for (std::int64_t m = 0; m < batch; ++m)
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t j = a; j < b; ++j) out.push_back(full[static_cast<std::size_t>((m * rows + i) * cols + j)]);
    return out;
  }
};

enum class Lay { single, ddp, fsdp, fsdp_cols };  // fsdp: matrices row-sharded; fsdp_cols: column-sharded
/// Where a run happens: a plain single-process optimizer on world rank 0, or the first n ranks.
struct Where {
  int n = 0;
  Lay lay = Lay::single;
  std::string str() const {
    return lay == Lay::single ? std::string("single process")
                              : std::to_string(n) + (n == 1 ? " rank " : " ranks ") +
                                    (lay == Lay::ddp ? "DDP" : lay == Lay::fsdp ? "FSDP" : "FSDP (column shards)");
  }
};

struct Setup {
  std::vector<TP> ps;
  dion::Options o;
  int nan_step = -1;            ///< this step's gradient of the first parameter holds a NaN (skipped)
  bool per_rank_grads = false;  ///< DDP: each rank its own gradient (the reference: their mean)
};

/// Everything observable, as global tensors: parameters, state by name, counters.
struct Snap {
  bool ran = false;  ///< this rank took part
  std::string error;
  TensorMap params, state;
  std::vector<std::int64_t> steps;
  std::int64_t skipped = -1;
};

std::vector<float> grad_of(const TP& p, int step, int rank, int W, bool per_rank) {
  if (!per_rank) return values(p.name, 1000u + 64u * static_cast<unsigned>(step), static_cast<std::size_t>(p.numel()));
  auto one = [&](int r) {
    return values(p.name, 1000u + 64u * static_cast<unsigned>(step) + static_cast<unsigned>(r + 1),
                  static_cast<std::size_t>(p.numel()));
  };
  if (rank >= 0) return one(rank);
  std::vector<double> acc(static_cast<std::size_t>(p.numel()), 0.0);
  for (int r = 0; r < W; ++r) {
    const auto g = one(r);
    for (std::size_t i = 0; i < acc.size(); ++i) acc[i] += g[i];
  }
  std::vector<float> out(acc.size());
  for (std::size_t i = 0; i < acc.size(); ++i) out[i] = static_cast<float>(acc[i] / W);
  return out;
}

TensorMap initial_params(const Setup& su) {
  TensorMap m;
  for (const auto& p : su.ps) m[p.name] = values(p.name, 7, static_cast<std::size_t>(p.numel()), 0.5f);
  return m;
}

/// One run: build the optimizer at `wh` over `init`, load `load_dir` (if any), snapshot, take steps
/// [from, to), save to `save_dir` (if any), snapshot. Collective over MPI_COMM_WORLD (every rank
/// calls it; ranks outside `wh` return at once). `grads_world`: the world size the per-rank
/// gradients are averaged over in a single-process run.
template <class O>
std::pair<Snap, Snap> body(const Setup& su, Where wh, const TensorMap& init, int from, int to, const fs::path* load_dir,
                           const fs::path* save_dir, dion::MpiComm* comm, MPI_Comm mc, int grads_world) {
  const int W = comm ? comm->size() : 1, me = comm ? comm->rank() : 0;
  const bool fsdp = wh.lay == Lay::fsdp || wh.lay == Lay::fsdp_cols, by_cols = wh.lay == Lay::fsdp_cols;
  dion::EigenBackend be;
  std::unique_ptr<O> opt;
  if constexpr (O::comm_type::distributed) {
    dion::Mesh<dion::MpiComm> mesh;
    if (fsdp) mesh.outer_shard = comm;
    else mesh.replicate = comm;
    opt = std::make_unique<O>(be, mesh, su.o);
  } else {
    opt = std::make_unique<O>(be, su.o);
  }
  std::vector<typename O::GroupRef> groups{opt->add_group(), opt->add_group({.algorithm = Algorithm::adamw, .lr = 0.003f}),
                                           opt->add_group({.algorithm = Algorithm::lion, .lr = 0.001f})};
  std::vector<std::vector<float>> x(su.ps.size()), g(su.ps.size());
  std::vector<std::pair<std::int64_t, std::int64_t>> range(su.ps.size());
  for (std::size_t i = 0; i < su.ps.size(); ++i) {
    const TP& p = su.ps[i];
    const std::int64_t ext = p.extent(by_cols);
    range[i] = fsdp ? fsdp_rows(ext, W, me) : std::pair<std::int64_t, std::int64_t>{0, p.extent()};
    const auto [a, b] = range[i];
    x[i] = p.slice(init.at(p.name), a, b, by_cols);
    g[i].assign(x[i].size(), 0.0f);
    dion::ShardSpec sh;
    if (fsdp) sh = {.dim = p.vec || by_cols ? -1 : -2, .global_length = ext, .offset = a, .local_length = b - a};
    groups[static_cast<std::size_t>(p.group)].add(p.name, dion::host_view(x[i].data(), p.shape(b - a, by_cols)),
                                                  dion::host_view(g[i].data(), p.shape(b - a, by_cols)), sh);
  }
  // the global tensor of a parameter-shaped local piece
  auto gather = [&](const std::vector<float>& local, const TP& p, std::size_t i) {
    if (by_cols && !p.vec)
      return gather_cols(local, p.batch, p.rows, p.cols, range[i].first, range[i].second, mc);
    return gather_rows(local, p.vec ? 1 : p.batch, p.extent(), range[i].first, range[i].second, mc);
  };
  auto snapshot = [&] {
    Snap s;
    s.ran = true;
    for (std::size_t i = 0; i < su.ps.size(); ++i) {
      const TP& p = su.ps[i];
      s.params[p.name] = mc == MPI_COMM_NULL || !fsdp ? x[i] : gather(x[i], p, i);
    }
    for (const auto& r : opt->state()) {
      const auto local = opt->read_state(r.name);
      const std::string pname = r.name.substr(0, r.name.find('/'));
      std::size_t i = 0;
      while (su.ps[i].name != pname) ++i;
      const TP& p = su.ps[i];
      const bool sharded = fsdp && mc != MPI_COMM_NULL && r.key != "step_dev";
      // Q of a row-sharded Dion matrix is (rows, r): one "batch" (column shards: Muon only here)
      s.state[r.name] = !sharded ? local
                        : r.key == "Q" ? gather_rows(local, 1, p.extent(), range[i].first, range[i].second, mc)
                                       : gather(local, p, i);
    }
    for (int gi = 0; gi < opt->num_groups(); ++gi) s.steps.push_back(opt->step_count(gi));
    s.skipped = opt->skipped_steps();
    return s;
  };
  std::pair<Snap, Snap> out;
  try {
    if (load_dir) ck::load(*opt, *load_dir);
    out.first = snapshot();
    for (int s = from; s < to; ++s) {
      for (std::size_t i = 0; i < su.ps.size(); ++i) {
        const TP& p = su.ps[i];
        auto full = grad_of(p, s, su.per_rank_grads && comm ? me : -1, grads_world, su.per_rank_grads);
        if (s == su.nan_step && i == 0) full.back() = std::nanf("");
        const auto local = p.slice(full, range[i].first, range[i].second, by_cols);
        std::copy(local.begin(), local.end(), g[i].begin());
      }
      opt->step();
    }
    if (save_dir) ck::save(*opt, *save_dir);
    out.second = snapshot();
  } catch (const dion::Error& e) {
    out.first.ran = out.second.ran = true;
    out.first.error = out.second.error = e.what();
  }
  return out;
}

template <template <class, class, class> class Opt>
std::pair<Snap, Snap> run(const Setup& su, Where wh, const TensorMap& init, int from, int to,
                          const fs::path* load_dir = nullptr, const fs::path* save_dir = nullptr) {
  if (wh.lay == Lay::single) {
    if (world_rank() != 0) return {};
    return body<Opt<dion::EigenBackend, dion::SingleProcess, dion::precision::Default>>(
        su, wh, init, from, to, load_dir, save_dir, nullptr, MPI_COMM_NULL, world_size());
  }
  Sub sub(wh.n);
  if (sub.c == MPI_COMM_NULL) return {};
  dion::MpiComm comm{sub.c, std::chrono::seconds(60)};
  return body<Opt<dion::EigenBackend, dion::MpiComm, dion::precision::Default>>(su, wh, init, from, to, load_dir,
                                                                                save_dir, &comm, sub.c, wh.n);
}

/// The first difference between two tensor maps ("" if bitwise equal).
std::string first_difference(const TensorMap& a, const TensorMap& b) {
  if (a.size() != b.size()) return "different tensor sets (" + std::to_string(a.size()) + " vs " + std::to_string(b.size()) + ")";
  for (const auto& [n, v] : a) {
    const auto it = b.find(n);
    if (it == b.end()) return "'" + n + "' missing";
    if (!bits_equal(v, it->second))
      return "'" + n + "' differs (max |diff| " + std::to_string(max_abs_diff(v, it->second)) + ")";
  }
  return "";
}
/// max over parameters of max |Δa − Δb| / max |Δb| (weight changes from x0).
double params_rel_diff(const TensorMap& a, const TensorMap& b, const TensorMap& x0) {
  double d = 0;
  for (const auto& [n, v] : b) d = std::max(d, a.count(n) ? update_rel_diff(a.at(n), v, x0.at(n)) : 1e30);
  return d;
}

constexpr int kSteps = 3, kMore = 2;

/// Save at W, load at every W' <= W (and in a single process); save at every W' < W (and in a
/// single process), load at W. The loaded global state equals the saved one bitwise; kMore more steps
/// match the uninterrupted single-process run bitwise (`tol` = 0), within `tol` (relative update
/// difference), or are not compared (`tol` < 0: the variant differs from one process by design).
template <template <class, class, class> class Opt>
void check_reshard(const std::string& label, const Setup& su, Lay save_lay, Lay load_lay, double tol) {
  const int W = world_size();
  SharedDir dir;
  const TensorMap init = initial_params(su);
  Snap ref_k, ref_end;
  if (world_rank() == 0) {
    ref_k = run<Opt>(su, {0, Lay::single}, init, 0, kSteps).second;
    ref_end = run<Opt>(su, {0, Lay::single}, init, 0, kSteps + kMore).second;
    CHECK(ref_k.error.empty());
    CHECK(ref_end.error.empty());
  }
  std::vector<std::pair<Where, std::vector<Where>>> plan;
  std::vector<Where> loads_of_w{{0, Lay::single}};
  for (int n = 1; n <= W; ++n) loads_of_w.push_back({n, load_lay});
  plan.push_back({{W, save_lay}, loads_of_w});
  plan.push_back({{0, Lay::single}, {{W, load_lay}}});
  for (int n = 1; n < W; ++n) plan.push_back({{n, save_lay}, {{W, load_lay}}});
  int k = 0;
  for (const auto& [sw, loads] : plan) {
    const fs::path path = dir / ("c" + std::to_string(k++));
    const Snap saved = run<Opt>(su, sw, init, 0, kSteps, nullptr, &path).second;
    if (saved.ran) {
      INFO(label << ": saving at " << sw.str() << ": " << saved.error);
      CHECK(saved.error.empty());
    }
    TensorMap params = saved.params;  // the restart point: the saving run's parameters
    bcast_map(params);
    for (const auto& lw : loads) {
      auto [loaded, end] = run<Opt>(su, lw, params, kSteps, kSteps + kMore, &path);
      if (loaded.ran) {
        INFO(label << ": saved at " << sw.str() << ", loaded at " << lw.str() << ": " << loaded.error);
        CHECK(loaded.error.empty());
      }
      if (world_rank() != 0 || !loaded.error.empty() || !saved.error.empty()) continue;
      INFO(label << ": saved at " << sw.str() << ", loaded at " << lw.str());
      // C11: the gathered state after the load is the saved global state, bitwise, with the counters
      const std::string ds = first_difference(loaded.state, saved.state);
      INFO("loaded vs saved state: " << ds);
      CHECK(ds.empty());
      CHECK(loaded.steps == saved.steps);
      CHECK(loaded.skipped == saved.skipped);
      if (su.nan_step >= 0 && su.nan_step < kSteps) CHECK(loaded.skipped == 1);
      // C1 after resharding: the continuation against the uninterrupted run
      if (tol == 0.0) {
        const std::string dp = first_difference(end.params, ref_end.params);
        const std::string dst = first_difference(end.state, ref_end.state);
        INFO("parameters vs uninterrupted: " << dp << "; state: " << dst);
        CHECK(dp.empty());
        CHECK(dst.empty());
        CHECK(end.steps == ref_end.steps);
      } else if (tol > 0) {
        const double d = params_rel_diff(end.params, ref_end.params, init);
        INFO("relative update difference vs uninterrupted: " << d << " (allowed " << tol << ")");
        CHECK(d <= tol);
      }
    }
  }
}

std::vector<TP> muon_model() {
  // 17 rows (5,5,5,2 on 4 ranks; 6,6,5 on 3), 1 row (empty shards), 7x15, tall 15x3, 3-D (3,10,6),
  // an AdamW vector of 33 (sharded element-wise) and a Lion matrix 5x8 (row-sharded)
  return {{"a", 0, 1, 17, 24}, {"b", 0, 1, 1, 16}, {"c", 0, 1, 7, 15}, {"d", 0, 1, 15, 3},
          {"e", 0, 3, 10, 6, true}, {"bias", 1, 1, 1, 33, false, true}, {"gain", 2, 1, 5, 8}};
}
std::vector<TP> dion_model() {
  // wide matrices only: row-sharded Dion is transposed, as an unsharded wide matrix is
  return {{"a", 0, 1, 17, 24}, {"b", 0, 1, 1, 16}, {"c", 0, 1, 7, 15}, {"d", 0, 1, 12, 40},
          {"bias", 1, 1, 1, 33, false, true}, {"gain", 2, 1, 5, 8}};
}

// ------------------------------------------------------------------------------------------------
// Dion on device meshes (replicate x outer_shard x inner_shard over the whole world).

/// A mesh over the world: grid Wr x Wo x Wi (world rank = (r·Wo + o)·Wi + i) and which of the three
/// communicators the optimizer's Mesh passes (a dimension of size 1 still passes its communicator).
struct Grid {
  const char* name;
  int Wr = 1, Wo = 1, Wi = 1;
  bool rep = false, outer = false, inner = false;
};
std::vector<Grid> grids(int W) {
  const bool four = W == 4;
  return {{"FSDP x TP", 1, four ? 2 : W, four ? 2 : 1, false, true, true},
          {"HSDP", four ? 2 : 1, four ? 2 : W, 1, true, true, false},
          {"TP", 1, 1, W, false, false, true},
          {"DP x TP", four ? 2 : W, 1, four ? 2 : 1, true, false, true}};
}
/// This rank's coordinates in a grid and the grid's communicators (null where not passed).
struct MeshComms {
  int r = 0, o = 0, i = 0;
  std::unique_ptr<dion::MpiComm> rep, outer, inner;
  dion::Mesh<dion::MpiComm> mesh() const { return {rep.get(), outer.get(), inner.get()}; }
};
std::unique_ptr<dion::MpiComm> split_world(int color, int key) {
  MPI_Comm c;
  MPI_Comm_split(MPI_COMM_WORLD, color, key, &c);
  auto out = std::make_unique<dion::MpiComm>(c, std::chrono::seconds(60));
  MPI_Comm_free(&c);  // dion keeps its own duplicate
  return out;
}
MeshComms make_mesh(const Grid& g) {
  MeshComms c;
  const int w = world_rank();
  c.i = w % g.Wi;
  c.o = (w / g.Wi) % g.Wo;
  c.r = w / (g.Wi * g.Wo);
  auto in = split_world(c.r * g.Wo + c.o, c.i);  // every rank splits every dimension, in one order
  auto ou = split_world(c.r * g.Wi + c.i, c.o);
  auto re = split_world(c.o * g.Wi + c.i, c.r);
  if (g.rep) c.rep = std::move(re);
  if (g.outer) c.outer = std::move(ou);
  if (g.inner) c.inner = std::move(in);
  return c;
}

/// A Dion test tensor: a matrix (outer_dim / inner_dim: the dim cut over outer_shard / inner_shard
/// when the mesh has it) or an AdamW vector (cut over outer_shard, else inner_shard).
struct MT {
  std::string name;
  std::int64_t rows = 1, cols = 1;
  int outer_dim = 0, inner_dim = 0;
  bool vec = false;
};
/// Tall matrices cut rows over inner / columns over outer (B = M), wide ones rows over outer /
/// columns over inner (B = M^T): the orientation one process uses too, in every grid.
std::vector<MT> mesh_model() {
  return {{"t", 24, 10, -1, -2}, {"w", 12, 30, -2, -1}, {"s", 5, 3, -1, -2}, {"u", 9, 14, 0, 0},
          {"bias", 1, 33, 0, 0, true}};
}
struct Box {
  std::int64_t ra = 0, rb = 0, ca = 0, cb = 0;
};
Box box_of(const MT& m, const Grid& g, const MeshComms& c) {
  Box b{0, m.rows, 0, m.cols};
  auto cut = [&](int dim, int W, int j) {
    if (dim == -2) std::tie(b.ra, b.rb) = fsdp_rows(m.rows, W, j);
    if (dim == -1) std::tie(b.ca, b.cb) = fsdp_rows(m.cols, W, j);
  };
  if (m.vec) {
    if (g.outer) cut(-1, g.Wo, c.o);
    else if (g.inner) cut(-1, g.Wi, c.i);
    return b;
  }
  if (g.outer) cut(m.outer_dim, g.Wo, c.o);
  if (g.inner) cut(m.inner_dim, g.Wi, c.i);
  return b;
}
std::vector<float> take_box(const std::vector<float>& full, std::int64_t cols, const Box& b) {
  std::vector<float> out;
  for (std::int64_t i = b.ra; i < b.rb; ++i)
    for (std::int64_t j = b.ca; j < b.cb; ++j) out.push_back(full[static_cast<std::size_t>(i * cols + j)]);
  return out;
}
std::vector<float> mesh_grad(const MT& m, int step) {
  return values(m.name, 1000u + 64u * static_cast<unsigned>(step), static_cast<std::size_t>(m.rows * m.cols));
}

/// Run Dion on grid `g` (g == nullptr: one process on world rank 0): load `load_dir` if given, take
/// steps [from, to), save to `save_dir` if given. Returns this rank's state pieces checked against
/// `global` (the global state, when given: the number of mismatching tensors), and its parameters.
struct MeshResult {
  std::string error;
  int state_mismatches = 0;
  std::map<std::string, std::vector<float>> params, state;  // local pieces
};
MeshResult run_dion_mesh(const std::vector<MT>& ms, const dion::Options& o, const Grid* g, const TensorMap& init,
                         int from, int to, const fs::path* load_dir, const fs::path* save_dir,
                         const TensorMap* global = nullptr) {
  MeshResult res;
  dion::EigenBackend be;
  MeshComms c;
  if (g) c = make_mesh(*g);
  else if (world_rank() != 0) return res;
  using DistDion = dion::Dion<dion::EigenBackend, dion::MpiComm>;
  using OneDion = dion::Dion<dion::EigenBackend>;
  std::unique_ptr<DistDion> dist;
  std::unique_ptr<OneDion> one;
  if (g) dist = std::make_unique<DistDion>(be, c.mesh(), o);
  else one = std::make_unique<OneDion>(be, o);
  auto body = [&](auto& opt) {
    auto g0 = opt.add_group();
    auto g1 = opt.add_group({.algorithm = Algorithm::adamw, .lr = 0.003f});
    std::vector<std::vector<float>> x(ms.size()), gr(ms.size());
    std::vector<Box> boxes(ms.size());
    for (std::size_t k = 0; k < ms.size(); ++k) {
      const MT& m = ms[k];
      boxes[k] = g ? box_of(m, *g, c) : Box{0, m.rows, 0, m.cols};
      const Box& b = boxes[k];
      x[k] = take_box(init.at(m.name), m.cols, b);
      gr[k].assign(x[k].size(), 0.0f);
      auto spec = [&](int dim, bool over) -> dion::ShardSpec {
        if (!g || !over || dim == 0) return {};
        if (dim == -2) return {.dim = -2, .global_length = m.rows, .offset = b.ra, .local_length = b.rb - b.ra};
        return {.dim = -1, .global_length = m.cols, .offset = b.ca, .local_length = b.cb - b.ca};
      };
      const dion::Shape sh = m.vec ? dion::Shape{b.cb - b.ca} : dion::Shape{b.rb - b.ra, b.cb - b.ca};
      if (m.vec) {
        const bool on_outer = g && g->outer;
        g1.add(m.name, dion::host_view(x[k].data(), sh), dion::host_view(gr[k].data(), sh), spec(-1, on_outer),
               spec(-1, g && !on_outer && g->inner));
      } else {
        g0.add(m.name, dion::host_view(x[k].data(), sh), dion::host_view(gr[k].data(), sh),
               spec(m.outer_dim, g && g->outer), spec(m.inner_dim, g && g->inner));
      }
    }
    if (load_dir) ck::load(opt, *load_dir);
    // the loaded (or saved, below) state against the global state: every piece is its box
    auto check_state = [&] {
      if (!global) return;
      for (const auto& s : opt.state()) {
        const std::string pname = s.name.substr(0, s.name.find('/'));
        std::size_t k = 0;
        while (ms[k].name != pname) ++k;
        const MT& m = ms[k];
        const Box& b = boxes[k];
        const auto& full = global->at(s.name);
        std::vector<float> want;
        if (s.key == "Q") {
          // Q (q x r): rows like B's columns (the outer cut), the r columns in even blocks over inner
          const bool t = m.rows < m.cols;  // the orientation (matches one process in these grids)
          const std::int64_t q = t ? m.rows : m.cols, r = static_cast<std::int64_t>(full.size()) / q;
          Box qb{0, q, 0, r};
          if (g && g->outer && m.outer_dim != 0) std::tie(qb.ra, qb.rb) = t ? std::pair{b.ra, b.rb} : std::pair{b.ca, b.cb};
          if (g && g->inner && m.inner_dim != 0)
            std::tie(qb.ca, qb.cb) = dion::detail::even_block(r, c.inner->size(), c.inner->rank());
          want = take_box(full, r, qb);
        } else {
          want = take_box(full, m.cols, b);
        }
        if (!bits_equal(opt.read_state(s.name), want)) {
          ++res.state_mismatches;
          UNSCOPED_INFO("rank " << world_rank() << ": state '" << s.name << "' differs from its box of the global state");
        }
      }
    };
    if (load_dir) check_state();
    for (int st = from; st < to; ++st) {
      for (std::size_t k = 0; k < ms.size(); ++k) {
        const auto full = mesh_grad(ms[k], st);
        const auto local = take_box(full, ms[k].cols, boxes[k]);
        std::copy(local.begin(), local.end(), gr[k].begin());
      }
      opt.step();
    }
    if (save_dir) {
      ck::save(opt, *save_dir);
      check_state();
    }
    for (std::size_t k = 0; k < ms.size(); ++k) res.params[ms[k].name] = x[k];
    for (const auto& s : opt.state()) res.state[s.name] = opt.read_state(s.name);
  };
  try {
    if (g) body(*dist);
    else body(*one);
  } catch (const dion::Error& e) {
    res.error = e.what();
  }
  return res;
}

/// Every rank's local optimizer image (state bytes and counters), for "unchanged" checks.
template <class O>
std::vector<std::byte> image(O& opt) {
  return ck::save_bytes(opt);
}

/// A trained Muon FSDP optimizer over all ranks (for the error tests).
struct Fsdp {
  dion::EigenBackend be;
  dion::MpiComm comm{MPI_COMM_WORLD, std::chrono::seconds(60)};
  dion::Muon<dion::EigenBackend, dion::MpiComm> opt{be, {.outer_shard = &comm}, {.lr = 0.02f}};
  std::vector<TP> ps = muon_model();
  std::vector<std::vector<float>> x, g;
  std::vector<std::pair<std::int64_t, std::int64_t>> range;
  explicit Fsdp(int steps, int salt = 0) {
    const int W = comm.size(), me = comm.rank();
    std::vector<dion::Optimizer<dion::EigenBackend, dion::MpiComm>::GroupRef> groups{
        opt.add_group(), opt.add_group({.algorithm = Algorithm::adamw}), opt.add_group({.algorithm = Algorithm::lion})};
    for (const auto& p : ps) {
      const auto [a, b] = fsdp_rows(p.extent(), W, me);
      range.push_back({a, b});
      x.push_back(p.slice(values(p.name, 7, static_cast<std::size_t>(p.numel())), a, b));
      g.push_back(std::vector<float>(x.back().size(), 0.0f));
      groups[static_cast<std::size_t>(p.group)].add(
          p.name, dion::host_view(x.back().data(), p.shape(b - a)), dion::host_view(g.back().data(), p.shape(b - a)),
          {.dim = p.vec ? -1 : -2, .global_length = p.extent(), .offset = a, .local_length = b - a});
    }
    for (int s = 0; s < steps; ++s) {
      for (std::size_t i = 0; i < ps.size(); ++i) {
        const auto full = grad_of(ps[i], s + salt, -1, 1, false);
        const auto local = ps[i].slice(full, range[i].first, range[i].second);
        std::copy(local.begin(), local.end(), g[i].begin());
      }
      opt.step();
    }
  }
};

/// Load `dir` into `opt` on every rank: returns 1 when it threw dion::CheckpointError (or the type
/// E) whose message holds `mine` (this rank read the bad file) or `theirs` (another rank did),
/// 0 otherwise; checks that the rank's optimizer is unchanged.
template <class E, class O>
int load_fails(O& opt, const fs::path& dir, const std::string& mine, const std::string& theirs) {
  const auto before = image(opt);
  int caught = 0;
  std::string msg;
  try {
    ck::load(opt, dir);
    msg = "(no exception)";
  } catch (const E& e) {
    msg = e.what();
    caught = (msg.find(mine) != std::string::npos || (!theirs.empty() && msg.find(theirs) != std::string::npos)) ? 1 : 0;
  } catch (const dion::Error& e) {
    msg = std::string("other error: ") + e.what();
  }
  INFO("rank " << world_rank() << ": " << msg);
  CHECK(caught == 1);
  CHECK(image(opt) == before);
  return caught;
}

}  // namespace

// ================================================================================================

TEST_CASE("checkpoint (MPI): Muon family reshards bitwise: save at W, load at W' in DDP, FSDP and one process",
          "[mpi][checkpoint][reshard]") {
  Setup su{muon_model(), {.lr = 0.02f}, /*nan_step=*/1};
  check_reshard<dion::Muon>("muon fsdp -> fsdp", su, Lay::fsdp, Lay::fsdp, 0.0);
  check_reshard<dion::Muon>("muon ddp -> fsdp", su, Lay::ddp, Lay::fsdp, 0.0);
  check_reshard<dion::Muon>("muon fsdp -> ddp", su, Lay::fsdp, Lay::ddp, 0.0);
  check_reshard<dion::NorMuon>("normuon ddp -> ddp", su, Lay::ddp, Lay::ddp, 0.0);
  check_reshard<dion::Dion2>("dion2 ddp -> ddp", {muon_model(), {.lr = 0.02f, .fraction = 0.5}, 1}, Lay::ddp, Lay::ddp,
                             0.0);
  check_reshard<dion::NorDion2>("nordion2 ddp -> ddp", {muon_model(), {.lr = 0.02f, .fraction = 0.35}, 1}, Lay::ddp,
                                Lay::ddp, 0.0);
}

TEST_CASE("checkpoint (MPI): column-sharded Muon reshards bitwise (W <-> one process, rows <-> columns)",
          "[mpi][checkpoint][reshard][cols]") {
  // Matrices sharded along their columns (ShardSpec dim -1; the AdamW vector along its elements,
  // the Lion matrix along its columns too): a state tensor's box in its global tensor is cut along
  // the last dim. Saved at W, loaded at every W' <= W and in one process; saved in one process and
  // at every W' < W, loaded at W; and between row and column shards. Column-sharded Muon is
  // bitwise one process (test_distributed.cpp), so the continuation is compared bitwise.
  Setup su{muon_model(), {.lr = 0.02f}, /*nan_step=*/1};
  check_reshard<dion::Muon>("muon fsdp cols -> fsdp cols", su, Lay::fsdp_cols, Lay::fsdp_cols, 0.0);
  check_reshard<dion::Muon>("muon fsdp rows -> fsdp cols", su, Lay::fsdp, Lay::fsdp_cols, 0.0);
}

TEST_CASE("checkpoint (MPI): sharded NorMuon / NorDion2 state (variance_neuron) reshards exactly",
          "[mpi][checkpoint][reshard]") {
  // NorMuon and NorDion2 FSDP differ from one process by design (per-shard normalization and
  // selection, SPEC §2.3-2.4): the loaded state is compared bitwise, the continuation is not.
  check_reshard<dion::NorMuon>("normuon fsdp -> ddp", {muon_model(), {.lr = 0.02f}}, Lay::fsdp, Lay::ddp, -1.0);
  check_reshard<dion::NorDion2>("nordion2 ddp -> fsdp", {muon_model(), {.lr = 0.02f, .fraction = 0.5}}, Lay::ddp,
                                Lay::fsdp, -1.0);
}

TEST_CASE("checkpoint (MPI): Dion reshards (DDP full and compressed sync, FSDP, one process) within its tolerance",
          "[mpi][checkpoint][reshard][dion]") {
  // The loaded state is bitwise the saved one; the continuation is compared with the uninterrupted
  // single-process run at Dion's distributed tolerance (test_distributed.cpp: reduction order of P
  // and of the averaged gradients, ~1e-5 relative measured; bound 1e-4).
  check_reshard<dion::Dion>("dion ddp full sync", {dion_model(), {.lr = 0.02f, .rank_fraction = 1.0}, 1}, Lay::ddp,
                            Lay::ddp, 1e-4);
  check_reshard<dion::Dion>("dion ddp compressed", {dion_model(), {.lr = 0.02f, .rank_fraction = 0.25}}, Lay::ddp,
                            Lay::ddp, 1e-4);
  check_reshard<dion::Dion>("dion fsdp -> fsdp", {dion_model(), {.lr = 0.02f, .rank_fraction = 0.5}, 1}, Lay::fsdp,
                            Lay::fsdp, 1e-4);
  check_reshard<dion::Dion>("dion fsdp -> ddp", {dion_model(), {.lr = 0.02f, .rank_fraction = 0.5}}, Lay::fsdp,
                            Lay::ddp, 1e-4);
}

TEST_CASE("checkpoint (MPI): save() synchronizes Dion's decoupled replica momenta first (SPEC 2.6)",
          "[mpi][checkpoint][dion]") {
  // Each rank its own gradient, compressed sync: the replicas' momenta differ until
  // synchronize_for_checkpoint(), which save() calls; the saved momentum is the replicas' mean, which
  // evolves like single-process Dion on the mean gradient (bound as in test_distributed.cpp).
  const int W = world_size();
  SharedDir dir;
  const Setup su{{{"a", 0, 1, 32, 48}, {"b", 0, 1, 32, 48}, {"d", 0, 1, 40, 24}},
                 {.lr = 0.02f, .rank_fraction = 0.25}, -1, true};
  const TensorMap init = initial_params(su);
  const fs::path path = dir / "c";
  const auto saved = run<dion::Dion>(su, {W, Lay::ddp}, init, 0, kSteps, nullptr, &path).second;
  CHECK(saved.error.empty());
  // every replica holds the same momentum after save()
  double spread = 0;
  for (const auto& [n, v] : saved.state) {
    auto r0 = v;
    MPI_Bcast(r0.data(), static_cast<int>(r0.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
    spread = std::max(spread, max_abs_diff(v, r0));
  }
  CHECK(max_over_ranks(spread) == 0.0);
  if (world_rank() == 0) {
    const auto local = run<dion::Dion>(su, {0, Lay::single}, init, 0, kSteps).second;  // mean-gradient reference
    const auto loaded = run<dion::Dion>(su, {0, Lay::single}, saved.params, kSteps, kSteps, &path).first;
    CHECK(loaded.error.empty());
    double dm = 0, scale = 0;
    for (const auto& n : {"a/momentum", "b/momentum", "d/momentum"}) {
      dm = std::max(dm, max_abs_diff(loaded.state.at(n), local.state.at(n)));
      for (float v : local.state.at(n)) scale = std::max(scale, static_cast<double>(std::fabs(v)));
    }
    INFO("loaded momentum vs single-process momentum on the mean gradient: " << dm / scale << " relative");
    CHECK(dm / scale <= 1e-4);
  }
  // without the synchronization the replicas' own momenta are far apart (the check above is not vacuous)
  if (W > 1) {
    Sub sub(W);
    dion::MpiComm comm{sub.c, std::chrono::seconds(60)};
    dion::EigenBackend be;
    std::vector<float> x = init.at("a"), g(x.size());
    dion::Dion<dion::EigenBackend, dion::MpiComm> opt{be, {.replicate = &comm}, su.o};
    opt.add_group().add("a", dion::host_view(x.data(), {32, 48}), dion::host_view(g.data(), {32, 48}));
    for (int s = 0; s < kSteps; ++s) {
      const auto gs = grad_of(su.ps[0], s, comm.rank(), W, true);
      std::copy(gs.begin(), gs.end(), g.begin());
      opt.step();
    }
    auto m = opt.read_state("a/momentum"), m0 = m;
    MPI_Bcast(m0.data(), static_cast<int>(m0.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
    CHECK(max_over_ranks(max_abs_diff(m, m0)) > 1e-3);
  }
}

TEST_CASE("checkpoint (MPI): a corrupt, missing, truncated or foreign rank file makes every rank throw; state unchanged",
          "[mpi][checkpoint][corrupt]") {
  const int W = world_size(), me = world_rank();
  SharedDir dir;
  const fs::path c = dir / "c";
  {
    Fsdp a(3);
    ck::save(a.opt, c);
  }
  Fsdp b(1, 50);  // the loader: other state, which must survive every failed load
  const std::string last = ck::rank_file_name(W - 1, W);
  const auto good = read_bytes(c / last);
  const auto manifest = read_bytes(c / "manifest.json");
  auto restore = [&] {
    MPI_Barrier(MPI_COMM_WORLD);
    if (me == 0) {
      write_bytes(c / last, good);
      write_bytes(c / "manifest.json", manifest);
    }
    MPI_Barrier(MPI_COMM_WORLD);
  };
  // (a) a flipped payload bit in the last rank's file: that rank (and any rank that reads the file)
  // sees a checksum mismatch, the others that loading failed on another rank
  MPI_Barrier(MPI_COMM_WORLD);
  if (me == 0) {
    auto m = good;
    m[m.size() - 3] ^= std::byte{0x08};
    write_bytes(c / last, m);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  CHECK(sum_over_ranks(load_fails<dion::CheckpointError>(b.opt, c, "checksum mismatch", "failed on rank")) == W);
  // (b) the file is missing: every rank sees it
  restore();
  if (me == 0) fs::remove(c / last);
  MPI_Barrier(MPI_COMM_WORLD);
  CHECK(sum_over_ranks(load_fails<dion::CheckpointError>(b.opt, c, "which is missing", "")) == W);
  // (c) truncated: every rank reads every file's size against the manifest
  restore();
  if (me == 0) write_bytes(c / last, std::span<const std::byte>(good.data(), good.size() / 2));
  MPI_Barrier(MPI_COMM_WORLD);
  CHECK(sum_over_ranks(load_fails<dion::CheckpointError>(b.opt, c, "truncated", "")) == W);
  // (d) no manifest: an incomplete checkpoint
  restore();
  if (me == 0) fs::remove(c / "manifest.json");
  MPI_Barrier(MPI_COMM_WORLD);
  CHECK(sum_over_ranks(load_fails<dion::CheckpointError>(b.opt, c, "incomplete checkpoint", "")) == W);
  // (e) a rank file of another checkpoint (another step), with the manifest patched to match it:
  // the documents disagree
  restore();
  if (W > 1) {
    const fs::path other = dir / "other";
    {
      Fsdp o(4);
      ck::save(o.opt, other);
    }
    if (me == 0) {
      write_bytes(c / last, read_bytes(other / last));
      const auto fo = ck::read_manifest(other).files.back();
      auto j = nlohmann::json::parse(std::string(reinterpret_cast<const char*>(manifest.data()), manifest.size()));
      j["files"][static_cast<std::size_t>(W - 1)]["bytes"] = fo.bytes;
      j["files"][static_cast<std::size_t>(W - 1)]["crc32c"] = ck::crc_hex(fo.crc32c);
      const std::string text = j.dump(2) + "\n";
      write_bytes(c / "manifest.json", std::as_bytes(std::span<const char>(text.data(), text.size())));
    }
    MPI_Barrier(MPI_COMM_WORLD);
    CHECK(sum_over_ranks(load_fails<dion::CheckpointError>(b.opt, c, "do not belong to the same checkpoint", "")) == W);
    restore();
  }
  // the intact checkpoint loads on every rank, and a single process can load it too
  ck::load(b.opt, c);
  CHECK(sum_over_ranks(b.opt.step_count(0) == 3 ? 0 : 1) == 0);
}

TEST_CASE("checkpoint (MPI): layouts that cannot be resharded are refused on every rank (C12)",
          "[mpi][checkpoint][incompatible]") {
  const int W = world_size();
  SharedDir dir;
  // A tall Dion matrix: row-sharded (FSDP) it is transposed, unsharded (DDP, one process) it is not
  const Setup tall{{{"t", 0, 1, 24, 10}}, {.lr = 0.02f, .rank_fraction = 0.5}};
  const TensorMap init = initial_params(tall);
  const fs::path c = dir / "tall";
  const auto saved = run<dion::Dion>(tall, {W, Lay::fsdp}, init, 0, 2, nullptr, &c).second;
  CHECK(saved.error.empty());
  const auto ddp = run<dion::Dion>(tall, {W, Lay::ddp}, init, 2, 2, &c).first;
  INFO("DDP load: " << ddp.error);
  CHECK(ddp.error.find("orientation mismatch") != std::string::npos);
  if (world_rank() == 0) {
    const auto one = run<dion::Dion>(tall, {0, Lay::single}, init, 2, 2, &c).first;
    INFO("single-process load: " << one.error);
    CHECK(one.error.find("orientation mismatch") != std::string::npos);
  }
  // FSDP at another world size works (same orientation)
  const auto fsdp1 = run<dion::Dion>(tall, {1, Lay::fsdp}, init, 2, 2, &c).first;
  if (fsdp1.ran) CHECK(fsdp1.error.empty());
  if (world_rank() == 0) CHECK(first_difference(fsdp1.state, saved.state).empty());
  // another global shape: CheckpointIncompatible naming it, on every rank
  Setup other = tall;
  other.ps[0].cols = 11;
  const auto wrong = run<dion::Dion>(other, {W, Lay::fsdp}, initial_params(other), 2, 2, &c).first;
  INFO("other shape: " << wrong.error);
  CHECK(wrong.error.find("parameter 't' shape mismatch: checkpoint [24,10], optimizer [24,11]") != std::string::npos);
}

TEST_CASE("checkpoint (MPI): a rank failing during save makes every rank throw; the previous checkpoint stays (C15, C18)",
          "[mpi][checkpoint][io]") {
  const int W = world_size(), me = world_rank();
  SharedDir dir;
  const fs::path c = dir / "c";
  Fsdp a(2);
  ck::save(a.opt, c);
  const auto old_manifest = read_bytes(c / "manifest.json");
  const auto old_last = read_bytes(c / ck::rank_file_name(W - 1, W));
  a.opt.step();
  // the last rank's disk is full after 100 bytes of its rank file
  ck::SaveOptions so;
  if (me == W - 1)
    so.decorate_rank_file = [](dion::safetensors::Sink& s) {
      return std::make_unique<dion::safetensors::FaultInjectionSink>(s, 100, ENOSPC);
    };
  int caught = 0;
  std::string msg;
  try {
    ck::save(a.opt, c, so);
  } catch (const dion::IoError& e) {
    msg = e.what();
    caught = msg.find(me == W - 1 ? "No space left" : "failed on rank " + std::to_string(W - 1)) != std::string::npos;
  }
  INFO("rank " << me << ": " << msg);
  CHECK(sum_over_ranks(caught) == W);
  MPI_Barrier(MPI_COMM_WORLD);
  CHECK(read_bytes(c / "manifest.json") == old_manifest);
  CHECK(read_bytes(c / ck::rank_file_name(W - 1, W)) == old_last);
  std::size_t stray = 0;
  for (const auto& e : fs::directory_iterator(dir.path)) stray += e.path().filename() == "c" ? 0 : 1;
  CHECK(stray == 0);  // rank 0 removed the staging directory
  // a target rank 0 must not replace: every rank throws, rank 0 its own InvalidArgument
  MPI_Barrier(MPI_COMM_WORLD);
  const fs::path foreign = dir / "foreign";
  if (me == 0) {
    fs::create_directories(foreign);
    std::ofstream(foreign / "notes.txt") << "mine";
  }
  MPI_Barrier(MPI_COMM_WORLD);
  caught = 0;
  try {
    ck::save(a.opt, foreign);
  } catch (const dion::InvalidArgument&) {
    caught = me == 0;
  } catch (const dion::IoError& e) {
    caught = me != 0 && std::string(e.what()).find("failed on rank 0") != std::string::npos;
  }
  CHECK(sum_over_ranks(caught) == W);
  // different directories on different ranks: every rank throws InvalidArgument, nothing written
  if (W > 1) {
    caught = 0;
    try {
      ck::save(a.opt, dir / ("per-rank-" + std::to_string(me)));
    } catch (const dion::InvalidArgument& e) {
      caught = std::string(e.what()).find("name different directories") != std::string::npos;
    }
    CHECK(sum_over_ranks(caught) == W);
    CHECK(!fs::exists(dir / ("per-rank-" + std::to_string(me))));
    caught = 0;
    try {
      ck::load(a.opt, me == 0 ? c : dir / "elsewhere");
    } catch (const dion::InvalidArgument& e) {
      caught = std::string(e.what()).find("name different directories") != std::string::npos;
    }
    CHECK(sum_over_ranks(caught) == W);
  }
  // the previous checkpoint still loads, and a new save then succeeds
  Fsdp b(1, 9);
  ck::load(b.opt, c);
  CHECK(sum_over_ranks(b.opt.step_count(0) == 2 ? 0 : 1) == 0);
  ck::save(a.opt, c);
  ck::load(b.opt, c);
  CHECK(sum_over_ranks(b.opt.step_count(0) == 3 ? 0 : 1) == 0);
}

TEST_CASE("checkpoint (MPI): Dion on meshes (FSDP x TP, HSDP, TP, DP x TP) saves and reshards between them",
          "[mpi][checkpoint][dion][tp]") {
  // Each grid saves; one process loads that checkpoint (the global state); every rank's saved pieces
  // are their boxes of it, bitwise; every grid loads it back (pieces = boxes, bitwise) and continues
  // within Dion's tolerance of the uninterrupted single-process run (restarted from its parameters).
  const int W = world_size();
  SharedDir dir;
  const auto ms = mesh_model();
  const dion::Options o{.lr = 0.02f, .rank_fraction = 0.5};
  TensorMap init;
  for (const auto& m : ms) init[m.name] = values(m.name, 7, static_cast<std::size_t>(m.rows * m.cols), 0.5f);
  // the uninterrupted run, on every rank (cheap): parameters after kSteps and kSteps + kMore
  dion::EigenBackend be;
  TensorMap ref_k, ref_end;
  {
    for (int phase = 0; phase < 2; ++phase) {
      dion::Dion<dion::EigenBackend> one{be, o};
      auto g0 = one.add_group();
      auto g1 = one.add_group({.algorithm = Algorithm::adamw, .lr = 0.003f});
      std::map<std::string, std::vector<float>> xs = init, gs;
      for (const auto& m : ms) {
        gs[m.name].assign(static_cast<std::size_t>(m.rows * m.cols), 0.0f);
        const dion::Shape sh = m.vec ? dion::Shape{m.cols} : dion::Shape{m.rows, m.cols};
        (m.vec ? g1 : g0).add(m.name, dion::host_view(xs[m.name].data(), sh), dion::host_view(gs[m.name].data(), sh));
      }
      const int steps = phase == 0 ? kSteps : kSteps + kMore;
      for (int st = 0; st < steps; ++st) {
        for (const auto& m : ms) gs[m.name] = mesh_grad(m, st);
        for (const auto& m : ms) {
          const dion::Shape sh = m.vec ? dion::Shape{m.cols} : dion::Shape{m.rows, m.cols};
          one.set_grad(m.name, dion::host_view(gs[m.name].data(), sh));
        }
        one.step();
      }
      (phase == 0 ? ref_k : ref_end) = xs;
    }
  }
  int k = 0;
  for (const Grid& gs : grids(W)) {
    const fs::path path = dir / ("m" + std::to_string(k++));
    // save on the grid
    const auto saved = run_dion_mesh(ms, o, &gs, init, 0, kSteps, nullptr, &path);
    INFO("saved on " << gs.name << " (" << gs.Wr << "x" << gs.Wo << "x" << gs.Wi << "): " << saved.error);
    CHECK(sum_over_ranks(saved.error.empty() ? 0 : 1) == 0);
    // the global state: one process loads the checkpoint
    TensorMap global;
    if (world_rank() == 0) {
      const auto one = run_dion_mesh(ms, o, nullptr, ref_k, kSteps, kSteps, &path, nullptr);
      INFO("one process loading it: " << one.error);
      CHECK(one.error.empty());
      global = one.state;
    }
    bcast_map(global);
    // the saved pieces are boxes of it (save + one-process load are exact)
    const auto resaved = run_dion_mesh(ms, o, &gs, init, 0, kSteps, nullptr, &path, &global);
    CHECK(sum_over_ranks(resaved.state_mismatches) == 0);
    // every grid loads it: pieces exact; the continuation within Dion's tolerance
    for (const Grid& gl : grids(W)) {
      const auto loaded = run_dion_mesh(ms, o, &gl, ref_k, kSteps, kSteps + kMore, &path, nullptr, &global);
      INFO("loaded on " << gl.name << " (" << gl.Wr << "x" << gl.Wo << "x" << gl.Wi << "): " << loaded.error);
      CHECK(sum_over_ranks(loaded.error.empty() ? 0 : 1) == 0);
      CHECK(sum_over_ranks(loaded.state_mismatches) == 0);
      if (!loaded.error.empty()) continue;
      MeshComms c = make_mesh(gl);
      double num = 0, den = 0;
      for (const auto& m : ms) {
        const Box b = box_of(m, gl, c);
        const auto want = take_box(ref_end.at(m.name), m.cols, b), x0 = take_box(ref_k.at(m.name), m.cols, b);
        const auto& got = loaded.params.at(m.name);
        for (std::size_t e = 0; e < want.size(); ++e) {
          const double d = std::fabs((static_cast<double>(got[e]) - x0[e]) - (static_cast<double>(want[e]) - x0[e]));
          num = std::isnan(d) ? 1e30 : std::max(num, d);
          den = std::max(den, std::fabs(static_cast<double>(want[e]) - x0[e]));
        }
      }
      const double rel = max_over_ranks(num) / max_over_ranks(den);
      INFO("continuation vs the uninterrupted run: relative update difference " << rel);
      CHECK(rel <= 1e-4);
    }
  }
}
