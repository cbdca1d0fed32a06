// Dion on a device mesh (SPEC §2.5, "outer-sharded" and "inner-sharded"): one code path for every
// sharded layout of a Dion matrix —
//   FSDP   B's columns sharded over Mesh::outer_shard,
//   TP     B's rows sharded over Mesh::inner_shard (tensor parallel),
//   2-D    both (FSDP + TP),
// each optionally replicated over Mesh::replicate (HSDP; gradient averaging, or with compressed
// synchronization the averaging of P and R only, SPEC §2.5 steps 1, 4, 6). B = M or Mᵀ (p×q) is
// oriented so that the inner shard dim is B's rows and the outer shard dim is B's columns (SPEC §1.5).
//
// Per chunk of N same-shape matrices, on the rank holding rows [p0, p0+pl) and columns [q0, q0+ql)
// of every B, and columns [r0, r0+rl) of Q's local rows (Q: q×r, rows sharded like B's columns over
// outer, its r columns over inner):
//   1. sync (not compressed): G ← mean over replicate.   M ← M + G.
//   2. Q (ql × rl) all-gathered over inner → (ql × r).
//   3. P = B_loc·Q (pl × r), partial over outer.
//      no inner sharding: reduce-scatter(sum) over outer along the batch, [compressed: average over
//        replicate], each rank orthonormalizes whole matrices, all-gather over outer;
//      inner sharding: all-reduce(sum) over outer, [compressed: average over replicate], distributed
//        orthonormalization over inner: whole matrices by an all-to-all to owners and back (qr, p ≤ r,
//        Cholesky-QR past warmup: exactly the single-process orthonormalizer), else randomized
//        Cholesky-QR: the sketch S (k×p) column-sharded, S·P reduce-scattered, R₁ of one k×r per
//        owner, all-gathered, P ← P·R₁⁻¹, Gram reduce-scattered, Cholesky, all-gathered, P ← P·R₂⁻¹.
//   4. R = B_locᵀ·P (ql × r), partial over inner → all-reduce(sum); [compressed: average].
//   5. guard (all-zero over the whole matrix, agreed over the shards), error feedback on the local
//      block, column norms over the whole R (its rows gathered over outer), fused decay + update of
//      the local block, Q's local block stored.
// The sketch of the randomized path is the single-process sketch (same counter-based stream, its
// columns at their global index), so the result equals one process up to summation order.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "dion/algorithms/collectives.hpp"
#include "dion/algorithms/context.hpp"
#include "dion/algorithms/dion.hpp"
#include "dion/core/concepts.hpp"
#include "dion/core/random.hpp"
#include "dion/ortho/qr.hpp"

namespace dion::detail {

/// Contiguous block j of n items over W ranks: [min(j·c, n), min((j+1)·c, n)), c = ⌈n/W⌉.
inline std::pair<std::int64_t, std::int64_t> even_block(std::int64_t n, int W, int j) {
  const std::int64_t c = W > 0 ? (n + W - 1) / W : n;
  const std::int64_t a = std::min<std::int64_t>(c * j, n);
  return {a, std::min<std::int64_t>(a + c, n)};
}

/// The communicators and shard layouts of one sharded Dion chunk (null / nullptr: that mesh
/// dimension does not shard this chunk; its ranks compute redundantly).
template <class Comm>
struct DionMesh {
  Comm* replicate = nullptr;                 ///< averaging only (gradients, or P and R compressed)
  Comm* outer = nullptr;                     ///< B's columns (Q's rows) sharded over it
  Comm* inner = nullptr;                     ///< B's rows (Q's columns) sharded over it
  const std::int64_t* outer_offs = nullptr;  ///< first column of B on every outer rank, then q
  const std::int64_t* inner_offs = nullptr;  ///< first row of B on every inner rank, then p
  bool grad_sync = false;                    ///< Options::replicate_mesh_grad_sync
};

/// This rank's share of a chunk (see the file comment for the names).
struct DionMeshGeom {
  int Wo = 1, mo = 0, Wi = 1, mi = 0;
  std::int64_t N = 0, p = 0, q = 0, r = 0, k = 0;
  std::int64_t pl = 0, p0 = 0, ql = 0, q0 = 0, rl = 0, r0 = 0;
  std::int64_t per_o = 0, per_i = 0;  // matrices owned per outer / inner rank
  std::vector<std::int64_t> p_of, r_of, r_at, q_of;  // per inner rank: rows, Q columns and their start; per outer rank: B columns
};

template <class Chunk, class Comm>
DionMeshGeom dion_mesh_geom(const Chunk& c, const DionMesh<Comm>& dm, double oversample) {
  DionMeshGeom g;
  g.N = c.count;
  g.p = c.p;
  g.q = c.q;
  g.r = c.r;
  g.k = ortho::rcqr_sketch_rows(c.r, oversample);
  if (dm.outer && dm.outer_offs) {
    g.Wo = dm.outer->size();
    g.mo = dm.outer->rank();
  }
  if (dm.inner && dm.inner_offs) {
    g.Wi = dm.inner->size();
    g.mi = dm.inner->rank();
  }
  g.q_of.resize(static_cast<std::size_t>(g.Wo));
  for (int j = 0; j < g.Wo; ++j)
    g.q_of[static_cast<std::size_t>(j)] = dm.outer_offs && g.Wo > 0 ? dm.outer_offs[j + 1] - dm.outer_offs[j] : g.q;
  g.q0 = dm.outer_offs ? dm.outer_offs[g.mo] : 0;
  g.ql = g.q_of[static_cast<std::size_t>(g.mo)];
  g.p_of.resize(static_cast<std::size_t>(g.Wi));
  g.r_of.resize(static_cast<std::size_t>(g.Wi));
  g.r_at.resize(static_cast<std::size_t>(g.Wi));
  for (int j = 0; j < g.Wi; ++j) {
    g.p_of[static_cast<std::size_t>(j)] = dm.inner_offs ? dm.inner_offs[j + 1] - dm.inner_offs[j] : g.p;
    const auto [a, b] = dm.inner_offs ? even_block(g.r, g.Wi, j) : std::pair<std::int64_t, std::int64_t>{0, g.r};
    g.r_at[static_cast<std::size_t>(j)] = a;
    g.r_of[static_cast<std::size_t>(j)] = b - a;
  }
  g.p0 = dm.inner_offs ? dm.inner_offs[g.mi] : 0;
  g.pl = g.p_of[static_cast<std::size_t>(g.mi)];
  g.r0 = g.r_at[static_cast<std::size_t>(g.mi)];
  g.rl = g.r_of[static_cast<std::size_t>(g.mi)];
  g.per_o = (g.N + g.Wo - 1) / g.Wo;
  g.per_i = (g.N + g.Wi - 1) / g.Wi;
  return g;
}

/// The workspace of a sharded chunk, carved the same way for sizing (base = nullptr) and use.
template <class TM>
struct DionMeshBufs {
  TM *qloc, *qw0, *qit, *pp, *rr, *rfull, *rstage, *uu, *ptmp, *ostage, *oasm;
  float *qr_scratch, *pf, *sk, *sp, *spown, *r1, *gg, *gown;
  int *zero_flags, *info;
  std::int64_t end;
};
template <class TM>
DionMeshBufs<TM> dion_mesh_carve(char* base, const DionMeshGeom& g) {
  Carver cv{base};
  DionMeshBufs<TM> b{};
  const std::int64_t N = g.N, r = g.r, k = g.k;
  const std::int64_t npo = g.per_o * g.Wo, npi = g.per_i * g.Wi, own = std::max(g.per_o, g.per_i);
  b.qloc = cv.take<TM>(N * g.ql * g.rl);
  b.qw0 = cv.take<TM>(N * g.ql * r);
  b.qit = cv.take<TM>(N * g.ql * r);
  b.pp = cv.take<TM>(std::max(npo, N) * g.pl * r);
  b.rr = cv.take<TM>(N * g.ql * r);
  b.rfull = cv.take<TM>(N * g.q * r);
  b.rstage = cv.take<TM>(N * g.q * r);
  b.uu = cv.take<TM>(N * g.pl * g.ql);
  b.oasm = cv.take<TM>(own * g.p * r);
  const bool inner = g.Wi > 1;
  b.ptmp = cv.take<TM>(inner ? N * g.pl * r : 0);
  b.ostage = cv.take<TM>(inner ? g.per_i * g.p * r : 0);
  b.qr_scratch = cv.take<float>(ortho::qr_scratch_floats(g.Wi > 1 ? g.per_i : std::max(g.per_o, N), g.p, r, k));
  b.pf = cv.take<float>(inner ? N * g.pl * r : 0);
  b.sk = cv.take<float>(inner ? N * k * g.pl : 0);
  b.sp = cv.take<float>(inner ? npi * k * r : 0);
  b.spown = cv.take<float>(inner ? g.per_i * k * r : 0);
  b.r1 = cv.take<float>(inner ? npi * r * r : 0);
  b.gg = cv.take<float>(inner ? npi * r * r : 0);
  b.gown = cv.take<float>(inner ? g.per_i * r * r : 0);
  b.zero_flags = cv.take<int>(N);
  b.info = cv.take<int>(npi);
  b.end = cv.off + 256;
  return b;
}
/// Workspace bytes of a sharded chunk on this rank (fp32 upper bound of the momentum dtype).
template <class Chunk, class Comm>
std::int64_t dion_mesh_bytes(const Chunk& c, const DionMesh<Comm>& dm, double oversample) {
  if (c.rows == 0 || c.cols == 0 || c.r == 0) return 4096;
  return dion_mesh_carve<float>(nullptr, dion_mesh_geom(c, dm, oversample)).end + 4096;
}

/// recv ← every rank's block of `mine` elements, rank j's (counts[j] elements) at the prefix sum
/// of counts: an all-gather of uneven blocks (empty ones included). Returns the displacements.
template <class Comm, class T>
std::vector<int> all_gather_uneven(Comm& comm, const T* send, std::int64_t mine, T* recv,
                                   const std::vector<std::int64_t>& counts) {
  const int W = comm.size();
  std::vector<int> sc(static_cast<std::size_t>(W), SliceExchange::as_count(mine)), sd(static_cast<std::size_t>(W), 0),
      rc(static_cast<std::size_t>(W)), rd(static_cast<std::size_t>(W));
  std::int64_t at = 0;
  for (int j = 0; j < W; ++j) {
    rc[static_cast<std::size_t>(j)] = SliceExchange::as_count(counts[static_cast<std::size_t>(j)]);
    rd[static_cast<std::size_t>(j)] = SliceExchange::as_count(at);
    at += counts[static_cast<std::size_t>(j)];
  }
  comm.all_to_all_v(send, sc, sd, recv, rc, rd);
  return rd;
}

template <class Ctx, class Comm>
void dion_mesh_chunk(Ctx& cx, const DionMesh<Comm>& dm) {
  using Be = std::remove_reference_t<decltype(cx.be)>;
  using Space = typename Be::Space;
  auto& be = cx.be;
  const auto& ch = cx.chunk;
  const Options& o = cx.o;
  const std::int64_t m = ch.rows, n = ch.cols, r = ch.r;
  if (m == 0 || n == 0 || r == 0) return;
  const bool tr = ch.transposed;
  const DionMeshGeom g = dion_mesh_geom(ch, dm, o.rcqr_oversample);
  const std::int64_t p = g.p, q = g.q, pl = g.pl, ql = g.ql, rl = g.rl;
  Comm* rep = dm.replicate && dm.replicate->size() > 1 ? dm.replicate : nullptr;
  Comm* outer = g.Wo > 1 ? dm.outer : nullptr;
  Comm* inner = g.Wi > 1 ? dm.inner : nullptr;
  const bool comp = rep && dm.grad_sync && dion_compressed(o.rank_fraction, m, n, r);
  const float lr_scale = static_cast<float>(std::sqrt(static_cast<double>(m) / static_cast<double>(n)));
  const auto& first = cx.params[static_cast<std::size_t>(cx.slots[static_cast<std::size_t>(ch.items[0].slot)].param)];
  const DType mt = const_cast<std::remove_cvref_t<decltype(first)>&>(first).state_view("momentum").dtype;

  dispatch_dtype(mt, [&]<class TM>() {
    const auto bufs = dion_mesh_carve<TM>(cx.workspace, g);
    using MT = Mat<TM, Space>;
    // ---- 1. gradients into the momenta; Q's local blocks packed
    struct Live {
      int param;
      std::int64_t pos;
    };
    std::vector<Live> live;
    live.reserve(ch.items.size());
    std::int64_t cnt = 0;
    for (const auto& it : ch.items) {
      auto& pr = cx.params[static_cast<std::size_t>(cx.slots[static_cast<std::size_t>(it.slot)].param)];
      if (!pr.live) continue;
      if (pl > 0 && ql > 0) {
        auto mv = pr.state_view("momentum");
        dispatch_dtype(pr.param.dtype, [&]<class TG>() {
          if (rep && dm.grad_sync && !comp) average_in_place(*rep, pr.grad.template mat<TG>());
          be.add_into(mv.template mat<TM>(), pr.grad.template mat<TG>());
        });
      }
      if (ql > 0 && rl > 0) {
        auto qv = pr.state_view("Q");
        dispatch_dtype(qv.dtype, [&]<class TQ>() {
          be.copy(qv.template mat<TQ>(), packed<TM, Space>(bufs.qloc + cnt * ql * rl, 1, ql, rl));
        });
      }
      cx.streams[static_cast<std::size_t>(cnt)] = pr.key;  // mixed with the device step count
      live.push_back({static_cast<int>(&pr - cx.params.data()), cnt});
      ++cnt;
    }
    if (cnt == 0) return;
    auto Mloc = [&](const Live& l) {
      return cx.params[static_cast<std::size_t>(l.param)].state_view("momentum").template mat<TM>();
    };
    // ---- 2. Q all-gathered over inner: (ql × rl) blocks → (ql × r)
    auto Q0 = packed<TM, Space>(bufs.qw0, cnt, ql, r);
    if (inner) {
      std::vector<std::int64_t> counts(static_cast<std::size_t>(g.Wi));
      for (int j = 0; j < g.Wi; ++j) counts[static_cast<std::size_t>(j)] = cnt * ql * g.r_of[static_cast<std::size_t>(j)];
      const auto rd = all_gather_uneven(*inner, static_cast<const TM*>(bufs.qloc), cnt * ql * rl, bufs.qit, counts);
      for (int j = 0; j < g.Wi; ++j) {
        const std::int64_t rj = g.r_of[static_cast<std::size_t>(j)];
        if (rj == 0 || ql == 0) continue;
        be.copy(packed<TM, Space>(bufs.qit + rd[static_cast<std::size_t>(j)], cnt, ql, rj),
                Q0.col_block(g.r_at[static_cast<std::size_t>(j)], rj));
      }
    } else if (ql > 0) {
      be.copy(packed<TM, Space>(bufs.qloc, cnt, ql, r), Q0);
    }

    auto P = packed<TM, Space>(bufs.pp, cnt, pl, r);
    auto R = packed<TM, Space>(bufs.rr, cnt, ql, r);
    MT Qw = Q0;
    const bool use_cqr = o.qr_method == QrMethod::cqr && cx.step_calls > o.cqr_warmup_steps;
    // whole matrices on one owner each (the single-process orthonormalizer), over inner
    auto ortho_gathered = [&](TM* in, TM* out, QrMethod method, bool cqr) {
      SliceExchange ex(g.Wi, g.mi, cnt, r, g.p_of);
      ex.template unshard<Comm, Be, TM, Space>(*inner, be, in, bufs.ostage, bufs.oasm);
      const std::int64_t own = ex.owned(g.mi), f = ex.first_owned(g.mi);
      if (own > 0)
        ortho::orthonormalize(be, method, cqr, o.rcqr_oversample, packed<TM, Space>(bufs.oasm, own, p, r),
                              bufs.qr_scratch, ortho::SketchKey{o.seed, cx.streams.data() + f, cx.step_dev});
      ex.template reshard<Comm, Be, TM, Space>(*inner, be, bufs.oasm, bufs.ostage, out);
    };
    for (int it = 0; it < o.power_iters; ++it) {
      // ---- 3. P = B_loc·Q
      for (const auto& l : live) {
        if (pl == 0) continue;
        if (ql > 0) be.gemm(tr ? Op::T : Op::N, Op::N, 1.0f, Mloc(l), Qw.at(l.pos), 0.0f, P.at(l.pos));
        else be.fill(P.at(l.pos), 0.0f);
      }
      if (!inner) {
        // P whole on every rank (pl = p): reduce-scatter over outer along the batch, orthonormalize
        // the owned matrices, all-gather
        std::int64_t lo = 0, hi = cnt;
        const std::int64_t e = p * r;
        if (outer) {
          const std::int64_t per = (cnt + g.Wo - 1) / g.Wo;
          lo = std::min<std::int64_t>(g.mo * per, cnt);
          hi = std::min<std::int64_t>(lo + per, cnt);
          if (per * g.Wo > cnt) be.fill(packed<TM, Space>(bufs.pp + cnt * e, per * g.Wo - cnt, p, r), 0.0f);
          if constexpr (std::is_same_v<TM, float> || comm_reduces_bf16_v<Comm>) {
            outer->reduce_scatter(bufs.pp, bufs.oasm, static_cast<std::size_t>(per * e), ReduceOp::sum);
            be.copy(packed<TM, Space>(bufs.oasm, per, p, r), packed<TM, Space>(bufs.pp + g.mo * per * e, per, p, r));
          } else {
            reduce_in_place(*outer, packed<TM, Space>(bufs.pp, per * g.Wo, p, r), ReduceOp::sum);
          }
          if (comp && hi > lo) average_in_place(*rep, P.slice(lo, hi - lo));
          if (hi > lo)
            ortho::orthonormalize(be, o.qr_method, use_cqr, o.rcqr_oversample, P.slice(lo, hi - lo), bufs.qr_scratch,
                                  ortho::SketchKey{o.seed, cx.streams.data() + lo, cx.step_dev});
          const std::int64_t pad0 = std::max<std::int64_t>(hi, g.mo * per), pad1 = (g.mo + 1) * per;
          if (pad1 > pad0) be.fill(packed<TM, Space>(bufs.pp + pad0 * e, pad1 - pad0, p, r), 0.0f);
          outer->all_gather_inplace(bufs.pp, static_cast<std::size_t>(per * e));
        } else {
          if (comp) average_in_place(*rep, P);
          ortho::orthonormalize(be, o.qr_method, use_cqr, o.rcqr_oversample, P, bufs.qr_scratch,
                                ortho::SketchKey{o.seed, cx.streams.data(), cx.step_dev});
        }
      } else {
        if (outer) reduce_in_place(*outer, P, ReduceOp::sum);
        if (comp) average_in_place(*rep, P);
        if (o.qr_method == QrMethod::qr || p <= r || use_cqr) {
          ortho_gathered(bufs.pp, bufs.pp, o.qr_method, use_cqr);
        } else {
          // randomized Cholesky-QR over the row shards (SPEC §2.5 inner-sharded step 5)
          const std::int64_t k = g.k, per = g.per_i, npi = per * g.Wi, me = g.mi;
          auto Pf = packed<float, Space>(bufs.pf, cnt, pl, r);
          auto S = packed<float, Space>(bufs.sk, cnt, k, pl);
          auto SP = packed<float, Space>(bufs.sp, npi, k, r);
          auto R1 = packed<float, Space>(bufs.r1, npi, r, r);
          auto G = packed<float, Space>(bufs.gg, npi, r, r);
          auto Gown = packed<float, Space>(bufs.gown, per, r, r);
          be.copy(P, Pf);
          const float stddev = 1.0f / std::sqrt(static_cast<float>(k));
          for (std::int64_t b = 0; b < cnt; ++b)
            be.randn(S.at(b), o.seed, cx.streams[static_cast<std::size_t>(b)], 0, g.p0, p, stddev, cx.step_dev);
          if (pl > 0) be.gemm(Op::N, Op::N, 1.0f, S, Pf, 0.0f, SP.slice(0, cnt));
          else be.fill(SP.slice(0, cnt), 0.0f);
          if (npi > cnt) be.fill(SP.slice(cnt, npi - cnt), 0.0f);
          inner->reduce_scatter(bufs.sp, bufs.spown, static_cast<std::size_t>(per * k * r), ReduceOp::sum);
          be.qr_r(packed<float, Space>(bufs.spown, per, k, r), R1.slice(me * per, per));
          inner->all_gather_inplace(bufs.r1, static_cast<std::size_t>(per * r * r));
          if (pl > 0) {
            be.trsm_right_upper(Pf, R1.slice(0, cnt));
            be.gram(Op::T, Pf, G.slice(0, cnt));
          } else {
            be.fill(G.slice(0, cnt), 0.0f);
          }
          if (npi > cnt) be.fill(G.slice(cnt, npi - cnt), 0.0f);
          inner->reduce_scatter(bufs.gg, bufs.gown, static_cast<std::size_t>(per * r * r), ReduceOp::sum);
          be.cholesky_upper(Gown, bufs.info + me * per);
          be.copy(Gown, G.slice(me * per, per));
          inner->all_gather_inplace(bufs.gg, static_cast<std::size_t>(per * r * r));
          if (pl > 0) be.trsm_right_upper(Pf, G.slice(0, cnt));
          bool any_failed = false;
          if constexpr (Be::host_visible) {
            // Last resort, as on one process (RELIABILITY N9): where the Cholesky failed or the
            // result fails the quality check max |PᵀP − I| ≤ cqr_tolerance(p) (a rank-deficient P
            // defeats both Cholesky passes), Householder QR of the whole matrix on its owner. The
            // Gram is summed over the row shards and the flags agreed: every rank takes the same
            // branch.
            inner->all_gather_inplace(bufs.info, static_cast<std::size_t>(per));
            auto G3 = G.slice(0, cnt);
            if (pl > 0) be.gram(Op::T, Pf, G3);
            else be.fill(G3, 0.0f);
            inner->all_reduce(bufs.gg, static_cast<std::size_t>(cnt * r * r), ReduceOp::sum);
            const float tol = ortho::cqr_tolerance(p);
            for (std::int64_t b = 0; b < cnt; ++b)
              for (std::int64_t i = 0; i < r && bufs.info[b] == 0; ++i)
                for (std::int64_t j = 0; j < r; ++j) {
                  const float v = G3(b, i, j) - (i == j ? 1.0f : 0.0f);
                  if (!(std::fabs(v) <= tol)) {  // NaN fails too
                    bufs.info[b] = 1;
                    break;
                  }
                }
            inner->all_reduce(bufs.info, static_cast<std::size_t>(cnt), ReduceOp::max);
            for (std::int64_t b = 0; b < cnt; ++b) any_failed = any_failed || bufs.info[b] != 0;
          }
          if (any_failed) {
            ortho_gathered(bufs.pp, bufs.ptmp, QrMethod::qr, false);
            for (std::int64_t b = 0; b < cnt; ++b) {
              if (bufs.info[b] != 0) be.copy(packed<TM, Space>(bufs.ptmp, cnt, pl, r).at(b), P.at(b));
              else be.copy(Pf.at(b), P.at(b));
            }
          } else {
            be.copy(Pf, P);
          }
        }
      }
      // ---- 4. R = B_locᵀ·P, summed over the row shards
      for (const auto& l : live) {
        if (ql == 0) continue;
        if (pl > 0) be.gemm(tr ? Op::N : Op::T, Op::N, 1.0f, Mloc(l), P.at(l.pos), 0.0f, R.at(l.pos));
        else be.fill(R.at(l.pos), 0.0f);
      }
      if (inner) reduce_in_place(*inner, R, ReduceOp::sum);
      if (comp) average_in_place(*rep, R);
      if (it + 1 < o.power_iters) {
        for (const auto& l : live)
          cx.streams[static_cast<std::size_t>(l.pos)] =
              mix64(cx.streams[static_cast<std::size_t>(l.pos)], 0x9e37ull + static_cast<std::uint64_t>(it));
        Qw = packed<TM, Space>(bufs.qit, cnt, ql, r);
        be.copy(R, Qw);
      }
    }
    // ---- 5. guard over the whole matrix: every block zero (agreed over the shards; compressed,
    // over the replicas too, whose momenta are decoupled)
    for (const auto& l : live) be.all_zero_flags(Mloc(l), bufs.zero_flags + l.pos);  // an empty block: 1
    for (Comm* c : {outer, inner, comp ? rep : nullptr})
      if (c) c->all_reduce(bufs.zero_flags, static_cast<std::size_t>(cnt), ReduceOp::min);
    be.dion_guard(P, R, Q0, bufs.zero_flags);
    be.zero_if_skip(P);  // a skipped step: the error-feedback product adds exact zeros
    be.zero_if_skip(R);
    const float ef = -(1.0f - o.mu);
    if (pl > 0 && ql > 0)
      for (const auto& l : live) {
        if (!tr) be.gemm(Op::N, Op::T, ef, P.at(l.pos), R.at(l.pos), 1.0f, Mloc(l));
        else be.gemm(Op::N, Op::T, ef, R.at(l.pos), P.at(l.pos), 1.0f, Mloc(l));
      }
    // column norms over the whole R: its rows gathered over outer
    MT Qn;  // this rank's rows of the new Q (ql × r), strided in the whole one
    if (outer) {
      std::vector<std::int64_t> counts(static_cast<std::size_t>(g.Wo));
      for (int j = 0; j < g.Wo; ++j) counts[static_cast<std::size_t>(j)] = cnt * g.q_of[static_cast<std::size_t>(j)] * r;
      const auto rd = all_gather_uneven(*outer, static_cast<const TM*>(bufs.rr), cnt * ql * r, bufs.rstage, counts);
      auto Rfull = packed<TM, Space>(bufs.rfull, cnt, q, r);
      std::int64_t at = 0;
      for (int j = 0; j < g.Wo; ++j) {
        const std::int64_t qj = g.q_of[static_cast<std::size_t>(j)];
        if (qj > 0) be.copy(packed<TM, Space>(bufs.rstage + rd[static_cast<std::size_t>(j)], cnt, qj, r), Rfull.row_block(at, qj));
        at += qj;
      }
      auto Qfull = packed<TM, Space>(bufs.rstage, cnt, q, r);
      be.col_normalize(Rfull, o.epsilon, Qfull);
      Qn = Qfull.row_block(g.q0, ql);
    } else {
      Qn = packed<TM, Space>(bufs.rfull, cnt, ql, r);
      be.col_normalize(R, o.epsilon, Qn);
    }
    // fused decay + update of the local block; Q's local block stored
    for (const auto& l : live) {
      auto& pr = cx.params[static_cast<std::size_t>(l.param)];
      if (pl > 0 && ql > 0) {
        auto U = packed<TM, Space>(bufs.uu + l.pos * pl * ql, 1, tr ? ql : pl, tr ? pl : ql);
        if (!tr) be.gemm(Op::N, Op::T, 1.0f, P.at(l.pos), Qn.at(l.pos), 0.0f, U);
        else be.gemm(Op::N, Op::T, 1.0f, Qn.at(l.pos), P.at(l.pos), 0.0f, U);
        dispatch_dtype(pr.param.dtype, [&]<class TX>() {
          be.apply_update(pr.param.template mat<TX>(), U, cx.lr, cx.wd, lr_scale, false);
        });
      }
      if (ql > 0 && rl > 0) {
        auto qv = pr.state_view("Q");
        dispatch_dtype(qv.dtype, [&]<class TQ>() { be.copy(Qn.at(l.pos).col_block(g.r0, rl), qv.template mat<TQ>()); });
      }
    }
  });
}

}  // namespace dion::detail
