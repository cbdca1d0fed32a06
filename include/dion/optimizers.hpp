// The named optimizers. Each is the generic engine with its own default algorithm; every one also
// accepts `lion` and `adamw` groups for parameters that are not weight matrices.
//
//   dion::EigenBackend cpu;
//   dion::Muon<dion::EigenBackend> opt{cpu, {.lr = 0.02f}};
//   opt.add_group().add("layer0.weight", dion::host_view(w, {256, 784}), dion::host_view(gw, {256, 784}));
//   opt.add_group({.algorithm = dion::Algorithm::adamw, .lr = 3e-4f}).add("layer0.bias", ...);
//   opt.step();
#pragma once

#include "dion/comm/mesh.hpp"
#include "dion/comm/single.hpp"
#include "dion/core/optimizer.hpp"
#include "dion/precision/precision.hpp"

namespace dion {

#define DION_NAMED_OPTIMIZER(Name, Alg, Fam, Doc)                                                          \
  /** Doc */                                                                                              \
  template <Backend B, Communicator Comm = SingleProcess, PrecisionPolicy P = precision::Default>                \
  class Name : public Optimizer<B, Comm, P> {                                                             \
   public:                                                                                                \
    static constexpr Algorithm default_algorithm = Algorithm::Alg;                                        \
    explicit Name(B& backend, Options opts = {}) : Optimizer<B, Comm, P>(backend, std::move(opts), Alg_(), Fam) {} \
    Name(B& backend, Mesh<Comm> mesh, Options opts = {})                                                  \
        : Optimizer<B, Comm, P>(backend, std::move(opts), Alg_(), Fam, mesh) {}                           \
                                                                                                          \
   private:                                                                                               \
    static constexpr Algorithm Alg_() { return Algorithm::Alg; }                                          \
  };

/// Muon: momentum orthogonalized by Polar Express / Newton–Schulz (Jordan et al. 2024; arXiv 2502.16982).
DION_NAMED_OPTIMIZER(Muon, muon, detail::Family::ortho, Muon)
/// NorMuon: Muon with per-neuron second-moment normalization (arXiv 2510.05491).
DION_NAMED_OPTIMIZER(NorMuon, normuon, detail::Family::ortho, NorMuon)
/// Dion: distributed orthonormalization by low-rank power iteration with error feedback (arXiv 2504.05295).
DION_NAMED_OPTIMIZER(Dion, dion, detail::Family::dion, Dion)
/// Dion2: orthogonalize a selected fraction of rows/columns with error feedback (microsoft/dion).
DION_NAMED_OPTIMIZER(Dion2, dion2, detail::Family::ortho, Dion2)
/// NorDion2 (also Dion3): Dion2 over whole neurons with NorMuon's normalization (microsoft/dion).
DION_NAMED_OPTIMIZER(NorDion2, nordion2, detail::Family::ortho, NorDion2)
/// Lion: sign momentum (arXiv 2302.06675).
DION_NAMED_OPTIMIZER(Lion, lion, detail::Family::scalar, Lion)
/// AdamW: decoupled weight decay Adam (arXiv 1711.05101).
DION_NAMED_OPTIMIZER(AdamW, adamw, detail::Family::scalar, AdamW)
#undef DION_NAMED_OPTIMIZER

/// Dion3 is NorDion2 (microsoft/dion's alias).
template <Backend B, Communicator Comm = SingleProcess, PrecisionPolicy P = precision::Default>
using Dion3 = NorDion2<B, Comm, P>;

}  // namespace dion
