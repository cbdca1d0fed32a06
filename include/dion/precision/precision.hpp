// Precision policies (CUTLASS-style separate storage and compute types). A policy says in which type
// each optimizer state is stored and in which type the Muon family's orthogonalization runs.
// Step counters and reductions are never bf16 (a bf16 counter stops at 256).
#pragma once

#include <type_traits>

#include "dion/core/bf16.hpp"
#include "dion/core/view.hpp"

namespace dion::precision {

/// Where a state tensor's element type comes from.
enum class Storage { param, f32, bf16 };

inline constexpr DType resolve(Storage s, DType param) {
  return s == Storage::param ? param : s == Storage::f32 ? DType::f32 : DType::bf16;
}

/// microsoft/dion as shipped: states in the parameter's dtype; orthogonalization input and
/// arithmetic in bf16 (fp32 accumulation).
struct Default {
  static constexpr Storage momentum = Storage::param;  ///< momentum / error feedback (all algorithms)
  static constexpr Storage Q = Storage::param;         ///< Dion's right factor
  static constexpr Storage variance = Storage::param;  ///< AdamW variance, NorMuon neuron variance
  using ortho_t = bf16;                                ///< Muon-family orthogonalization type
  static constexpr const char* name = "default(states=param, ortho=bf16)";
};

/// Everything in fp32, including the orthogonalization (slower; reference quality).
struct Fp32 {
  static constexpr Storage momentum = Storage::f32;
  static constexpr Storage Q = Storage::f32;
  static constexpr Storage variance = Storage::f32;
  using ortho_t = float;
  static constexpr const char* name = "fp32";
};

/// Memory saver: bf16 momentum, Q and variance (microsoft/dion's `mixed_precision` sample config);
/// element-wise math in fp32, orthogonalization in bf16.
struct Bf16States {
  static constexpr Storage momentum = Storage::bf16;
  static constexpr Storage Q = Storage::bf16;
  static constexpr Storage variance = Storage::bf16;
  using ortho_t = bf16;
  static constexpr const char* name = "bf16-states";
};

}  // namespace dion::precision

namespace dion {
/// A precision policy: storage choices for each state and the orthogonalization type.
template <class P>
concept PrecisionPolicy = requires {
  { P::momentum } -> std::convertible_to<precision::Storage>;
  { P::Q } -> std::convertible_to<precision::Storage>;
  { P::variance } -> std::convertible_to<precision::Storage>;
  typename P::ortho_t;
} && is_element_type_v<typename P::ortho_t>;
}  // namespace dion
