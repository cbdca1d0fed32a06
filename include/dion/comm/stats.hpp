// CommStats: what a communicator has moved, counted on this rank as each collective is issued.
//
//   dion::MpiComm comm(MPI_COMM_WORLD);
//   ... opt.step(); ...
//   const dion::CommStats& s = comm.stats();
//   s.total_bytes();          // logical size of every collective issued so far (see below)
//   s.total_bus_bytes();      // what a ring implementation moves through each rank's link
//   comm.reset_stats();
//
// For every kind of collective: the number of calls and two byte counts (nccl-tests' definitions,
// so the numbers read like its "size" and "busbw" columns):
//   bytes      the operation's size S: all_reduce and broadcast the buffer (count · element size),
//              all_gather the gathered buffer (world · count · element size), reduce_scatter the
//              send buffer (world · count · element size), all_to_all the bytes this rank sends.
//   bus_bytes  the bytes a bandwidth-optimal (ring) algorithm moves through each rank's link for it:
//              all_reduce 2(W−1)/W · S, all_gather and reduce_scatter (W−1)/W · S, broadcast S,
//              all_to_all the bytes sent to the other ranks (exact, not modelled).
// Everything the communicator carries is counted, the optimizer's small agreement reductions (flags,
// hashes, gradient presence) included; they are all_reduce calls of a few bytes. Counting is a few
// integer additions per collective (no synchronization), always on.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace dion {

struct CommStats {
  enum Op : std::uint8_t { all_reduce, broadcast, all_gather, reduce_scatter, all_to_all, num_ops };
  static constexpr std::string_view op_name(Op op) {
    constexpr std::string_view names[] = {"all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all"};
    return op < num_ops ? names[op] : std::string_view("?");
  }

  std::array<std::uint64_t, num_ops> calls{};
  std::array<std::uint64_t, num_ops> bytes{};
  std::array<double, num_ops> bus_bytes{};

  std::uint64_t total_calls() const noexcept {
    std::uint64_t n = 0;
    for (auto c : calls) n += c;
    return n;
  }
  std::uint64_t total_bytes() const noexcept {
    std::uint64_t n = 0;
    for (auto b : bytes) n += b;
    return n;
  }
  double total_bus_bytes() const noexcept {
    double n = 0;
    for (auto b : bus_bytes) n += b;
    return n;
  }

  /// Record one collective of size `size_bytes` (S above) on a world of `world` ranks; all_to_all
  /// passes the bytes sent to other ranks as `off_rank_bytes`.
  void record(Op op, std::uint64_t size_bytes, int world, std::uint64_t off_rank_bytes = 0) noexcept {
    const double w = world > 0 ? static_cast<double>(world) : 1.0;
    const double s = static_cast<double>(size_bytes);
    double bus = 0;
    switch (op) {
      case all_reduce: bus = 2.0 * (w - 1.0) / w * s; break;
      case all_gather:
      case reduce_scatter: bus = (w - 1.0) / w * s; break;
      case broadcast: bus = world > 1 ? s : 0.0; break;
      case all_to_all: bus = static_cast<double>(off_rank_bytes); break;
      default: return;
    }
    ++calls[op];
    bytes[op] += size_bytes;
    bus_bytes[op] += bus;
  }
  void reset() noexcept { *this = CommStats{}; }
};

}  // namespace dion
