// dion: orthonormal optimizers for C++ (Muon, NorMuon, Dion, Dion2, NorDion2, Lion, AdamW).
// The single source of the library version; CMake parses the three numbers below.
#pragma once

#define DION_VERSION_MAJOR 0
#define DION_VERSION_MINOR 1
#define DION_VERSION_PATCH 0

namespace dion {
inline constexpr int version_major = DION_VERSION_MAJOR;
inline constexpr int version_minor = DION_VERSION_MINOR;
inline constexpr int version_patch = DION_VERSION_PATCH;
inline constexpr const char* version_string = "0.1.0";
}  // namespace dion
