// The CUDA backend: the Backend operation set (core/concepts.hpp) on device memory, with the Eigen
// backend's semantics op by op (same formulas, same rounding points: a bf16 GEMM accumulates in fp32
// and rounds alpha·AB + beta·C once; element-wise kernels use uncontracted fp32 arithmetic).
//
//   cudaStream_t s;  cudaStreamCreate(&s);
//   dion::CudaBackend be{s};                       // borrows the stream (and handles, if given)
//   dion::Muon<dion::CudaBackend> opt{be, {.lr = 0.02f}};
//   opt.add_group().add("w", dion::cuda_view(w, {768, 768}), dion::cuda_view(gw, {768, 768}));
//   opt.step();                                    // enqueued on s: no allocation, no host sync
//
// Matrix products go through cuBLAS (strided-batched GEMM: one call per batch; bf16 inputs with fp32
// accumulation on tensor cores; fp32 with CUBLAS_COMPUTE_32F, TF32 only when asked; gram and sym_poly
// of side ≥ 1024 as one batched GEMM over the lower block triangle plus a mirror), Cholesky through
// cusolverDnSpotrfBatched, triangular solves through cublasStrsmBatched, the R of a QR through dion's
// own batched Householder kernel (cuSOLVER geqrf per matrix where the sketch does not fit shared
// memory), the Q of a QR through cuSOLVER geqrf + orgqr per matrix; everything else is dion's own
// kernels (kernels/*.cuh), one launch per op over the whole batch. bench/RESULTS.md has the numbers.
//
// Row-major vs column-major: a row-major m×n matrix with row stride ld is, to cuBLAS, a column-major
// n×m matrix with leading dimension ld. Products swap their operands; factorizations run on the
// transposed view where the math allows (Cholesky, triangular solves) and on column-major copies in
// scratch where it does not (QR).
//
// No op allocates or synchronizes with the host: scratch (per-matrix accumulators, pointer arrays,
// QR copies, cuSOLVER workspace) comes from one backend-owned device buffer sized at construction
// and grown by reserve_for(), which the optimizer calls at registration for every shape group. An op
// whose batch does not fit the scratch runs in sub-batches; only an op for which not even one matrix
// fits grows the scratch (an allocation, counted by allocation_count()).
//
// CUDA graphs: every op is capturable. copy_from_host is capturable too: under capture it records a
// host node that re-reads the host source at each replay (so Optimizer::set_lr between replays is
// honoured) followed by a copy from backend-owned pinned memory. The captured host source must
// outlive the graph, and reserve_for() must not grow the scratch after a capture (re-capture then).
#pragma once

#if !defined(__CUDACC__)
#error "dion/backend/cuda/cuda_backend.hpp holds CUDA kernels: include it (or dion/cuda.hpp) from a .cu file compiled by nvcc"
#endif

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <array>
#include <deque>
#include <memory>
#include <new>
#include <limits>
#include <type_traits>

#include "dion/backend/cuda/buffer.hpp"
#include "dion/backend/cuda/check.hpp"
#include "dion/backend/cuda/kernels/common.cuh"
#include "dion/backend/cuda/kernels/elementwise.cuh"
#include "dion/backend/cuda/kernels/factor.cuh"
#include "dion/backend/cuda/kernels/reduce.cuh"
#include "dion/core/bf16.hpp"
#include "dion/core/concepts.hpp"
#include "dion/core/error.hpp"
#include "dion/core/view.hpp"

namespace dion {

/// Construction-time settings of a CudaBackend.
struct CudaBackendOptions {
  /// fp32 GEMMs on TF32 tensor cores (CUBLAS_COMPUTE_32F_FAST_TF32): faster, ~1e-3 relative error.
  /// Off by default; the Cholesky-QR quality check always runs in plain fp32.
  bool allow_tf32 = false;
  /// R factors of a batch through one cublasSgeqrfBatched call (else cuSOLVER geqrf per matrix).
  /// Used only when own_qr_r is off.
  bool batched_qr = true;
  /// R factors through dion's own batched Householder kernel (one block per matrix, the working copy
  /// in shared memory when it fits, else in the scratch): the same LAPACK conventions, no per-matrix
  /// solver calls (bench/RESULTS.md: 24.5 ms → under a millisecond for 48 × 256×192).
  bool own_qr_r = true;
  /// gram / sym_poly of side s ≥ sym_min_dim compute only the lower block triangle (blocks of
  /// sym_block rows, else ¾ or ½ of it: a multiple of 32 dividing s) in one batched GEMM, then
  /// mirror it: nb(nb+1)/2 of nb² block products. 0 turns it off (full GEMMs).
  std::int64_t sym_block = 512;
  std::int64_t sym_min_dim = 1024;  // at 768 (gpt160m) the 384-blocks ran slower than one GEMM (bench/RESULTS.md)
  /// Sketches whose k×r working copy does not fit one block's shared memory: dion's kernel on a
  /// copy in the scratch (true; latency-bound, slow at r ≥ 768) or cuSOLVER geqrf per matrix (false).
  bool own_qr_r_global = false;
  /// cuBLAS workspace set on an owned cuBLAS handle (so cuBLAS never allocates during a step).
  std::size_t cublas_workspace_bytes = std::size_t{32} << 20;
  /// Initial device scratch; the optimizer grows it at registration (reserve_for).
  std::size_t scratch_bytes = std::size_t{1} << 20;
  /// Pinned memory for host→device copies recorded in CUDA graphs (2 floats per parameter group
  /// per captured step).
  std::size_t capture_staging_bytes = std::size_t{64} << 10;
};

/// GPU backend over CUDA, cuBLAS and cuSOLVER. Borrows the caller's stream (and handles); not
/// copyable or movable (optimizers keep a pointer to it).
class CudaBackend {
 public:
  using Space = CudaSpace;
  using RawBuffer = cuda_detail::DeviceBuffer;
  static constexpr const char* name = "cuda";
  /// Device flags cannot be read on the host without a synchronization.
  static constexpr bool host_visible = false;

  /// Borrow `stream`; cuBLAS and cuSOLVER handles are created (and owned) here, bound to it.
  explicit CudaBackend(cudaStream_t stream, CudaBackendOptions opts = {})
      : CudaBackend(stream, nullptr, nullptr, opts) {}
  /// Borrow `stream` and the given handles (nullptr: create and own one). A borrowed handle gets this
  /// backend's stream and host pointer mode set before each call that uses it.
  CudaBackend(cudaStream_t stream, cublasHandle_t cublas, cusolverDnHandle_t cusolver, CudaBackendOptions opts = {})
      : stream_(stream), opts_(opts), cublas_(cublas), cusolver_(cusolver), own_cublas_(cublas == nullptr),
        own_cusolver_(cusolver == nullptr) {
    try {
      int dev = 0;
      DION_CUDA_CHECK(cudaGetDevice(&dev));
      DION_CUDA_CHECK(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, dev));
      DION_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin_, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
      if (smem_optin_ > 2048)
        DION_CUDA_CHECK(cudaFuncSetAttribute(cuda_kernels::qr_r_householder<true>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin_ - 1024));
      if (own_cublas_) {
        DION_CUBLAS_CHECK(cublasCreate(&cublas_));
        DION_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
        DION_CUBLAS_CHECK(cublasSetPointerMode(cublas_, CUBLAS_POINTER_MODE_HOST));
        if (opts_.cublas_workspace_bytes > 0) {
          cublas_ws_ = RawBuffer(opts_.cublas_workspace_bytes, stream_);
          ++allocations_;
          DION_CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_ws_.data(), cublas_ws_.bytes()));
        }
      }
      if (own_cusolver_) {
        DION_CUSOLVER_CHECK(cusolverDnCreate(&cusolver_));
        DION_CUSOLVER_CHECK(cusolverDnSetStream(cusolver_, stream_));
      }
      if (opts_.capture_staging_bytes > 0) {
        DION_CUDA_CHECK(cudaHostAlloc(&staging_, opts_.capture_staging_bytes, cudaHostAllocDefault));
        std::memset(staging_, 0, opts_.capture_staging_bytes);
      }
      scratch_ = RawBuffer(std::max<std::size_t>(opts_.scratch_bytes, 4096), stream_);
      ++allocations_;
      gemm_ptrs_ = RawBuffer(kGemmPtrBytes, stream_);
      ++allocations_;
      pend_ = std::make_unique<std::array<Pending, kMaxKinds>>();
    } catch (...) {
      release();
      throw;
    }
  }
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;
  CudaBackend(CudaBackend&&) = delete;
  CudaBackend& operator=(CudaBackend&&) = delete;
  ~CudaBackend() { release(); }

  cudaStream_t stream() const noexcept { return stream_; }
  const CudaBackendOptions& options() const noexcept { return opts_; }
  /// Device allocations made by this backend so far (alloc_bytes, scratch growth, its own setup).
  std::size_t allocation_count() const noexcept { return allocations_; }
  std::size_t scratch_bytes() const noexcept { return scratch_.bytes(); }

  // ---------------------------------------------------------------- memory
  RawBuffer alloc_bytes(std::size_t bytes) {
    ++allocations_;
    return RawBuffer(bytes, stream_);
  }
  /// Device → host, enqueued on the stream; the caller synchronizes before reading `dst`.
  void copy_to_host(const void* src, void* dst, std::size_t bytes) {
    const NoDefer nd{*this};
    if (bytes) DION_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
  }
  /// Host → device. `src` may be reused as soon as the call returns. Small copies (up to 64 KiB) travel
  /// as kernel parameters: no synchronization. Larger ones synchronize the stream (registration and
  /// checkpoint paths only). Under stream capture: a host node re-reads `src` at every replay.
  void copy_from_host(const void* src, void* dst, std::size_t bytes) {
    const NoDefer nd{*this};
    if (!bytes) return;
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    DION_CUDA_CHECK(cudaStreamIsCapturing(stream_, &cs));
    if (cs == cudaStreamCaptureStatusActive) {
      const std::size_t at = (staging_used_ + 15) / 16 * 16;
      DION_CHECK(staging_ != nullptr && at + bytes <= opts_.capture_staging_bytes, NotSupported,
                 "CudaBackend::copy_from_host under stream capture: ", bytes,
                 " bytes do not fit the pinned capture staging (", opts_.capture_staging_bytes - std::min(at, opts_.capture_staging_bytes),
                 " bytes left; raise CudaBackendOptions::capture_staging_bytes)");
      staging_used_ = at + bytes;
      auto& e = captured_.emplace_back(CapturedCopy{src, static_cast<char*>(staging_) + at, bytes});
      DION_CUDA_CHECK(cudaLaunchHostFunc(stream_, &CudaBackend::run_captured_copy, &e));
      DION_CUDA_CHECK(cudaMemcpyAsync(dst, e.pinned, bytes, cudaMemcpyHostToDevice, stream_));
      return;
    }
    if (bytes <= kInlineCopyMax) {
      const auto* s = static_cast<const unsigned char*>(src);
      auto* d = static_cast<unsigned char*>(dst);
      for (std::size_t off = 0; off < bytes; off += cuda_kernels::InlineBytes::kMax) {
        const auto n = static_cast<unsigned>(std::min<std::size_t>(cuda_kernels::InlineBytes::kMax, bytes - off));
        cuda_kernels::InlineBytes p;
        std::memcpy(p.b, s + off, n);
        cuda_kernels::write_inline_bytes<><<<1, 256, 0, stream_>>>(d + off, p, n);
        DION_CUDA_CHECK_LAUNCH("write_inline_bytes");
      }
      return;
    }
    DION_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
    DION_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void synchronize() {
    const NoDefer nd{*this};
    DION_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  // ---------------------------------------------------------------- step predicate
  /// While `flag` is set and *flag != 0, every kernel that writes a parameter or optimizer state
  /// (all element-wise ops, NorMuon/NorDion2 variance rows, AdamW's counter) returns at once; GEMMs
  /// and factorizations still run (vendor calls cannot be predicated) and write only their outputs,
  /// which the algorithms keep in scratch, except Dion's error feedback, whose operands are zeroed
  /// by zero_if_skip first. The optimizer sets it for a step under NonFinitePolicy::skip_step: the
  /// skip is decided on the device, so step() needs no host synchronization and can be captured.
  void set_skip(const int* flag) {
    const NoDefer nd{*this};
    skip_ = flag;
  }
  /// x ← 0 when the predicate is set and raised.
  template <class T>
  void zero_if_skip(Mat<T, Space> x) {
    const NoDefer nd{*this};
    if (!skip_) return;
    launch_ew(cuda_kernels::merge_rows(dims(x), row_contig(x)), cuda_kernels::ZeroIfSkipF<T>{cuda_kernels::mref(x), skip_},
              "zero_if_skip", nullptr, false);
  }
  /// *counter += *flag, on the stream (never predicated).
  void accumulate_flag(const int* flag, std::int64_t* counter) {
    const NoDefer nd{*this};
    cuda_kernels::accumulate_flag<><<<1, 32, 0, stream_>>>(flag, counter);
    DION_CUDA_CHECK_LAUNCH("accumulate_flag");
  }

  // ---------------------------------------------------------------- batching (multi-tensor launches)
  /// Between begin_batch() and end_batch(), element-wise ops of one kind on separate matrices (copy,
  /// fill, momentum, apply_update, add_into, Dion2's gather/decay/scatter, Lion, Dion's zero flags)
  /// are collected and launched together, up to ~30 per kernel (their arguments travel by value in
  /// one parameter block), and single-matrix GEMMs of one signature become one cublasGemmBatchedEx.
  /// Kinds are launched in the order they first appeared (see detail::BatchScope for the contract);
  /// any other op first launches everything pending. Nothing is allocated or synchronized.
  void begin_batch() { ++batch_depth_; }
  void end_batch() {
    if (batch_depth_ > 0 && --batch_depth_ == 0) flush_pending();
  }
  /// Leave the batch without launching what is pending (error paths).
  void abandon_batch() noexcept {
    npend_ = 0;
    batch_depth_ = 0;
  }

  /// Size the scratch so that every op on `batch` matrices of at most rows×cols runs in one batched
  /// launch without allocating; with rank > 0 also Dion's factorizations (P of max(rows, cols)×rank,
  /// sketch of sketch_rows×rank). Called by the optimizer at registration; may allocate.
  void reserve_for(std::int64_t batch, std::int64_t rows, std::int64_t cols, std::int64_t rank,
                   std::int64_t sketch_rows) {
    if (batch <= 0) return;
    const std::int64_t D = std::max<std::int64_t>({rows, cols, 1});
    std::size_t need = 0;
    auto keep = [&](std::size_t v) { need = std::max(need, v); };
    keep(per_matrix_bytes(batch, 8 * cuda_kernels::kMaxBlocksPerMatrix + kAlign));  // Frobenius norms
    keep(per_matrix_bytes(batch, 16 * D + 4 + 2 * kAlign));              // NorMuon row statistics
    keep(per_matrix_bytes(batch, 4 * D + kAlign));                       // top-k slice norms
    keep(per_matrix_bytes(batch, 20 * D + 4 + 3 * kAlign));              // NorDion2
    keep(per_matrix_bytes(batch, 24 * sym_pairs(std::min(rows, cols)) + 3 * kAlign));  // symmetric products
    if (rank > 0) keep(per_matrix_bytes(batch, 24 * sym_pairs(rank) + 3 * kAlign));
    if (rank > 0) {
      const std::int64_t p = D, r = rank, k = std::max<std::int64_t>(sketch_rows, r);
      keep(per_matrix_bytes(batch, 4 * (k * r + r) + 16 + 2 * kAlign));  // qr_r
      if (!opts_.own_qr_r || (!opts_.own_qr_r_global && static_cast<std::size_t>(k + 1) * static_cast<std::size_t>(r) * 4 + 1024 >
                                                            static_cast<std::size_t>(smem_optin_))) {
        int l1 = 0;  // cuSOLVER geqrf per matrix: its workspace too
        DION_CUSOLVER_CHECK(cusolverDnSgeqrf_bufferSize(cusolver(), static_cast<int>(k), static_cast<int>(r),
                                                        static_cast<float*>(scratch_.data()), static_cast<int>(k), &l1));
        keep(per_matrix_bytes(batch, 4 * (k * r + r) + 3 * kAlign) + static_cast<std::size_t>(std::max(l1, 1)) * 4 +
             2 * kAlign + 16);
      }
      keep(per_matrix_bytes(batch, 4 * r * r));                          // orthogonality check
      keep(per_matrix_bytes(batch, 12 + kAlign));                        // cholesky
      keep(per_matrix_bytes(batch, 16 + kAlign));                        // trsm
      keep(per_matrix_bytes(batch, 4 * (p * r + r) + 2 * kAlign) + qr_q_fixed_bytes(p, r));  // qr_q
    }
    reserve_scratch(need);
  }
  /// Grow the device scratch to at least `bytes` (synchronizes the stream; never call it under capture).
  void reserve_scratch(std::size_t bytes) {
    const NoDefer nd{*this};
    if (bytes <= scratch_.bytes()) return;
    DION_CUDA_CHECK(cudaStreamSynchronize(stream_));  // work in flight may still read the old scratch
    scratch_ = RawBuffer();
    scratch_ = RawBuffer((bytes + 4095) / 4096 * 4096, stream_);
    ++allocations_;
  }

  // ---------------------------------------------------------------- element-wise basics
  template <class TS, class TD>
  void copy(Mat<TS, Space> src, Mat<TD, Space> dst) {
    check_same(src, dst, "copy");
    if constexpr (std::is_same_v<TS, TD>) {
      // same type, both packed: the copy engine path runs near HBM bandwidth (the element-wise
      // kernel's 2-byte accesses reach about half of it on bf16)
      // (not under the step predicate, which the copy engine cannot honour, nor inside a batch)
      if (!dst.empty() && packed_layout(src) && packed_layout(dst) && skip_ == nullptr && !deferring()) {
        if (src.data != dst.data)
          DION_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data,
                                          static_cast<std::size_t>(dst.batch * dst.rows * dst.cols) * sizeof(TD),
                                          cudaMemcpyDeviceToDevice, stream_));
        return;
      }
    }
    ew_vb(cuda_kernels::merge_rows(dims(dst), row_contig(src, dst)),
          cuda_kernels::CopyF<TS, TD>{cuda_kernels::cmref(src), cuda_kernels::mref(dst)}, "copy");
  }
  template <class T>
  void fill(Mat<T, Space> x, float v) {
    ew_b(cuda_kernels::merge_rows(dims(x), row_contig(x)),
         cuda_kernels::FillF<T>{cuda_kernels::mref(x), to_elem<T>(v)}, "fill");
  }

  // ---------------------------------------------------------------- products
  /// C = alpha·op(A)·op(B) + beta·C per matrix of the batch (one cuBLAS call; fp32 accumulation).
  /// A and B share an element type; C is that type, or fp32 for bf16 inputs.
  template <class TA, class TB, class TC>
  void gemm(Op ta, Op tb, float alpha, Mat<TA, Space> A, Mat<TB, Space> B, float beta, Mat<TC, Space> C) {
    static_assert(std::is_same_v<TA, TB>, "CudaBackend::gemm: A and B must have the same element type");
    static_assert(!(std::is_same_v<TA, float> && std::is_same_v<TC, bf16>),
                  "CudaBackend::gemm: fp32 inputs with a bf16 output are not supported by cuBLAS");
    if (deferring() && A.batch == 1 && B.batch == 1 && C.batch == 1 && defer_gemm(ta, tb, alpha, A, B, beta, C)) return;
    const NoDefer nd{*this};
    gemm_impl(ta, tb, alpha, A, B, beta, C, opts_.allow_tf32);
  }
  /// A = X·Xᵀ (t = N) or Xᵀ·X (t = T) per matrix.
  template <class T>
  void gram(Op t, Mat<T, Space> X, Mat<T, Space> A) {
    const NoDefer nd{*this};
    const auto s = t == Op::N ? X.rows : X.cols;
    DION_CHECK(A.rows == s && A.cols == s && A.batch == X.batch, ShapeMismatch, "gram: output ", A.rows, "x",
               A.cols, " for ", s, "x", s);
    if (sym_blocks(s) > 1) sym_product(t == Op::T, 1.0f, X, 0.0f, A);
    else if (t == Op::N) gemm_impl(Op::N, Op::T, 1.0f, X, X, 0.0f, A, opts_.allow_tf32);
    else gemm_impl(Op::T, Op::N, 1.0f, X, X, 0.0f, A, opts_.allow_tf32);
  }
  /// B = b·A + c·A·A: B ← A, then one GEMM with beta = b (one rounding, like the Eigen backend).
  template <class T>
  void sym_poly(Mat<T, Space> A, float b, float c, Mat<T, Space> Bm) {
    const NoDefer nd{*this};
    check_same(A, Bm, "sym_poly");
    DION_CHECK(A.rows == A.cols, ShapeMismatch, "sym_poly: A is ", A.rows, "x", A.cols, ", not square");
    copy(A, Bm);
    // A symmetric: A·A = A·Aᵀ, so the symmetric product computes it from one block triangle
    // (also for the full product: cuBLAS runs A·Aᵀ (NT) markedly faster than A·A (NN) here)
    if (sym_blocks(A.rows) > 1) sym_product(false, c, A, b, Bm);
    else gemm_impl(Op::N, Op::T, c, A, A, b, Bm, opts_.allow_tf32);
  }

  // ---------------------------------------------------------------- reductions
  /// Frobenius norm of each matrix into out[b] (device memory); NaN where the matrix holds NaN/Inf.
  template <class T>
  void frob_norms(Mat<T, Space> X, float* out) {
    const NoDefer nd{*this};
    if (X.batch <= 0) return;
    const auto d0 = cuda_kernels::merge_rows(dims(X), row_contig(X));
    const int bpm = d0.empty() ? 1 : cuda_kernels::blocks_per_matrix(d0);
    for_sub_batches(X.batch, static_cast<std::size_t>(8 * bpm), 0, [&](std::int64_t b0, std::int64_t nb, char* scr) {
      auto* part = reinterpret_cast<double*>(scr);
      const auto Xs = X.slice(b0, nb);
      const auto d = cuda_kernels::merge_rows(dims(Xs), row_contig(Xs));
      if (d.empty()) {
        DION_CUDA_CHECK(cudaMemsetAsync(part, 0, static_cast<std::size_t>(nb * bpm) * 8, stream_));
      } else {
        cuda_kernels::frob_partial<T><<<grid1(nb * bpm), cuda_kernels::kThreads, 0, stream_>>>(
            cuda_kernels::cmref(Xs), d, cuda_kernels::tiles_of(d.cols), bpm, part);
        DION_CUDA_CHECK_LAUNCH("frob_partial");
      }
      cuda_kernels::frob_finish<><<<grid1((nb + 255) / 256), 256, 0, stream_>>>(part, bpm, out + b0, nb);
      DION_CUDA_CHECK_LAUNCH("frob_finish");
    });
  }
  /// X_b ← X_b / (mult·norm_b + eps), norms in device memory.
  template <class T>
  void scale_by_norm(Mat<T, Space> X, const float* norms, float mult, float eps) {
    const NoDefer nd{*this};
    ew(cuda_kernels::merge_rows(dims(X), row_contig(X)),
       cuda_kernels::ScaleByNormF<T>{cuda_kernels::mref(X), norms, mult, eps}, "scale_by_norm");
  }
  /// *flag ← 1 if any element of X is NaN or Inf (not cleared first).
  template <class T>
  void nonfinite_flag(Mat<T, Space> X, int* flag) {
    ew_vb(cuda_kernels::merge_rows(dims(X), row_contig(X)), cuda_kernels::NonfiniteF<T>{cuda_kernels::cmref(X), flag},
          "nonfinite_flag");
  }

  // ---------------------------------------------------------------- Muon family element-wise
  template <class TG, class TM, class TU>
  void muon_momentum(Mat<TG, Space> G, Mat<TM, Space> M, Mat<TU, Space> U, float mu, bool nesterov) {
    check_same(G, M, "muon_momentum");
    check_same(M, U, "muon_momentum");
    ew_vb(cuda_kernels::merge_rows(dims(M), row_contig(G, M, U)),
       cuda_kernels::MuonMomentumF<TG, TM, TU>{cuda_kernels::cmref(G), cuda_kernels::mref(M), cuda_kernels::mref(U), mu,
                                              nesterov},
       "muon_momentum");
  }
  template <class TX, class TO>
  void apply_update(Mat<TX, Space> X, Mat<TO, Space> O, const float* lr, const float* wd, float lr_scale,
                    bool cautious) {
    check_same(X, O, "apply_update");
    ew_vb(cuda_kernels::merge_rows(dims(X), row_contig(X, O)),
       cuda_kernels::ApplyUpdateF<TX, TO>{cuda_kernels::mref(X), cuda_kernels::cmref(O), lr, wd, lr_scale, cautious},
       "apply_update");
  }
  template <class TX, class TO, class TV>
  void normuon_update(Mat<TX, Space> X, Mat<TO, Space> O, Mat<TV, Space> V, float beta2, float o_scale,
                      const float* lr, const float* wd, float lr_scale, bool cautious) {
    const NoDefer nd{*this};
    check_same(X, O, "normuon_update");
    DION_CHECK(V.rows == X.rows && V.cols == 1 && V.batch == X.batch, ShapeMismatch, "normuon_update: V ", V.rows,
               "x", V.cols, " for ", X.rows, " rows");
    if (X.batch <= 0 || X.rows <= 0) return;
    for_sub_batches(X.batch, static_cast<std::size_t>(16 * X.rows + 4) + kAlign, 0,
                    [&](std::int64_t b0, std::int64_t nb, char* scr) {
      Carve cv{scr};
      auto* stat = cv.take<double>(static_cast<std::size_t>(2 * nb * X.rows));
      auto* rescale = cv.take<float>(static_cast<std::size_t>(nb));
      const auto Xs = X.slice(b0, nb);
      const auto Os = O.slice(b0, nb);
      const auto Vs = V.slice(b0, nb);
      const cuda_kernels::Dims d{nb, X.rows, X.cols};
      cuda_kernels::normuon_rows<TO, TV><<<warp_grid(nb * X.rows), cuda_kernels::kThreads, 0, stream_>>>(
          cuda_kernels::cmref(Os), cuda_kernels::mref(Vs), d, o_scale, beta2, stat, skip_);
      DION_CUDA_CHECK_LAUNCH("normuon_rows");
      cuda_kernels::rescale_finish<><<<grid1(nb), cuda_kernels::kThreads, 0, stream_>>>(stat, X.rows, rescale, nb);
      DION_CUDA_CHECK_LAUNCH("rescale_finish");
      ew(d,
         cuda_kernels::NormuonApplyF<TX, TO, TV>{cuda_kernels::mref(Xs), cuda_kernels::cmref(Os),
                                                 cuda_kernels::cmref(Vs), rescale, o_scale, lr, wd, lr_scale, cautious},
         "normuon_apply");
    });
  }

  // ---------------------------------------------------------------- Dion2 / NorDion2
  /// Per matrix: the k slices of largest L1 norm (ties: lower index), ascending, into idx[b·k + t].
  template <class TM>
  void select_topk(Mat<TM, Space> M, bool rows, std::int64_t k, std::int64_t* idx) {
    const NoDefer nd{*this};
    const std::int64_t S = rows ? M.rows : M.cols;
    DION_CHECK(k >= 0 && k <= S, InvalidArgument, "select_topk: k = ", k, " for ", S, " slices");
    if (M.batch <= 0 || k == 0) return;
    for_sub_batches(M.batch, static_cast<std::size_t>(4 * S), 0, [&](std::int64_t b0, std::int64_t nb, char* scr) {
      auto* norms = reinterpret_cast<float*>(scr);
      const auto Ms = M.slice(b0, nb);
      if (rows) {
        cuda_kernels::slice_l1_rows<TM><<<warp_grid(nb * S), cuda_kernels::kThreads, 0, stream_>>>(
            cuda_kernels::cmref(Ms), nb, M.rows, M.cols, norms);
      } else {
        cuda_kernels::slice_l1_cols<TM><<<grid1(std::min<std::int64_t>(nb * ((S + 31) / 32), std::int64_t{sms_} * 16)),
                                          cuda_kernels::kThreads, 0, stream_>>>(cuda_kernels::cmref(Ms), nb, M.rows,
                                                                                M.cols, norms);
      }
      DION_CUDA_CHECK_LAUNCH("slice_l1");
      cuda_kernels::topk_select<><<<grid1(nb), cuda_kernels::kThreads, 0, stream_>>>(norms, S, k, idx + b0 * k);
      DION_CUDA_CHECK_LAUNCH("topk_select");
    });
  }
  template <class TM, class TU>
  void gather_slices(Mat<TM, Space> M, const std::int64_t* idx, std::int64_t k, bool rows, float decay,
                     Mat<TU, Space> U) {
    const cuda_kernels::Dims d{M.batch, rows ? k : M.rows, rows ? M.cols : k};
    DION_CHECK(U.batch == d.batch && U.rows == d.rows && U.cols == d.cols, ShapeMismatch, "gather_slices: U is (",
               U.batch, ", ", U.rows, ", ", U.cols, "), expected (", d.batch, ", ", d.rows, ", ", d.cols, ")");
    ew_b(d, cuda_kernels::GatherSlicesF<TM, TU>{cuda_kernels::mref(M), cuda_kernels::mref(U), idx, k, rows, decay},
       "gather_slices");
  }
  template <class TX, class TO>
  void dion2_update(Mat<TX, Space> X, Mat<TO, Space> O, const std::int64_t* idx, std::int64_t k, bool rows,
                    const float* lr, const float* wd, float lr_scale) {
    ew_b(cuda_kernels::merge_rows(dims(X), row_contig(X)), cuda_kernels::DecayF<TX>{cuda_kernels::mref(X), lr, wd},
         "dion2_decay");
    const cuda_kernels::Dims d{X.batch, rows ? k : X.rows, rows ? X.cols : k};
    ew_b(d,
       cuda_kernels::Dion2ScatterF<TX, TO>{cuda_kernels::mref(X), cuda_kernels::cmref(O), idx, k, rows, lr, lr_scale},
       "dion2_scatter");
  }
  template <class TX, class TO, class TV>
  void nordion2_update(Mat<TX, Space> X, Mat<TO, Space> O, Mat<TV, Space> V, const std::int64_t* idx,
                       std::int64_t k, float beta2, const float* lr, const float* wd, float lr_scale) {
    const NoDefer nd{*this};
    ew(cuda_kernels::merge_rows(dims(X), row_contig(X)), cuda_kernels::DecayF<TX>{cuda_kernels::mref(X), lr, wd},
       "nordion2_decay");
    if (X.batch <= 0 || k <= 0) return;
    for_sub_batches(X.batch, static_cast<std::size_t>(20 * k + 4) + 2 * kAlign, 0,
                    [&](std::int64_t b0, std::int64_t nb, char* scr) {
                      Carve cv{scr};
                      auto* stat = cv.take<double>(static_cast<std::size_t>(2 * nb * k));
                      auto* rescale = cv.take<float>(static_cast<std::size_t>(nb));
                      auto* f = cv.take<float>(static_cast<std::size_t>(nb * k));
                      const auto Xs = X.slice(b0, nb);
                      const auto Os = O.slice(b0, nb);
                      const auto Vs = V.slice(b0, nb);
                      const std::int64_t* id = idx + b0 * k;
                      cuda_kernels::nordion2_rows<TO, TV><<<warp_grid(nb * k), cuda_kernels::kThreads, 0, stream_>>>(
                          cuda_kernels::cmref(Os), cuda_kernels::mref(Vs), id, nb, k, X.cols, beta2, f, stat, skip_);
                      DION_CUDA_CHECK_LAUNCH("nordion2_rows");
                      cuda_kernels::rescale_finish<><<<grid1(nb), cuda_kernels::kThreads, 0, stream_>>>(stat, k, rescale, nb);
                      DION_CUDA_CHECK_LAUNCH("rescale_finish");
                      ew(cuda_kernels::Dims{nb, k, X.cols},
                         cuda_kernels::Nordion2ScatterF<TX, TO>{cuda_kernels::mref(Xs), cuda_kernels::cmref(Os), id, f,
                                                                rescale, k, lr, lr_scale},
                         "nordion2_scatter");
                    });
  }

  // ---------------------------------------------------------------- scalar optimizers
  template <class TX, class TG, class TM>
  void lion_update(Mat<TX, Space> X, Mat<TG, Space> G, Mat<TM, Space> M, const float* lr, const float* wd,
                   float beta1, float beta2, bool cautious) {
    check_same(X, G, "lion_update");
    check_same(X, M, "lion_update");
    ew_vb(cuda_kernels::merge_rows(dims(X), row_contig(X, G, M)),
       cuda_kernels::LionF<TX, TG, TM>{cuda_kernels::mref(X), cuda_kernels::cmref(G), cuda_kernels::mref(M), lr, wd,
                                       beta1, beta2, cautious},
       "lion_update");
  }
  /// AdamW; the step counter `step` lives in device memory and is incremented on the device when
  /// `advance_step` (a counter shared by a group, advanced elsewhere, is only read).
  template <class TX, class TG, class TM, class TV>
  void adamw_update(Mat<TX, Space> X, Mat<TG, Space> G, Mat<TM, Space> M, Mat<TV, Space> V, float* step,
                    bool advance_step, const float* lr, const float* wd, float beta1, float beta2, float eps, bool cautious) {
    const NoDefer nd{*this};
    check_same(X, G, "adamw_update");
    check_same(X, M, "adamw_update");
    check_same(X, V, "adamw_update");
    auto* sc = reinterpret_cast<float*>(scratch_.data());  // 2 floats; scratch is at least 4 KiB
    cuda_kernels::adamw_prepare<><<<1, 32, 0, stream_>>>(step, advance_step, lr, beta1, beta2, sc, skip_);
    DION_CUDA_CHECK_LAUNCH("adamw_prepare");
    ew_v(cuda_kernels::merge_rows(dims(X), row_contig(X, G, M, V)),
       cuda_kernels::AdamwF<TX, TG, TM, TV>{cuda_kernels::mref(X), cuda_kernels::cmref(G), cuda_kernels::mref(M),
                                            cuda_kernels::mref(V), sc, lr, wd, beta1, beta2, eps, cautious},
       "adamw_update");
  }

  // ---------------------------------------------------------------- Dion
  template <class TM, class TG>
  void add_into(Mat<TM, Space> M, Mat<TG, Space> G) {
    check_same(M, G, "add_into");
    ew_b(cuda_kernels::merge_rows(dims(M), row_contig(M, G)),
       cuda_kernels::AddIntoF<TM, TG>{cuda_kernels::mref(M), cuda_kernels::cmref(G)}, "add_into");
  }
  /// flags[b] ← 1 if every element of M_b is zero, else 0.
  template <class TM>
  void all_zero_flags(Mat<TM, Space> M, int* flags) {
    if (M.batch <= 0) return;
    ew_b(cuda_kernels::Dims{1, 1, M.batch}, cuda_kernels::SetFlagsF{flags, 1}, "all_zero_flags_set");
    ew_b(cuda_kernels::merge_rows(dims(M), row_contig(M)),
         cuda_kernels::NonzeroClearsF<TM>{cuda_kernels::cmref(M), flags}, "all_zero_flags");
  }
  template <class T>
  void dion_guard(Mat<T, Space> P, Mat<T, Space> R, Mat<T, Space> Qw, const int* flags) {
    const NoDefer nd{*this};
    check_same(R, Qw, "dion_guard");
    DION_CHECK(P.batch == R.batch, ShapeMismatch, "dion_guard: batches ", P.batch, " and ", R.batch, " differ");
    ew(cuda_kernels::merge_rows(dims(P), row_contig(P)), cuda_kernels::GuardPF<T>{cuda_kernels::mref(P), flags},
       "dion_guard_p");
    ew(cuda_kernels::merge_rows(dims(R), row_contig(R, Qw)),
       cuda_kernels::GuardRF<T>{cuda_kernels::mref(R), cuda_kernels::cmref(Qw), flags}, "dion_guard_r");
  }
  template <class TR, class TQ>
  void col_normalize(Mat<TR, Space> R, float eps, Mat<TQ, Space> Q) {
    const NoDefer nd{*this};
    check_same(R, Q, "col_normalize");
    if (R.batch <= 0 || R.cols <= 0) return;
    cuda_kernels::col_normalize_k<TR, TQ><<<thread_grid(R.batch * R.cols), cuda_kernels::kThreads, 0, stream_>>>(
        cuda_kernels::cmref(R), cuda_kernels::mref(Q), R.batch, R.rows, R.cols, eps);
    DION_CUDA_CHECK_LAUNCH("col_normalize");
  }
  template <class T>
  void copy_if_flag(const int* flags, int want, Mat<T, Space> src, Mat<T, Space> dst) {
    const NoDefer nd{*this};
    check_same(src, dst, "copy_if_flag");
    ew(cuda_kernels::merge_rows(dims(dst), row_contig(src, dst)),
       cuda_kernels::CopyIfFlagF<T>{cuda_kernels::cmref(src), cuda_kernels::mref(dst), flags, want}, "copy_if_flag");
  }

  // ---------------------------------------------------------------- factorizations (fp32)
  /// P (p×r) ← the thin Q factor of its Householder QR (LAPACK sign convention, as Eigen), per matrix;
  /// columns beyond min(p, r) are zero. cuSOLVER geqrf + orgqr on column-major copies.
  void qr_q(Mat<float, Space> P) {
    const NoDefer nd{*this};
    const std::int64_t p = P.rows, r = P.cols;
    if (P.batch <= 0 || p <= 0 || r <= 0) return;
    check_int(p, "qr_q rows");
    check_int(r, "qr_q cols");
    const std::int64_t kk = std::min(p, r);
    const std::size_t fixed = qr_q_fixed_bytes(p, r);
    for_sub_batches(P.batch, static_cast<std::size_t>(4 * (p * r + kk)) + 2 * kAlign, fixed,
                    [&](std::int64_t b0, std::int64_t nb, char* scr) {
                      Carve cv{scr};
                      auto* work = cv.take<float>(static_cast<std::size_t>(lwork_q_));
                      auto* dev_info = cv.take<int>(1);
                      auto* W = cv.take<float>(static_cast<std::size_t>(nb * p * r));
                      auto* tau = cv.take<float>(static_cast<std::size_t>(nb * kk));
                      const auto Ps = P.slice(b0, nb);
                      ew(dims(Ps), cuda_kernels::ToColMajorF{cuda_kernels::cmref(Ps), W, p, r}, "qr_to_col_major");
                      auto h = cusolver();
                      for (std::int64_t b = 0; b < nb; ++b) {
                        float* Wb = W + b * p * r;
                        float* tb = tau + b * kk;
                        DION_CUSOLVER_CHECK(cusolverDnSgeqrf(h, static_cast<int>(p), static_cast<int>(r), Wb,
                                                            static_cast<int>(p), tb, work, lwork_q_, dev_info));
                        DION_CUSOLVER_CHECK(cusolverDnSorgqr(h, static_cast<int>(p), static_cast<int>(kk),
                                                            static_cast<int>(kk), Wb, static_cast<int>(p), tb, work,
                                                            lwork_q_, dev_info));
                      }
                      ew(dims(Ps), cuda_kernels::FromColMajorF{cuda_kernels::mref(Ps), W, p, r, kk},
                         "qr_from_col_major");
                    });
  }
  /// R (r×r) ← the R factor of the Householder QR of A (k×r, k ≥ r), per matrix (LAPACK signs).
  void qr_r(Mat<float, Space> A, Mat<float, Space> R) {
    const NoDefer nd{*this};
    const std::int64_t k = A.rows, r = A.cols;
    DION_CHECK(R.rows == r && R.cols == r && R.batch == A.batch, ShapeMismatch, "qr_r: R is ", R.rows, "x", R.cols,
               " for A ", k, "x", r);
    DION_CHECK(k >= r, InvalidArgument, "qr_r: A is ", k, "x", r, "; needs rows >= cols");
    if (A.batch <= 0 || r <= 0) return;
    check_int(k, "qr_r rows");
    if (opts_.own_qr_r) {
      qr_r_own(A, R);
      return;
    }
    if (!opts_.batched_qr) {
      qr_r_per_matrix(A, R);
      return;
    }
    for_sub_batches(A.batch, static_cast<std::size_t>(4 * (k * r + r) + 16) + 2 * kAlign, 0,
                    [&](std::int64_t b0, std::int64_t nb, char* scr) {
                      Carve cv{scr};
                      auto* W = cv.take<float>(static_cast<std::size_t>(nb * k * r));
                      auto* tau = cv.take<float>(static_cast<std::size_t>(nb * r));
                      auto** aptr = cv.take<float*>(static_cast<std::size_t>(nb));
                      auto** tptr = cv.take<float*>(static_cast<std::size_t>(nb));
                      const auto As = A.slice(b0, nb);
                      ew(dims(As), cuda_kernels::ToColMajorF{cuda_kernels::cmref(As), W, k, r}, "qr_to_col_major");
                      fill_ptrs(aptr, W, k * r, nb);
                      fill_ptrs(tptr, tau, r, nb);
                      int info = 0;
                      DION_CUBLAS_CHECK(cublasSgeqrfBatched(cublas(), static_cast<int>(k), static_cast<int>(r), aptr,
                                                            static_cast<int>(k), tptr, &info, static_cast<int>(nb)));
                      DION_CHECK(info == 0, CublasError, "cublasSgeqrfBatched: invalid parameter ", -info);
                      ew(cuda_kernels::Dims{nb, r, r},
                         cuda_kernels::ExtractRF{cuda_kernels::mref(R.slice(b0, nb)), W, k, r}, "qr_extract_r");
                    });
  }
  /// A ← U with A = Uᵀ·U (upper Cholesky, zeros below); info[b] = 0 on success, 1 on failure
  /// (cuSOLVER's devInfo, a non-finite entry or a diagonal ≤ 0), all on the device. One
  /// cusolverDnSpotrfBatched call: the row-major upper factor is the column-major lower one. On
  /// failure A holds cuSOLVER's partial factorization (the Eigen backend leaves A unchanged).
  void cholesky_upper(Mat<float, Space> A, int* info) {
    const NoDefer nd{*this};
    DION_CHECK(A.rows == A.cols, ShapeMismatch, "cholesky_upper: A is ", A.rows, "x", A.cols, ", not square");
    if (A.batch <= 0) return;
    const std::int64_t n = A.rows;
    if (n == 0) {
      cuda_kernels::set_flags<><<<grid1((A.batch + 255) / 256), 256, 0, stream_>>>(info, A.batch, 0);
      DION_CUDA_CHECK_LAUNCH("set_flags");
      return;
    }
    check_int(n, "cholesky_upper size");
    check_int(A.ld, "cholesky_upper ld");
    for_sub_batches(A.batch, 12 + kAlign, 0, [&](std::int64_t b0, std::int64_t nb, char* scr) {
      Carve cv{scr};
      auto** ptr = cv.take<float*>(static_cast<std::size_t>(nb));
      auto* dev_info = cv.take<int>(static_cast<std::size_t>(nb));
      const auto As = A.slice(b0, nb);
      fill_ptrs(ptr, As.data, A.batch_stride, nb);
      DION_CUSOLVER_CHECK(cusolverDnSpotrfBatched(cusolver(), CUBLAS_FILL_MODE_LOWER, static_cast<int>(n), ptr,
                                                  static_cast<int>(A.ld), dev_info, static_cast<int>(nb)));
      cuda_kernels::info_from_dev<><<<grid1((nb + 255) / 256), 256, 0, stream_>>>(dev_info, info + b0, nb);
      DION_CUDA_CHECK_LAUNCH("info_from_dev");
      ew(dims(As), cuda_kernels::CholPostF{cuda_kernels::mref(As), info + b0}, "cholesky_post");
    });
  }
  /// X ← X·U⁻¹ for upper-triangular U, per matrix: one cublasStrsmBatched call (column-major view:
  /// a left solve with the lower factor Uᵀ).
  void trsm_right_upper(Mat<float, Space> X, Mat<float, Space> U) {
    const NoDefer nd{*this};
    DION_CHECK(U.rows == X.cols && U.cols == X.cols && U.batch == X.batch, ShapeMismatch, "trsm_right_upper: U is ",
               U.rows, "x", U.cols, " for X ", X.rows, "x", X.cols);
    if (X.batch <= 0 || X.rows <= 0 || X.cols <= 0) return;
    check_int(X.rows, "trsm rows");
    check_int(X.cols, "trsm cols");
    check_int(X.ld, "trsm ld");
    check_int(U.ld, "trsm ld");
    for_sub_batches(X.batch, 16 + 2 * kAlign, 0, [&](std::int64_t b0, std::int64_t nb, char* scr) {
      Carve cv{scr};
      auto** uptr = cv.take<float*>(static_cast<std::size_t>(nb));
      auto** xptr = cv.take<float*>(static_cast<std::size_t>(nb));
      fill_ptrs(uptr, U.data + b0 * U.batch_stride, U.batch_stride, nb);
      fill_ptrs(xptr, X.data + b0 * X.batch_stride, X.batch_stride, nb);
      const float one = 1.0f;
      DION_CUBLAS_CHECK(cublasStrsmBatched(cublas(), CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N,
                                           CUBLAS_DIAG_NON_UNIT, static_cast<int>(X.cols), static_cast<int>(X.rows),
                                           &one, uptr, static_cast<int>(U.ld), xptr, static_cast<int>(X.ld),
                                           static_cast<int>(nb)));
    });
  }
  /// flags[b] ← 1 where max |Q_bᵀQ_b − I| > tol (or is NaN); never cleared. QᵀQ in plain fp32.
  void orthogonality_check(Mat<float, Space> Q, float tol, int* flags) {
    const NoDefer nd{*this};
    if (Q.batch <= 0 || Q.cols <= 0) return;
    const std::int64_t r = Q.cols;
    for_sub_batches(Q.batch, static_cast<std::size_t>(4 * r * r), 0, [&](std::int64_t b0, std::int64_t nb, char* scr) {
      auto G = packed<float, Space>(reinterpret_cast<float*>(scr), nb, r, r);
      gemm_impl(Op::T, Op::N, 1.0f, Q.slice(b0, nb), Q.slice(b0, nb), 0.0f, G, false);
      ew(cuda_kernels::Dims{nb, r, r}, cuda_kernels::OrthCheckF{cuda_kernels::cmref(G), tol, flags + b0},
         "orthogonality_check");
    });
  }

  // ---------------------------------------------------------------- random
  /// out(b, i, j) ← stddev · N(0,1) of the counter-based generator (core/random.hpp): the host's
  /// With `stream_step` (a counter in device memory, e.g. a step count) the stream is
  /// mix64(stream, *stream_step), so a captured graph draws new numbers at each replay.
  /// numbers up to the last bits of logf / cosf.
  template <class T>
  void randn(Mat<T, Space> out, std::uint64_t seed, std::uint64_t stream, std::int64_t row0, std::int64_t col0,
             std::int64_t global_cols, float stddev, const float* stream_step = nullptr) {
    const NoDefer nd{*this};
    ew(dims(out),
       cuda_kernels::RandnF<T>{cuda_kernels::mref(out), seed, stream, row0, col0, global_cols, stddev, stream_step},
       "randn");
  }

 private:
  static constexpr std::size_t kInlineCopyMax = std::size_t{64} << 10;
  static constexpr std::size_t kAlign = 256;

  struct CapturedCopy {
    const void* src;
    void* pinned;
    std::size_t bytes;
  };
  static void CUDART_CB run_captured_copy(void* p) {
    const auto* c = static_cast<const CapturedCopy*>(p);
    std::memcpy(c->pinned, c->src, c->bytes);
  }

  /// Bump carving of the scratch inside one op (256-byte aligned pieces).
  struct Carve {
    char* base;
    std::size_t off = 0;
    template <class T>
    T* take(std::size_t n) {
      off = (off + kAlign - 1) / kAlign * kAlign;
      T* p = reinterpret_cast<T*>(base + off);
      off += n * sizeof(T);
      return p;
    }
  };

  static std::size_t per_matrix_bytes(std::int64_t batch, std::int64_t per) {
    return static_cast<std::size_t>(batch) * static_cast<std::size_t>(std::max<std::int64_t>(per, 1)) + 2 * kAlign;
  }
  std::size_t qr_q_fixed_bytes(std::int64_t p, std::int64_t r) {
    const std::int64_t kk = std::min(p, r);
    int l1 = 0, l2 = 0;
    auto* any = static_cast<float*>(scratch_.data());
    DION_CUSOLVER_CHECK(cusolverDnSgeqrf_bufferSize(cusolver(), static_cast<int>(p), static_cast<int>(r), any,
                                                    static_cast<int>(p), &l1));
    DION_CUSOLVER_CHECK(cusolverDnSorgqr_bufferSize(cusolver(), static_cast<int>(p), static_cast<int>(kk),
                                                    static_cast<int>(kk), any, static_cast<int>(p), any, &l2));
    lwork_q_ = std::max({l1, l2, 1});
    return static_cast<std::size_t>(lwork_q_) * 4 + 2 * kAlign + 16;
  }
  void qr_r_per_matrix(Mat<float, Space> A, Mat<float, Space> R) {
    const std::int64_t k = A.rows, r = A.cols;
    int l1 = 0;
    DION_CUSOLVER_CHECK(cusolverDnSgeqrf_bufferSize(cusolver(), static_cast<int>(k), static_cast<int>(r),
                                                    static_cast<float*>(scratch_.data()), static_cast<int>(k), &l1));
    const std::size_t fixed = static_cast<std::size_t>(std::max(l1, 1)) * 4 + 2 * kAlign + 16;
    for_sub_batches(A.batch, static_cast<std::size_t>(4 * (k * r + r)) + 2 * kAlign, fixed,
                    [&](std::int64_t b0, std::int64_t nb, char* scr) {
                      Carve cv{scr};
                      auto* work = cv.take<float>(static_cast<std::size_t>(std::max(l1, 1)));
                      auto* dev_info = cv.take<int>(1);
                      auto* W = cv.take<float>(static_cast<std::size_t>(nb * k * r));
                      auto* tau = cv.take<float>(static_cast<std::size_t>(nb * r));
                      const auto As = A.slice(b0, nb);
                      ew(dims(As), cuda_kernels::ToColMajorF{cuda_kernels::cmref(As), W, k, r}, "qr_to_col_major");
                      for (std::int64_t b = 0; b < nb; ++b)
                        DION_CUSOLVER_CHECK(cusolverDnSgeqrf(cusolver(), static_cast<int>(k), static_cast<int>(r),
                                                            W + b * k * r, static_cast<int>(k), tau + b * r, work,
                                                            std::max(l1, 1), dev_info));
                      ew(cuda_kernels::Dims{nb, r, r},
                         cuda_kernels::ExtractRF{cuda_kernels::mref(R.slice(b0, nb)), W, k, r}, "qr_extract_r");
                    });
  }

  /// Dion's sketch QR: one block per matrix (kernels/factor.cuh), shared memory when k×r fits.
  void qr_r_own(Mat<float, Space> A, Mat<float, Space> R) {
    const std::int64_t k = A.rows, r = A.cols;
    check_int(r, "qr_r cols");
    const std::size_t smem = static_cast<std::size_t>(k + 1) * static_cast<std::size_t>(r) * 4;
    if (!opts_.own_qr_r_global && smem + 1024 > static_cast<std::size_t>(smem_optin_)) {
      qr_r_per_matrix(A, R);
      return;
    }
    if (smem + 1024 <= static_cast<std::size_t>(smem_optin_)) {
      cuda_kernels::qr_r_householder<true><<<grid1(A.batch), cuda_kernels::kQrThreads, smem, stream_>>>(
          cuda_kernels::cmref(A), cuda_kernels::mref(R), static_cast<int>(k), static_cast<int>(r), nullptr);
      DION_CUDA_CHECK_LAUNCH("qr_r_householder (shared)");
      return;
    }
    for_sub_batches(A.batch, static_cast<std::size_t>(4 * k * r), 0, [&](std::int64_t b0, std::int64_t nb, char* scr) {
      cuda_kernels::qr_r_householder<false><<<grid1(nb), cuda_kernels::kQrThreads, 0, stream_>>>(
          cuda_kernels::cmref(A.slice(b0, nb)), cuda_kernels::mref(R.slice(b0, nb)), static_cast<int>(k),
          static_cast<int>(r), reinterpret_cast<float*>(scr));
      DION_CUDA_CHECK_LAUNCH("qr_r_householder (global)");
    });
  }

  /// Blocks per side of the blocked symmetric product of side s (1: use a full GEMM).
  /// Block sizes tried: sym_block, then ¾ and ½ of it (multiples of 32 dividing s, at least two blocks).
  std::int64_t sym_blocks(std::int64_t s) const {
    const std::int64_t b0 = opts_.sym_block;
    if (b0 <= 0 || s < opts_.sym_min_dim) return 1;
    for (const std::int64_t bs : {b0, b0 * 3 / 4, b0 / 2})
      if (bs >= 32 && bs % 32 == 0 && s % bs == 0 && s / bs >= 2) return s / bs;
    return 1;
  }
  /// An upper bound of the block pairs of any side ≤ s (scratch sizing).
  std::int64_t sym_pairs(std::int64_t s) const {
    if (opts_.sym_block <= 0 || s < opts_.sym_min_dim) return 0;
    const std::int64_t nb = s / std::max<std::int64_t>(opts_.sym_block / 2, 32) + 1;
    return nb * (nb + 1) / 2;
  }
  /// C ← alpha·op(X)·op(X)ᵀ + beta·C, op(X) = Xᵀ if `tn`: the lower block triangle through one
  /// cublasGemmBatchedEx over (matrix, block pair), then the upper blocks mirrored from the lower.
  template <class T>
  void sym_product(bool tn, float alpha, Mat<T, Space> X, float beta, Mat<T, Space> C) {
    const std::int64_t s = C.rows, K = tn ? X.rows : X.cols;
    const std::int64_t nblk = sym_blocks(s), bs = s / nblk, npairs = nblk * (nblk + 1) / 2;
    if (C.batch <= 0) return;
    check_int(K, "gemm k");
    check_int(X.ld, "gemm ldx");
    check_int(C.ld, "gemm ldc");
    const cublasComputeType_t compute =
        std::is_same_v<T, float> && opts_.allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    for_sub_batches(C.batch, static_cast<std::size_t>(24 * npairs) + 3 * kAlign, 0,
                    [&](std::int64_t b0, std::int64_t nb, char* scr) {
      Carve cv{scr};
      const std::size_t n = static_cast<std::size_t>(nb * npairs);
      auto** pa = cv.take<const void*>(n);
      auto** pb = cv.take<const void*>(n);
      auto** pc = cv.take<void*>(n);
      const auto Xs = X.slice(b0, nb);
      const auto Cs = C.slice(b0, nb);
      cuda_kernels::sym_block_ptrs<T, T><<<grid1((static_cast<std::int64_t>(n) + 255) / 256), 256, 0, stream_>>>(
          Xs.data, X.ld, X.batch_stride, Cs.data, C.ld, C.batch_stride, bs, static_cast<int>(nblk), tn, nb, pa, pb, pc);
      DION_CUDA_CHECK_LAUNCH("sym_block_ptrs");
      // row-major C_IJ = A_I·B_Jᵀ (row blocks) or A_Iᵀ·B_J (column blocks); cuBLAS sees the
      // transposes (see gemm_impl): (op_B, op_A, n, m, k, B, A)
      const cublasOperation_t ob = tn ? CUBLAS_OP_N : CUBLAS_OP_T;
      const cublasOperation_t oa = tn ? CUBLAS_OP_T : CUBLAS_OP_N;
      DION_CUBLAS_CHECK(cublasGemmBatchedEx(cublas(), ob, oa, static_cast<int>(bs), static_cast<int>(bs),
                                            static_cast<int>(K), &alpha, pb, cuda_type<T>(), static_cast<int>(X.ld), pa,
                                            cuda_type<T>(), static_cast<int>(X.ld), &beta, pc, cuda_type<T>(),
                                            static_cast<int>(C.ld), static_cast<int>(n), compute, CUBLAS_GEMM_DEFAULT));
      const unsigned tiles = static_cast<unsigned>(s / 32);
      cuda_kernels::sym_mirror<T><<<dim3(tiles, tiles, static_cast<unsigned>(nb)), dim3(32, 8), 0, stream_>>>(
          Cs.data, C.ld, C.batch_stride, bs);
      DION_CUDA_CHECK_LAUNCH("sym_mirror");
    });
  }

  /// Run f(b0, nb, scratch) over batch slices that fit the scratch (`per` bytes per matrix plus
  /// `fixed`); grows the scratch (an allocation) only if not even one matrix fits.
  template <class F>
  void for_sub_batches(std::int64_t batch, std::size_t per, std::size_t fixed, F&& f) {
    per = std::max<std::size_t>(per, 1) + kAlign;  // each carved array may lose up to kAlign to alignment
    if (scratch_.bytes() < fixed + per) reserve_scratch(fixed + per);
    const std::int64_t fit = static_cast<std::int64_t>((scratch_.bytes() - fixed) / per);
    const std::int64_t nb_max = std::max<std::int64_t>(1, std::min(batch, fit));
    for (std::int64_t b0 = 0; b0 < batch; b0 += nb_max) f(b0, std::min(nb_max, batch - b0), static_cast<char*>(scratch_.data()));
  }

  /// ew() with the 4-wide path (kernels/elementwise.cuh) where the merged rows allow it: 16-byte
  /// fp32 / 8-byte bf16 accesses and all of a thread's loads in flight before its stores.
  template <class F>
  void ew_v(cuda_kernels::Dims d, const F& f, const char* what) {
    launch_ew(d, f, what, skip_, !d.empty() && d.rows == 1 && d.cols % 4 == 0 && f.vec_ok());
  }
  template <class F>
  void ew(cuda_kernels::Dims d, const F& f, const char* what) {
    launch_ew(d, f, what, skip_, false);
  }
  /// ew_v / ew of an op that may be merged with others of its kind inside a batch.
  template <class F>
  void ew_vb(cuda_kernels::Dims d, const F& f, const char* what) {
    const bool vec = !d.empty() && d.rows == 1 && d.cols % 4 == 0 && f.vec_ok();
    if (deferring()) defer_ew(d, f, vec);
    else launch_ew(d, f, what, skip_, vec);
  }
  template <class F>
  void ew_b(cuda_kernels::Dims d, const F& f, const char* what) {
    if (deferring()) defer_ew(d, f, false);
    else launch_ew(d, f, what, skip_, false);
  }
  template <class F>
  void launch_ew(cuda_kernels::Dims d, const F& f, const char* what, const int* skip, bool vec) {
    if (d.empty()) return;
    if (vec) {
      if constexpr (cuda_kernels::HasVec4<F>) {
        cuda_kernels::ew_vec4_kernel<F><<<thread_grid(d.batch * (d.cols / 4)), cuda_kernels::kThreads, 0, stream_>>>(
            d, f, skip);
        DION_CUDA_CHECK_LAUNCH(what);
        return;
      }
    }
    cuda_kernels::ew_kernel<F><<<cuda_kernels::ew_grid(d, sms_), cuda_kernels::kThreads, 0, stream_>>>(
        d, cuda_kernels::tiles_of(d.cols), f, skip);
    DION_CUDA_CHECK_LAUNCH(what);
  }

  // ---------------------------------------------------------------- batching internals
  /// A kind of pending work: element-wise ops of one functor type (a MultiEw in `buf`) or GEMMs of
  /// one signature (a GemmBatch in `buf`).
  struct Pending {
    const void* tag = nullptr;
    void (*flush)(CudaBackend&, Pending&) = nullptr;
    alignas(16) unsigned char buf[4096];
  };
  static constexpr int kMaxKinds = 8;
  static constexpr int kMaxGemm = 160;  // 3 pointer arrays of 160 fit one inline upload (3968 bytes)
  static constexpr std::size_t kGemmPtrBytes = 4096;
  struct GemmBatch {
    cublasOperation_t oa, ob;
    int m, n, k, lda, ldb, ldc;
    float alpha, beta;
    cudaDataType_t ta, tc;
    cublasComputeType_t compute;
    int count;
    const void* a[kMaxGemm];
    const void* b[kMaxGemm];
    void* c[kMaxGemm];
    bool same_key(const GemmBatch& o) const {
      return oa == o.oa && ob == o.ob && m == o.m && n == o.n && k == o.k && lda == o.lda && ldb == o.ldb &&
             ldc == o.ldc && alpha == o.alpha && beta == o.beta && ta == o.ta && tc == o.tc && compute == o.compute;
    }
  };
  static_assert(sizeof(GemmBatch) <= sizeof(Pending::buf));
  template <class F>
  static inline const char kind_tag = 0;
  static inline const char gemm_tag = 0;

  /// Any op that cannot be merged: launches what is pending first, and keeps the ops it calls
  /// internally from being deferred behind its own launches.
  struct NoDefer {
    CudaBackend& b;
    explicit NoDefer(CudaBackend& be) : b(be) {
      if (b.npend_ > 0) b.flush_pending();
      ++b.suspend_;
    }
    ~NoDefer() { --b.suspend_; }
    NoDefer(const NoDefer&) = delete;
    NoDefer& operator=(const NoDefer&) = delete;
  };
  bool deferring() const noexcept { return batch_depth_ > 0 && suspend_ == 0; }

  Pending& new_kind(const void* tag, void (*flush)(CudaBackend&, Pending&)) {
    if (npend_ == kMaxKinds) flush_pending();
    Pending& p = (*pend_)[static_cast<std::size_t>(npend_++)];
    p.tag = tag;
    p.flush = flush;
    return p;
  }
  void flush_pending() {
    const int n = npend_;
    npend_ = 0;  // a failing launch leaves nothing half-pending
    for (int i = 0; i < n; ++i) {
      Pending& p = (*pend_)[static_cast<std::size_t>(i)];
      p.flush(*this, p);
    }
  }
  template <class F>
  void defer_ew(cuda_kernels::Dims d, const F& f, bool vec) {
    static_assert(std::is_trivially_copyable_v<F>, "multi-tensor functors travel by value");
    constexpr int K = cuda_kernels::multi_capacity<F>();
    using ME = cuda_kernels::MultiEw<F, K>;
    static_assert(sizeof(ME) <= sizeof(Pending::buf), "MultiEw does not fit the pending buffer");
    if (d.empty()) return;
    Pending* p = nullptr;
    for (int i = 0; i < npend_; ++i)
      if ((*pend_)[static_cast<std::size_t>(i)].tag == &kind_tag<F>) p = &(*pend_)[static_cast<std::size_t>(i)];
    if (!p) {
      p = &new_kind(&kind_tag<F>, &CudaBackend::flush_ew<F>);
      auto* me = new (p->buf) ME;
      me->n = 0;
      me->first[0] = 0;
    }
    auto& me = *std::launder(reinterpret_cast<ME*>(p->buf));
    const int t = me.n;
    me.f[t] = f;
    me.d[t] = d;
    std::int64_t blocks;
    if (vec) {
      me.ntiles[t] = 0;
      blocks = thread_grid(d.batch * (d.cols / 4));
    } else {
      me.ntiles[t] = cuda_kernels::tiles_of(d.cols);
      blocks = cuda_kernels::ew_grid(d, sms_);
    }
    me.first[t + 1] = me.first[t] + blocks;
    me.n = t + 1;
    if (me.n == K) flush_pending();
  }
  template <class F>
  static void flush_ew(CudaBackend& be, Pending& p) {
    constexpr int K = cuda_kernels::multi_capacity<F>();
    using ME = cuda_kernels::MultiEw<F, K>;
    const auto& me = *std::launder(reinterpret_cast<const ME*>(p.buf));
    if (me.n == 0) return;
    cuda_kernels::ew_multi_kernel<F, K><<<grid1(me.first[me.n]), cuda_kernels::kThreads, 0, be.stream_>>>(me, be.skip_);
    DION_CUDA_CHECK_LAUNCH("multi-tensor element-wise");
  }
  /// Queue C = alpha·op(A)·op(B) + beta·C (single matrices) with others of the same signature; false
  /// when it must run now (empty, k = 0, an aliased output: gemm_impl handles and reports those).
  template <class TA, class TB, class TC>
  bool defer_gemm(Op ta, Op tb, float alpha, Mat<TA, Space> A, Mat<TB, Space> B, float beta, Mat<TC, Space> C) {
    const auto m = ta == Op::N ? A.rows : A.cols, k = ta == Op::N ? A.cols : A.rows;
    const auto k2 = tb == Op::N ? B.rows : B.cols, n = tb == Op::N ? B.cols : B.rows;
    if (k != k2 || C.rows != m || C.cols != n || C.empty() || k == 0) return false;
    if (static_cast<const void*>(C.data) == static_cast<const void*>(A.data) ||
        static_cast<const void*>(C.data) == static_cast<const void*>(B.data))
      return false;
    const auto lim = static_cast<std::int64_t>(std::numeric_limits<int>::max());
    if (m > lim || n > lim || k > lim || A.ld > lim || B.ld > lim || C.ld > lim) return false;
    GemmBatch key;
    // row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ (see gemm_impl)
    key.oa = ta == Op::N ? CUBLAS_OP_N : CUBLAS_OP_T;
    key.ob = tb == Op::N ? CUBLAS_OP_N : CUBLAS_OP_T;
    key.m = static_cast<int>(m);
    key.n = static_cast<int>(n);
    key.k = static_cast<int>(k);
    key.lda = static_cast<int>(A.ld);
    key.ldb = static_cast<int>(B.ld);
    key.ldc = static_cast<int>(C.ld);
    key.alpha = alpha;
    key.beta = beta;
    key.ta = cuda_type<TA>();
    key.tc = cuda_type<TC>();
    key.compute = std::is_same_v<TA, float> && opts_.allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    GemmBatch* g = nullptr;
    for (int i = 0; i < npend_ && !g; ++i) {
      Pending& p = (*pend_)[static_cast<std::size_t>(i)];
      if (p.tag != &gemm_tag) continue;
      auto* cand = std::launder(reinterpret_cast<GemmBatch*>(p.buf));
      if (cand->same_key(key)) g = cand;
    }
    if (!g) {
      Pending& p = new_kind(&gemm_tag, &CudaBackend::flush_gemm);
      g = new (p.buf) GemmBatch;
      *g = key;
      g->count = 0;
    }
    g->a[g->count] = A.data;
    g->b[g->count] = B.data;
    g->c[g->count] = C.data;
    if (++g->count == kMaxGemm) flush_pending();
    return true;
  }
  static void flush_gemm(CudaBackend& be, Pending& p) {
    const auto& g = *std::launder(reinterpret_cast<const GemmBatch*>(p.buf));
    const int n = g.count;
    if (n == 0) return;
    // the three pointer arrays travel as one kernel parameter (never predicated: stale pointers
    // would aim the GEMM at other matrices); stream order protects the region between calls
    cuda_kernels::InlineBytes ib;
    const std::size_t w = static_cast<std::size_t>(n) * sizeof(void*);
    std::memcpy(ib.b, g.a, w);
    std::memcpy(ib.b + w, g.b, w);
    std::memcpy(ib.b + 2 * w, g.c, w);
    auto* dev = static_cast<unsigned char*>(be.gemm_ptrs_.data());
    cuda_kernels::write_inline_bytes<><<<1, 256, 0, be.stream_>>>(dev, ib, static_cast<unsigned>(3 * w));
    DION_CUDA_CHECK_LAUNCH("write_inline_bytes (gemm pointers)");
    auto* const* pa = reinterpret_cast<const void* const*>(dev);
    auto* const* pb = reinterpret_cast<const void* const*>(dev + w);
    auto* const* pc = reinterpret_cast<void* const*>(dev + 2 * w);
    DION_CUBLAS_CHECK(cublasGemmBatchedEx(be.cublas(), g.ob, g.oa, g.n, g.m, g.k, &g.alpha, pb, g.ta, g.ldb, pa, g.ta,
                                          g.lda, &g.beta, pc, g.tc, g.ldc, n, g.compute, CUBLAS_GEMM_DEFAULT));
  }
  template <class T>
  void fill_ptrs(T** out, T* base, std::int64_t stride, std::int64_t n) {
    cuda_kernels::fill_ptrs<T><<<grid1((n + 255) / 256), 256, 0, stream_>>>(out, base, stride, n);
    DION_CUDA_CHECK_LAUNCH("fill_ptrs");
  }
  static unsigned grid1(std::int64_t blocks) {
    return static_cast<unsigned>(std::clamp<std::int64_t>(blocks, 1, std::numeric_limits<int>::max()));
  }
  unsigned thread_grid(std::int64_t threads) const {
    return static_cast<unsigned>(std::clamp<std::int64_t>((threads + cuda_kernels::kThreads - 1) / cuda_kernels::kThreads,
                                                          1, static_cast<std::int64_t>(sms_) * 32));
  }
  unsigned warp_grid(std::int64_t warps) const { return thread_grid(warps * 32); }

  template <class T>
  static cuda_kernels::Dims dims(const Mat<T, Space>& m) {
    return cuda_kernels::Dims{m.batch, m.rows, m.cols};
  }
  template <class T>
  static bool packed_layout(const Mat<T, Space>& m) {
    return m.ld == m.cols && (m.batch <= 1 || m.batch_stride == m.rows * m.cols);
  }
  template <class... M>
  static bool row_contig(const M&... m) {
    return ((m.ld == m.cols) && ...);
  }
  template <class T>
  static T to_elem(float v) {
    if constexpr (std::is_same_v<T, float>) return v;
    else return bf16(v);
  }
  template <class A, class B>
  static void check_same(const Mat<A, Space>& a, const Mat<B, Space>& b, const char* what) {
    DION_CHECK(a.batch == b.batch && a.rows == b.rows && a.cols == b.cols, ShapeMismatch, what, ": shapes (",
               a.batch, ", ", a.rows, ", ", a.cols, ") and (", b.batch, ", ", b.rows, ", ", b.cols, ") differ");
  }
  static void check_int(std::int64_t v, const char* what) {
    DION_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), NotSupported, "CudaBackend: ", what, " = ", v,
               " exceeds the 32-bit range of cuBLAS / cuSOLVER");
  }

  template <class T>
  static constexpr cudaDataType_t cuda_type() {
    return std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_16BF;
  }

  template <class TA, class TB, class TC>
  void gemm_impl(Op ta, Op tb, float alpha, Mat<TA, Space> A, Mat<TB, Space> B, float beta, Mat<TC, Space> C,
                 bool tf32) {
    const auto m = ta == Op::N ? A.rows : A.cols, k = ta == Op::N ? A.cols : A.rows;
    const auto k2 = tb == Op::N ? B.rows : B.cols, n = tb == Op::N ? B.cols : B.rows;
    DION_CHECK(k == k2 && C.rows == m && C.cols == n && A.batch == C.batch && B.batch == C.batch, ShapeMismatch,
               "gemm: op(A) ", m, "x", k, ", op(B) ", k2, "x", n, ", C ", C.rows, "x", C.cols, ", batches ", A.batch,
               "/", B.batch, "/", C.batch);
    DION_CHECK(static_cast<const void*>(C.data) != static_cast<const void*>(A.data) &&
                   static_cast<const void*>(C.data) != static_cast<const void*>(B.data),
               InvalidArgument, "gemm: the output aliases an input (cuBLAS computes out of place)");
    if (C.empty()) return;
    if (k == 0) {
      ew(cuda_kernels::merge_rows(dims(C), row_contig(C)), cuda_kernels::ScaleF<TC>{cuda_kernels::mref(C), beta},
         "gemm_k0");
      return;
    }
    check_int(m, "gemm m");
    check_int(n, "gemm n");
    check_int(k, "gemm k");
    check_int(A.ld, "gemm lda");
    check_int(B.ld, "gemm ldb");
    check_int(C.ld, "gemm ldc");
    check_int(C.batch, "gemm batch");
    const cublasComputeType_t compute =
        std::is_same_v<TA, float> && tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, and a row-major X read as
    // column-major is Xᵀ: so cuBLAS gets (op_B, op_A, n, m, k, B, A) with the same transpose flags.
    const cublasOperation_t oa = ta == Op::N ? CUBLAS_OP_N : CUBLAS_OP_T;
    const cublasOperation_t ob = tb == Op::N ? CUBLAS_OP_N : CUBLAS_OP_T;
    DION_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        cublas(), ob, oa, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha, B.data, cuda_type<TB>(),
        static_cast<int>(B.ld), static_cast<long long>(B.batch_stride), A.data, cuda_type<TA>(), static_cast<int>(A.ld),
        static_cast<long long>(A.batch_stride), &beta, C.data, cuda_type<TC>(), static_cast<int>(C.ld),
        static_cast<long long>(C.batch_stride), static_cast<int>(C.batch), compute, CUBLAS_GEMM_DEFAULT));
  }

  cublasHandle_t cublas() {
    if (!own_cublas_) {
      DION_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
      DION_CUBLAS_CHECK(cublasSetPointerMode(cublas_, CUBLAS_POINTER_MODE_HOST));
    }
    return cublas_;
  }
  cusolverDnHandle_t cusolver() {
    if (!own_cusolver_) DION_CUSOLVER_CHECK(cusolverDnSetStream(cusolver_, stream_));
    return cusolver_;
  }

  void release() noexcept {
    cudaStreamSynchronize(stream_);  // nothing in flight may still use our memory (errors ignored)
    if (own_cublas_ && cublas_) cublasDestroy(cublas_);
    if (own_cusolver_ && cusolver_) cusolverDnDestroy(cusolver_);
    cublas_ = nullptr;
    cusolver_ = nullptr;
    if (staging_) cudaFreeHost(staging_);
    staging_ = nullptr;
    scratch_ = RawBuffer();
    cublas_ws_ = RawBuffer();
    gemm_ptrs_ = RawBuffer();
  }

  cudaStream_t stream_ = nullptr;
  CudaBackendOptions opts_;
  const int* skip_ = nullptr;
  int batch_depth_ = 0;
  int suspend_ = 0;
  int npend_ = 0;
  std::unique_ptr<std::array<Pending, kMaxKinds>> pend_;
  RawBuffer gemm_ptrs_;
  cublasHandle_t cublas_ = nullptr;
  cusolverDnHandle_t cusolver_ = nullptr;
  bool own_cublas_ = true;
  bool own_cusolver_ = true;
  int sms_ = 132;
  int lwork_q_ = 1;
  int smem_optin_ = 0;
  RawBuffer cublas_ws_;
  RawBuffer scratch_;
  void* staging_ = nullptr;
  std::size_t staging_used_ = 0;
  std::deque<CapturedCopy> captured_;
  std::size_t allocations_ = 0;
};

static_assert(Backend<CudaBackend>, "CudaBackend must implement the whole Backend operation set");

}  // namespace dion
