// What an algorithm's step sees of the optimizer: the backend, the group's options and lr/wd scalars
// (in backend memory, so a captured CUDA graph re-reads them), the chunk of same-shape matrices, the
// parameters with their state, and the workspace carved for this chunk.
#pragma once

#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "dion/core/concepts.hpp"
#include "dion/core/geometry.hpp"
#include "dion/core/options.hpp"
#include "dion/core/view.hpp"

namespace dion::detail {

/// True for a communicator type that really communicates (not void, not SingleProcess).
template <class C>
inline constexpr bool is_distributed_v = [] {
  if constexpr (std::is_void_v<C>) return false;
  else return static_cast<bool>(C::distributed);
}();

template <class Backend, class ParamRec, class Chunk, class Comm = void>
struct StepContext {
  using comm_type = Comm;
  Backend& be;
  const Options& o;
  const Chunk& chunk;
  std::span<const Slot> slots;
  std::vector<ParamRec>& params;
  const float* lr;  ///< backend memory
  const float* wd;  ///< backend memory
  char* workspace;  ///< backend memory, at least the chunk's planned bytes
  std::int64_t group_step;
  std::vector<std::uint64_t>& streams;  ///< host scratch, one per matrix of the chunk
  // Distributed variants (nullptr / false: single process, or a mesh dimension of size 1)
  Comm* comm = nullptr;              ///< Muon family: the 1-D mesh; Dion: the replicate communicator
  const std::int64_t* offs = nullptr;  ///< sharded chunk: first row of every rank, then the global rows
  bool grad_sync = false;            ///< Dion: replicate_mesh_grad_sync
  // Dion: the group's count of steps taken, in backend memory (keys the sketch randomness on the
  // device, so a skipped step or a graph replay keys it right), and the group's step() calls as the
  // host counts them, skipped ones included (the CQR warm-up: a host decision, taken without
  // reading the device's skip counter, the same on every backend)
  const float* step_dev = nullptr;
  std::int64_t step_calls = 0;
};

/// Merges the operations issued while it lives into fewer launches on a batching backend (a no-op
/// on the others). The contract for what runs inside one scope: operations on different matrices
/// are independent, and an operation issued on a matrix may depend only on operations of *other
/// kinds* issued on that matrix before it (e.g. decay then scatter of one X). Operations that a
/// backend cannot merge run in program order after everything pending. End the scope with
/// finish(); a scope left by an exception drops what it has not launched.
template <class B>
class BatchScope {
 public:
  explicit BatchScope(B& be) : be_(be) {
    if constexpr (BatchingBackend<B>) be_.begin_batch();
  }
  BatchScope(const BatchScope&) = delete;
  BatchScope& operator=(const BatchScope&) = delete;
  void finish() {
    if (done_) return;
    done_ = true;
    if constexpr (BatchingBackend<B>) be_.end_batch();
  }
  ~BatchScope() {
    if constexpr (BatchingBackend<B>) {
      if (!done_) be_.abandon_batch();
    }
  }

 private:
  B& be_;
  bool done_ = false;
};

/// Bump allocator over the workspace (256-byte aligned carving, no allocation).
struct Carver {
  char* base;
  std::int64_t off = 0;
  template <class T>
  T* take(std::int64_t n) {
    off = (off + 255) / 256 * 256;
    T* p = reinterpret_cast<T*>(base + off);
    off += n * static_cast<std::int64_t>(sizeof(T));
    return p;
  }
};

}  // namespace dion::detail
