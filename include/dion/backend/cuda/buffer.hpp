// Owning device allocation of the CUDA backend (its RawBuffer): cudaMalloc'd, zero-filled at
// allocation (cudaMemsetAsync on the backend's stream, then a synchronization: registration time
// only), freed on destruction, movable, not copyable.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>

#include "dion/backend/cuda/check.hpp"

namespace dion::cuda_detail {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(std::size_t bytes, cudaStream_t stream) : bytes_(bytes) {
    if (bytes == 0) return;
    void* p = nullptr;
    DION_CUDA_CHECK(cudaMalloc(&p, bytes));
    ptr_ = p;
    try {
      DION_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream));
      DION_CUDA_CHECK(cudaStreamSynchronize(stream));
    } catch (...) {
      cudaFree(p);
      ptr_ = nullptr;
      throw;
    }
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  ~DeviceBuffer() { release(); }

  void* data() const noexcept { return ptr_; }
  std::size_t bytes() const noexcept { return bytes_; }

 private:
  void release() noexcept {
    if (ptr_) cudaFree(ptr_);  // a destructor cannot throw; cudaFree fails only on a broken context
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

}  // namespace dion::cuda_detail
