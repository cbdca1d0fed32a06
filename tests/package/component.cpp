// Links one dion component's usage requirements into a host program (tests/package/CMakeLists.txt):
// its headers must be found and its libraries must link.
#include <dion/version.hpp>

#include <cstdio>

#if defined(DION_WITH_NCCL)
#include <nccl.h>
#endif
#if defined(DION_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif
#if defined(DION_WITH_MPI)
#include <mpi.h>
#endif

int main() {
  int v = 0;
#if defined(DION_WITH_NCCL)
  ncclGetVersion(&v);
  std::printf("nccl %d\n", v);
#endif
#if defined(DION_WITH_CUDA)
  cudaRuntimeGetVersion(&v);
  std::printf("cudart %d\n", v);
#endif
#if defined(DION_WITH_MPI)
  MPI_Initialized(&v);
  std::printf("mpi initialized %d\n", v);
#endif
  std::printf("dion %s\n", dion::version_string);
  return 0;
}
