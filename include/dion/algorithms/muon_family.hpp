// Muon (SPEC §1.1), NorMuon (§1.2), Dion2 (§1.3) and NorDion2 = Dion3 (§1.4): one chunk of same-shape
// matrices. Pre-orthogonalization writes each matrix's input into one packed batch in the
// orthogonalization type; the batch is orthogonalized in one call; the update is applied per matrix.
#pragma once

#include <cstdint>
#include <vector>

#include "dion/algorithms/context.hpp"
#include "dion/core/concepts.hpp"
#include "dion/ortho/newton_schulz.hpp"

namespace dion::detail {

template <class OrthoT, class Ctx>
void muon_family_chunk(Ctx& cx) {
  using Space = typename std::remove_reference_t<decltype(cx.be)>::Space;
  const auto& ch = cx.chunk;
  const Options& o = cx.o;
  const Algorithm alg = ch.algorithm;
  const bool selective = alg == Algorithm::dion2 || alg == Algorithm::nordion2;
  const std::int64_t ur = selective && ch.sel_rows ? ch.k : ch.rows;
  const std::int64_t uc = selective && !ch.sel_rows ? ch.k : ch.cols;
  if (ur == 0 || uc == 0) return;

  Carver cv{cx.workspace};
  OrthoT* u_data = cv.take<OrthoT>(ch.count * ur * uc);
  OrthoT* scratch = cv.take<OrthoT>(ortho::scratch_elems(ch.count, ur, uc));
  float* norms = cv.take<float>(ch.count);
  std::int64_t* idx = selective ? cv.take<std::int64_t>(ch.count * ch.k) : nullptr;

  struct Done {
    int slot;
    std::int64_t b0, nb, pos;
  };
  std::vector<Done> done;  // small: one entry per chunk item
  done.reserve(ch.items.size());
  std::int64_t pos = 0;
  for (const auto& it : ch.items) {
    const Slot& sl = cx.slots[static_cast<std::size_t>(it.slot)];
    auto& p = cx.params[static_cast<std::size_t>(sl.param)];
    if (!p.grad.data) continue;
    const auto mview = p.state_view("momentum");
    Mat<OrthoT, Space> U = packed<OrthoT, Space>(u_data + pos * ur * uc, it.nb, ur, uc);
    dispatch_dtype(p.param.dtype, [&]<class TG>() {
      dispatch_dtype(mview.dtype, [&]<class TM>() {
        auto G = geometry_mat<TG>(p.grad, sl.geo).slice(it.b0, it.nb);
        auto M = geometry_mat<TM>(mview, sl.geo).slice(it.b0, it.nb);
        if (!selective) {
          cx.be.muon_momentum(G, M, U, o.mu, o.nesterov);
        } else {
          cx.be.add_into(M, G);
          std::int64_t* id = idx + pos * ch.k;
          cx.be.select_topk(M, ch.sel_rows, ch.k, id);
          const float decay = alg == Algorithm::dion2 ? o.ef_decay : o.mu;
          cx.be.gather_slices(M, id, ch.k, ch.sel_rows, decay, U);
        }
      });
    });
    done.push_back({it.slot, it.b0, it.nb, pos});
    pos += it.nb;
  }
  if (pos == 0) return;
  ortho::orthogonalize(cx.be, o.orthogonalizer, o.ns_steps, o.epsilon, packed<OrthoT, Space>(u_data, pos, ur, uc),
                       scratch, norms);

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
}

}  // namespace dion::detail
