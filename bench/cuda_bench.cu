// dion's CUDA benchmark (PERFORMANCE.md §4). Times the optimizer step with CUDA events on the
// optimizer's stream: warm-up, then min / median / p90 of >= 20 steps (fewer only where a step is
// very slow: the JSON says how many), the first step apart; gradients rotate among several sets
// (where memory allows) so repeated steps do not measure a warm L2. For each result: the FLOP / byte
// model of bench_common.hpp, achieved TFLOP/s and GB/s, the fraction of the floor (PERFORMANCE.md
// §1 where it tabulates one), optimizer-state, step-workspace and backend-scratch bytes, and the
// device memory the optimizer took. Calibration (cuBLAS bf16 GEMM 8192³, a 1 GiB device copy) runs
// in the same process and is attached to every line.
//
//   dion_cuda_bench [--out results.jsonl | results.jsonl] [--only item,item,...] [--reps N]
//                   [--policy propagate|skip]   (NonFinitePolicy of the timed steps; default propagate)
//
// Items (default: calib,check,ortho,orthoops,dionops,gpt160m,gpt160m-bf16,llama1b):
//   calib          calibration only (always runs first)
//   check          correctness of the fast paths: blocked symmetric gram / sym_poly against full GEMMs,
//                  the own Householder qr_r against cuSOLVER (shared- and global-memory variants)
//   ortho          one Polar Express orthogonalization, bf16: 4096², 4096×14336, the gpt160m shapes;
//                  full GEMMs vs symmetric products (ortho-big: the two large shapes only)
//   orthoops       each op of one Newton–Schulz iteration timed alone (full vs symmetric;
//                  orthoops-small: the 48×768² group only)
//   dionops        Dion's building blocks on the gpt160m 768² group at r = 1/4
//   gpt160m, gpt160m-bf16, llama1b, llama1b-bf16, llama8b (bf16)
//                  every optimizer's step on that shape set (tiny: a smoke set)
//   steps=A+B+...  restrict the optimizers (muon, muon-full, normuon, dion16, dion4, dion1, dion2,
//                  nordion2, lion, adamw; noprev skips the old-QR Dion run). dion1 on llama sets only
//                  when named. SET:A+B+... restricts one set's optimizers.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "dion/cuda.hpp"

namespace {

using namespace dion_bench;
using dion::bf16;
using dion::CudaBackend;
using dion::CudaSpace;

void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

Sink g_sink;
std::string g_env;  // ",\"gpu\":...": device, driver, calibration
int g_reps = 20;
// --policy: NonFinitePolicy of the timed optimizers (propagate: the earlier runs' setting; skip_step:
// the default, which adds one device-side read of every gradient)
dion::NonFinitePolicy g_policy = dion::NonFinitePolicy::propagate;
double g_copy_bw = 3.02e12;

/// Times f() `reps` times after `warm` warm-ups with events on `s`; `prep(i)` runs untimed before each.
template <class F, class Prep>
Stats time_it(cudaStream_t s, int warm, int reps, F&& f, Prep&& prep) {
  cudaEvent_t a, b;
  ok(cudaEventCreate(&a), "event");
  ok(cudaEventCreate(&b), "event");
  std::vector<double> t;
  double first = 0;
  for (int i = 0; i < warm + reps; ++i) {
    prep(i);
    ok(cudaEventRecord(a, s), "record");
    f();
    ok(cudaEventRecord(b, s), "record");
    ok(cudaEventSynchronize(b), "sync");
    float ms = 0;
    ok(cudaEventElapsedTime(&ms, a, b), "elapsed");
    if (i == 0) first = ms;
    if (i >= warm) t.push_back(ms);
  }
  ok(cudaGetLastError(), "timed work");
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return stats_of(std::move(t), first);
}
template <class F>
Stats time_it(cudaStream_t s, int warm, int reps, F&& f) {
  return time_it(s, warm, reps, std::forward<F>(f), [](int) {});
}

template <class T>
dion::Mat<T, CudaSpace> pk(void* p, std::int64_t b, std::int64_t r, std::int64_t c) {
  return dion::packed<T, CudaSpace>(static_cast<T*>(p), b, r, c);
}
template <class T>
void randomize(CudaBackend& be, void* p, std::int64_t n, std::uint64_t seed, float sd = 1.0f) {
  // one row per 2^20 elements keeps every index in range of the generator's 64-bit counter
  const std::int64_t cols = std::min<std::int64_t>(n, 1 << 20);
  const std::int64_t rows = n / cols, rest = n - rows * cols;
  if (rows) be.randn(pk<T>(p, 1, rows, cols), seed, 1, 0, 0, cols, sd);
  if (rest) be.randn(pk<T>(static_cast<T*>(p) + rows * cols, 1, 1, rest), seed, 2, 0, 0, rest, sd);
}

std::size_t free_bytes() {
  std::size_t f = 0, t = 0;
  ok(cudaMemGetInfo(&f, &t), "meminfo");
  return f;
}

// ------------------------------------------------------------------ calibration
void calibrate(cudaStream_t s, CudaBackend& be) {
  const std::int64_t n = 8192;
  {
    auto A = be.alloc_bytes(n * n * 2), B = be.alloc_bytes(n * n * 2), C = be.alloc_bytes(n * n * 2);
    randomize<bf16>(be, A.data(), n * n, 1);
    randomize<bf16>(be, B.data(), n * n, 2);
    const auto st = time_it(s, 3, 10, [&] {
      be.gemm(dion::Op::N, dion::Op::N, 1.0f, pk<bf16>(A.data(), 1, n, n), pk<bf16>(B.data(), 1, n, n), 0.0f,
              pk<bf16>(C.data(), 1, n, n));
    });
    const double tf = 2.0 * n * n * n / (st.median_ms * 1e-3) / 1e12;
    const std::size_t bytes = std::size_t{1} << 30;
    auto X = be.alloc_bytes(bytes), Y = be.alloc_bytes(bytes);
    const auto sc = time_it(s, 3, 10, [&] { ok(cudaMemcpyAsync(Y.data(), X.data(), bytes, cudaMemcpyDeviceToDevice, s), "copy"); });
    g_copy_bw = 2.0 * bytes / (sc.median_ms * 1e-3);
    cudaDeviceProp prop{};
    int dev = 0;
    cudaGetDevice(&dev);
    cudaGetDeviceProperties(&prop, dev);
    int drv = 0, rt = 0;
    cudaDriverGetVersion(&drv);
    cudaRuntimeGetVersion(&rt);
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  ",\"gpu\":\"%s\",\"driver_api\":%d,\"runtime\":%d,\"calib_bf16_gemm_tflops\":%.0f,\"calib_copy_tbs\":%.3f",
                  prop.name, drv, rt, tf, g_copy_bw / 1e12);
    g_env = buf;
  }
  Json j;
  j.s("bench", "calibration").raw(g_env);
  g_sink.emit(j);
}

// ------------------------------------------------------------------ correctness of the fast paths
__global__ void rel_diff_k(const float* a, const float* b, std::int64_t n, double* acc) {
  double num = 0, den = 0;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
    if (!(d == d)) num += 1e300;  // NaN counts as a failure
  }
  atomicAdd(acc, num);
  atomicAdd(acc + 1, den);
}
/// ‖a − b‖ / ‖b‖ of two device arrays of T (converted to fp32 through the backend).
template <class T>
double rel_diff(CudaBackend& be, cudaStream_t s, const T* a, const T* b, std::int64_t n) {
  auto fa = be.alloc_bytes(n * 4), fb = be.alloc_bytes(n * 4), acc = be.alloc_bytes(16);
  be.copy(pk<T>(const_cast<T*>(a), 1, 1, n), pk<float>(fa.data(), 1, 1, n));
  be.copy(pk<T>(const_cast<T*>(b), 1, 1, n), pk<float>(fb.data(), 1, 1, n));
  rel_diff_k<<<264, 256, 0, s>>>(static_cast<float*>(fa.data()), static_cast<float*>(fb.data()), n,
                                 static_cast<double*>(acc.data()));
  ok(cudaGetLastError(), "rel_diff");
  double h[2];
  ok(cudaMemcpyAsync(h, acc.data(), 16, cudaMemcpyDeviceToHost, s), "d2h");
  ok(cudaStreamSynchronize(s), "sync");
  return std::sqrt(h[0] / std::max(h[1], 1e-300));
}

void emit_check(const std::string& what, double err, double tol) {
  Json j;
  j.s("bench", "check").s("what", what).n("rel_err", err).n("tol", tol).b("pass", err <= tol).raw(g_env);
  g_sink.emit(j);
}

template <class T>
void check_sym(cudaStream_t s, const char* tname) {
  dion::CudaBackendOptions full_o, sym_o;
  full_o.sym_block = 0;
  sym_o.sym_block = 64;
  sym_o.sym_min_dim = 64;
  CudaBackend full{s, full_o}, sym{s, sym_o};
  const std::int64_t B = 3, m = 256, n = 320;
  auto X = full.alloc_bytes(B * m * n * sizeof(T));
  randomize<T>(full, X.data(), B * m * n, 7, 0.1f);
  for (dion::Op t : {dion::Op::N, dion::Op::T}) {
    const std::int64_t sd = t == dion::Op::N ? m : n;
    auto A1 = full.alloc_bytes(B * sd * sd * sizeof(T)), A2 = full.alloc_bytes(B * sd * sd * sizeof(T));
    auto B1 = full.alloc_bytes(B * sd * sd * sizeof(T)), B2 = full.alloc_bytes(B * sd * sd * sizeof(T));
    randomize<T>(full, A2.data(), B * sd * sd, 99);  // poison: every element must be written
    randomize<T>(full, B2.data(), B * sd * sd, 98);
    full.gram(t, pk<T>(X.data(), B, m, n), pk<T>(A1.data(), B, sd, sd));
    sym.gram(t, pk<T>(X.data(), B, m, n), pk<T>(A2.data(), B, sd, sd));
    full.sym_poly(pk<T>(A1.data(), B, sd, sd), -2.8f, 0.5f, pk<T>(B1.data(), B, sd, sd));
    sym.sym_poly(pk<T>(A1.data(), B, sd, sd), -2.8f, 0.5f, pk<T>(B2.data(), B, sd, sd));
    const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-2;
    emit_check(std::string("gram blocked vs full ") + tname + (t == dion::Op::N ? " XXt " : " XtX ") + std::to_string(sd),
               rel_diff(full, s, static_cast<T*>(A2.data()), static_cast<T*>(A1.data()), B * sd * sd), tol);
    emit_check(std::string("sym_poly blocked vs full ") + tname + " " + std::to_string(sd),
               rel_diff(full, s, static_cast<T*>(B2.data()), static_cast<T*>(B1.data()), B * sd * sd), tol);
  }
}

void check_qr(cudaStream_t s) {
  dion::CudaBackendOptions ref_o;
  ref_o.own_qr_r = false;
  ref_o.batched_qr = false;  // cuSOLVER geqrf per matrix
  dion::CudaBackendOptions own_o;
  own_o.own_qr_r_global = true;  // the kernel in both variants (shared memory / scratch copy)
  CudaBackend own{s, own_o}, ref{s, ref_o};
  struct Case {
    std::int64_t b, k, r;
  };
  for (const Case c : {Case{5, 256, 192}, Case{3, 384, 37}, Case{2, 1024, 768}, Case{4, 128, 128}}) {
    auto A = own.alloc_bytes(c.b * c.k * c.r * 4), R1 = own.alloc_bytes(c.b * c.r * c.r * 4),
         R2 = own.alloc_bytes(c.b * c.r * c.r * 4);
    randomize<float>(own, A.data(), c.b * c.k * c.r, 11);
    randomize<float>(own, R1.data(), c.b * c.r * c.r, 12);
    own.reserve_for(c.b, c.k, c.r, c.r, c.k);
    ref.reserve_for(c.b, c.k, c.r, c.r, c.k);
    own.qr_r(pk<float>(A.data(), c.b, c.k, c.r), pk<float>(R1.data(), c.b, c.r, c.r));
    ref.qr_r(pk<float>(A.data(), c.b, c.k, c.r), pk<float>(R2.data(), c.b, c.r, c.r));
    emit_check("qr_r own Householder vs cusolverDnSgeqrf " + std::to_string(c.b) + "x" + std::to_string(c.k) + "x" +
                   std::to_string(c.r),
               rel_diff(own, s, static_cast<float*>(R1.data()), static_cast<float*>(R2.data()), c.b * c.r * c.r), 1e-4);
  }
}

// ------------------------------------------------------------------ orthogonalization micro-benchmarks
void bench_ortho(cudaStream_t s, std::int64_t batch, std::int64_t m, std::int64_t n, double table_floor_ms) {
  using T = bf16;
  const std::int64_t sets = 3, e = batch * m * n;
  dion::CudaBackendOptions full_o;
  full_o.sym_block = 0;
  dion::CudaBackendOptions sym1k;
  sym1k.sym_block = 1024;
  CudaBackend full{s, full_o}, sym{s}, sym2{s, sym1k};
  auto src = full.alloc_bytes(static_cast<std::size_t>(sets * e) * sizeof(T));
  auto X = full.alloc_bytes(static_cast<std::size_t>(e) * sizeof(T));
  auto ref = full.alloc_bytes(static_cast<std::size_t>(e) * sizeof(T));
  auto scratch = full.alloc_bytes(static_cast<std::size_t>(dion::ortho::scratch_elems(batch, m, n)) * sizeof(T));
  auto norms = full.alloc_bytes(4 * batch + 64);
  for (std::int64_t i = 0; i < sets; ++i) randomize<T>(full, static_cast<T*>(src.data()) + i * e, e, 10 + i);
  auto Xm = pk<T>(X.data(), batch, m, n);
  const double flops = static_cast<double>(batch) * ns_flops(m, n);
  const double flops_sym = static_cast<double>(batch) * ns_flops(m, n, true);
  const double floor_ms = table_floor_ms > 0 ? table_floor_ms : 1e3 * flops / 785e12;
  struct V {
    const char* name;
    CudaBackend* be;
  };
  for (const V v : {V{"full_gemm", &full}, V{"symmetric_512", &sym}, V{"symmetric_1024", &sym2}}) {
    auto run = [&] {
      dion::ortho::orthogonalize(*v.be, dion::Orthogonalizer::polar_express, 5, 1e-7f, Xm, static_cast<T*>(scratch.data()),
                                 static_cast<float*>(norms.data()));
    };
    const auto st = time_it(s, 3, g_reps, run, [&](int i) {
      ok(cudaMemcpyAsync(X.data(), static_cast<T*>(src.data()) + (i % sets) * e, e * sizeof(T), cudaMemcpyDeviceToDevice, s), "copy");
    });
    // the result on input set 0, against the full-GEMM result
    ok(cudaMemcpyAsync(X.data(), src.data(), e * sizeof(T), cudaMemcpyDeviceToDevice, s), "copy");
    run();
    double diff = 0;
    if (v.be == &full) ok(cudaMemcpyAsync(ref.data(), X.data(), e * sizeof(T), cudaMemcpyDeviceToDevice, s), "copy");
    else diff = rel_diff(full, s, static_cast<T*>(X.data()), static_cast<T*>(ref.data()), e);
    Json j;
    j.s("bench", "ortho").s("what", "polar_express bf16 " + std::to_string(batch) + "x" + std::to_string(m) + "x" + std::to_string(n))
        .s("variant", v.name).i("batch", batch).i("rows", m).i("cols", n).stats(st);
    j.n("flops", flops).n("tflops_full_count", flops / (st.median_ms * 1e-3) / 1e12, "%.1f");
    j.n("floor_ms", floor_ms, "%.4g").n("fraction_of_floor", floor_ms / st.median_ms, "%.4f");
    j.n("floor_sym_ms", 1e3 * flops_sym / 785e12, "%.4g").n("fraction_of_sym_floor", 1e3 * flops_sym / 785e12 / st.median_ms, "%.4f");
    j.n("rel_diff_vs_full_gemm", diff);
    j.raw(g_env);
    g_sink.emit(j);
  }
}

/// Where one orthogonalization's time goes: each op of an iteration on its own (bf16).
void bench_ortho_ops(cudaStream_t s, std::int64_t batch, std::int64_t m, std::int64_t n) {
  using T = bf16;
  const bool tall = m > n;
  const std::int64_t sd = tall ? n : m, e = batch * m * n;
  dion::CudaBackendOptions full_o;
  full_o.sym_block = 0;
  CudaBackend full{s, full_o}, sym{s};
  auto X = full.alloc_bytes(e * sizeof(T)), X2 = full.alloc_bytes(e * sizeof(T));
  auto A = full.alloc_bytes(batch * sd * sd * sizeof(T)), B = full.alloc_bytes(batch * sd * sd * sizeof(T));
  auto norms = full.alloc_bytes(4 * batch + 64);
  randomize<T>(full, X.data(), e, 21, 0.01f);
  auto Xm = pk<T>(X.data(), batch, m, n), X2m = pk<T>(X2.data(), batch, m, n);
  auto Am = pk<T>(A.data(), batch, sd, sd), Bm = pk<T>(B.data(), batch, sd, sd);
  const std::string shape = std::to_string(batch) + "x" + std::to_string(m) + "x" + std::to_string(n);
  auto one = [&](const std::string& what, double flops, auto&& fn) {
    const auto st = time_it(s, 3, g_reps, fn);
    Json j;
    j.s("bench", "ortho_op").s("what", what + " " + shape).stats(st);
    if (flops > 0) j.n("flops", flops).n("tflops", flops / (st.median_ms * 1e-3) / 1e12, "%.1f");
    j.raw(g_env);
    g_sink.emit(j);
  };
  const double b = static_cast<double>(batch), S = static_cast<double>(sd), L = static_cast<double>(tall ? m : n);
  one("frob_norms+scale_by_norm", 0, [&] {
    full.frob_norms(Xm, static_cast<float*>(norms.data()));
    full.scale_by_norm(Xm, static_cast<float*>(norms.data()), 1.02f, 1e-7f);
  });
  for (auto* be : {&full, &sym}) {
    const std::string v = be == &full ? " [full]" : " [symmetric]";
    one("gram" + v, b * 2 * S * S * L, [&] { be->gram(tall ? dion::Op::T : dion::Op::N, Xm, Am); });
    one("sym_poly" + v, b * 2 * S * S * S, [&] { be->sym_poly(Am, -2.8f, 0.5f, Bm); });
  }
  one("copy X", 0, [&] { full.copy(Xm, X2m); });
  one("update gemm X <- aX + BX", b * 2 * S * S * L, [&] {
    if (tall) full.gemm(dion::Op::N, dion::Op::N, 1.0f, Xm, Bm, 3.0f, X2m);
    else full.gemm(dion::Op::N, dion::Op::N, 1.0f, Bm, Xm, 3.0f, X2m);
  });
}

// ------------------------------------------------------------------ Dion's building blocks
void bench_dion_ops(cudaStream_t s) {
  const std::int64_t n = 48, p = 768, r = 192, k = 256;
  dion::CudaBackendOptions per_matrix, batched;
  per_matrix.own_qr_r = false;
  per_matrix.batched_qr = false;
  batched.own_qr_r = false;
  CudaBackend be{s}, be_pm{s, per_matrix}, be_b{s, batched};
  auto buf = [&](std::int64_t elems) { return be.alloc_bytes(static_cast<std::size_t>(elems) * 4); };
  auto Mb = buf(n * p * p), Pb = buf(n * p * r), Sb = buf(n * k * p), SPb = buf(n * k * r), Rb = buf(n * r * r),
       Gb = buf(n * r * r), Qb = buf(n * p * r), info = buf(n);
  auto f = [&](auto& b, std::int64_t bt, std::int64_t rr, std::int64_t cc) { return pk<float>(b.data(), bt, rr, cc); };
  be.randn(f(Mb, n, p, p), 1, 1, 0, 0, p, 1.0f);
  be.randn(f(Pb, n, p, r), 2, 1, 0, 0, r, 1.0f);
  be.randn(f(SPb, n, k, r), 3, 1, 0, 0, r, 1.0f);
  for (auto* b : {&be, &be_pm, &be_b}) b->reserve_for(n, p, p, r, k);
  auto one = [&](const char* what, auto&& fn) {
    Json j;
    j.s("bench", "dion_op").s("what", what).stats(time_it(s, 2, 10, fn)).raw(g_env);
    g_sink.emit(j);
  };
  one("qr_r own Householder kernel (48 x 256x192, shared memory)", [&] { be.qr_r(f(SPb, n, k, r), f(Rb, n, r, r)); });
  one("qr_r cublasSgeqrfBatched (48 x 256x192)", [&] { be_b.qr_r(f(SPb, n, k, r), f(Rb, n, r, r)); });
  one("qr_r cusolverDnSgeqrf per matrix (48 x 256x192)", [&] { be_pm.qr_r(f(SPb, n, k, r), f(Rb, n, r, r)); });
  {
    const std::int64_t nb = 12, kk = 1024, rr = 768;  // gpt160m r = 1: sketches of 1024×768
    dion::CudaBackendOptions g;
    g.own_qr_r_global = true;
    CudaBackend be_g{s, g};
    auto A = buf(nb * kk * rr), R = buf(nb * rr * rr);
    be.randn(f(A, nb, kk, rr), 4, 1, 0, 0, rr, 1.0f);
    be_g.reserve_for(nb, kk, rr, rr, kk);
    be.reserve_for(nb, kk, rr, rr, kk);
    auto few = [&](const char* what, auto&& fn) {  // slow cases: 1 warm-up, 3 repetitions
      Json j;
      j.s("bench", "dion_op").s("what", what).stats(time_it(s, 1, 3, fn)).raw(g_env);
      g_sink.emit(j);
    };
    few("qr_r own Householder kernel, copy in the scratch (12 x 1024x768)", [&] { be_g.qr_r(f(A, nb, kk, rr), f(R, nb, rr, rr)); });
    few("qr_r default: cusolverDnSgeqrf per matrix (12 x 1024x768)", [&] { be.qr_r(f(A, nb, kk, rr), f(R, nb, rr, rr)); });
  }
  one("gemm M.Q per matrix (48 calls 768x768.768x192)", [&] {
    for (std::int64_t b = 0; b < n; ++b)
      be.gemm(dion::Op::N, dion::Op::N, 1.0f, f(Mb, n, p, p).at(b), f(Pb, n, p, r).at(b), 0.0f, f(Qb, n, p, r).at(b));
  });
  one("gemm M.Q batched (1 call, 48 x 768x768.768x192)",
      [&] { be.gemm(dion::Op::N, dion::Op::N, 1.0f, f(Mb, n, p, p), f(Pb, n, p, r), 0.0f, f(Qb, n, p, r)); });
  one("gram PtP (48 x 192x192)", [&] { be.gram(dion::Op::T, f(Pb, n, p, r), f(Gb, n, r, r)); });
  one("trsm_right_upper (trsmBatched 48 x 768x192)", [&] {
    ok(cudaMemcpyAsync(Rb.data(), Gb.data(), static_cast<std::size_t>(n * r * r) * 4, cudaMemcpyDeviceToDevice, s), "copy");
    be.cholesky_upper(f(Rb, n, r, r), static_cast<int*>(info.data()));
    be.trsm_right_upper(f(Qb, n, p, r), f(Rb, n, r, r));
  });
  one("col_normalize (48 x 768x192)", [&] { be.col_normalize(f(Pb, n, p, r), 1e-8f, f(Qb, n, p, r)); });
}

// ------------------------------------------------------------------ optimizer steps
/// Parameters and gradients of a shape set in a few large buffers (one per role); gradients in
/// `ng` rotating sets.
struct Model {
  struct P {
    std::string name;
    std::int64_t r, c, off;
  };
  ShapeSet set;
  bool bf;
  int ng;
  std::vector<P> ps;
  CudaBackend::RawBuffer x;
  std::vector<CudaBackend::RawBuffer> g;
  Model(CudaBackend& be, const ShapeSet& s, bool bf16_params, int grad_sets) : set(s), bf(bf16_params), ng(grad_sets) {
    std::int64_t off = 0;
    for (const auto& k : set.kinds)
      for (std::int64_t i = 0; i < k.count; ++i) {
        ps.push_back({k.name + "." + std::to_string(i), k.rows, k.cols, off});
        off += k.rows * k.cols;
      }
    const std::size_t el = bf ? 2 : 4;
    x = be.alloc_bytes(static_cast<std::size_t>(off) * el);
    if (bf) randomize<bf16>(be, x.data(), off, 5, 0.02f);
    else randomize<float>(be, x.data(), off, 5, 0.02f);
    for (int j = 0; j < ng; ++j) {
      g.push_back(be.alloc_bytes(static_cast<std::size_t>(off) * el));
      if (bf) randomize<bf16>(be, g.back().data(), off, 100 + j, 1.0f);
      else randomize<float>(be, g.back().data(), off, 100 + j, 1.0f);
    }
  }
  template <class T>
  dion::CudaView view(void* base, const P& p) const {
    return dion::cuda_view(static_cast<T*>(base) + p.off, {p.r, p.c});
  }
  dion::CudaView xv(const P& p) const { return bf ? view<bf16>(x.data(), p) : view<float>(x.data(), p); }
  dion::CudaView gv(const P& p, int j) const { return bf ? view<bf16>(g[j].data(), p) : view<float>(g[j].data(), p); }
  template <class Opt>
  void add(Opt& opt) {
    auto grp = opt.add_group();
    for (const auto& p : ps) grp.add(p.name, xv(p), gv(p, 0));
  }
  template <class Opt>
  void rotate(Opt& opt, int i) {
    if (ng < 2) return;
    for (const auto& p : ps) opt.set_grad(p.name, gv(p, i % ng));
  }
};

struct StepCase {
  std::string key;  // muon, dion4, ...
  std::string opt;  // model name
  double rf = 0.25, fraction = 0.25;
};

template <class Opt>
void bench_step(cudaStream_t s, CudaBackend& be, Model& model, const StepCase& sc, const dion::Options& o, bool graph,
                const std::string& variant) {
  const int elem = model.bf ? 2 : 4;
  const std::size_t free0 = free_bytes();
  auto opt = std::make_unique<Opt>(be, o);
  model.add(*opt);
  const std::size_t free1 = free_bytes();
  // one step first (untimed work of the first step is its own number), then decide the repetitions
  cudaEvent_t a, b;
  ok(cudaEventCreate(&a), "event");
  ok(cudaEventCreate(&b), "event");
  ok(cudaEventRecord(a, s), "record");
  opt->step();
  ok(cudaEventRecord(b, s), "record");
  ok(cudaEventSynchronize(b), "sync");
  float first = 0;
  ok(cudaEventElapsedTime(&first, a, b), "elapsed");
  const std::size_t free2 = free_bytes();
  int reps = g_reps, warm = 2;
  if (first > 2000) reps = 3, warm = 0;       // very slow cases: the JSON says so
  else if (first > 400) reps = std::min(reps, 10), warm = 1;
  auto st = time_it(s, warm, reps, [&] { opt->step(); }, [&](int i) { model.rotate(*opt, i + 1); });
  st.first_ms = first;
  const auto md = step_model(model.set, sc.opt, elem, sc.fraction, sc.rf);
  const double tf = table_floor(model.set.name, elem, sc.opt, sc.rf);
  const double floor_ms = tf > 0 ? tf : md.floor_ms();
  auto line = [&](const Stats& x, const char* mode) {
    Json j;
    j.s("bench", "step").s("backend", "cuda").s("set", model.set.name).s("dtype", model.bf ? "bf16" : "fp32")
        .s("opt", sc.key).s("variant", variant).s("policy", dion::non_finite_policy_name(g_policy)).s("mode", mode).i("params", model.set.params())
        .i("matrices", model.set.matrices()).stats(x);
    add_model(j, md, x.median_ms, floor_ms);
    j.b("floor_from_table", tf > 0);
    j.i("state_bytes", opt->state_bytes()).i("workspace_bytes", opt->workspace_bytes())
        .i("backend_scratch_bytes", static_cast<long long>(be.scratch_bytes()))
        .i("device_bytes_at_registration", static_cast<long long>(free0 - std::min(free0, free1)))
        .i("device_bytes_after_first_step", static_cast<long long>(free0 - std::min(free0, free2)));
    j.raw(g_env);
    g_sink.emit(j);
  };
  line(st, "eager");
  if (graph && first < 100) {  // slow steps gain nothing from a graph; keep the device time
    model.rotate(*opt, 0);
    ok(cudaStreamSynchronize(s), "sync");
    cudaGraph_t g;
    cudaGraphExec_t ex;
    ok(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "capture");
    opt->step();
    ok(cudaStreamEndCapture(s, &g), "end capture");
    ok(cudaGraphInstantiate(&ex, g, 0), "instantiate");
    auto sg = time_it(s, 2, reps, [&] { ok(cudaGraphLaunch(ex, s), "launch"); });
    line(sg, "graph");
    cudaGraphExecDestroy(ex);
    cudaGraphDestroy(g);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  opt.reset();
  ok(cudaStreamSynchronize(s), "sync");
}

void bench_set(cudaStream_t s, const std::string& item, const std::set<std::string>& only_steps) {
  std::string name = item;
  bool bf = false;
  if (name.size() > 5 && name.substr(name.size() - 5) == "-bf16") name = name.substr(0, name.size() - 5), bf = true;
  if (name == "llama8b") bf = true;
  const ShapeSet set = shape_set(name);
  const bool big = name == "llama8b";
  const bool graph = name == "gpt160m" || name == "tiny";
  CudaBackend be{s};
  Model model(be, set, bf, big ? 1 : name == "llama1b" ? 2 : 3);
  ok(cudaStreamSynchronize(s), "sync");
  auto want = [&](const std::string& k) { return only_steps.empty() || only_steps.count(k); };
  dion::Options o;
  o.non_finite = g_policy;  // both policies are sync-free and capturable
  if (want("muon")) bench_step<dion::Muon<CudaBackend>>(s, be, model, {"muon", "muon"}, o, graph, "symmetric");
  if (want("muon-full")) {
    dion::CudaBackendOptions fo;
    fo.sym_block = 0;
    CudaBackend full{s, fo};
    bench_step<dion::Muon<CudaBackend>>(s, full, model, {"muon", "muon"}, o, graph, "full_gemm");
  }
  if (want("normuon")) bench_step<dion::NorMuon<CudaBackend>>(s, be, model, {"normuon", "normuon"}, o, graph, "symmetric");
  if (want("dion2")) {
    dion::Options d = o;
    d.fraction = 0.25;
    bench_step<dion::Dion2<CudaBackend>>(s, be, model, {"dion2_a0.25", "dion2", 0.25, 0.25}, d, graph, "symmetric");
  }
  if (want("nordion2")) {
    dion::Options d = o;
    d.fraction = 0.25;
    bench_step<dion::NorDion2<CudaBackend>>(s, be, model, {"nordion2_a0.25", "nordion2", 0.25, 0.25}, d, graph, "symmetric");
  }
  for (const auto& [key, rf] : std::vector<std::pair<std::string, double>>{{"dion16", 1.0 / 16}, {"dion4", 0.25}, {"dion1", 1.0}}) {
    if (!want(key)) continue;
    // full rank on llama sets: sketches of 2560×2048 / 5120×4096 per matrix (seconds per step); only on request
    if (key == "dion1" && name != "gpt160m" && name != "tiny" && !only_steps.count("dion1")) continue;
    dion::Options d = o;
    d.rank_fraction = rf;
    const std::string k = key == "dion1" ? "dion_r1" : key == "dion4" ? "dion_r0.25" : "dion_r0.0625";
    bench_step<dion::Dion<CudaBackend>>(s, be, model, {k, "dion", rf, 0.25}, d, graph, "own_qr_r");
    if (key == "dion4" && !model.bf && (name == "gpt160m" || name == "llama1b")) {  // fp32 GEMMs on TF32 tensor cores
      dion::CudaBackendOptions to;
      to.allow_tf32 = true;
      CudaBackend tf{s, to};
      bench_step<dion::Dion<CudaBackend>>(s, tf, model, {k, "dion", rf, 0.25}, d, false, "own_qr_r+tf32");
    }
    if (key == "dion4" && name == "gpt160m" && !only_steps.count("noprev")) {  // the previous QR path, for the record
      dion::CudaBackendOptions po;
      po.own_qr_r = false;
      CudaBackend prev{s, po};
      bench_step<dion::Dion<CudaBackend>>(s, prev, model, {k, "dion", rf, 0.25}, d, false, "cublas_geqrf_batched");
    }
  }
  if (want("lion")) bench_step<dion::Lion<CudaBackend>>(s, be, model, {"lion", "lion"}, o, graph, "");
  if (want("adamw")) bench_step<dion::AdamW<CudaBackend>>(s, be, model, {"adamw", "adamw"}, o, graph, "");
}

std::vector<std::string> split(const std::string& v, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(v);
  std::string t;
  while (std::getline(ss, t, sep))
    if (!t.empty()) out.push_back(t);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string only = "calib,check,ortho,orthoops,dionops,gpt160m,gpt160m-bf16,llama1b";
  std::string out;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) out = argv[++i];
    else if (a == "--only" && i + 1 < argc) only = argv[++i];
    else if (a == "--reps" && i + 1 < argc) g_reps = std::max(1, std::atoi(argv[++i]));
    else if (a == "--policy" && i + 1 < argc) {
      const std::string v = argv[++i];
      g_policy = v == "skip" || v == "skip_step" ? dion::NonFinitePolicy::skip_step : dion::NonFinitePolicy::propagate;
    }
    else if (a.rfind("--", 0) != 0 && out.empty()) out = a;  // dion_cuda_bench results.jsonl (tests/gpu/run_on_device.sh)
    else {
      std::fprintf(stderr, "usage: dion_cuda_bench [--out results.jsonl] [--only item,...] [--reps N] [--policy propagate|skip]\n");
      return 2;
    }
  }
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::fprintf(stderr, "dion_cuda_bench: no CUDA device (nothing to time)\n");
    return 0;  // a benchmark never fails a build or CI run
  }
  if (!out.empty()) g_sink.f = std::fopen(out.c_str(), "w");
  cudaStream_t s;
  ok(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");
  std::set<std::string> steps;
  const auto items = split(only, ',');
  for (const auto& it : items)
    if (it.rfind("steps=", 0) == 0)
      for (const auto& k : split(it.substr(6), '+')) steps.insert(k);
  int rc = 0;
  try {
    {
      CudaBackend be{s};
      calibrate(s, be);
    }
    for (const auto& it : items) {
      if (it == "calib" || it.rfind("steps=", 0) == 0) continue;
      if (it == "check") {
        check_sym<float>(s, "fp32");
        check_sym<bf16>(s, "bf16");
        check_qr(s);
      } else if (it == "ortho") {
        bench_ortho(s, 1, 4096, 4096, 2.61);
        bench_ortho(s, 1, 4096, 14336, 6.96);
        bench_ortho(s, 48, 768, 768, -1);
        bench_ortho(s, 12, 768, 3072, -1);
        bench_ortho(s, 12, 3072, 768, -1);
      } else if (it == "ortho-big") {
        bench_ortho(s, 1, 4096, 4096, 2.61);
        bench_ortho(s, 1, 4096, 14336, 6.96);
      } else if (it == "orthoops-small") {
        bench_ortho_ops(s, 48, 768, 768);
      } else if (it == "orthoops") {
        bench_ortho_ops(s, 48, 768, 768);
        bench_ortho_ops(s, 12, 3072, 768);
        bench_ortho_ops(s, 1, 4096, 4096);
        bench_ortho_ops(s, 1, 4096, 14336);
      } else if (it == "ortho-small") {
        bench_ortho(s, 2, 1024, 1024, -1);
      } else if (it == "dionops") {
        bench_dion_ops(s);
      } else {
        // SET or SET:opt+opt+... (that set's optimizers; else the global steps= list)
        const auto colon = it.find(':');
        if (colon == std::string::npos) {
          bench_set(s, it, steps);
        } else {
          std::set<std::string> own;
          for (const auto& k : split(it.substr(colon + 1), '+')) own.insert(k);
          bench_set(s, it.substr(0, colon), own);
        }
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dion_cuda_bench: %s\n", e.what());
    rc = 1;
  }
  if (g_sink.f) std::fclose(g_sink.f);
  cudaStreamDestroy(s);
  return rc;
}
