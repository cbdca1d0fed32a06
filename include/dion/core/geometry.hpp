// How a parameter is cut into the matrices an algorithm orthogonalizes (SPEC §0.4): as stored
// (a 2-D weight, or a batch over the leading dims of a 3-D/4-D tensor), per head (num_heads), as one
// flattened (d0, d1·d2·…) matrix (flatten), or as row blocks (split_sizes). The same geometry is applied
// to the parameter, its gradient and its state, so each sees the same matrices.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "dion/core/error.hpp"
#include "dion/core/options.hpp"
#include "dion/core/view.hpp"

namespace dion::detail {

struct Geometry {
  enum class Kind : std::uint8_t { plain, heads, flatten } kind = Kind::plain;
  std::int64_t heads = 1;
  std::int64_t row0 = 0;    ///< first row of a split block (plain only)
  std::int64_t nrows = -1;  ///< rows of a split block; -1 = all
};

/// The matrices of `v` under geometry g.
template <class T, class Space>
Mat<T, Space> geometry_mat(const View<Space>& v, const Geometry& g) {
  switch (g.kind) {
    case Geometry::Kind::plain: {
      Mat<T, Space> m = v.template mat<T>();
      if (g.nrows >= 0) m = m.row_block(g.row0, g.nrows);
      return m;
    }
    case Geometry::Kind::heads: {
      Mat<T, Space> m = v.template mat<T>();
      const std::int64_t h = m.rows / g.heads;
      return Mat<T, Space>{m.data, g.heads, h, m.cols, m.ld, h * m.ld};
    }
    case Geometry::Kind::flatten: {
      const std::int64_t d0 = v.shape[0];
      const std::int64_t rest = d0 ? v.shape.numel() / d0 : 0;
      return Mat<T, Space>{static_cast<T*>(v.data), 1, d0, rest, rest, d0 * rest};
    }
  }
  return {};
}

/// A packed view with the given shape over `data` (state buffers are always packed).
template <class Space>
View<Space> packed_view(void* data, DType t, const Shape& s) {
  View<Space> v;
  v.data = data;
  v.dtype = t;
  v.shape = s;
  return v;
}

/// Shape-dependent lr factor s(fan_out, fan_in) of SPEC §0.1.
inline float adjust_lr_factor(AdjustLr a, std::int64_t fan_out, std::int64_t fan_in) {
  if (fan_out <= 0 || fan_in <= 0) return 1.0f;
  switch (a) {
    case AdjustLr::spectral_norm: return static_cast<float>(std::sqrt(static_cast<double>(fan_out) / fan_in));
    case AdjustLr::rms_norm:
      return static_cast<float>(0.2 * std::sqrt(static_cast<double>(fan_out > fan_in ? fan_out : fan_in)));
    case AdjustLr::none: return 1.0f;
  }
  return 1.0f;
}

/// One unit of orthogonalization work: a set of same-shape matrices of one parameter.
struct Slot {
  int param = -1;
  Geometry geo;
  std::int64_t batch = 1, rows = 0, cols = 0;
  float lr_scale = 1.0f;  ///< adjust_lr factor of the whole parameter (SPEC §0.1)
  float o_scale = 1.0f;   ///< split_sizes block scale s(block)/s(full), applied to O (SPEC §0.4)
};

/// The slots of a Muon-family parameter of logical shape `s` under options `o`.
inline std::vector<Slot> muon_slots(int param, const Shape& s, const Options& o) {
  std::vector<Slot> out;
  const int nd = s.ndim;
  Slot base;
  base.param = param;
  std::int64_t fan_out = s[nd - 2], fan_in = s[nd - 1];
  if (o.flatten && nd >= 3) {
    base.geo.kind = Geometry::Kind::flatten;
    base.batch = 1;
    base.rows = s[0];
    base.cols = s[0] ? s.numel() / s[0] : 0;
    fan_out = base.rows;
    fan_in = base.cols;
  } else if (o.num_heads > 1) {
    base.geo.kind = Geometry::Kind::heads;
    base.geo.heads = o.num_heads;
    base.batch = o.num_heads;
    base.rows = s[0] / o.num_heads;
    base.cols = s[1];
    fan_out = base.rows;
  } else {
    base.batch = 1;
    for (int i = 0; i + 2 < nd; ++i) base.batch *= s[i];
    base.rows = s[nd - 2];
    base.cols = s[nd - 1];
  }
  base.lr_scale = adjust_lr_factor(o.adjust_lr, fan_out, fan_in);
  if (o.split_sizes.empty()) {
    out.push_back(base);
    return out;
  }
  std::int64_t r0 = 0;
  for (auto h : o.split_sizes) {
    Slot b = base;
    b.geo.row0 = r0;
    b.geo.nrows = h;
    b.rows = h;
    b.o_scale = o.adjust_lr == AdjustLr::none ? 1.0f : adjust_lr_factor(o.adjust_lr, h, fan_in) / base.lr_scale;
    out.push_back(b);
    r0 += h;
  }
  return out;
}

}  // namespace dion::detail
