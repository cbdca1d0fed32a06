// Checkpoints of a whole optimizer: save, validate, load (SPEC.md §4; RELIABILITY.md §1.7, C1–C18).
//
//   dion::checkpoint::save(opt, "ckpt/step-1000");   // a directory
//   dion::checkpoint::load(opt2, "ckpt/step-1000");  // opt2 built with the same parameters and groups
//
// What is saved: every state tensor by its stable name "<param>/<key>" (momentum, variance_neuron,
// Q, variance, step_dev) in its own dtype (F32 or BF16, raw bits), the step counter of every group,
// every group's algorithm and hyperparameters, the generator seed, the skipped-step counter, the
// optimizer's identity (default algorithm) and the layout (world size, rank, and each parameter's
// shard description; single process for now, the fields are there for resharding).
//
// Directory layout (format "dion.checkpoint" 1.0):
//   <dir>/rank-00000-of-00001.safetensors   one file per rank, readable by Python's `safetensors`
//   <dir>/manifest.json                     written last: the commit point
// A rank file's `__metadata__` holds "format" = "dion.checkpoint", "format_version" = "1.0",
// "dion.state" (a JSON document: optimizer, layout, groups, counters and one CRC32C per tensor) and
// "dion.state.crc32c" (the checksum of that JSON). The manifest lists every rank file with its size
// and a CRC32C of the whole file, so a flipped bit anywhere (header or payload) is detected; the
// per-tensor checksums then name the damaged entry.
// Checksum: CRC32C (Castagnoli, reflected polynomial 0x82F63B78, init and final xor 0xFFFFFFFF; the
// check value of "123456789" is 0xE3069283), written as 8 lowercase hex digits. CRC32C detects
// corruption, not tampering; the parser is memory-safe on any input regardless (fuzzed: tests/fuzz).
//
// Writing is crash-safe (RELIABILITY C3, C4, C15, C18): the whole checkpoint is first written into a
// staging directory next to <dir> (".<name>.tmp.<pid>.<n>"): every file through a temp file, fsync,
// rename, fsync(directory); the manifest last. Only then does the staging directory replace <dir>,
// atomically (renameat2 RENAME_EXCHANGE when <dir> already exists, rename otherwise), and the parent
// directory is fsync'ed. A crash or an I/O error (ENOSPC, EIO) at any point leaves <dir> either the
// old checkpoint or the new one, never a mixture; the staging directory is removed on error, and one
// left behind by a killed process is ignored by load() and removed by the next save() to the same
// place. save() refuses to replace a directory that holds anything but a checkpoint's files.
// Saving is deterministic: the same state saves to byte-identical files (C2).
//
// Loading gives the strong guarantee (RELIABILITY §2): everything is read into host memory and
// validated first — manifest present and complete, format version, file sizes and checksums, the
// safetensors structure (see safetensors.hpp), optimizer and per-group algorithm, parameter names
// and groups, every state tensor present with the expected dtype and shape and no extra one, every
// tensor checksum, hyperparameters — and only then copied into the optimizer, which cannot fail
// halfway. Any problem throws dion::CheckpointError (corrupt, truncated, incomplete) or its subclass
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
// included: the sketches are a pure function of (seed, parameter name, group step)). The parameters
// themselves are the model's and are not part of the optimizer checkpoint.
//
// Writing your own format. Everything a checkpoint holds is reachable through the public API:
//   for (auto& s : opt.state())            // every state tensor: s.name "<param>/<key>", s.key,
//     store(s.name, s.view.dtype,          //   s.view.dtype (f32 or bf16), s.view.shape; Dion's Q is
//           s.view.shape,                  //   "<param>/Q", AdamW's counter in Muon-family optimizers
//           opt.read_state(s.name));       //   "<param>/step_dev"; read_state is exact for f32, bf16
//   for (int g = 0; g < opt.num_groups(); ++g)
//     store_group(opt.algorithm(g), opt.options(g), opt.step_count(g));   // options: every knob + seed
// and back: opt.write_state(name, values) for every tensor, opt.set_step_count(g, step) for every
// group (this also restores the device step counter of AdamW groups inside Dion), and
// opt.set_lr(g, ..) / opt.set_weight_decay(g, ..). Build the new optimizer with the same parameters,
// groups and options (options cannot be changed after construction). Only skipped_steps() (a
// diagnostic counter) is not restorable through the public API; save() / load() keep it.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
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

#include "dion/checkpoint/safetensors.hpp"
#include "dion/core/error.hpp"
#include "dion/core/optimizer.hpp"
#include "dion/core/options.hpp"

namespace dion {

/// Tag of the checkpoint subsystem's access to the engine (see EngineAccess in core/optimizer.hpp).
struct CheckpointAccessTag;

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
  static DType param_dtype(const Opt& o, std::size_t param) { return o.params_[param].param.dtype; }
};

namespace checkpoint {

inline constexpr std::string_view kFormat = "dion.checkpoint";
inline constexpr int kFormatMajor = 1;
inline constexpr int kFormatMinor = 0;
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

/// The rank file of `opt` as a safetensors Writer (tensors by reference: `opt` must not step
/// while the Writer is alive). `host` receives the host copies of the state the Writer points to.
template <class Opt>
safetensors::Writer make_rank_writer(Opt& opt, std::vector<std::vector<std::byte>>& host) {
  using A = EngineAccess<CheckpointAccessTag>;
  using json = detail::json;
  auto& be = opt.backend();
  const auto refs = opt.state();
  host.clear();
  host.reserve(refs.size());
  safetensors::Writer w;
  json tensors = json::object();
  for (const auto& r : refs) {
    const std::size_t nbytes = static_cast<std::size_t>(r.view.shape.numel()) * dtype_size(r.view.dtype);
    host.emplace_back(nbytes);
    if (nbytes) be.copy_to_host(r.view.data, host.back().data(), nbytes);
  }
  be.synchronize();
  for (std::size_t i = 0; i < refs.size(); ++i) {
    const auto& r = refs[i];
    w.add_view(r.name, safetensors::to_safetensors(r.view.dtype), safetensors::shape_dims(r.view.shape), host[i]);
    tensors[r.name] = json{{"crc32c", crc_hex(crc32c(host[i]))}};
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
    params[A::param_name(opt, i)] = json{
        {"shape", json::parse(detail::dims_json(s))},
        {"dtype", std::string(safetensors::dtype_name(safetensors::to_safetensors(A::param_dtype(opt, i))))},
        {"shard", json{{"dim", sh.dim}, {"global_length", sh.global_length}, {"offset", sh.offset},
                       {"local_length", sh.local_length}}}};
  }
  const int world = 1;  // single process; a distributed save writes one file per rank
  const int rank = 0;
  json state = json{
      {"format", std::string(kFormat)},
      {"format_version", concat(kFormatMajor, ".", kFormatMinor)},
      {"optimizer", algorithm_name(A::default_algorithm(opt))},
      {"backend", std::string(Opt::backend_type::name)},
      {"layout", json{{"world_size", world}, {"rank", rank}}},
      {"skipped_steps", opt.skipped_steps()},
      {"groups", std::move(groups)},
      {"params", std::move(params)},
      {"tensors", std::move(tensors)},
  };
  const std::string text = state.dump();
  w.set_metadata("format", std::string(kFormat));
  w.set_metadata("format_version", concat(kFormatMajor, ".", kFormatMinor));
  w.set_metadata("dion.state", text);
  w.set_metadata("dion.state.crc32c", crc_hex(crc32c(text)));
  return w;
}

/// The rank file image of `opt` (single process): what save() writes as rank-00000-of-00001.
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
/// Throws IoError on any I/O failure, with `dir` left as it was.
template <class Opt>
void save(Opt& opt, const std::filesystem::path& dir_in, const SaveOptions& so = {}) {
  namespace fs = std::filesystem;
  using json = detail::json;
  using Comm = typename Opt::comm_type;
  if constexpr (Comm::distributed)
    throw NotSupported("checkpoint::save: distributed optimizers are not supported yet (single process only)");
  fs::path dir = dir_in.lexically_normal();
  if (!dir.has_filename()) dir = dir.parent_path();
  if (dir.empty() || dir.filename() == "." || dir.filename() == "..")
    throw InvalidArgument(concat("checkpoint::save: '", dir_in.string(), "' does not name a directory"));
  const fs::path parent = dir.has_parent_path() ? dir.parent_path() : fs::path(".");
  const std::string name = dir.filename().string();
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
  detail::remove_stale_staging(parent, name);

  static std::atomic<unsigned> counter{0};
  fs::path stage;
  for (int attempt = 0; attempt < 100; ++attempt) {
    stage = parent / concat(".", name, ".tmp.", ::getpid(), ".", counter.fetch_add(1));
    if (::mkdir(stage.c_str(), 0755) == 0) break;
    if (errno != EEXIST)
      throw IoError(concat("checkpoint::save: cannot create staging directory '", stage.string(), "': ",
                           safetensors::detail::errno_text(errno), "; '", dir.string(), "' is unchanged"));
    stage.clear();
  }
  if (stage.empty()) throw IoError("checkpoint::save: no free staging directory name");

  try {
    const int world = 1, rank = 0;
    const std::string rank_name = rank_file_name(rank, world);
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
    std::uint32_t file_crc = 0;
    std::uint64_t file_bytes = 0;
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
    json manifest = json{
        {"format", std::string(kFormat)},
        {"format_version", concat(kFormatMajor, ".", kFormatMinor)},
        {"checksum", "crc32c"},
        {"optimizer", algorithm_name(EngineAccess<CheckpointAccessTag>::default_algorithm(opt))},
        {"world_size", world},
        {"files", json::array({json{{"rank", rank}, {"name", rank_name}, {"bytes", file_bytes},
                                    {"crc32c", crc_hex(file_crc)}}})},
    };
    const std::string mtext = manifest.dump(2) + "\n";
    safetensors::atomic_write_file(stage / std::string(kManifestName), [&](safetensors::Sink& s) {
      s.write(std::as_bytes(std::span<const char>(mtext.data(), mtext.size())));
    });
    detail::publish(stage, dir, parent);
    detail::fsync_dir(parent, "save");
  } catch (...) {
    std::error_code ec2;
    fs::remove_all(stage, ec2);
    throw;
  }
  fs::remove_all(stage, ec);  // after an exchange: the previous checkpoint
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

/// A rank file whose structure, metadata and checksums were validated (not yet checked against an
/// optimizer). Holds the bytes.
struct RankFile {
  safetensors::File file;
  detail::json state;  ///< the parsed "dion.state" document
};

/// Validate a rank file image: safetensors structure, format and version, the "dion.state" document
/// and its checksum, and the checksum of every tensor (pure; the fuzz target calls it).
inline RankFile parse_rank_file(safetensors::File file) {
  using namespace detail;
  const auto fmt = file.metadata("format");
  if (!fmt) incompatible("rank file has no 'format' metadata: not a dion checkpoint");
  if (*fmt != kFormat) incompatible("rank file has format ", q(*fmt), ", expected '", kFormat, "'");
  const auto ver = file.metadata("format_version");
  if (!ver) corrupt("rank file has no 'format_version' metadata");
  parse_version(*ver, "rank file");
  const auto text = file.metadata("dion.state");
  if (!text) corrupt("rank file has no 'dion.state' metadata");
  if (text->size() > kMaxStateJsonBytes)
    corrupt("rank file 'dion.state' of ", text->size(), " bytes exceeds the limit of ", kMaxStateJsonBytes);
  const auto crc = file.metadata("dion.state.crc32c");
  if (!crc) corrupt("rank file has no 'dion.state.crc32c' metadata");
  const std::uint32_t want = parse_crc(*crc, "rank file 'dion.state.crc32c'");
  const std::uint32_t got = crc32c(*text);
  if (want != got)
    corrupt("checksum mismatch in the rank file's 'dion.state' metadata: stored ", crc_hex(want), ", computed ",
            crc_hex(got));
  RankFile rf{std::move(file), parse_json(*text, "rank file 'dion.state'")};
  const json& st = rf.state;
  if (!st.is_object()) corrupt("rank file 'dion.state' must be a JSON object");
  check_format(st, "rank file 'dion.state'");
  // The plain metadata strings are not checksummed; they must agree with the checksummed document.
  if (get_string(st, "format_version", "dion.state") != *ver)
    corrupt("rank file 'format_version' metadata ", q(*ver), " disagrees with dion.state's ",
            q(get_string(st, "format_version", "dion.state")));
  const auto& tensors = field(st, "tensors", "dion.state");
  if (!tensors.is_object()) corrupt("dion.state.tensors must be an object");
  for (const auto& t : rf.file.tensors())
    if (!tensors.contains(t.name)) corrupt("tensor ", q(t.name), " has no checksum in dion.state.tensors");
  for (const auto& [name, entry] : tensors.items()) {
    const std::string w = concat("dion.state.tensors[", q(name), "]");
    if (!rf.file.has(name)) corrupt("missing tensor ", q(name), ": listed in dion.state but not in the file");
    const std::uint32_t c = parse_crc(get_string(entry, "crc32c", w), w);
    const std::uint32_t g = crc32c(rf.file.bytes(name));
    if (c != g) corrupt("checksum mismatch in tensor ", q(name), ": stored ", crc_hex(c), ", computed ", crc_hex(g));
  }
  return rf;
}

namespace detail {

/// Everything load() will write into the optimizer, validated.
struct Staged {
  std::vector<std::pair<std::string, std::span<const std::byte>>> tensors;  // by state() order
  std::vector<std::int64_t> steps;
  std::vector<std::pair<float, float>> lr_wd;
  std::int64_t skipped = 0;
};

/// Check a validated rank file against `opt` and stage what a load writes. Throws, touching nothing.
template <class Opt>
Staged stage(Opt& opt, const RankFile& rf, const LoadOptions& lo) {
  using A = EngineAccess<CheckpointAccessTag>;
  const json& st = rf.state;
  Staged s;
  // Optimizer identity.
  const std::string have_opt = algorithm_name(A::default_algorithm(opt));
  const std::string opt_name = get_string(st, "optimizer", "dion.state");
  if (opt_name != have_opt)
    incompatible("optimizer mismatch: the checkpoint was saved by a ", q(opt_name), " optimizer, this one is '",
                 have_opt, "'");
  // Layout.
  const auto& layout = field(st, "layout", "dion.state");
  const auto world = get_int(layout, "world_size", "dion.state.layout", 1, 1 << 20);
  const auto rank = get_int(layout, "rank", "dion.state.layout", 0, world - 1);
  if (world != 1 || rank != 0)
    incompatible("layout mismatch: the checkpoint was saved at world size ", world, " (rank ", rank,
                 "), this optimizer runs in a single process (resharding is not supported yet)");
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
  // Parameters (shapes, for a clear message before the state tensors are compared).
  const auto& params = field(st, "params", "dion.state");
  if (!params.is_object()) corrupt("dion.state.params must be an object");
  for (std::size_t i = 0; i < opt.num_params(); ++i) {
    const std::string& n = A::param_name(opt, i);
    const auto it = params.find(n);
    if (it == params.end()) incompatible("parameter '", n, "' is missing from the checkpoint");
    const auto& shp = field(*it, "shape", concat("dion.state.params[", q(n), "]"));
    const std::string mine = dims_json(A::param_shape(opt, i));
    if (shp.dump() != mine)
      incompatible("parameter '", n, "' shape mismatch: checkpoint ", shp.dump(), ", optimizer ", mine);
  }
  if (params.size() != opt.num_params())
    incompatible("parameter count mismatch: the checkpoint has ", params.size(), " parameters, the optimizer ",
                 opt.num_params());
  // State tensors: same set, dtype and shape.
  std::set<std::string> expected;
  for (const auto& r : opt.state()) {
    expected.insert(r.name);
    if (!rf.file.has(r.name)) incompatible("missing state tensor '", r.name, "' in the checkpoint");
    const auto& t = rf.file.info(r.name);
    const auto want_dtype = safetensors::to_safetensors(r.view.dtype);
    if (t.dtype != want_dtype)
      incompatible("state tensor '", r.name, "' dtype mismatch: checkpoint ", t.dtype_name(), ", optimizer ",
                   safetensors::dtype_name(want_dtype));
    const auto want_shape = safetensors::shape_dims(r.view.shape);
    if (t.shape != want_shape)
      incompatible("state tensor '", r.name, "' shape mismatch: checkpoint ", safetensors::detail::dims_str(t.shape),
                   ", optimizer ", safetensors::detail::dims_str(want_shape));
    s.tensors.emplace_back(r.name, rf.file.bytes(t));
  }
  for (const auto& t : rf.file.tensors())
    if (!expected.count(t.name)) incompatible("unexpected state tensor ", q(t.name), " in the checkpoint");
  s.skipped = get_int(st, "skipped_steps", "dion.state", 0, std::numeric_limits<std::int64_t>::max());
  return s;
}

/// Write a validated stage into the optimizer. Nothing here can fail on host backends.
template <class Opt>
void commit(Opt& opt, const Staged& s) {
  using A = EngineAccess<CheckpointAccessTag>;
  auto& be = opt.backend();
  const auto refs = opt.state();
  for (std::size_t i = 0; i < refs.size(); ++i) {
    const auto& bytes = s.tensors[i].second;
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

}  // namespace detail

/// Load a single rank file image (no manifest) into `opt`: the core of load(), also the fuzz entry.
/// Strong guarantee: validated completely before `opt` is touched.
template <class Opt>
void load_bytes(Opt& opt, std::span<const std::byte> bytes, const LoadOptions& lo = {}) {
  const RankFile rf = parse_rank_file(safetensors::File::view(bytes));
  const auto s = detail::stage(opt, rf, lo);
  detail::commit(opt, s);
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
  const int fd = ::open(mp.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError(concat("checkpoint: cannot open '", mp.string(), "': ", safetensors::detail::errno_text(errno)));
  std::string text;
  std::array<char, 65536> buf{};
  for (;;) {
    const ssize_t r = ::read(fd, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      const int err = errno;
      ::close(fd);
      throw IoError(concat("checkpoint: reading '", mp.string(), "' failed: ", safetensors::detail::errno_text(err)));
    }
    if (r == 0) break;
    text.append(buf.data(), static_cast<std::size_t>(r));
    if (text.size() > kMaxManifestBytes) {
      ::close(fd);
      detail::corrupt("'", mp.string(), "' exceeds the manifest limit of ", kMaxManifestBytes, " bytes");
    }
  }
  ::close(fd);
  try {
    return parse_manifest(text);
  } catch (const CheckpointIncompatible& e) {
    throw CheckpointIncompatible(concat(e.what(), " (", mp.string(), ")"));
  } catch (const CheckpointError& e) {
    throw CheckpointError(concat(e.what(), " (", mp.string(), ")"));
  }
}

/// Load the checkpoint directory `dir` into `opt` (built with the same parameters, groups and
/// options as the saved one). Strong guarantee: on any throw `opt` is unchanged.
template <class Opt>
void load(Opt& opt, const std::filesystem::path& dir, const LoadOptions& lo = {}) {
  using Comm = typename Opt::comm_type;
  if constexpr (Comm::distributed)
    throw NotSupported("checkpoint::load: distributed optimizers are not supported yet (single process only)");
  const Manifest m = read_manifest(dir);
  const std::string have_opt = algorithm_name(EngineAccess<CheckpointAccessTag>::default_algorithm(opt));
  if (m.optimizer != have_opt)
    throw CheckpointIncompatible(concat("checkpoint: optimizer mismatch: '", dir.string(), "' was saved by a ",
                                        detail::q(m.optimizer), " optimizer, this one is '", have_opt, "'"));
  // Every rank file must be there before any is read (C15).
  for (const auto& f : m.files) {
    std::error_code ec;
    if (!std::filesystem::exists(dir / f.name, ec))
      throw CheckpointError(concat("checkpoint: incomplete checkpoint '", dir.string(), "': the manifest names '",
                                   f.name, "', which is missing"));
  }
  if (m.world_size != 1)
    throw CheckpointIncompatible(concat("checkpoint: layout mismatch: '", dir.string(), "' was saved at world size ",
                                        m.world_size, ", this optimizer runs in a single process (resharding is not "
                                        "supported yet)"));
  const auto& fe = m.files[0];
  const std::filesystem::path p = dir / fe.name;
  std::error_code ec;
  const auto size = std::filesystem::file_size(p, ec);
  if (!ec && size != fe.bytes)
    throw CheckpointError(concat("checkpoint: '", p.string(), "' is ", size, " bytes, the manifest says ", fe.bytes,
                                 size < fe.bytes ? " (truncated)" : ""));
  const auto file = safetensors::File::load(p, std::min<std::uint64_t>(lo.max_file_bytes, fe.bytes));
  try {
    // Per-tensor checksums first (they name the damaged entry), then the whole file (header bytes).
    const RankFile rf = parse_rank_file(file);
    const std::uint32_t crc = crc32c(file.buffer());
    if (crc != fe.crc32c)
      detail::corrupt("checksum mismatch of the whole rank file: manifest ", crc_hex(fe.crc32c), ", computed ",
                      crc_hex(crc));
    const auto s = detail::stage(opt, rf, lo);
    detail::commit(opt, s);
  } catch (const CheckpointIncompatible& e) {
    throw CheckpointIncompatible(concat(e.what(), " (", p.string(), ")"));
  } catch (const CheckpointError& e) {
    throw CheckpointError(concat(e.what(), " (", p.string(), ")"));
  }
}

}  // namespace checkpoint
}  // namespace dion
