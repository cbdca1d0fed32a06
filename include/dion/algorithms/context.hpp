// What an algorithm's step sees of the optimizer: the backend, the group's options and lr/wd scalars
// (in backend memory, so a captured CUDA graph re-reads them), the chunk of same-shape matrices, the
// parameters with their state, and the workspace carved for this chunk.
#pragma once

#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

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
