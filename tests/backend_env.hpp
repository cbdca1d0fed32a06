// One test body, every backend. A test written as
//
//   TEMPLATE_TEST_CASE("muon: ...", "[muon]", DION_TEST_BACKENDS) {
//     dion_test::BackendEnv<TestType> env;
//     auto x = env.upload(std::span<const float>(host_x));      // DeviceBuffer<float> in backend memory
//     auto g = env.upload(std::span<const float>(host_g));
//     dion::Muon<TestType> opt{env.backend(), {.lr = 0.02f}};
//     opt.add_group().add("w", env.view(x, {64, 32}), env.view(g, {64, 32}));
//     opt.step();
//     std::vector<float> after = env.download(x);
//   }
//
// runs on the Eigen backend here and, in a CUDA build, also on the CUDA backend. DION_TEST_BACKENDS
// defaults to dion::EigenBackend; a CUDA test build defines it (before including this header, e.g. on
// the command line) as `dion::EigenBackend, dion::CudaBackend` and provides the specialization
// BackendEnv<dion::CudaBackend> in its own header (which owns a stream and builds the backend on it).
//
// Only the backend's own operations are used here (alloc_bytes, copy_to_host, copy_from_host,
// synchronize), so the generic helpers below work for every backend; a specialization only says how
// the backend object is made and owned. A specialization derives from
// BackendEnvCommon<BackendEnv<B>, B> and provides `B& backend()` and `static constexpr const char*
// name` (used in test messages), e.g.
//
//   template <> struct BackendEnv<dion::CudaBackend>
//       : BackendEnvCommon<BackendEnv<dion::CudaBackend>, dion::CudaBackend> {
//     static constexpr const char* name = "cuda";
//     dion::CudaBackend& backend() { return backend_; }
//    private:
//     /* stream owned here */ dion::CudaBackend backend_{...};
//   };
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "dion/dion.hpp"

#ifndef DION_TEST_BACKENDS
#define DION_TEST_BACKENDS dion::EigenBackend
#endif

namespace dion_test {

/// A typed, owning buffer of `size()` elements in backend B's memory (zero-initialized for the
/// Eigen backend; a CUDA allocation is zeroed by the backend too). Move-only.
template <class T, class B>
class DeviceBuffer {
 public:
  using value_type = T;
  using Space = typename B::Space;

  DeviceBuffer() = default;
  DeviceBuffer(B& be, std::size_t n) : raw_(be.alloc_bytes(std::max<std::size_t>(n, 1) * sizeof(T))), n_(n) {}

  T* data() const { return static_cast<T*>(raw_.data()); }
  std::size_t size() const { return n_; }
  std::size_t bytes() const { return n_ * sizeof(T); }

 private:
  typename B::RawBuffer raw_;
  std::size_t n_ = 0;
};

/// Helpers shared by every backend's environment; `Derived` provides `B& backend()`.
template <class Derived, class B>
struct BackendEnvCommon {
  using Backend = B;
  using Space = typename B::Space;
  template <class T>
  using Buffer = DeviceBuffer<T, B>;

  B& be() { return static_cast<Derived*>(this)->backend(); }

  /// A zeroed buffer of n elements in backend memory.
  template <class T>
  DeviceBuffer<T, B> alloc(std::size_t n) {
    return DeviceBuffer<T, B>(be(), n);
  }
  /// Copy host values into a fresh backend buffer.
  template <class T>
  DeviceBuffer<T, B> upload(std::span<const T> host) {
    DeviceBuffer<T, B> d(be(), host.size());
    if (!host.empty()) be().copy_from_host(host.data(), d.data(), host.size() * sizeof(T));
    be().synchronize();
    return d;
  }
  template <class T>
  DeviceBuffer<T, B> upload(const std::vector<T>& host) {
    return upload(std::span<const T>(host));
  }
  /// Overwrite an existing buffer (sizes must agree).
  template <class T>
  void write(DeviceBuffer<T, B>& d, std::span<const T> host) {
    if (host.size() != d.size()) throw std::logic_error("BackendEnv::write: size mismatch");
    if (!host.empty()) be().copy_from_host(host.data(), d.data(), host.size() * sizeof(T));
    be().synchronize();
  }
  template <class T>
  void write(DeviceBuffer<T, B>& d, const std::vector<T>& host) {
    write(d, std::span<const T>(host));
  }
  /// Copy a backend buffer to the host (waits for the backend's pending work).
  template <class T>
  std::vector<T> download(const DeviceBuffer<T, B>& d) {
    return download(d.data(), d.size());
  }
  /// Copy n elements starting at a backend pointer to the host.
  template <class T>
  std::vector<T> download(const T* device_ptr, std::size_t n) {
    be().synchronize();
    std::vector<T> out(n);
    if (n) be().copy_to_host(device_ptr, out.data(), n * sizeof(T));
    be().synchronize();
    return out;
  }
  /// Raw bytes of a backend buffer (for bitwise snapshots).
  template <class T>
  std::vector<std::byte> download_bytes(const DeviceBuffer<T, B>& d) {
    be().synchronize();
    std::vector<std::byte> out(d.bytes());
    if (d.bytes()) be().copy_to_host(d.data(), out.data(), d.bytes());
    be().synchronize();
    return out;
  }

  /// A dion view of (part of) a backend buffer: `view(buf, {rows, cols})`, optionally strided and
  /// starting `offset` elements into the buffer.
  template <class T>
  dion::View<Space> view(const DeviceBuffer<T, B>& d, dion::Shape shape, std::int64_t ld = -1,
                         std::int64_t batch_stride = -1, std::size_t offset = 0) {
    return dion::view<Space>(d.data() + offset, shape, ld, batch_stride);
  }
  /// A view of raw backend memory.
  template <class T>
  dion::View<Space> view_at(T* device_ptr, dion::Shape shape, std::int64_t ld = -1, std::int64_t batch_stride = -1) {
    return dion::view<Space>(device_ptr, shape, ld, batch_stride);
  }
  /// A typed Mat over a packed backend buffer (for calling backend kernels / orthogonalizers).
  template <class T>
  dion::Mat<T, Space> mat(const DeviceBuffer<T, B>& d, std::int64_t batch, std::int64_t rows, std::int64_t cols) {
    return dion::packed<T, Space>(d.data(), batch, rows, cols);
  }
};

/// Primary template: specialized per backend.
template <class B>
struct BackendEnv;

/// The CPU (Eigen) backend: host memory, no stream.
template <>
struct BackendEnv<dion::EigenBackend> : BackendEnvCommon<BackendEnv<dion::EigenBackend>, dion::EigenBackend> {
  static constexpr const char* name = "eigen";
  dion::EigenBackend& backend() { return backend_; }

 private:
  dion::EigenBackend backend_;
};

}  // namespace dion_test
