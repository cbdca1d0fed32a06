// Replay of a golden case (format dion-case-v1, see tests/data/golden/README.md): build the optimizer
// that microsoft/dion ran from the case's metadata, feed its gradients for N steps, and return the
// final parameters and state. Shared by the dion-replay tool and the conformance tests, so both
// exercise one code path. Every metadata key is either honoured or rejected with a clear message.
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dion/checkpoint/safetensors.hpp"
#include "dion/dion.hpp"

namespace dion::replay {

/// Raised for a case this build cannot replay (unknown key or value): the tool exits non-zero.
class Unsupported : public NotSupported {
 public:
  using NotSupported::NotSupported;
};

struct Tensor {
  std::vector<std::int64_t> shape;
  std::vector<float> values;
};

struct Result {
  std::map<std::string, Tensor> params;  ///< final parameters, by name
  std::map<std::string, Tensor> state;   ///< "<param>/<key>" → values
};

namespace detail {
using json = nlohmann::json;
using dion::detail::concat;

inline std::string meta(const safetensors::File& f, const char* key) {
  auto v = f.metadata(key);
  if (!v) throw Unsupported(concat("case metadata lacks '", key, "'"));
  return *v;
}
inline json meta_json(const safetensors::File& f, const char* key) {
  const std::string s = meta(f, key);
  json j = json::parse(s, nullptr, false);
  if (j.is_discarded()) throw Unsupported(concat("case metadata '", key, "' is not valid JSON"));
  return j;
}

enum class Impl { muon, normuon, dion2, nordion2, dion };

struct Plan {
  Impl impl = Impl::muon;
  bool fp32_ortho = false;
  Options opts;
  std::vector<std::pair<GroupOptions, std::vector<std::string>>> groups;
};

inline float to_f(const json& v, const std::string& k) {
  if (!v.is_number()) throw Unsupported(concat("hyperparameter '", k, "' must be a number, got ", v.dump()));
  return v.get<float>();
}
inline double to_d(const json& v, const std::string& k) {
  if (!v.is_number()) throw Unsupported(concat("hyperparameter '", k, "' must be a number, got ", v.dump()));
  return v.get<double>();
}
inline int to_i(const json& v, const std::string& k) {
  if (!v.is_number_integer() && !(v.is_number_float() && std::floor(v.get<double>()) == v.get<double>()))
    throw Unsupported(concat("hyperparameter '", k, "' must be an integer, got ", v.dump()));
  return v.get<int>();
}
inline bool to_b(const json& v, const std::string& k) {
  if (!v.is_boolean()) throw Unsupported(concat("hyperparameter '", k, "' must be true or false, got ", v.dump()));
  return v.get<bool>();
}
inline AdjustLr to_adjust(const json& v) {
  if (v.is_null()) return AdjustLr::none;
  const auto s = v.get<std::string>();
  if (s == "spectral_norm") return AdjustLr::spectral_norm;
  if (s == "rms_norm") return AdjustLr::rms_norm;
  throw Unsupported(concat("adjust_lr = '", s, "' (allowed: spectral_norm, rms_norm, null)"));
}
inline QrMethod to_qr(const json& v) {
  const auto s = v.get<std::string>();
  if (s == "qr") return QrMethod::qr;
  if (s == "cqr") return QrMethod::cqr;
  if (s == "rcqr") return QrMethod::rcqr;
  throw Unsupported(concat("qr_method = '", s, "' (allowed: qr, cqr, rcqr)"));
}

/// Apply one key to a GroupOptions (used for constructor args and group overrides alike).
inline bool apply_key(GroupOptions& g, const std::string& k, const json& v) {
  if (k == "lr") g.lr = to_f(v, k);
  else if (k == "mu") g.mu = to_f(v, k);
  else if (k == "betas") {
    if (!v.is_array() || v.size() != 2) throw Unsupported(concat("betas must be a pair, got ", v.dump()));
    g.beta1 = to_f(v[0], "betas[0]");
    g.beta2 = to_f(v[1], "betas[1]");
  } else if (k == "beta1") g.beta1 = to_f(v, k);
  else if (k == "beta2") g.beta2 = to_f(v, k);
  else if (k == "weight_decay") g.weight_decay = to_f(v, k);
  else if (k == "cautious_wd") g.cautious_wd = to_b(v, k);
  else if (k == "epsilon" || k == "eps") g.epsilon = to_f(v, k);
  else if (k == "nesterov") g.nesterov = to_b(v, k);
  else if (k == "adjust_lr") g.adjust_lr = to_adjust(v);
  else if (k == "flatten") g.flatten = to_b(v, k);
  else if (k == "num_heads") g.num_heads = to_i(v, k);
  else if (k == "split_sizes") {
    if (v.is_null()) return true;
    std::vector<std::int64_t> s;
    for (const auto& e : v) s.push_back(to_i(e, k));
    g.split_sizes = s;
  } else if (k == "muon_beta2") g.muon_beta2 = to_f(v, k);
  else if (k == "fraction") g.fraction = to_d(v, k);
  else if (k == "ef_decay") g.ef_decay = to_f(v, k);
  else if (k == "selection_scope") {
    const auto s = v.get<std::string>();
    if (s == "local") g.selection_scope = SelectionScope::local;
    else if (s == "global") g.selection_scope = SelectionScope::global;
    else throw Unsupported(concat("selection_scope = '", s, "' (allowed: local, global)"));
  } else if (k == "rank_fraction") g.rank_fraction = to_d(v, k);
  else if (k == "rank_multiple_of") g.rank_multiple_of = to_i(v, k);
  else if (k == "power_iters") g.power_iters = to_i(v, k);
  else if (k == "qr_method") g.qr_method = to_qr(v);
  else if (k == "cqr_warmup_steps") g.cqr_warmup_steps = to_i(v, k);
  else if (k == "rcqr_oversample" || k == "oversample") g.rcqr_oversample = to_d(v, k);
  else return false;
  return true;
}

/// Fold set fields of `g` into `o` (constructor defaults).
inline void fold(Options& o, const GroupOptions& g) {
  if (g.lr) o.lr = *g.lr;
  if (g.mu) o.mu = *g.mu;
  if (g.beta1) o.beta1 = *g.beta1;
  if (g.beta2) o.beta2 = *g.beta2;
  if (g.weight_decay) o.weight_decay = *g.weight_decay;
  if (g.epsilon) o.epsilon = *g.epsilon;
  if (g.cautious_wd) o.cautious_wd = *g.cautious_wd;
  if (g.nesterov) o.nesterov = *g.nesterov;
  if (g.adjust_lr) o.adjust_lr = *g.adjust_lr;
  if (g.flatten) o.flatten = *g.flatten;
  if (g.num_heads) o.num_heads = *g.num_heads;
  if (g.split_sizes) o.split_sizes = *g.split_sizes;
  if (g.muon_beta2) o.muon_beta2 = *g.muon_beta2;
  if (g.fraction) o.fraction = *g.fraction;
  if (g.ef_decay) o.ef_decay = *g.ef_decay;
  if (g.selection_scope) o.selection_scope = *g.selection_scope;
  if (g.rank_fraction) o.rank_fraction = *g.rank_fraction;
  if (g.rank_multiple_of) o.rank_multiple_of = *g.rank_multiple_of;
  if (g.power_iters) o.power_iters = *g.power_iters;
  if (g.qr_method) o.qr_method = *g.qr_method;
  if (g.cqr_warmup_steps) o.cqr_warmup_steps = *g.cqr_warmup_steps;
  if (g.rcqr_oversample) o.rcqr_oversample = *g.rcqr_oversample;
}

inline Plan make_plan(const safetensors::File& f) {
  Plan pl;
  const std::string impl = meta(f, "impl");
  if (impl == "dion.Muon") pl.impl = Impl::muon;
  else if (impl == "dion.NorMuon") pl.impl = Impl::normuon;
  else if (impl == "dion.Dion2") pl.impl = Impl::dion2;
  else if (impl == "dion.NorDion2" || impl == "dion.Dion3") pl.impl = Impl::nordion2;
  else if (impl == "dion.Dion" || impl == "dion.DionReference") pl.impl = Impl::dion;
  else throw Unsupported(concat("impl '", impl, "' is not supported (dion.Muon, dion.NorMuon, dion.Dion2, dion.NorDion2, dion.Dion, dion.DionReference)"));
  if (impl == "dion.Dion") {
    pl.opts.power_iters = 1;  // the fast Dion accepts only these (SPEC §1.6); checked below
  }
  const std::string variant = f.metadata("variant").value_or("bf16");
  if (variant != "bf16" && variant != "fp32" && variant != "fp32-native")
    throw Unsupported(concat("variant '", variant, "' (allowed: bf16, fp32, fp32-native)"));
  pl.fp32_ortho = variant != "bf16";

  json hp = meta_json(f, "hyperparams");
  if (!hp.is_object()) throw Unsupported("hyperparams must be a JSON object");
  GroupOptions ctor;
  bool use_pe = true;
  json groups = json::array();
  std::string nsf;
  for (auto& [k, v] : hp.items()) {
    if (k == "param_groups") groups = v;
    else if (k == "use_polar_express") use_pe = to_b(v, k);
    else if (k == "newton_schulz_func") nsf = v.is_null() ? "" : v.get<std::string>();
    else if (k == "use_gram_newton_schulz") {
      if (to_b(v, k)) throw Unsupported("use_gram_newton_schulz = true (Gram Newton-Schulz) is not supported");
    } else if (k == "use_triton" || k == "triton_post_ortho") {
      to_b(v, k);  // kernel choice of the same math in microsoft/dion: no effect on the result
    } else if (k == "verbose") {
      to_b(v, k);  // logging only
    } else if (k == "replicate_mesh_grad_sync") {
      to_b(v, k);  // distributed only: a single process has no replicas
    } else if (k == "mixed_precision_config") {
      if (!v.is_null()) throw Unsupported("mixed_precision_config other than null is not supported by dion-replay");
    } else if (k == "distributed_mesh" || k == "replicate_mesh" || k == "outer_shard_mesh" || k == "inner_shard_mesh") {
      if (!v.is_null()) throw Unsupported(concat(k, " must be null for a single-process replay"));
    } else if (!apply_key(ctor, k, v)) {
      throw Unsupported(concat("hyperparameter '", k, "' is not supported by dion-replay"));
    }
  }
  if (impl == "dion.Dion") {
    if (ctor.power_iters && *ctor.power_iters != 1) throw Unsupported("dion.Dion accepts only power_iters = 1");
    if (ctor.qr_method && *ctor.qr_method != QrMethod::rcqr) throw Unsupported("dion.Dion accepts only qr_method = rcqr");
  }
  // orthogonalizer: the hook wins, then use_polar_express
  pl.opts.orthogonalizer = use_pe ? Orthogonalizer::polar_express : Orthogonalizer::newton_schulz;
  if (!nsf.empty()) {
    if (nsf == "gen_cases.polar_express_fp32") pl.opts.orthogonalizer = Orthogonalizer::polar_express;
    else if (nsf == "gen_cases.newton_schulz5_fp32") pl.opts.orthogonalizer = Orthogonalizer::newton_schulz;
    else throw Unsupported(concat("newton_schulz_func '", nsf, "' is not supported"));
    pl.fp32_ortho = true;
  }
  fold(pl.opts, ctor);
  // microsoft/dion clamps nothing here: keep its defaults for keys the case leaves out
  if (!groups.is_array() || groups.empty()) throw Unsupported("param_groups must be a non-empty list");
  for (const auto& g : groups) {
    if (!g.is_object()) throw Unsupported("each param group must be an object");
    GroupOptions go;
    std::vector<std::string> names;
    for (auto& [k, v] : g.items()) {
      if (k == "params") {
        for (const auto& n : v) names.push_back(n.get<std::string>());
      } else if (k == "algorithm") {
        go.algorithm = parse_algorithm(v.get<std::string>());
      } else if (!apply_key(go, k, v)) {
        throw Unsupported(concat("param group key '", k, "' is not supported by dion-replay"));
      }
    }
    pl.groups.emplace_back(go, names);
  }
  return pl;
}

/// Drop overrides an algorithm does not read where they equal the optimizer default (a case
/// generator may repeat constructor values in every group); anything else stays and is checked.
inline GroupOptions group_for(const GroupOptions& g, const Options& base, Algorithm a, bool dion_class) {
  GroupOptions r = g;
  const auto used = dion::detail::keys_used(a, dion_class && is_scalar_algorithm(a));
  using namespace dion::detail;
  auto drop = [&](auto& opt, std::uint32_t key, const auto& base_v) {
    if (opt && !(used & key) && *opt == base_v) opt.reset();
  };
  drop(r.mu, kMu, base.mu);
  drop(r.beta1, kBeta1, base.beta1);
  drop(r.beta2, kBeta2, base.beta2);
  drop(r.epsilon, kEps, base.epsilon);
  drop(r.nesterov, kNesterov, base.nesterov);
  drop(r.cautious_wd, kCautious, base.cautious_wd);
  drop(r.adjust_lr, kAdjust, base.adjust_lr);
  drop(r.flatten, kFlatten, base.flatten);
  return r;
}

template <class Opt, class B>
Result run(const safetensors::File& f, const Plan& pl, B& be, Algorithm cls_alg) {
  using Space = typename B::Space;
  Opt opt{be, pl.opts};
  const int steps = std::stoi(meta(f, "steps"));
  if (steps < 0 || steps > 100000) throw Unsupported(concat("steps = ", steps));
  json shapes = meta_json(f, "shapes");
  struct Buf {
    std::string name;
    std::vector<std::int64_t> shape;
    std::size_t numel = 0;
    typename B::RawBuffer x, g;
  };
  std::vector<Buf> bufs;
  for (const auto& [go, names] : pl.groups) {
    const Algorithm a = go.algorithm.value_or(cls_alg);
    auto grp = opt.add_group(group_for(go, pl.opts, a, cls_alg == Algorithm::dion));
    for (const auto& n : names) {
      Buf b;
      b.name = n;
      if (!shapes.contains(n)) throw Unsupported(concat("no shape for parameter '", n, "'"));
      for (const auto& d : shapes[n]) b.shape.push_back(d.template get<std::int64_t>());
      if (b.shape.empty() || b.shape.size() > 4) throw Unsupported(concat("parameter '", n, "' has ", b.shape.size(), " dims"));
      Shape s;
      s.ndim = static_cast<int>(b.shape.size());
      for (std::size_t i = 0; i < b.shape.size(); ++i) s.dims[i] = b.shape[i];
      b.numel = static_cast<std::size_t>(s.numel());
      const auto init = f.read_f32("init/" + n);
      if (init.size() != b.numel) throw Unsupported(concat("init/", n, " has ", init.size(), " values"));
      b.x = be.alloc_bytes(b.numel * sizeof(float));
      b.g = be.alloc_bytes(b.numel * sizeof(float));
      be.copy_from_host(init.data(), b.x.data(), b.numel * sizeof(float));
      grp.add(n, dion::view<Space>(static_cast<float*>(b.x.data()), s), dion::view<Space>(static_cast<float*>(b.g.data()), s));
      bufs.push_back(std::move(b));
    }
  }
  // Dion's initial Q, when the case carries it
  for (auto& b : bufs)
    if (f.has("state0/" + b.name + "/Q")) opt.write_state(b.name + "/Q", f.read_f32("state0/" + b.name + "/Q"));
  for (int k = 0; k < steps; ++k) {
    for (auto& b : bufs) {
      const std::string key = "grad/" + std::to_string(k) + "/" + b.name;
      if (!f.has(key)) {
        opt.clear_grad(b.name);
        continue;
      }
      const auto g = f.read_f32(key);
      if (g.size() != b.numel) throw Unsupported(concat(key, " has ", g.size(), " values"));
      be.copy_from_host(g.data(), b.g.data(), b.numel * sizeof(float));
      Shape s;
      s.ndim = static_cast<int>(b.shape.size());
      for (std::size_t i = 0; i < b.shape.size(); ++i) s.dims[i] = b.shape[i];
      opt.set_grad(b.name, dion::view<Space>(static_cast<float*>(b.g.data()), s));
    }
    opt.step();
  }
  be.synchronize();
  Result res;
  for (auto& b : bufs) {
    Tensor t;
    t.shape = b.shape;
    t.values.resize(b.numel);
    be.copy_to_host(b.x.data(), t.values.data(), b.numel * sizeof(float));
    be.synchronize();
    res.params[b.name] = std::move(t);
  }
  for (auto& s : opt.state()) {
    Tensor t;
    for (int i = 0; i < s.view.shape.ndim; ++i) t.shape.push_back(s.view.shape[i]);
    t.values = opt.read_state(s.name);
    res.state[s.name] = std::move(t);
  }
  return res;
}

template <class B, class P>
Result dispatch_impl(const safetensors::File& f, const Plan& pl, B& be) {
  switch (pl.impl) {
    case Impl::muon: return run<Muon<B, SingleProcess, P>>(f, pl, be, Algorithm::muon);
    case Impl::normuon: return run<NorMuon<B, SingleProcess, P>>(f, pl, be, Algorithm::normuon);
    case Impl::dion2: return run<Dion2<B, SingleProcess, P>>(f, pl, be, Algorithm::dion2);
    case Impl::nordion2: return run<NorDion2<B, SingleProcess, P>>(f, pl, be, Algorithm::nordion2);
    case Impl::dion: return run<Dion<B, SingleProcess, P>>(f, pl, be, Algorithm::dion);
  }
  throw Unsupported("unknown impl");
}

/// States keep the parameter dtype (fp32 in every case); only the orthogonalization type varies.
struct ParamStatesBf16Ortho : precision::Default {};
struct ParamStatesFp32Ortho {
  static constexpr precision::Storage momentum = precision::Storage::param;
  static constexpr precision::Storage Q = precision::Storage::param;
  static constexpr precision::Storage variance = precision::Storage::param;
  using ortho_t = float;
};
}  // namespace detail

/// Replay a golden case file on backend `be`.
template <class B>
Result replay(const safetensors::File& f, B& be) {
  const auto pl = detail::make_plan(f);
  if (pl.fp32_ortho) return detail::dispatch_impl<B, detail::ParamStatesFp32Ortho>(f, pl, be);
  return detail::dispatch_impl<B, detail::ParamStatesBf16Ortho>(f, pl, be);
}

/// Write a Result as the dion-replay output file: param/<p> and state/<p>/<key>, all float32.
inline void write_result(const Result& r, const std::string& path, const std::map<std::string, std::string>& meta = {}) {
  safetensors::Writer w;
  for (const auto& [n, t] : r.params) w.add_f32("param/" + n, t.shape, t.values);
  for (const auto& [n, t] : r.state) w.add_f32("state/" + n, t.shape, t.values);
  for (const auto& [k, v] : meta) w.set_metadata(k, v);
  w.write_file(path);
}

/// ‖(ours − init) − (ref − init)‖ / ‖ref − init‖ (norm-wise relative error of the update).
inline double update_error(const std::vector<float>& ours, const std::vector<float>& ref, const std::vector<float>& init) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double d = (static_cast<double>(ours[i]) - init[i]) - (static_cast<double>(ref[i]) - init[i]);
    const double r = static_cast<double>(ref[i]) - init[i];
    num += d * d;
    den += r * r;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}
/// ‖a − b‖ / ‖b‖.
inline double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

}  // namespace dion::replay
