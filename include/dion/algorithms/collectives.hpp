// Small collective helpers shared by the distributed variants (SPEC §2): averaging a strided
// matrix batch in place, and the slice exchange of row- or column-sharded matrices (unshard to an
// owner rank, reshard back) over a personalized all-to-all with exact per-rank slice counts (uneven
// and empty shards need no padding: each rank sends exactly the rows or columns it holds).
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "dion/comm/single.hpp"
#include "dion/core/bf16.hpp"
#include "dion/core/error.hpp"
#include "dion/core/view.hpp"

namespace dion::detail {

/// True when communicator C reduces bf16 buffers itself (NCCL); otherwise bf16 is averaged in fp32.
template <class C>
inline constexpr bool comm_reduces_bf16_v = requires { requires C::reduces_bf16; };

/// Collectives on small host buffers (agreement data): a device communicator stages them
/// (host_all_reduce / host_all_gather); a host communicator (MPI) reduces them directly.
template <class Comm, class T>
void host_all_reduce(Comm& c, T* v, std::size_t n, ReduceOp op) {
  if constexpr (requires { c.host_all_reduce(v, n, op); }) c.host_all_reduce(v, n, op);
  else c.all_reduce(v, n, op);
}
template <class Comm, class T>
void host_all_gather(Comm& c, const T* send, T* recv, std::size_t count) {
  if constexpr (requires { c.host_all_gather(send, recv, count); }) c.host_all_gather(send, recv, count);
  else c.all_gather(send, recv, count);
}
template <class Comm>
void reserve_host_staging(Comm& c, std::size_t bytes) {
  if constexpr (requires { c.reserve_host_staging(bytes); }) c.reserve_host_staging(bytes);
}

/// m ← reduction (sum or mean) over the communicator's ranks of m (every matrix of the batch), in
/// place; bf16 is reduced in fp32 where the communicator cannot reduce it.
template <class Comm, class T, class Space>
void reduce_in_place(Comm& comm, Mat<T, Space> m, ReduceOp op) {
  if (m.empty() || comm.size() == 1) return;
  auto reduce = [&](T* p, std::int64_t n) {
    if constexpr (std::is_same_v<T, bf16> && !comm_reduces_bf16_v<Comm>) {
      static_assert(std::is_same_v<Space, HostSpace>, "bf16 averaging in fp32 needs host memory");
      std::vector<float> f(static_cast<std::size_t>(n));
      for (std::int64_t i = 0; i < n; ++i) f[static_cast<std::size_t>(i)] = static_cast<float>(p[i]);
      comm.all_reduce(f.data(), f.size(), op);
      for (std::int64_t i = 0; i < n; ++i) p[i] = bf16(f[static_cast<std::size_t>(i)]);
    } else {
      comm.all_reduce(p, static_cast<std::size_t>(n), op);
    }
  };
  if (m.contiguous()) {
    reduce(m.data, m.size());
    return;
  }
  for (std::int64_t b = 0; b < m.batch; ++b) {
    if (m.ld == m.cols) {
      reduce(m.data + b * m.batch_stride, m.rows * m.cols);
      continue;
    }
    for (std::int64_t i = 0; i < m.rows; ++i) reduce(m.data + b * m.batch_stride + i * m.ld, m.cols);
  }
}
/// m ← mean over the communicator's ranks of m, in place.
template <class Comm, class T, class Space>
void average_in_place(Comm& comm, Mat<T, Space> m) {
  reduce_in_place(comm, m, ReduceOp::avg);
}

/// The slice exchange of a batch of N matrices sharded along rows or columns over W ranks (SPEC
/// §0.3 case A, comm_dim −2 or −1). The matrices are owned in contiguous blocks: rank j owns
/// [j·per, min((j+1)·per, N)), per = ⌈N/W⌉. Rank i contributes c[i] slices of every matrix (its
/// shard, or its selected slices), each slice spanning `other` elements along the unsharded dim;
/// the owner assembles them in rank order into whole matrices of R = Σ c[i] slices: R × other
/// (rows) or other × R (columns), packed, so a column-sharded matrix is assembled in the layout
/// one process holds it in. A local contribution is packed: c[me] × other (rows) or other × c[me]
/// (columns). Messages carry whole packed contributions; only the owner's assembly copies differ.
struct SliceExchange {
  int W = 1, me = 0;
  std::int64_t N = 0, per = 0, other = 0;
  bool rows = true;                ///< slices are rows (dim −2) or columns (dim −1)
  std::vector<std::int64_t> c;     ///< slices contributed by each rank (per matrix)
  std::vector<std::int64_t> at0;   ///< first assembled slice of each rank's contribution
  std::int64_t R = 0;              ///< slices of an assembled matrix

  SliceExchange(int w, int rank, std::int64_t n, std::int64_t other_len, std::vector<std::int64_t> contrib,
                bool by_rows = true)
      : W(w), me(rank), N(n), per((n + w - 1) / w), other(other_len), rows(by_rows), c(std::move(contrib)) {
    at0.resize(static_cast<std::size_t>(W));
    for (int i = 0; i < W; ++i) {
      at0[static_cast<std::size_t>(i)] = R;
      R += c[static_cast<std::size_t>(i)];
    }
  }
  /// Matrices owned by rank j.
  std::int64_t owned(int j) const {
    const std::int64_t lo = std::min<std::int64_t>(static_cast<std::int64_t>(j) * per, N);
    return std::min<std::int64_t>(lo + per, N) - lo;
  }
  std::int64_t first_owned(int j) const { return std::min<std::int64_t>(static_cast<std::int64_t>(j) * per, N); }
  static int as_count(std::int64_t v) {
    DION_CHECK(v <= INT32_MAX, InvalidArgument, "slice exchange: a message of ", v,
               " elements exceeds the communicator's int range; lower workspace_limit_bytes");
    return static_cast<int>(v);
  }
  /// `n` packed contributions of `s` slices each, starting at p.
  template <class T, class Space>
  Mat<T, Space> contribution(T* p, std::int64_t n, std::int64_t s) const {
    return rows ? packed<T, Space>(p, n, s, other) : packed<T, Space>(p, n, other, s);
  }
  /// Rank i's slices inside `n` assembled matrices starting at p (a strided view).
  template <class T, class Space>
  Mat<T, Space> slot_of(T* p, std::int64_t n, int i) const {
    const std::int64_t ci = c[static_cast<std::size_t>(i)], a = at0[static_cast<std::size_t>(i)];
    if (rows) return Mat<T, Space>{p + a * other, n, ci, other, other, R * other};
    return Mat<T, Space>{p + a, n, other, ci, R, other * R};
  }

  /// local (N contributions of c[me] slices, packed) → assembled (owned(me) whole matrices,
  /// packed). `stage` holds owned(me)·R·other elements.
  template <class Comm, class Be, class T, class Space>
  void unshard(Comm& comm, Be& be, const T* local, T* stage, T* assembled) const {
    std::vector<int> sc(static_cast<std::size_t>(W)), sd(sc), rc(sc), rd(sc);
    const std::int64_t mine = c[static_cast<std::size_t>(me)], n_me = owned(me);
    std::int64_t at = 0;
    for (int j = 0; j < W; ++j) {
      sc[static_cast<std::size_t>(j)] = as_count(owned(j) * mine * other);
      sd[static_cast<std::size_t>(j)] = as_count(first_owned(j) * mine * other);
      rc[static_cast<std::size_t>(j)] = as_count(n_me * c[static_cast<std::size_t>(j)] * other);
      rd[static_cast<std::size_t>(j)] = as_count(at);
      at += n_me * c[static_cast<std::size_t>(j)] * other;
    }
    comm.all_to_all_v(local, sc, sd, stage, rc, rd);
    for (int i = 0; i < W; ++i) {
      const std::int64_t ci = c[static_cast<std::size_t>(i)];
      if (ci == 0 || n_me == 0 || other == 0) continue;
      be.copy(contribution<T, Space>(stage + rd[static_cast<std::size_t>(i)], n_me, ci),
              slot_of<T, Space>(assembled, n_me, i));
    }
  }
  /// assembled (owned(me) whole matrices) → local (N contributions of c[me] slices): every rank
  /// gets its slices back.
  template <class Comm, class Be, class T, class Space>
  void reshard(Comm& comm, Be& be, const T* assembled, T* stage, T* local) const {
    std::vector<int> sc(static_cast<std::size_t>(W)), sd(sc), rc(sc), rd(sc);
    const std::int64_t mine = c[static_cast<std::size_t>(me)], n_me = owned(me);
    std::int64_t at = 0;
    for (int i = 0; i < W; ++i) {
      const std::int64_t ci = c[static_cast<std::size_t>(i)];
      sc[static_cast<std::size_t>(i)] = as_count(n_me * ci * other);
      sd[static_cast<std::size_t>(i)] = as_count(at);
      if (ci > 0 && n_me > 0 && other > 0)
        be.copy(slot_of<T, Space>(const_cast<T*>(assembled), n_me, i), contribution<T, Space>(stage + at, n_me, ci));
      at += n_me * ci * other;
      rc[static_cast<std::size_t>(i)] = as_count(owned(i) * mine * other);
      rd[static_cast<std::size_t>(i)] = as_count(first_owned(i) * mine * other);
    }
    comm.all_to_all_v(static_cast<const T*>(stage), sc, sd, local, rc, rd);
  }
};

}  // namespace dion::detail
