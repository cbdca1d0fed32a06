// Opt-in module: dion::MpiComm (target dion::mpi). Include after or instead of dion/dion.hpp.
#pragma once

#if !__has_include(<mpi.h>)
#error "dion/mpi.hpp needs MPI (<mpi.h>): link the dion::mpi target (configure with DION_ENABLE_MPI=ON, Debian: libopenmpi-dev)"
#endif

#include "dion/comm/mpi.hpp"
#include "dion/dion.hpp"
