// Shared helpers of dion's GPU tests: a per-binary error summary (the largest error seen per check,
// printed at exit so the device run's log carries the numbers), small device arrays and the shape
// lists of the op tests.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>

#include "backend_env_cuda.hpp"

namespace dion_gpu_test {

/// Throws std::runtime_error on a CUDA error (test helpers only; the library has its own checks).
inline void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
/// Test transfers use cudaMemcpy on the legacy stream, which does not wait for the backend's
/// non-blocking stream (and may return before a pageable upload has landed): every helper below
/// synchronizes the device before and after it touches device memory.
inline void device_sync(const char* what) { cuda_ok(cudaDeviceSynchronize(), what); }

/// A non-blocking stream and a CudaBackend bound to it.
struct CudaEnv {
  cudaStream_t stream = nullptr;
  std::unique_ptr<dion::CudaBackend> be;

  explicit CudaEnv(dion::CudaBackendOptions o = {}) {
    cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    be = std::make_unique<dion::CudaBackend>(stream, o);
  }
  CudaEnv(const CudaEnv&) = delete;
  CudaEnv& operator=(const CudaEnv&) = delete;
  ~CudaEnv() {
    be.reset();
    if (stream) cudaStreamDestroy(stream);
  }
  void sync() const { cuda_ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize"); }
};

/// Plain owning device allocation for test data (cudaMalloc / cudaFree).
struct DevMem {
  void* p = nullptr;
  std::size_t bytes = 0;
  DevMem() = default;
  explicit DevMem(std::size_t n) : bytes(n) {
    if (n) cuda_ok(cudaMalloc(&p, n), "cudaMalloc");
  }
  DevMem(const DevMem&) = delete;
  DevMem& operator=(const DevMem&) = delete;
  DevMem(DevMem&& o) noexcept : p(o.p), bytes(o.bytes) {
    o.p = nullptr;
    o.bytes = 0;
  }
  DevMem& operator=(DevMem&& o) noexcept {
    std::swap(p, o.p);
    std::swap(bytes, o.bytes);
    return *this;
  }
  ~DevMem() {
    if (p) cudaFree(p);
  }
};

inline float to_f(float v) { return v; }
inline float to_f(dion::bf16 v) { return static_cast<float>(v); }
template <class T>
inline T from_f(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return dion::bf16(v);
}

/// A batch of matrices with a given layout, held on the host and mirrored on the device. The padding
/// (ld > cols, batch stride > rows·ld) is filled with a sentinel so that a write outside the matrix
/// shows up as a difference.
template <class T>
struct Pair {
  std::int64_t batch = 1, rows = 0, cols = 0, ld = 0, bs = 0;
  std::vector<T> host;
  DevMem dev;

  Pair() = default;
  Pair(std::int64_t b, std::int64_t r, std::int64_t c, std::int64_t pad_ld = 0, std::int64_t pad_bs = 0)
      : batch(b), rows(r), cols(c), ld(c + pad_ld), bs(r * (c + pad_ld) + pad_bs) {
    host.assign(static_cast<std::size_t>(span()), from_f<T>(-777.0f));
    dev = DevMem(static_cast<std::size_t>(std::max<std::int64_t>(span(), 1)) * sizeof(T));
  }
  std::int64_t span() const { return batch == 0 ? 0 : (batch - 1) * bs + rows * ld; }
  T& at(std::int64_t b, std::int64_t i, std::int64_t j) { return host[static_cast<std::size_t>(b * bs + i * ld + j)]; }
  float get(std::int64_t b, std::int64_t i, std::int64_t j) const {
    return to_f(host[static_cast<std::size_t>(b * bs + i * ld + j)]);
  }
  dion::Mat<T, dion::HostSpace> h() { return {host.data(), batch, rows, cols, ld, bs}; }
  dion::Mat<T, dion::CudaSpace> d() { return {static_cast<T*>(dev.p), batch, rows, cols, ld, bs}; }
  void upload() {
    device_sync("upload");
    if (span()) cuda_ok(cudaMemcpy(dev.p, host.data(), static_cast<std::size_t>(span()) * sizeof(T), cudaMemcpyHostToDevice), "upload");
    device_sync("upload");
  }
  /// The device contents (the whole span, padding included).
  std::vector<T> download() const {
    device_sync("download");
    std::vector<T> out(static_cast<std::size_t>(span()));
    if (span()) cuda_ok(cudaMemcpy(out.data(), dev.p, out.size() * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return out;
  }
  template <class Rng>
  void randomize(Rng& rng, float scale = 1.0f) {
    std::normal_distribution<float> nd(0.0f, scale);
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t j = 0; j < cols; ++j) at(b, i, j) = from_f<T>(nd(rng));
  }
};

/// ‖a − b‖ / ‖b‖ over the matrix elements, max |a − b| and whether the padding is bit-identical.
struct Diff {
  double rel = 0, max_abs = 0;
  bool padding_equal = true;
  bool nan_mismatch = false;
};
template <class T>
Diff compare(const Pair<T>& ref, const std::vector<T>& got) {
  Diff d;
  double num = 0, den = 0;
  std::vector<char> inside(ref.host.size(), 0);
  for (std::int64_t b = 0; b < ref.batch; ++b)
    for (std::int64_t i = 0; i < ref.rows; ++i)
      for (std::int64_t j = 0; j < ref.cols; ++j) {
        const auto o = static_cast<std::size_t>(b * ref.bs + i * ref.ld + j);
        inside[o] = 1;
        const double r = to_f(ref.host[o]), g = to_f(got[o]);
        if (std::isnan(r) != std::isnan(g)) d.nan_mismatch = true;
        if (std::isnan(r) || std::isnan(g)) continue;
        num += (g - r) * (g - r);
        den += r * r;
        d.max_abs = std::max(d.max_abs, std::fabs(g - r));
      }
  for (std::size_t o = 0; o < inside.size(); ++o)
    if (!inside[o] && std::memcmp(&ref.host[o], &got[o], sizeof(T)) != 0) d.padding_equal = false;
  d.rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return d;
}

inline double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}



/// Largest error per named check, printed as a table when the binary exits.
struct ErrorTable {
  struct Row {
    double worst = 0;
    double tol = 0;
    long count = 0;
    long fails = 0;
  };
  std::map<std::string, Row> rows;
  std::mutex mu;
  void add(const std::string& name, double err, double tol) {
    std::lock_guard<std::mutex> lk(mu);
    auto& r = rows[name];
    r.worst = std::max(r.worst, err != err ? 1e300 : err);
    r.tol = tol;
    ++r.count;
    if (!(err <= tol)) ++r.fails;
  }
  ~ErrorTable() {
    if (rows.empty()) return;
    std::printf("\n%-58s %8s %12s %10s %6s\n", "check", "cases", "max error", "tolerance", "fails");
    for (const auto& [n, r] : rows)
      std::printf("%-58s %8ld %12.3e %10.1e %6ld\n", n.c_str(), r.count, r.worst, r.tol, r.fails);
    std::fflush(stdout);
  }
};
inline ErrorTable& errors() {
  static ErrorTable t;
  return t;
}

/// A device array of n elements uploaded from / downloaded to a host vector.
template <class T>
struct DevArray {
  DevMem mem;
  std::size_t n = 0;
  DevArray() = default;
  explicit DevArray(const std::vector<T>& v) : mem(std::max<std::size_t>(v.size(), 1) * sizeof(T)), n(v.size()) {
    device_sync("DevArray upload");
    if (n) cuda_ok(cudaMemcpy(mem.p, v.data(), n * sizeof(T), cudaMemcpyHostToDevice), "DevArray upload");
    device_sync("DevArray upload");
  }
  T* p() const { return static_cast<T*>(mem.p); }
  std::vector<T> get() const {
    device_sync("DevArray download");
    std::vector<T> v(n);
    if (n) cuda_ok(cudaMemcpy(v.data(), mem.p, n * sizeof(T), cudaMemcpyDeviceToHost), "DevArray download");
    return v;
  }
};

struct Layout {
  std::int64_t batch, rows, cols, pad_ld, pad_bs;
};
/// Odd shapes for element-wise ops: 1×N, N×1, primes, ld > cols, 3-D batches, rows longer than one
/// kernel tile.
inline std::vector<Layout> elementwise_layouts() {
  return {{1, 1, 33, 0, 0}, {1, 33, 1, 0, 0}, {1, 37, 53, 0, 0}, {3, 17, 29, 5, 7},
          {2, 64, 48, 16, 0}, {2, 3, 1500, 4, 0}, {5, 1, 1, 0, 0}};
}

inline std::string shape_name(const Layout& l) {
  return std::to_string(l.batch) + "x" + std::to_string(l.rows) + "x" + std::to_string(l.cols) +
         (l.pad_ld ? "+ld" + std::to_string(l.pad_ld) : "") + (l.pad_bs ? "+bs" + std::to_string(l.pad_bs) : "");
}

template <class T>
inline const char* tname() {
  return std::is_same_v<T, float> ? "f32" : "bf16";
}

}  // namespace dion_gpu_test
