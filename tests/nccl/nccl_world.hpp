// The NCCL world of dion's NCCL test binary (tests/nccl): one process per GPU, launched by mpiexec.
// nccl_main.cu creates it before Catch2 runs: MPI only starts the processes and hands out the
// ncclUniqueId; a non-blocking ncclComm_t over every rank and one non-blocking CUDA stream per rank,
// shared by the tests' CudaBackend and NcclComm (as a trainer would share them).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>

namespace dion_nccl_test {

struct World {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  int rank = 0, size = 1, device = 0;
};
inline World& world() {
  static World w;
  return w;
}

/// Throws on a NCCL error; polls a non-blocking communicator until the call has settled.
inline void nccl_ok(ncclResult_t r, ncclComm_t comm, const char* what) {
  while (r == ncclInProgress && comm != nullptr) {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
    ncclCommGetAsyncError(comm, &r);
  }
  if (r != ncclSuccess) throw std::runtime_error(std::string(what) + ": " + ncclGetErrorString(r));
}

/// A new non-blocking communicator over every rank of the world (collective), e.g. for a test
/// that aborts it.
inline ncclComm_t split_world() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t c = nullptr;
  nccl_ok(ncclCommSplit(world().comm, 0, world().rank, &c, &config), c, "ncclCommSplit");
  return c;
}

}  // namespace dion_nccl_test
