// The single-process communicator: world size 1, every collective a no-op that the compiler folds away.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dion {

/// Reduction of an all-reduce.
enum class ReduceOp : std::uint8_t { sum, avg, max, min };

/// One process, no communication. The default communicator of every optimizer.
struct SingleProcess {
  using Space = void;  ///< works with every backend's memory
  static constexpr bool distributed = false;
  int rank() const noexcept { return 0; }
  int size() const noexcept { return 1; }
  /// Agreement of all ranks on a local flag (any rank false → all false): trivially the flag.
  bool all_agree(bool ok) const noexcept { return ok; }
  /// Hash agreement at construction: nothing to compare with.
  bool same_everywhere(std::uint64_t) const noexcept { return true; }
  template <class T>
  void all_reduce(T*, std::size_t, ReduceOp) {}
  template <class T>
  void broadcast(T*, std::size_t, int) {}
};

}  // namespace dion
