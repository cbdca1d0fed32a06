// Dion (SPEC §1.5-1.6; arXiv 2504.05295): low-rank power iteration with error feedback.
// Per matrix, with B = M (or Mᵀ when m < n, so that P is on the long side):
//   M ← M + G;  P = B·Q;  P ← orthonormalize(P);  R = Bᵀ·P;  guard;  B ← B − (1−mu)·P·Rᵀ;
//   Q ← R / (‖R[:,j]‖ + eps);  X ← (1 − lr·wd)·X − lr·√(m/n)·P·Qᵀ (or Q·Pᵀ).
// The orthonormalization of all P of the chunk is one batched call (the per-matrix solver calls
// are what make microsoft/dion's single-GPU Dion slow).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "dion/algorithms/context.hpp"
#include "dion/core/concepts.hpp"
#include "dion/core/random.hpp"
#include "dion/ortho/qr.hpp"

namespace dion::detail {

template <class Ctx>
void dion_chunk(Ctx& cx) {
  using Space = typename std::remove_reference_t<decltype(cx.be)>::Space;
  const auto& ch = cx.chunk;
  const Options& o = cx.o;
  const std::int64_t m = ch.rows, n = ch.cols, p = ch.p, q = ch.q, r = ch.r;
  if (m == 0 || n == 0 || r == 0) return;
  const bool tr = ch.transposed;
  const float lr_scale = static_cast<float>(std::sqrt(static_cast<double>(m) / static_cast<double>(n)));

  // all matrices of a Dion chunk share the parameter dtype, hence the momentum dtype
  const auto& first = cx.params[static_cast<std::size_t>(cx.slots[static_cast<std::size_t>(ch.items[0].slot)].param)];
  const DType mt = const_cast<std::remove_cvref_t<decltype(first)>&>(first).state_view("momentum").dtype;

  dispatch_dtype(mt, [&]<class TM>() {
    Carver cv{cx.workspace};
    TM* qw = cv.take<TM>(ch.count * q * r);
    TM* pp = cv.take<TM>(ch.count * p * r);
    TM* rr = cv.take<TM>(ch.count * q * r);
    TM* qn = cv.take<TM>(ch.count * q * r);
    TM* uu = cv.take<TM>(ch.count * m * n);
    const std::int64_t k = ortho::rcqr_sketch_rows(r, o.rcqr_oversample);
    float* qr_scratch = cv.take<float>(ortho::qr_scratch_floats(ch.count, p, r, k));
    int* zero_flags = cv.take<int>(ch.count);

    struct Live {
      int param;
      std::int64_t pos;
    };
    std::vector<Live> live;
    live.reserve(ch.items.size());
    std::int64_t cnt = 0;
    for (const auto& it : ch.items) {
      auto& pr = cx.params[static_cast<std::size_t>(cx.slots[static_cast<std::size_t>(it.slot)].param)];
      if (!pr.grad.data) continue;
      auto mv = pr.state_view("momentum");
      auto qv = pr.state_view("Q");
      dispatch_dtype(pr.param.dtype, [&]<class TG>() {
        cx.be.add_into(mv.template mat<TM>(), pr.grad.template mat<TG>());
      });
      dispatch_dtype(qv.dtype, [&]<class TQ>() {
        cx.be.copy(qv.template mat<TQ>(), packed<TM, Space>(qw + cnt * q * r, 1, q, r));
      });
      cx.streams[static_cast<std::size_t>(cnt)] = mix64(pr.key, static_cast<std::uint64_t>(cx.group_step));
      live.push_back({static_cast<int>(&pr - cx.params.data()), cnt});
      ++cnt;
    }
    if (cnt == 0) return;
    auto Mmat = [&](const Live& l) {
      return cx.params[static_cast<std::size_t>(l.param)].state_view("momentum").template mat<TM>();
    };
    auto P = packed<TM, Space>(pp, cnt, p, r);
    auto R = packed<TM, Space>(rr, cnt, q, r);
    auto Qw = packed<TM, Space>(qw, cnt, q, r);

    const bool use_cqr = o.qr_method == QrMethod::cqr && cx.group_step > o.cqr_warmup_steps;
    for (int it = 0; it < o.power_iters; ++it) {
      for (const auto& l : live)  // P = B·Q
        cx.be.gemm(tr ? Op::T : Op::N, Op::N, 1.0f, Mmat(l), Qw.at(l.pos), 0.0f, P.at(l.pos));
      ortho::orthonormalize(cx.be, o.qr_method, use_cqr, o.rcqr_oversample, P, qr_scratch,
                            ortho::SketchKey{o.seed, cx.streams.data()});
      for (const auto& l : live)  // R = Bᵀ·P
        cx.be.gemm(tr ? Op::N : Op::T, Op::N, 1.0f, Mmat(l), P.at(l.pos), 0.0f, R.at(l.pos));
      if (it + 1 < o.power_iters) {
        for (const auto& l : live) cx.streams[static_cast<std::size_t>(l.pos)] = mix64(cx.streams[static_cast<std::size_t>(l.pos)], 0x9e37ull + static_cast<std::uint64_t>(it));
        cx.be.copy(R, Qw.slice(0, cnt));
      }
    }
    // all-zero / non-finite guard on the momentum after M += G
    for (const auto& l : live) cx.be.all_zero_flags(Mmat(l), zero_flags + l.pos);
    if (o.power_iters > 1) {
      // the guard's fallback is the stored Q, not the last iterate
      for (const auto& l : live) {
        auto& pr = cx.params[static_cast<std::size_t>(l.param)];
        auto qv = pr.state_view("Q");
        dispatch_dtype(qv.dtype, [&]<class TQ>() { cx.be.copy(qv.template mat<TQ>(), Qw.at(l.pos)); });
      }
    }
    cx.be.dion_guard(P, R, Qw, zero_flags);
    // error feedback: B ← B − (1−mu)·P·Rᵀ, i.e. M ← M − (1−mu)·P·Rᵀ or M − (1−mu)·R·Pᵀ
    const float ef = -(1.0f - o.mu);
    for (const auto& l : live) {
      if (!tr) cx.be.gemm(Op::N, Op::T, ef, P.at(l.pos), R.at(l.pos), 1.0f, Mmat(l));
      else cx.be.gemm(Op::N, Op::T, ef, R.at(l.pos), P.at(l.pos), 1.0f, Mmat(l));
    }
    auto Qn = packed<TM, Space>(qn, cnt, q, r);
    cx.be.col_normalize(R, o.epsilon, Qn);
    auto U = packed<TM, Space>(uu, cnt, m, n);
    for (const auto& l : live) {
      auto& pr = cx.params[static_cast<std::size_t>(l.param)];
      if (!tr) cx.be.gemm(Op::N, Op::T, 1.0f, P.at(l.pos), Qn.at(l.pos), 0.0f, U.at(l.pos));
      else cx.be.gemm(Op::N, Op::T, 1.0f, Qn.at(l.pos), P.at(l.pos), 0.0f, U.at(l.pos));
      dispatch_dtype(pr.param.dtype, [&]<class TX>() {
        cx.be.apply_update(pr.param.template mat<TX>(), U.at(l.pos), cx.lr, cx.wd, lr_scale, false);
      });
      auto qv = pr.state_view("Q");
      dispatch_dtype(qv.dtype, [&]<class TQ>() { cx.be.copy(Qn.at(l.pos), qv.template mat<TQ>()); });
    }
  });
}

}  // namespace dion::detail
