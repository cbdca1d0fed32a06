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
/// The registered view is the local piece; the global shape is the view's shape with dim `dim`
/// replaced by `global_length`. Matrices (Muon family, Dion) may be sharded along rows (-2) over the
/// optimizer's shard communicator (Muon family: its one mesh; Dion: Mesh::outer_shard), with the
/// shards tiling the rows contiguously in rank order (FSDP's chunking: rank r holds
/// [offset, offset + local_length), offsets increasing with r); every rank's (offset, length) is
/// gathered and checked at registration. Lion / AdamW parameters accept any sharding (element-wise).
struct ShardSpec {
  int dim = 0;                     ///< -2 (rows), -1 (columns) or 0 (not sharded)
  std::int64_t global_length = 0;  ///< size of the sharded dim in the global tensor
  std::int64_t offset = 0;         ///< first global index this rank holds
  std::int64_t local_length = 0;   ///< how many this rank holds
  bool sharded() const noexcept { return dim != 0; }
};

}  // namespace dion
