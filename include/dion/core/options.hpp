// Hyperparameters: one aggregate with every knob of SPEC.md §1 and its default, and the per-group
// overrides. Defaults are microsoft/dion's (they coincide across its optimizer classes).
// Validation rejects NaN (checks are written `!(x >= 0)`), out-of-range values, and override keys
// that the group's algorithm would ignore: a silently ignored key is a bug waiting to happen.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dion/core/error.hpp"

namespace dion {

/// The update rule of a parameter group.
enum class Algorithm : std::uint8_t { muon, normuon, dion, dion2, nordion2, lion, adamw };

inline constexpr const char* algorithm_name(Algorithm a) {
  switch (a) {
    case Algorithm::muon: return "muon";
    case Algorithm::normuon: return "normuon";
    case Algorithm::dion: return "dion";
    case Algorithm::dion2: return "dion2";
    case Algorithm::nordion2: return "nordion2";
    case Algorithm::lion: return "lion";
    case Algorithm::adamw: return "adamw";
  }
  return "?";
}
inline Algorithm parse_algorithm(std::string_view s) {
  if (s == "muon") return Algorithm::muon;
  if (s == "normuon") return Algorithm::normuon;
  if (s == "dion") return Algorithm::dion;
  if (s == "dion2") return Algorithm::dion2;
  if (s == "nordion2" || s == "dion3") return Algorithm::nordion2;
  if (s == "lion") return Algorithm::lion;
  if (s == "adamw") return Algorithm::adamw;
  throw InvalidArgument(detail::concat("algorithm: unknown value '", s,
                                       "' (allowed: muon, normuon, dion, dion2, nordion2, dion3, lion, adamw)"));
}
inline constexpr bool is_scalar_algorithm(Algorithm a) { return a == Algorithm::lion || a == Algorithm::adamw; }
inline constexpr bool is_muon_family(Algorithm a) {
  return a == Algorithm::muon || a == Algorithm::normuon || a == Algorithm::dion2 || a == Algorithm::nordion2;
}

/// Learning-rate adjustment by shape (SPEC §0.1).
enum class AdjustLr : std::uint8_t { spectral_norm, rms_norm, none };
inline constexpr const char* adjust_lr_name(AdjustLr a) {
  return a == AdjustLr::spectral_norm ? "spectral_norm" : a == AdjustLr::rms_norm ? "rms_norm" : "none";
}

/// Orthonormalization of Dion's power-iteration output (SPEC §1.5).
enum class QrMethod : std::uint8_t { qr, cqr, rcqr };
inline constexpr const char* qr_method_name(QrMethod q) {
  return q == QrMethod::qr ? "qr" : q == QrMethod::cqr ? "cqr" : "rcqr";
}

/// Dion2 / NorDion2 slice selection on sharded parameters (SPEC §1.3).
enum class SelectionScope : std::uint8_t { local, global };

/// The polar-factor approximation of the Muon family (SPEC §0.2).
enum class Orthogonalizer : std::uint8_t {
  polar_express,        ///< 5 iterations, per-iteration coefficients (arXiv 2505.16932); the default
  newton_schulz,        ///< classic quintic NS, microsoft/dion's 5 per-iteration coefficients
  newton_schulz_const,  ///< Keller Jordan's constant (3.4445, -4.7750, 2.0315), `ns_steps` iterations
};
inline constexpr const char* orthogonalizer_name(Orthogonalizer o) {
  return o == Orthogonalizer::polar_express ? "polar_express"
         : o == Orthogonalizer::newton_schulz ? "newton_schulz"
                                               : "newton_schulz_const";
}

/// What to do when a gradient holds NaN or Inf (RELIABILITY.md §2).
enum class NonFinitePolicy : std::uint8_t {
  skip_step,  ///< leave parameters, state and counters untouched; count the skip (default)
  raise,      ///< throw dion::NonFinite naming the parameter, before anything is changed
  propagate,  ///< no check: NaN flows into the parameters (what torch.optim does; zero overhead)
};
inline constexpr const char* non_finite_policy_name(NonFinitePolicy p) {
  switch (p) {
    case NonFinitePolicy::skip_step: return "skip_step";
    case NonFinitePolicy::raise: return "raise";
    case NonFinitePolicy::propagate: return "propagate";
  }
  return "?";
}

/// Every hyperparameter, with microsoft/dion's defaults. Given to an optimizer's constructor, it is
/// the default of every group; a group overrides single fields with GroupOptions.
struct Options {
  float lr = 0.01f;               ///< base learning rate (all)
  float mu = 0.95f;               ///< momentum (Muon, NorMuon) / error-feedback decay (Dion, NorDion2)
  float beta1 = 0.9f;             ///< Lion / AdamW first coefficient
  float beta2 = 0.95f;            ///< Lion / AdamW second coefficient
  float weight_decay = 0.01f;     ///< decoupled, multiplies the base lr
  float epsilon = 1e-8f;          ///< numerical floor (orthogonalizer normalization, AdamW, Dion columns)
  bool cautious_wd = false;       ///< decay only where sign(X) agrees with the update (arXiv 2510.12402)
  bool nesterov = false;          ///< Muon / NorMuon
  AdjustLr adjust_lr = AdjustLr::spectral_norm;  ///< Muon family
  bool flatten = false;           ///< orthogonalize (d0, d1·d2·…) per parameter
  int num_heads = 1;              ///< per-head orthogonalization of (H·h, in) weights
  std::vector<std::int64_t> split_sizes = {};    ///< row blocks orthogonalized separately (Muon, NorMuon)
  float muon_beta2 = 0.95f;       ///< NorMuon / NorDion2 neuron-variance EMA (arXiv 2510.05491)
  double fraction = 0.25;         ///< Dion2 / NorDion2 selected fraction of slices, in (0, 1]
  float ef_decay = 0.95f;         ///< Dion2 error-feedback decay of selected slices
  SelectionScope selection_scope = SelectionScope::local;
  double rank_fraction = 1.0;     ///< Dion low rank r = rank_fraction · min(m, n) (arXiv 2504.05295)
  int rank_multiple_of = 1;       ///< Dion: round r up to a multiple of this
  int power_iters = 1;            ///< Dion power iterations per step
  QrMethod qr_method = QrMethod::rcqr;  ///< Dion orthonormalization
  int cqr_warmup_steps = 150;     ///< Dion: cqr uses rcqr for the first step() calls (skipped ones count)
  double rcqr_oversample = 1.25;  ///< Dion: sketch rows = ceil(oversample·r/128)·128
  Orthogonalizer orthogonalizer = Orthogonalizer::polar_express;
  int ns_steps = 5;               ///< iterations of newton_schulz_const
  std::uint64_t seed = 0;         ///< Dion's initial Q and RCQR sketches (counter-based generator)
  NonFinitePolicy non_finite = NonFinitePolicy::skip_step;
  std::int64_t workspace_limit_bytes = std::int64_t{256} << 20;  ///< cap of one orthogonalization batch
  /// Dion (SPEC §2.5): the optimizer synchronizes over the mesh's `replicate` dimension. Full-rank
  /// matrices (and lion/adamw parameters) get their gradients averaged in place before the step;
  /// compressed low-rank matrices (rank_fraction < 1 and (m+n)·r < m·n) average P and R instead and
  /// keep decoupled momenta (call synchronize_for_checkpoint() before saving). false: the caller
  /// averages gradients itself (e.g. DDP). Ignored without a replicate communicator.
  bool replicate_mesh_grad_sync = true;
};

/// Per-group overrides: an unset field takes the optimizer's Options value. Setting a field the
/// group's algorithm does not use is an error (dion::InvalidArgument), never silently ignored.
struct GroupOptions {
  std::optional<Algorithm> algorithm = std::nullopt;  ///< default: the optimizer's own algorithm
  std::optional<float> lr = std::nullopt;
  std::optional<float> mu = std::nullopt;
  std::optional<float> beta1 = std::nullopt;
  std::optional<float> beta2 = std::nullopt;
  std::optional<float> weight_decay = std::nullopt;
  std::optional<float> epsilon = std::nullopt;
  std::optional<bool> cautious_wd = std::nullopt;
  std::optional<bool> nesterov = std::nullopt;
  std::optional<AdjustLr> adjust_lr = std::nullopt;
  std::optional<bool> flatten = std::nullopt;
  std::optional<int> num_heads = std::nullopt;
  std::optional<std::vector<std::int64_t>> split_sizes = std::nullopt;
  std::optional<float> muon_beta2 = std::nullopt;
  std::optional<double> fraction = std::nullopt;
  std::optional<float> ef_decay = std::nullopt;
  std::optional<SelectionScope> selection_scope = std::nullopt;
  std::optional<double> rank_fraction = std::nullopt;
  std::optional<int> rank_multiple_of = std::nullopt;
  std::optional<int> power_iters = std::nullopt;
  std::optional<QrMethod> qr_method = std::nullopt;
  std::optional<int> cqr_warmup_steps = std::nullopt;
  std::optional<double> rcqr_oversample = std::nullopt;
  std::optional<Orthogonalizer> orthogonalizer = std::nullopt;
  std::optional<int> ns_steps = std::nullopt;
};

namespace detail {

enum Uses : std::uint32_t {
  kLr = 1u << 0, kMu = 1u << 1, kBeta1 = 1u << 2, kBeta2 = 1u << 3, kWd = 1u << 4, kEps = 1u << 5,
  kCautious = 1u << 6, kNesterov = 1u << 7, kAdjust = 1u << 8, kFlatten = 1u << 9, kHeads = 1u << 10,
  kSplit = 1u << 11, kMuonBeta2 = 1u << 12, kFraction = 1u << 13, kEfDecay = 1u << 14, kScope = 1u << 15,
  kRankFrac = 1u << 16, kRankMult = 1u << 17, kPowerIters = 1u << 18, kQr = 1u << 19, kCqrWarm = 1u << 20,
  kOversample = 1u << 21, kOrtho = 1u << 22, kNsSteps = 1u << 23,
};

/// Which hyperparameters an algorithm reads. `dion_class_scalar`: Lion/AdamW inside Dion have no
/// cautious weight decay (SPEC §1.5).
inline std::uint32_t keys_used(Algorithm a, bool dion_class_scalar = false) {
  const std::uint32_t base = kLr | kWd | kEps;
  const std::uint32_t shape = kAdjust | kFlatten | kHeads | kOrtho | kNsSteps;
  switch (a) {
    case Algorithm::muon: return base | kMu | kNesterov | kCautious | shape | kSplit;
    case Algorithm::normuon: return base | kMu | kNesterov | kCautious | shape | kSplit | kMuonBeta2;
    case Algorithm::dion2: return base | shape | kFraction | kEfDecay | kScope;
    case Algorithm::nordion2: return base | shape | kMu | kMuonBeta2 | kFraction | kScope;
    case Algorithm::dion:
      return base | kMu | kRankFrac | kRankMult | kPowerIters | kQr | kCqrWarm | kOversample;
    case Algorithm::lion: return kLr | kWd | kBeta1 | kBeta2 | (dion_class_scalar ? 0u : kCautious);
    case Algorithm::adamw: return base | kBeta1 | kBeta2 | (dion_class_scalar ? 0u : kCautious);
  }
  return 0;
}

inline void check_range(bool ok, const char* field, double v, const char* range, const std::string& where) {
  if (!ok)
    throw InvalidArgument(concat(where, field, " = ", v, " is out of range: allowed ", range));
}

}  // namespace detail

/// Validate every field an algorithm reads; `where` prefixes the message (e.g. "group 2: ").
inline void validate_options(const Options& o, Algorithm a, const std::string& where = "") {
  using namespace detail;
  const auto used = keys_used(a);
  check_range(std::isfinite(o.lr) && o.lr >= 0, "lr", o.lr, ">= 0 and finite", where);
  check_range(std::isfinite(o.weight_decay) && o.weight_decay >= 0, "weight_decay", o.weight_decay,
              ">= 0 and finite", where);
  if (used & kEps) check_range(std::isfinite(o.epsilon) && o.epsilon > 0, "epsilon", o.epsilon, "> 0 and finite", where);
  if (used & kMu) check_range(o.mu >= 0 && o.mu < 1, "mu", o.mu, "[0, 1)", where);
  if (used & kBeta1) check_range(o.beta1 >= 0 && o.beta1 < 1, "beta1", o.beta1, "[0, 1)", where);
  if (used & kBeta2) check_range(o.beta2 >= 0 && o.beta2 < 1, "beta2", o.beta2, "[0, 1)", where);
  if (used & kMuonBeta2)
    check_range(o.muon_beta2 >= 0 && o.muon_beta2 < 1, "muon_beta2", o.muon_beta2, "[0, 1)", where);
  if (used & kFraction) check_range(o.fraction > 0 && o.fraction <= 1, "fraction", o.fraction, "(0, 1]", where);
  if (used & kEfDecay) check_range(o.ef_decay >= 0 && o.ef_decay <= 1, "ef_decay", o.ef_decay, "[0, 1]", where);
  if (used & kRankFrac)
    check_range(o.rank_fraction > 0 && o.rank_fraction <= 1, "rank_fraction", o.rank_fraction, "(0, 1]", where);
  if (used & kRankMult)
    check_range(o.rank_multiple_of >= 1, "rank_multiple_of", o.rank_multiple_of, ">= 1", where);
  if (used & kPowerIters)
    check_range(o.power_iters >= 1 && o.power_iters <= 100, "power_iters", o.power_iters, "[1, 100]", where);
  if (used & kCqrWarm)
    check_range(o.cqr_warmup_steps >= 0, "cqr_warmup_steps", o.cqr_warmup_steps, ">= 0", where);
  if (used & kOversample)
    check_range(std::isfinite(o.rcqr_oversample) && o.rcqr_oversample >= 1 && o.rcqr_oversample <= 64,
                "rcqr_oversample", o.rcqr_oversample, "[1, 64]", where);
  if (used & kNsSteps) check_range(o.ns_steps >= 1 && o.ns_steps < 100, "ns_steps", o.ns_steps, "[1, 100)", where);
  if (used & kHeads) check_range(o.num_heads >= 1, "num_heads", o.num_heads, ">= 1", where);
  if (used & kHeads) {
    if (o.num_heads > 1 && o.flatten)
      throw InvalidArgument(concat(where, "num_heads = ", o.num_heads, " cannot be combined with flatten = true"));
  }
  if (!o.split_sizes.empty()) {
    if (!(used & kSplit))
      throw NotSupported(concat(where, "split_sizes is not supported by algorithm '", algorithm_name(a),
                                "' (only muon and normuon)"));
    if (o.split_sizes.size() < 2)
      throw InvalidArgument(concat(where, "split_sizes must hold at least 2 block heights, got ",
                                   o.split_sizes.size()));
    for (auto s : o.split_sizes)
      check_range(s > 0, "split_sizes entry", static_cast<double>(s), "> 0", where);
    if (o.num_heads > 1)
      throw InvalidArgument(concat(where, "split_sizes cannot be combined with num_heads = ", o.num_heads));
    if (o.flatten) throw InvalidArgument(concat(where, "split_sizes cannot be combined with flatten = true"));
  }
  if (o.orthogonalizer != Orthogonalizer::newton_schulz_const && o.ns_steps != 5 && (used & kNsSteps))
    throw InvalidArgument(concat(where, "ns_steps = ", o.ns_steps,
                                 " is only used by orthogonalizer newton_schulz_const (got ",
                                 orthogonalizer_name(o.orthogonalizer), ")"));
  check_range(o.workspace_limit_bytes > 0, "workspace_limit_bytes", static_cast<double>(o.workspace_limit_bytes),
              "> 0", where);
}

/// Merge group overrides into the optimizer defaults; throws if an override is one the algorithm
/// would ignore. `dion_class`: the optimizer is Dion (its scalar groups have no cautious_wd).
inline Options merge_options(const Options& base, const GroupOptions& g, Algorithm a, bool dion_class,
                             const std::string& where) {
  using namespace detail;
  const std::uint32_t used = keys_used(a, dion_class && is_scalar_algorithm(a));
  Options o = base;
  auto take = [&](const auto& opt, auto& field, std::uint32_t key, const char* name) {
    if (!opt) return;
    if (!(used & key))
      throw InvalidArgument(concat(where, "hyperparameter '", name, "' is not used by algorithm '",
                                   algorithm_name(a), "'", (dion_class && key == kCautious) ? " inside Dion" : "",
                                   "; remove it from the group"));
    field = *opt;
  };
  take(g.lr, o.lr, kLr, "lr");
  take(g.mu, o.mu, kMu, "mu");
  take(g.beta1, o.beta1, kBeta1, "beta1");
  take(g.beta2, o.beta2, kBeta2, "beta2");
  take(g.weight_decay, o.weight_decay, kWd, "weight_decay");
  take(g.epsilon, o.epsilon, kEps, "epsilon");
  take(g.cautious_wd, o.cautious_wd, kCautious, "cautious_wd");
  take(g.nesterov, o.nesterov, kNesterov, "nesterov");
  take(g.adjust_lr, o.adjust_lr, kAdjust, "adjust_lr");
  take(g.flatten, o.flatten, kFlatten, "flatten");
  take(g.num_heads, o.num_heads, kHeads, "num_heads");
  take(g.split_sizes, o.split_sizes, kSplit, "split_sizes");
  take(g.muon_beta2, o.muon_beta2, kMuonBeta2, "muon_beta2");
  take(g.fraction, o.fraction, kFraction, "fraction");
  take(g.ef_decay, o.ef_decay, kEfDecay, "ef_decay");
  take(g.selection_scope, o.selection_scope, kScope, "selection_scope");
  take(g.rank_fraction, o.rank_fraction, kRankFrac, "rank_fraction");
  take(g.rank_multiple_of, o.rank_multiple_of, kRankMult, "rank_multiple_of");
  take(g.power_iters, o.power_iters, kPowerIters, "power_iters");
  take(g.qr_method, o.qr_method, kQr, "qr_method");
  take(g.cqr_warmup_steps, o.cqr_warmup_steps, kCqrWarm, "cqr_warmup_steps");
  take(g.rcqr_oversample, o.rcqr_oversample, kOversample, "rcqr_oversample");
  take(g.orthogonalizer, o.orthogonalizer, kOrtho, "orthogonalizer");
  take(g.ns_steps, o.ns_steps, kNsSteps, "ns_steps");
  if (!(used & kSplit)) o.split_sizes.clear();  // a class default never applies to other algorithms
  if (!(used & kHeads)) o.num_heads = 1;
  if (!(used & kFlatten)) o.flatten = false;
  if (!(used & kCautious)) o.cautious_wd = false;
  validate_options(o, a, where);
  return o;
}

}  // namespace dion
