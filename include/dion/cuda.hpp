// dion's CUDA module: dion::CudaBackend (cuBLAS, cuSOLVER and dion's own kernels) and the optimizers
// over it. Opt-in: include it from a .cu file compiled by nvcc (-std=c++20), and link dion::cuda.
// dion/dion.hpp never includes CUDA headers; include both to use the Eigen backend next to this one.
//
//   #include <dion/cuda.hpp>
//   dion::CudaBackend be{stream};
//   dion::Muon<dion::CudaBackend> opt{be, {.lr = 0.02f}};
#pragma once

#if !defined(__CUDACC__)
#error "dion/cuda.hpp holds CUDA kernels: include it from a .cu file compiled by nvcc (target dion::cuda)"
#endif

#include "dion/version.hpp"
#include "dion/core/bf16.hpp"
#include "dion/core/error.hpp"
#include "dion/core/options.hpp"
#include "dion/core/view.hpp"
#include "dion/precision/precision.hpp"
#include "dion/comm/single.hpp"
#include "dion/comm/mesh.hpp"
#include "dion/backend/cuda/cuda_backend.hpp"
#include "dion/optimizers.hpp"
