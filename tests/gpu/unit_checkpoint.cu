// Checkpoints on the CUDA backend (RELIABILITY C1, C2, C5–C8, C14–C18, N4).
//  * The backend-generic bodies of tests/unit/test_checkpoint.cpp (TEMPLATE_TEST_CASE over
//    DION_TEST_BACKENDS), run on the CUDA backend: exact bitwise resume for every optimizer (Dion's Q
//    and device step counters included), byte-identical re-save, truncation, bit flips, mismatches,
//    incomplete checkpoints, disk full; dion_tests runs the same bodies on Eigen.
//  * C14, across backends: a checkpoint saved by the Eigen backend loads into the CUDA backend (and
//    one saved on CUDA into Eigen) with every state tensor bitwise the saved one, the counters and
//    hyperparameters restored, and the file re-saved from the other backend byte-identical; training
//    then continues on the other backend like the uninterrupted run (within the CUDA-vs-Eigen
//    tolerance of tests/gpu/test_cuda_optimizers.cu).
#define DION_TEST_BACKENDS dion::CudaBackend
#include <algorithm>
#include <cstdio>

#include "backend_env_cuda.hpp"
#include "unit/test_checkpoint.cpp"

namespace {

/// Save with backend `From` after `n` steps, load into backend `To`, run `m` more steps on both;
/// compare the state at the load bitwise and the parameters after the continuation.
template <template <class> class OptT, class From, class To>
void check_cross_backend(const Options& o, const char* what, double tol, int n = 3, int m = 3) {
  INFO(what << ": " << dion_test::BackendEnv<From>::name << " -> " << dion_test::BackendEnv<To>::name);
  using OptA = OptT<From>;
  using OptB = OptT<To>;
  dion_test::BackendEnv<From> ea;
  dion_test::BackendEnv<To> eb;
  TempDir dir;
  Model<OptA, From> a(ea, o);
  a.nan_at = 1;  // a skipped step before the save: the skip counter travels too
  for (int k = 0; k < n; ++k) a.step(k);
  a.opt.set_lr(0, 0.5f * a.opt.lr(0));
  ck::save(a.opt, dir / "c");
  const auto saved_params = a.params();

  Model<OptB, To> b(eb, o, /*seed=*/99, &saved_params);
  ck::load(b.opt, dir / "c");
  // The loaded state is the saved state, bit for bit, whichever backend holds it.
  CHECK(dion_test::snapshots_equal(dion_test::state_snapshot(a.opt), dion_test::state_snapshot(b.opt)));
  CHECK(dion_test::step_counts(a.opt) == dion_test::step_counts(b.opt));
  CHECK(a.opt.skipped_steps() == b.opt.skipped_steps());
  for (int g = 0; g < a.opt.num_groups(); ++g) {
    CHECK(a.opt.lr(g) == b.opt.lr(g));
    CHECK(a.opt.weight_decay(g) == b.opt.weight_decay(g));
  }
  // Re-saved from the other backend: the same bytes (the file names the backend it was written by,
  // so compare the tensors and the document without that field).
  {
    const auto fa = st::File::parse(std::span<const std::byte>(ck::save_bytes(a.opt)));
    const auto img_b = ck::save_bytes(b.opt);
    const auto fb = st::File::parse(std::span<const std::byte>(img_b));
    REQUIRE(fa.tensors().size() == fb.tensors().size());
    for (std::size_t i = 0; i < fa.tensors().size(); ++i) {
      const auto& ta = fa.tensors()[i];
      const auto& tb = fb.tensors()[i];
      INFO("tensor " << ta.name);
      CHECK(ta.name == tb.name);
      const auto ba = fa.bytes(ta), bb = fb.bytes(tb);
      CHECK((ba.size() == bb.size() && std::equal(ba.begin(), ba.end(), bb.begin())));
    }
    auto sa = nlohmann::json::parse(*fa.metadata("dion.state"));
    auto sb = nlohmann::json::parse(*fb.metadata("dion.state"));
    CHECK(sa["backend"] == std::string(From::name));
    CHECK(sb["backend"] == std::string(To::name));
    sa.erase("backend");
    sb.erase("backend");
    CHECK(sa == sb);
  }
  // Training continues on the other backend like the uninterrupted run on the first one, within the
  // CUDA-vs-Eigen differences of the steps themselves (bf16 orthogonalization in the Muon family:
  // tests/gpu/test_cuda_optimizers.cu allows 1e-2 on the parameters there; measured ~3.5e-5 here).
  for (int k = n; k < n + m; ++k) {
    a.step(k);
    b.step(k);
  }
  const auto pa = a.params(), pb = b.params();
  double worst = 0;
  for (std::size_t i = 0; i < pa.size(); ++i) worst = std::max(worst, dion_test::rel_err(pb[i], pa[i]));
  std::printf("C14 %-22s %s -> %s: continued %d steps, largest parameter difference %.3g (tolerance %.0e)\n", what,
              dion_test::BackendEnv<From>::name, dion_test::BackendEnv<To>::name, m, worst, tol);
  for (std::size_t i = 0; i < pa.size(); ++i) {
    INFO("parameter " << a.names[i] << ": relative difference " << dion_test::rel_err(pb[i], pa[i]));
    CHECK(dion_test::all_finite(pb[i]));
    CHECK(dion_test::rel_err(pb[i], pa[i]) <= tol);
  }
  CHECK(dion_test::step_counts(a.opt) == dion_test::step_counts(b.opt));
}

template <class B>
using MuonBf16 = dion::Muon<B, dion::SingleProcess, dion::precision::Bf16States>;
template <class B>
using DionBf16 = dion::Dion<B, dion::SingleProcess, dion::precision::Bf16States>;

template <class From, class To>
void check_cross_backend_all() {
  check_cross_backend<dion::Muon, From, To>({}, "muon", 1e-3);
  check_cross_backend<dion::NorMuon, From, To>({}, "normuon", 1e-3);
  check_cross_backend<dion::Dion2, From, To>({}, "dion2", 1e-3);
  check_cross_backend<dion::NorDion2, From, To>({}, "nordion2", 1e-3);
  check_cross_backend<dion::Dion, From, To>({}, "dion (rcqr)", 1e-4);
  check_cross_backend<dion::Dion, From, To>({.qr_method = dion::QrMethod::cqr, .cqr_warmup_steps = 2}, "dion (cqr)",
                                            1e-4, 2, 4);
  check_cross_backend<dion::Dion, From, To>({.rank_fraction = 0.5, .qr_method = dion::QrMethod::qr}, "dion (qr, r/2)",
                                            1e-4);
  check_cross_backend<MuonBf16, From, To>({}, "muon, bf16 states", 1e-2);
  check_cross_backend<DionBf16, From, To>({}, "dion, bf16 states", 1e-2);
}

}  // namespace

TEST_CASE("checkpoint (C14): saved on Eigen, loaded on CUDA: the same state bitwise, training continues",
          "[checkpoint][cuda][c14]") {
  check_cross_backend_all<dion::EigenBackend, dion::CudaBackend>();
}

TEST_CASE("checkpoint (C14): saved on CUDA, loaded on Eigen: the same state bitwise, training continues",
          "[checkpoint][cuda][c14]") {
  check_cross_backend_all<dion::CudaBackend, dion::EigenBackend>();
}
