// The backend-generic test bodies of tests/unit/test_dion.cpp, run on the CUDA backend (dion_tests runs them on Eigen)
// (same source; TEMPLATE_TEST_CASE over DION_TEST_BACKENDS).
#define DION_TEST_BACKENDS dion::CudaBackend
#include "backend_env_cuda.hpp"
#include "unit/test_dion.cpp"
