// The training recipes shared by the CPU demo (00-demo-fashion-mnist) and the GPU training example
// (05-gpu-training): learning rates per optimizer, the construction of a named optimizer on any
// backend, and the small formatting helpers of their result tables.
//
// The orthonormal optimizers share microsoft/dion's recipe: lr for the hidden matrices (shape-adjusted
// by dion: x sqrt(fan_out / fan_in)), Lion at lr / sqrt(fan_in) for the output layer and Lion at lr for
// the biases. The baselines use one lr for everything. (On the demo's model the results hardly move
// between lr 0.02 and 0.05, or with the bias lr anywhere in [0.002, 0.02].)
#pragma once

#include <dion/optimizers.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace recipes {

struct Recipe {
  std::string name;   // muon, normuon, dion, dion2, nordion2, adamw, lion
  std::string label;  // Muon, NorMuon, ...
  float lr = 0.0f;
  float head_lr = 0.0f;
  float bias_lr = 0.0f;
  bool orthonormal = true;
};

inline Recipe recipe_for(const std::string& name, int head_fan_in) {
  Recipe r;
  r.name = name;
  const float ortho_lr = 0.02f;
  r.lr = ortho_lr;
  r.head_lr = ortho_lr / std::sqrt(static_cast<float>(head_fan_in));
  r.bias_lr = ortho_lr;
  if (name == "muon") r.label = "Muon";
  else if (name == "normuon") r.label = "NorMuon";
  else if (name == "dion") r.label = "Dion";
  else if (name == "dion2") r.label = "Dion2";
  else if (name == "nordion2" || name == "dion3") { r.name = "nordion2"; r.label = "NorDion2"; }
  else if (name == "adamw") { r.label = "AdamW"; r.lr = 1e-3f; r.orthonormal = false; }
  else if (name == "lion") { r.label = "Lion"; r.lr = 1e-4f; r.orthonormal = false; }
  else throw std::invalid_argument("unknown optimizer '" + name + "' (muon, normuon, dion, dion2, nordion2, adamw, lion)");
  return r;
}

/// Builds the optimizer the recipe names (each is its own type) on `backend` and calls go(opt).
/// Dion runs at rank_fraction 1/4: its Q is (n, r) with r = min(m, n) / 4 instead of a second
/// full-size buffer.
template <class Backend, class Go>
auto with_optimizer(const Recipe& r, Backend& backend, dion::Options base, Go&& go) {
  base.lr = r.lr;
  if (r.name == "muon") { dion::Muon<Backend> opt{backend, base}; return go(opt); }
  if (r.name == "normuon") { dion::NorMuon<Backend> opt{backend, base}; return go(opt); }
  if (r.name == "dion") {
    base.rank_fraction = 0.25;
    dion::Dion<Backend> opt{backend, base};
    return go(opt);
  }
  if (r.name == "dion2") { dion::Dion2<Backend> opt{backend, base}; return go(opt); }
  if (r.name == "nordion2") { dion::NorDion2<Backend> opt{backend, base}; return go(opt); }
  if (r.name == "adamw") { dion::AdamW<Backend> opt{backend, base}; return go(opt); }
  dion::Lion<Backend> opt{backend, base};
  return go(opt);
}

/// "918.5 KiB" / "38.23 MiB".
inline std::string human_bytes(std::int64_t b) {
  char buf[32];
  if (b >= (1 << 20)) std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(b) / (1 << 20));
  else std::snprintf(buf, sizeof buf, "%.1f KiB", static_cast<double>(b) / (1 << 10));
  return buf;
}

}  // namespace recipes
