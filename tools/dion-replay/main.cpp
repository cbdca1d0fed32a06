// dion-replay CASE.safetensors OUT.safetensors [--backend eigen|cuda]
// Replays a golden case (microsoft/dion's trajectory) with dion and writes the final parameters as
// param/<p> and every state tensor as state/<p>/<key> (float32). Exits 2 on bad usage, 3 on a case
// this build cannot replay (an unsupported key or value), 1 on any other error.
#include <cstdio>
#include <cstring>
#include <string>

#include "replay.hpp"
#if defined(DION_REPLAY_WITH_CUDA)
namespace dion::replay {
Result replay_cuda(const safetensors::File& file);  // cuda_replay.cu: the same replay on a CudaBackend
}
#endif

int main(int argc, char** argv) {
  std::string in, out, backend = "eigen";
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--backend") == 0 && i + 1 < argc) backend = argv[++i];
    else if (std::strncmp(argv[i], "--backend=", 10) == 0) backend = argv[i] + 10;
    else if (in.empty()) in = argv[i];
    else if (out.empty()) out = argv[i];
    else {
      std::fprintf(stderr, "dion-replay: unexpected argument '%s'\n", argv[i]);
      return 2;
    }
  }
  if (in.empty() || out.empty() || (backend != "eigen" && backend != "cuda")) {
    std::fprintf(stderr, "usage: dion-replay CASE.safetensors OUT.safetensors [--backend eigen|cuda]\n");
    return 2;
  }
  try {
    const auto file = dion::safetensors::File::load(in);
    dion::replay::Result r;
    if (backend == "eigen") {
      dion::EigenBackend be;
      r = dion::replay::replay(file, be);
    } else {
#if defined(DION_REPLAY_WITH_CUDA)
      r = dion::replay::replay_cuda(file);
#else
      std::fprintf(stderr, "dion-replay: this build has no CUDA backend (configure with DION_ENABLE_CUDA=ON)\n");
      return 3;
#endif
    }
    dion::replay::write_result(r, out, {{"source_case", in}, {"backend", backend}});
    std::printf("dion-replay: %s -> %s (%zu params, %zu state tensors, backend %s)\n", in.c_str(), out.c_str(),
                r.params.size(), r.state.size(), backend.c_str());
    return 0;
  } catch (const dion::replay::Unsupported& e) {
    std::fprintf(stderr, "dion-replay: unsupported case: %s\n", e.what());
    return 3;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dion-replay: %s\n", e.what());
    return 1;
  }
}
