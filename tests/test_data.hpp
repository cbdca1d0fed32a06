// Where the tests find their data (golden cases, fixtures). The build defines DION_TEST_DATA_DIR as
// the absolute path of tests/data in the source tree; a binary carried to another machine (the GPU
// machine's copy of the work tree lives elsewhere) is pointed at it with the environment variable
// DION_TEST_DATA_DIR, or finds tests/data relative to the working directory (the repository root).
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>

namespace dion_test {

inline std::filesystem::path data_dir() {
  namespace fs = std::filesystem;
  if (const char* env = std::getenv("DION_TEST_DATA_DIR"); env != nullptr && *env != '\0') {
    return fs::path(env);
  }
#if defined(DION_TEST_DATA_DIR)
  if (std::error_code ec; fs::is_directory(DION_TEST_DATA_DIR, ec)) return fs::path(DION_TEST_DATA_DIR);
#endif
  return fs::path("tests") / "data";
}

/// data_path("golden/muon_2d_fp32.safetensors") -> <data dir>/golden/muon_2d_fp32.safetensors
inline std::filesystem::path data_path(std::string_view relative) { return data_dir() / relative; }

}  // namespace dion_test
