// The generic optimizer engine shared by every named optimizer (Muon, NorMuon, Dion, Dion2, NorDion2,
// Lion, AdamW). It holds the parameter groups, the state (allocated at registration, exposed by stable
// names `<param>/<key>`), the workspace (sized at registration, bounded by `workspace_limit_bytes` per
// orthogonalization batch, never the whole model) and runs `step()`, which only enqueues work on the
// backend. The update rules live in algorithms/; this file is the bookkeeping around them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "dion/algorithms/context.hpp"
#include "dion/algorithms/dion.hpp"
#include "dion/algorithms/dion_mesh.hpp"
#include "dion/algorithms/muon_family.hpp"
#include "dion/algorithms/scalar.hpp"
#include "dion/comm/mesh.hpp"
#include "dion/comm/single.hpp"
#include "dion/core/concepts.hpp"
#include "dion/core/error.hpp"
#include "dion/core/geometry.hpp"
#include "dion/core/options.hpp"
#include "dion/core/random.hpp"
#include "dion/core/view.hpp"
#include "dion/ortho/newton_schulz.hpp"
#include "dion/ortho/qr.hpp"
#include "dion/precision/precision.hpp"

namespace dion {

/// A named state tensor of the optimizer, viewed in the backend's memory.
template <class Space>
struct StateRef {
  std::string name;  ///< "<param>/<key>"
  std::string key;   ///< momentum, variance_neuron, Q, variance, step_dev
  View<Space> view;  ///< packed, in the backend's memory space
};

namespace detail {

/// Which named optimizer owns the engine: decides allowed group algorithms and state key names.
enum class Family : std::uint8_t { ortho, dion, scalar };

template <class Backend>
struct StateTensor {
  std::string key;
  DType dtype = DType::f32;
  Shape shape;
  typename Backend::RawBuffer buf;
};

template <class Backend>
struct ParamRecord {
  using Space = typename Backend::Space;
  std::string name;
  int group = -1;
  View<Space> param;
  View<Space> grad;  // data == nullptr: no gradient this step (the parameter is skipped)
  // Takes part in this step (set by step()): has a gradient; distributed, a gradient on the ranks
  // that hold any of it (an empty local shard has nothing to point at but still communicates).
  bool live = false;
  std::vector<StateTensor<Backend>> state;
  std::uint64_t key = 0;  // stable random stream id: hash of the name
  ShardSpec shard;        // how this rank's piece sits in the global tensor (unsharded by default)
  Shape global_shape;     // the unsharded shape (== param.shape unless sharded)
  // Sharded (Muon family): first global row of every rank of the shard communicator, plus the
  // global row count at the end (size W+1); the shards are contiguous in rank order.
  std::vector<std::int64_t> shard_offsets;
  // Dion, tensor parallel: the sharding over Mesh::inner_shard, and the first index of every inner
  // rank's shard plus the global length (size W_i+1); empty when not inner-sharded.
  ShardSpec inner_shard;
  std::vector<std::int64_t> inner_offsets;
  // Dion
  bool transposed = false;
  std::int64_t rank = 0;

  StateTensor<Backend>* find(const std::string& k) {
    for (auto& s : state)
      if (s.key == k) return &s;
    return nullptr;
  }
  View<Space> state_view(const std::string& k) {
    auto* s = find(k);
    return packed_view<Space>(s->buf.data(), s->dtype, s->shape);
  }
};

struct GroupRecord {
  Algorithm algorithm = Algorithm::muon;
  Options opts;
  // step() calls since the count was last set (Dion's sketch streams and CQR warm-up read it);
  // step_count() subtracts the steps skipped since then (skip_base: the skip counter at that time)
  std::int64_t step = 0;
  std::int64_t skip_base = 0;
  std::vector<int> params;
};

/// A batch of same-shape matrices of one group, orthogonalized together.
struct ChunkItem {
  int slot = -1;
  std::int64_t b0 = 0, nb = 0;
};
struct Chunk {
  int group = -1;
  Algorithm algorithm = Algorithm::muon;
  std::int64_t rows = 0, cols = 0;  // matrix shape (Muon family: slot shape; Dion: parameter shape)
  DType dtype = DType::f32;         // parameter dtype (Dion chunks are keyed by it)
  std::vector<ChunkItem> items;
  std::int64_t count = 0;  // matrices in the chunk
  // Dion2 / NorDion2
  bool sel_rows = true;
  std::int64_t k = 0;
  // Dion
  bool transposed = false;
  std::int64_t p = 0, q = 0, r = 0;
  // Sharded chunks (Muon family: rows or columns sharded over the optimizer's communicator): index
  // into the engine's shard layouts (every matrix of the chunk is cut the same way); -1 = not sharded.
  int layout = -1;
  int shard_dim = 0;          // Muon family, sharded: the dim the shards cut (-2 rows, -1 columns)
  int inner_layout = -1;      // Dion, tensor parallel: index into the layouts of the inner shard offsets
  bool global_scope = false;  // Dion2 / NorDion2 selection_scope == global on a sharded chunk
};

/// A stable text of every hyperparameter (the configuration hash compared across ranks).
inline std::string options_fingerprint(const Options& o) {
  std::string s = concat(o.lr, '|', o.mu, '|', o.beta1, '|', o.beta2, '|', o.weight_decay, '|', o.epsilon, '|',
                         o.cautious_wd, '|', o.nesterov, '|', static_cast<int>(o.adjust_lr), '|', o.flatten, '|',
                         o.num_heads, '|', o.muon_beta2, '|', o.fraction, '|', o.ef_decay, '|',
                         static_cast<int>(o.selection_scope), '|', o.rank_fraction, '|', o.rank_multiple_of, '|',
                         o.power_iters, '|', static_cast<int>(o.qr_method), '|', o.cqr_warmup_steps, '|',
                         o.rcqr_oversample, '|', static_cast<int>(o.orthogonalizer), '|', o.ns_steps, '|', o.seed, '|',
                         static_cast<int>(o.non_finite), '|', o.workspace_limit_bytes, '|',
                         o.replicate_mesh_grad_sync, "|split");
  for (auto v : o.split_sizes) s += concat(',', v);
  return s;
}

inline std::int64_t align_up(std::int64_t v, std::int64_t a = 256) { return (v + a - 1) / a * a; }

}  // namespace detail

/// Privileged access to the engine's internals for dion's own subsystems (checkpoint I/O), one
/// specialization per subsystem tag; not for users.
template <class Tag>
struct EngineAccess;

/// The optimizer engine. Use the named aliases (dion::Muon, dion::Dion, ...) rather than this class.
///
/// Distributed (SPEC §2; a Comm with `distributed == true`, e.g. MpiComm, NcclComm, named in the Mesh):
/// * Construction, add_group(), add() and step() are collective: call them in the same order on every
///   rank. Each validates locally, then all ranks agree; a rank that rejects its input rethrows its
///   own error and the others throw ConfigMismatch, before anything changes. The configuration
///   (hyperparameters, names, global shapes, dtypes, sharding) is compared by hash: ConfigMismatch.
/// * step() first agrees on which parameters have a gradient (a mismatch is ConfigMismatch) and on
///   non-finite gradients (skip or throw NonFinite on every rank).
/// * Muon / NorMuon / Dion2 / NorDion2 take one 1-D mesh: Mesh::replicate (DDP: gradients already
///   averaged by the caller; each matrix is orthogonalized by one rank and all-gathered, bit-identical
///   to one process) or Mesh::outer_shard (FSDP: matrices row-sharded with ShardSpec{-2, ...} or,
///   for Muon and Dion2, column-sharded with ShardSpec{-1, ...}; NorMuon and NorDion2 normalize
///   whole rows and refuse column shards with NotSupported; unsharded matrices use the
///   data-parallel path over the same mesh).
/// * Dion takes any product of Mesh::replicate (data parallel: gradients averaged in place, or P and R
///   for compressed low rank; see Options::replicate_mesh_grad_sync and synchronize_for_checkpoint()),
///   Mesh::outer_shard (FSDP: a matrix's rows or columns sharded, the ShardSpec argument of add()) and
///   Mesh::inner_shard (tensor parallel: the other dim sharded, add()'s `inner` ShardSpec): DDP,
///   FSDP, HSDP (replicate × outer), TP, FSDP+TP (outer × inner) and all three (SPEC §2.5,
///   algorithms/dion_mesh.hpp). The communicators must be distinct and form a product mesh (checked
///   at construction). Unsharded matrices are data parallel over replicate (redundant over the rest).
template <Backend B, Communicator Comm = SingleProcess, PrecisionPolicy P = precision::Default>
class Optimizer {
  template <class Tag>
  friend struct EngineAccess;

  static_assert(comm_reaches_v<Comm, typename B::Space>,
                "dion: this communicator cannot reach the backend's memory (e.g. NcclComm needs CudaBackend, "
                "MpiComm works on host memory); pick a matching backend/communicator pair");

 public:
  using Space = typename B::Space;
  using backend_type = B;
  using comm_type = Comm;
  using precision_type = P;
  using ortho_t = typename P::ortho_t;

  /// Handle returned by add_group(): registers parameters into that group.
  class GroupRef {
   public:
    /// Register parameter `name` (stable, unique) with its gradient buffer (may be empty: set it
    /// later with set_grad). Returns *this for chaining.
    /// `shard`: how the view sits in the global tensor over the shard communicator (the Muon
    /// family's one mesh; Dion: Mesh::outer_shard). `inner` (Dion and Lion/AdamW groups only): the
    /// sharding over Mesh::inner_shard (tensor parallel), along the other matrix dim.
    GroupRef& add(const std::string& name, View<Space> param, View<Space> grad = {}, ShardSpec shard = {},
                  ShardSpec inner = {}) {
      opt_->add_param(index_, name, param, grad, shard, inner);
      return *this;
    }
    int index() const noexcept { return index_; }

   private:
    friend class Optimizer;
    GroupRef(Optimizer* o, int i) : opt_(o), index_(i) {}
    Optimizer* opt_;
    int index_;
  };

  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;
  Optimizer(Optimizer&&) noexcept = default;
  Optimizer& operator=(Optimizer&&) noexcept = default;
  ~Optimizer() = default;

  /// A new parameter group. Unset fields of `g` take the optimizer's Options; a field the group's
  /// algorithm does not read is an error.
  GroupRef add_group(const GroupOptions& g = {}) {
    const Algorithm a = g.algorithm.value_or(default_algorithm_);
    const std::string where = detail::concat("group ", groups_.size(), " (", algorithm_name(a), "): ");
    detail::GroupRecord rec;
    rec.algorithm = a;
    // distributed: every rank validates, then all agree (and compare the configuration) before any
    // rank changes anything, so a bad group on one rank makes every rank throw
    agreed(where + "add_group", [&] {
      check_algorithm_allowed(a, where);
      rec.opts = merge_options(defaults_, g, a, family_ == detail::Family::dion, where);
    });
    agree_config(where + "add_group",
                 detail::concat("group|", groups_.size(), '|', algorithm_name(a), '|', detail::options_fingerprint(rec.opts)));
    rec.skip_base = read_skip_count();
    groups_.push_back(std::move(rec));
    host_scalars_.resize(2 * groups_.size());
    write_group_scalars(static_cast<int>(groups_.size()) - 1);
    realloc_scalars();
    write_group_step(static_cast<int>(groups_.size()) - 1);
    return GroupRef(this, static_cast<int>(groups_.size()) - 1);
  }
  /// The handle of an existing group.
  GroupRef group(int index) {
    check_group(index);
    return GroupRef(this, index);
  }
  int num_groups() const noexcept { return static_cast<int>(groups_.size()); }
  std::size_t num_params() const noexcept { return params_.size(); }

  /// Point parameter `name`'s gradient at `grad` (same shape and dtype as the parameter), or pass
  /// an empty view to mark it as having no gradient (it is then skipped by step()).
  void set_grad(const std::string& name, View<Space> grad) {
    auto& p = params_[static_cast<std::size_t>(param_index(name))];
    if (grad.data != nullptr) check_grad(p.name, p.param, grad, static_cast<int>(&p - params_.data()));
    p.grad = grad;
  }
  void clear_grad(const std::string& name) { set_grad(name, {}); }

  // ------------------------------------------------------------ hyperparameters that change per step
  float lr(int group) const { return groups_.at(static_cast<std::size_t>(check_group(group))).opts.lr; }
  void set_lr(int group, float lr) {
    check_group(group);
    detail::check_range(std::isfinite(lr) && lr >= 0, "lr", lr, ">= 0 and finite",
                        detail::concat("group ", group, ": "));
    groups_[static_cast<std::size_t>(group)].opts.lr = lr;
    write_group_scalars(group);
  }
  float weight_decay(int group) const {
    return groups_.at(static_cast<std::size_t>(check_group(group))).opts.weight_decay;
  }
  void set_weight_decay(int group, float wd) {
    check_group(group);
    detail::check_range(std::isfinite(wd) && wd >= 0, "weight_decay", wd, ">= 0 and finite",
                        detail::concat("group ", group, ": "));
    groups_[static_cast<std::size_t>(group)].opts.weight_decay = wd;
    write_group_scalars(group);
  }
  const Options& options(int group) const { return groups_.at(static_cast<std::size_t>(check_group(group))).opts; }
  Algorithm algorithm(int group) const { return groups_.at(static_cast<std::size_t>(check_group(group))).algorithm; }
  /// Steps taken by a group (counts every step() that was not skipped). Under the default
  /// NonFinitePolicy::skip_step the skip is decided in backend memory, so on a GPU this reads a
  /// counter back (one synchronization of the backend's stream); step() itself never does.
  std::int64_t step_count(int group) const {
    const auto& g = groups_.at(static_cast<std::size_t>(check_group(group)));
    return g.step - (read_skip_count() - g.skip_base);
  }
  void set_step_count(int group, std::int64_t s) {
    check_group(group);
    DION_CHECK(s >= 0, InvalidArgument, "step count = ", s, " must be >= 0");
    auto& g = groups_[static_cast<std::size_t>(group)];
    g.step = s;
    g.skip_base = read_skip_count();
    write_group_step(group);
  }

  /// Steps skipped because a gradient held NaN/Inf (NonFinitePolicy::skip_step); reads the counter
  /// from backend memory (a synchronization on a GPU).
  std::int64_t skipped_steps() const { return read_skip_count(); }
  /// Whether the last step() was skipped (reads the flag from backend memory).
  bool last_step_skipped() const {
    int f = 0;
    backend_->copy_to_host(skip_flag_ptr(), &f, sizeof(int));
    backend_->synchronize();
    return f != 0;
  }
  /// Set the skipped-step counter (checkpoint restore); step_count() of every group is unchanged.
  void set_skipped_steps(std::int64_t n) {
    DION_CHECK(n >= 0, InvalidArgument, "skipped steps = ", n, " must be >= 0");
    const std::int64_t old = read_skip_count();
    for (auto& g : groups_) g.skip_base += n - old;
    backend_->copy_from_host(&n, skip_count_ptr(), sizeof(n));
    backend_->synchronize();
  }

  // ------------------------------------------------------------ state by name
  /// Every state tensor, in registration order, named "<param>/<key>".
  std::vector<StateRef<Space>> state() {
    std::vector<StateRef<Space>> out;
    for (auto& p : params_)
      for (auto& s : p.state)
        if (exported(p, s.key))
          out.push_back({p.name + "/" + s.key, s.key, detail::packed_view<Space>(s.buf.data(), s.dtype, s.shape)});
    return out;
  }
  /// One state tensor by its name "<param>/<key>".
  StateRef<Space> state(const std::string& name) {
    for (auto& s : state())
      if (s.name == name) return s;
    throw InvalidArgument(detail::concat("state: no tensor named '", name, "'"));
  }
  /// Copy a state tensor to host floats (any dtype), through the backend.
  std::vector<float> read_state(const std::string& name) {
    const auto s = state(name);
    return read_view(s.view);
  }
  /// Overwrite a state tensor from host floats (rounded to its dtype). Size must match.
  void write_state(const std::string& name, std::span<const float> values) {
    const auto s = state(name);
    write_view(s.view, values);
  }
  /// Names of the registered parameters, in registration order.
  std::vector<std::string> param_names() const {
    std::vector<std::string> n;
    for (const auto& p : params_) n.push_back(p.name);
    return n;
  }
  /// The parameter view registered under `name`.
  View<Space> param(const std::string& name) const { return params_[static_cast<std::size_t>(param_index(name))].param; }
  /// Total bytes of optimizer state, and of the step workspace.
  std::int64_t state_bytes() const {
    std::int64_t n = 0;
    for (const auto& p : params_)
      for (const auto& s : p.state) n += static_cast<std::int64_t>(s.buf.bytes());
    return n;
  }
  std::int64_t workspace_bytes() const noexcept { return static_cast<std::int64_t>(workspace_.bytes()); }

  B& backend() noexcept { return *backend_; }

  /// One optimizer step over every parameter that has a gradient. Enqueues work on the backend; no
  /// allocation happens here (everything was sized at registration).
  ///
  /// Non-finite gradients (Options::non_finite): `skip_step` (default) raises a flag in backend
  /// memory and predicates every write to parameters and state on it, so a step with a NaN/Inf
  /// gradient changes nothing (only the skip counter) without any host synchronization, and the
  /// whole step can be captured in a CUDA graph; `raise` checks on the host first (a
  /// synchronization) and throws NonFinite naming the parameter; `propagate` checks nothing.
  void step() {
    step_prologue();
    const bool predicated = defaults_.non_finite == NonFinitePolicy::skip_step;
    backend_->copy_from_host(host_scalars_.data(), scalars_.data(), host_scalars_.size() * sizeof(float));
    if (predicated) raise_skip_flag();
    try {
      for (auto& g : groups_) ++g.step;
      if (family_ == detail::Family::dion) advance_group_steps();
      for (auto& ch : chunks_) run_chunk(ch);
      for (int gi = 0; gi < num_groups(); ++gi) {
        auto& g = groups_[static_cast<std::size_t>(gi)];
        if (!is_scalar_algorithm(g.algorithm)) continue;
        detail::BatchScope batch(*backend_);
        for (int pi : g.params) run_scalar(gi, params_[static_cast<std::size_t>(pi)]);
        batch.finish();
      }
    } catch (...) {
      if (predicated) backend_->set_skip(nullptr);
      throw;
    }
    if (predicated) {
      backend_->set_skip(nullptr);
      backend_->accumulate_flag(skip_flag_ptr(), skip_count_ptr());
    }
  }

 protected:
  Optimizer(B& backend, Options opts, Algorithm default_algorithm, detail::Family family, Mesh<Comm> mesh = {})
      : backend_(&backend), defaults_(std::move(opts)), default_algorithm_(default_algorithm), family_(family),
        mesh_(mesh) {
    skipbuf_ = backend_->alloc_bytes(64);
    const std::int64_t zeros[2] = {0, 0};
    backend_->copy_from_host(zeros, skipbuf_.data(), sizeof(zeros));
    backend_->synchronize();
    for (Comm* c : std::initializer_list<Comm*>{mesh_.replicate, mesh_.outer_shard, mesh_.inner_shard})
      if (c && std::find(mesh_comms_.begin(), mesh_comms_.end(), c) == mesh_comms_.end()) mesh_comms_.push_back(c);
    // the Muon family's one 1-D mesh; Dion: replicate for unsharded matrices (shard_comm_: outer)
    ortho_comm_ = family_ == detail::Family::dion ? mesh_.replicate
                                                  : (mesh_.outer_shard ? mesh_.outer_shard : mesh_.replicate);
    shard_comm_ = mesh_.outer_shard ? mesh_.outer_shard : mesh_.replicate;
    agreed("optimizer construction", [&] {
      validate_mesh();
      validate_options(defaults_, default_algorithm_, "optimizer options: ");
    });
    std::string fp = detail::concat("ctor|", algorithm_name(default_algorithm_), '|', static_cast<int>(family_), '|',
                                    detail::options_fingerprint(defaults_));
    for (Comm* c : std::initializer_list<Comm*>{mesh_.replicate, mesh_.outer_shard, mesh_.inner_shard}) fp += detail::concat('|', c ? c->size() : 0);
    agree_config("optimizer construction", fp);
    agreed("optimizer construction (mesh)", [&] { check_product_mesh(); });
  }

 public:
  /// Dion with a replicate communicator and replicate_mesh_grad_sync: average every state tensor
  /// (momentum, Q, scalar-group moments) over the replicate ranks (SPEC §2.6). With compressed
  /// synchronization each replica keeps its own momentum; call this before saving a checkpoint so
  /// that the saved state is the replicas' mean. A no-op otherwise. Collective: every rank calls it.
  void synchronize_for_checkpoint() {
    if constexpr (Comm::distributed) {
      if (family_ != detail::Family::dion || !mesh_.replicate || !defaults_.replicate_mesh_grad_sync) return;
      backend_->synchronize();
      for (auto& p : params_)
        for (auto& st : p.state) {
          if (st.key == "step_dev" || st.shape.numel() == 0) continue;
          dispatch_dtype(st.dtype, [&]<class T>() {
            detail::average_in_place(*mesh_.replicate,
                                     packed<T, Space>(static_cast<T*>(st.buf.data()), 1, 1, st.shape.numel()));
          });
        }
      backend_->synchronize();
    }
  }

 private:
  // ============================================================ distributed agreement
  // Every registration call is collective on a distributed mesh: validate locally, agree on the
  // outcome (a rank that failed rethrows its own error, the others throw ConfigMismatch), then
  // compare a hash of the configuration. Sequential agreement over each mesh dimension is global
  // agreement, because the mesh is a product of its dimensions.
  std::vector<Comm*> mesh_comms_;
  Comm* ortho_comm_ = nullptr;  // the Muon family's 1-D communicator; Dion: the replicate one
  Comm* shard_comm_ = nullptr;  // the communicator sharded matrices are split over
  std::vector<std::vector<std::int64_t>> layouts_;  // distinct shard layouts of sharded chunks

  int my_rank() const {
    if constexpr (Comm::distributed) {
      if (!mesh_comms_.empty()) return mesh_comms_.front()->rank();
    }
    return 0;
  }
  bool mesh_all_agree(bool ok) {
    if constexpr (Comm::distributed)
      for (Comm* c : mesh_comms_) ok = c->all_agree(ok);
    return ok;
  }
  template <class F>
  void agreed(const std::string& what, F&& f) {
    if constexpr (!Comm::distributed) {
      f();
    } else {
      if (mesh_comms_.empty()) return f();
      std::exception_ptr err;
      try {
        f();
      } catch (const CommError&) {
        throw;  // the communicator itself failed: agreeing would fail too
      } catch (...) {
        err = std::current_exception();
      }
      const bool ok = mesh_all_agree(!err);
      if (err) std::rethrow_exception(err);
      if (!ok)
        throw ConfigMismatch(detail::concat(what, ": rejected on another rank (see that rank's error); nothing was "
                                                  "changed on rank ",
                                            my_rank()),
                             my_rank());
    }
  }
  void agree_config(const std::string& what, const std::string& fingerprint) {
    if constexpr (Comm::distributed) {
      if (mesh_comms_.empty()) return;
      bool same = true;
      for (Comm* c : mesh_comms_) {
        const bool s = c->same_everywhere(detail::fnv1a(fingerprint));
        same = same && s;
      }
      if (!mesh_all_agree(same))
        throw ConfigMismatch(
            detail::concat(what, ": the ranks' configurations differ (hash compare on rank ", my_rank(),
                           "); every rank must create the same groups and register the same parameters (names, "
                           "global shapes, dtypes, sharding) with the same hyperparameters, in the same order"),
            my_rank());
    } else {
      (void)what;
      (void)fingerprint;
    }
  }
  void validate_mesh() const {
    if constexpr (Comm::distributed) {
      if (family_ == detail::Family::dion) {
        const Comm* r = mesh_.replicate;
        const Comm* o = mesh_.outer_shard;
        const Comm* i = mesh_.inner_shard;
        DION_CHECK(!(r && (r == o || r == i)) && !(o && o == i), InvalidArgument,
                   "Dion: Mesh::replicate, outer_shard and inner_shard must be distinct communicators (one per mesh "
                   "dimension); the same one was passed for ",
                   r && r == o ? "replicate and outer_shard" : r && r == i ? "replicate and inner_shard"
                                                                       : "outer_shard and inner_shard");
      } else {
        DION_CHECK(!mesh_.inner_shard, NotSupported, algorithm_name(default_algorithm_),
                   ": no tensor-parallel (inner_shard) support (SPEC §2.1); pass one 1-D mesh");
        DION_CHECK(!(mesh_.replicate && mesh_.outer_shard), InvalidArgument, algorithm_name(default_algorithm_),
                   ": takes exactly one 1-D mesh (replicate for data parallel, or outer_shard for FSDP; with "
                   "HSDP pass only the shard mesh), got both");
      }
    }
  }
  /// The mesh dimensions must form a product: every member of one dimension's communicator holds
  /// the same rank (and size) in each other dimension. Catches a communicator passed for two
  /// dimensions (two duplicates of one world) or groups split the wrong way, which would otherwise
  /// pair mismatched blocks in the collectives. Collective over every mesh communicator.
  void check_product_mesh() {
    if constexpr (Comm::distributed) {
      if (mesh_comms_.size() < 2) return;
      Comm* dims[3] = {mesh_.replicate, mesh_.outer_shard, mesh_.inner_shard};
      const char* names[3] = {"replicate", "outer_shard", "inner_shard"};
      std::int64_t mine[6];
      for (int d = 0; d < 3; ++d) {
        mine[2 * d] = dims[d] ? dims[d]->rank() : 0;
        mine[2 * d + 1] = dims[d] ? dims[d]->size() : 1;
      }
      std::string err;
      for (int d = 0; d < 3; ++d) {
        Comm* c = dims[d];
        if (!c) continue;
        std::vector<std::int64_t> all(static_cast<std::size_t>(6 * c->size()));
        detail::host_all_gather(*c, mine, all.data(), 6);  // every gather completes before any throw
        for (int j = 0; j < c->size() && err.empty(); ++j)
          for (int e = 0; e < 3 && err.empty(); ++e) {
            if (e == d) continue;
            const auto rk = all[static_cast<std::size_t>(6 * j + 2 * e)], sz = all[static_cast<std::size_t>(6 * j + 2 * e + 1)];
            if (rk != mine[2 * e] || sz != mine[2 * e + 1])
              err = detail::concat("Mesh: the communicators do not form a product mesh: over ", names[d], ", rank ", j,
                                   " is ", names[e], " rank ", rk, " of ", sz, " but rank ", c->rank(), " is ", names[e],
                                   " rank ", mine[2 * e], " of ", mine[2 * e + 1], "; every ", names[d],
                                   " group must hold exactly one rank of each other mesh dimension (was one "
                                   "communicator passed for two dimensions?)");
          }
      }
      DION_CHECK(err.empty(), InvalidArgument, err);
    }
  }
  /// Before anything changes in step(): all ranks agree on which parameters have a gradient and,
  /// under NonFinitePolicy::raise, on whether any gradient is non-finite (then every rank throws).
  void step_prologue() {
    bool local_bad = false;
    if (defaults_.non_finite == NonFinitePolicy::raise) local_bad = !check_finite_local();
    for (auto& p : params_) p.live = p.grad.data != nullptr;
    if constexpr (Comm::distributed) {
      if (!mesh_comms_.empty()) {
        // one MAX all-reduce per mesh dimension of (has a gradient, lacks one) per parameter, from
        // the ranks that hold part of it, and the non-finite flag
        const std::size_t n = params_.size();
        auto& v = host_presence_;
        v.assign(2 * n + 1, 0);
        for (std::size_t i = 0; i < n; ++i) {
          if (params_[i].param.shape.numel() == 0) continue;  // an empty shard has no say
          v[params_[i].grad.data ? i : n + i] = 1;
        }
        v[2 * n] = local_bad ? 1 : 0;
        for (Comm* c : mesh_comms_) detail::host_all_reduce(*c, v.data(), v.size(), ReduceOp::max);
        for (std::size_t i = 0; i < n; ++i)
          if (v[i] && v[n + i])
            throw ConfigMismatch(detail::concat("step: the ranks disagree on whether parameter '", params_[i].name,
                                                "' has a gradient (seen on rank ", my_rank(),
                                                "); every rank must pass gradients for the same parameters (a rank "
                                                "with nothing to contribute passes zeros). Nothing was changed"),
                                 my_rank());
        for (std::size_t i = 0; i < n; ++i) params_[i].live = v[i] != 0;
        if (v[2 * n] && !local_bad && defaults_.non_finite == NonFinitePolicy::raise)
          throw NonFinite(detail::concat("step: a gradient on another rank holds NaN or Inf (non_finite = raise); "
                                         "nothing was changed on rank ", my_rank()),
                          my_rank());
        local_bad = v[2 * n] != 0;
      }
    }
    if (local_bad) throw NonFinite(first_nonfinite_message_);
  }
  /// NonFinitePolicy::skip_step: the flag ← any gradient non-finite (on any rank), computed and
  /// agreed in backend memory; the backend then predicates the step's writes on it.
  void raise_skip_flag() {
    int* flag = skip_flag_ptr();
    static constexpr int zero = 0;
    backend_->copy_from_host(&zero, flag, sizeof(int));
    detail::BatchScope batch(*backend_);  // one multi-tensor pass over the gradients
    for (const auto& p : params_) {
      if (!p.grad.data) continue;
      dispatch_dtype(p.grad.dtype, [&]<class T>() { backend_->nonfinite_flag(p.grad.template mat<T>(), flag); });
    }
    batch.finish();
    if constexpr (Comm::distributed)
      for (Comm* c : mesh_comms_) c->all_reduce(flag, 1, ReduceOp::max);
    backend_->set_skip(flag);
  }
  // The skip flag (int) and the skipped-step counter (int64) in backend memory.
  int* skip_flag_ptr() const { return static_cast<int*>(const_cast<void*>(skipbuf_.data())); }
  std::int64_t* skip_count_ptr() const {
    return reinterpret_cast<std::int64_t*>(static_cast<char*>(const_cast<void*>(skipbuf_.data())) + 8);
  }
  std::int64_t read_skip_count() const {
    std::int64_t n = 0;
    backend_->copy_to_host(skip_count_ptr(), &n, sizeof(n));
    backend_->synchronize();
    return n;
  }

  // ============================================================ registration
  int check_group(int g) const {
    DION_CHECK(g >= 0 && g < static_cast<int>(groups_.size()), InvalidArgument, "group index ", g,
               " is out of range [0, ", groups_.size(), ")");
    return g;
  }
  int param_index(const std::string& name) const {
    for (std::size_t i = 0; i < params_.size(); ++i)
      if (params_[i].name == name) return static_cast<int>(i);
    throw InvalidArgument(detail::concat("no parameter named '", name, "'"));
  }
  void check_algorithm_allowed(Algorithm a, const std::string& where) const {
    if (is_scalar_algorithm(a) || a == default_algorithm_) return;
    throw InvalidArgument(detail::concat(where, "algorithm '", algorithm_name(a), "' is not available in this optimizer (",
                                         algorithm_name(default_algorithm_),
                                         "); allowed: ", algorithm_name(default_algorithm_), ", lion, adamw"));
  }
  static void check_layout(const std::string& what, const View<Space>& v) {
    DION_CHECK(v.shape.ndim >= 0 && v.shape.ndim <= 4, InvalidArgument, what, ": ", v.shape.ndim,
               " dims (allowed 0 to 4)");
    for (int i = 0; i < v.shape.ndim; ++i)
      DION_CHECK(v.shape[i] >= 0, InvalidArgument, what, ": negative dim ", v.shape[i]);
    DION_CHECK(v.data != nullptr || v.shape.numel() == 0, InvalidArgument, what, ": null data pointer");
    DION_CHECK(v.row_stride() >= v.cols(), InvalidArgument, what, ": leading dimension ", v.row_stride(),
               " < cols ", v.cols());
    DION_CHECK(v.batch() <= 1 || v.matrix_stride() >= v.rows() * v.row_stride(), InvalidArgument, what,
               ": batch stride ", v.matrix_stride(), " < rows*ld ", v.rows() * v.row_stride(),
               " (matrices would overlap)");
    const auto align = static_cast<std::uintptr_t>(dtype_size(v.dtype));
    DION_CHECK(reinterpret_cast<std::uintptr_t>(v.data) % align == 0, InvalidArgument, what, ": pointer ", v.data,
               " is not aligned to ", align, " bytes for ", dtype_name(v.dtype));
  }
  static bool overlaps(const View<Space>& a, const View<Space>& b) {
    if (!a.data || !b.data || a.span_bytes() == 0 || b.span_bytes() == 0) return false;
    const auto a0 = reinterpret_cast<std::uintptr_t>(a.data), b0 = reinterpret_cast<std::uintptr_t>(b.data);
    return a0 < b0 + static_cast<std::uintptr_t>(b.span_bytes()) &&
           b0 < a0 + static_cast<std::uintptr_t>(a.span_bytes());
  }
  void check_grad(const std::string& name, const View<Space>& param, const View<Space>& grad, int self) const {
    check_layout(detail::concat("parameter '", name, "' gradient"), grad);
    DION_CHECK(grad.shape == param.shape, ShapeMismatch, "parameter '", name, "': gradient shape ", grad.shape.str(),
               " differs from parameter shape ", param.shape.str());
    DION_CHECK(grad.dtype == param.dtype, DtypeMismatch, "parameter '", name, "': gradient dtype ",
               dtype_name(grad.dtype), " differs from parameter dtype ", dtype_name(param.dtype));
    DION_CHECK(!overlaps(grad, param), InvalidArgument, "parameter '", name, "': gradient memory overlaps the parameter");
    for (std::size_t i = 0; i < params_.size(); ++i) {
      if (static_cast<int>(i) == self) continue;
      DION_CHECK(!overlaps(grad, params_[i].param), InvalidArgument, "parameter '", name,
                 "': gradient memory overlaps parameter '", params_[i].name, "'");
    }
  }

  void add_param(int gi, const std::string& name, View<Space> param, View<Space> grad, ShardSpec shard,
                 ShardSpec inner = {}) {
    const std::string where0 = detail::concat("parameter '", name, "' (group ", gi, "): add");
    detail::ParamRecord<B> rec;
    agreed(where0, [&] { rec = prepare_param(gi, name, param, grad, shard, inner); });
    if constexpr (Comm::distributed) {
      const auto& gs = rec.global_shape;
      agree_config(where0, detail::concat("param|", params_.size(), '|', name, '|', gi, '|', gs.str(), '|',
                                          static_cast<int>(param.dtype), '|', rec.shard.dim, '|',
                                          rec.shard.global_length, '|', rec.inner_shard.dim, '|',
                                          rec.inner_shard.global_length));
      if ((rec.shard.sharded() || rec.inner_shard.sharded()) &&
          !is_scalar_algorithm(groups_[static_cast<std::size_t>(gi)].algorithm))
        exchange_layout(rec, where0);
    }
    auto& g = groups_[static_cast<std::size_t>(gi)];
    const Algorithm a = g.algorithm;
    params_.push_back(std::move(rec));
    g.params.push_back(static_cast<int>(params_.size()) - 1);
    if (a == Algorithm::dion) init_dion_q(params_.back());
    replan();
  }

  /// The shard layout of a sharded matrix: every rank's (offset, length), gathered over the
  /// communicator of each sharded mesh dimension (the optimizer's shard communicator; Dion's
  /// inner_shard); the shards must tile the global dim contiguously in rank order (FSDP's chunking,
  /// with uneven and empty shards allowed), and on a 2-D mesh every group must see the same layout.
  void exchange_layout(detail::ParamRecord<B>& rec, const std::string& where) {
    if constexpr (Comm::distributed) {
      struct Dim {
        Comm* c;
        const ShardSpec* sh;
        std::vector<std::int64_t>* offs;
        const char* mesh;
        std::vector<std::int64_t> all;
      };
      std::vector<Dim> dims;
      if (rec.shard.sharded()) dims.push_back({shard_comm_, &rec.shard, &rec.shard_offsets, "outer_shard", {}});
      if (rec.inner_shard.sharded())
        dims.push_back({mesh_.inner_shard, &rec.inner_shard, &rec.inner_offsets, "inner_shard", {}});
      for (auto& d : dims) {  // every gather completes before any check can throw
        const std::int64_t mine[2] = {d.sh->offset, d.sh->local_length};
        d.all.resize(static_cast<std::size_t>(2 * d.c->size()));
        detail::host_all_gather(*d.c, mine, d.all.data(), 2);
      }
      std::string fp = "layout";
      agreed(where, [&] {
        for (auto& d : dims) {
          const int W = d.c->size();
          const char* what = d.sh->dim == -2 ? "rows" : "columns";
          std::vector<std::int64_t> offs(static_cast<std::size_t>(W + 1));
          std::int64_t at = 0;
          for (int i = 0; i < W; ++i) {
            const auto off = d.all[static_cast<std::size_t>(2 * i)], len = d.all[static_cast<std::size_t>(2 * i + 1)];
            DION_CHECK(off == at, InvalidArgument, where, ": rank ", i, " of ", d.mesh, " holds ", what, " [", off, ", ",
                       off + len, ") but the shards must tile the ", d.sh->global_length, " global ", what,
                       " contiguously in rank order (expected offset ", at, ")");
            offs[static_cast<std::size_t>(i)] = off;
            at += len;
          }
          DION_CHECK(at == d.sh->global_length, InvalidArgument, where, ": the shards over ", d.mesh, " hold ", at, " ",
                     what, " in total, the global shape has ", d.sh->global_length);
          offs[static_cast<std::size_t>(W)] = at;
          for (auto v : offs) fp += detail::concat(',', v);
          fp += '|';
          *d.offs = std::move(offs);
        }
      });
      // 2-D: the layout over one dimension must be the same in every group of the other
      if (dims.size() > 1) agree_config(where + " (shard layout)", fp);
    } else {
      (void)rec;
      (void)where;
    }
  }

  detail::ParamRecord<B> prepare_param(int gi, const std::string& name, View<Space> param, View<Space> grad,
                                       ShardSpec shard, ShardSpec inner) {
    check_group(gi);
    auto& g = groups_[static_cast<std::size_t>(gi)];
    const Options& o = g.opts;
    const std::string where = detail::concat("parameter '", name, "' (group ", gi, ", ", algorithm_name(g.algorithm), "): ");
    DION_CHECK(!name.empty(), InvalidArgument, "parameter name must not be empty");
    DION_CHECK(name.find('/') == std::string::npos, InvalidArgument, where, "names must not contain '/'",
               " (state is exposed as '<param>/<key>')");
    for (const auto& p : params_)
      DION_CHECK(p.name != name, InvalidArgument, where, "the name is already registered");
    check_layout(where + "parameter", param);
    for (const auto& p : params_) {
      DION_CHECK(!overlaps(param, p.param), InvalidArgument, where, "memory overlaps parameter '", p.name,
                 "' (a parameter may appear in only one group, once)");
      DION_CHECK(!overlaps(param, p.grad), InvalidArgument, where, "memory overlaps the gradient of '", p.name, "'");
    }
    if (grad.data != nullptr) check_grad(name, param, grad, -1);

    const Shape& s = param.shape;
    const Algorithm a = g.algorithm;
    if (is_muon_family(a) || a == Algorithm::dion) {
      DION_CHECK(s.ndim >= 2, NotSupported, where, "shape ", s.str(), " has ", s.ndim,
                 " dims; orthonormal updates need a matrix (route vectors and scalars to a lion or adamw group)");
    }
    if (a == Algorithm::dion)
      DION_CHECK(s.ndim == 2, NotSupported, where, "Dion supports 2-D parameters only, got ", s.str());
    if (is_muon_family(a)) {
      if (o.num_heads > 1) {
        DION_CHECK(s.ndim == 2, InvalidArgument, where, "num_heads needs a 2D parameter, got ", s.str());
        DION_CHECK(s[0] % o.num_heads == 0, InvalidArgument, where, "num_heads = ", o.num_heads,
                   " does not divide dim 0 = ", s[0]);
      }
      if (!o.split_sizes.empty()) {
        DION_CHECK(s.ndim == 2, InvalidArgument, where, "split_sizes needs a 2D parameter, got ", s.str());
        std::int64_t sum = 0;
        for (auto v : o.split_sizes) sum += v;
        DION_CHECK(sum == s[0], InvalidArgument, where, "split_sizes sum to ", sum, ", dim 0 is ", s[0]);
      }
      if (o.flatten && s.ndim >= 3) {
        DION_CHECK(param.contiguous(), InvalidArgument, where, "flatten needs a contiguous parameter");
        DION_CHECK(grad.data == nullptr || grad.contiguous(), InvalidArgument, where,
                   "flatten needs a contiguous gradient");
        DION_CHECK(a != Algorithm::nordion2, NotSupported, where,
                   "nordion2 with flatten on a >2-D parameter is not supported (its neuron variance is per row of"
                   " the stored matrices)");
      }
    }

    DION_CHECK(!(shard.sharded() || inner.sharded()) || Comm::distributed, NotSupported, where,
               "a sharded parameter needs a distributed communicator (this optimizer is single-process)");
    Shape gshape = s;
    if (shard.sharded() || inner.sharded()) check_shard(where, a, o, s, shard, inner, gshape);
    detail::ParamRecord<B> rec;
    rec.shard = shard;
    rec.inner_shard = inner;
    rec.global_shape = gshape;
    rec.name = name;
    rec.group = gi;
    rec.param = param;
    rec.grad = grad;
    rec.key = detail::fnv1a(name);
    const DType pd = param.dtype;
    auto add_state = [&](const std::string& key, DType t, Shape shape) {
      detail::StateTensor<B> st;
      st.key = key;
      st.dtype = t;
      st.shape = shape;
      st.buf = backend_->alloc_bytes(static_cast<std::size_t>(std::max<std::int64_t>(shape.numel(), 1)) * dtype_size(t));
      rec.state.push_back(std::move(st));
    };
    const DType mom_t = precision::resolve(P::momentum, pd);
    switch (a) {
      case Algorithm::muon:
      case Algorithm::dion2: add_state("momentum", mom_t, s); break;
      case Algorithm::normuon:
      case Algorithm::nordion2: {
        add_state("momentum", mom_t, s);
        Shape vs = s;
        vs.dims[static_cast<std::size_t>(s.ndim - 1)] = 1;
        add_state("variance_neuron", precision::resolve(P::variance, pd), vs);
        break;
      }
      case Algorithm::dion: {
        add_state("momentum", mom_t, s);
        const std::int64_t m = gshape[0], n = gshape[1];  // the global shape decides rank and scale
        const double r0 = o.rank_fraction * static_cast<double>(std::min(m, n));
        std::int64_t r = o.rank_multiple_of *
                         static_cast<std::int64_t>(std::ceil(r0 / static_cast<double>(o.rank_multiple_of)));
        r = std::max<std::int64_t>(std::min({r, m, n}), std::min<std::int64_t>(1, std::min(m, n)));
        // sharded: the inner (TP) shard dim becomes B's rows, the outer (FSDP) one B's columns
        // (SPEC §1.5): inner on rows or outer on columns → B = M; outer on rows or inner on columns
        // → B = Mᵀ. Unsharded: B = Mᵀ when m < n.
        rec.transposed = inner.sharded() ? inner.dim == -1 : shard.sharded() ? shard.dim == -2 : m < n;
        rec.rank = r;
        // Q (q × r): its rows sharded like B's columns over outer, its r columns over inner
        const std::int64_t q = shard.sharded() ? shard.local_length : rec.transposed ? m : n;
        std::int64_t rl = r;
        if constexpr (Comm::distributed) {
          if (inner.sharded()) {
            const auto [r0, r1] = detail::even_block(r, mesh_.inner_shard->size(), mesh_.inner_shard->rank());
            rl = r1 - r0;
          }
        }
        add_state("Q", precision::resolve(P::Q, pd), Shape{q, rl});
        break;
      }
      case Algorithm::lion: add_state("momentum", mom_t, s); break;
      case Algorithm::adamw:
        add_state("momentum", mom_t, s);
        add_state("variance", precision::resolve(P::variance, pd), s);
        add_state("step_dev", DType::f32, Shape{});
        break;
    }
    return rec;
  }

  /// A sharded parameter: which layouts are implemented, and its global shape. `sh` is the sharding
  /// over the shard communicator (Dion: Mesh::outer_shard), `in` over Mesh::inner_shard.
  void check_shard(const std::string& where, Algorithm a, const Options& o, const Shape& s, const ShardSpec& sh,
                   const ShardSpec& in, Shape& gshape) const {
    for (const ShardSpec* x : {&sh, &in}) {
      if (!x->sharded()) continue;
      const char* arg = x == &sh ? "ShardSpec" : "inner ShardSpec";
      DION_CHECK(x->dim == -2 || x->dim == -1, InvalidArgument, where, arg, "::dim = ", x->dim,
                 " (allowed: -2 rows, -1 columns, 0 not sharded)");
      DION_CHECK(s.ndim >= 1 && (x->dim == -2 ? s.ndim >= 2 : true), InvalidArgument, where, arg, "::dim = ", x->dim,
                 " on a parameter of shape ", s.str());
      const int d = s.ndim + x->dim;
      DION_CHECK(x->local_length == s[d], ShapeMismatch, where, arg, "::local_length = ", x->local_length,
                 " differs from the local size ", s[d], " of dim ", x->dim, " of the view ", s.str());
      DION_CHECK(x->offset >= 0 && x->global_length >= 0 && x->offset + x->local_length <= x->global_length,
                 InvalidArgument, where, arg, " offset = ", x->offset, ", local_length = ", x->local_length,
                 " must lie within [0, global_length = ", x->global_length, "]");
      gshape.dims[static_cast<std::size_t>(d)] = x->global_length;
    }
    DION_CHECK(!(sh.sharded() && in.sharded() && sh.dim == in.dim), InvalidArgument, where,
               "the outer and inner ShardSpecs both shard dim ", sh.dim,
               "; a 2-D sharded matrix splits one dim over each (e.g. rows over outer_shard, columns over inner_shard)");
    DION_CHECK(!in.sharded() || family_ == detail::Family::dion, NotSupported, where, algorithm_name(default_algorithm_),
               ": no tensor-parallel (inner ShardSpec) support (SPEC §2.1); shard over the optimizer's one mesh only");
    DION_CHECK(!in.sharded() || mesh_.inner_shard, InvalidArgument, where,
               "an inner ShardSpec needs Mesh::inner_shard (tensor parallel): the dim is sharded over it");
    if (is_scalar_algorithm(a)) {
      // element-wise: any sharding works without communication, except Dion's replica averaging,
      // which needs every replica to hold the same piece (true on a product mesh whose shards are
      // over outer_shard / inner_shard, not over replicate itself)
      DION_CHECK(!(family_ == detail::Family::dion && mesh_.replicate && !mesh_.outer_shard && !mesh_.inner_shard),
                 NotSupported, where,
                 "a sharded lion/adamw parameter cannot be averaged over Mesh::replicate alone; register it whole "
                 "(or shard it over outer_shard / inner_shard)");
      return;
    }
    DION_CHECK(!sh.sharded() || shard_comm_ != nullptr, InvalidArgument, where,
               "a sharded matrix needs the optimizer's mesh to name the communicator it is sharded over");
    DION_CHECK(a != Algorithm::dion || !sh.sharded() || mesh_.outer_shard, InvalidArgument, where,
               "a sharded Dion matrix needs Mesh::outer_shard (FSDP) for its ShardSpec (pass tensor-parallel "
               "sharding as the inner ShardSpec, over Mesh::inner_shard)");
    // NorMuon / NorDion2 normalize each row of the update by its neuron variance (and NorDion2
    // selects whole rows): a rank holding a column shard sees no whole row (microsoft/dion raises
    // NotImplementedError too). Thrown inside the registration's agreement, so every rank throws.
    DION_CHECK(!(sh.sharded() && sh.dim == -1 && (a == Algorithm::normuon || a == Algorithm::nordion2)), NotSupported,
               where, algorithm_name(a), " cannot take a column-sharded matrix (ShardSpec::dim = -1, global shape ",
               gshape.str(), "): its neuron normalization", a == Algorithm::nordion2 ? " and row selection need" : " needs",
               " whole rows of the update on one rank; shard the rows (ShardSpec::dim = -2) instead");
    DION_CHECK(o.num_heads == 1 && o.split_sizes.empty() && !(o.flatten && s.ndim >= 3), NotSupported, where,
               "num_heads, split_sizes and flatten (on >2-D) are not supported on sharded parameters");
  }

  /// Dion's initial Q: i.i.d. standard normal from the counter-based generator keyed by
  /// (seed, parameter name, global index), so it does not depend on world size or sharding.
  void init_dion_q(detail::ParamRecord<B>& p) {
    auto v = p.state_view("Q");
    dispatch_dtype(v.dtype, [&]<class T>() {
      // the local block: rows from the outer shard's offset, columns (of r) from the inner one's
      std::int64_t c0 = 0;
      if constexpr (Comm::distributed) {
        if (p.inner_shard.sharded())
          c0 = detail::even_block(p.rank, mesh_.inner_shard->size(), mesh_.inner_shard->rank()).first;
      }
      backend_->randn(v.template mat<T>(), defaults_.seed, detail::mix64(p.key, 0x51ull),
                      p.shard.sharded() ? p.shard.offset : 0, c0, p.rank, 1.0f);
    });
  }

  bool exported(const detail::ParamRecord<B>& p, const std::string& key) const {
    // microsoft/dion's Dion keeps AdamW's step on the host group (no step_dev state key)
    if (key == "step_dev" && family_ == detail::Family::dion) return false;
    (void)p;
    return true;
  }

  // ============================================================ planning
  std::vector<detail::Slot> slots_;
  std::vector<detail::Chunk> chunks_;

  void replan() {
    slots_.clear();
    chunks_.clear();
    layouts_.clear();
    std::int64_t ws = 0;
    for (int gi = 0; gi < num_groups(); ++gi) {
      const auto& g = groups_[static_cast<std::size_t>(gi)];
      if (is_scalar_algorithm(g.algorithm)) continue;
      // collect slots keyed by matrix shape (and dtype for Dion)
      // (rows, cols, dtype, layout, inner layout, transposed, Muon family: sharded dim)
      std::map<std::tuple<std::int64_t, std::int64_t, int, int, int, int, int>, std::vector<int>> by_shape;
      for (int pi : g.params) {
        const auto& p = params_[static_cast<std::size_t>(pi)];
        std::vector<detail::Slot> ss;
        if (g.algorithm == Algorithm::dion) {
          detail::Slot sl;
          sl.param = pi;
          sl.rows = p.global_shape[0];
          sl.cols = p.global_shape[1];
          ss.push_back(sl);
        } else {
          // adjust_lr and the chunk key use the global shape (SPEC §0.1)
          ss = detail::muon_slots(pi, p.global_shape, g.opts);
        }
        auto layout_of = [&](const std::vector<std::int64_t>& offs) {
          if (offs.empty()) return -1;
          auto it = std::find(layouts_.begin(), layouts_.end(), offs);
          if (it == layouts_.end()) return layouts_.push_back(offs), static_cast<int>(layouts_.size()) - 1;
          return static_cast<int>(it - layouts_.begin());
        };
        const int layout = layout_of(p.shard_offsets), inner_layout = layout_of(p.inner_offsets);
        for (auto& sl : ss) {
          slots_.push_back(sl);
          const int key_dtype = g.algorithm == Algorithm::dion ? static_cast<int>(p.param.dtype) : 0;
          const int key_dim = g.algorithm != Algorithm::dion && layout >= 0 ? p.shard.dim : 0;
          by_shape[{sl.rows, sl.cols, key_dtype, layout, inner_layout, p.transposed ? 1 : 0, key_dim}].push_back(
              static_cast<int>(slots_.size()) - 1);
        }
      }
      for (auto& [key, ids] : by_shape) {
        detail::Chunk proto;
        proto.group = gi;
        proto.algorithm = g.algorithm;
        proto.rows = std::get<0>(key);
        proto.cols = std::get<1>(key);
        proto.dtype = static_cast<DType>(std::get<2>(key));
        proto.layout = std::get<3>(key);
        proto.inner_layout = std::get<4>(key);
        proto.shard_dim = std::get<6>(key);
        shape_plan(proto, g.opts, ids.empty() ? -1 : slots_[static_cast<std::size_t>(ids[0])].param);
        const std::int64_t per = bytes_per_matrix(proto, g.opts);
        const std::int64_t cap = std::max<std::int64_t>(1, g.opts.workspace_limit_bytes / std::max<std::int64_t>(per, 1));
        detail::Chunk cur = proto;
        for (int sid : ids) {
          const auto& sl = slots_[static_cast<std::size_t>(sid)];
          std::int64_t b0 = 0;
          while (b0 < sl.batch) {
            const std::int64_t room = cap - cur.count;
            const std::int64_t nb = std::min(room, sl.batch - b0);
            cur.items.push_back({sid, b0, nb});
            cur.count += nb;
            b0 += nb;
            if (cur.count == cap) {
              ws = std::max(ws, chunk_bytes(cur, per));
              chunks_.push_back(std::move(cur));
              cur = proto;
            }
          }
        }
        if (cur.count > 0) {
          ws = std::max(ws, chunk_bytes(cur, per));
          chunks_.push_back(std::move(cur));
        }
      }
    }
    if (static_cast<std::size_t>(ws) > workspace_.bytes()) workspace_ = backend_->alloc_bytes(static_cast<std::size_t>(ws));
    // A backend with shape-dependent scratch (CUDA: factorizations, per-matrix reductions) sizes it
    // here, at registration, so that step() never allocates.
    if constexpr (requires(B& be, std::int64_t v) { be.reserve_for(v, v, v, v, v); }) {
      for (const auto& c : chunks_) {
        const bool dion = c.algorithm == Algorithm::dion;
        const auto& o = groups_[static_cast<std::size_t>(c.group)].opts;
        backend_->reserve_for(c.count, c.rows, c.cols, dion ? c.r : 0,
                              dion ? ortho::rcqr_sketch_rows(c.r, o.rcqr_oversample) : 0);
      }
    }
    if (params_.size() * sizeof(int) > flags_.bytes()) flags_ = backend_->alloc_bytes(params_.size() * sizeof(int) + 64);
    host_flags_.resize(params_.size());
    host_presence_.reserve(2 * params_.size() + 1);
    if constexpr (Comm::distributed)
      for (Comm* c : mesh_comms_) detail::reserve_host_staging(*c, (2 * params_.size() + 1) * sizeof(int) + 64);
    host_streams_.resize(static_cast<std::size_t>(max_chunk_count()));
  }
  /// Workspace of one chunk: single-process, count·per; distributed, what the distributed variant
  /// carves (padded batch, exchange buffers).
  std::int64_t chunk_bytes(const detail::Chunk& c, std::int64_t per) const {
    std::int64_t b = c.count * per + 4096;
    if constexpr (Comm::distributed) {
      if (c.algorithm == Algorithm::dion && (c.layout >= 0 || c.inner_layout >= 0))
        return std::max(b, detail::dion_mesh_bytes(c, dion_mesh(c), groups_[static_cast<std::size_t>(c.group)].opts.rcqr_oversample));
      Comm* cc = c.layout >= 0 ? shard_comm_ : ortho_comm_;
      if (cc && cc->size() > 1) {
        const int W = cc->size();
        const std::int64_t* offs =
            c.layout >= 0 ? layouts_[static_cast<std::size_t>(c.layout)].data() : nullptr;
        if (c.algorithm == Algorithm::dion)
          b = std::max(b, detail::dion_dist_bytes(c, per, W));
        else
          b = std::max(b, detail::muon_dist_carve<ortho_t>(nullptr, c, W, offs).end + 4096);
      }
    }
    return b;
  }
  std::int64_t max_chunk_count() const {
    std::int64_t m = 1;
    for (const auto& c : chunks_) m = std::max(m, c.count);
    return m;
  }
  void shape_plan(detail::Chunk& c, const Options& o, int first_param) {
    if ((c.algorithm == Algorithm::dion2 || c.algorithm == Algorithm::nordion2) && c.layout >= 0) {
      // sharded (SPEC §1.3): select along the sharded dim, rows (-2) or columns (-1, Dion2 only).
      // local scope: k from the padded local size ceil(S/W), each rank takes min(k, its slices);
      // global scope: k from the true global size.
      const int W = static_cast<int>(layouts_[static_cast<std::size_t>(c.layout)].size()) - 1;
      c.sel_rows = c.shard_dim != -1;
      c.global_scope = o.selection_scope == SelectionScope::global;
      const std::int64_t S = c.sel_rows ? c.rows : c.cols;
      const std::int64_t base = c.global_scope ? S : (S + W - 1) / W;
      c.k = S == 0 ? 0
                   : std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(o.fraction * static_cast<double>(base))));
      c.k = std::min(c.k, c.global_scope ? S : base);
    } else if (c.algorithm == Algorithm::dion2 || c.algorithm == Algorithm::nordion2) {
      c.sel_rows = c.algorithm == Algorithm::nordion2 ? true : c.rows <= c.cols;
      const std::int64_t S = c.sel_rows ? c.rows : c.cols;
      c.k = S == 0 ? 0 : std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(o.fraction * static_cast<double>(S))));
      c.k = std::min(c.k, S);
    } else if (c.algorithm == Algorithm::dion) {
      const auto& p = params_[static_cast<std::size_t>(first_param)];
      c.transposed = p.transposed;
      c.r = p.rank;
      c.p = c.transposed ? c.cols : c.rows;
      c.q = c.transposed ? c.rows : c.cols;
    }
  }
  std::int64_t bytes_per_matrix(const detail::Chunk& c, const Options& o) const {
    using detail::align_up;
    if (c.algorithm == Algorithm::dion) {
      const std::int64_t k = ortho::rcqr_sketch_rows(c.r, o.rcqr_oversample);
      const std::int64_t e = 4;  // element bytes of the working buffers (fp32 upper bound)
      return align_up(e * (4 * c.q * c.r + c.p * c.r + c.rows * c.cols) +
                      4 * ortho::qr_scratch_floats(1, c.p, c.r, k) + 64);
    }
    std::int64_t ur = c.rows, uc = c.cols;
    if (c.algorithm == Algorithm::dion2 || c.algorithm == Algorithm::nordion2) {
      if (c.sel_rows) ur = c.k;
      else uc = c.k;
    }
    const std::int64_t e = static_cast<std::int64_t>(sizeof(ortho_t));
    return align_up(e * (ur * uc + ortho::scratch_elems(1, ur, uc)) + 8 * c.k + 16);
  }

  // ============================================================ step machinery
  const float* lr_ptr(int g) const { return static_cast<const float*>(scalars_.data()) + 2 * g; }
  const float* wd_ptr(int g) const { return static_cast<const float*>(scalars_.data()) + 2 * g + 1; }
  void write_group_scalars(int g) {
    const auto& o = groups_[static_cast<std::size_t>(g)].opts;
    host_scalars_[static_cast<std::size_t>(2 * g)] = o.lr;
    host_scalars_[static_cast<std::size_t>(2 * g + 1)] = o.weight_decay;
  }
  void realloc_scalars() {
    if (host_scalars_.size() * sizeof(float) > scalars_.bytes())
      scalars_ = backend_->alloc_bytes(std::max<std::size_t>(64, 2 * host_scalars_.size() * sizeof(float)));
    if ((groups_.size() + 1) * sizeof(float) > group_steps_.bytes()) {
      group_steps_ = backend_->alloc_bytes(std::max<std::size_t>(64, 2 * (groups_.size() + 1) * sizeof(float)));
      for (int g = 0; g < num_groups(); ++g) write_group_step(g);  // the counters moved: rewrite them
    }
  }
  // Dion's groups count their steps in backend memory (fp32: exact to 2^24 steps): AdamW groups read
  // it for bias correction (SPEC §1.8), Dion groups key the sketch randomness with it. It is advanced
  // there, so a captured CUDA graph advances it on every replay and a skipped step leaves it.
  // Layout of group_steps_: [one, step_0, step_1, ...] (the constant 1 is the increment).
  float* group_step_ptr(int g) { return static_cast<float*>(group_steps_.data()) + 1 + g; }
  void write_group_step(int g) {
    if (!group_steps_.data()) return;
    const float v[2] = {1.0f, static_cast<float>(groups_[static_cast<std::size_t>(g)].step)};
    backend_->copy_from_host(&v[0], group_steps_.data(), sizeof(float));
    backend_->copy_from_host(&v[1], group_step_ptr(g), sizeof(float));
    backend_->synchronize();
  }
  void advance_group_steps() {
    const auto n = static_cast<std::int64_t>(groups_.size());
    auto* base = static_cast<float*>(group_steps_.data());
    // every group's counter += 1 (predicated: a skipped step leaves them), merged into one launch
    detail::BatchScope batch(*backend_);
    for (std::int64_t g = 0; g < n; ++g)
      backend_->add_into(Mat<float, Space>{base + 1 + g, 1, 1, 1, 1, 1}, Mat<float, Space>{base, 1, 1, 1, 1, 1});
    batch.finish();
  }

  /// NaN/Inf screening of every gradient (one flag per parameter), before anything is changed.
  std::string first_nonfinite_message_;
  bool check_finite_local() {
    auto* flags = static_cast<int*>(flags_.data());
    std::fill(host_flags_.begin(), host_flags_.end(), 0);
    backend_->copy_from_host(host_flags_.data(), flags, host_flags_.size() * sizeof(int));
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      if (!p.grad.data) continue;
      dispatch_dtype(p.grad.dtype, [&]<class T>() { backend_->nonfinite_flag(p.grad.template mat<T>(), flags + i); });
    }
    backend_->copy_to_host(flags, host_flags_.data(), host_flags_.size() * sizeof(int));
    backend_->synchronize();
    for (std::size_t i = 0; i < params_.size(); ++i) {
      if (!host_flags_[i]) continue;
      first_nonfinite_message_ = detail::concat("parameter '", params_[i].name,
                                                "': gradient holds NaN or Inf (non_finite = raise); nothing was changed");
      return false;
    }
    return true;
  }

  void run_chunk(detail::Chunk& ch) {
    if (ch.count == 0) return;
    auto& g = groups_[static_cast<std::size_t>(ch.group)];
    detail::StepContext<B, detail::ParamRecord<B>, detail::Chunk, Comm> cx{
        *backend_, g.opts, ch, std::span<const detail::Slot>(slots_), params_, lr_ptr(ch.group), wd_ptr(ch.group),
        static_cast<char*>(workspace_.data()), g.step, host_streams_};
    if (ch.algorithm == Algorithm::dion) {
      cx.step_dev = group_step_ptr(ch.group);
      // step() calls of the group, skipped ones included (steps taken + steps skipped): known on the
      // host without reading the device's skip counter, the same on every backend, and restored
      // exactly by set_step_count + set_skipped_steps (a checkpoint's load)
      cx.step_calls = g.step + g.skip_base;
    }
    if constexpr (Comm::distributed) {
      if (ch.algorithm == Algorithm::dion && (ch.layout >= 0 || ch.inner_layout >= 0))
        return detail::dion_mesh_chunk(cx, dion_mesh(ch));  // FSDP, HSDP, TP, 2-D (SPEC §2.5)
      if (ch.layout >= 0 && shard_comm_->size() > 1) {
        cx.comm = shard_comm_;
        cx.offs = layouts_[static_cast<std::size_t>(ch.layout)].data();
      } else if (ch.layout < 0 && ortho_comm_ && ortho_comm_->size() > 1) {
        cx.comm = ortho_comm_;
        cx.grad_sync = family_ == detail::Family::dion && defaults_.replicate_mesh_grad_sync;
      }
    }
    if (ch.algorithm == Algorithm::dion) detail::dion_chunk(cx);
    else detail::muon_family_chunk<ortho_t>(cx);
  }
  /// The communicators and shard layouts of a sharded Dion chunk.
  detail::DionMesh<Comm> dion_mesh(const detail::Chunk& c) const {
    detail::DionMesh<Comm> dm;
    dm.replicate = mesh_.replicate;
    dm.grad_sync = defaults_.replicate_mesh_grad_sync;
    if (c.layout >= 0) {
      dm.outer = mesh_.outer_shard;
      dm.outer_offs = layouts_[static_cast<std::size_t>(c.layout)].data();
    }
    if (c.inner_layout >= 0) {
      dm.inner = mesh_.inner_shard;
      dm.inner_offs = layouts_[static_cast<std::size_t>(c.inner_layout)].data();
    }
    return dm;
  }
  void run_scalar(int gi, detail::ParamRecord<B>& p) {
    auto& g = groups_[static_cast<std::size_t>(gi)];
    if constexpr (Comm::distributed) {
      // Dion's scalar groups: average the gradient over the replicate ranks first (SPEC §2.5)
      if (family_ == detail::Family::dion && mesh_.replicate && mesh_.replicate->size() > 1 &&
          defaults_.replicate_mesh_grad_sync && p.grad.data)
        dispatch_dtype(p.grad.dtype, [&]<class T>() { detail::average_in_place(*mesh_.replicate, p.grad.template mat<T>()); });
    }
    detail::scalar_step(*backend_, g.algorithm, g.opts, p, lr_ptr(gi), wd_ptr(gi),
                        family_ == detail::Family::dion ? group_step_ptr(gi) : nullptr);
  }

 protected:
  B* backend_;
  Options defaults_;
  Algorithm default_algorithm_;
  detail::Family family_;
  Mesh<Comm> mesh_;
  std::vector<detail::GroupRecord> groups_;
  std::vector<detail::ParamRecord<B>> params_;
  typename B::RawBuffer workspace_;
  typename B::RawBuffer scalars_;
  typename B::RawBuffer flags_;
  typename B::RawBuffer group_steps_;
  typename B::RawBuffer skipbuf_;
  std::vector<float> host_scalars_;
  std::vector<int> host_flags_;
  std::vector<int> host_presence_;
  std::vector<std::uint64_t> host_streams_;

  std::vector<float> read_view(const View<Space>& v) {
    DION_CHECK(v.contiguous(), InvalidArgument, "read_state: only packed tensors can be read");
    const auto n = static_cast<std::size_t>(v.shape.numel());
    std::vector<float> out(n);
    if (v.dtype == DType::f32) {
      backend_->copy_to_host(v.data, out.data(), n * sizeof(float));
      backend_->synchronize();
    } else {
      std::vector<bf16> tmp(n);
      backend_->copy_to_host(v.data, tmp.data(), n * sizeof(bf16));
      backend_->synchronize();
      for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<float>(tmp[i]);
    }
    return out;
  }
  void write_view(const View<Space>& v, std::span<const float> values) {
    DION_CHECK(v.contiguous(), InvalidArgument, "write_state: only packed tensors can be written");
    const auto n = static_cast<std::size_t>(v.shape.numel());
    DION_CHECK(values.size() == n, ShapeMismatch, "write_state: ", values.size(), " values for a tensor of ", n,
               " elements ", v.shape.str());
    if (v.dtype == DType::f32) {
      backend_->copy_from_host(values.data(), v.data, n * sizeof(float));
    } else {
      std::vector<bf16> tmp(n);
      for (std::size_t i = 0; i < n; ++i) tmp[i] = bf16(values[i]);
      backend_->copy_from_host(tmp.data(), v.data, n * sizeof(bf16));
    }
    backend_->synchronize();
  }
};

}  // namespace dion
