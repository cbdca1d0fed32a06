// The communicators an optimizer spans, as microsoft/dion names them (SPEC §2.1): `replicate`
// (data-parallel replicas: DDP / HSDP), `outer_shard` (FSDP) and `inner_shard` (tensor parallel).
// The Muon family uses one 1-D mesh (`outer_shard` if parameters are sharded, else `replicate`).
// A null pointer means that dimension has size 1.
#pragma once

#include <cstdint>

namespace dion {

template <class Comm>
struct Mesh {
  Comm* replicate = nullptr;
  Comm* outer_shard = nullptr;
  Comm* inner_shard = nullptr;
};

/// How one parameter is split across the ranks of a mesh dimension. Uneven and empty shards are
/// ordinary: `local_length` may be 0. `dim` counts from the end (-2 rows, -1 columns); 0 = unsharded.
struct ShardSpec {
  int dim = 0;                     ///< -2 (rows), -1 (columns) or 0 (not sharded)
  std::int64_t global_length = 0;  ///< size of the sharded dim in the global tensor
  std::int64_t offset = 0;         ///< first global index this rank holds
  std::int64_t local_length = 0;   ///< how many this rank holds
  bool sharded() const noexcept { return dim != 0; }
};

}  // namespace dion
