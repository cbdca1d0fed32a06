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
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "dion/algorithms/context.hpp"
#include "dion/algorithms/dion.hpp"
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
  std::vector<StateTensor<Backend>> state;
  std::uint64_t key = 0;  // stable random stream id: hash of the name
  ShardSpec shard;        // how this rank's piece sits in the global tensor (unsharded by default)
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
  std::int64_t step = 0;
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
};

inline std::int64_t align_up(std::int64_t v, std::int64_t a = 256) { return (v + a - 1) / a * a; }

}  // namespace detail

/// The optimizer engine. Use the named aliases (dion::Muon, dion::Dion, ...) rather than this class.
template <Backend B, Communicator Comm = SingleProcess, PrecisionPolicy P = precision::Default>
class Optimizer {
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
    GroupRef& add(const std::string& name, View<Space> param, View<Space> grad = {}, ShardSpec shard = {}) {
      opt_->add_param(index_, name, param, grad, shard);
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
    check_algorithm_allowed(a, where);
    detail::GroupRecord rec;
    rec.algorithm = a;
    rec.opts = merge_options(defaults_, g, a, family_ == detail::Family::dion, where);
    groups_.push_back(std::move(rec));
    host_scalars_.resize(2 * groups_.size());
    write_group_scalars(static_cast<int>(groups_.size()) - 1);
    realloc_scalars();
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
  /// Steps taken by a group (counts every step() that was not skipped).
  std::int64_t step_count(int group) const { return groups_.at(static_cast<std::size_t>(check_group(group))).step; }
  void set_step_count(int group, std::int64_t s) {
    check_group(group);
    DION_CHECK(s >= 0, InvalidArgument, "step count = ", s, " must be >= 0");
    groups_[static_cast<std::size_t>(group)].step = s;
  }

  /// Steps skipped because a gradient held NaN/Inf (NonFinitePolicy::skip_step).
  std::int64_t skipped_steps() const noexcept { return skipped_steps_; }
  bool last_step_skipped() const noexcept { return last_skipped_; }

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
  void step() {
    last_skipped_ = false;
    if (defaults_.non_finite != NonFinitePolicy::propagate && !check_finite()) {
      last_skipped_ = true;
      ++skipped_steps_;
      return;
    }
    backend_->copy_from_host(host_scalars_.data(), scalars_.data(), host_scalars_.size() * sizeof(float));
    for (auto& g : groups_) ++g.step;
    for (auto& ch : chunks_) run_chunk(ch);
    for (int gi = 0; gi < num_groups(); ++gi) {
      auto& g = groups_[static_cast<std::size_t>(gi)];
      if (!is_scalar_algorithm(g.algorithm)) continue;
      for (int pi : g.params) run_scalar(gi, params_[static_cast<std::size_t>(pi)]);
    }
  }

 protected:
  Optimizer(B& backend, Options opts, Algorithm default_algorithm, detail::Family family, Mesh<Comm> mesh = {})
      : backend_(&backend), defaults_(std::move(opts)), default_algorithm_(default_algorithm), family_(family),
        mesh_(mesh) {
    validate_options(defaults_, default_algorithm_, "optimizer options: ");
  }

 private:
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

  void add_param(int gi, const std::string& name, View<Space> param, View<Space> grad, ShardSpec shard) {
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

    DION_CHECK(!shard.sharded() || Comm::distributed, NotSupported, where,
               "a sharded parameter needs a distributed communicator (this optimizer is single-process)");
    detail::ParamRecord<B> rec;
    rec.shard = shard;
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
        const std::int64_t m = s[0], n = s[1];
        const double r0 = o.rank_fraction * static_cast<double>(std::min(m, n));
        std::int64_t r = o.rank_multiple_of *
                         static_cast<std::int64_t>(std::ceil(r0 / static_cast<double>(o.rank_multiple_of)));
        r = std::max<std::int64_t>(std::min({r, m, n}), std::min<std::int64_t>(1, std::min(m, n)));
        rec.transposed = m < n;
        rec.rank = r;
        const std::int64_t q = rec.transposed ? m : n;
        add_state("Q", precision::resolve(P::Q, pd), Shape{q, r});
        break;
      }
      case Algorithm::lion: add_state("momentum", mom_t, s); break;
      case Algorithm::adamw:
        add_state("momentum", mom_t, s);
        add_state("variance", precision::resolve(P::variance, pd), s);
        add_state("step_dev", DType::f32, Shape{});
        break;
    }
    params_.push_back(std::move(rec));
    g.params.push_back(static_cast<int>(params_.size()) - 1);
    if (a == Algorithm::dion) init_dion_q(params_.back());
    replan();
  }

  /// Dion's initial Q: i.i.d. standard normal from the counter-based generator keyed by
  /// (seed, parameter name, global index), so it does not depend on world size or sharding.
  void init_dion_q(detail::ParamRecord<B>& p) {
    auto v = p.state_view("Q");
    dispatch_dtype(v.dtype, [&]<class T>() {
      backend_->randn(v.template mat<T>(), defaults_.seed, detail::mix64(p.key, 0x51ull), 0, 0, v.shape[1], 1.0f);
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
    std::int64_t ws = 0;
    for (int gi = 0; gi < num_groups(); ++gi) {
      const auto& g = groups_[static_cast<std::size_t>(gi)];
      if (is_scalar_algorithm(g.algorithm)) continue;
      // collect slots keyed by matrix shape (and dtype for Dion)
      std::map<std::tuple<std::int64_t, std::int64_t, int>, std::vector<int>> by_shape;
      for (int pi : g.params) {
        const auto& p = params_[static_cast<std::size_t>(pi)];
        std::vector<detail::Slot> ss;
        if (g.algorithm == Algorithm::dion) {
          detail::Slot sl;
          sl.param = pi;
          sl.rows = p.param.shape[0];
          sl.cols = p.param.shape[1];
          ss.push_back(sl);
        } else {
          ss = detail::muon_slots(pi, p.param.shape, g.opts);
        }
        for (auto& sl : ss) {
          slots_.push_back(sl);
          const int key_dtype = g.algorithm == Algorithm::dion ? static_cast<int>(p.param.dtype) : 0;
          by_shape[{sl.rows, sl.cols, key_dtype}].push_back(static_cast<int>(slots_.size()) - 1);
        }
      }
      for (auto& [key, ids] : by_shape) {
        detail::Chunk proto;
        proto.group = gi;
        proto.algorithm = g.algorithm;
        proto.rows = std::get<0>(key);
        proto.cols = std::get<1>(key);
        proto.dtype = static_cast<DType>(std::get<2>(key));
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
              ws = std::max(ws, cur.count * per + 4096);
              chunks_.push_back(std::move(cur));
              cur = proto;
            }
          }
        }
        if (cur.count > 0) {
          ws = std::max(ws, cur.count * per + 4096);
          chunks_.push_back(std::move(cur));
        }
      }
    }
    if (static_cast<std::size_t>(ws) > workspace_.bytes()) workspace_ = backend_->alloc_bytes(static_cast<std::size_t>(ws));
    if (params_.size() * sizeof(int) > flags_.bytes()) flags_ = backend_->alloc_bytes(params_.size() * sizeof(int) + 64);
    host_flags_.resize(params_.size());
    host_streams_.resize(static_cast<std::size_t>(max_chunk_count()));
  }
  std::int64_t max_chunk_count() const {
    std::int64_t m = 1;
    for (const auto& c : chunks_) m = std::max(m, c.count);
    return m;
  }
  void shape_plan(detail::Chunk& c, const Options& o, int first_param) {
    if (c.algorithm == Algorithm::dion2 || c.algorithm == Algorithm::nordion2) {
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
  }

  /// NaN/Inf screening of every gradient (one flag per parameter), before anything is changed.
  bool check_finite() {
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
      if (defaults_.non_finite == NonFinitePolicy::raise)
        throw NonFinite(detail::concat("parameter '", params_[i].name,
                                       "': gradient holds NaN or Inf (non_finite = raise); nothing was changed"));
      return false;
    }
    return true;
  }

  void run_chunk(detail::Chunk& ch) {
    if (ch.count == 0) return;
    auto& g = groups_[static_cast<std::size_t>(ch.group)];
    detail::StepContext<B, detail::ParamRecord<B>, detail::Chunk> cx{
        *backend_, g.opts, ch, std::span<const detail::Slot>(slots_), params_, lr_ptr(ch.group), wd_ptr(ch.group),
        static_cast<char*>(workspace_.data()), g.step, host_streams_};
    if (ch.algorithm == Algorithm::dion) detail::dion_chunk(cx);
    else detail::muon_family_chunk<ortho_t>(cx);
  }
  void run_scalar(int gi, detail::ParamRecord<B>& p) {
    auto& g = groups_[static_cast<std::size_t>(gi)];
    detail::scalar_step(*backend_, g.algorithm, g.opts, p, lr_ptr(gi), wd_ptr(gi));
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
  std::vector<float> host_scalars_;
  std::vector<int> host_flags_;
  std::vector<std::uint64_t> host_streams_;
  std::int64_t skipped_steps_ = 0;
  bool last_skipped_ = false;

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
