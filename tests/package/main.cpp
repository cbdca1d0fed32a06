// A consumer program: includes dion's public headers the way a user does and prints the version.
#if __has_include(<dion/dion.hpp>)
#include <dion/dion.hpp>
#endif
#include <dion/core/view.hpp>
#include <dion/version.hpp>

#include <cstdio>

#if defined(DION_WITH_MPI)
#include <mpi.h>
#endif
#if defined(DION_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

int main() {
  static_assert(__cplusplus >= 202002L, "dion::dion must request C++20");
  std::printf("dion %d.%d.%d (%s)\n", dion::version_major, dion::version_minor, dion::version_patch,
              dion::version_string);
  return 0;
}
