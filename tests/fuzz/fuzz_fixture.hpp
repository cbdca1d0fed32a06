// The optimizers the fuzz target loads into (and make_corpus saves from): small, fixed shapes.
#pragma once

#include <vector>

#include "dion/dion.hpp"

namespace dion_fuzz {

struct Fixture {
  dion::EigenBackend be;
  std::vector<float> x = std::vector<float>(4 * 3 + 3 * 5 + 3 + 2, 0.01f);
  std::vector<float> g = std::vector<float>(x.size(), 0.5f);
  dion::Muon<dion::EigenBackend> muon{be};
  dion::Dion<dion::EigenBackend> dion{be, {.rank_fraction = 0.5}};
  std::vector<float> y = x, h = g;
  Fixture() {
    auto reg = [](auto& opt, std::vector<float>& p, std::vector<float>& q) {
      opt.add_group()
          .add("w", dion::host_view(p.data(), {4, 3}), dion::host_view(q.data(), {4, 3}))
          .add("v", dion::host_view(p.data() + 12, {3, 5}), dion::host_view(q.data() + 12, {3, 5}));
      opt.add_group({.algorithm = dion::Algorithm::adamw}).add("b", dion::host_view(p.data() + 27, {3}),
                                                               dion::host_view(q.data() + 27, {3}));
      opt.add_group({.algorithm = dion::Algorithm::lion}).add("s", dion::host_view(p.data() + 30, {2}),
                                                              dion::host_view(q.data() + 30, {2}));
    };
    reg(muon, x, g);
    reg(dion, y, h);
  }
};

inline Fixture& fixture() {
  static Fixture f;
  return f;
}

}  // namespace dion_fuzz
