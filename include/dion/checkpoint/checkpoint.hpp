// Checkpoints of a whole optimizer: save, validate, load, reshard (SPEC.md §2.6, §4; RELIABILITY.md
// §1.7, C1–C18).
//
//   dion::checkpoint::save(opt, "ckpt/step-1000");   // a directory; collective when `opt` is distributed
//   dion::checkpoint::load(opt2, "ckpt/step-1000");  // opt2 built with the same parameters and groups,
//                                                    // at any world size and layout (resharding)
//
// What is saved: every state tensor by its stable name "<param>/<key>" (momentum, variance_neuron,
// Q, variance, step_dev) in its own dtype (F32 or BF16, raw bits), the step counter of every group,
// every group's algorithm and hyperparameters, the generator seed, the skipped-step counter, the
// optimizer's identity (default algorithm) and the layout (world size, rank, each parameter's shard
// description and, for sharded state, each tensor's place in its global tensor).
//
// Directory layout (format "dion.checkpoint" 1.x):
//   <dir>/rank-<r>-of-<W>.safetensors   one file per rank (r, W: 5 digits), readable by Python's
//                                       `safetensors`; rank-00000-of-00001 for a single process
//   <dir>/manifest.json                 written last, by rank 0: the commit point
// A rank file's `__metadata__` holds "format" = "dion.checkpoint", "format_version" = "1.0" or
// "1.1", "dion.state" (a JSON document: optimizer, layout, groups, counters, parameters and one entry
// per tensor) and "dion.state.crc32c" (the checksum of that JSON). The manifest lists every rank file
// with its size and a CRC32C of the whole file, so a flipped bit anywhere (header or payload) is
// detected; the per-tensor checksums then name the damaged entry.
// Checksum: CRC32C (Castagnoli, reflected polynomial 0x82F63B78, init and final xor 0xFFFFFFFF; the
// check value of "123456789" is 0xE3069283), written as 8 lowercase hex digits. CRC32C detects
// corruption, not tampering; the parser is memory-safe on any input regardless (fuzzed: tests/fuzz).
//
// Distributed optimizers (a Comm with `distributed == true`): the world is every rank of the
// optimizer's mesh (replicate x outer_shard x inner_shard, those present: DDP, FSDP, HSDP, TP, FSDP x
// TP, ...), numbered rank = ((c0 * W1) + c1) * W2 + c2 from the rank in each (a product mesh, checked
// by the engine at construction). save() and load() are collective: call them on every rank with the
// same directory (checked: InvalidArgument on every rank otherwise), which must be on a filesystem
// every rank sees (shared or, on one host, local). Each rank writes its own file,
// "rank-<r>-of-<W>.safetensors":
//  * a state tensor cut over some mesh dimensions (FSDP rows or columns, TP blocks, Dion's Q rows
//    over outer_shard and its r columns over inner_shard, element-wise Lion/AdamW shards; uneven and
//    empty pieces included) is written as its local piece. Its entry in dion.state.tensors then
//    carries "shard": {"offsets": [...], "global_shape": [...]}: the piece is the global tensor's box
//    [offsets[k], offsets[k] + local_shape[k]) in every dim k;
//  * over every mesh dimension a tensor is not cut over, its ranks hold the same piece (replicas:
//    DDP, the replicate dimension of HSDP, unsharded parameters): the rank with coordinate 0 there
//    writes it, so each piece is stored once and fully replicated state only in rank 0's file. Dion's
//    replicas can differ under compressed synchronization (SPEC §2.6): save() therefore first calls
//    opt.synchronize_for_checkpoint(), which averages every state tensor over the replicate mesh in
//    place (a no-op for every other optimizer and layout), so the stored piece is the replicas' mean
//    and every replica holds it afterwards.
// Rank 0 writes the manifest after every rank has written its file and all agreed that they did.
// Each phase (path checks, staging directory, rank files, manifest and publication) ends with an
// agreement over the mesh (one all-reduce per mesh dimension): a failure on any rank makes every rank throw
// (the failing rank its own error, the others IoError naming that rank), rank 0 removes the staging
// directory, and <dir> stays as it was. A rank that dies during save() leaves the staging directory
// (ignored by load(), removed by the next save()) and <dir> unchanged; the survivors see
// CommTimeout at the next agreement (the communicator's deadline).
// Format version: a rank file is "1.0" when it describes a single process with nothing sharded (the
// 1.0 format, byte for byte: such files load in every 1.x reader) and "1.1" otherwise (world size >
// 1 or a sharded parameter); 1.1 adds the per-tensor "shard" entries, rank files without replicated
// tensors, a parameter's tensor-parallel "inner" ShardSpec next to its "shard", and "transposed"
// (Dion's orientation) in every Dion parameter's entry. The manifest carries the same version as its
// rank files.
//
// Resharding: load() reads a checkpoint saved at any world size W into an optimizer at any world
// size W' (1 <-> 2 <-> 4, uneven and empty shards; a single-process optimizer loads a distributed
// checkpoint and a distributed one a single-process checkpoint), in any layout (DDP, FSDP, HSDP, TP,
// FSDP x TP, one process), for every optimizer, giving the same global state, bitwise. Every rank
// reads the manifest and the header of every rank file (not the data), checks the description
// against its optimizer, works out which boxes of which global tensors it needs (each local state
// tensor is a box of its global tensor) and which rank files hold them, then reads those files
// whole, checks their whole-file and per-tensor checksums, and copies the boxes into host staging
// buffers. Each file is also fully verified by one rank (file k by rank k mod W'), so a damaged file
// is detected even where no rank needs its data. Only after every rank has staged everything do the
// ranks agree (one all-reduce per mesh dimension) and copy the staged state into their optimizers: a
// bad or missing file seen by one rank is CheckpointError on that rank and CheckpointError ("failed
// on rank k") on every other rank, nothing changed anywhere, no hang. A rank's peak host memory
// during load() is the sum of the rank files it reads (its own piece and rank 0's replicated state
// at the same world size; the whole checkpoint when one process loads a distributed one).
// What cannot move between layouts (RELIABILITY C12): Dion's orientation follows the sharding (SPEC
// §1.5): rows over outer_shard or columns over inner_shard -> B = M^T (Q is m x r); rows over
// inner_shard or columns over outer_shard -> B = M (Q is n x r); unsharded -> B = M^T iff m < n. A
// checkpoint's Q only fits an optimizer with the same orientation for that matrix: otherwise load()
// refuses with CheckpointIncompatible naming the parameter and both orientations (e.g. a tall matrix
// row-sharded by FSDP into one process). Everything else (the Muon family, Lion, AdamW, Dion
// matrices of matching orientation) reshards freely; Dion2 / NorDion2 row-sharded with local
// selection then continue with a world-size-dependent selection by design (SPEC §2.4), but from the
// same state.
//
// Writing is crash-safe (RELIABILITY C3, C4, C15, C18): the whole checkpoint is first written into a
// staging directory next to <dir> (".<name>.tmp.<pid>.<n>", rank 0's pid): every file through a
// temp file, fsync, rename, fsync(directory); the manifest last. Only then does the staging directory
// replace <dir>, atomically (renameat2 RENAME_EXCHANGE when <dir> already exists, rename otherwise),
// and the parent directory is fsync'ed. A crash or an I/O error (ENOSPC, EIO) at any point leaves
// <dir> either the old checkpoint or the new one, never a mixture; the staging directory is removed on
// error, and one left behind by a killed process is ignored by load() and removed by the next save()
// to the same place. save() refuses to replace a directory that holds anything but a checkpoint's
// files. Saving is deterministic: the same state saves to byte-identical files (C2).
//
// Loading gives the strong guarantee (RELIABILITY §2): everything is read into host memory and
// validated first — manifest present and complete, format version, file sizes and checksums, the
// safetensors structure (see safetensors.hpp), optimizer and per-group algorithm, parameter names,
// global shapes and groups, every state tensor present with the expected dtype and global shape,
// completely covered by the rank files' pieces, and no extra one, every tensor checksum,
// hyperparameters — and only then copied into the optimizer, which cannot fail halfway. Any problem
// throws dion::CheckpointError (corrupt, truncated, incomplete) or its subclass
// dion::CheckpointIncompatible (well formed but not for this optimizer: version, optimizer, algorithm,
// shapes, dtypes, keys, layout, hyperparameters), naming the entry and the found vs expected value;
// a missing directory or an unreadable file is dion::IoError. The optimizer is unchanged after any
// throw.
//
// Hyperparameter precedence on load (C16): lr and weight_decay (the values schedules change) are
// restored from the checkpoint, as torch's load_state_dict does. Every other hyperparameter and the
// seed must equal the optimizer's own (they decide state shapes, the work plan and Dion's random
// sketches; a silent change would break exact resume): a difference is CheckpointIncompatible naming
// the group, the field and both values. LoadOptions::hyperparameters = keep_current skips that check
// for the fields that do not change state shapes (mu, betas, epsilon, seed, ...), keeping the current
// values; LoadOptions::restore_lr_wd = false keeps the current lr and weight_decay. non_finite and
// workspace_limit_bytes are runtime policies and never compared.
//
// Exact resume (C1): N steps, save, load into a freshly built optimizer, M steps gives bitwise the
// parameters and state of N+M uninterrupted steps, for every optimizer (Dion's Q and random sketches
// included: the sketches are a pure function of (seed, parameter name, group step)). After resharding
// the continuation is bitwise wherever the distributed variant itself is bitwise equal to one process
// (the Muon family's DDP, Muon's FSDP: SPEC §2.7), else within that variant's tolerance. The
// parameters themselves are the model's and are not part of the optimizer checkpoint.
//
// Writing your own format. Everything a checkpoint holds is reachable through the public API:
//   for (auto& s : opt.state())            // every state tensor: s.name "<param>/<key>", s.key,
//     store(s.name, s.view.dtype,          //   s.view.dtype (f32 or bf16), s.view.shape; Dion's Q is
//           s.view.shape,                  //   "<param>/Q", AdamW's counter in Muon-family optimizers
//           opt.read_state(s.name));       //   "<param>/step_dev"; read_state is exact for f32, bf16
//   for (int g = 0; g < opt.num_groups(); ++g)
//     store_group(opt.algorithm(g), opt.options(g), opt.step_count(g));   // options: every knob + seed
//   store_counter(opt.skipped_steps());
// and back: opt.write_state(name, values) for every tensor, opt.set_step_count(g, step) for every
// group (this also restores the device step counter of AdamW groups inside Dion),
// opt.set_lr(g, ..) / opt.set_weight_decay(g, ..) and opt.set_skipped_steps(n). Build the new
// optimizer with the same parameters, groups and options (options cannot be changed after
// construction). Distributed, opt.state() is this rank's local piece of each tensor.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dion/algorithms/collectives.hpp"
#include "dion/checkpoint/safetensors.hpp"
#include "dion/comm/single.hpp"
#include "dion/core/error.hpp"
#include "dion/core/optimizer.hpp"
#include "dion/core/options.hpp"

namespace dion {

namespace checkpoint {
/// Where one state tensor of this rank sits in its global tensor: the box [origin[k], origin[k] +
/// local[k]) of every dim k. `split`: the mesh dimensions (indices into the optimizer's list of mesh
/// communicators: replicate, outer_shard, inner_shard, those present) the tensor is split over; over
/// every other mesh dimension its ranks hold the same piece (replicas).
struct TensorLayout {
  std::vector<std::int64_t> local, global, origin;
  std::vector<int> split;
  bool whole() const { return local == global; }
};
}  // namespace checkpoint

/// Tag of the checkpoint subsystem's access to the engine (see EngineAccess in core/optimizer.hpp).
struct CheckpointAccessTag;

/// Read-only access to what the public API does not expose: identity, group membership, parameter
/// layout, the mesh communicator. The step and skip counters go through the public API
/// (step_count / set_step_count, skipped_steps / set_skipped_steps).
template <>
struct EngineAccess<CheckpointAccessTag> {
  template <class Opt>
  static Algorithm default_algorithm(const Opt& o) { return o.default_algorithm_; }
  template <class Opt>
  static int family(const Opt& o) { return static_cast<int>(o.family_); }
  template <class Opt>
  static const std::vector<int>& group_params(const Opt& o, int g) {
    return o.groups_[static_cast<std::size_t>(g)].params;
  }
  template <class Opt>
  static ShardSpec shard(const Opt& o, std::size_t param) { return o.params_[param].shard; }
  template <class Opt>
  static const std::string& param_name(const Opt& o, std::size_t param) { return o.params_[param].name; }
  template <class Opt>
  static Shape param_shape(const Opt& o, std::size_t param) { return o.params_[param].param.shape; }
  template <class Opt>
  static Shape global_shape(const Opt& o, std::size_t param) { return o.params_[param].global_shape; }
  template <class Opt>
  static DType param_dtype(const Opt& o, std::size_t param) { return o.params_[param].param.dtype; }
  template <class Opt>
  static int param_group(const Opt& o, std::size_t param) { return o.params_[param].group; }
  /// Dion: whether the parameter is processed transposed (Q is m x r instead of n x r).
  template <class Opt>
  static bool transposed(const Opt& o, std::size_t param) { return o.params_[param].transposed; }

  /// Tensor parallel (Dion): the parameter's sharding over Mesh::inner_shard.
  template <class Opt>
  static ShardSpec inner_shard(const Opt& o, std::size_t param) { return o.params_[param].inner_shard; }

  /// The communicators a checkpoint spans: the mesh's distinct communicators in the order
  /// replicate, outer_shard, inner_shard (those present); empty for one process (and for a
  /// distributed communicator type whose mesh names none). The engine checks at construction that
  /// they form a product mesh, so (rank in each) numbers the processes uniquely.
  template <class Opt>
  static const std::vector<typename Opt::comm_type*>& mesh_comms(const Opt& o) { return o.mesh_comms_; }

  /// The layout of every entry of o.state(), in the same order. A sharded parameter's momentum,
  /// variance and variance_neuron are cut like the parameter (its ShardSpec over the shard
  /// communicator, its inner ShardSpec over inner_shard); Dion's Q (q x r) has its rows cut like B's
  /// columns (the outer ShardSpec) and its r columns in even blocks over inner_shard; scalars
  /// (step_dev) are never cut.
  template <class Opt>
  static std::vector<checkpoint::TensorLayout> state_layouts(const Opt& o) {
    using Comm = typename Opt::comm_type;
    std::vector<checkpoint::TensorLayout> out;
    auto comm_index = [&](const Comm* c) {
      for (std::size_t i = 0; i < o.mesh_comms_.size(); ++i)
        if (o.mesh_comms_[i] == c) return static_cast<int>(i);
      return -1;
    };
    for (const auto& p : o.params_)
      for (const auto& s : p.state) {
        if (!o.exported(p, s.key)) continue;
        checkpoint::TensorLayout l;
        const int nd = s.shape.ndim;
        for (int i = 0; i < nd; ++i) l.local.push_back(s.shape[i]);
        l.global = l.local;
        l.origin.assign(static_cast<std::size_t>(nd), 0);
        auto place = [&](int d, std::int64_t offset, std::int64_t global, std::int64_t local, const Comm* c) {
          DION_CHECK(d >= 0 && d < nd && s.shape[d] == local, InternalError, "checkpoint: cannot place state tensor '",
                     p.name, "/", s.key, "' of shape ", s.shape.str(), " in its global tensor (dim ", d,
                     ", local length ", local, ")");
          l.origin[static_cast<std::size_t>(d)] = offset;
          l.global[static_cast<std::size_t>(d)] = global;
          const int ci = comm_index(c);
          if (ci >= 0) l.split.push_back(ci);
        };
        if (nd > 0 && s.key == "Q") {
          if (p.shard.sharded()) place(0, p.shard.offset, p.shard.global_length, p.shard.local_length, o.shard_comm_);
          if constexpr (Comm::distributed) {
            if (p.inner_shard.sharded()) {
              const auto [c0, c1] =
                  detail::even_block(p.rank, o.mesh_.inner_shard->size(), o.mesh_.inner_shard->rank());
              place(1, c0, p.rank, c1 - c0, o.mesh_.inner_shard);
            }
          }
        } else if (nd > 0) {
          if (p.shard.sharded())
            place(nd + p.shard.dim, p.shard.offset, p.shard.global_length, p.shard.local_length, o.shard_comm_);
          if (p.inner_shard.sharded())
            place(nd + p.inner_shard.dim, p.inner_shard.offset, p.inner_shard.global_length, p.inner_shard.local_length,
                  o.mesh_.inner_shard);
        }
        out.push_back(std::move(l));
      }
    return out;
  }
};

namespace checkpoint {

inline constexpr std::string_view kFormat = "dion.checkpoint";
inline constexpr int kFormatMajor = 1;
/// The newest minor version this library writes (1.1: distributed and sharded layouts); readers of
/// major 1 accept any minor.
inline constexpr int kFormatMinor = 1;
inline constexpr std::string_view kManifestName = "manifest.json";
/// Largest accepted "dion.state" document and manifest (a 100k-tensor model needs ~8 MiB).
inline constexpr std::size_t kMaxStateJsonBytes = std::size_t{16} << 20;
inline constexpr std::size_t kMaxManifestBytes = std::size_t{16} << 20;

using ::dion::detail::concat;

// ---------------------------------------------------------------------------------------------
// CRC32C

namespace detail {
inline constexpr std::array<std::uint32_t, 256> make_crc32c_table() {
  std::array<std::uint32_t, 256> t{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[i] = c;
  }
  return t;
}
inline constexpr auto kCrc32cTable = make_crc32c_table();
}  // namespace detail

/// CRC32C (Castagnoli) of `bytes`; `crc` continues a previous value (start: 0).
inline std::uint32_t crc32c(std::span<const std::byte> bytes, std::uint32_t crc = 0) {
  crc = ~crc;
  for (const std::byte b : bytes) crc = detail::kCrc32cTable[(crc ^ static_cast<std::uint8_t>(b)) & 0xffu] ^ (crc >> 8);
  return ~crc;
}
inline std::uint32_t crc32c(std::string_view s, std::uint32_t crc = 0) {
  return crc32c(std::as_bytes(std::span<const char>(s.data(), s.size())), crc);
}
inline std::string crc_hex(std::uint32_t c) {
  char buf[9];
  std::snprintf(buf, sizeof buf, "%08x", c);
  return buf;
}

/// "rank-00000-of-00001.safetensors"
inline std::string rank_file_name(int rank, int world_size) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "rank-%05d-of-%05d.safetensors", rank, world_size);
  return buf;
}

// ---------------------------------------------------------------------------------------------
// Options <-> JSON

namespace detail {

using json = nlohmann::json;

template <class... Args>
[[noreturn]] void corrupt(Args&&... a) {
  throw CheckpointError(concat("checkpoint: ", std::forward<Args>(a)...));
}
template <class... Args>
[[noreturn]] void incompatible(Args&&... a) {
  throw CheckpointIncompatible(concat("checkpoint: ", std::forward<Args>(a)...));
}

inline std::string q(std::string_view s) { return safetensors::detail::quote(s); }

/// Parse untrusted JSON with a nesting limit (the schema has depth <= 5), so a hostile document
/// cannot build deep structures; the size was bounded by the caller.
inline json parse_json(std::string_view text, const std::string& what) {
  const auto depth_guard = [](int depth, json::parse_event_t, json&) {
    if (depth > 8) throw std::out_of_range("nesting deeper than 8");
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), depth_guard, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const std::exception& e) {
    std::string m = e.what();
    if (m.size() > 200) m = m.substr(0, 200) + "...";
    corrupt(what, " is not valid JSON: ", m);
  }
}

// Typed accessors that throw CheckpointError naming the path of the field.
inline const json& field(const json& obj, const char* key, const std::string& where) {
  if (!obj.is_object()) corrupt(where, " must be a JSON object");
  const auto it = obj.find(key);
  if (it == obj.end()) corrupt(where, " is missing the field '", key, "'");
  return *it;
}
inline std::string get_string(const json& obj, const char* key, const std::string& where) {
  const auto& v = field(obj, key, where);
  if (!v.is_string()) corrupt(where, ".", key, " must be a string");
  return v.get<std::string>();
}
inline std::int64_t get_int(const json& obj, const char* key, const std::string& where, std::int64_t lo,
                            std::int64_t hi) {
  const auto& v = field(obj, key, where);
  std::int64_t r = 0;
  if (v.is_number_unsigned()) {
    const auto u = v.get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) corrupt(where, ".", key, " = ", u, " is out of range");
    r = static_cast<std::int64_t>(u);
  } else if (v.is_number_integer()) {
    r = v.get<std::int64_t>();
  } else {
    corrupt(where, ".", key, " must be an integer");
  }
  if (r < lo || r > hi) corrupt(where, ".", key, " = ", r, " is out of range [", lo, ", ", hi, "]");
  return r;
}
inline std::uint64_t get_u64(const json& obj, const char* key, const std::string& where) {
  const auto& v = field(obj, key, where);
  if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<std::int64_t>() >= 0))
    corrupt(where, ".", key, " must be a non-negative integer");
  return v.get<std::uint64_t>();
}
inline double get_number(const json& obj, const char* key, const std::string& where) {
  const auto& v = field(obj, key, where);
  if (!v.is_number()) corrupt(where, ".", key, " must be a number");
  return v.get<double>();
}
inline bool get_bool(const json& obj, const char* key, const std::string& where) {
  const auto& v = field(obj, key, where);
  if (!v.is_boolean()) corrupt(where, ".", key, " must be a boolean");
  return v.get<bool>();
}
/// A float stored as a JSON number: it must be finite and representable (float -> double -> text is exact).
inline float get_float(const json& obj, const char* key, const std::string& where) {
  const double d = get_number(obj, key, where);
  if (!(std::fabs(d) <= static_cast<double>(std::numeric_limits<float>::max())))
    corrupt(where, ".", key, " = ", d, " is not a finite float");
  return static_cast<float>(d);
}

inline std::string selection_scope_name(SelectionScope s) { return s == SelectionScope::local ? "local" : "global"; }
inline std::string non_finite_name(NonFinitePolicy p) {
  return p == NonFinitePolicy::skip_step ? "skip_step" : p == NonFinitePolicy::raise ? "raise" : "propagate";
}

template <class E, std::size_t N>
E parse_enum(const json& obj, const char* key, const std::string& where, const std::array<E, N>& values,
             std::string (*name)(E)) {
  const std::string s = get_string(obj, key, where);
  for (const E v : values)
    if (name(v) == s) return v;
  incompatible(where, ".", key, " has unknown value ", q(s));
}
inline std::string adjust_name(AdjustLr a) { return adjust_lr_name(a); }
inline std::string qr_name(QrMethod m) { return qr_method_name(m); }
inline std::string ortho_name(Orthogonalizer o) { return orthogonalizer_name(o); }

/// Every field of Options as JSON (floats widened to double: exact).
inline json options_to_json(const Options& o) {
  json j = json::object();
  j["lr"] = static_cast<double>(o.lr);
  j["mu"] = static_cast<double>(o.mu);
  j["beta1"] = static_cast<double>(o.beta1);
  j["beta2"] = static_cast<double>(o.beta2);
  j["weight_decay"] = static_cast<double>(o.weight_decay);
  j["epsilon"] = static_cast<double>(o.epsilon);
  j["cautious_wd"] = o.cautious_wd;
  j["nesterov"] = o.nesterov;
  j["adjust_lr"] = adjust_lr_name(o.adjust_lr);
  j["flatten"] = o.flatten;
  j["num_heads"] = o.num_heads;
  j["split_sizes"] = o.split_sizes;
  j["muon_beta2"] = static_cast<double>(o.muon_beta2);
  j["fraction"] = o.fraction;
  j["ef_decay"] = static_cast<double>(o.ef_decay);
  j["selection_scope"] = selection_scope_name(o.selection_scope);
  j["rank_fraction"] = o.rank_fraction;
  j["rank_multiple_of"] = o.rank_multiple_of;
  j["power_iters"] = o.power_iters;
  j["qr_method"] = qr_method_name(o.qr_method);
  j["cqr_warmup_steps"] = o.cqr_warmup_steps;
  j["rcqr_oversample"] = o.rcqr_oversample;
  j["orthogonalizer"] = orthogonalizer_name(o.orthogonalizer);
  j["ns_steps"] = o.ns_steps;
  j["seed"] = o.seed;
  j["non_finite"] = non_finite_name(o.non_finite);
  j["workspace_limit_bytes"] = o.workspace_limit_bytes;
  return j;
}

inline Options options_from_json(const json& j, const std::string& where) {
  Options o;
  constexpr auto kInt = std::numeric_limits<int>::max();
  o.lr = get_float(j, "lr", where);
  o.mu = get_float(j, "mu", where);
  o.beta1 = get_float(j, "beta1", where);
  o.beta2 = get_float(j, "beta2", where);
  o.weight_decay = get_float(j, "weight_decay", where);
  o.epsilon = get_float(j, "epsilon", where);
  o.cautious_wd = get_bool(j, "cautious_wd", where);
  o.nesterov = get_bool(j, "nesterov", where);
  o.adjust_lr = parse_enum(j, "adjust_lr", where,
                           std::array{AdjustLr::spectral_norm, AdjustLr::rms_norm, AdjustLr::none}, &adjust_name);
  o.flatten = get_bool(j, "flatten", where);
  o.num_heads = static_cast<int>(get_int(j, "num_heads", where, 0, kInt));
  {
    const auto& s = field(j, "split_sizes", where);
    if (!s.is_array()) corrupt(where, ".split_sizes must be an array");
    if (s.size() > 4096) corrupt(where, ".split_sizes has ", s.size(), " entries (limit 4096)");
    for (std::size_t i = 0; i < s.size(); ++i) {
      if (!s[i].is_number_integer()) corrupt(where, ".split_sizes[", i, "] must be an integer");
      o.split_sizes.push_back(s[i].get<std::int64_t>());
    }
  }
  o.muon_beta2 = get_float(j, "muon_beta2", where);
  o.fraction = get_number(j, "fraction", where);
  o.ef_decay = get_float(j, "ef_decay", where);
  o.selection_scope = parse_enum(j, "selection_scope", where, std::array{SelectionScope::local, SelectionScope::global},
                                 &selection_scope_name);
  o.rank_fraction = get_number(j, "rank_fraction", where);
  o.rank_multiple_of = static_cast<int>(get_int(j, "rank_multiple_of", where, 0, kInt));
  o.power_iters = static_cast<int>(get_int(j, "power_iters", where, 0, kInt));
  o.qr_method = parse_enum(j, "qr_method", where, std::array{QrMethod::qr, QrMethod::cqr, QrMethod::rcqr}, &qr_name);
  o.cqr_warmup_steps = static_cast<int>(get_int(j, "cqr_warmup_steps", where, 0, kInt));
  o.rcqr_oversample = get_number(j, "rcqr_oversample", where);
  o.orthogonalizer = parse_enum(
      j, "orthogonalizer", where,
      std::array{Orthogonalizer::polar_express, Orthogonalizer::newton_schulz, Orthogonalizer::newton_schulz_const},
      &ortho_name);
  o.ns_steps = static_cast<int>(get_int(j, "ns_steps", where, 0, kInt));
  o.seed = get_u64(j, "seed", where);
  o.non_finite = parse_enum(
      j, "non_finite", where,
      std::array{NonFinitePolicy::skip_step, NonFinitePolicy::raise, NonFinitePolicy::propagate}, &non_finite_name);
  o.workspace_limit_bytes = get_int(j, "workspace_limit_bytes", where, 0, std::numeric_limits<std::int64_t>::max());
  return o;
}

/// One hyperparameter comparison: name, whether it decides state shapes or the work plan
/// (always compared), and its value in both option sets as text.
struct FieldDiff {
  const char* name;
  bool structural;
  std::string stored, current;
};

inline std::vector<FieldDiff> diff_options(const Options& a, const Options& b) {
  std::vector<FieldDiff> d;
  auto cmp = [&](const char* n, bool structural, const auto& x, const auto& y) {
    if (!(x == y)) d.push_back({n, structural, json(x).dump(), json(y).dump()});
  };
  auto cmpf = [&](const char* n, bool structural, float x, float y) {
    if (std::memcmp(&x, &y, sizeof x) != 0) d.push_back({n, structural, concat(x), concat(y)});
  };
  cmpf("mu", false, a.mu, b.mu);
  cmpf("beta1", false, a.beta1, b.beta1);
  cmpf("beta2", false, a.beta2, b.beta2);
  cmpf("epsilon", false, a.epsilon, b.epsilon);
  cmp("cautious_wd", false, a.cautious_wd, b.cautious_wd);
  cmp("nesterov", false, a.nesterov, b.nesterov);
  cmp("adjust_lr", false, std::string(adjust_lr_name(a.adjust_lr)), std::string(adjust_lr_name(b.adjust_lr)));
  cmp("flatten", true, a.flatten, b.flatten);
  cmp("num_heads", true, a.num_heads, b.num_heads);
  cmp("split_sizes", true, a.split_sizes, b.split_sizes);
  cmpf("muon_beta2", false, a.muon_beta2, b.muon_beta2);
  cmp("fraction", true, a.fraction, b.fraction);
  cmpf("ef_decay", false, a.ef_decay, b.ef_decay);
  cmp("selection_scope", true, selection_scope_name(a.selection_scope), selection_scope_name(b.selection_scope));
  cmp("rank_fraction", true, a.rank_fraction, b.rank_fraction);
  cmp("rank_multiple_of", true, a.rank_multiple_of, b.rank_multiple_of);
  cmp("power_iters", false, a.power_iters, b.power_iters);
  cmp("qr_method", false, std::string(qr_method_name(a.qr_method)), std::string(qr_method_name(b.qr_method)));
  cmp("cqr_warmup_steps", false, a.cqr_warmup_steps, b.cqr_warmup_steps);
  cmp("rcqr_oversample", true, a.rcqr_oversample, b.rcqr_oversample);
  cmp("orthogonalizer", false, std::string(orthogonalizer_name(a.orthogonalizer)),
      std::string(orthogonalizer_name(b.orthogonalizer)));
  cmp("ns_steps", false, a.ns_steps, b.ns_steps);
  cmp("seed", false, a.seed, b.seed);
  return d;
}

inline std::string dims_json(const Shape& s) {
  std::string r = "[";
  for (int i = 0; i < s.ndim; ++i) {
    if (i) r += ",";
    r += std::to_string(s[i]);
  }
  return r + "]";
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Saving

/// Test and tooling hooks for save().
struct SaveOptions {
  /// Wraps the rank file's sink (tests: a FaultInjectionSink models ENOSPC/EIO or a crash).
  safetensors::SinkDecorator decorate_rank_file = {};
};

namespace detail {

/// This process's place among the ranks that share a checkpoint: the mesh's communicators
/// (replicate, outer_shard, inner_shard, those present), this rank's coordinate in each, and the
/// global numbering rank = ((c0 · W1) + c1) · W2 + c2 of the product mesh, world = W0 · W1 · W2.
template <class Comm>
struct MeshContext {
  std::vector<Comm*> comms;
  int world = 1;
  int rank = 0;
  bool distributed() const { return !comms.empty(); }
};
template <class Opt>
MeshContext<typename Opt::comm_type> mesh_context(Opt& opt) {
  MeshContext<typename Opt::comm_type> ctx;
  ctx.comms = EngineAccess<CheckpointAccessTag>::mesh_comms(opt);
  for (auto* c : ctx.comms) {
    ctx.rank = ctx.rank * c->size() + c->rank();
    ctx.world *= c->size();
  }
  return ctx;
}

/// The format version `opt`'s files carry: "1.0" for one process with nothing sharded (exactly the
/// 1.0 format), "1.1" when the world is larger or a parameter is sharded.
template <class Opt>
int file_minor(Opt& opt) {
  using A = EngineAccess<CheckpointAccessTag>;
  if (mesh_context(opt).world > 1) return 1;
  for (std::size_t i = 0; i < opt.num_params(); ++i)
    if (A::shard(opt, i).sharded() || A::inner_shard(opt, i).sharded()) return 1;
  return 0;
}

/// An all-reduce over the whole (product) mesh: one reduction per dimension, in turn.
template <class Comm, class T>
void mesh_reduce(const MeshContext<Comm>& ctx, T* v, std::size_t n, ReduceOp op) {
  for (Comm* c : ctx.comms) ::dion::detail::host_all_reduce(*c, v, n, op);
}

/// The first rank (global numbering) where `ok` is false, or -1 when it holds everywhere: one MIN
/// all-reduce per mesh dimension, the agreement every collective phase of save() and load() ends with.
template <class Comm>
int first_failed_rank(const MeshContext<Comm>& ctx, bool ok) {
  std::int64_t v = ok ? ctx.world : ctx.rank;
  mesh_reduce(ctx, &v, 1, ReduceOp::min);
  return v >= ctx.world ? -1 : static_cast<int>(v);
}

/// True on every rank iff every rank passed the same value.
template <class Comm>
bool same_everywhere(const MeshContext<Comm>& ctx, std::uint64_t h) {
  bool same = true;
  for (Comm* c : ctx.comms) same = c->same_everywhere(h) && same;
  for (Comm* c : ctx.comms) same = c->all_agree(same);
  return same;
}

/// Run the local step `f` of a collective phase, then agree: the rank whose `f` threw rethrows its
/// own error, every other rank calls `others(first failing rank)`, which throws. A CommError is
/// rethrown at once (agreeing over a failed communicator would fail too). One process: just `f`.
template <class Comm, class F, class Others>
void agreed_phase(const MeshContext<Comm>& ctx, F&& f, Others&& others) {
  std::exception_ptr err;
  try {
    f();
  } catch (const CommError&) {
    throw;
  } catch (...) {
    err = std::current_exception();
  }
  if (!ctx.distributed()) {
    if (err) std::rethrow_exception(err);
    return;
  }
  const int bad = first_failed_rank(ctx, !err);
  if (err) std::rethrow_exception(err);
  if (bad >= 0) others(bad);
}

}  // namespace detail

/// This rank's file of `opt` as a safetensors Writer (tensors by reference: `opt` must not step
/// while the Writer is alive). `host` receives the host copies of the state the Writer points to.
/// Distributed: the rank's pieces of sharded state and, on rank 0 only, the replicated state.
template <class Opt>
safetensors::Writer make_rank_writer(Opt& opt, std::vector<std::vector<std::byte>>& host) {
  using A = EngineAccess<CheckpointAccessTag>;
  using json = detail::json;
  auto& be = opt.backend();
  const auto ctx = detail::mesh_context(opt);
  const int minor = detail::file_minor(opt);
  const std::string version = concat(kFormatMajor, ".", minor);
  const auto refs = opt.state();
  const auto layouts = A::state_layouts(opt);
  host.clear();
  host.resize(refs.size());
  std::vector<char> mine(refs.size(), 0);
  for (std::size_t i = 0; i < refs.size(); ++i) {
    // one copy of every piece: over each mesh dimension the tensor is not split over, its ranks
    // hold the same piece, and the one with coordinate 0 there writes it (replicated state: rank 0)
    mine[i] = 1;
    for (std::size_t d = 0; d < ctx.comms.size(); ++d) {
      const auto& sp = layouts[i].split;
      if (std::find(sp.begin(), sp.end(), static_cast<int>(d)) == sp.end() && ctx.comms[d]->rank() != 0) mine[i] = 0;
    }
    if (!mine[i]) continue;
    const auto& r = refs[i];
    const std::size_t nbytes = static_cast<std::size_t>(r.view.shape.numel()) * dtype_size(r.view.dtype);
    host[i].resize(nbytes);
    if (nbytes) be.copy_to_host(r.view.data, host[i].data(), nbytes);
  }
  be.synchronize();
  safetensors::Writer w;
  json tensors = json::object();
  for (std::size_t i = 0; i < refs.size(); ++i) {
    if (!mine[i]) continue;
    const auto& r = refs[i];
    w.add_view(r.name, safetensors::to_safetensors(r.view.dtype), safetensors::shape_dims(r.view.shape), host[i]);
    json e = json{{"crc32c", crc_hex(crc32c(host[i]))}};
    const auto& l = layouts[i];
    if (!l.whole()) e["shard"] = json{{"offsets", l.origin}, {"global_shape", l.global}};
    tensors[r.name] = std::move(e);
  }

  json groups = json::array();
  for (int g = 0; g < opt.num_groups(); ++g) {
    json names = json::array();
    for (int pi : A::group_params(opt, g)) names.push_back(A::param_name(opt, static_cast<std::size_t>(pi)));
    groups.push_back(json{{"algorithm", algorithm_name(opt.algorithm(g))},
                          {"step", opt.step_count(g)},
                          {"params", std::move(names)},
                          {"hyperparameters", detail::options_to_json(opt.options(g))}});
  }
  json params = json::object();
  for (std::size_t i = 0; i < opt.num_params(); ++i) {
    const Shape s = A::param_shape(opt, i);
    const ShardSpec sh = A::shard(opt, i);
    json p = json{
        {"shape", json::parse(detail::dims_json(s))},
        {"dtype", std::string(safetensors::dtype_name(safetensors::to_safetensors(A::param_dtype(opt, i))))},
        {"shard", json{{"dim", sh.dim}, {"global_length", sh.global_length}, {"offset", sh.offset},
                       {"local_length", sh.local_length}}}};
    const ShardSpec in = A::inner_shard(opt, i);
    if (in.sharded())
      p["inner"] = json{{"dim", in.dim}, {"global_length", in.global_length}, {"offset", in.offset},
                        {"local_length", in.local_length}};
    // 1.1: Dion's orientation, which decides Q's meaning (1.0 files: derived, m < n)
    if (minor >= 1 && opt.algorithm(A::param_group(opt, i)) == Algorithm::dion) p["transposed"] = A::transposed(opt, i);
    params[A::param_name(opt, i)] = std::move(p);
  }
  json state = json{
      {"format", std::string(kFormat)},
      {"format_version", version},
      {"optimizer", algorithm_name(A::default_algorithm(opt))},
      {"backend", std::string(Opt::backend_type::name)},
      {"layout", json{{"world_size", ctx.world}, {"rank", ctx.rank}}},
      {"skipped_steps", opt.skipped_steps()},
      {"groups", std::move(groups)},
      {"params", std::move(params)},
      {"tensors", std::move(tensors)},
  };
  const std::string text = state.dump();
  w.set_metadata("format", std::string(kFormat));
  w.set_metadata("format_version", version);
  w.set_metadata("dion.state", text);
  w.set_metadata("dion.state.crc32c", crc_hex(crc32c(text)));
  return w;
}

/// The rank file image of `opt`: what save() writes as rank-00000-of-00001 for a single process
/// (distributed: this rank's file; local, not collective, and without synchronize_for_checkpoint()).
template <class Opt>
std::vector<std::byte> save_bytes(Opt& opt) {
  std::vector<std::vector<std::byte>> host;
  return make_rank_writer(opt, host).to_bytes();
}

namespace detail {

inline int open_dir(const std::filesystem::path& d) { return ::open(d.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); }

inline void fsync_dir(const std::filesystem::path& d, const std::string& what) {
  const int fd = open_dir(d);
  if (fd < 0) throw IoError(concat("checkpoint: ", what, ": cannot open directory '", d.string(), "' for fsync: ",
                                   safetensors::detail::errno_text(errno)));
  int rc;
  while ((rc = ::fsync(fd)) != 0 && errno == EINTR) {
  }
  const int err = errno;
  ::close(fd);
  if (rc != 0 && err != EINVAL)
    throw IoError(concat("checkpoint: ", what, ": fsync of directory '", d.string(), "' failed: ",
                         safetensors::detail::errno_text(err)));
}

/// A file name that a checkpoint directory may hold.
inline bool is_checkpoint_file(const std::string& n) {
  return n == kManifestName || (n.rfind("rank-", 0) == 0 && n.size() > 12 && n.ends_with(".safetensors"));
}

/// Remove staging directories ".<name>.tmp.<pid>.<n>" left in `parent` by processes that no longer run.
inline void remove_stale_staging(const std::filesystem::path& parent, const std::string& name) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const std::string prefix = "." + name + ".tmp.";
  for (fs::directory_iterator it(parent, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string f = it->path().filename().string();
    if (f.rfind(prefix, 0) != 0) continue;
    const std::string rest = f.substr(prefix.size());
    const auto dot = rest.find('.');
    if (dot == std::string::npos || dot == 0) continue;
    long pid = 0;
    bool digits = true;
    for (std::size_t i = 0; i < dot; ++i) {
      if (rest[i] < '0' || rest[i] > '9' || pid > 100000000) { digits = false; break; }
      pid = pid * 10 + (rest[i] - '0');
    }
    if (!digits || pid <= 0) continue;
    if (pid == ::getpid()) continue;
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // still running (or unknown)
    std::error_code ec2;
    fs::remove_all(it->path(), ec2);
  }
}

/// Atomically make `stage` (a complete checkpoint directory) appear at `target`.
inline void publish(const std::filesystem::path& stage, const std::filesystem::path& target,
                    const std::filesystem::path& parent) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const bool exists = fs::exists(fs::symlink_status(target, ec));
  if (!exists) {
    if (::rename(stage.c_str(), target.c_str()) != 0)
      throw IoError(concat("checkpoint: cannot rename '", stage.string(), "' to '", target.string(), "': ",
                           safetensors::detail::errno_text(errno)));
  } else {
#if defined(RENAME_EXCHANGE)
    const int rc = ::renameat2(AT_FDCWD, stage.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE);
#else
    errno = ENOSYS;
    const int rc = -1;
#endif
    if (rc != 0) {
      if (errno != EINVAL && errno != ENOSYS)
        throw IoError(concat("checkpoint: cannot exchange '", stage.string(), "' with '", target.string(), "': ",
                             safetensors::detail::errno_text(errno)));
      // No RENAME_EXCHANGE on this filesystem: move the old one aside first (a crash in between
      // leaves the previous checkpoint at "<target>.old.<pid>" and none at the target).
      const fs::path old = parent / concat(".", target.filename().string(), ".old.", ::getpid());
      if (::rename(target.c_str(), old.c_str()) != 0 || ::rename(stage.c_str(), target.c_str()) != 0)
        throw IoError(concat("checkpoint: cannot replace '", target.string(), "': ",
                             safetensors::detail::errno_text(errno)));
      fs::remove_all(old, ec);
      return;
    }
    // `stage` now holds the previous checkpoint.
  }
}

}  // namespace detail

/// Save the complete state of `opt` into the directory `dir` (created or atomically replaced).
/// Throws IoError on any I/O failure, with `dir` left as it was. Distributed: collective (every rank
/// calls it with the same `dir`); calls opt.synchronize_for_checkpoint() first (Dion replicas, SPEC
/// §2.6); a failure on any rank throws on every rank (IoError naming the failing rank on the others).
template <class Opt>
void save(Opt& opt, const std::filesystem::path& dir_in, const SaveOptions& so = {}) {
  namespace fs = std::filesystem;
  using json = detail::json;
  const auto ctx = detail::mesh_context(opt);
  const bool root = ctx.rank == 0;
  fs::path dir, parent;
  std::string name;
  const auto others = [&](const char* what) {
    return [&dir_in, &ctx, what](int bad) {
      throw IoError(concat("checkpoint::save: ", what, " failed on rank ", bad, " (see that rank's error); '",
                           dir_in.string(), "' is unchanged"),
                    ctx.rank);
    };
  };
  detail::agreed_phase(
      ctx,
      [&] {
        dir = dir_in.lexically_normal();
        if (!dir.has_filename()) dir = dir.parent_path();
        if (dir.empty() || dir.filename() == "." || dir.filename() == "..")
          throw InvalidArgument(concat("checkpoint::save: '", dir_in.string(), "' does not name a directory"));
        parent = dir.has_parent_path() ? dir.parent_path() : fs::path(".");
        name = dir.filename().string();
      },
      others("checking the directory name"));

  // Every rank names the same directory; rank 0 checks the target (every rank sees the same filesystem).
  if (ctx.distributed() && !detail::same_everywhere(ctx, ::dion::detail::fnv1a(dir.string())))
    throw InvalidArgument(concat("checkpoint::save: the ranks name different directories (this rank: '", dir.string(),
                                 "'); call save() with the same directory on every rank"),
                          ctx.rank);
  detail::agreed_phase(
      ctx,
      [&] {
        if (!root) return;
        std::error_code ec;
        if (!fs::is_directory(parent, ec))
          throw IoError(concat("checkpoint::save: parent directory '", parent.string(), "' does not exist"));
        // Never replace a directory that holds anything but a checkpoint (it would be deleted).
        if (fs::exists(fs::symlink_status(dir, ec))) {
          if (!fs::is_directory(fs::symlink_status(dir, ec)))
            throw InvalidArgument(concat("checkpoint::save: '", dir.string(), "' exists and is not a directory"));
          for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
            const std::string f = it->path().filename().string();
            if (!detail::is_checkpoint_file(f) || !it->is_regular_file())
              throw InvalidArgument(concat("checkpoint::save: '", dir.string(), "' holds '", f,
                                           "', which is not part of a checkpoint; refusing to replace it"));
          }
        }
      },
      others("checking the target"));

  // Dion with compressed replica sync: every replica's state becomes the replicas' mean (SPEC §2.6),
  // so the replicated state rank 0 writes is everyone's. A no-op for every other optimizer/layout.
  opt.synchronize_for_checkpoint();

  // Rank 0 creates the staging directory; every rank learns its name (rank 0's pid and counter).
  static std::atomic<unsigned> counter{0};
  std::int64_t stage_id[2] = {0, 0};
  detail::agreed_phase(
      ctx,
      [&] {
        if (!root) return;
        detail::remove_stale_staging(parent, name);
        for (int attempt = 0; attempt < 100; ++attempt) {
          const unsigned n = counter.fetch_add(1);
          const fs::path s = parent / concat(".", name, ".tmp.", ::getpid(), ".", n);
          if (::mkdir(s.c_str(), 0755) == 0) {
            stage_id[0] = ::getpid();
            stage_id[1] = n;
            return;
          }
          if (errno != EEXIST)
            throw IoError(concat("checkpoint::save: cannot create staging directory '", s.string(), "': ",
                                 safetensors::detail::errno_text(errno), "; '", dir.string(), "' is unchanged"));
        }
        throw IoError("checkpoint::save: no free staging directory name");
      },
      others("creating the staging directory"));
  detail::mesh_reduce(ctx, stage_id, 2, ReduceOp::max);
  const fs::path stage = parent / concat(".", name, ".tmp.", stage_id[0], ".", stage_id[1]);

  try {
    // Every rank writes its file into the staging directory.
    const std::string rank_name = rank_file_name(ctx.rank, ctx.world);
    std::uint32_t file_crc = 0;
    std::uint64_t file_bytes = 0;
    detail::agreed_phase(
        ctx,
        [&] {
          std::vector<std::vector<std::byte>> host;
          const auto writer = make_rank_writer(opt, host);
          // CRC32C and size of the whole rank file, computed while it is written.
          struct CrcSink final : safetensors::Sink {
            safetensors::Sink& inner;
            std::uint32_t crc = 0;
            std::uint64_t n = 0;
            explicit CrcSink(safetensors::Sink& s) : inner(s) {}
            void write(std::span<const std::byte> b) override {
              inner.write(b);
              crc = crc32c(b, crc);
              n += b.size();
            }
          };
          safetensors::atomic_write_file(stage / rank_name, [&](safetensors::Sink& s) {
            std::unique_ptr<safetensors::Sink> dec;
            safetensors::Sink* target = &s;
            if (so.decorate_rank_file) {
              dec = so.decorate_rank_file(s);
              target = dec.get();
            }
            CrcSink cs(*target);
            writer.write_to(cs);
            file_crc = cs.crc;
            file_bytes = cs.n;
          });
        },
        others("writing a rank file"));
    // Every rank's (size, checksum) for the manifest: one all-reduce.
    std::vector<std::int64_t> info(2 * static_cast<std::size_t>(ctx.world), 0);
    info[2 * static_cast<std::size_t>(ctx.rank)] = static_cast<std::int64_t>(file_bytes);
    info[2 * static_cast<std::size_t>(ctx.rank) + 1] = static_cast<std::int64_t>(file_crc);
    detail::mesh_reduce(ctx, info.data(), info.size(), ReduceOp::sum);
    // Rank 0 commits: the manifest, then the atomic swap of the directory.
    detail::agreed_phase(
        ctx,
        [&] {
          if (!root) return;
          json files = json::array();
          for (int r = 0; r < ctx.world; ++r)
            files.push_back(json{{"rank", r},
                                 {"name", rank_file_name(r, ctx.world)},
                                 {"bytes", static_cast<std::uint64_t>(info[2 * static_cast<std::size_t>(r)])},
                                 {"crc32c", crc_hex(static_cast<std::uint32_t>(info[2 * static_cast<std::size_t>(r) + 1]))}});
          json manifest = json{
              {"format", std::string(kFormat)},
              {"format_version", concat(kFormatMajor, ".", detail::file_minor(opt))},
              {"checksum", "crc32c"},
              {"optimizer", algorithm_name(EngineAccess<CheckpointAccessTag>::default_algorithm(opt))},
              {"world_size", ctx.world},
              {"files", std::move(files)},
          };
          const std::string mtext = manifest.dump(2) + "\n";
          safetensors::atomic_write_file(stage / std::string(kManifestName), [&](safetensors::Sink& s) {
            s.write(std::as_bytes(std::span<const char>(mtext.data(), mtext.size())));
          });
          detail::publish(stage, dir, parent);
          detail::fsync_dir(parent, "save");
        },
        others("publishing the checkpoint"));
  } catch (...) {
    if (root) {
      std::error_code ec2;
      fs::remove_all(stage, ec2);
    }
    throw;
  }
  if (root) {
    std::error_code ec;
    fs::remove_all(stage, ec);  // after an exchange: the previous checkpoint
  }
}

// ---------------------------------------------------------------------------------------------
// Loading

enum class HyperparameterCheck : std::uint8_t {
  must_match,    ///< every stored hyperparameter (but lr, weight_decay) must equal the optimizer's
  keep_current,  ///< only those that decide state shapes or the plan must match; the rest stay current
};

struct LoadOptions {
  bool restore_lr_wd = true;  ///< take lr and weight_decay from the checkpoint (torch semantics)
  HyperparameterCheck hyperparameters = HyperparameterCheck::must_match;
  std::uint64_t max_file_bytes = std::numeric_limits<std::uint64_t>::max();  ///< cap per rank file
};

/// A parsed manifest.
struct Manifest {
  struct FileEntry {
    int rank = 0;
    std::string name;
    std::uint64_t bytes = 0;
    std::uint32_t crc32c = 0;
  };
  int format_major = 0, format_minor = 0;
  std::string optimizer;
  int world_size = 0;
  std::vector<FileEntry> files;  // indexed by rank
};

namespace detail {

inline std::pair<int, int> parse_version(const std::string& v, const std::string& where) {
  int major = -1, minor = -1;
  std::size_t i = 0;
  auto num = [&](int& out) {
    const std::size_t b = i;
    long long x = 0;
    while (i < v.size() && v[i] >= '0' && v[i] <= '9' && i - b < 6) x = x * 10 + (v[i++] - '0');
    if (i == b) return false;
    out = static_cast<int>(x);
    return true;
  };
  if (!num(major) || i >= v.size() || v[i++] != '.' || !num(minor) || i != v.size())
    corrupt(where, " format_version ", q(v), " is not of the form MAJOR.MINOR");
  if (major != kFormatMajor)
    incompatible(where, " has format version ", major, ".", minor, "; this library reads version ", kFormatMajor,
                 ".x (up to ", kFormatMajor, ".", kFormatMinor, ")");
  return {major, minor};
}

inline std::uint32_t parse_crc(const std::string& s, const std::string& where) {
  if (s.size() != 8) corrupt(where, " checksum ", q(s), " is not 8 hex digits");
  std::uint32_t v = 0;
  for (const char c : s) {
    int d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else corrupt(where, " checksum ", q(s), " is not 8 lowercase hex digits");
    v = v * 16 + static_cast<std::uint32_t>(d);
  }
  return v;
}

inline void check_format(const json& j, const std::string& where) {
  const std::string fmt = get_string(j, "format", where);
  if (fmt != kFormat) incompatible(where, " has format ", q(fmt), ", expected '", kFormat, "'");
  parse_version(get_string(j, "format_version", where), where);
}

}  // namespace detail

/// Parse and validate a manifest's text (pure; the fuzz target calls it).
inline Manifest parse_manifest(std::string_view text) {
  using namespace detail;
  if (text.size() > kMaxManifestBytes) corrupt("manifest of ", text.size(), " bytes exceeds the limit of ", kMaxManifestBytes);
  const json j = parse_json(text, "manifest");
  const std::string where = "manifest";
  if (!j.is_object()) corrupt("manifest must be a JSON object");
  check_format(j, where);
  Manifest m;
  std::tie(m.format_major, m.format_minor) = parse_version(get_string(j, "format_version", where), where);
  if (get_string(j, "checksum", where) != "crc32c")
    incompatible("manifest checksum algorithm ", q(get_string(j, "checksum", where)), " is not supported (crc32c)");
  m.optimizer = get_string(j, "optimizer", where);
  m.world_size = static_cast<int>(get_int(j, "world_size", where, 1, 1 << 20));
  const auto& files = field(j, "files", where);
  if (!files.is_array()) corrupt("manifest.files must be an array");
  if (files.size() != static_cast<std::size_t>(m.world_size))
    corrupt("incomplete checkpoint: the manifest lists ", files.size(), " rank files for world size ", m.world_size);
  m.files.resize(files.size());
  std::vector<bool> seen(files.size(), false);
  for (std::size_t i = 0; i < files.size(); ++i) {
    const std::string w = concat("manifest.files[", i, "]");
    Manifest::FileEntry e;
    e.rank = static_cast<int>(get_int(files[i], "rank", w, 0, m.world_size - 1));
    e.name = get_string(files[i], "name", w);
    if (e.name != rank_file_name(e.rank, m.world_size))
      corrupt(w, ".name ", q(e.name), " is not the rank file name '", rank_file_name(e.rank, m.world_size), "'");
    e.bytes = get_u64(files[i], "bytes", w);
    e.crc32c = parse_crc(get_string(files[i], "crc32c", w), w);
    if (seen[static_cast<std::size_t>(e.rank)]) corrupt("manifest lists rank ", e.rank, " twice");
    seen[static_cast<std::size_t>(e.rank)] = true;
    m.files[static_cast<std::size_t>(e.rank)] = std::move(e);
  }
  return m;
}


namespace detail {

/// One tensor of a rank file and its place in the global tensor: the box [origin[k], origin[k] +
/// local[k]) of every dim k (the whole tensor when it carries no "shard" entry).
struct Piece {
  int file = 0;  ///< the rank of the file that holds it
  std::string name;
  safetensors::Dtype dtype = safetensors::Dtype::F32;
  std::vector<std::int64_t> local, global, origin;
  std::uint32_t crc = 0;
};

/// "[64,128]"
inline std::string dims_str_of(const std::vector<std::int64_t>& v) {
  std::string r = "[";
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (i) r += ",";
    r += std::to_string(v[i]);
  }
  return r + "]";
}

/// The largest dimension or offset a checkpoint may describe (exact in a JSON double).
inline constexpr std::int64_t kMaxExtent = std::int64_t{1} << 53;

/// A piece's "shard" entry ({"offsets": [...], "global_shape": [...]}), validated against the
/// piece's shape in the safetensors header: the box must lie inside the global tensor.
inline void parse_piece_shard(const json& sh, const std::string& w, Piece& p) {
  if (!sh.is_object()) corrupt(w, " must be a JSON object");
  const std::size_t nd = p.local.size();
  const auto& g = field(sh, "global_shape", w);
  const auto& o = field(sh, "offsets", w);
  if (!g.is_array() || g.size() != nd || !o.is_array() || o.size() != nd)
    corrupt(w, ".global_shape and .offsets must be arrays of ", nd, " integers (the tensor's shape is ",
            safetensors::detail::dims_str(p.local), ")");
  for (std::size_t k = 0; k < nd; ++k) {
    for (const json* v : {&g[k], &o[k]})
      if (!v->is_number_integer() || v->get<std::int64_t>() < 0 || v->get<std::int64_t>() > kMaxExtent)
        corrupt(w, ".global_shape[", k, "] and .offsets[", k, "] must be integers in [0, 2^53]");
    p.global[k] = g[k].get<std::int64_t>();
    p.origin[k] = o[k].get<std::int64_t>();
    if (p.local[k] > p.global[k] || p.origin[k] > p.global[k] - p.local[k])
      corrupt(w, ": the piece [", p.origin[k], ", ", p.origin[k] + p.local[k], ") of dim ", k,
              " does not lie inside the global size ", p.global[k]);
  }
}

/// A rank file's metadata, validated without its tensor data: format, version, the checksummed
/// "dion.state" document, and one piece per tensor (checksum format, placement).
struct RankIndex {
  json state;
  std::string state_crc;  ///< the "dion.state.crc32c" metadata
  std::vector<Piece> pieces;
};

inline RankIndex index_rank(const safetensors::Header& h, int file) {
  auto meta = [&](const char* k) -> const std::string* {
    const auto it = h.metadata.find(k);
    return it == h.metadata.end() ? nullptr : &it->second;
  };
  const std::string* fmt = meta("format");
  if (!fmt) incompatible("rank file has no 'format' metadata: not a dion checkpoint");
  if (*fmt != kFormat) incompatible("rank file has format ", q(*fmt), ", expected '", kFormat, "'");
  const std::string* ver = meta("format_version");
  if (!ver) corrupt("rank file has no 'format_version' metadata");
  parse_version(*ver, "rank file");
  const std::string* text = meta("dion.state");
  if (!text) corrupt("rank file has no 'dion.state' metadata");
  if (text->size() > kMaxStateJsonBytes)
    corrupt("rank file 'dion.state' of ", text->size(), " bytes exceeds the limit of ", kMaxStateJsonBytes);
  const std::string* crc = meta("dion.state.crc32c");
  if (!crc) corrupt("rank file has no 'dion.state.crc32c' metadata");
  const std::uint32_t want = parse_crc(*crc, "rank file 'dion.state.crc32c'");
  const std::uint32_t got = crc32c(*text);
  if (want != got)
    corrupt("checksum mismatch in the rank file's 'dion.state' metadata: stored ", crc_hex(want), ", computed ",
            crc_hex(got));
  RankIndex ix{parse_json(*text, "rank file 'dion.state'"), *crc, {}};
  const json& st = ix.state;
  if (!st.is_object()) corrupt("rank file 'dion.state' must be a JSON object");
  check_format(st, "rank file 'dion.state'");
  // The plain metadata strings are not checksummed; they must agree with the checksummed document.
  if (get_string(st, "format_version", "dion.state") != *ver)
    corrupt("rank file 'format_version' metadata ", q(*ver), " disagrees with dion.state's ",
            q(get_string(st, "format_version", "dion.state")));
  const auto& tensors = field(st, "tensors", "dion.state");
  if (!tensors.is_object()) corrupt("dion.state.tensors must be an object");
  std::map<std::string_view, const safetensors::TensorInfo*> by_name;
  for (const auto& t : h.tensors) {
    if (!tensors.contains(t.name)) corrupt("tensor ", q(t.name), " has no checksum in dion.state.tensors");
    by_name.emplace(t.name, &t);
  }
  ix.pieces.reserve(h.tensors.size());
  for (const auto& [name, entry] : tensors.items()) {
    const std::string w = concat("dion.state.tensors[", q(name), "]");
    const auto it = by_name.find(name);
    if (it == by_name.end()) corrupt("missing tensor ", q(name), ": listed in dion.state but not in the file");
    Piece p;
    p.file = file;
    p.name = name;
    p.dtype = it->second->dtype;
    p.local = it->second->shape;
    p.global = p.local;
    p.origin.assign(p.local.size(), 0);
    p.crc = parse_crc(get_string(entry, "crc32c", w), w);
    if (entry.contains("shard")) parse_piece_shard(entry["shard"], w + ".shard", p);
    ix.pieces.push_back(std::move(p));
  }
  return ix;
}

}  // namespace detail

/// A rank file whose structure, metadata and checksums were validated (not yet checked against an
/// optimizer). Holds the bytes.
struct RankFile {
  safetensors::File file;
  detail::json state;                ///< the parsed "dion.state" document
  std::vector<detail::Piece> pieces;  ///< its tensors and their places in the global tensors
  std::string state_crc;
};

/// Validate a rank file image: safetensors structure, format and version, the "dion.state" document
/// and its checksum, every tensor's placement, and the checksum of every tensor (pure; the fuzz
/// target calls it). `rank`: the rank the file belongs to (recorded in its pieces).
inline RankFile parse_rank_file(safetensors::File file, int rank = 0) {
  using namespace detail;
  RankIndex ix = index_rank(file.header(), rank);
  RankFile rf{std::move(file), std::move(ix.state), std::move(ix.pieces), std::move(ix.state_crc)};
  for (const auto& p : rf.pieces) {
    const std::uint32_t g = crc32c(rf.file.bytes(p.name));
    if (p.crc != g)
      corrupt("checksum mismatch in tensor ", q(p.name), ": stored ", crc_hex(p.crc), ", computed ", crc_hex(g));
  }
  return rf;
}

namespace detail {

/// Everything load() will write into the optimizer, validated.
struct Staged {
  std::vector<std::vector<std::byte>> tensors;  // one host image per entry of opt.state()
  std::vector<std::int64_t> steps;
  std::vector<std::pair<float, float>> lr_wd;
  std::int64_t skipped = 0;
};

/// A parameter's entry in dion.state.params: its global shape (the local "shape" with the sharded
/// dims at "shard.global_length" and, tensor parallel, "inner.global_length"), the sharded dims
/// and, for Dion in 1.1 files, its orientation.
struct ParamDesc {
  std::vector<std::int64_t> global;
  int shard_dim = 0, inner_dim = 0;
  std::optional<bool> transposed;
  bool operator==(const ParamDesc&) const = default;
};
inline ParamDesc param_desc(const json& e, const std::string& w) {
  ParamDesc d;
  const auto& shp = field(e, "shape", w);
  if (!shp.is_array() || shp.size() > 8) corrupt(w, ".shape must be an array of at most 8 dims");
  for (std::size_t k = 0; k < shp.size(); ++k) {
    if (!shp[k].is_number_integer() || shp[k].get<std::int64_t>() < 0 || shp[k].get<std::int64_t>() > kMaxExtent)
      corrupt(w, ".shape[", k, "] must be an integer in [0, 2^53]");
    d.global.push_back(shp[k].get<std::int64_t>());
  }
  const auto local = d.global;
  auto spec = [&](const json& sh, const std::string& ws, int& dim) {
    dim = static_cast<int>(get_int(sh, "dim", ws, -2, 0));
    if (dim == 0) return;
    const auto nd = static_cast<int>(local.size());
    if (nd + dim < 0) corrupt(ws, ".dim = ", dim, " on a parameter of ", nd, " dims");
    const auto k = static_cast<std::size_t>(nd + dim);
    const auto gl = get_int(sh, "global_length", ws, 0, kMaxExtent);
    const auto off = get_int(sh, "offset", ws, 0, gl);
    const auto len = get_int(sh, "local_length", ws, 0, gl - off);
    if (len != local[k]) corrupt(ws, ".local_length = ", len, " differs from dim ", k, " of the shape ", dims_str_of(local));
    d.global[k] = gl;
  };
  spec(field(e, "shard", w), w + ".shard", d.shard_dim);
  if (e.contains("inner")) {
    spec(e["inner"], w + ".inner", d.inner_dim);
    if (d.inner_dim != 0 && d.inner_dim == d.shard_dim) corrupt(w, ".shard and .inner both shard dim ", d.inner_dim);
  }
  if (e.contains("transposed")) {
    if (!e["transposed"].is_boolean()) corrupt(w, ".transposed must be a boolean");
    d.transposed = e["transposed"].get<bool>();
  }
  return d;
}

/// Rank file `k` must describe the same optimizer state as rank file 0 (one save): a file of another
/// checkpoint mixed in is refused.
inline void check_same_checkpoint(const json& a, const json& b, int k) {
  auto differ = [&](const char* what) {
    corrupt("rank files 0 and ", k, " disagree on ", what, ": they do not belong to the same checkpoint");
  };
  for (const char* key : {"optimizer", "groups", "skipped_steps"})
    if (field(a, key, "dion.state") != field(b, key, concat("rank file ", k, " dion.state"))) differ(key);
  const auto& pa = field(a, "params", "dion.state");
  const auto& pb = field(b, "params", concat("rank file ", k, " dion.state"));
  if (!pa.is_object() || !pb.is_object() || pa.size() != pb.size()) differ("the parameters");
  for (const auto& [n, e] : pa.items()) {
    const auto it = pb.find(n);
    if (it == pb.end()) differ("the parameters");
    const std::string w = concat("dion.state.params[", q(n), "]");
    if (!(param_desc(e, w) == param_desc(*it, concat("rank file ", k, " ", w)))) differ(concat("parameter ", q(n)).c_str());
  }
}

/// Check the checkpoint's description (rank file 0's document) against `opt`: identity, groups,
/// hyperparameters, parameters (global shapes, Dion orientation); stage the counters. Throws,
/// touching nothing.
template <class Opt>
void check_description(Opt& opt, const json& st, const LoadOptions& lo, Staged& s) {
  using A = EngineAccess<CheckpointAccessTag>;
  // Optimizer identity.
  const std::string have_opt = algorithm_name(A::default_algorithm(opt));
  const std::string opt_name = get_string(st, "optimizer", "dion.state");
  if (opt_name != have_opt)
    incompatible("optimizer mismatch: the checkpoint was saved by a ", q(opt_name), " optimizer, this one is '",
                 have_opt, "'");
  // Groups.
  const auto& groups = field(st, "groups", "dion.state");
  if (!groups.is_array()) corrupt("dion.state.groups must be an array");
  if (groups.size() != static_cast<std::size_t>(opt.num_groups()))
    incompatible("group count mismatch: the checkpoint has ", groups.size(), " groups, the optimizer ",
                 opt.num_groups());
  for (int g = 0; g < opt.num_groups(); ++g) {
    const json& gj = groups[static_cast<std::size_t>(g)];
    const std::string w = concat("dion.state.groups[", g, "]");
    const std::string alg = get_string(gj, "algorithm", w);
    if (alg != algorithm_name(opt.algorithm(g)))
      incompatible("group ", g, " algorithm mismatch: checkpoint ", q(alg), ", optimizer '",
                   algorithm_name(opt.algorithm(g)), "'");
    s.steps.push_back(get_int(gj, "step", w, 0, std::int64_t{1} << 53));
    const auto& names = field(gj, "params", w);
    if (!names.is_array()) corrupt(w, ".params must be an array");
    const auto& mine = A::group_params(opt, g);
    if (names.size() != mine.size())
      incompatible("group ", g, " parameter count mismatch: checkpoint ", names.size(), ", optimizer ", mine.size());
    for (std::size_t i = 0; i < mine.size(); ++i) {
      const std::string& have = A::param_name(opt, static_cast<std::size_t>(mine[i]));
      if (!names[i].is_string() || names[i].get<std::string>() != have)
        incompatible("group ", g, " parameter ", i, " mismatch: checkpoint ",
                     names[i].is_string() ? q(names[i].get<std::string>()) : std::string("(not a string)"),
                     ", optimizer '", have, "'");
    }
    const Options stored = options_from_json(field(gj, "hyperparameters", w), w + ".hyperparameters");
    const Options& cur = opt.options(g);
    for (const auto& d : diff_options(stored, cur)) {
      if (!d.structural && lo.hyperparameters == HyperparameterCheck::keep_current) continue;
      incompatible("group ", g, " (", algorithm_name(opt.algorithm(g)), ") hyperparameter '", d.name,
                   "' mismatch: checkpoint ", d.stored, ", optimizer ", d.current,
                   d.structural ? " (it decides state shapes or the work plan)"
                                : " (pass LoadOptions{.hyperparameters = keep_current} to keep the optimizer's)");
    }
    if (!(stored.lr >= 0) || !(stored.weight_decay >= 0))
      corrupt(w, " lr = ", stored.lr, ", weight_decay = ", stored.weight_decay, " must be >= 0");
    s.lr_wd.emplace_back(lo.restore_lr_wd ? stored.lr : opt.lr(g),
                         lo.restore_lr_wd ? stored.weight_decay : opt.weight_decay(g));
  }
  // Parameters: global shapes (a clear message before the state tensors are compared) and, for
  // Dion, the orientation, which decides what Q means.
  const auto& params = field(st, "params", "dion.state");
  if (!params.is_object()) corrupt("dion.state.params must be an object");
  for (std::size_t i = 0; i < opt.num_params(); ++i) {
    const std::string& n = A::param_name(opt, i);
    const auto it = params.find(n);
    if (it == params.end()) incompatible("parameter '", n, "' is missing from the checkpoint");
    const ParamDesc d = param_desc(*it, concat("dion.state.params[", q(n), "]"));
    const Shape gs = A::global_shape(opt, i);
    const std::vector<std::int64_t> mine = safetensors::shape_dims(gs);
    if (d.global != mine)
      incompatible("parameter '", n, "' shape mismatch: checkpoint ", dims_str_of(d.global), ", optimizer ",
                   dims_str_of(mine));
    if (opt.algorithm(A::param_group(opt, i)) == Algorithm::dion && mine.size() == 2) {
      const bool theirs = d.transposed.value_or(mine[0] < mine[1]);  // 1.0 files: one process, m < n
      const bool ours = A::transposed(opt, i);
      if (theirs != ours) {
        auto orient = [](bool t) { return t ? "transposed (Q is m x r)" : "untransposed (Q is n x r)"; };
        incompatible("parameter '", n, "' (Dion, ", mine[0], " x ", mine[1], ") orientation mismatch: the checkpoint's ",
                     "state is ", orient(theirs), ", this optimizer's is ", orient(ours),
                     "; a row-sharded (FSDP) Dion matrix is always transposed, an unsharded one only when wide "
                     "(m < n), so a tall or square matrix cannot move between FSDP and DDP / single-process "
                     "layouts (SPEC 1.5, 2.7)");
      }
    }
  }
  if (params.size() != opt.num_params())
    incompatible("parameter count mismatch: the checkpoint has ", params.size(), " parameters, the optimizer ",
                 opt.num_params());
  s.skipped = get_int(st, "skipped_steps", "dion.state", 0, std::numeric_limits<std::int64_t>::max());
}

/// One copy of a load plan: the region [lo, hi) (global coordinates) of state tensor `tensor`
/// (index into opt.state()) comes from `piece`.
struct CopyOp {
  std::size_t tensor = 0;
  const Piece* piece = nullptr;
  std::vector<std::int64_t> lo, hi;
};

/// Match every state tensor of `opt` with the pieces of the checkpoint's rank files that cover its
/// box (this rank's slice of the global tensor), check dtypes and global shapes, and plan the copies.
/// `needed[k]` is set for every rank file the plan reads. Throws, touching nothing.
template <class Opt>
std::vector<CopyOp> plan_load(Opt& opt, const std::vector<const std::vector<Piece>*>& files,
                              std::vector<char>& needed) {
  using A = EngineAccess<CheckpointAccessTag>;
  std::map<std::string, std::vector<const Piece*>, std::less<>> table;
  for (const auto* f : files)
    for (const auto& p : *f) table[p.name].push_back(&p);
  // The pieces of one tensor come from one save: same dtype and global shape.
  for (const auto& [name, ps] : table)
    for (const Piece* p : ps)
      if (p->dtype != ps[0]->dtype || p->global != ps[0]->global)
        corrupt("rank files ", ps[0]->file, " and ", p->file, " disagree on state tensor ", q(name), ": ",
                safetensors::dtype_name(ps[0]->dtype), " ", dims_str_of(ps[0]->global), " vs ",
                safetensors::dtype_name(p->dtype), " ", dims_str_of(p->global));
  const auto refs = opt.state();
  const auto layouts = A::state_layouts(opt);
  std::set<std::string, std::less<>> expected;
  std::vector<CopyOp> ops;
  for (std::size_t i = 0; i < refs.size(); ++i) {
    const auto& r = refs[i];
    const TensorLayout& l = layouts[i];
    expected.insert(r.name);
    const auto it = table.find(r.name);
    if (it == table.end()) incompatible("missing state tensor '", r.name, "' in the checkpoint");
    const Piece& p0 = *it->second.front();
    const auto want_dtype = safetensors::to_safetensors(r.view.dtype);
    if (p0.dtype != want_dtype)
      incompatible("state tensor '", r.name, "' dtype mismatch: checkpoint ", safetensors::dtype_name(p0.dtype),
                   ", optimizer ", safetensors::dtype_name(want_dtype));
    if (p0.global != l.global)
      incompatible("state tensor '", r.name, "' shape mismatch: checkpoint ", safetensors::detail::dims_str(p0.global),
                   ", optimizer ", safetensors::detail::dims_str(l.global));
    // This rank's box of the global tensor, cut into the cells of the grid that every piece
    // overlapping it draws (boundaries along each dim); each cell is copied from a piece that holds
    // it whole. Pieces of one save tile the tensor (FSDP / TP blocks), or repeat it (replicas).
    const std::size_t nd = l.global.size();
    std::vector<std::int64_t> lo = l.origin, hi(nd);
    bool empty = false;
    for (std::size_t k = 0; k < nd; ++k) {
      hi[k] = lo[k] + l.local[k];
      empty = empty || lo[k] >= hi[k];
    }
    if (empty) continue;  // an empty local piece: nothing to read
    std::vector<const Piece*> near;
    for (const Piece* p : it->second) {
      bool meets = true;
      for (std::size_t k = 0; k < nd; ++k)
        meets = meets && p->origin[k] < hi[k] && p->origin[k] + p->local[k] > lo[k];
      if (meets) near.push_back(p);
    }
    std::vector<std::vector<std::int64_t>> cuts(nd);
    for (std::size_t k = 0; k < nd; ++k) {
      cuts[k] = {lo[k], hi[k]};
      for (const Piece* p : near)
        for (const std::int64_t b : {p->origin[k], p->origin[k] + p->local[k]})
          if (b > lo[k] && b < hi[k]) cuts[k].push_back(b);
      std::sort(cuts[k].begin(), cuts[k].end());
      cuts[k].erase(std::unique(cuts[k].begin(), cuts[k].end()), cuts[k].end());
    }
    std::vector<std::size_t> cell(nd, 0);  // index of the cell along each dim
    for (;;) {
      CopyOp op{i, nullptr, std::vector<std::int64_t>(nd), std::vector<std::int64_t>(nd)};
      for (std::size_t k = 0; k < nd; ++k) {
        op.lo[k] = cuts[k][cell[k]];
        op.hi[k] = cuts[k][cell[k] + 1];
      }
      for (const Piece* p : near) {
        bool holds = true;
        for (std::size_t k = 0; k < nd; ++k)
          holds = holds && p->origin[k] <= op.lo[k] && op.hi[k] <= p->origin[k] + p->local[k];
        if (holds) {
          op.piece = p;
          break;
        }
      }
      if (!op.piece)
        corrupt("incomplete checkpoint: no rank file holds the block ", dims_str_of(op.lo), " to ", dims_str_of(op.hi),
                " (exclusive) of state tensor '", r.name, "' (global shape ", dims_str_of(p0.global), ")");
      needed[static_cast<std::size_t>(op.piece->file)] = 1;
      ops.push_back(std::move(op));
      bool done = true;  // next cell, the last dim fastest (a 0-d tensor has one cell)
      for (std::size_t k = nd; k-- > 0;) {
        if (++cell[k] + 1 < cuts[k].size()) {
          done = false;
          break;
        }
        cell[k] = 0;
      }
      if (done) break;
    }
  }
  for (const auto& [name, ps] : table)
    if (!expected.count(name)) incompatible("unexpected state tensor ", q(name), " in the checkpoint");
  return ops;
}

/// Copy the region [lo, hi) (global coordinates) from a row-major box of shape `ss` at `so` to one
/// of shape `ds` at `dst_org`; the region lies inside both (checked).
inline void copy_region(std::span<const std::byte> src, const std::vector<std::int64_t>& ss,
                        const std::vector<std::int64_t>& so, std::span<std::byte> dst,
                        const std::vector<std::int64_t>& ds, const std::vector<std::int64_t>& dst_org,
                        const std::vector<std::int64_t>& lo, const std::vector<std::int64_t>& hi, std::size_t esz) {
  const std::size_t nd = lo.size();
  if (nd == 0) {
    if (src.size() < esz || dst.size() < esz) throw InternalError("checkpoint: scalar copy out of range");
    std::memcpy(dst.data(), src.data(), esz);
    return;
  }
  for (std::size_t k = 0; k < nd; ++k)
    if (lo[k] < so[k] || hi[k] > so[k] + ss[k] || lo[k] < dst_org[k] || hi[k] > dst_org[k] + ds[k] || lo[k] >= hi[k])
      throw InternalError(concat("checkpoint: copy region out of range in dim ", k));
  std::vector<std::int64_t> sst(nd, 1), dst_st(nd, 1);
  for (std::size_t k = nd - 1; k > 0; --k) {
    sst[k - 1] = sst[k] * ss[k];
    dst_st[k - 1] = dst_st[k] * ds[k];
  }
  const auto run = static_cast<std::size_t>(hi[nd - 1] - lo[nd - 1]) * esz;
  std::vector<std::int64_t> at(lo);
  for (;;) {
    std::int64_t s = 0, t = 0;
    for (std::size_t k = 0; k < nd; ++k) {
      s += (at[k] - so[k]) * sst[k];
      t += (at[k] - dst_org[k]) * dst_st[k];
    }
    const auto sb = static_cast<std::size_t>(s) * esz, tb = static_cast<std::size_t>(t) * esz;
    if (sb + run > src.size() || tb + run > dst.size()) throw InternalError("checkpoint: copy out of range");
    std::memcpy(dst.data() + tb, src.data() + sb, run);
    // next index over every dim but the last
    std::size_t k = nd - 1;
    for (;;) {
      if (k == 0) return;
      --k;
      if (++at[k] < hi[k]) break;
      at[k] = lo[k];
    }
  }
}

/// Run a plan: `files[k]` is rank file k, validated, for every k the plan reads.
template <class Opt>
void execute_load(Opt& opt, const std::vector<CopyOp>& ops, const std::vector<const safetensors::File*>& files,
                  Staged& s) {
  using A = EngineAccess<CheckpointAccessTag>;
  const auto refs = opt.state();
  const auto layouts = A::state_layouts(opt);
  s.tensors.assign(refs.size(), {});
  for (std::size_t i = 0; i < refs.size(); ++i)
    s.tensors[i].assign(static_cast<std::size_t>(refs[i].view.shape.numel()) * dtype_size(refs[i].view.dtype),
                        std::byte{0});
  for (const auto& op : ops) {
    const Piece& p = *op.piece;
    const safetensors::File* f = files[static_cast<std::size_t>(p.file)];
    if (!f) throw InternalError(concat("checkpoint: rank file ", p.file, " was not read"));
    const TensorLayout& l = layouts[op.tensor];
    copy_region(f->bytes(p.name), p.local, p.origin, s.tensors[op.tensor], l.local, l.origin, op.lo, op.hi,
                safetensors::dtype_size(p.dtype));
  }
}

/// Write a validated stage into the optimizer. Nothing here can fail on host backends.
template <class Opt>
void commit(Opt& opt, const Staged& s) {
  auto& be = opt.backend();
  const auto refs = opt.state();
  for (std::size_t i = 0; i < refs.size(); ++i) {
    const auto& bytes = s.tensors[i];
    if (!bytes.empty()) be.copy_from_host(bytes.data(), refs[i].view.data, bytes.size());
  }
  be.synchronize();
  for (int g = 0; g < opt.num_groups(); ++g) {
    opt.set_step_count(g, s.steps[static_cast<std::size_t>(g)]);  // also Dion's AdamW device counter
    opt.set_lr(g, s.lr_wd[static_cast<std::size_t>(g)].first);
    opt.set_weight_decay(g, s.lr_wd[static_cast<std::size_t>(g)].second);
  }
  opt.set_skipped_steps(s.skipped);
}

/// CRC32C of a whole file, streamed (files this rank verifies but does not need).
/// Read the file `p` from its start to its end in chunks, handing each to `f` (which may throw; the
/// file is closed either way). IoError when it cannot be opened or read.
template <class F>
void read_file_chunks(const std::filesystem::path& p, F&& f) {
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  };
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError(concat("checkpoint: cannot open '", p.string(), "': ", safetensors::detail::errno_text(errno)));
  const Closer closer{fd};
  std::vector<std::byte> buf(std::size_t{1} << 20);
  for (;;) {
    const ssize_t r = ::read(fd, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw IoError(concat("checkpoint: reading '", p.string(), "' failed: ", safetensors::detail::errno_text(errno)));
    if (r == 0) return;
    f(std::span<const std::byte>(buf.data(), static_cast<std::size_t>(r)));
  }
}

inline std::uint32_t file_crc32c(const std::filesystem::path& p, std::uint64_t expect_bytes) {
  std::uint32_t crc = 0;
  std::uint64_t n = 0;
  read_file_chunks(p, [&](std::span<const std::byte> b) {
    crc = crc32c(b, crc);
    n += b.size();
  });
  if (n != expect_bytes)
    corrupt("'", p.string(), "' is ", n, " bytes, the manifest says ", expect_bytes, n < expect_bytes ? " (truncated)" : "");
  return crc;
}

/// Rethrow a checkpoint error with the file it concerns appended.
template <class F>
auto about_file(const std::filesystem::path& p, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const CheckpointIncompatible& e) {
    throw CheckpointIncompatible(concat(e.what(), " (", p.string(), ")"));
  } catch (const CheckpointError& e) {
    throw CheckpointError(concat(e.what(), " (", p.string(), ")"));
  }
}

}  // namespace detail

/// Load a single rank file image (no manifest) of a world-size-1 checkpoint into `opt`: the core of
/// load() for one process, also the fuzz entry. Local (not collective). Strong guarantee: validated
/// completely before `opt` is touched.
template <class Opt>
void load_bytes(Opt& opt, std::span<const std::byte> bytes, const LoadOptions& lo = {}) {
  using namespace detail;
  const RankFile rf = parse_rank_file(safetensors::File::view(bytes));
  const auto& layout = field(rf.state, "layout", "dion.state");
  const auto world = get_int(layout, "world_size", "dion.state.layout", 1, 1 << 20);
  const auto rank = get_int(layout, "rank", "dion.state.layout", 0, world - 1);
  if (world != 1)
    incompatible("layout mismatch: this rank file was saved at world size ", world, " (rank ", rank,
                 "); load_bytes() takes the one file of a world-size-1 checkpoint: load the checkpoint directory "
                 "with load() to reshard it");
  Staged s;
  check_description(opt, rf.state, lo, s);
  std::vector<char> needed(1, 0);
  const auto ops = plan_load(opt, {&rf.pieces}, needed);
  execute_load(opt, ops, {&rf.file}, s);
  commit(opt, s);
}

/// Read and validate the manifest of checkpoint directory `dir`.
inline Manifest read_manifest(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw IoError(concat("checkpoint: '", dir.string(), "' is not a directory"));
  const fs::path mp = dir / std::string(kManifestName);
  if (!fs::exists(mp, ec))
    throw CheckpointError(concat("checkpoint: incomplete checkpoint '", dir.string(), "': no ", kManifestName,
                                 " (the save did not finish, or this is not a dion checkpoint)"));
  std::string text;
  detail::read_file_chunks(mp, [&](std::span<const std::byte> b) {
    text.append(reinterpret_cast<const char*>(b.data()), b.size());
    if (text.size() > kMaxManifestBytes)
      detail::corrupt("'", mp.string(), "' exceeds the manifest limit of ", kMaxManifestBytes, " bytes");
  });
  return detail::about_file(mp, [&] { return parse_manifest(text); });
}

namespace detail {

/// Everything a load of `dir` needs on this rank, read and validated; no collective, no change to
/// `opt`. `ctx`: this rank's place in the loading world (it verifies rank files k ≡ rank mod world).
template <class Opt>
Staged prepare_load(Opt& opt, const std::filesystem::path& dir, const LoadOptions& lo, int world, int rank) {
  namespace fs = std::filesystem;
  const Manifest m = read_manifest(dir);
  const std::string have_opt = algorithm_name(EngineAccess<CheckpointAccessTag>::default_algorithm(opt));
  if (m.optimizer != have_opt)
    throw CheckpointIncompatible(concat("checkpoint: optimizer mismatch: '", dir.string(), "' was saved by a ",
                                        q(m.optimizer), " optimizer, this one is '", have_opt, "'"));
  // Every rank file must be there before any is read (C15).
  for (const auto& f : m.files) {
    std::error_code ec;
    if (!fs::exists(dir / f.name, ec))
      throw CheckpointError(concat("checkpoint: incomplete checkpoint '", dir.string(), "': the manifest names '",
                                   f.name, "', which is missing"));
  }
  // The header and state document of every rank file (not the data).
  const auto W = static_cast<std::size_t>(m.world_size);
  std::vector<RankIndex> idx(W);
  for (std::size_t k = 0; k < W; ++k) {
    const auto& fe = m.files[k];
    const fs::path p = dir / fe.name;
    std::error_code ec;
    const auto size = fs::file_size(p, ec);
    if (!ec && size != fe.bytes)
      throw CheckpointError(concat("checkpoint: '", p.string(), "' is ", size, " bytes, the manifest says ", fe.bytes,
                                   size < fe.bytes ? " (truncated)" : ""));
    idx[k] = about_file(p, [&] {
      RankIndex ix = index_rank(safetensors::File::load_header(p, std::min<std::uint64_t>(lo.max_file_bytes, fe.bytes)),
                                static_cast<int>(k));
      const auto& layout = field(ix.state, "layout", "dion.state");
      const auto world = get_int(layout, "world_size", "dion.state.layout", 1, 1 << 20);
      const auto rank = get_int(layout, "rank", "dion.state.layout", 0, world - 1);
      if (world != m.world_size || rank != static_cast<std::int64_t>(k))
        corrupt("the rank file says it is rank ", rank, " of world size ", world, "; the manifest lists it as rank ", k,
                " of ", m.world_size);
      if (k > 0) check_same_checkpoint(idx[0].state, ix.state, static_cast<int>(k));
      return ix;
    });
  }
  Staged s;
  about_file(dir / m.files[0].name, [&] { check_description(opt, idx[0].state, lo, s); });
  std::vector<const std::vector<Piece>*> pieces;
  for (const auto& ix : idx) pieces.push_back(&ix.pieces);
  std::vector<char> needed(W, 0);
  const auto ops = about_file(dir, [&] { return plan_load(opt, pieces, needed); });
  // Read the needed files whole (per-tensor and whole-file checksums); verify the others this rank
  // is responsible for (every file is verified by some rank).
  std::vector<std::optional<safetensors::File>> files(W);
  std::vector<const safetensors::File*> ptrs(W, nullptr);
  for (std::size_t k = 0; k < W; ++k) {
    const auto& fe = m.files[k];
    const fs::path p = dir / fe.name;
    const bool verify = static_cast<int>(k % static_cast<std::size_t>(world)) == rank;
    if (!needed[k] && !verify) continue;
    about_file(p, [&] {
      if (!needed[k]) {
        const std::uint32_t crc = file_crc32c(p, fe.bytes);
        if (crc != fe.crc32c)
          corrupt("checksum mismatch of the whole rank file: manifest ", crc_hex(fe.crc32c), ", computed ", crc_hex(crc));
        return;
      }
      auto file = safetensors::File::load(p, std::min<std::uint64_t>(lo.max_file_bytes, fe.bytes));
      // Per-tensor checksums first (they name the damaged entry), then the whole file (header bytes).
      const RankFile rf = parse_rank_file(file, static_cast<int>(k));
      const std::uint32_t crc = crc32c(file.buffer());
      if (crc != fe.crc32c)
        corrupt("checksum mismatch of the whole rank file: manifest ", crc_hex(fe.crc32c), ", computed ", crc_hex(crc));
      if (rf.state_crc != idx[k].state_crc) corrupt("the rank file changed while it was being read");
      files[k] = std::move(file);
      ptrs[k] = &*files[k];
    });
  }
  execute_load(opt, ops, ptrs, s);
  return s;
}

}  // namespace detail

/// Load the checkpoint directory `dir` into `opt` (built with the same parameters, groups and
/// options as the saved one, at any world size and layout). Strong guarantee: on any throw `opt` is
/// unchanged. Distributed: collective; every rank stages everything, then all agree before any rank
/// changes its state; a rank that rejects the checkpoint throws its own error, the others
/// CheckpointError naming that rank.
template <class Opt>
void load(Opt& opt, const std::filesystem::path& dir, const LoadOptions& lo = {}) {
  const auto ctx = detail::mesh_context(opt);
  if (ctx.distributed() && !detail::same_everywhere(ctx, ::dion::detail::fnv1a(dir.lexically_normal().string())))
    throw InvalidArgument(concat("checkpoint::load: the ranks name different directories (this rank: '", dir.string(),
                                 "'); call load() with the same directory on every rank"),
                          ctx.rank);
  detail::Staged s;
  detail::agreed_phase(
      ctx, [&] { s = detail::prepare_load(opt, dir, lo, ctx.world, ctx.rank); },
      [&](int bad) {
        throw CheckpointError(concat("checkpoint: loading '", dir.string(), "' failed on rank ", bad,
                                     " (see that rank's error); nothing was changed on rank ", ctx.rank),
                              ctx.rank);
      });
  detail::commit(opt, s);
}

}  // namespace checkpoint
}  // namespace dion
