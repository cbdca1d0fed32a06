// NcclComm: collectives over a user's NCCL communicator and CUDA stream, for GPU clusters (target
// dion::nccl). The communicator and the stream are borrowed, never created or destroyed here.
//
// Failure model (RELIABILITY.md §1.5): create the ncclComm_t non-blocking (ncclConfig_t::blocking = 0,
// NCCL >= 2.14). Every call is then issued and polled with ncclCommGetAsyncError until it leaves
// ncclInProgress; an error, or the deadline passing while a call is in progress or while a result
// that the host needs is pending on the stream, aborts the communicator (ncclCommAbort), poisons
// this object (every later call throws CommPoisoned) and throws NcclError / CommTimeout. With a
// blocking communicator the same code works, but a stuck peer blocks inside NCCL.
//
// Collectives are enqueued on the stream and not waited for (step() does no host synchronization),
// except all_agree / same_everywhere, whose result the host reads (used at registration and at the
// start of step()), and wait(), which waits for everything enqueued so far, with the deadline.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "dion/comm/single.hpp"
#include "dion/comm/stats.hpp"
#include "dion/core/bf16.hpp"
#include "dion/core/error.hpp"
#include "dion/core/view.hpp"

#if !defined(NCCL_VERSION_CODE) || NCCL_VERSION_CODE < 21400
#error "dion::NcclComm needs NCCL >= 2.14 (non-blocking communicators, ncclAvg, ncclBfloat16)"
#endif

namespace dion {

namespace detail {
template <class T>
ncclDataType_t nccl_type() {
  if constexpr (std::is_same_v<T, float>) return ncclFloat32;
  else if constexpr (std::is_same_v<T, double>) return ncclFloat64;
  else if constexpr (std::is_same_v<T, bf16>) return ncclBfloat16;
  else if constexpr (std::is_same_v<T, int>) return ncclInt32;
  else if constexpr (std::is_same_v<T, std::int64_t>) return ncclInt64;
  else if constexpr (std::is_same_v<T, std::uint64_t>) return ncclUint64;
  else static_assert(sizeof(T) == 0, "NcclComm: unsupported element type");
}
inline ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return ncclSum;
    case ReduceOp::avg: return ncclAvg;
    case ReduceOp::max: return ncclMax;
    case ReduceOp::min: return ncclMin;
  }
  return ncclSum;
}
}  // namespace detail

/// A communicator over NCCL (device memory, the user's stream). Move-only; borrows its handles.
class NcclComm {
 public:
  using Space = CudaSpace;
  static constexpr bool distributed = true;
  static constexpr bool reduces_bf16 = true;  ///< NCCL reduces bf16 buffers itself

  /// Borrow `comm` (preferably created with ncclConfig_t::blocking = 0) and `stream`.
  /// `timeout`: deadline of every call and of every wait for a result (default 300 s).
  NcclComm(ncclComm_t comm, cudaStream_t stream, std::chrono::milliseconds timeout = std::chrono::seconds(300))
      : comm_(comm), stream_(stream), timeout_(timeout) {
    DION_CHECK(comm != nullptr, InvalidArgument, "NcclComm: the ncclComm_t is null");
    check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
    check(ncclCommCount(comm_, &size_), "ncclCommCount");
    reserve_host_staging(64);
  }
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;
  NcclComm(NcclComm&& o) noexcept { swap(o); }
  NcclComm& operator=(NcclComm&& o) noexcept {
    swap(o);
    return *this;
  }
  ~NcclComm() {
    if (scratch_ && !poisoned_) cudaFree(scratch_);  // a poisoned stream may still use it: leaked
  }

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  ncclComm_t native() const noexcept { return comm_; }
  cudaStream_t stream() const noexcept { return stream_; }
  bool poisoned() const noexcept { return poisoned_; }
  std::chrono::milliseconds timeout() const noexcept { return timeout_; }
  void set_timeout(std::chrono::milliseconds t) { timeout_ = t; }
  std::uint64_t sequence() const noexcept { return seq_; }
  /// Calls and bytes of every collective issued on this rank so far (comm/stats.hpp); counted when
  /// the collective is enqueued.
  const CommStats& stats() const noexcept { return stats_; }
  void reset_stats() noexcept { stats_.reset(); }

  /// True on every rank iff `ok` is true on every rank (waits for the result, with the deadline).
  bool all_agree(bool ok) {
    int v = ok ? 1 : 0;
    host_reduce(&v, 1, ReduceOp::min, "all_agree");
    return v == 1;
  }
  /// True on every rank iff every rank passed the same value.
  bool same_everywhere(std::uint64_t h) {
    std::uint64_t mn = h, mx = h;
    host_reduce(&mn, 1, ReduceOp::min, "same_everywhere");
    host_reduce(&mx, 1, ReduceOp::max, "same_everywhere");
    return mn == mx;
  }

  /// In place on `count` elements of device memory, enqueued on the stream.
  template <class T>
  void all_reduce(T* data, std::size_t count, ReduceOp op) {
    stats_.record(CommStats::all_reduce, count * sizeof(T), size_);
    issue(ncclAllReduce(data, data, count, detail::nccl_type<T>(), detail::nccl_op(op), comm_, stream_),
          "ncclAllReduce");
  }
  template <class T>
  void broadcast(T* data, std::size_t count, int root) {
    stats_.record(CommStats::broadcast, count * sizeof(T), size_);
    issue(ncclBroadcast(data, data, count, detail::nccl_type<T>(), root, comm_, stream_), "ncclBroadcast");
  }
  /// recv (size·count) ← every rank's `count` elements of send, in rank order.
  template <class T>
  void all_gather(const T* send, T* recv, std::size_t count) {
    stats_.record(CommStats::all_gather, count * sizeof(T) * static_cast<std::size_t>(size_), size_);
    issue(ncclAllGather(send, recv, count, detail::nccl_type<T>(), comm_, stream_), "ncclAllGather");
  }
  /// In place: this rank's block sits at buf + rank·count (NCCL's in-place all-gather).
  template <class T>
  void all_gather_inplace(T* buf, std::size_t count) {
    stats_.record(CommStats::all_gather, count * sizeof(T) * static_cast<std::size_t>(size_), size_);
    issue(ncclAllGather(buf + static_cast<std::size_t>(rank_) * count, buf, count, detail::nccl_type<T>(), comm_,
                        stream_),
          "ncclAllGather");
  }
  /// recv (count) ← reduction over ranks of block `rank` of send (size·count elements).
  template <class T>
  void reduce_scatter(const T* send, T* recv, std::size_t count, ReduceOp op) {
    stats_.record(CommStats::reduce_scatter, count * sizeof(T) * static_cast<std::size_t>(size_), size_);
    issue(ncclReduceScatter(send, recv, count, detail::nccl_type<T>(), detail::nccl_op(op), comm_, stream_),
          "ncclReduceScatter");
  }
  /// Personalized exchange (counts and displacements in elements), as grouped point-to-point calls.
  template <class T>
  void all_to_all_v(const T* send, const std::vector<int>& send_counts, const std::vector<int>& send_displs, T* recv,
                    const std::vector<int>& recv_counts, const std::vector<int>& recv_displs) {
    DION_CHECK(static_cast<int>(send_counts.size()) == size_ && static_cast<int>(recv_counts.size()) == size_ &&
                   static_cast<int>(send_displs.size()) == size_ && static_cast<int>(recv_displs.size()) == size_,
               InvalidArgument, "NcclComm::all_to_all_v: count and displacement vectors must have ", size_,
               " entries");
    DION_CHECK(!poisoned_, CommPoisoned, poisoned_message());
    ++seq_;
    const auto t = detail::nccl_type<T>();
    begin_call("ncclGroupStart", ncclGroupStart());
    for (int i = 0; i < size_; ++i) {
      const auto u = static_cast<std::size_t>(i);
      if (send_counts[u] > 0)
        begin_call("ncclSend", ncclSend(send + send_displs[u], static_cast<std::size_t>(send_counts[u]), t, i, comm_,
                                        stream_));
      if (recv_counts[u] > 0)
        begin_call("ncclRecv", ncclRecv(recv + recv_displs[u], static_cast<std::size_t>(recv_counts[u]), t, i, comm_,
                                        stream_));
    }
    finish("all_to_all_v", ncclGroupEnd());
    std::size_t bytes = 0;
    for (int c : send_counts) bytes += static_cast<std::size_t>(c) * sizeof(T);
    stats_.record(CommStats::all_to_all, bytes, size_,
                  bytes - static_cast<std::size_t>(send_counts[static_cast<std::size_t>(rank_)]) * sizeof(T));
  }

  /// Wait (with the deadline) until everything enqueued on the stream so far has completed.
  void wait() { wait_stream("wait"); }

  // Collectives on host buffers (the optimizer's agreement on gradient presence and shard layouts):
  // staged through device scratch and waited for. The optimizer reserves the scratch at
  // registration, so step() does not allocate.
  void reserve_host_staging(std::size_t bytes) {
    if (bytes <= scratch_bytes_) return;
    if (scratch_) cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    if (scratch_) cudaFree(scratch_);
    scratch_ = nullptr;
    scratch_bytes_ = 0;
    cuda_check(cudaMalloc(&scratch_, bytes), "cudaMalloc");
    scratch_bytes_ = bytes;
  }
  template <class T>
  void host_all_reduce(T* v, std::size_t n, ReduceOp op) {
    host_reduce(v, n, op, "host_all_reduce");
  }
  template <class T>
  void host_all_gather(const T* send, T* recv, std::size_t count) {
    DION_CHECK(!poisoned_, CommPoisoned, poisoned_message());
    reserve_host_staging(count * sizeof(T) * static_cast<std::size_t>(size_ + 1));
    T* d = static_cast<T*>(scratch_);
    cuda_check(cudaMemcpyAsync(d + static_cast<std::size_t>(rank_) * count, send, count * sizeof(T),
                               cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync");
    all_gather_inplace(d, count);
    cuda_check(cudaMemcpyAsync(recv, d, count * sizeof(T) * static_cast<std::size_t>(size_), cudaMemcpyDeviceToHost,
                               stream_),
               "cudaMemcpyAsync");
    wait_stream("host_all_gather");
  }

 private:
  void swap(NcclComm& o) noexcept {
    std::swap(comm_, o.comm_);
    std::swap(stream_, o.stream_);
    std::swap(rank_, o.rank_);
    std::swap(size_, o.size_);
    std::swap(timeout_, o.timeout_);
    std::swap(poisoned_, o.poisoned_);
    std::swap(seq_, o.seq_);
    std::swap(stats_, o.stats_);
    std::swap(scratch_, o.scratch_);
    std::swap(scratch_bytes_, o.scratch_bytes_);
  }
  std::string poisoned_message() const {
    return detail::concat("NcclComm: an earlier call failed or timed out on rank ", rank_,
                          "; the communicator was aborted: rebuild it (and reload a checkpoint)");
  }
  void check(ncclResult_t r, const char* api) const {
    if (r != ncclSuccess && r != ncclInProgress)
      throw NcclError(detail::concat("NcclComm: ", api, " failed: ", ncclGetErrorString(r), " (",
                                     ncclGetLastError(comm_), ")"),
                      rank_);
  }
  void cuda_check(cudaError_t e, const char* api) const {
    if (e != cudaSuccess)
      throw CudaError(detail::concat("NcclComm: ", api, " failed: ", cudaGetErrorString(e)), rank_);
  }
  /// Abort the communicator and throw: after an error nothing enqueued can be trusted (NCCL's model).
  [[noreturn]] void fail(const std::string& msg, bool timeout) {
    poisoned_ = true;
    ncclCommAbort(comm_);
    if (timeout) throw CommTimeout(msg, rank_);
    throw NcclError(msg, rank_);
  }
  void begin_call(const char* api, ncclResult_t r) {
    if (r != ncclSuccess && r != ncclInProgress)
      fail(detail::concat("NcclComm: ", api, " #", seq_, " failed on rank ", rank_, ": ", ncclGetErrorString(r)),
           false);
  }
  /// A call returned: poll the communicator until it leaves ncclInProgress (non-blocking mode).
  void finish(const char* op, ncclResult_t r) {
    begin_call(op, r);
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    for (int spin = 0;; ++spin) {
      ncclResult_t st = ncclSuccess;
      const ncclResult_t q = ncclCommGetAsyncError(comm_, &st);
      if (q != ncclSuccess) st = q;
      if (st == ncclSuccess) return;
      if (st != ncclInProgress)
        fail(detail::concat("NcclComm: ", op, " #", seq_, " failed on rank ", rank_, ": ", ncclGetErrorString(st)),
             false);
      if (std::chrono::steady_clock::now() > deadline)
        fail(detail::concat("NcclComm: ", op, " #", seq_, " was still in progress after ", timeout_.count(),
                            " ms on rank ", rank_, " of ", size_, "; the communicator was aborted"),
             true);
      if (spin > 64) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  void issue(ncclResult_t r, const char* op) {
    DION_CHECK(!poisoned_, CommPoisoned, poisoned_message());
    ++seq_;
    finish(op, r);
  }
  /// Wait for the stream with the deadline, watching for asynchronous NCCL errors.
  void wait_stream(const char* op) {
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    for (int spin = 0;; ++spin) {
      const cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) return;
      if (e != cudaErrorNotReady) {
        poisoned_ = true;
        cuda_check(e, "cudaStreamQuery");
      }
      ncclResult_t st = ncclSuccess;
      ncclCommGetAsyncError(comm_, &st);
      if (st != ncclSuccess && st != ncclInProgress)
        fail(detail::concat("NcclComm: ", op, " #", seq_, ": asynchronous NCCL error on rank ", rank_, ": ",
                            ncclGetErrorString(st)),
             false);
      if (std::chrono::steady_clock::now() > deadline)
        fail(detail::concat("NcclComm: ", op, " #", seq_, " did not complete within ", timeout_.count(),
                            " ms on rank ", rank_, " of ", size_,
                            "; another rank stopped participating. The communicator was aborted"),
             true);
      if (spin > 64) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  /// A reduction whose result the host needs: through the device scratch, waited for.
  template <class T>
  void host_reduce(T* v, std::size_t n, ReduceOp op, const char* what) {
    DION_CHECK(!poisoned_, CommPoisoned, poisoned_message());
    reserve_host_staging(n * sizeof(T));
    T* d = static_cast<T*>(scratch_);
    cuda_check(cudaMemcpyAsync(d, v, n * sizeof(T), cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
    all_reduce(d, n, op);
    cuda_check(cudaMemcpyAsync(v, d, n * sizeof(T), cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync");
    wait_stream(what);
  }

  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
  std::chrono::milliseconds timeout_{300000};
  bool poisoned_ = false;
  std::uint64_t seq_ = 0;
  CommStats stats_;
  void* scratch_ = nullptr;
  std::size_t scratch_bytes_ = 0;
};

}  // namespace dion
