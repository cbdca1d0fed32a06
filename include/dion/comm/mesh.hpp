// The communicators an optimizer spans, as microsoft/dion names them (SPEC §2.1): `replicate`
// (data-parallel replicas: DDP / HSDP), `outer_shard` (FSDP) and `inner_shard` (tensor parallel).
// The Muon family uses one 1-D mesh (`outer_shard` if parameters are sharded, else `replicate`).
// Dion takes any product of the three (DDP, FSDP, HSDP = replicate × outer, TP, FSDP+TP = outer ×
// inner, and all three): the communicators must be distinct and each group of one dimension must
// hold exactly one rank of every other dimension (checked at construction: InvalidArgument).
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

/// How one parameter is split across the ranks of one mesh dimension. Uneven and empty shards are
/// ordinary: `local_length` may be 0. `dim` counts from the end (-2 rows, -1 columns); 0 = unsharded.
/// The registered view is the local piece; the global shape is the view's shape with dim `dim`
/// replaced by `global_length`. The shards tile the dim contiguously in rank order of that
/// dimension's communicator (FSDP's chunking: rank k holds [offset, offset + local_length), offsets
/// increasing with k); every rank's (offset, length) is gathered and checked at registration.
///
/// `GroupRef::add(name, param, grad, shard, inner)` takes two of them:
/// * `shard`, over the optimizer's shard communicator. Muon family: its one mesh; Muon and Dion2
///   rows (-2) or columns (-1; Dion2 then selects columns), NorMuon and NorDion2 rows only (their
///   neuron normalization needs whole rows: NotSupported). Dion: Mesh::outer_shard (FSDP), rows
///   (-2) or columns (-1).
/// * `inner` (Dion only; default: not sharded), over Mesh::inner_shard (tensor parallel), rows or
///   columns. With both, each shards a different dim (a 2-D block: e.g. rows over inner, columns
///   over outer); on a 2-D mesh every group must cut its dim the same way.
/// Dion's orientation follows the sharding (SPEC §1.5): rows over inner or columns over outer →
/// B = M; rows over outer or columns over inner → B = Mᵀ (one process: B = Mᵀ iff m < n; the result
/// equals one process's up to summation order when the orientations agree). Lion / AdamW parameters
/// accept any sharding (element-wise; in Dion with Mesh::replicate, only over outer/inner).
///
/// Examples for a global m × n matrix, this rank holding rows [a, b) and columns [c, d):
///   FSDP rows:        add(name, x, g, {.dim = -2, .global_length = m, .offset = a, .local_length = b - a})
///   TP rows only:     add(name, x, g, {}, {.dim = -2, .global_length = m, .offset = a, .local_length = b - a})
///   2-D (TP rows, FSDP columns):
///                     add(name, x, g, {.dim = -1, .global_length = n, .offset = c, .local_length = d - c},
///                                     {.dim = -2, .global_length = m, .offset = a, .local_length = b - a})
struct ShardSpec {
  int dim = 0;                     ///< -2 (rows), -1 (columns) or 0 (not sharded)
  std::int64_t global_length = 0;  ///< size of the sharded dim in the global tensor
  std::int64_t offset = 0;         ///< first global index this rank holds
  std::int64_t local_length = 0;   ///< how many this rank holds
  bool sharded() const noexcept { return dim != 0; }
};

}  // namespace dion
