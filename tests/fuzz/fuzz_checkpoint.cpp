// libFuzzer target for the checkpoint parser (RELIABILITY C9, C10): the safetensors header parser,
// a rank file's metadata and checksums, the manifest parser, and a full load_bytes() of the input
// into two small optimizers (Muon and Dion, each with an AdamW and a Lion group), i.e. exactly the
// code that dion::checkpoint::load() runs on untrusted bytes. Any dion::Error is an accepted outcome;
// a crash, a sanitizer report, any other exception, or an allocation over -rss_limit_mb is a bug.
//
//   clang++ -g -O1 -fsanitize=fuzzer,address,undefined ...   (scripts/fuzz builds and runs it)
//   ./fuzz_checkpoint -rss_limit_mb=1024 -max_len=65536 -max_total_time=60 tests/fuzz/corpus
//
// Built without -fsanitize=fuzzer (DION_FUZZ_REPLAY_MAIN), fuzz_replay_main.cpp feeds every corpus file
// to the same entry point: the GCC ASan/UBSan ctest (label fuzz).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <exception>
#include <span>
#include <string_view>
#include <vector>

#include "dion/checkpoint/checkpoint.hpp"
#include "dion/dion.hpp"
#include "fuzz_fixture.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto bytes = std::as_bytes(std::span<const std::uint8_t>(data, size));
  try {
    (void)dion::safetensors::parse_header(bytes);
  } catch (const dion::Error&) {
  }
  try {
    (void)dion::checkpoint::parse_rank_file(dion::safetensors::File::view(bytes));
  } catch (const dion::Error&) {
  }
  try {
    (void)dion::checkpoint::parse_manifest(std::string_view(reinterpret_cast<const char*>(data), size));
  } catch (const dion::Error&) {
  }
  auto& fx = dion_fuzz::fixture();
  try {
    dion::checkpoint::load_bytes(fx.muon, bytes);
  } catch (const dion::Error&) {
  }
  try {
    dion::checkpoint::load_bytes(fx.dion, bytes, {.hyperparameters = dion::checkpoint::HyperparameterCheck::keep_current});
  } catch (const dion::Error&) {
  }
  return 0;
}
