// Dion (SPEC §1.5-1.6; arXiv 2504.05295): low-rank power iteration with error feedback.
// Per matrix, with B = M (or Mᵀ when m < n, so that P is on the long side):
//   M ← M + G;  P = B·Q;  P ← orthonormalize(P);  R = Bᵀ·P;  guard;  B ← B − (1−mu)·P·Rᵀ;
//   Q ← R / (‖R[:,j]‖ + eps);  X ← (1 − lr·wd)·X − lr·√(m/n)·P·Qᵀ (or Q·Pᵀ).
// The orthonormalization of all P of the chunk is one batched call (the per-matrix solver calls
// are what make microsoft/dion's single-GPU Dion slow).
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <cstdint>
#include <vector>

#include "dion/algorithms/collectives.hpp"
#include "dion/algorithms/context.hpp"
#include "dion/core/concepts.hpp"
#include "dion/core/random.hpp"
#include "dion/ortho/qr.hpp"

namespace dion::detail {

/// Workspace of a data-parallel Dion chunk: the single-process bytes plus room for the batch of P
/// padded to a multiple of the replicate size (the all-gather moves equal blocks) and for this
/// rank's reduce-scattered block of P (compressed sync).
template <class Chunk>
std::int64_t dion_dist_bytes(const Chunk& c, std::int64_t per_matrix, int W) {
  // + the gathered R of a row-sharded chunk and its staging (fp32 upper bound), + alignment
  const std::int64_t own = (c.count + W - 1) / W * c.p * c.r * 4;
  return (c.count + W) * per_matrix + 2 * c.count * c.rows * c.r * 4 + own + 17 * 256 + 4096;
}

/// Compressed synchronization (SPEC §1.5): low rank that pays off; P and R are averaged instead of G.
inline bool dion_compressed(double rank_fraction, std::int64_t m, std::int64_t n, std::int64_t r) {
  return rank_fraction < 1.0 && (m + n) * r < m * n;
}

template <class Ctx>
void dion_chunk(Ctx& cx) {
  using Space = typename std::remove_reference_t<decltype(cx.be)>::Space;
  const auto& ch = cx.chunk;
  const Options& o = cx.o;
  const std::int64_t m = ch.rows, n = ch.cols, p = ch.p, q = ch.q, r = ch.r;
  if (m == 0 || n == 0 || r == 0) return;
  const bool tr = ch.transposed;
  using Comm = typename Ctx::comm_type;
  // data parallel over the replicate communicator (SPEC §2.5, non-sharded): W > 1 only here
  int W = 1, me = 0;
  bool comp = false;
  if constexpr (is_distributed_v<Comm>) {
    if (cx.comm) {
      W = cx.comm->size();
      me = cx.comm->rank();
      comp = cx.grad_sync && dion_compressed(o.rank_fraction, m, n, r);
    }
  }
  const float lr_scale = static_cast<float>(std::sqrt(static_cast<double>(m) / static_cast<double>(n)));

  // all matrices of a Dion chunk share the parameter dtype, hence the momentum dtype
  const auto& first = cx.params[static_cast<std::size_t>(cx.slots[static_cast<std::size_t>(ch.items[0].slot)].param)];
  const DType mt = const_cast<std::remove_cvref_t<decltype(first)>&>(first).state_view("momentum").dtype;

  dispatch_dtype(mt, [&]<class TM>() {
    Carver cv{cx.workspace};
    const std::int64_t np = (ch.count + W - 1) / W * W;
    TM* qw = cv.take<TM>(ch.count * q * r);
    TM* pp = cv.take<TM>(np * p * r);
    TM* rr = cv.take<TM>(ch.count * q * r);
    TM* qn = cv.take<TM>(ch.count * q * r);
    TM* uu = cv.take<TM>(ch.count * m * n);
    const std::int64_t k = ortho::rcqr_sketch_rows(r, o.rcqr_oversample);
    float* qr_scratch = cv.take<float>(ortho::qr_scratch_floats(ch.count, p, r, k));
    int* zero_flags = cv.take<int>(ch.count);
    // compressed sync over W > 1 replicas: this rank's reduce-scattered block of P
    TM* own = W > 1 && comp ? cv.take<TM>((ch.count + W - 1) / W * p * r) : nullptr;

    struct Live {
      int param;
      std::int64_t pos;
    };
    std::vector<Live> live;
    live.reserve(ch.items.size());
    std::int64_t cnt = 0;
    BatchScope start(cx.be);  // M += G and the copies of Q, merged across the chunk
    for (const auto& it : ch.items) {
      auto& pr = cx.params[static_cast<std::size_t>(cx.slots[static_cast<std::size_t>(it.slot)].param)];
      if (!pr.live) continue;
      auto mv = pr.state_view("momentum");
      auto qv = pr.state_view("Q");
      dispatch_dtype(pr.param.dtype, [&]<class TG>() {
        if constexpr (is_distributed_v<Comm>) {
          // full-rank sync: average the gradient in place over the replicas (SPEC §2.5 step 1)
          if (cx.comm && cx.grad_sync && !comp) average_in_place(*cx.comm, pr.grad.template mat<TG>());
        }
        cx.be.add_into(mv.template mat<TM>(), pr.grad.template mat<TG>());
      });
      dispatch_dtype(qv.dtype, [&]<class TQ>() {
        cx.be.copy(qv.template mat<TQ>(), packed<TM, Space>(qw + cnt * q * r, 1, q, r));
      });
      cx.streams[static_cast<std::size_t>(cnt)] = pr.key;  // mixed with the device step count
      live.push_back({static_cast<int>(&pr - cx.params.data()), cnt});
      ++cnt;
    }
    start.finish();
    if (cnt == 0) return;
    auto Mmat = [&](const Live& l) {
      return cx.params[static_cast<std::size_t>(l.param)].state_view("momentum").template mat<TM>();
    };
    // one product per matrix of the chunk (M is each parameter's own state): a batching backend
    // turns each loop into one pointer-array GEMM
    auto each_gemm = [&](auto&& f) {
      BatchScope products(cx.be);
      for (const auto& l : live) f(l);
      products.finish();
    };
    auto P = packed<TM, Space>(pp, cnt, p, r);
    auto R = packed<TM, Space>(rr, cnt, q, r);
    auto Qw = packed<TM, Space>(qw, cnt, q, r);

    const bool use_cqr = o.qr_method == QrMethod::cqr && cx.step_calls > o.cqr_warmup_steps;
    for (int it = 0; it < o.power_iters; ++it) {
      each_gemm([&](const Live& l) {  // P = B·Q
        cx.be.gemm(tr ? Op::T : Op::N, Op::N, 1.0f, Mmat(l), Qw.at(l.pos), 0.0f, P.at(l.pos));
      });
      if (W == 1 || cnt == 1) {
        if constexpr (is_distributed_v<Comm>) {
          if (comp) average_in_place(*cx.comm, P);
        }
        ortho::orthonormalize(cx.be, o.qr_method, use_cqr, o.rcqr_oversample, P, qr_scratch,
                              ortho::SketchKey{o.seed, cx.streams.data(), cx.step_dev});
      } else {
        if constexpr (is_distributed_v<Comm>) {
          // rank j orthonormalizes the contiguous block j of the batch (with each matrix's own
          // sketch stream, as a single process would) and the blocks are all-gathered. Compressed:
          // P is first reduce-scattered (mean) over the replicas in those blocks (the batch padded
          // with zero matrices to W blocks), so each rank receives only the block it
          // orthonormalizes: P moves 2·(W−1)/W of its size per rank (reduce-scatter + all-gather),
          // as much as one all-reduce, and R one all-reduce (SPEC §2.5: (m+n)·r per matrix against
          // a gradient all-reduce's m·n).
          const std::int64_t per = (cnt + W - 1) / W, e = p * r;
          const std::int64_t lo = std::min<std::int64_t>(me * per, cnt), hi = std::min<std::int64_t>(lo + per, cnt);
          if (comp) {
            if (per * W > cnt) cx.be.fill(packed<TM, Space>(pp + cnt * e, per * W - cnt, p, r), 0.0f);
            if constexpr (std::is_same_v<TM, float> || comm_reduces_bf16_v<Comm>) {
              cx.comm->reduce_scatter(pp, own, static_cast<std::size_t>(per * e), ReduceOp::avg);
              cx.be.copy(packed<TM, Space>(own, per, p, r), packed<TM, Space>(pp + me * per * e, per, p, r));
            } else {
              average_in_place(*cx.comm, packed<TM, Space>(pp, per * W, p, r));  // bf16 reduced in fp32
            }
          }
          if (hi > lo)
            ortho::orthonormalize(cx.be, o.qr_method, use_cqr, o.rcqr_oversample, P.slice(lo, hi - lo), qr_scratch,
                                  ortho::SketchKey{o.seed, cx.streams.data() + lo, cx.step_dev});
          const std::int64_t pad0 = std::max<std::int64_t>(hi, me * per), pad1 = (me + 1) * per;
          if (pad1 > pad0) cx.be.fill(packed<TM, Space>(pp + pad0 * e, pad1 - pad0, p, r), 0.0f);
          cx.comm->all_gather_inplace(pp, static_cast<std::size_t>(per * e));
        }
      }
      each_gemm([&](const Live& l) {  // R = Bᵀ·P
        cx.be.gemm(tr ? Op::N : Op::T, Op::N, 1.0f, Mmat(l), P.at(l.pos), 0.0f, R.at(l.pos));
      });
      if constexpr (is_distributed_v<Comm>) {
        if (comp) average_in_place(*cx.comm, R);
      }
      if (it + 1 < o.power_iters) {
        for (const auto& l : live) cx.streams[static_cast<std::size_t>(l.pos)] = mix64(cx.streams[static_cast<std::size_t>(l.pos)], 0x9e37ull + static_cast<std::uint64_t>(it));
        cx.be.copy(R, Qw.slice(0, cnt));
      }
    }
    // all-zero / non-finite guard on the momentum after M += G
    {
      BatchScope flags(cx.be);
      for (const auto& l : live) cx.be.all_zero_flags(Mmat(l), zero_flags + l.pos);
      flags.finish();
    }
    if constexpr (is_distributed_v<Comm>) {
      // decoupled momenta: the guard fires only where every replica's M is zero, so all replicas
      // take the same branch (SPEC §7.16)
      if (comp) cx.comm->all_reduce(zero_flags, static_cast<std::size_t>(cnt), ReduceOp::min);
    }
    if (o.power_iters > 1) {
      // the guard's fallback is the stored Q, not the last iterate
      BatchScope copies(cx.be);
      for (const auto& l : live) {
        auto& pr = cx.params[static_cast<std::size_t>(l.param)];
        auto qv = pr.state_view("Q");
        dispatch_dtype(qv.dtype, [&]<class TQ>() { cx.be.copy(qv.template mat<TQ>(), Qw.at(l.pos)); });
      }
      copies.finish();
    }
    cx.be.dion_guard(P, R, Qw, zero_flags);
    // error feedback: B ← B − (1−mu)·P·Rᵀ, i.e. M ← M − (1−mu)·P·Rᵀ or M − (1−mu)·R·Pᵀ. A product
    // cannot be predicated: on a skipped step its operands are zeroed, so it adds exact zeros.
    cx.be.zero_if_skip(P);
    cx.be.zero_if_skip(R);
    const float ef = -(1.0f - o.mu);
    each_gemm([&](const Live& l) {
      if (!tr) cx.be.gemm(Op::N, Op::T, ef, P.at(l.pos), R.at(l.pos), 1.0f, Mmat(l));
      else cx.be.gemm(Op::N, Op::T, ef, R.at(l.pos), P.at(l.pos), 1.0f, Mmat(l));
    });
    auto Qn = packed<TM, Space>(qn, cnt, q, r);
    cx.be.col_normalize(R, o.epsilon, Qn);
    // U = P·Qnᵀ (or Qn·Pᵀ) for the whole chunk in one batched product, then the updates and the
    // stores of Q, merged
    auto U = packed<TM, Space>(uu, cnt, m, n);
    if (!tr) cx.be.gemm(Op::N, Op::T, 1.0f, P.slice(0, cnt), Qn, 0.0f, U);
    else cx.be.gemm(Op::N, Op::T, 1.0f, Qn, P.slice(0, cnt), 0.0f, U);
    BatchScope finish(cx.be);
    for (const auto& l : live) {
      auto& pr = cx.params[static_cast<std::size_t>(l.param)];
      dispatch_dtype(pr.param.dtype, [&]<class TX>() {
        cx.be.apply_update(pr.param.template mat<TX>(), U.at(l.pos), cx.lr, cx.wd, lr_scale, false);
      });
      auto qv = pr.state_view("Q");
      dispatch_dtype(qv.dtype, [&]<class TQ>() { cx.be.copy(Qn.at(l.pos), qv.template mat<TQ>()); });
    }
    finish.finish();
  });
}

// Sharded layouts (FSDP, HSDP, TP, 2-D): algorithms/dion_mesh.hpp.

}  // namespace dion::detail
