// Typed errors. Every failure the library reports is a dion::Error (a std::runtime_error) carrying a
// std::error_code from dion's own category, so callers can catch one family or switch on the code.
// Messages name the field, the bad value and the allowed range (RELIABILITY.md §2).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>

namespace dion {

enum class errc {
  invalid_argument = 1,
  shape_mismatch,
  dtype_mismatch,
  device_mismatch,
  unsupported,
  non_finite,
  numerical_failure,
  config_mismatch,
  comm_failure,
  comm_timeout,
  comm_poisoned,
  checkpoint_corrupt,
  checkpoint_incompatible,
  io_error,
  cuda_error,
  internal,
};

namespace detail {
class ErrorCategory final : public std::error_category {
 public:
  const char* name() const noexcept override { return "dion"; }
  std::string message(int c) const override {
    switch (static_cast<errc>(c)) {
      case errc::invalid_argument: return "invalid argument";
      case errc::shape_mismatch: return "shape mismatch";
      case errc::dtype_mismatch: return "dtype mismatch";
      case errc::device_mismatch: return "device mismatch";
      case errc::unsupported: return "unsupported";
      case errc::non_finite: return "non-finite value";
      case errc::numerical_failure: return "numerical failure";
      case errc::config_mismatch: return "configuration mismatch across ranks";
      case errc::comm_failure: return "communication failure";
      case errc::comm_timeout: return "communication timeout";
      case errc::comm_poisoned: return "communicator poisoned by an earlier failure";
      case errc::checkpoint_corrupt: return "checkpoint corrupt";
      case errc::checkpoint_incompatible: return "checkpoint incompatible";
      case errc::io_error: return "I/O error";
      case errc::cuda_error: return "CUDA error";
      case errc::internal: return "internal error";
    }
    return "unknown dion error";
  }
};
}  // namespace detail

inline const std::error_category& error_category() noexcept {
  static const detail::ErrorCategory cat;
  return cat;
}
inline std::error_code make_error_code(errc e) noexcept { return {static_cast<int>(e), error_category()}; }

/// Root of every exception thrown by dion.
class Error : public std::runtime_error {
 public:
  Error(errc code, const std::string& what, int rank = -1)
      : std::runtime_error(what), code_(make_error_code(code)), rank_(rank) {}
  std::error_code code() const noexcept { return code_; }
  /// The rank that detected the problem, or -1 for a local (single-process) error.
  int rank() const noexcept { return rank_; }

 private:
  std::error_code code_;
  int rank_;
};

#define DION_DEFINE_ERROR(Name, Base, Code)                                                  \
  class Name : public Base {                                                                 \
   public:                                                                                   \
    explicit Name(const std::string& what, int rank = -1) : Base(Code, what, rank) {}         \
                                                                                             \
   protected:                                                                                \
    Name(errc c, const std::string& what, int rank) : Base(c, what, rank) {}                  \
  };

DION_DEFINE_ERROR(InvalidArgument, Error, errc::invalid_argument)
DION_DEFINE_ERROR(ShapeMismatch, Error, errc::shape_mismatch)
DION_DEFINE_ERROR(DtypeMismatch, Error, errc::dtype_mismatch)
DION_DEFINE_ERROR(DeviceMismatch, Error, errc::device_mismatch)
DION_DEFINE_ERROR(NotSupported, Error, errc::unsupported)
DION_DEFINE_ERROR(NonFinite, Error, errc::non_finite)
DION_DEFINE_ERROR(NumericalFailure, Error, errc::numerical_failure)
DION_DEFINE_ERROR(ConfigMismatch, Error, errc::config_mismatch)
DION_DEFINE_ERROR(CommError, Error, errc::comm_failure)
DION_DEFINE_ERROR(CommTimeout, CommError, errc::comm_timeout)
DION_DEFINE_ERROR(CommPoisoned, CommError, errc::comm_poisoned)
DION_DEFINE_ERROR(CheckpointError, Error, errc::checkpoint_corrupt)
DION_DEFINE_ERROR(IoError, Error, errc::io_error)
DION_DEFINE_ERROR(CudaError, Error, errc::cuda_error)
DION_DEFINE_ERROR(InternalError, Error, errc::internal)
#undef DION_DEFINE_ERROR

/// A checkpoint that is well formed but cannot be used here (version, optimizer, layout).
class CheckpointIncompatible : public CheckpointError {
 public:
  explicit CheckpointIncompatible(const std::string& what, int rank = -1)
      : CheckpointError(errc::checkpoint_incompatible, what, rank) {}
};
/// cuBLAS failures: a CudaError whose message names the cuBLAS API and status.
class CublasError : public CudaError {
 public:
  explicit CublasError(const std::string& what, int rank = -1) : CudaError(what, rank) {}
};
/// cuSOLVER failures (status or devInfo): a CudaError.
class CusolverError : public CudaError {
 public:
  explicit CusolverError(const std::string& what, int rank = -1) : CudaError(what, rank) {}
};
/// MPI failures: a CommError carrying MPI_Error_string's text.
class MpiError : public CommError {
 public:
  explicit MpiError(const std::string& what, int rank = -1) : CommError(what, rank) {}
};
/// NCCL failures: a CommError carrying ncclGetErrorString's text.
class NcclError : public CommError {
 public:
  explicit NcclError(const std::string& what, int rank = -1) : CommError(what, rank) {}
};

namespace detail {
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  os.precision(9);
  (os << ... << std::forward<Args>(args));
  return os.str();
}
}  // namespace detail

}  // namespace dion

template <>
struct std::is_error_code_enum<dion::errc> : std::true_type {};

/// Always-on check (never compiled out by NDEBUG): throws ErrType with a message built from the
/// remaining arguments, prefixed by the source location.
#define DION_CHECK(cond, ErrType, ...)                                                         \
  do {                                                                                         \
    if (!(cond)) throw ErrType(::dion::detail::concat(__VA_ARGS__));                          \
  } while (0)

#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
#if !defined(DION_ALLOW_FAST_MATH)
#error "dion: -ffast-math / -ffinite-math-only break NaN/Inf detection and the optimizers' guards. Compile without them (or define DION_ALLOW_FAST_MATH to accept wrong results on non-finite input)."
#endif
#endif
