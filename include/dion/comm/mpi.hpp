// MpiComm: collectives over a user's MPI communicator, for CPU clusters (target dion::mpi).
// The user's communicator is duplicated (MPI_Comm_dup) and only the duplicate gets dion's error
// handler (MPI_ERRORS_RETURN), so the user's own error handling is never changed. Every collective is
// issued non-blocking and polled against a deadline: a rank that stops participating turns into
// dion::CommTimeout on the others instead of a hang, and the communicator is poisoned (every later
// call throws CommPoisoned) because a started MPI collective cannot be cancelled.
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "dion/comm/single.hpp"
#include "dion/comm/stats.hpp"
#include "dion/core/error.hpp"
#include "dion/core/view.hpp"

namespace dion {

namespace detail {
template <class T>
MPI_Datatype mpi_type() {
  if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
  else if constexpr (std::is_same_v<T, double>) return MPI_DOUBLE;
  else if constexpr (std::is_same_v<T, int>) return MPI_INT;
  else if constexpr (std::is_same_v<T, std::int64_t>) return MPI_INT64_T;
  else if constexpr (std::is_same_v<T, std::uint64_t>) return MPI_UINT64_T;
  else if constexpr (std::is_same_v<T, bf16>) return MPI_UINT16_T;  // moved, never reduced
  else static_assert(sizeof(T) == 0, "MpiComm: unsupported element type");
}
inline MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
    case ReduceOp::avg: return MPI_SUM;
    case ReduceOp::max: return MPI_MAX;
    case ReduceOp::min: return MPI_MIN;
  }
  return MPI_SUM;
}
inline std::string mpi_error_string(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, buf, &len);
  return std::string(buf, static_cast<std::size_t>(len));
}
}  // namespace detail

/// A communicator over MPI (host memory). Move-only; frees its duplicate on destruction.
class MpiComm {
 public:
  using Space = HostSpace;
  static constexpr bool distributed = true;

  /// Duplicate `user` (which stays untouched) and give the duplicate MPI_ERRORS_RETURN.
  /// `timeout`: deadline of every collective (default 300 s).
  explicit MpiComm(MPI_Comm user, std::chrono::milliseconds timeout = std::chrono::seconds(300)) : timeout_(timeout) {
    int init = 0;
    MPI_Initialized(&init);
    DION_CHECK(init, InvalidArgument, "MpiComm: MPI is not initialized (call MPI_Init first)");
    check(MPI_Comm_dup(user, &comm_), "MPI_Comm_dup");
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;
  MpiComm(MpiComm&& o) noexcept { swap(o); }
  MpiComm& operator=(MpiComm&& o) noexcept {
    swap(o);
    return *this;
  }
  ~MpiComm() {
    int fin = 0;
    MPI_Finalized(&fin);
    // A poisoned communicator may still have a collective in flight: freeing it could block, so it
    // is leaked deliberately (the process is expected to abort or restart).
    if (comm_ != MPI_COMM_NULL && !fin && !poisoned_) MPI_Comm_free(&comm_);
  }

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  MPI_Comm native() const noexcept { return comm_; }
  bool poisoned() const noexcept { return poisoned_; }
  std::chrono::milliseconds timeout() const noexcept { return timeout_; }
  void set_timeout(std::chrono::milliseconds t) { timeout_ = t; }
  /// Collectives issued so far (the sequence number reported on a timeout).
  std::uint64_t sequence() const noexcept { return seq_; }
  /// Calls and bytes of every collective issued on this rank so far (comm/stats.hpp).
  const CommStats& stats() const noexcept { return stats_; }
  void reset_stats() noexcept { stats_.reset(); }

  /// True on every rank iff `ok` is true on every rank.
  bool all_agree(bool ok) {
    int v = ok ? 1 : 0;
    all_reduce(&v, 1, ReduceOp::min);
    return v == 1;
  }
  /// True on every rank iff every rank passed the same value.
  bool same_everywhere(std::uint64_t h) {
    std::uint64_t mn = h, mx = h;
    all_reduce(&mn, 1, ReduceOp::min);
    all_reduce(&mx, 1, ReduceOp::max);
    return mn == mx;
  }

  template <class T>
  void all_reduce(T* data, std::size_t count, ReduceOp op) {
    static_assert(!std::is_same_v<T, bf16>, "MpiComm: bf16 is moved, never reduced (reduce in float)");
    if (count == 0) {
      barrier_like();
      return;
    }
    MPI_Request req;
    start(MPI_Iallreduce(MPI_IN_PLACE, data, as_int(count), detail::mpi_type<T>(), detail::mpi_op(op), comm_, &req),
          "MPI_Iallreduce");
    stats_.record(CommStats::all_reduce, count * sizeof(T), size_);
    wait(req, "all_reduce", count * sizeof(T));
    if (op == ReduceOp::avg) {
      if constexpr (std::is_floating_point_v<T>)
        for (std::size_t i = 0; i < count; ++i) data[i] /= static_cast<T>(size_);
    }
  }
  template <class T>
  void broadcast(T* data, std::size_t count, int root) {
    MPI_Request req;
    start(MPI_Ibcast(data, as_int(count), detail::mpi_type<T>(), root, comm_, &req), "MPI_Ibcast");
    stats_.record(CommStats::broadcast, count * sizeof(T), size_);
    wait(req, "broadcast", count * sizeof(T));
  }
  /// recv (size·count elements) ← every rank's `count` elements of send, in rank order.
  template <class T>
  void all_gather(const T* send, T* recv, std::size_t count) {
    MPI_Request req;
    start(MPI_Iallgather(send, as_int(count), detail::mpi_type<T>(), recv, as_int(count), detail::mpi_type<T>(), comm_,
                         &req),
          "MPI_Iallgather");
    stats_.record(CommStats::all_gather, count * sizeof(T) * static_cast<std::size_t>(size_), size_);
    wait(req, "all_gather", count * sizeof(T) * static_cast<std::size_t>(size_));
  }
  /// In place: buf holds size·count elements; this rank's block (at rank·count) is sent, every
  /// other block is overwritten with that rank's block.
  template <class T>
  void all_gather_inplace(T* buf, std::size_t count) {
    MPI_Request req;
    start(MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, as_int(count), detail::mpi_type<T>(), comm_, &req),
          "MPI_Iallgather");
    stats_.record(CommStats::all_gather, count * sizeof(T) * static_cast<std::size_t>(size_), size_);
    wait(req, "all_gather", count * sizeof(T) * static_cast<std::size_t>(size_));
  }
  /// recv (count) ← the sum over ranks of block `rank` of send (size·count elements).
  template <class T>
  void reduce_scatter(const T* send, T* recv, std::size_t count, ReduceOp op) {
    static_assert(!std::is_same_v<T, bf16>, "MpiComm: bf16 is moved, never reduced (reduce in float)");
    MPI_Request req;
    start(MPI_Ireduce_scatter_block(send, recv, as_int(count), detail::mpi_type<T>(), detail::mpi_op(op), comm_, &req),
          "MPI_Ireduce_scatter_block");
    stats_.record(CommStats::reduce_scatter, count * sizeof(T) * static_cast<std::size_t>(size_), size_);
    wait(req, "reduce_scatter", count * sizeof(T) * static_cast<std::size_t>(size_));
    if (op == ReduceOp::avg) {
      if constexpr (std::is_floating_point_v<T>)
        for (std::size_t i = 0; i < count; ++i) recv[i] /= static_cast<T>(size_);
    }
  }
  /// Personalized exchange with per-rank counts and displacements (in elements); uneven and empty
  /// blocks are ordinary.
  template <class T>
  void all_to_all_v(const T* send, const std::vector<int>& send_counts, const std::vector<int>& send_displs, T* recv,
                    const std::vector<int>& recv_counts, const std::vector<int>& recv_displs) {
    DION_CHECK(static_cast<int>(send_counts.size()) == size_ && static_cast<int>(recv_counts.size()) == size_,
               InvalidArgument, "all_to_all_v: count vectors must have ", size_, " entries");
    MPI_Request req;
    start(MPI_Ialltoallv(send, send_counts.data(), send_displs.data(), detail::mpi_type<T>(), recv, recv_counts.data(),
                         recv_displs.data(), detail::mpi_type<T>(), comm_, &req),
          "MPI_Ialltoallv");
    std::size_t bytes = 0;
    for (int c : send_counts) bytes += static_cast<std::size_t>(c) * sizeof(T);
    stats_.record(CommStats::all_to_all, bytes, size_,
                  bytes - static_cast<std::size_t>(send_counts[static_cast<std::size_t>(rank_)]) * sizeof(T));
    wait(req, "all_to_all_v", bytes);
  }

 private:
  void swap(MpiComm& o) noexcept {
    std::swap(comm_, o.comm_);
    std::swap(rank_, o.rank_);
    std::swap(size_, o.size_);
    std::swap(timeout_, o.timeout_);
    std::swap(poisoned_, o.poisoned_);
    std::swap(seq_, o.seq_);
    std::swap(stats_, o.stats_);
  }
  static int as_int(std::size_t n) {
    DION_CHECK(n <= static_cast<std::size_t>(INT32_MAX), InvalidArgument, "MpiComm: count ", n,
               " exceeds MPI's int range; split the buffer");
    return static_cast<int>(n);
  }
  void check(int rc, const char* api) const {
    if (rc != MPI_SUCCESS)
      throw MpiError(detail::concat("MpiComm: ", api, " failed: ", detail::mpi_error_string(rc)), rank_);
  }
  void start(int rc, const char* api) {
    DION_CHECK(!poisoned_, CommPoisoned, "MpiComm: an earlier collective failed or timed out on rank ", rank_,
               "; rebuild the communicator (and reload a checkpoint) before communicating again");
    ++seq_;
    if (rc != MPI_SUCCESS) {
      poisoned_ = true;
      check(rc, api);
    }
  }
  void barrier_like() {
    int dummy = 0;
    all_reduce(&dummy, 1, ReduceOp::sum);
  }
  void wait(MPI_Request& req, const char* op, std::size_t bytes) {
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    int done = 0;
    for (int spin = 0;; ++spin) {
      MPI_Status st;
      const int rc = MPI_Test(&req, &done, &st);
      if (rc != MPI_SUCCESS) {
        poisoned_ = true;
        check(rc, "MPI_Test");
      }
      if (done) return;
      if (std::chrono::steady_clock::now() > deadline) {
        poisoned_ = true;
        throw CommTimeout(detail::concat("MpiComm: ", op, " #", seq_, " (", bytes, " bytes) did not complete within ",
                                         timeout_.count(), " ms on rank ", rank_, " of ", size_,
                                         "; another rank stopped participating. The communicator is poisoned."),
                          rank_);
      }
      if (spin > 64) std::this_thread::sleep_for(std::chrono::microseconds(spin > 4096 ? 200 : 20));
    }
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  std::chrono::milliseconds timeout_{300000};
  bool poisoned_ = false;
  std::uint64_t seq_ = 0;
  CommStats stats_;
};

}  // namespace dion
