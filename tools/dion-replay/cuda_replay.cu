// dion-replay's CUDA backend (--backend cuda): the definition of dion::replay::replay_cuda.
#include "cuda_replay.hpp"
