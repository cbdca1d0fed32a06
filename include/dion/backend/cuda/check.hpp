// Checked calls into the CUDA runtime, cuBLAS and cuSOLVER. Every call the CUDA backend makes goes
// through one of the macros below; a failure throws dion::CudaError / CublasError / CusolverError
// naming the API call, the status (name and number) and the file:line of the call. The checks are
// never compiled out (DESIGN.md §4 rule 3).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cusolverDn.h>

#include <string>

#include "dion/core/error.hpp"

namespace dion::cuda_detail {

inline const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "CUBLAS_STATUS_<unknown>";
}

inline const char* cusolver_status_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED: return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: break;
  }
  return "CUSOLVER_STATUS_<other>";
}

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* call, const char* file, int line) {
  throw CudaError(detail::concat(call, " failed: ", cudaGetErrorName(e), " (", static_cast<int>(e), "): ",
                                 cudaGetErrorString(e), " at ", file, ":", line));
}
inline void check_cuda(cudaError_t e, const char* call, const char* file, int line) {
  if (e != cudaSuccess) throw_cuda(e, call, file, line);
}
inline void check_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw CublasError(detail::concat(call, " failed: ", cublas_status_name(s), " (", static_cast<int>(s), ") at ",
                                     file, ":", line));
}
inline void check_cusolver(cusolverStatus_t s, const char* call, const char* file, int line) {
  if (s != CUSOLVER_STATUS_SUCCESS)
    throw CusolverError(detail::concat(call, " failed: ", cusolver_status_name(s), " (", static_cast<int>(s),
                                       ") at ", file, ":", line));
}
/// After a kernel launch: a launch-configuration error is reported here (no synchronization).
inline void check_launch(const char* kernel, const char* file, int line) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw_cuda(e, kernel, file, line);
}

}  // namespace dion::cuda_detail

/// Checked CUDA runtime call: throws dion::CudaError("<call> failed: <status> ... at file:line").
#define DION_CUDA_CHECK(call) ::dion::cuda_detail::check_cuda((call), #call, __FILE__, __LINE__)
/// Checked cuBLAS call: throws dion::CublasError.
#define DION_CUBLAS_CHECK(call) ::dion::cuda_detail::check_cublas((call), #call, __FILE__, __LINE__)
/// Checked cuSOLVER call: throws dion::CusolverError.
#define DION_CUSOLVER_CHECK(call) ::dion::cuda_detail::check_cusolver((call), #call, __FILE__, __LINE__)
/// Checks the last kernel launch (configuration errors; no synchronization).
#define DION_CUDA_CHECK_LAUNCH(name) ::dion::cuda_detail::check_launch(name, __FILE__, __LINE__)
