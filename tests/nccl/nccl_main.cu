// main() of dion's NCCL test binary: MPI_Init, one GPU per rank (rank % visible devices), a
// non-blocking NCCL communicator over the world (the ncclUniqueId broadcast over MPI), Catch2 on
// every rank, then the failure counts MAX-reduced so every rank (and mpiexec) reports the same result.
// Exit 77 (skipped) on every rank when fewer GPUs are visible than ranks: NCCL refuses two ranks
// on one device. DION_REQUIRE_GPU=1 makes that a failure (the device machine sets it).
#define DION_CATCH_RUNNER
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "catch_compat.hpp"
#include "nccl/nccl_world.hpp"

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  auto& w = dion_nccl_test::world();
  MPI_Comm_rank(MPI_COMM_WORLD, &w.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &w.size);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  int fewest = devices;
  MPI_Allreduce(&devices, &fewest, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (fewest == 0 || (w.size > fewest && w.size > 1)) {
    // (several nodes with fewer GPUs each than ranks are not this binary's concern: ranks per node
    // must not exceed its GPUs; here every rank sees the same devices)
    const char* require = std::getenv("DION_REQUIRE_GPU");
    const bool required = require != nullptr && std::strcmp(require, "0") != 0 && *require != '\0';
    if (w.rank == 0)
      std::fprintf(stderr, "%s: %d rank(s) but %d GPU(s) visible (NCCL needs one GPU per rank)%s\n", argv[0], w.size,
                   fewest, required ? "; DION_REQUIRE_GPU is set: failing" : ": skipped (exit 77)");
    MPI_Finalize();
    return required ? 1 : 77;
  }
  int rc = 1;
  try {
    w.device = w.rank % devices;
    if (cudaSetDevice(w.device) != cudaSuccess || cudaStreamCreateWithFlags(&w.stream, cudaStreamNonBlocking) != cudaSuccess)
      throw std::runtime_error("cudaSetDevice / cudaStreamCreate failed");
    ncclUniqueId id;
    if (w.rank == 0) dion_nccl_test::nccl_ok(ncclGetUniqueId(&id), nullptr, "ncclGetUniqueId");
    MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclResult_t r = ncclCommInitRankConfig(&w.comm, w.size, id, w.rank, &config);
    dion_nccl_test::nccl_ok(r, w.comm, "ncclCommInitRankConfig");
    int version = 0;
    ncclGetVersion(&version);
    if (w.rank == 0) {
      cudaDeviceProp prop{};
      cudaGetDeviceProperties(&prop, w.device);
      std::printf("dion NCCL tests: %d rank(s), NCCL %d, %s\n", w.size, version, prop.name);
    }
    Catch::Session session;
    rc = session.applyCommandLine(argc, argv);
    if (rc == 0) rc = session.run();
    if (rc == 77) rc = 1;  // 77 failures must not read as "skipped"
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", w.rank, e.what());
    rc = 1;
  }
  int worst = 0;
  MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (w.comm) ncclCommDestroy(w.comm);
  if (w.stream) cudaStreamDestroy(w.stream);
  MPI_Finalize();
  return worst;
}
