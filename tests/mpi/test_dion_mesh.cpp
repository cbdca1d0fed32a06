// Dion on device meshes (SPEC §2.5): tensor parallel (Mesh::inner_shard), 2-D FSDP+TP (outer ×
// inner), HSDP (replicate × outer) and DP × TP (replicate × inner), against the single-process Dion
// on the same global data, under mpiexec with 1-4 ranks. The world is split into a Wr × Wo × Wi grid
// (world rank = (r·Wo + o)·Wi + i); at 4 ranks the 2-D meshes are 2 × 2, at other sizes the grid
// degenerates (a dimension of size 1 still passes its communicator, exercising the same code).
//
// Orientation (SPEC §1.5): a sharded matrix uses B = M when its rows are sharded over inner (or its
// columns over outer), B = Mᵀ otherwise; one process uses B = Mᵀ iff m < n. The parity checks use
// matching orientations: TALL matrices with rows over inner / columns over outer, WIDE matrices with
// columns over inner / rows over outer. The mismatched orientations are a different algorithm
// (measured separately below, not compared).
//
// "Relative difference" is SPEC §2.7's: max |Δx − Δx_ref| / max |Δx_ref| over a whole matrix (Δ:
// the weight change from the start), the maximum over the matrices; MAX-reduced over the ranks
// before any CHECK so that every rank reaches the same verdict.
#include <memory>

#include "mpi/mpi_test_util.hpp"

using namespace dion_mpi_test;

namespace {

using DistDion = dion::Dion<dion::EigenBackend, dion::MpiComm>;
using OneDion = dion::Dion<dion::EigenBackend>;

/// A test matrix: global shape and how it is sharded (0: not; -2 rows, -1 columns) over the outer
/// and inner mesh dimensions; `skew`: rank 0 of the sharded dimension holds nothing and the others
/// split the rest (uneven and empty shards beyond FSDP's chunking).
struct MSpec {
  std::string name;
  std::int64_t rows = 0, cols = 0;
  int outer_dim = 0, inner_dim = 0;
  bool skew = false;
  std::int64_t numel() const { return rows * cols; }
};

struct Grid {
  int Wr = 1, Wo = 1, Wi = 1;
};

/// This rank's place in the grid and its communicators (null where the grid leaves one out).
struct Comms {
  int r = 0, o = 0, i = 0;
  std::unique_ptr<dion::MpiComm> rep, outer, inner;
  dion::Mesh<dion::MpiComm> mesh() const { return {rep.get(), outer.get(), inner.get()}; }
};

std::unique_ptr<dion::MpiComm> split_comm(int color, int key) {
  MPI_Comm c;
  MPI_Comm_split(MPI_COMM_WORLD, color, key, &c);
  auto out = std::make_unique<dion::MpiComm>(c, std::chrono::seconds(30));
  MPI_Comm_free(&c);  // dion keeps its own duplicate
  return out;
}
Comms make_comms(Grid g, bool rep, bool outer, bool inner) {
  Comms c;
  const int w = world_rank();
  c.i = w % g.Wi;
  c.o = (w / g.Wi) % g.Wo;
  c.r = w / (g.Wi * g.Wo);
  // every rank calls MPI_Comm_split for every dimension, in the same order
  auto in = split_comm(c.r * g.Wo + c.o, c.i);
  auto ou = split_comm(c.r * g.Wi + c.i, c.o);
  auto re = split_comm(c.o * g.Wi + c.i, c.r);
  if (rep) c.rep = std::move(re);
  if (outer) c.outer = std::move(ou);
  if (inner) c.inner = std::move(in);
  return c;
}

std::pair<std::int64_t, std::int64_t> split(std::int64_t len, int W, int j, bool skew) {
  if (!skew || W == 1) return fsdp_rows(len, W, j);
  if (j == 0) return {0, 0};
  return fsdp_rows(len, W - 1, j - 1);
}
struct Block {
  std::int64_t ra = 0, rb = 0, ca = 0, cb = 0;
  std::int64_t rows() const { return rb - ra; }
  std::int64_t cols() const { return cb - ca; }
};
Block block_of(const MSpec& s, const Comms& c, Grid g) {
  Block b{0, s.rows, 0, s.cols};
  auto apply = [&](int dim, int W, int j) {
    if (dim == -2) std::tie(b.ra, b.rb) = split(s.rows, W, j, s.skew);
    if (dim == -1) std::tie(b.ca, b.cb) = split(s.cols, W, j, s.skew);
  };
  apply(s.outer_dim, g.Wo, c.o);
  apply(s.inner_dim, g.Wi, c.i);
  return b;
}
std::vector<float> take(const std::vector<float>& full, const MSpec& s, const Block& b) {
  std::vector<float> out;
  out.reserve(static_cast<std::size_t>(b.rows() * b.cols()));
  for (std::int64_t i = b.ra; i < b.rb; ++i)
    for (std::int64_t j = b.ca; j < b.cb; ++j) out.push_back(full[static_cast<std::size_t>(i * s.cols + j)]);
  return out;
}

/// The gradient of replica `replica` at `step`. "zero*" matrices: all zero at steps 1-2 (the guard);
/// "half*": the first half of the long dim zero at every step (a zero block on some shards, no guard).
std::vector<float> grad_full(const MSpec& s, int step, int replica) {
  auto g = values(s.name, 1000u + static_cast<std::uint64_t>(step) * 64u + static_cast<std::uint64_t>(replica + 1),
                  static_cast<std::size_t>(s.numel()));
  if (s.name.rfind("zero", 0) == 0 && step <= 2) std::fill(g.begin(), g.end(), 0.0f);
  if (s.name.rfind("half", 0) == 0) {  // along the long side, so that the rank stays >= r
    for (std::int64_t i = 0; i < s.rows; ++i)
      for (std::int64_t j = 0; j < s.cols; ++j)
        if (s.rows >= s.cols ? i < s.rows / 2 : j < s.cols / 2) g[static_cast<std::size_t>(i * s.cols + j)] = 0.0f;
  }
  return g;
}
std::vector<float> mean_grad_full(const MSpec& s, int step, int Wr) {
  if (Wr == 1) return grad_full(s, step, 0);
  std::vector<double> acc(static_cast<std::size_t>(s.numel()), 0.0);
  for (int r = 0; r < Wr; ++r) {
    const auto g = grad_full(s, step, r);
    for (std::size_t k = 0; k < acc.size(); ++k) acc[k] += g[k];
  }
  std::vector<float> out(acc.size());
  for (std::size_t k = 0; k < acc.size(); ++k) out[k] = static_cast<float>(acc[k] / Wr);
  return out;
}
constexpr int kSteps = 3;
bool dropped(std::size_t param, int step) { return param == 1 && step == 2; }  // no gradient anywhere

/// The single-process reference on the full matrices (mean gradient over the replicas).
template <class Opt = OneDion>
std::vector<std::vector<float>> run_reference(const std::vector<MSpec>& specs, const dion::Options& o, int Wr,
                                              std::vector<std::vector<float>>* momenta = nullptr) {
  dion::EigenBackend be;
  Opt opt{be, o};
  auto grp = opt.add_group();
  std::vector<std::vector<float>> x(specs.size()), g(specs.size());
  for (std::size_t k = 0; k < specs.size(); ++k) {
    x[k] = values(specs[k].name, 7, static_cast<std::size_t>(specs[k].numel()));
    g[k].assign(x[k].size(), 0.0f);
    grp.add(specs[k].name, dion::host_view(x[k].data(), {specs[k].rows, specs[k].cols}),
            dion::host_view(g[k].data(), {specs[k].rows, specs[k].cols}));
  }
  for (int s = 1; s <= kSteps; ++s) {
    for (std::size_t k = 0; k < specs.size(); ++k) {
      g[k] = mean_grad_full(specs[k], s, Wr);
      if (dropped(k, s)) opt.clear_grad(specs[k].name);
      else opt.set_grad(specs[k].name, dion::host_view(g[k].data(), {specs[k].rows, specs[k].cols}));
    }
    opt.step();
  }
  if (momenta) {
    momenta->clear();
    for (const auto& p : specs) momenta->push_back(opt.read_state(p.name + "/momentum"));
  }
  return x;
}

dion::ShardSpec spec_for(int dim, const MSpec& s, const Block& b) {
  if (dim == 0) return {};
  if (dim == -2) return {.dim = -2, .global_length = s.rows, .offset = b.ra, .local_length = b.rows()};
  return {.dim = -1, .global_length = s.cols, .offset = b.ca, .local_length = b.cols()};
}

/// The distributed run: this rank's blocks after kSteps (momenta after synchronize_for_checkpoint
/// when asked).
template <class Opt = DistDion>
std::vector<std::vector<float>> run_mesh(const std::vector<MSpec>& specs, const dion::Options& o, Grid g,
                                         const Comms& c, std::vector<std::vector<float>>* momenta = nullptr) {
  dion::EigenBackend be;
  Opt opt{be, c.mesh(), o};
  auto grp = opt.add_group();
  std::vector<std::vector<float>> x(specs.size()), gr(specs.size());
  std::vector<Block> blocks(specs.size());
  for (std::size_t k = 0; k < specs.size(); ++k) {
    const auto& s = specs[k];
    blocks[k] = block_of(s, c, g);
    x[k] = take(values(s.name, 7, static_cast<std::size_t>(s.numel())), s, blocks[k]);
    gr[k].assign(x[k].size(), 0.0f);
    const dion::Shape sh{blocks[k].rows(), blocks[k].cols()};
    grp.add(s.name, dion::host_view(x[k].data(), sh), dion::host_view(gr[k].data(), sh),
            spec_for(s.outer_dim, s, blocks[k]), spec_for(s.inner_dim, s, blocks[k]));
  }
  for (int st = 1; st <= kSteps; ++st) {
    for (std::size_t k = 0; k < specs.size(); ++k) {
      gr[k] = take(grad_full(specs[k], st, c.r), specs[k], blocks[k]);
      if (dropped(k, st)) opt.clear_grad(specs[k].name);
      else opt.set_grad(specs[k].name, dion::host_view(gr[k].data(), {blocks[k].rows(), blocks[k].cols()}));
    }
    opt.step();
  }
  if (momenta) {
    opt.synchronize_for_checkpoint();
    momenta->clear();
    for (const auto& p : specs) momenta->push_back(opt.read_state(p.name + "/momentum"));
  }
  return x;
}

inline double sum_over_ranks_d(double v) {
  double out = v;
  MPI_Allreduce(&v, &out, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  return out;
}
/// Per matrix, over the whole matrix (reduced over every rank): the relative error of the weight
/// change ‖Δgot − Δref‖_F / ‖Δref‖_F (SPEC §2.7's measure) and the stricter element-wise
/// max |Δgot − Δref| / max |Δref|. (A block held by several ranks is counted by each, equally in
/// numerator and denominator.)
struct Diff {
  double frob = 0, maxabs = 0;
};
std::vector<Diff> rel_diffs(const std::vector<MSpec>& specs, const std::vector<std::vector<float>>& got,
                            const std::vector<std::vector<float>>& ref, const Comms& c, Grid g) {
  std::vector<Diff> out;
  for (std::size_t k = 0; k < specs.size(); ++k) {
    const auto b = block_of(specs[k], c, g);
    const auto want = take(ref[k], specs[k], b);
    const auto x0 = take(values(specs[k].name, 7, static_cast<std::size_t>(specs[k].numel())), specs[k], b);
    double num = 0, den = 0, n2 = 0, d2 = 0;
    for (std::size_t e = 0; e < want.size(); ++e) {
      const double da = static_cast<double>(got[k][e]) - x0[e], db = static_cast<double>(want[e]) - x0[e];
      const double d = std::fabs(da - db);
      num = std::isnan(d) ? 1e30 : std::max(num, d);
      den = std::max(den, std::fabs(db));
      n2 += std::isnan(d) ? 1e30 : d * d;
      d2 += db * db;
    }
    num = max_over_ranks(num);
    den = max_over_ranks(den);
    n2 = sum_over_ranks_d(n2);
    d2 = sum_over_ranks_d(d2);
    out.push_back({d2 > 0 ? std::sqrt(n2 / d2) : std::sqrt(n2), den > 0 ? num / den : num});
  }
  return out;
}
/// The worst matrix of rel_diffs, with every matrix's values in the log.
Diff parity(const char* what, const std::vector<MSpec>& specs, const dion::Options& o, Grid g, const Comms& c,
            const std::vector<std::vector<float>>& got, const std::vector<std::vector<float>>& ref) {
  const auto d = rel_diffs(specs, got, ref, c, g);
  Diff worst;
  std::string per;
  for (std::size_t k = 0; k < specs.size(); ++k) {
    worst.frob = std::max(worst.frob, d[k].frob);
    worst.maxabs = std::max(worst.maxabs, d[k].maxabs);
    per += dion::detail::concat(' ', specs[k].name, '=', d[k].frob, '/', d[k].maxabs);
  }
  if (world_rank() == 0)
    std::printf("[dion mesh] %s, grid %dx%dx%d (replicate x outer x inner), rank_fraction %g: max rel frob %.3g, "
                "max rel elementwise %.3g; per matrix frob/elementwise:%s\n",
                what, g.Wr, g.Wo, g.Wi, o.rank_fraction, worst.frob, worst.maxabs, per.c_str());
  return worst;
}

/// The 2-D grid of a 4-rank world (2 × 2); smaller worlds put every rank on `first`.
std::pair<int, int> grid2(int W, bool first) {
  if (W == 4) return {2, 2};
  return first ? std::pair<int, int>{W, 1} : std::pair<int, int>{1, W};
}

/// How many ranks threw E from f (a collective: every rank calls it).
template <class E, class F>
int count_throws(F&& f) {
  int c = 0;
  try {
    f();
  } catch (const E&) {
    ++c;
  }
  return sum_over_ranks(c);
}

// SPEC §2.7: a sharded Dion differs from one process only in the summation order of P, R and the
// sketch products (partial sums over shards, then a reduction): fp32 noise that the orthonormalization
// carries into the update. Frobenius (SPEC's measure) within 1e-5; element-wise, the worst entry of
// these small matrices within 1e-4 (as tests/mpi/test_distributed.cpp bounds Dion DDP/FSDP).
constexpr double kTolFrob = 1e-5, kTolMax = 1e-4;
void check_diff(const Diff& d) {
  CHECK(d.frob <= kTolFrob);
  CHECK(d.maxabs <= kTolMax);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
TEST_CASE("dion mesh: tensor parallel (inner_shard) matches one process", "[mpi][dion][tp]") {
  const int W = world_size();
  const Grid g{1, 1, W};
  const Comms c = make_comms(g, false, false, true);
  // tall: rows over inner (B = M, as one process); wide: columns over inner (B = Mᵀ, as one process).
  // 3x2 and 1x16 leave ranks with empty shards; "skew" gives rank 0 nothing; 12x12 at full rank is
  // the p <= r case (whole matrices to owners); t2 has no gradient at step 2 on any rank.
  const std::vector<MSpec> specs = {
      {"t1", 40, 12, 0, -2},       {"t2", 40, 12, 0, -2},       {"t3", 33, 10, 0, -2, true},
      {"t4", 3, 2, 0, -2},         {"sq", 12, 12, 0, -2},       {"w1", 12, 40, 0, -1},
      {"w2", 9, 31, 0, -1, true},  {"w3", 1, 16, 0, -1},        {"zero_t", 24, 8, 0, -2},
      {"half_w", 10, 24, 0, -1}};
  for (double rf : {1.0, 0.5}) {
    const dion::Options o{.lr = 0.02f, .rank_fraction = rf};
    const auto ref = run_reference(specs, o, 1);
    const auto got = run_mesh(specs, o, g, c);
    const Diff d = parity("TP", specs, o, g, c, got, ref);
    INFO("TP over " << W << " ranks, rank_fraction " << rf << ": relative update difference (frob / elementwise) " << d.frob << " / " << d.maxabs);
    check_diff(d);
  }
  // two power iterations (the second starts from R, the guard still falls back to the stored Q)
  {
    const dion::Options o{.lr = 0.02f, .rank_fraction = 0.5, .power_iters = 2};
    const auto ref = run_reference(specs, o, 1);
    const auto got = run_mesh(specs, o, g, c);
    const Diff d = parity("TP power_iters 2", specs, o, g, c, got, ref);
    INFO("TP power_iters 2: relative update difference (frob / elementwise) " << d.frob << " / " << d.maxabs);
    check_diff(d);
  }
  // the other orthonormalizers take the whole-matrix path on the owner: same arithmetic as one process
  for (auto qm : {dion::QrMethod::qr, dion::QrMethod::cqr}) {
    const dion::Options o{.lr = 0.02f, .rank_fraction = 0.5, .qr_method = qm, .cqr_warmup_steps = 0};
    const auto ref = run_reference(specs, o, 1);
    const auto got = run_mesh(specs, o, g, c);
    const Diff d = parity(qm == dion::QrMethod::qr ? "TP qr" : "TP cqr", specs, o, g, c, got, ref);
    INFO("TP qr_method " << static_cast<int>(qm) << ": relative update difference (frob / elementwise) " << d.frob << " / " << d.maxabs);
    check_diff(d);
  }
}

TEST_CASE("dion mesh: 2-D FSDP x TP (outer x inner) matches one process", "[mpi][dion][tp][fsdp]") {
  const int W = world_size();
  const auto [Wo, Wi] = grid2(W, false);
  const Grid g{1, Wo, Wi};
  const Comms c = make_comms(g, false, true, true);
  // tall: rows over inner, columns over outer (B = M); wide: columns over inner, rows over outer
  // (B = Mᵀ); plus matrices sharded over one dimension only (redundant over the other) and one not
  // sharded at all (redundant everywhere).
  const std::vector<MSpec> specs = {
      {"t1", 40, 12, -1, -2},      {"t2", 40, 12, -1, -2},  {"t3", 29, 7, -1, -2, true}, {"w1", 12, 40, -2, -1},
      {"w2", 5, 27, -2, -1, true}, {"fo", 10, 30, -2, 0},   {"ti", 30, 10, 0, -2},       {"un", 16, 6, 0, 0},
      {"zero_w", 8, 24, -2, -1},   {"half_t", 24, 10, -1, -2}};
  for (double rf : {1.0, 0.5}) {
    const dion::Options o{.lr = 0.02f, .rank_fraction = rf};
    const auto ref = run_reference(specs, o, 1);
    const auto got = run_mesh(specs, o, g, c);
    const Diff d = parity("FSDPxTP", specs, o, g, c, got, ref);
    INFO("outer x inner " << Wo << "x" << Wi << ", rank_fraction " << rf << ": relative update difference (frob / elementwise) " << d.frob << " / " << d.maxabs);
    check_diff(d);
  }
}

TEST_CASE("dion mesh: HSDP (replicate x outer) and DP x TP match one process on the mean gradient",
          "[mpi][dion][hsdp]") {
  const int W = world_size();
  const auto [Wr, Wx] = grid2(W, true);
  // each replica its own gradients; the reference takes their mean. rank_fraction 1: the gradients
  // are averaged (synchronous momenta); 0.5: compressed, P and R averaged (momenta decoupled,
  // synchronize_for_checkpoint makes their mean, SPEC §2.6)
  const std::vector<MSpec> hsdp = {{"w1", 12, 40, -2, 0}, {"w2", 12, 40, -2, 0},    {"w3", 5, 27, -2, 0, true},
                                   {"t1", 40, 12, -1, 0}, {"un", 10, 30, 0, 0},     {"zero_w", 8, 24, -2, 0},
                                   {"half_t", 24, 10, -1, 0}};
  const std::vector<MSpec> dptp = {{"t1", 40, 12, 0, -2}, {"t2", 40, 12, 0, -2}, {"w1", 12, 40, 0, -1},
                                   {"w2", 5, 27, 0, -1, true}, {"un", 16, 6, 0, 0}};
  for (bool tp : {false, true}) {
    const Grid g = tp ? Grid{Wr, 1, Wx} : Grid{Wr, Wx, 1};
    const Comms c = make_comms(g, true, !tp, tp);
    const auto& specs = tp ? dptp : hsdp;
    for (double rf : {1.0, 0.5}) {
      const dion::Options o{.lr = 0.02f, .rank_fraction = rf};
      std::vector<std::vector<float>> mref, mgot;
      const auto ref = run_reference(specs, o, g.Wr, &mref);
      const auto got = run_mesh(specs, o, g, c, &mgot);
      const Diff d = parity(tp ? "DPxTP" : "HSDP", specs, o, g, c, got, ref);
      INFO((tp ? "DP x TP " : "HSDP ") << g.Wr << "x" << Wx << ", rank_fraction " << rf
                                        << ": relative update difference (frob / elementwise) " << d.frob << " / " << d.maxabs);
      check_diff(d);
      // the replicas hold bit-identical weights
      double spread = 0;
      for (std::size_t k = 0; k < specs.size(); ++k) {
        auto x0 = got[k];
        if (!x0.empty()) MPI_Bcast(x0.data(), static_cast<int>(x0.size()), MPI_FLOAT, 0, c.rep->native());
        spread = std::max(spread, max_abs_diff(got[k], x0));
      }
      spread = max_over_ranks(spread);
      INFO("weights differ between replicas by " << spread);
      CHECK(spread == 0.0);
      // after synchronize_for_checkpoint the momenta are the single process's (to fp32 noise)
      double dm = 0, mm = 0;
      for (std::size_t k = 0; k < specs.size(); ++k) {
        const auto want = take(mref[k], specs[k], block_of(specs[k], c, g));
        dm = std::max(dm, max_abs_diff(mgot[k], want));
        for (float v : want) mm = std::max(mm, static_cast<double>(std::fabs(v)));
      }
      dm = max_over_ranks(dm) / std::max(max_over_ranks(mm), 1e-30);
      if (world_rank() == 0)
        std::printf("[dion mesh] %s rank_fraction %g: synchronized momentum vs one process, relative %.3g\n",
                    tp ? "DPxTP" : "HSDP", rf, dm);
      INFO("synchronized momentum vs one process: relative " << dm);
      CHECK(dm <= 1e-5);
    }
  }
}

TEST_CASE("dion mesh: bf16 states on FSDP x TP stay close to one process", "[mpi][dion][tp][bf16]") {
  // bf16 momentum and Q: the shards' partial products are rounded to bf16 before they are summed
  // (one process rounds the whole sum once), so the difference is bf16 noise (2^-8 = 3.9e-3 per
  // rounding), carried through the orthonormalization: a smoke test of the bf16 exchange paths
  // (MPI reduces bf16 in fp32), bounded at 5e-2 (Frobenius).
  const int W = world_size();
  const auto [Wo, Wi] = grid2(W, false);
  const Grid g{1, Wo, Wi};
  const Comms c = make_comms(g, false, true, true);
  const std::vector<MSpec> specs = {{"t1", 40, 12, -1, -2}, {"t2", 40, 12, -1, -2}, {"w1", 12, 40, -2, -1},
                                    {"fo", 10, 30, -2, 0}};
  using P = dion::precision::Bf16States;
  const dion::Options o{.lr = 0.02f, .rank_fraction = 0.5};
  const auto ref = run_reference<dion::Dion<dion::EigenBackend, dion::SingleProcess, P>>(specs, o, 1);
  const auto got = run_mesh<dion::Dion<dion::EigenBackend, dion::MpiComm, P>>(specs, o, g, c);
  const Diff d = parity("FSDPxTP bf16 states", specs, o, g, c, got, ref);
  INFO("bf16 states: relative update difference (frob / elementwise) " << d.frob << " / " << d.maxabs);
  CHECK(d.frob <= 5e-2);
}

TEST_CASE("dion mesh: mismatched orientation is a different algorithm (measured, not compared)",
          "[mpi][dion][tp]") {
  const int W = world_size();
  const Grid g{1, 1, W};
  const Comms c = make_comms(g, false, false, true);
  // tall with columns over inner (B = Mᵀ; one process uses B = M), wide with rows over inner
  const std::vector<MSpec> specs = {{"t1", 40, 12, 0, -1}, {"w1", 12, 40, 0, -2}};
  const dion::Options o{.lr = 0.02f, .rank_fraction = 0.5};
  const auto ref = run_reference(specs, o, 1);
  const auto got = run_mesh(specs, o, g, c);
  const Diff d = parity("TP, mismatched orientation", specs, o, g, c, got, ref);
  INFO("mismatched orientation: relative update difference " << d.frob << " / " << d.maxabs);
  CHECK(std::isfinite(d.maxabs));
  CHECK(d.maxabs < 10.0);  // same kind of update (orthonormal factor, same lr scale), not the same one
}

// ---------------------------------------------------------------------------------------------------
// Misconfigurations: a typed error on every rank, nothing registered, and every rank can go on.
TEST_CASE("dion mesh: misconfigured meshes and shards throw typed errors on every rank", "[mpi][dion][errors]") {
  const int W = world_size(), me = world_rank();
  dion::EigenBackend be;
  dion::MpiComm world{MPI_COMM_WORLD, std::chrono::seconds(30)};
  dion::MpiComm world2{MPI_COMM_WORLD, std::chrono::seconds(30)};
  // one communicator for two dimensions
  CHECK(count_throws<dion::InvalidArgument>([&] { DistDion opt{be, {.outer_shard = &world, .inner_shard = &world}, {}}; }) == W);
  // two duplicates of the world as outer and inner: not a product mesh (only with 2+ ranks)
  if (W > 1)
    CHECK(count_throws<dion::InvalidArgument>([&] { DistDion opt{be, {.outer_shard = &world, .inner_shard = &world2}, {}}; }) == W);
  const std::int64_t rows = 2 * W;
  std::vector<float> x(2 * 6, 1.0f), gx(2 * 6, 0.1f);
  {
    // an inner ShardSpec without Mesh::inner_shard
    DistDion opt{be, {.outer_shard = &world}, {}};
    auto grp = opt.add_group();
    CHECK(count_throws<dion::InvalidArgument>([&] {
            grp.add("w", dion::host_view(x.data(), {2, 6}), dion::host_view(gx.data(), {2, 6}), {},
                    {.dim = -2, .global_length = rows, .offset = 2 * me, .local_length = 2});
          }) == W);
    CHECK(opt.num_params() == 0u);
  }
  {
    DistDion opt{be, {.inner_shard = &world}, {}};
    auto grp = opt.add_group();
    if (W > 1) {
      // inner shards in reverse rank order: not a contiguous tiling
      CHECK(count_throws<dion::InvalidArgument>([&] {
              grp.add("w", dion::host_view(x.data(), {2, 6}), dion::host_view(gx.data(), {2, 6}), {},
                      {.dim = -2, .global_length = rows, .offset = 2 * (W - 1 - me), .local_length = 2});
            }) == W);
      // a wrong local length on the last rank: ShapeMismatch there, ConfigMismatch elsewhere
      int shape = 0, mismatch = 0;
      try {
        grp.add("w", dion::host_view(x.data(), {2, 6}), dion::host_view(gx.data(), {2, 6}), {},
                {.dim = -2, .global_length = rows, .offset = 2 * me, .local_length = me == W - 1 ? 1 : 2});
      } catch (const dion::ShapeMismatch&) {
        ++shape;
      } catch (const dion::ConfigMismatch&) {
        ++mismatch;
      }
      CHECK(sum_over_ranks(shape) == 1);
      CHECK(sum_over_ranks(mismatch) == W - 1);
    }
    CHECK(opt.num_params() == 0u);
    // every rank goes on: a good registration and step complete (no rank hangs)
    grp.add("w", dion::host_view(x.data(), {2, 6}), dion::host_view(gx.data(), {2, 6}), {},
            {.dim = -2, .global_length = rows, .offset = 2 * me, .local_length = 2});
    opt.step();
    CHECK(sum_over_ranks(x[0] != 1.0f ? 1 : 0) == W);
  }
  if (W == 4) {
    // 2 x 2: each outer group tiles the columns, but the two inner groups cut them differently
    const Grid g{1, 2, 2};
    const Comms c = make_comms(g, false, true, true);
    DistDion opt{be, c.mesh(), {}};
    const std::int64_t c0 = c.i == 0 ? 3 : 2, ca = c.o == 0 ? 0 : c0, cb = c.o == 0 ? c0 : 6;
    std::vector<float> y(static_cast<std::size_t>(2 * (cb - ca)), 1.0f), gy(y.size(), 0.1f);
    CHECK(count_throws<dion::ConfigMismatch>([&] {
            opt.add_group().add("w", dion::host_view(y.data(), {2, cb - ca}), dion::host_view(gy.data(), {2, cb - ca}),
                                {.dim = -1, .global_length = 6, .offset = ca, .local_length = cb - ca},
                                {.dim = -2, .global_length = 4, .offset = 2 * c.i, .local_length = 2});
          }) == W);
    CHECK(opt.num_params() == 0u);
  }
}
