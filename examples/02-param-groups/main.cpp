// 02-param-groups: parameter roles, groups, per-group learning rates and a schedule.
//
// What
//   A tiny language-model-shaped network learns a next-token table (token t -> perm[t], 48 tokens):
//
//     h0 = embed[t]                         embedding      (V, d)     a lookup table, not a linear map
//     h(l+1) = h(l) + relu(W[l] h(l) + b[l])  hidden blocks  (L, d, d)  llm.c-style: all layers in one buffer
//                                                     biases  (L, d)
//     logits = lm_head h(L)                 output layer   (V, d)
//
//   Forward and backward are written out with Eigen below. The program trains with Muon by default
//   (--optimizer normuon|dion|dion2|nordion2 picks another) and exits with status 1 unless the loss
//   fell below 10% of its start and every token is predicted correctly.
//
// Why groups
//   Orthonormal updates (Muon, NorMuon, Dion, Dion2, NorDion2) are for the hidden weight matrices: they
//   map one hidden representation to another. Everything else takes an element-wise algorithm:
//     - biases and other vectors: Lion (or AdamW);
//     - the embedding: a lookup table whose rows are touched one token at a time: Lion;
//     - the output layer: Lion with lr / sqrt(d), as microsoft/dion's README prescribes for LM heads.
//   Shapes cannot tell these roles apart (embed, lm_head and one hidden layer are all 2-D here; the
//   (L, d) bias buffer is 2-D too), so the program states them: one add_group() per role, each naming
//   its algorithm and overriding the optimizer's defaults (any field of dion::GroupOptions left unset
//   takes the optimizer's dion::Options value; a field the group's algorithm would ignore is an error).
//
// Why the stacked buffer
//   Trainers such as llm.c keep every layer's weight in one (L, m, n) allocation. A 3-D view of it is
//   one parameter with a batch of L matrices, each orthogonalized on its own (never across layers).
//   Dion works on 2-D parameters only, so with --optimizer dion each layer is registered as its own
//   2-D view into the same buffer (pointer + l*d*d): views are free, and the memory stays yours.
//
// The code between the `readme` markers is quoted in README.md; the ctest
// `example.readme_snippet.param_groups` fails when the two differ.
//
// The schedule
//   Linear warmup for 10% of the steps, then cosine decay to 10%, applied to every group through
//   opt.set_lr(group, base_lr[group] * factor) before each step, so the ratios between groups hold.

#include <dion/dion.hpp>

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Map = Eigen::Map<RowMat>;

constexpr std::int64_t V = 48;  // vocabulary
constexpr std::int64_t d = 32;  // model width
constexpr std::int64_t L = 2;   // hidden blocks

/// Parameters and gradients: the program's own memory.
struct Model {
  std::vector<float> embed, W, b, head;      // (V, d), (L, d, d), (L, d), (V, d)
  std::vector<float> gembed, gW, gb, ghead;  // same shapes

  explicit Model(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto init = [&](std::vector<float>& v, std::size_t n, float scale) {
      v.resize(n);
      for (auto& x : v) x = scale * normal(rng);
    };
    init(embed, V * d, 1.0f);
    init(W, L * d * d, 1.0f / std::sqrt(float(d)));
    b.assign(L * d, 0.0f);
    init(head, V * d, 1.0f / std::sqrt(float(d)));
    gembed.assign(embed.size(), 0.0f);
    gW.assign(W.size(), 0.0f);
    gb.assign(b.size(), 0.0f);
    ghead.assign(head.size(), 0.0f);
  }

  Map Wl(std::vector<float>& buf, std::int64_t l) { return {buf.data() + l * d * d, d, d}; }

  /// Loss over the whole vocabulary (one example per token) and the number of correct predictions;
  /// fills every gradient.
  float loss_and_grad(const std::vector<int>& target, int& correct) {
    // Forward. h[l] is (V, d): one row per input token.
    std::vector<RowMat> h(L + 1), z(L);
    h[0] = Map(embed.data(), V, d);
    for (std::int64_t l = 0; l < L; ++l) {
      z[l] = h[l] * Wl(W, l).transpose();
      z[l].rowwise() += Eigen::Map<Eigen::RowVectorXf>(b.data() + l * d, d);
      h[l + 1] = h[l] + z[l].cwiseMax(0.0f);
    }
    RowMat logits = h[L] * Map(head.data(), V, d).transpose();
    // Softmax cross-entropy, mean over the V examples.
    RowMat p = (logits.colwise() - logits.rowwise().maxCoeff()).array().exp().matrix();
    double loss = 0.0;
    correct = 0;
    for (std::int64_t i = 0; i < V; ++i) {
      Eigen::Index arg = 0;
      logits.row(i).maxCoeff(&arg);
      correct += arg == target[static_cast<std::size_t>(i)];
      p.row(i) /= p.row(i).sum();
      loss -= std::log(std::max(p(i, target[static_cast<std::size_t>(i)]), 1e-30f));
      p(i, target[static_cast<std::size_t>(i)]) -= 1.0f;
    }
    p /= float(V);  // dL/dlogits
    // Backward.
    Map(ghead.data(), V, d).noalias() = p.transpose() * h[L];
    RowMat dh = p * Map(head.data(), V, d);
    for (std::int64_t l = L - 1; l >= 0; --l) {
      const RowMat dz = (z[l].array() > 0.0f).select(dh, RowMat::Zero(V, d));
      Wl(gW, l).noalias() = dz.transpose() * h[l];
      Eigen::Map<Eigen::RowVectorXf>(gb.data() + l * d, d) = dz.colwise().sum();
      dh += dz * Wl(W, l);  // the residual path plus the block's input gradient
    }
    Map(gembed.data(), V, d) = dh;
    return static_cast<float>(loss / double(V));
  }
};

/// Group indices, in the order they are added below.
enum Group : int { kHidden = 0, kBiases = 1, kEmbed = 2, kHead = 3 };

template <class Optimizer>
int train(const std::string& name, float lr, int steps) {
  Model m(/*seed=*/1);
  std::vector<int> target(V);
  std::iota(target.begin(), target.end(), 0);
  std::shuffle(target.begin(), target.end(), std::mt19937(3));  // next token = a fixed permutation

  dion::EigenBackend cpu;
  Optimizer opt{cpu, {.lr = lr, .weight_decay = 0.0f}};
  using dion::host_view;
  const auto lion = dion::Algorithm::lion;

// readme-begin
  // Group 0, hidden matrices: the optimizer's own algorithm (Muon, NorMuon, Dion, Dion2, NorDion2).
  auto hidden = opt.add_group();
  if (Optimizer::default_algorithm == dion::Algorithm::dion) {
    for (std::int64_t l = 0; l < L; ++l)  // Dion: one 2-D view per layer, into the same buffer
      hidden.add("blocks." + std::to_string(l) + ".weight",
                 host_view(m.W.data() + l * d * d, {d, d}), host_view(m.gW.data() + l * d * d, {d, d}));
  } else {  // the Muon family: the stacked buffer as one (L, d, d) parameter, a batch of L matrices
    hidden.add("blocks.weight", host_view(m.W.data(), {L, d, d}), host_view(m.gW.data(), {L, d, d}));
  }
  // Group 1, biases (an (L, d) buffer: 2-D, but vectors by role): Lion at the base lr.
  opt.add_group({.algorithm = lion})
      .add("blocks.bias", host_view(m.b.data(), {L, d}), host_view(m.gb.data(), {L, d}));
  // Group 2, the embedding (a lookup table): Lion at the base lr.
  opt.add_group({.algorithm = lion})
      .add("embed", host_view(m.embed.data(), {V, d}), host_view(m.gembed.data(), {V, d}));
  // Group 3, the output layer: Lion at lr / sqrt(d), with a little weight decay of its own.
  opt.add_group({.algorithm = lion, .lr = lr / std::sqrt(float(d)), .weight_decay = 0.01f})
      .add("lm_head", host_view(m.head.data(), {V, d}), host_view(m.ghead.data(), {V, d}));
// readme-end

  // A vector in an orthonormal group is refused at registration, with the reason, and nothing changes.
  std::vector<float> stray(d), gstray(d);
  try {
    hidden.add("stray.bias", host_view(stray.data(), {d}), host_view(gstray.data(), {d}));
    std::printf("error: a 1-D parameter was accepted by the %s group\n", name.c_str());
    return 1;
  } catch (const dion::Error& e) {
    std::printf("refused as expected: %s\n\n", e.what());
  }

  std::printf("%s, %zu parameters in %d groups, %lld bytes of state:\n", name.c_str(), opt.num_params(),
              opt.num_groups(), static_cast<long long>(opt.state_bytes()));
  for (int g = 0; g < opt.num_groups(); ++g)
    std::printf("  group %d: %-8s lr %.5f  weight_decay %.3f\n", g, dion::algorithm_name(opt.algorithm(g)), opt.lr(g),
                opt.weight_decay(g));
  for (const auto& s : opt.state()) std::printf("  state %-28s %s\n", s.name.c_str(), s.view.shape.str().c_str());

  std::vector<float> base_lr;
  for (int g = 0; g < opt.num_groups(); ++g) base_lr.push_back(opt.lr(g));
  int correct = 0;
  const float first = m.loss_and_grad(target, correct);
  float loss = first;
  const int warmup = steps / 10;
  for (int step = 0; step < steps; ++step) {
    // Warmup then cosine decay to 10%, the same factor for every group.
    const float t = step < warmup ? float(step + 1) / float(warmup)
                                  : 0.1f + 0.45f * (1.0f + std::cos(3.14159265f * float(step - warmup) / float(steps - warmup)));
    for (int g = 0; g < opt.num_groups(); ++g) opt.set_lr(g, base_lr[static_cast<std::size_t>(g)] * t);
    opt.step();
    loss = m.loss_and_grad(target, correct);
    if (step % (steps / 5) == 0 || step == steps - 1)
      std::printf("step %4d  lr(hidden) %.5f  lr(lm_head) %.5f  loss %.3e  correct %d/%lld\n", step + 1,
                  opt.lr(kHidden), opt.lr(kHead), loss, correct, static_cast<long long>(V));
  }
  const bool ok = loss < 0.1f * first && correct == V;
  std::printf("%s: loss %.4f -> %.3e, %d/%lld tokens right: %s\n", name.c_str(), first, loss, correct,
              static_cast<long long>(V), ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string name = "muon";
  int steps = 200;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--optimizer" && i + 1 < argc) name = argv[++i];
    else if (a == "--steps" && i + 1 < argc) steps = std::max(20, std::atoi(argv[++i]));
    else {
      std::fprintf(stderr, "usage: %s [--optimizer muon|normuon|dion|dion2|nordion2] [--steps N]\n", argv[0]);
      return 2;
    }
  }
  const float lr = 0.02f;
  using B = dion::EigenBackend;
  if (name == "muon") return train<dion::Muon<B>>(name, lr, steps);
  if (name == "normuon") return train<dion::NorMuon<B>>(name, lr, steps);
  if (name == "dion") return train<dion::Dion<B>>(name, lr, steps);
  if (name == "dion2") return train<dion::Dion2<B>>(name, lr, steps);
  if (name == "nordion2" || name == "dion3") return train<dion::NorDion2<B>>(name, lr, steps);
  std::fprintf(stderr, "unknown optimizer '%s'\n", name.c_str());
  return 2;
}
