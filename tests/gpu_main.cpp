// main() of dion's GPU test binaries: exits 77 (ctest SKIP_RETURN_CODE) when no CUDA device is
// usable, so CI without a GPU reports them skipped. With DION_REQUIRE_GPU=1 in the environment a
// missing device is a failure instead (use it on the device machine).
#define DION_CATCH_RUNNER
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "catch_compat.hpp"

int main(int argc, char** argv) {
  int devices = 0;
  const cudaError_t err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    const char* require = std::getenv("DION_REQUIRE_GPU");
    const bool required = require != nullptr && std::strcmp(require, "0") != 0 && *require != '\0';
    std::fprintf(stderr, "%s: no usable CUDA device (%s)%s\n", argv[0],
                 err != cudaSuccess ? cudaGetErrorString(err) : "0 devices",
                 required ? "; DION_REQUIRE_GPU is set: failing" : ": skipped (exit 77)");
    return required ? 1 : 77;
  }
  Catch::Session session;
  int rc = session.applyCommandLine(argc, argv);
  if (rc != 0) return rc;
  rc = session.run();
  return rc == 77 ? 1 : rc;  // 77 failures must not read as "skipped"
}
