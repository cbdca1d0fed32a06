// The policy concepts. A Backend is a stateful executor with a fixed operation set (memory, batched
// products, reductions, fused element-wise kernels, factorizations, random numbers); the generic
// algorithms are written against it, and EigenBackend / CudaBackend implement all of it. The concept
// checks the operation set on float operands; the bf16 overloads are exercised by the tests.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "dion/comm/single.hpp"
#include "dion/core/view.hpp"

namespace dion {

/// Transpose flag of a matrix operand.
enum class Op : std::uint8_t { N, T };

template <class B>
concept Backend = requires(B& b, typename B::RawBuffer& buf, Mat<float, typename B::Space> m, float* f,
                           const float* cf, int* flags, std::int64_t* idx) {
  typename B::Space;
  typename B::RawBuffer;
  { B::host_visible } -> std::convertible_to<bool>;
  { b.alloc_bytes(std::size_t{}) } -> std::same_as<typename B::RawBuffer>;
  { buf.data() } -> std::convertible_to<void*>;
  { buf.bytes() } -> std::convertible_to<std::size_t>;
  b.copy_to_host(cf, f, std::size_t{});
  b.copy_from_host(cf, f, std::size_t{});
  b.synchronize();
  b.copy(m, m);
  b.fill(m, 0.0f);
  b.gemm(Op{}, Op{}, 1.0f, m, m, 0.0f, m);
  b.gram(Op{}, m, m);
  b.sym_poly(m, 1.0f, 1.0f, m);
  b.frob_norms(m, f);
  b.scale_by_norm(m, cf, 1.0f, 1.0f);
  b.nonfinite_flag(m, flags);
  b.muon_momentum(m, m, m, 1.0f, true);
  b.apply_update(m, m, cf, cf, 1.0f, true);
  b.normuon_update(m, m, m, 1.0f, 1.0f, cf, cf, 1.0f, true);
  b.select_topk(m, true, std::int64_t{}, idx);
  b.gather_slices(m, idx, std::int64_t{}, true, 1.0f, m);
  b.dion2_update(m, m, idx, std::int64_t{}, true, cf, cf, 1.0f);
  b.nordion2_update(m, m, m, idx, std::int64_t{}, 1.0f, cf, cf, 1.0f);
  b.lion_update(m, m, m, cf, cf, 1.0f, 1.0f, true);
  b.adamw_update(m, m, m, m, f, true, cf, cf, 1.0f, 1.0f, 1.0f, true);
  b.add_into(m, m);
  b.all_zero_flags(m, flags);
  b.dion_guard(m, m, m, flags);
  b.col_normalize(m, 1.0f, m);
  b.copy_if_flag(flags, 0, m, m);
  b.qr_q(m);
  b.qr_r(m, m);
  b.cholesky_upper(m, flags);
  b.trsm_right_upper(m, m);
  b.orthogonality_check(m, 1.0f, flags);
  b.randn(m, std::uint64_t{}, std::uint64_t{}, std::int64_t{}, std::int64_t{}, std::int64_t{}, 1.0f);
  // the step predicate (a skipped step decided in backend memory, no host round trip)
  b.set_skip(static_cast<const int*>(flags));
  b.zero_if_skip(m);
  b.accumulate_flag(static_cast<const int*>(flags), idx);
};

/// Optional: a backend that can merge the independent operations issued between begin_batch() and
/// end_batch() into fewer launches (CudaBackend: multi-tensor element-wise kernels and pointer-array
/// GEMMs). Use it through detail::BatchScope.
template <class B>
concept BatchingBackend = requires(B& b) {
  b.begin_batch();
  b.end_batch();
  b.abandon_batch();
};

/// A Communicator spans the ranks of one mesh dimension. `Space` is the memory its collectives can
/// touch (`void`: any, as for SingleProcess); an optimizer checks at compile time that it matches its
/// backend's memory, so an NCCL communicator cannot be paired with the Eigen backend.
template <class C>
concept Communicator = requires(C& c, bool ok, std::uint64_t h) {
  typename C::Space;
  { C::distributed } -> std::convertible_to<bool>;
  { c.rank() } -> std::convertible_to<int>;
  { c.size() } -> std::convertible_to<int>;
  { c.all_agree(ok) } -> std::convertible_to<bool>;
  { c.same_everywhere(h) } -> std::convertible_to<bool>;
};

/// A communicator that really spans several ranks (MpiComm, NcclComm): the collectives the
/// distributed variants issue. Buffers live in the communicator's `Space`; counts are elements.
template <class C>
concept CollectiveCommunicator =
    Communicator<C> && requires(C& c, float* f, const float* cf, std::size_t n, const std::vector<int>& v) {
      c.all_reduce(f, n, ReduceOp::sum);
      c.broadcast(f, n, 0);
      c.all_gather(cf, f, n);
      c.all_gather_inplace(f, n);
      c.all_to_all_v(cf, v, v, f, v, v);
    };

/// True when communicator C can work on memory of `Space`.
template <class C, class Space>
inline constexpr bool comm_reaches_v = std::is_void_v<typename C::Space> || std::is_same_v<typename C::Space, Space>;

}  // namespace dion
