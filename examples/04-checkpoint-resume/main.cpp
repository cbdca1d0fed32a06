// 04-checkpoint-resume: save the optimizer, restart, continue exactly where training stopped.
//
// What
//   Trains a small linear model y = W x + b (W 48 x 32 with Dion, the bias b with AdamW) on a
//   least-squares problem for --steps steps (default 40), twice:
//     1. uninterrupted;
//     2. interrupted at --resume-at (default 15): the optimizer is saved with
//        dion::checkpoint::save(opt, dir) and the model with a safetensors::Writer, then everything
//        is destroyed, a fresh model and optimizer are built as a restarted program would build them,
//        dion::checkpoint::load(opt, dir) restores the optimizer and the model is read back.
//   The program exits 1 unless both runs end with bitwise identical parameters and optimizer state.
//
// Why it looks like this
//   A checkpoint of an optimizer is only useful if resuming is exact: the same parameters, state
//   (Dion's momentum and its low-rank factor Q, AdamW's moments), step counters (AdamW's bias
//   correction, Dion's random sketches that depend on the step) and learning rates. dion saves all of
//   it, with checksums, in a directory written atomically (a crash or a full disk never leaves a
//   half-written checkpoint at <dir>), and load() validates everything before changing anything.
//   The parameters belong to your model, not to the optimizer, so you save them yourself; here they
//   go into a safetensors file with the same atomic writer. The optimizer you load into must be
//   built like the saved one (same parameter names, shapes, groups and options): build it with the
//   same code, then load.
//
//   Usage: dion_example_checkpoint_resume [--steps N] [--resume-at K] [--dir PATH]
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <dion/checkpoint.hpp>
#include <dion/dion.hpp>

namespace {

constexpr std::int64_t kOut = 48, kIn = 32, kBatch = 64;

/// The model: parameters and gradients in plain vectors, as a training program owns them.
struct Model {
  std::vector<float> w = std::vector<float>(kOut * kIn), gw = std::vector<float>(kOut * kIn);
  std::vector<float> b = std::vector<float>(kOut), gb = std::vector<float>(kOut);
  Model() {
    std::mt19937 rng(1);
    std::normal_distribution<float> n(0.0f, 0.05f);
    for (auto& v : w) v = n(rng);
  }
  /// Loss |W X + b - Y|^2 / (2 batch) on batch `step` (a deterministic function of the step), and
  /// the gradients.
  float loss_and_grad(int step) {
    std::mt19937 rng(1000u + static_cast<unsigned>(step));
    std::normal_distribution<float> n(0.0f, 1.0f);
    std::vector<float> x(kIn * kBatch), y(kOut * kBatch);
    for (auto& v : x) v = n(rng);
    for (std::int64_t i = 0; i < kOut; ++i)  // target: Y = T X + 0.1 with T[i][j] = sin(i + 2j) / sqrt(in)
      for (std::int64_t k = 0; k < kBatch; ++k) {
        double s = 0.1;
        for (std::int64_t j = 0; j < kIn; ++j) s += std::sin(static_cast<double>(i + 2 * j)) / std::sqrt(double(kIn)) * x[j * kBatch + k];
        y[i * kBatch + k] = static_cast<float>(s);
      }
    std::fill(gw.begin(), gw.end(), 0.0f);
    std::fill(gb.begin(), gb.end(), 0.0f);
    double loss = 0;
    for (std::int64_t i = 0; i < kOut; ++i)
      for (std::int64_t k = 0; k < kBatch; ++k) {
        double r = b[i] - y[i * kBatch + k];
        for (std::int64_t j = 0; j < kIn; ++j) r += static_cast<double>(w[i * kIn + j]) * x[j * kBatch + k];
        loss += 0.5 * r * r / kBatch;
        gb[i] += static_cast<float>(r / kBatch);
        for (std::int64_t j = 0; j < kIn; ++j) gw[i * kIn + j] += static_cast<float>(r * x[j * kBatch + k] / kBatch);
      }
    return static_cast<float>(loss);
  }
};

using Opt = dion::Dion<dion::EigenBackend>;

/// Build the optimizer for `m`: the same code in the first and in the restarted program.
std::unique_ptr<Opt> make_optimizer(dion::EigenBackend& be, Model& m) {
  auto opt = std::make_unique<Opt>(be, dion::Options{.lr = 0.1f, .rank_fraction = 0.5, .seed = 42});
  opt->add_group().add("w", dion::host_view(m.w.data(), {kOut, kIn}), dion::host_view(m.gw.data(), {kOut, kIn}));
  opt->add_group({.algorithm = dion::Algorithm::adamw, .lr = 0.01f})
      .add("b", dion::host_view(m.b.data(), {kOut}), dion::host_view(m.gb.data(), {kOut}));
  return opt;
}

/// A learning-rate schedule owned by the training program: linear decay to 0.
void schedule(Opt& opt, int step, int steps) {
  opt.set_lr(0, 0.1f * (1.0f - static_cast<float>(step) / static_cast<float>(steps)));
}

float train(Opt& opt, Model& m, int from, int to, int steps) {
  float loss = 0;
  for (int s = from; s < to; ++s) {
    loss = m.loss_and_grad(s);
    schedule(opt, s, steps);
    opt.step();
  }
  return loss;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 40, resume_at = 15;
  std::filesystem::path dir = std::filesystem::temp_directory_path() / ("dion-example-ckpt-" + std::to_string(::getpid()));
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--steps") steps = std::atoi(argv[i + 1]);
    else if (a == "--resume-at") resume_at = std::atoi(argv[i + 1]);
    else if (a == "--dir") dir = argv[i + 1];
    else {
      std::fprintf(stderr, "usage: %s [--steps N] [--resume-at K] [--dir PATH]\n", argv[0]);
      return 2;
    }
  }
  if (!(0 <= resume_at && resume_at <= steps)) {
    std::fprintf(stderr, "--resume-at must be in [0, --steps]\n");
    return 2;
  }
  dion::EigenBackend be;

  // 1. Uninterrupted.
  Model ref;
  auto ref_opt = make_optimizer(be, ref);
  const float first = ref.loss_and_grad(0);
  const float last = train(*ref_opt, ref, 0, steps, steps);
  std::printf("uninterrupted: loss %.5f -> %.5f after %d steps\n", first, last, steps);

  // 2. Interrupted at resume_at: save the optimizer and the model, then drop both.
  std::filesystem::create_directories(dir);
  {
    Model m;
    auto opt = make_optimizer(be, m);
    train(*opt, m, 0, resume_at, steps);
    dion::checkpoint::save(*opt, dir / "optimizer");
    dion::safetensors::Writer model_file;
    model_file.add_f32("w", {kOut, kIn}, m.w).add_f32("b", {kOut}, m.b);
    model_file.write_file(dir / "model.safetensors");
    std::printf("saved at step %d into %s\n", resume_at, dir.c_str());
  }
  // ... the restarted program: build as before, then load.
  Model m;
  auto opt = make_optimizer(be, m);
  const auto model_file = dion::safetensors::File::load(dir / "model.safetensors");
  model_file.read_f32_into("w", m.w);
  model_file.read_f32_into("b", m.b);
  dion::checkpoint::load(*opt, dir / "optimizer");
  std::printf("loaded: group steps %lld and %lld, lr %.6f\n", static_cast<long long>(opt->step_count(0)),
              static_cast<long long>(opt->step_count(1)), opt->lr(0));
  const float resumed = train(*opt, m, resume_at, steps, steps);
  std::printf("resumed: loss %.5f after %d steps\n", resumed, steps);
  std::filesystem::remove_all(dir);

  bool ok = same_bits(m.w, ref.w) && same_bits(m.b, ref.b);
  for (const auto& s : ref_opt->state()) ok = ok && same_bits(ref_opt->read_state(s.name), opt->read_state(s.name));
  if (!ok) {
    std::printf("FAILED: the resumed run differs from the uninterrupted one\n");
    return 1;
  }
  if (steps >= 20 && !(last < 0.5f * first)) {
    std::printf("FAILED: the loss did not fall (%.5f -> %.5f)\n", first, last);
    return 1;
  }
  std::printf("OK: parameters and optimizer state are bitwise identical to the uninterrupted run\n");
  return 0;
}
