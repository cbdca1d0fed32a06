// Opt-in module: dion::NcclComm (target dion::nccl), collectives over the user's ncclComm_t and CUDA
// stream, for dion::CudaBackend. Include it next to dion/cuda.hpp:
//
//   #include <dion/cuda.hpp>
//   #include <dion/nccl.hpp>
//   dion::CudaBackend be{stream};
//   dion::NcclComm comm{nccl_comm, stream};   // borrowed; create nccl_comm with config.blocking = 0
//   dion::Muon<dion::CudaBackend, dion::NcclComm> opt{be, dion::Mesh<dion::NcclComm>{.replicate = &comm}, {}};
#pragma once

#if !__has_include(<nccl.h>) || !__has_include(<cuda_runtime.h>)
#error "dion/nccl.hpp needs NCCL and the CUDA runtime (<nccl.h>, <cuda_runtime.h>): link the dion::nccl target (configure with DION_ENABLE_NCCL=ON)"
#endif

#include "dion/comm/mesh.hpp"
#include "dion/comm/nccl.hpp"
