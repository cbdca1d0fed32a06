// Non-owning views of user memory. The caller owns parameters and gradients; dion reads and writes
// them in place through these views and never copies or reallocates them.
//
// A view describes a batch of row-major matrices: `batch` matrices of `rows x cols`, consecutive rows
// `ld` elements apart, consecutive matrices `batch_stride` elements apart. A plain 2-D weight is
// batch 1; llm.c's layer-stacked `(L, m, n)` buffer is batch L; a 1-D bias is one row. The memory
// space (host or CUDA device) is part of the type, so handing a host view to the CUDA backend, or a
// device view to the Eigen backend, does not compile. The element type (float or bf16) is carried at
// run time, so one optimizer can hold fp32 and bf16 parameters.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "dion/core/bf16.hpp"
#include "dion/core/error.hpp"

namespace dion {

/// Host (CPU) memory: what the Eigen backend works on.
struct HostSpace {
  static constexpr const char* name = "host";
};
/// CUDA device memory: what the CUDA backend works on.
struct CudaSpace {
  static constexpr const char* name = "cuda";
};

enum class DType : std::uint8_t { f32 = 0, bf16 = 1 };

inline constexpr std::size_t dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }
inline constexpr const char* dtype_name(DType t) { return t == DType::f32 ? "float32" : "bfloat16"; }

template <class T>
inline constexpr DType dtype_of = std::is_same_v<T, float> ? DType::f32 : DType::bf16;
template <class T>
inline constexpr bool is_element_type_v = std::is_same_v<T, float> || std::is_same_v<T, bf16>;

/// The logical shape of a tensor (up to 4 dims), used for names, state shapes and checkpoints.
struct Shape {
  std::array<std::int64_t, 4> dims{};
  int ndim = 0;

  Shape() = default;
  Shape(std::initializer_list<std::int64_t> d) {
    DION_CHECK(d.size() <= 4, InvalidArgument, "Shape: at most 4 dims are supported, got ", d.size());
    for (auto v : d) dims[static_cast<std::size_t>(ndim++)] = v;
  }
  std::int64_t operator[](int i) const { return dims[static_cast<std::size_t>(i)]; }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= dims[static_cast<std::size_t>(i)];
    return n;
  }
  bool operator==(const Shape& o) const {
    if (ndim != o.ndim) return false;
    for (int i = 0; i < ndim; ++i)
      if (dims[static_cast<std::size_t>(i)] != o.dims[static_cast<std::size_t>(i)]) return false;
    return true;
  }
  std::string str() const {
    std::string s = "(";
    for (int i = 0; i < ndim; ++i) {
      if (i) s += ", ";
      s += std::to_string(dims[static_cast<std::size_t>(i)]);
    }
    if (ndim == 1) s += ",";
    return s + ")";
  }
};

/// A typed strided batch of matrices in memory space `Space`. Used inside the library and by
/// backends; users normally build the type-erased `View` below.
template <class T, class Space = HostSpace>
struct Mat {
  T* data = nullptr;
  std::int64_t batch = 1;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t ld = 0;            // elements between consecutive rows (>= cols)
  std::int64_t batch_stride = 0;  // elements between consecutive matrices

  DION_HD std::int64_t size() const { return batch * rows * cols; }
  DION_HD bool empty() const { return batch == 0 || rows == 0 || cols == 0; }
  DION_HD bool contiguous() const {
    return ld == cols && (batch <= 1 || batch_stride == rows * cols);
  }
  /// 64-bit offset of element (b, i, j): all index arithmetic is int64 (microsoft/dion #102).
  DION_HD std::int64_t offset(std::int64_t b, std::int64_t i, std::int64_t j) const {
    return b * batch_stride + i * ld + j;
  }
  DION_HD T& operator()(std::int64_t b, std::int64_t i, std::int64_t j) const { return data[offset(b, i, j)]; }
  /// Matrix b of the batch, as a batch of one.
  Mat at(std::int64_t b) const {
    Mat m = *this;
    m.data = data + b * batch_stride;
    m.batch = 1;
    return m;
  }
  /// Matrices [b0, b0 + n) of the batch.
  Mat slice(std::int64_t b0, std::int64_t n) const {
    Mat m = *this;
    m.data = data + b0 * batch_stride;
    m.batch = n;
    return m;
  }
  /// Rows [r0, r0 + n) of every matrix.
  Mat row_block(std::int64_t r0, std::int64_t n) const {
    Mat m = *this;
    m.data = data + r0 * ld;
    m.rows = n;
    return m;
  }
  /// Columns [c0, c0 + n) of every matrix.
  Mat col_block(std::int64_t c0, std::int64_t n) const {
    Mat m = *this;
    m.data = data + c0;
    m.cols = n;
    return m;
  }
};

/// A packed (contiguous) batch of `batch` matrices of rows x cols starting at p.
template <class T, class Space = HostSpace>
DION_HD inline Mat<T, Space> packed(T* p, std::int64_t batch, std::int64_t rows, std::int64_t cols) {
  Mat<T, Space> m;
  m.data = p;
  m.batch = batch;
  m.rows = rows;
  m.cols = cols;
  m.ld = cols;
  m.batch_stride = rows * cols;
  return m;
}

/// Type-erased view of user memory in `Space`: the element type is known at run time.
template <class Space>
struct View {
  void* data = nullptr;
  DType dtype = DType::f32;
  Shape shape;                    // logical shape (1-D, 2-D, 3-D or 4-D)
  std::int64_t ld = -1;           // row stride of the last two dims (-1: packed)
  std::int64_t batch_stride = -1; // stride of the flattened leading dims (-1: packed)

  bool empty_pointer() const { return data == nullptr; }
  std::int64_t rows() const { return shape.ndim >= 2 ? shape[shape.ndim - 2] : 1; }
  std::int64_t cols() const { return shape.ndim >= 1 ? shape[shape.ndim - 1] : 1; }
  std::int64_t batch() const {
    std::int64_t b = 1;
    for (int i = 0; i + 2 < shape.ndim; ++i) b *= shape[i];
    return b;
  }
  std::int64_t row_stride() const { return ld < 0 ? cols() : ld; }
  std::int64_t matrix_stride() const { return batch_stride < 0 ? rows() * row_stride() : batch_stride; }
  bool contiguous() const {
    return row_stride() == cols() && (batch() <= 1 || matrix_stride() == rows() * cols());
  }
  /// Bytes spanned from the first to one past the last element (for overlap checks).
  std::int64_t span_bytes() const {
    if (shape.numel() == 0) return 0;
    const std::int64_t last = (batch() - 1) * matrix_stride() + (rows() - 1) * row_stride() + cols();
    return last * static_cast<std::int64_t>(dtype_size(dtype));
  }
  template <class T>
  Mat<T, Space> mat() const {
    DION_CHECK(dtype_of<T> == dtype, DtypeMismatch, "view holds ", dtype_name(dtype), ", accessed as ",
               dtype_name(dtype_of<T>));
    return Mat<T, Space>{static_cast<T*>(data), batch(), rows(), cols(), row_stride(), matrix_stride()};
  }
};

using HostView = View<HostSpace>;
using CudaView = View<CudaSpace>;

/// Build a view of user memory: `view<Space>(ptr, {rows, cols})`, optionally with the row stride `ld`
/// and the stride between matrices of a batched (3-D/4-D) tensor.
template <class Space = HostSpace, class T>
View<Space> view(T* data, Shape shape, std::int64_t ld = -1, std::int64_t batch_stride = -1) {
  static_assert(is_element_type_v<std::remove_const_t<T>>, "dion views hold float or dion::bf16 elements");
  View<Space> v;
  v.data = const_cast<std::remove_const_t<T>*>(data);
  v.dtype = dtype_of<std::remove_const_t<T>>;
  v.shape = shape;
  v.ld = ld;
  v.batch_stride = batch_stride;
  return v;
}
template <class T>
HostView host_view(T* data, Shape shape, std::int64_t ld = -1, std::int64_t batch_stride = -1) {
  return view<HostSpace>(data, shape, ld, batch_stride);
}
template <class T>
CudaView cuda_view(T* data, Shape shape, std::int64_t ld = -1, std::int64_t batch_stride = -1) {
  return view<CudaSpace>(data, shape, ld, batch_stride);
}

/// Call f.template operator()<T>() with T = float or bf16 according to a run-time dtype.
template <class F>
decltype(auto) dispatch_dtype(DType t, F&& f) {
  if (t == DType::f32) return f.template operator()<float>();
  return f.template operator()<bf16>();
}

}  // namespace dion
