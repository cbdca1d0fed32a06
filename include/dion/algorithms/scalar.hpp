// Lion (arXiv 2302.06675) and AdamW (arXiv 1711.05101) for parameters that are not weight matrices
// (biases, norms, embeddings, output heads), available in every optimizer (SPEC §1.8).
#pragma once

#include "dion/core/options.hpp"
#include "dion/core/view.hpp"

namespace dion::detail {

/// `group_step`: for AdamW inside Dion, the group's device step counter (advanced once per step by the
/// engine, only read here), which microsoft/dion's Dion uses for bias correction; nullptr: the
/// parameter's own `step_dev`, advanced here (the DistributedOrthoBase family, SPEC §1.8).
template <class Backend, class ParamRec>
void scalar_step(Backend& be, Algorithm alg, const Options& o, ParamRec& p, const float* lr, const float* wd,
                 float* group_step = nullptr) {
  if (!p.live || !p.grad.data || p.param.shape.numel() == 0) return;
  auto mv = p.state_view("momentum");
  dispatch_dtype(p.param.dtype, [&]<class TX>() {
    dispatch_dtype(mv.dtype, [&]<class TM>() {
      auto X = p.param.template mat<TX>();
      auto G = p.grad.template mat<TX>();
      auto M = mv.template mat<TM>();
      if (alg == Algorithm::lion) {
        be.lion_update(X, G, M, lr, wd, o.beta1, o.beta2, o.cautious_wd);
      } else {
        auto vv = p.state_view("variance");
        auto sv = p.state_view("step_dev");
        dispatch_dtype(vv.dtype, [&]<class TV>() {
          float* step = group_step ? group_step : static_cast<float*>(sv.data);
          be.adamw_update(X, G, M, vv.template mat<TV>(), step, group_step == nullptr, lr, wd, o.beta1, o.beta2,
                          o.epsilon, o.cautious_wd);
        });
      }
    });
  });
}

}  // namespace dion::detail
