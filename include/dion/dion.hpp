// dion: orthonormal optimizers for C++ training programs.
// Umbrella header for CPU use: core, the Eigen backend, the single-process communicator and every
// optimizer. It includes no CUDA, MPI or NCCL header; those live in dion/cuda.hpp, dion/mpi.hpp and
// dion/nccl.hpp.
#pragma once

#include "dion/version.hpp"
#include "dion/core/bf16.hpp"
#include "dion/core/error.hpp"
#include "dion/core/options.hpp"
#include "dion/core/view.hpp"
#include "dion/precision/precision.hpp"
#include "dion/comm/single.hpp"
#include "dion/comm/mesh.hpp"
#include "dion/backend/eigen/eigen_backend.hpp"
#include "dion/optimizers.hpp"
