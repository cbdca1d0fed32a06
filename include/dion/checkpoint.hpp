// dion checkpoints: save / load of an optimizer's complete state (dion::checkpoint::save, load,
// save_bytes, load_bytes) and the safetensors reader and writer they use. Not included by
// dion/dion.hpp (it pulls in nlohmann/json); include it where checkpoints are written or read.
// Format, guarantees and the "own format" path: dion/checkpoint/checkpoint.hpp.
#pragma once

#include "dion/checkpoint/checkpoint.hpp"
#include "dion/checkpoint/safetensors.hpp"
