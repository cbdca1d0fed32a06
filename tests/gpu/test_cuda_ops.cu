// Every operation of the Backend concept on the CUDA backend against the Eigen backend, on identical
// random data, for float and bf16, over odd layouts (1×N, N×1, primes, ld > cols, 3-D batches).
// Element-wise ops must agree to the last bit (same formulas, same roundings); products and
// factorizations within fp32 (1e-5) or bf16 (1e-2) tolerance. Padding outside the matrices must be
// left untouched.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "catch_compat.hpp"
#include "gpu_common.hpp"

using dion::bf16;
using dion::Op;
using namespace dion_gpu_test;

namespace {

constexpr double kExact = 1e-6;  // element-wise ops: identical arithmetic (allows libm ulps in pow etc.)
constexpr double kF32 = 1e-5;
constexpr double kBf16 = 1e-2;

template <class T>
double tol_for() {
  return std::is_same_v<T, float> ? kF32 : kBf16;
}

/// Compare the device copy of `p` with its host copy (the Eigen result), record and check.
template <class T>
void check_pair(const std::string& name, Pair<T>& p, double tol) {
  const auto got = p.download();
  const Diff d = compare(p, got);
  errors().add(name, d.rel, tol);
  INFO(name << ": rel " << d.rel << ", max abs " << d.max_abs);
  CHECK(d.rel <= tol);
  CHECK(d.padding_equal);
  CHECK_FALSE(d.nan_mismatch);
}

std::mt19937& rng() {
  static std::mt19937 g(1234);
  return g;
}

template <class T>
Pair<T> rand_pair(const Layout& l, float scale = 1.0f) {
  Pair<T> p(l.batch, l.rows, l.cols, l.pad_ld, l.pad_bs);
  p.randomize(rng(), scale);
  p.upload();
  return p;
}

struct Fixture {
  CudaEnv env;
  dion::EigenBackend cpu;
  dion::CudaBackend& gpu() { return *env.be; }
};

}  // namespace

TEST_CASE("cuda ops: copy and fill (all dtype pairs, odd layouts)", "[gpu][ops]") {
  Fixture fx;
  auto run = [&]<class TS, class TD>() {
    for (const auto& l : elementwise_layouts()) {
      auto s = rand_pair<TS>(l);
      auto d = rand_pair<TD>({l.batch, l.rows, l.cols, l.pad_ld + 1, l.pad_bs});
      fx.cpu.copy(s.h(), d.h());
      fx.gpu().copy(s.d(), d.d());
      check_pair(std::string("copy ") + tname<TS>() + "->" + tname<TD>(), d, kExact);
      auto f = rand_pair<TD>(l);
      fx.cpu.fill(f.h(), 0.1234567f);
      fx.gpu().fill(f.d(), 0.1234567f);
      check_pair(std::string("fill ") + tname<TD>(), f, kExact);
    }
  };
  run.template operator()<float, float>();
  run.template operator()<float, bf16>();
  run.template operator()<bf16, float>();
  run.template operator()<bf16, bf16>();
}

TEST_CASE("cuda ops: gemm (transposes, alpha/beta, batches, ld > cols, k = 0)", "[gpu][ops]") {
  Fixture fx;
  struct G {
    std::int64_t batch, m, n, k, pad;
  };
  const std::vector<G> shapes = {{1, 1, 33, 7, 0}, {1, 33, 1, 7, 0}, {1, 37, 53, 41, 0}, {3, 17, 29, 13, 5},
                                 {2, 64, 64, 64, 3}, {2, 5, 6, 0, 1}, {1, 1, 1, 1, 0}};
  auto run = [&]<class TI, class TO>() {
    for (const auto& g : shapes)
      for (Op ta : {Op::N, Op::T})
        for (Op tb : {Op::N, Op::T})
          for (float beta : {0.0f, 0.3f}) {
            auto A = ta == Op::N ? rand_pair<TI>({g.batch, g.m, g.k, g.pad, 2}) : rand_pair<TI>({g.batch, g.k, g.m, g.pad, 0});
            auto B = tb == Op::N ? rand_pair<TI>({g.batch, g.k, g.n, 0, 3}) : rand_pair<TI>({g.batch, g.n, g.k, g.pad, 0});
            auto C = rand_pair<TO>({g.batch, g.m, g.n, g.pad, 1});
            fx.cpu.gemm(ta, tb, 0.7f, A.h(), B.h(), beta, C.h());
            fx.gpu().gemm(ta, tb, 0.7f, A.d(), B.d(), beta, C.d());
            check_pair(std::string("gemm ") + tname<TI>() + "->" + tname<TO>(), C, tol_for<TO>());
          }
  };
  run.template operator()<float, float>();
  run.template operator()<bf16, bf16>();
  run.template operator()<bf16, float>();
}

TEST_CASE("cuda ops: gram and sym_poly", "[gpu][ops]") {
  Fixture fx;
  auto run = [&]<class T>() {
    for (const auto& l : std::vector<Layout>{{1, 1, 33, 0, 0}, {1, 33, 1, 0, 0}, {1, 37, 53, 3, 0}, {3, 17, 29, 5, 7}, {2, 64, 48, 16, 0}}) {
      for (Op t : {Op::N, Op::T}) {
        const auto s = t == Op::N ? l.rows : l.cols;
        auto X = rand_pair<T>(l);
        auto A = rand_pair<T>({l.batch, s, s, 2, 0});
        fx.cpu.gram(t, X.h(), A.h());
        fx.gpu().gram(t, X.d(), A.d());
        check_pair(std::string("gram ") + tname<T>(), A, tol_for<T>());
        // sym_poly on the (symmetric) Gram matrix
        A.upload();
        auto B = rand_pair<T>({l.batch, s, s, 1, 3});
        fx.cpu.sym_poly(A.h(), -2.8f, 0.5f, B.h());
        fx.gpu().sym_poly(A.d(), -2.8f, 0.5f, B.d());
        check_pair(std::string("sym_poly ") + tname<T>(), B, tol_for<T>());
      }
    }
  };
  run.template operator()<float>();
  run.template operator()<bf16>();
}

TEST_CASE("cuda ops: frob_norms, scale_by_norm, nonfinite_flag", "[gpu][ops]") {
  Fixture fx;
  auto run = [&]<class T>() {
    for (const auto& l : elementwise_layouts()) {
      auto X = rand_pair<T>(l, 3.0f);
      std::vector<float> hn(static_cast<std::size_t>(l.batch));
      DevArray<float> dn(hn);
      fx.cpu.frob_norms(X.h(), hn.data());
      fx.gpu().frob_norms(X.d(), dn.p());
      const auto gn = dn.get();
      const double e = rel_err(gn, hn);
      errors().add(std::string("frob_norms ") + tname<T>(), e, kExact);
      CHECK(e <= kExact);
      // scale_by_norm with the host norms (identical inputs: identical outputs)
      DevArray<float> dn2(hn);
      fx.cpu.scale_by_norm(X.h(), hn.data(), 1.02f, 1e-7f);
      fx.gpu().scale_by_norm(X.d(), dn2.p(), 1.02f, 1e-7f);
      check_pair(std::string("scale_by_norm ") + tname<T>(), X, kExact);
      // non-finite flag: clean, then one Inf / NaN
      for (int poison = 0; poison < 3; ++poison) {
        auto Y = rand_pair<T>(l);
        if (poison) {
          Y.at(l.batch - 1, l.rows - 1, l.cols - 1) = from_f<T>(poison == 1 ? INFINITY : NAN);
          Y.upload();
        }
        int hf = 0;
        DevArray<int> df(std::vector<int>{0});
        fx.cpu.nonfinite_flag(Y.h(), &hf);
        fx.gpu().nonfinite_flag(Y.d(), df.p());
        CHECK(df.get()[0] == hf);
      }
    }
    // a NaN norm where the matrix holds a NaN, huge values without overflow
    auto Z = rand_pair<T>({3, 4, 5, 0, 0});
    Z.at(1, 2, 3) = from_f<T>(NAN);
    Z.at(2, 0, 0) = from_f<T>(1e38f);  // the squares overflow fp32, the norm (1.4e38) does not
    Z.at(2, 1, 1) = from_f<T>(1e38f);
    Z.upload();
    std::vector<float> hn(3);
    DevArray<float> dn(hn);
    fx.cpu.frob_norms(Z.h(), hn.data());
    fx.gpu().frob_norms(Z.d(), dn.p());
    const auto gn = dn.get();
    CHECK(std::isnan(gn[1]));
    CHECK(std::isnan(hn[1]));
    CHECK(gn[2] == Approx(hn[2]).epsilon(1e-6));
    CHECK(std::isfinite(gn[2]));
  };
  run.template operator()<float>();
  run.template operator()<bf16>();
}

TEST_CASE("cuda ops: muon_momentum and apply_update (dtype combinations, cautious)", "[gpu][ops]") {
  Fixture fx;
  DevArray<float> lrwd(std::vector<float>{0.02f, 0.1f});
  const float hlr = 0.02f, hwd = 0.1f;
  auto run = [&]<class TG, class TM, class TU>() {
    for (const auto& l : elementwise_layouts())
      for (bool nest : {false, true}) {
        auto G = rand_pair<TG>(l);
        auto M = rand_pair<TM>({l.batch, l.rows, l.cols, l.pad_ld + 2, 0});
        auto U = rand_pair<TU>({l.batch, l.rows, l.cols, 0, 1});
        fx.cpu.muon_momentum(G.h(), M.h(), U.h(), 0.95f, nest);
        fx.gpu().muon_momentum(G.d(), M.d(), U.d(), 0.95f, nest);
        const std::string n = std::string("muon_momentum ") + tname<TG>() + "/" + tname<TM>() + "/" + tname<TU>();
        check_pair(n + " M", M, kExact);
        check_pair(n + " U", U, kExact);
        for (bool cautious : {false, true}) {
          auto X = rand_pair<TM>(l);
          auto O = rand_pair<TU>({l.batch, l.rows, l.cols, 1, 0});
          fx.cpu.apply_update(X.h(), O.h(), &hlr, &hwd, 1.3f, cautious);
          fx.gpu().apply_update(X.d(), O.d(), lrwd.p(), lrwd.p() + 1, 1.3f, cautious);
          check_pair(std::string("apply_update ") + tname<TM>() + "/" + tname<TU>(), X, kExact);
        }
      }
  };
  run.template operator()<float, float, float>();
  run.template operator()<float, float, bf16>();
  run.template operator()<bf16, bf16, bf16>();
  run.template operator()<bf16, float, bf16>();
  run.template operator()<float, bf16, float>();
}

TEST_CASE("cuda ops: normuon_update", "[gpu][ops]") {
  Fixture fx;
  DevArray<float> lrwd(std::vector<float>{0.02f, 0.1f});
  const float hlr = 0.02f, hwd = 0.1f;
  auto run = [&]<class TX, class TO, class TV>() {
    for (const auto& l : elementwise_layouts())
      for (bool cautious : {false, true}) {
        auto X = rand_pair<TX>(l);
        auto O = rand_pair<TO>({l.batch, l.rows, l.cols, 0, 2});
        auto V = rand_pair<TV>({l.batch, l.rows, 1, 0, 0}, 0.01f);
        for (auto& v : V.host) v = from_f<TV>(std::fabs(to_f(v)));
        V.upload();
        fx.cpu.normuon_update(X.h(), O.h(), V.h(), 0.95f, 1.1f, &hlr, &hwd, 0.7f, cautious);
        fx.gpu().normuon_update(X.d(), O.d(), V.d(), 0.95f, 1.1f, lrwd.p(), lrwd.p() + 1, 0.7f, cautious);
        const std::string n = std::string("normuon_update ") + tname<TX>() + "/" + tname<TO>() + "/" + tname<TV>();
        const double tol = std::is_same_v<TX, float> && std::is_same_v<TV, float> ? kExact : kBf16;
        check_pair(n + " X", X, tol);
        check_pair(n + " V", V, tol);
      }
  };
  run.template operator()<float, float, float>();
  run.template operator()<float, bf16, float>();
  run.template operator()<bf16, bf16, bf16>();
  run.template operator()<float, bf16, bf16>();
}

TEST_CASE("cuda ops: select_topk, gather_slices, dion2_update, nordion2_update", "[gpu][ops]") {
  Fixture fx;
  DevArray<float> lrwd(std::vector<float>{0.02f, 0.1f});
  const float hlr = 0.02f, hwd = 0.1f;
  auto run = [&]<class TM, class TU>() {
    for (const auto& l : elementwise_layouts())
      for (bool rows : {true, false})
        for (int ties = 0; ties < 2; ++ties) {
          const std::int64_t S = rows ? l.rows : l.cols;
          for (std::int64_t k : {std::int64_t{1}, (S + 3) / 4, S}) {
            auto M = rand_pair<TM>(l);
            if (ties) {  // small integers: many exactly equal slice norms (lower index must win)
              std::uniform_int_distribution<int> ud(-2, 2);
              for (std::int64_t b = 0; b < l.batch; ++b)
                for (std::int64_t i = 0; i < l.rows; ++i)
                  for (std::int64_t j = 0; j < l.cols; ++j) M.at(b, i, j) = from_f<TM>(static_cast<float>(ud(rng())));
              M.upload();
            }
            std::vector<std::int64_t> hidx(static_cast<std::size_t>(l.batch * k));
            DevArray<std::int64_t> didx(hidx);
            fx.cpu.select_topk(M.h(), rows, k, hidx.data());
            fx.gpu().select_topk(M.d(), rows, k, didx.p());
            const auto gidx = didx.get();
            const bool same = gidx == hidx;
            errors().add(std::string("select_topk ") + tname<TM>() + (ties ? " ties" : ""), same ? 0.0 : 1.0, 0.0);
            CHECK(same);
            // gather with the host indices on both sides
            DevArray<std::int64_t> sidx(hidx);
            auto U = Pair<TU>(l.batch, rows ? k : l.rows, rows ? l.cols : k, 1, 0);
            U.upload();
            fx.cpu.gather_slices(M.h(), hidx.data(), k, rows, 0.95f, U.h());
            fx.gpu().gather_slices(M.d(), sidx.p(), k, rows, 0.95f, U.d());
            const std::string n = std::string(tname<TM>()) + "/" + tname<TU>();
            check_pair("gather_slices U " + n, U, kExact);
            check_pair("gather_slices M " + n, M, kExact);
            // dion2 update with U as the orthogonalized output
            auto X = rand_pair<TM>({l.batch, l.rows, l.cols, l.pad_ld + 1, 0});
            fx.cpu.dion2_update(X.h(), U.h(), hidx.data(), k, rows, &hlr, &hwd, 1.5f);
            fx.gpu().dion2_update(X.d(), U.d(), sidx.p(), k, rows, lrwd.p(), lrwd.p() + 1, 1.5f);
            check_pair("dion2_update " + n, X, kExact);
            if (rows) {
              auto X2 = rand_pair<TM>(l);
              auto V = rand_pair<TU>({l.batch, l.rows, 1, 0, 0}, 0.01f);
              for (auto& v : V.host) v = from_f<TU>(std::fabs(to_f(v)));
              V.upload();
              fx.cpu.nordion2_update(X2.h(), U.h(), V.h(), hidx.data(), k, 0.95f, &hlr, &hwd, 1.5f);
              fx.gpu().nordion2_update(X2.d(), U.d(), V.d(), sidx.p(), k, 0.95f, lrwd.p(), lrwd.p() + 1, 1.5f);
              const double tol = std::is_same_v<TM, float> && std::is_same_v<TU, float> ? kExact : kBf16;
              check_pair("nordion2_update X " + n, X2, tol);
              check_pair("nordion2_update V " + n, V, tol);
            }
          }
        }
  };
  run.template operator()<float, float>();
  run.template operator()<float, bf16>();
  run.template operator()<bf16, bf16>();
}

TEST_CASE("cuda ops: lion_update and adamw_update (device step counter)", "[gpu][ops]") {
  Fixture fx;
  DevArray<float> lrwd(std::vector<float>{0.003f, 0.1f});
  const float hlr = 0.003f, hwd = 0.1f;
  auto run = [&]<class TX, class TM>() {
    for (const auto& l : elementwise_layouts())
      for (bool cautious : {false, true}) {
        auto X = rand_pair<TX>(l);
        auto G = rand_pair<TX>(l);
        auto M = rand_pair<TM>({l.batch, l.rows, l.cols, 0, 1}, 0.1f);
        fx.cpu.lion_update(X.h(), G.h(), M.h(), &hlr, &hwd, 0.9f, 0.99f, cautious);
        fx.gpu().lion_update(X.d(), G.d(), M.d(), lrwd.p(), lrwd.p() + 1, 0.9f, 0.99f, cautious);
        const std::string n = std::string(tname<TX>()) + "/" + tname<TM>();
        check_pair("lion_update X " + n, X, kExact);
        check_pair("lion_update M " + n, M, kExact);
        auto V = rand_pair<TM>({l.batch, l.rows, l.cols, 1, 0}, 0.1f);
        for (auto& v : V.host) v = from_f<TM>(std::fabs(to_f(v)));
        V.upload();
        float hstep = 4.0f;
        DevArray<float> dstep(std::vector<float>{4.0f});
        for (int s = 0; s < 3; ++s) {
          fx.cpu.adamw_update(X.h(), G.h(), M.h(), V.h(), &hstep, true, &hlr, &hwd, 0.9f, 0.95f, 1e-8f, cautious);
          fx.gpu().adamw_update(X.d(), G.d(), M.d(), V.d(), dstep.p(), true, lrwd.p(), lrwd.p() + 1, 0.9f, 0.95f, 1e-8f, cautious);
        }
        CHECK(dstep.get()[0] == hstep);
        const double tol = std::is_same_v<TX, float> && std::is_same_v<TM, float> ? kExact : kBf16;
        check_pair("adamw_update X " + n, X, tol);
        check_pair("adamw_update M " + n, M, tol);
        check_pair("adamw_update V " + n, V, tol);
      }
  };
  run.template operator()<float, float>();
  run.template operator()<bf16, bf16>();
  run.template operator()<bf16, float>();
}

TEST_CASE("cuda ops: add_into, all_zero_flags, dion_guard, col_normalize, copy_if_flag", "[gpu][ops]") {
  Fixture fx;
  auto run = [&]<class T, class TG>() {
    for (const auto& l : elementwise_layouts()) {
      auto M = rand_pair<T>(l);
      auto G = rand_pair<TG>({l.batch, l.rows, l.cols, 1, 0});
      fx.cpu.add_into(M.h(), G.h());
      fx.gpu().add_into(M.d(), G.d());
      check_pair(std::string("add_into ") + tname<T>() + "/" + tname<TG>(), M, kExact);
      // all-zero flags: matrix 0 zero (with a -0), the others not
      auto Z = rand_pair<T>(l);
      for (std::int64_t i = 0; i < l.rows; ++i)
        for (std::int64_t j = 0; j < l.cols; ++j) Z.at(0, i, j) = from_f<T>(i == 0 && j == 0 ? -0.0f : 0.0f);
      Z.upload();
      std::vector<int> hf(static_cast<std::size_t>(l.batch), 7);
      DevArray<int> df(hf);
      fx.cpu.all_zero_flags(Z.h(), hf.data());
      fx.gpu().all_zero_flags(Z.d(), df.p());
      CHECK(df.get() == hf);
      // dion guard: flags from above, non-finite entries in P and R
      auto P = rand_pair<T>(l);
      auto R = rand_pair<T>({l.batch, l.cols, l.rows, 1, 0});
      auto Qw = rand_pair<T>({l.batch, l.cols, l.rows, 0, 0});
      P.at(l.batch - 1, 0, 0) = from_f<T>(NAN);
      R.at(l.batch - 1, l.cols - 1, 0) = from_f<T>(-INFINITY);
      P.upload();
      R.upload();
      DevArray<int> gf(hf);
      fx.cpu.dion_guard(P.h(), R.h(), Qw.h(), hf.data());
      fx.gpu().dion_guard(P.d(), R.d(), Qw.d(), gf.p());
      check_pair(std::string("dion_guard P ") + tname<T>(), P, kExact);
      check_pair(std::string("dion_guard R ") + tname<T>(), R, kExact);
      // column normalization
      auto Rn = rand_pair<T>(l, 2.0f);
      auto Qn = rand_pair<TG>({l.batch, l.rows, l.cols, 2, 0});
      fx.cpu.col_normalize(Rn.h(), 1e-8f, Qn.h());
      fx.gpu().col_normalize(Rn.d(), 1e-8f, Qn.d());
      check_pair(std::string("col_normalize ") + tname<T>() + "->" + tname<TG>(), Qn, kExact);
      // copy_if_flag
      auto S = rand_pair<T>(l);
      auto D = rand_pair<T>({l.batch, l.rows, l.cols, 3, 0});
      fx.cpu.copy_if_flag(hf.data(), 0, S.h(), D.h());
      fx.gpu().copy_if_flag(gf.p(), 0, S.d(), D.d());
      check_pair(std::string("copy_if_flag ") + tname<T>(), D, kExact);
    }
  };
  run.template operator()<float, float>();
  run.template operator()<bf16, float>();
  run.template operator()<bf16, bf16>();
  run.template operator()<float, bf16>();
}

TEST_CASE("cuda ops: qr_q, qr_r, cholesky_upper, trsm_right_upper, orthogonality_check", "[gpu][ops]") {
  for (bool batched : {true, false}) {
    dion::CudaBackendOptions o;
    o.batched_qr = batched;
    CudaEnv env(o);
    dion::EigenBackend cpu;
    auto& gpu = *env.be;
    const std::string tag = batched ? " (batched)" : " (per matrix)";
    // Q of QR, tall, square, wide (columns beyond p are zero), with ld > cols
    for (const auto& l : std::vector<Layout>{{1, 64, 16, 0, 0}, {3, 37, 37, 3, 5}, {2, 16, 40, 0, 0}, {4, 200, 64, 8, 0}, {1, 1, 1, 0, 0}}) {
      auto P = rand_pair<float>(l);
      cpu.qr_q(P.h());
      gpu.qr_q(P.d());
      check_pair("qr_q" + tag, P, 1e-4);
    }
    // R of QR (k >= r)
    for (const auto& l : std::vector<Layout>{{1, 128, 16, 0, 0}, {3, 256, 37, 2, 0}, {2, 128, 128, 0, 0}, {5, 1, 1, 0, 0}}) {
      auto A = rand_pair<float>(l);
      auto R = rand_pair<float>({l.batch, l.cols, l.cols, 1, 0});
      cpu.qr_r(A.h(), R.h());
      gpu.qr_r(A.d(), R.d());
      check_pair("qr_r" + tag, R, 1e-4);
    }
    if (!batched) continue;
    // Cholesky: SPD matrices, one indefinite (info must say so on both sides)
    for (const auto& l : std::vector<Layout>{{3, 16, 16, 0, 0}, {2, 37, 37, 3, 0}, {1, 1, 1, 0, 0}, {4, 96, 96, 0, 4}}) {
      const std::int64_t n = l.rows;
      auto X = rand_pair<float>({l.batch, 2 * n + 3, n, 0, 0});
      auto A = Pair<float>(l.batch, n, n, l.pad_ld, l.pad_bs);
      A.upload();
      cpu.gram(Op::T, X.h(), A.h());
      for (std::int64_t i = 0; i < n; ++i) A.at(0, i, i) += 0.5f;
      if (l.batch > 2) A.at(2, 0, 0) = -1.0f;  // not positive definite
      A.upload();
      std::vector<int> hi(static_cast<std::size_t>(l.batch), 9);
      DevArray<int> di(hi);
      cpu.cholesky_upper(A.h(), hi.data());
      gpu.cholesky_upper(A.d(), di.p());
      const auto gi = di.get();
      CHECK(gi == hi);
      // compare the factors of the matrices that succeeded
      const auto got = A.download();
      double num = 0, den = 0;
      for (std::int64_t b = 0; b < l.batch; ++b) {
        if (hi[static_cast<std::size_t>(b)]) continue;
        for (std::int64_t i = 0; i < n; ++i)
          for (std::int64_t j = 0; j < n; ++j) {
            const double r = A.get(b, i, j), g = got[static_cast<std::size_t>(b * A.bs + i * A.ld + j)];
            num += (g - r) * (g - r);
            den += r * r;
          }
      }
      const double e = den > 0 ? std::sqrt(num / den) : 0.0;
      errors().add("cholesky_upper", e, kF32);
      CHECK(e <= kF32);
    }
    // triangular solve with a well-conditioned upper U
    for (const auto& l : std::vector<Layout>{{3, 64, 16, 0, 0}, {2, 37, 37, 3, 0}, {1, 5, 1, 0, 0}, {2, 300, 64, 7, 1}}) {
      auto X = rand_pair<float>(l);
      auto U = Pair<float>(l.batch, l.cols, l.cols, 2, 0);
      std::normal_distribution<float> nd(0.0f, 0.3f);
      for (std::int64_t b = 0; b < l.batch; ++b)
        for (std::int64_t i = 0; i < l.cols; ++i)
          for (std::int64_t j = 0; j < l.cols; ++j)
            U.at(b, i, j) = i < j ? nd(rng()) : (i == j ? 2.0f + std::fabs(nd(rng())) : 99.0f);  // lower part ignored
      U.upload();
      cpu.trsm_right_upper(X.h(), U.h());
      gpu.trsm_right_upper(X.d(), U.d());
      check_pair("trsm_right_upper", X, kF32);
    }
    // orthogonality check: orthonormal Q passes, a perturbed one and a NaN one fail
    for (const auto& l : std::vector<Layout>{{4, 64, 16, 0, 0}, {3, 37, 37, 3, 0}}) {
      auto Q = rand_pair<float>(l);
      cpu.qr_q(Q.h());
      Q.at(1, 0, 0) += 0.1f;
      Q.upload();
      std::vector<int> hf(static_cast<std::size_t>(l.batch), 0);
      DevArray<int> df(hf);
      cpu.orthogonality_check(Q.h(), 1e-2f, hf.data());
      gpu.orthogonality_check(Q.d(), 1e-2f, df.p());
      const auto gf = df.get();
      CHECK(gf == hf);
      CHECK(gf[0] == 0);
      CHECK(gf[1] == 1);
      // a NaN fails the check on the device (Eigen's maxCoeff does not promise to see NaN)
      Q.at(2, 1, 1) = NAN;
      Q.upload();
      DevArray<int> df2(std::vector<int>(static_cast<std::size_t>(l.batch), 0));
      gpu.orthogonality_check(Q.d(), 1e-2f, df2.p());
      const auto gf2 = df2.get();
      CHECK(gf2[0] == 0);
      CHECK(gf2[1] == 1);
      CHECK(gf2[2] == 1);
    }
  }
}

TEST_CASE("cuda ops: randn equals the host generator", "[gpu][ops]") {
  Fixture fx;
  auto run = [&]<class T>() {
    for (const auto& l : elementwise_layouts()) {
      auto X = rand_pair<T>(l);
      fx.cpu.randn(X.h(), 42, 7, 3, 5, l.cols + 11, 0.5f);
      fx.gpu().randn(X.d(), 42, 7, 3, 5, l.cols + 11, 0.5f);
      check_pair(std::string("randn ") + tname<T>(), X, std::is_same_v<T, float> ? kExact : kBf16);
    }
  };
  run.template operator()<float>();
  run.template operator()<bf16>();
}

TEST_CASE("cuda ops: host copies (inline, large, under capture rules) and errors", "[gpu][ops]") {
  Fixture fx;
  auto& be = fx.gpu();
  for (std::size_t n : {std::size_t{1}, std::size_t{1000}, std::size_t{5000}, std::size_t{16384}, std::size_t{100000}}) {
    std::vector<float> src(n);
    std::iota(src.begin(), src.end(), 0.5f);
    auto buf = be.alloc_bytes(n * sizeof(float));
    be.copy_from_host(src.data(), buf.data(), n * sizeof(float));
    std::fill(src.begin(), src.end(), -1.0f);  // the copy must not read src after returning
    std::vector<float> back(n);
    be.copy_to_host(buf.data(), back.data(), n * sizeof(float));
    be.synchronize();
    bool ok = true;
    for (std::size_t i = 0; i < n; ++i) ok = ok && back[i] == static_cast<float>(i) + 0.5f;
    CHECK(ok);
  }
  // shape errors are typed; a checked cuBLAS failure names the API
  auto a = Pair<float>(1, 3, 4);
  auto b = Pair<float>(1, 5, 6);
  auto c = Pair<float>(1, 3, 6);
  CHECK_THROWS_AS(be.gemm(Op::N, Op::N, 1.0f, a.d(), b.d(), 0.0f, c.d()), dion::ShapeMismatch);
  CHECK_THROWS_AS(be.copy(a.d(), b.d()), dion::ShapeMismatch);
  try {
    DION_CUDA_CHECK(cudaErrorInvalidValue);
    FAIL("no throw");
  } catch (const dion::CudaError& e) {
    CHECK_THAT(std::string(e.what()), DION_CONTAINS("cudaErrorInvalidValue"));
    CHECK_THAT(std::string(e.what()), DION_CONTAINS("test_cuda_ops.cu"));
  }
  try {
    DION_CUBLAS_CHECK(CUBLAS_STATUS_INVALID_VALUE);
    FAIL("no throw");
  } catch (const dion::CublasError& e) {
    CHECK_THAT(std::string(e.what()), DION_CONTAINS("CUBLAS_STATUS_INVALID_VALUE"));
  }
  try {
    DION_CUSOLVER_CHECK(CUSOLVER_STATUS_INVALID_VALUE);
    FAIL("no throw");
  } catch (const dion::CusolverError& e) {
    CHECK_THAT(std::string(e.what()), DION_CONTAINS("CUSOLVER_STATUS_INVALID_VALUE"));
  }
}

TEST_CASE("cuda batching: merged launches equal one launch per op; the predicate skips them", "[gpu][ops][batch]") {
  CudaEnv env;
  auto& be = *env.be;
  std::mt19937 rng(21);
  // odd shapes (1-wide path), 4-wide shapes, padded rows, a batch: more items than one launch holds
  struct Shape {
    std::int64_t b, r, c, pad;
  };
  std::vector<Shape> shapes{{1, 7, 13, 0}, {2, 64, 48, 0}, {1, 33, 128, 32}, {3, 5, 4, 0}, {1, 1, 1000, 0}};
  for (int i = 0; i < 40; ++i) shapes.push_back({1, 3 + i % 5, 8 + 4 * (i % 3), 0});
  struct Set {
    Pair<float> G, M, U, X, O;
    Pair<bf16> Mb;
  };
  auto make = [&](const Shape& s) {
    Set t{Pair<float>(s.b, s.r, s.c, s.pad), Pair<float>(s.b, s.r, s.c, s.pad), Pair<float>(s.b, s.r, s.c, s.pad),
          Pair<float>(s.b, s.r, s.c, s.pad), Pair<float>(s.b, s.r, s.c, s.pad), Pair<bf16>(s.b, s.r, s.c, s.pad)};
    return t;
  };
  std::vector<Set> one, many;
  for (const auto& s : shapes) {
    one.push_back(make(s));
    many.push_back(make(s));
    auto& a = one.back();
    auto& b = many.back();
    for (auto* p : {&a.G, &a.M, &a.X, &a.O}) p->randomize(rng);
    a.Mb.randomize(rng);
    b.G.host = a.G.host, b.M.host = a.M.host, b.X.host = a.X.host, b.O.host = a.O.host, b.Mb.host = a.Mb.host;
    for (auto* t : {&a, &b}) {
      for (auto* p : {&t->G, &t->M, &t->U, &t->X, &t->O}) p->upload();
      t->Mb.upload();
    }
  }
  // same-signature GEMMs (merged into one pointer-array call) and one of another signature
  std::vector<Pair<float>> A, B, C1, C2;
  for (int i = 0; i < 5; ++i) {
    const std::int64_t k = i < 4 ? 48 : 17;
    A.emplace_back(1, 64, k), B.emplace_back(1, k, 32), C1.emplace_back(1, 64, 32), C2.emplace_back(1, 64, 32);
    A.back().randomize(rng), B.back().randomize(rng), C1.back().randomize(rng);
    C2.back().host = C1.back().host;
    for (auto* p : {&A.back(), &B.back(), &C1.back(), &C2.back()}) p->upload();
  }
  DevArray<float> lrwd(std::vector<float>{0.02f, 0.1f});
  auto ops = [&](std::vector<Set>& v, std::vector<Pair<float>>& C) {
    for (auto& t : v) be.muon_momentum(t.G.d(), t.M.d(), t.U.d(), 0.9f, true);
    for (auto& t : v) be.apply_update(t.X.d(), t.O.d(), lrwd.p(), lrwd.p() + 1, 1.3f, true);
    for (auto& t : v) be.add_into(t.Mb.d(), t.G.d());
    for (auto& t : v) be.copy(t.O.d(), t.G.d());
    for (std::size_t i = 0; i < C.size(); ++i) be.gemm(dion::Op::N, dion::Op::N, 0.5f, A[i].d(), B[i].d(), 0.25f, C[i].d());
  };
  ops(one, C1);
  be.begin_batch();
  ops(many, C2);
  be.end_batch();
  env.sync();
  bool same = true;
  for (std::size_t i = 0; i < one.size(); ++i) {
    auto& a = one[i];
    auto& b = many[i];
    using PP = std::pair<Pair<float>*, Pair<float>*>;
    for (const PP& pq : {PP{&a.G, &b.G}, PP{&a.M, &b.M}, PP{&a.U, &b.U}, PP{&a.X, &b.X}})
      same = same && pq.first->download() == pq.second->download();
    const auto ma = a.Mb.download(), mb = b.Mb.download();
    same = same && ma.size() == mb.size() && std::memcmp(ma.data(), mb.data(), ma.size() * sizeof(bf16)) == 0;
  }
  CHECK(same);  // element-wise: bit for bit (the same functor per element), padding untouched
  double worst = 0;
  for (std::size_t i = 0; i < C1.size(); ++i) worst = std::max(worst, rel_err(C2[i].download(), C1[i].download()));
  CHECK(worst <= 1e-6);
  errors().add("batched vs per-op GEMMs (pointer-array call)", worst, 1e-6);

  // under a raised predicate, merged element-wise launches change nothing; zero_if_skip zeroes
  DevArray<int> flag(std::vector<int>{1});
  const auto x0 = many[1].X.download(), m0 = many[1].M.download();
  be.set_skip(flag.p());
  be.begin_batch();
  for (auto& t : many) be.muon_momentum(t.G.d(), t.M.d(), t.U.d(), 0.9f, true);
  for (auto& t : many) be.apply_update(t.X.d(), t.O.d(), lrwd.p(), lrwd.p() + 1, 1.3f, false);
  be.end_batch();
  be.zero_if_skip(many[2].O.d());
  be.set_skip(nullptr);
  env.sync();
  CHECK(many[1].X.download() == x0);
  CHECK(many[1].M.download() == m0);
  auto& o2 = many[2].O;
  const auto ov = o2.download();
  double z = 0, pad = 0;
  for (std::int64_t i = 0; i < o2.rows; ++i)
    for (std::int64_t j = 0; j < o2.ld; ++j) {
      const double v = std::fabs(ov[static_cast<std::size_t>(i * o2.ld + j)]);
      if (j < o2.cols) z = std::max(z, v);
      else pad = std::max(pad, v);
    }
  CHECK(z == 0.0);      // the matrix is zeroed
  CHECK(pad == 777.0);  // the padding is not
}
