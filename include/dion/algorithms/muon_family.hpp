// Muon (SPEC §1.1), NorMuon (§1.2), Dion2 (§1.3) and NorDion2 = Dion3 (§1.4): one chunk of same-shape
// matrices. Pre-orthogonalization writes each matrix's input into one packed batch in the
// orthogonalization type; the batch is orthogonalized in one call; the update is applied per matrix.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "dion/algorithms/collectives.hpp"
#include "dion/algorithms/context.hpp"
#include "dion/core/concepts.hpp"
#include "dion/ortho/newton_schulz.hpp"

namespace dion::detail {

/// Workspace layout of a distributed chunk (computed with base == nullptr to size the workspace at
/// registration; the same function carves it at step time).
template <class OrthoT>
struct MuonDistBufs {
  OrthoT* u = nullptr;        // DDP: the padded batch of inputs/outputs; sharded: local inputs/outputs
  OrthoT* stage = nullptr;    // sharded: all-to-all receive / send staging
  OrthoT* asm_ = nullptr;     // sharded: the owner's assembled matrices
  OrthoT* scratch = nullptr;  // orthogonalization scratch
  float* norms = nullptr;
  std::int64_t* idx = nullptr;  // Dion2 / NorDion2: selected slices (local)
  // sharded global selection scope
  float* m_loc = nullptr;       // local momentum shards in fp32 (ranking in fp32, SPEC deliberate difference 5)
  float* m_stage = nullptr;
  float* m_asm = nullptr;
  std::int64_t* gidx = nullptr;   // the owner's global selections
  std::int64_t* ix_send = nullptr;  // (count, local indices) per matrix per rank
  std::int64_t* ix_recv = nullptr;
  OrthoT* u_sel = nullptr;      // the selected slices a rank is sent back (compact, zero-padded)
  std::int64_t end = 0;
};

template <class OrthoT, class Chunk>
MuonDistBufs<OrthoT> muon_dist_carve(char* base, const Chunk& ch, int W, const std::int64_t* offs) {
  MuonDistBufs<OrthoT> b;
  std::int64_t off = 0;
  auto take = [&]<class T>(T*& ptr, std::int64_t n) {
    off = (off + 255) / 256 * 256;
    ptr = base ? reinterpret_cast<T*>(base + off) : nullptr;
    off += std::max<std::int64_t>(n, 1) * static_cast<std::int64_t>(sizeof(T));
  };
  const bool selective = ch.algorithm == Algorithm::dion2 || ch.algorithm == Algorithm::nordion2;
  const std::int64_t N = ch.count, per = (N + W - 1) / W, np = per * W;
  if (!offs) {
    const std::int64_t ur = selective && ch.sel_rows ? ch.k : ch.rows;
    const std::int64_t uc = selective && !ch.sel_rows ? ch.k : ch.cols;
    take(b.u, np * ur * uc);
    take(b.scratch, ortho::scratch_elems(N, ur, uc));
    take(b.norms, N);
    if (selective) take(b.idx, N * ch.k);
  } else {
    // S slices along the sharded dim (rows, or columns when ch.shard_dim == -1), each of O elements
    const bool by_rows = ch.shard_dim != -1;
    const std::int64_t S = by_rows ? ch.rows : ch.cols, O = by_rows ? ch.cols : ch.rows;
    std::int64_t lmax = 0;
    for (int i = 0; i < W; ++i) lmax = std::max(lmax, offs[i + 1] - offs[i]);
    const std::int64_t cmax = selective && !ch.global_scope ? std::min(ch.k, lmax) : lmax;
    const std::int64_t R = selective && ch.global_scope ? ch.k : std::min<std::int64_t>(S, cmax * W);
    take(b.u, N * cmax * O);
    take(b.stage, std::max(per * R * O, N * cmax * O));
    take(b.asm_, per * R * O);
    take(b.scratch, ortho::scratch_elems(per, R, O));
    take(b.norms, per);
    if (selective) take(b.idx, N * std::max<std::int64_t>(cmax, 1));
    if (selective && ch.global_scope) {
      take(b.m_loc, N * lmax * O);
      take(b.m_stage, per * S * O);
      take(b.m_asm, per * S * O);
      take(b.gidx, per * ch.k);
      take(b.ix_send, per * (S + W));
      take(b.ix_recv, N * (lmax + 1));
      take(b.u_sel, std::max(N * lmax * O, per * S * O));
    }
  }
  b.end = off;
  return b;
}

template <class OrthoT, class Ctx>
void muon_family_sharded(Ctx& cx);

template <class OrthoT, class Ctx>
void muon_family_chunk(Ctx& cx) {
  using Space = typename std::remove_reference_t<decltype(cx.be)>::Space;
  using Comm = typename Ctx::comm_type;
  if constexpr (is_distributed_v<Comm>) {
    if constexpr (Comm::distributed) {
      if (cx.comm && cx.offs) return muon_family_sharded<OrthoT>(cx);
    }
  }
  const auto& ch = cx.chunk;
  const Options& o = cx.o;
  const Algorithm alg = ch.algorithm;
  const bool selective = alg == Algorithm::dion2 || alg == Algorithm::nordion2;
  const std::int64_t ur = selective && ch.sel_rows ? ch.k : ch.rows;
  const std::int64_t uc = selective && !ch.sel_rows ? ch.k : ch.cols;
  if (ur == 0 || uc == 0) return;

  Carver cv{cx.workspace};
  OrthoT* u_data = nullptr;
  OrthoT* scratch = nullptr;
  float* norms = nullptr;
  std::int64_t* idx = nullptr;
  int W = 1, me = 0;
  if constexpr (is_distributed_v<Comm>) {
    if (cx.comm) {  // data parallel (SPEC §0.3 case B): the same inputs everywhere, the work split
      W = cx.comm->size();
      me = cx.comm->rank();
      auto b = muon_dist_carve<OrthoT>(cx.workspace, ch, W, nullptr);
      u_data = b.u;
      scratch = b.scratch;
      norms = b.norms;
      idx = b.idx;
    }
  }
  if (!u_data) {
    u_data = cv.take<OrthoT>(ch.count * ur * uc);
    scratch = cv.take<OrthoT>(ortho::scratch_elems(ch.count, ur, uc));
    norms = cv.take<float>(ch.count);
    idx = selective ? cv.take<std::int64_t>(ch.count * ch.k) : nullptr;
  }

  struct Done {
    int slot;
    std::int64_t b0, nb, pos;
  };
  std::vector<Done> done;  // small: one entry per chunk item
  done.reserve(ch.items.size());
  std::int64_t pos = 0;
  for (const auto& it : ch.items) {
    const Slot& sl = cx.slots[static_cast<std::size_t>(it.slot)];
    if (!cx.params[static_cast<std::size_t>(sl.param)].live) continue;
    done.push_back({it.slot, it.b0, it.nb, pos});
    pos += it.nb;
  }
  if (pos == 0) return;
  // Pre-orthogonalization, one pass per kind of op over all matrices of the chunk (a batching
  // backend merges each pass into a few launches): Muon / NorMuon momentum; Dion2 / NorDion2
  // momentum += G, then per matrix the top-k selection, then the gather with decay.
  auto each = [&](auto&& f) {
    for (const auto& d : done) {
      const Slot& sl = cx.slots[static_cast<std::size_t>(d.slot)];
      auto& p = cx.params[static_cast<std::size_t>(sl.param)];
      const auto mview = p.state_view("momentum");
      dispatch_dtype(p.param.dtype, [&]<class TG>() {
        dispatch_dtype(mview.dtype, [&]<class TM>() {
          f(d, geometry_mat<TG>(p.grad, sl.geo).slice(d.b0, d.nb), geometry_mat<TM>(mview, sl.geo).slice(d.b0, d.nb),
            packed<OrthoT, Space>(u_data + d.pos * ur * uc, d.nb, ur, uc));
        });
      });
    }
  };
  if (!selective) {
    BatchScope batch(cx.be);
    each([&](const Done&, auto G, auto M, auto U) { cx.be.muon_momentum(G, M, U, o.mu, o.nesterov); });
    batch.finish();
  } else {
    const float decay = alg == Algorithm::dion2 ? o.ef_decay : o.mu;
    BatchScope adds(cx.be);
    each([&](const Done&, auto G, auto M, auto) { cx.be.add_into(M, G); });
    adds.finish();
    each([&](const Done& d, auto, auto M, auto) { cx.be.select_topk(M, ch.sel_rows, ch.k, idx + d.pos * ch.k); });
    BatchScope gathers(cx.be);
    each([&](const Done& d, auto, auto M, auto U) {
      cx.be.gather_slices(M, idx + d.pos * ch.k, ch.k, ch.sel_rows, decay, U);
    });
    gathers.finish();
  }
  if (W == 1 || pos == 1) {
    // single process, or one matrix (SPEC §0.3 case C: every rank orthogonalizes it redundantly)
    ortho::orthogonalize(cx.be, o.orthogonalizer, o.ns_steps, o.epsilon, packed<OrthoT, Space>(u_data, pos, ur, uc),
                         scratch, norms);
  } else {
    if constexpr (is_distributed_v<Comm>) {
      // rank r orthogonalizes the contiguous block [r·per, (r+1)·per) and all ranks all-gather the
      // blocks; each matrix is orthogonalized whole by one rank, so the result is bit-identical to
      // a single process (SPEC §2.2). The padding beyond `pos` is zeros.
      const std::int64_t per = (pos + W - 1) / W, e = ur * uc;
      const std::int64_t lo = std::min<std::int64_t>(me * per, pos), hi = std::min<std::int64_t>(lo + per, pos);
      if (hi > lo)
        ortho::orthogonalize(cx.be, o.orthogonalizer, o.ns_steps, o.epsilon,
                             packed<OrthoT, Space>(u_data + lo * e, hi - lo, ur, uc), scratch, norms);
      const std::int64_t pad0 = std::max<std::int64_t>(hi, me * per), pad1 = (me + 1) * per;
      if (pad1 > pad0) cx.be.fill(packed<OrthoT, Space>(u_data + pad0 * e, pad1 - pad0, ur, uc), 0.0f);
      cx.comm->all_gather_inplace(u_data, static_cast<std::size_t>(per * e));
    }
  }

  BatchScope updates(cx.be);  // Muon's and Dion2's updates merge; the Nor* ones launch per matrix
  for (const auto& d : done) {
    const Slot& sl = cx.slots[static_cast<std::size_t>(d.slot)];
    auto& p = cx.params[static_cast<std::size_t>(sl.param)];
    Mat<OrthoT, Space> O = packed<OrthoT, Space>(u_data + d.pos * ur * uc, d.nb, ur, uc);
    dispatch_dtype(p.param.dtype, [&]<class TX>() {
      auto X = geometry_mat<TX>(p.param, sl.geo).slice(d.b0, d.nb);
      switch (alg) {
        case Algorithm::muon:
          cx.be.apply_update(X, O, cx.lr, cx.wd, sl.lr_scale * sl.o_scale, o.cautious_wd);
          break;
        case Algorithm::normuon: {
          const auto vview = p.state_view("variance_neuron");
          dispatch_dtype(vview.dtype, [&]<class TV>() {
            if (sl.geo.kind == Geometry::Kind::flatten) {
              // flatten orthogonalizes (d0, d1·d2·…) but normalizes the stored matrices (SPEC §1.2)
              Geometry plain;
              auto Xp = geometry_mat<TX>(p.param, plain);
              auto Vp = geometry_mat<TV>(vview, plain);
              auto Op = packed<OrthoT, Space>(O.data, Xp.batch, Xp.rows, Xp.cols);
              cx.be.normuon_update(Xp, Op, Vp, o.muon_beta2, sl.o_scale, cx.lr, cx.wd, sl.lr_scale, o.cautious_wd);
            } else {
              auto V = geometry_mat<TV>(vview, sl.geo).slice(d.b0, d.nb);
              cx.be.normuon_update(X, O, V, o.muon_beta2, sl.o_scale, cx.lr, cx.wd, sl.lr_scale, o.cautious_wd);
            }
          });
          break;
        }
        case Algorithm::dion2:
          cx.be.dion2_update(X, O, idx + d.pos * ch.k, ch.k, ch.sel_rows, cx.lr, cx.wd, sl.lr_scale);
          break;
        case Algorithm::nordion2: {
          const auto vview = p.state_view("variance_neuron");
          dispatch_dtype(vview.dtype, [&]<class TV>() {
            auto V = geometry_mat<TV>(vview, sl.geo).slice(d.b0, d.nb);
            cx.be.nordion2_update(X, O, V, idx + d.pos * ch.k, ch.k, o.muon_beta2, cx.lr, cx.wd, sl.lr_scale);
          });
          break;
        }
        default: break;
      }
    });
  }
  updates.finish();
}

/// FSDP: every matrix of the chunk is sharded over the optimizer's communicator along its rows
/// (ShardSpec dim −2) or its columns (dim −1), contiguous in rank order (offsets cx.offs). SPEC §0.3
/// case A with exact per-rank slice counts instead of zero padding: the owner of a matrix
/// assembles exactly the slices the ranks hold, in the layout one process holds the matrix in
/// (Muon, NorMuon: the whole matrix; Dion2 / NorDion2 local scope: each rank's top-k slices),
/// orthogonalizes it, and returns every rank its slices. Muon's result is therefore bit-identical
/// to a single process for row and column shards alike. Column shards select columns (Dion2,
/// comm_dim −1); NorMuon and NorDion2 take row shards only (refused at registration).
template <class OrthoT, class Ctx>
void muon_family_sharded(Ctx& cx) {
  using Space = typename std::remove_reference_t<decltype(cx.be)>::Space;
  auto& comm = *cx.comm;
  auto& be = cx.be;
  const int W = comm.size(), me = comm.rank();
  const auto& ch = cx.chunk;
  const Options& o = cx.o;
  const Algorithm alg = ch.algorithm;
  const bool selective = alg == Algorithm::dion2 || alg == Algorithm::nordion2;
  const bool global = selective && ch.global_scope;
  // S slices along the sharded dim, each spanning O elements of the other dim
  const bool by_rows = ch.shard_dim != -1;
  const std::int64_t S = by_rows ? ch.rows : ch.cols, O = by_rows ? ch.cols : ch.rows;
  if (S == 0 || O == 0) return;  // the global shape: the same decision on every rank
  const std::int64_t* offs = cx.offs;
  auto len = [&](int i) { return offs[i + 1] - offs[i]; };
  const std::int64_t lme = len(me);
  std::vector<std::int64_t> c(static_cast<std::size_t>(W));
  for (int i = 0; i < W; ++i) c[static_cast<std::size_t>(i)] = selective && !global ? std::min(ch.k, len(i)) : len(i);
  const std::int64_t cme = c[static_cast<std::size_t>(me)];
  auto bufs = muon_dist_carve<OrthoT>(cx.workspace, ch, W, offs);
  const float decay = alg == Algorithm::dion2 ? o.ef_decay : o.mu;
  // `nb` packed blocks of `s` slices each (s × O rows, or O × s columns)
  auto slab = [&]<class T>(T* p, std::int64_t nb, std::int64_t s) {
    return by_rows ? packed<T, Space>(p, nb, s, O) : packed<T, Space>(p, nb, O, s);
  };

  // 1. pre-orthogonalization on the local shards (an empty shard contributes nothing)
  struct Live {
    int slot;
    std::int64_t b0, nb, pos;
  };
  std::vector<Live> live;
  live.reserve(ch.items.size());
  std::int64_t pos = 0;
  BatchScope pre(be);  // ends before the exchange reads the buffers
  for (const auto& it : ch.items) {
    const Slot& sl = cx.slots[static_cast<std::size_t>(it.slot)];
    auto& p = cx.params[static_cast<std::size_t>(sl.param)];
    if (!p.live) continue;
    if (lme > 0) {
      const auto mview = p.state_view("momentum");
      dispatch_dtype(p.param.dtype, [&]<class TG>() {
        dispatch_dtype(mview.dtype, [&]<class TM>() {
          auto G = geometry_mat<TG>(p.grad, sl.geo).slice(it.b0, it.nb);
          auto Mm = geometry_mat<TM>(mview, sl.geo).slice(it.b0, it.nb);
          auto U = slab(bufs.u + pos * cme * O, it.nb, cme);
          if (!selective) {
            be.muon_momentum(G, Mm, U, o.mu, o.nesterov);
          } else {
            be.add_into(Mm, G);
            if (!global) {
              std::int64_t* id = bufs.idx + pos * cme;
              be.select_topk(Mm, by_rows, cme, id);
              be.gather_slices(Mm, id, cme, by_rows, decay, U);
            } else {
              be.copy(Mm, slab(bufs.m_loc + pos * lme * O, it.nb, lme));
            }
          }
        });
      });
    }
    live.push_back({it.slot, it.b0, it.nb, pos});
    pos += it.nb;
  }
  pre.finish();
  if (pos == 0) return;  // gradient presence is agreed across ranks before the step

  // 2. unshard, orthogonalize on the owner, reshard
  SliceExchange ex(W, me, pos, O, c, by_rows);
  const std::int64_t mine = ex.owned(me);
  std::vector<std::int64_t> counts;  // global scope: selected slices of each local matrix
  if (!global) {
    ex.template unshard<decltype(comm), decltype(be), OrthoT, Space>(comm, be, bufs.u, bufs.stage, bufs.asm_);
    if (mine > 0)
      ortho::orthogonalize(be, o.orthogonalizer, o.ns_steps, o.epsilon, slab(bufs.asm_, mine, ex.R), bufs.scratch,
                           bufs.norms);
    ex.template reshard<decltype(comm), decltype(be), OrthoT, Space>(comm, be, bufs.asm_, bufs.stage, bufs.u);
  } else {
    // global scope (SPEC §1.3): the owner ranks the whole matrix (fp32 momentum, exactly what a
    // single process ranks), orthogonalizes the top-k slices, and returns to each rank the slices
    // of its shard with their local indices.
    const std::int64_t K = ch.k;
    ex.template unshard<decltype(comm), decltype(be), float, Space>(comm, be, bufs.m_loc, bufs.m_stage, bufs.m_asm);
    std::vector<std::int64_t> g(static_cast<std::size_t>(std::max<std::int64_t>(mine * K, 1)));
    if (mine > 0) {
      auto Mf = slab(bufs.m_asm, mine, S);
      be.select_topk(Mf, by_rows, K, bufs.gidx);
      auto U = slab(bufs.asm_, mine, K);
      be.gather_slices(Mf, bufs.gidx, K, by_rows, 1.0f, U);
      ortho::orthogonalize(be, o.orthogonalizer, o.ns_steps, o.epsilon, U, bufs.scratch, bufs.norms);
      be.copy_to_host(bufs.gidx, g.data(), static_cast<std::size_t>(mine * K) * sizeof(std::int64_t));
      be.synchronize();
    }
    // send side: to rank i, per owned matrix, a block of len(i)·O elements (the first cnt·O hold
    // the selected slices of i's shard in ascending order, packed: cnt × O or O × cnt; the rest
    // zeros) and (cnt, local indices, padding)
    std::vector<int> sc(static_cast<std::size_t>(W)), sd(sc), rc(sc), rd(sc), isc(sc), isd(sc), irc(sc), ird(sc);
    std::vector<std::int64_t> ix_host;
    std::int64_t at = 0;
    for (int i = 0; i < W; ++i) {
      sc[static_cast<std::size_t>(i)] = SliceExchange::as_count(mine * len(i) * O);
      sd[static_cast<std::size_t>(i)] = SliceExchange::as_count(at);
      isc[static_cast<std::size_t>(i)] = SliceExchange::as_count(mine * (len(i) + 1));
      isd[static_cast<std::size_t>(i)] = SliceExchange::as_count(static_cast<std::int64_t>(ix_host.size()));
      if (mine * len(i) > 0) be.fill(slab(bufs.u_sel + at, mine, len(i)), 0.0f);
      for (std::int64_t t = 0; t < mine; ++t) {
        const std::int64_t* gt = g.data() + t * K;
        const std::int64_t a = std::lower_bound(gt, gt + K, offs[i]) - gt;
        const std::int64_t b = std::lower_bound(gt, gt + K, offs[i + 1]) - gt;
        ix_host.push_back(b - a);
        for (std::int64_t q = a; q < b; ++q) ix_host.push_back(gt[q] - offs[i]);
        for (std::int64_t q = b - a; q < len(i); ++q) ix_host.push_back(0);
        if (b > a) {
          // slices [a, b) of the owner's K selected ones
          auto Ut = slab(bufs.asm_ + t * K * O, 1, K);
          be.copy(by_rows ? Ut.row_block(a, b - a) : Ut.col_block(a, b - a), slab(bufs.u_sel + at + t * len(i) * O, 1, b - a));
        }
      }
      at += mine * len(i) * O;
      rc[static_cast<std::size_t>(i)] = SliceExchange::as_count(ex.owned(i) * lme * O);
      rd[static_cast<std::size_t>(i)] = SliceExchange::as_count(ex.first_owned(i) * lme * O);
      irc[static_cast<std::size_t>(i)] = SliceExchange::as_count(ex.owned(i) * (lme + 1));
      ird[static_cast<std::size_t>(i)] = SliceExchange::as_count(ex.first_owned(i) * (lme + 1));
    }
    if (!ix_host.empty())
      be.copy_from_host(ix_host.data(), bufs.ix_send, ix_host.size() * sizeof(std::int64_t));
    comm.all_to_all_v(static_cast<const OrthoT*>(bufs.u_sel), sc, sd, bufs.u, rc, rd);
    comm.all_to_all_v(static_cast<const std::int64_t*>(bufs.ix_send), isc, isd, bufs.ix_recv, irc, ird);
    counts.resize(static_cast<std::size_t>(pos));
    if (lme > 0) {
      std::vector<std::int64_t> r(static_cast<std::size_t>(pos * (lme + 1)));
      be.copy_to_host(bufs.ix_recv, r.data(), r.size() * sizeof(std::int64_t));
      be.synchronize();
      for (std::int64_t q = 0; q < pos; ++q) counts[static_cast<std::size_t>(q)] = r[static_cast<std::size_t>(q * (lme + 1))];
    }
  }
  if (lme == 0) return;

  // 3. the update of the local shards
  BatchScope updates(be);
  for (const auto& l : live) {
    const Slot& sl = cx.slots[static_cast<std::size_t>(l.slot)];
    auto& p = cx.params[static_cast<std::size_t>(sl.param)];
    dispatch_dtype(p.param.dtype, [&]<class TX>() {
      auto X = geometry_mat<TX>(p.param, sl.geo).slice(l.b0, l.nb);
      auto Ou = slab(bufs.u + l.pos * cme * O, l.nb, cme);
      switch (alg) {
        case Algorithm::muon: be.apply_update(X, Ou, cx.lr, cx.wd, sl.lr_scale * sl.o_scale, o.cautious_wd); break;
        case Algorithm::normuon: {
          // row shards only: normalization on the local row shard (SPEC §1.2 step 11: rows
          // complete, V exact, the Frobenius rescale over the local shard)
          const auto vview = p.state_view("variance_neuron");
          dispatch_dtype(vview.dtype, [&]<class TV>() {
            auto V = geometry_mat<TV>(vview, sl.geo).slice(l.b0, l.nb);
            be.normuon_update(X, Ou, V, o.muon_beta2, sl.o_scale, cx.lr, cx.wd, sl.lr_scale, o.cautious_wd);
          });
          break;
        }
        case Algorithm::dion2:
        case Algorithm::nordion2: {
          if (!global) {
            std::int64_t* id = bufs.idx + l.pos * cme;
            if (alg == Algorithm::dion2) {
              be.dion2_update(X, Ou, id, cme, by_rows, cx.lr, cx.wd, sl.lr_scale);
            } else {
              const auto vview = p.state_view("variance_neuron");
              dispatch_dtype(vview.dtype, [&]<class TV>() {
                auto V = geometry_mat<TV>(vview, sl.geo).slice(l.b0, l.nb);
                be.nordion2_update(X, Ou, V, id, cme, o.muon_beta2, cx.lr, cx.wd, sl.lr_scale);
              });
            }
            break;
          }
          // global scope: per matrix, its own count of selected slices
          const auto mview = p.state_view("momentum");
          for (std::int64_t b = 0; b < l.nb; ++b) {
            const std::int64_t q = l.pos + b, cnt = counts[static_cast<std::size_t>(q)];
            std::int64_t* id = bufs.ix_recv + q * (lme + 1) + 1;
            auto Xb = X.at(b);
            auto Ob = slab(bufs.u + q * lme * O, 1, cnt);
            if (cnt > 0) {
              dispatch_dtype(mview.dtype, [&]<class TM>() {
                auto Mb = geometry_mat<TM>(mview, sl.geo).slice(l.b0 + b, 1);
                be.gather_slices(Mb, id, cnt, by_rows, decay, slab(bufs.u_sel, 1, cnt));
              });
            }
            if (alg == Algorithm::dion2) {
              be.dion2_update(Xb, Ob, id, cnt, by_rows, cx.lr, cx.wd, sl.lr_scale);
            } else {
              const auto vview = p.state_view("variance_neuron");
              dispatch_dtype(vview.dtype, [&]<class TV>() {
                auto Vb = geometry_mat<TV>(vview, sl.geo).slice(l.b0 + b, 1);
                be.nordion2_update(Xb, Ob, Vb, id, cnt, o.muon_beta2, cx.lr, cx.wd, sl.lr_scale);
              });
            }
          }
          break;
        }
        default: break;
      }
    });
  }
  updates.finish();
}

}  // namespace dion::detail
