// 01-quickstart: Muon on views of your own memory.
//
// What
//   Fits a weight matrix W (32 x 64) to a least-squares problem, loss(W) = |W X - Y|^2 / (2N), with
//   dion's Muon on the CPU. The gradient is computed here, by hand; dion only performs the update.
//   The program exits with status 1 unless the loss falls below 1% of its starting value.
//
// Why it looks like this
//   A C++ training program already owns its parameters and gradients: plain arrays, cudaMalloc'ed
//   buffers, tensors of some framework. dion never allocates or copies them. You describe each
//   buffer with a non-owning view, dion::host_view(pointer, {rows, cols}) (row-major; an optional
//   leading dimension and batch stride describe padded or layer-stacked buffers), and register the
//   pair (parameter, gradient) under a stable name. All optimizer state (here Muon's momentum, named
//   "w/momentum") is allocated once, at registration; opt.step() then reads the gradient buffer and
//   updates the parameter buffer in place, allocating nothing.
//
//   The learning-rate schedule is yours: set_lr(group, lr) before a step changes what that step uses.
//   Muon's update is an orthogonalized momentum of fixed size, so a constant lr stalls at a noise
//   floor on a problem like this one; decaying the lr to 0 lets the loss keep falling.
//
// The code between the `readme` markers is the usage example of README.md, character for character;
// the ctest `example.readme_snippet.quickstart` fails when the two differ.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include <dion/dion.hpp>

namespace {

/// loss(W) = |W X - Y|^2 / (2N) with Y = W* X: W* (m x n) and X (n x N) random, so the minimum is 0.
class LeastSquares {
 public:
  LeastSquares(std::int64_t m, std::int64_t n, std::int64_t examples) : m_(m), n_(n), N_(examples) {
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> target(static_cast<std::size_t>(m * n));
    for (auto& v : target) v = normal(rng) / std::sqrt(static_cast<float>(n));
    x_.resize(static_cast<std::size_t>(n * N_));
    for (auto& v : x_) v = normal(rng);
    y_.assign(static_cast<std::size_t>(m * N_), 0.0f);
    matmul(target, y_);
  }

  /// Returns the loss at `w` and writes its gradient (W X - Y) X^T / N into `g`.
  float loss_and_grad(const std::vector<float>& w, std::vector<float>& g) const {
    std::vector<float> r(static_cast<std::size_t>(m_ * N_), 0.0f);
    matmul(w, r);  // r = W X
    double loss = 0.0;
    for (std::size_t i = 0; i < r.size(); ++i) {
      r[i] -= y_[i];  // r = W X - Y
      loss += 0.5 * static_cast<double>(r[i]) * r[i];
    }
    for (std::int64_t i = 0; i < m_; ++i)
      for (std::int64_t j = 0; j < n_; ++j) {
        double s = 0.0;
        for (std::int64_t k = 0; k < N_; ++k) s += static_cast<double>(r[i * N_ + k]) * x_[j * N_ + k];
        g[static_cast<std::size_t>(i * n_ + j)] = static_cast<float>(s / static_cast<double>(N_));
      }
    return static_cast<float>(loss / static_cast<double>(N_));
  }

 private:
  void matmul(const std::vector<float>& w, std::vector<float>& out) const {  // out += W X
    for (std::int64_t i = 0; i < m_; ++i)
      for (std::int64_t j = 0; j < n_; ++j)
        for (std::int64_t k = 0; k < N_; ++k) out[i * N_ + k] += w[i * n_ + j] * x_[j * N_ + k];
  }
  std::int64_t m_, n_, N_;
  std::vector<float> x_, y_;
};

}  // namespace

// readme-begin
int main() {
  const std::int64_t m = 32, n = 64;
  std::vector<float> w(m * n, 0.0f), g(m * n);  // your parameter and gradient buffers (row-major)
  LeastSquares problem(m, n, /*examples=*/256);  // loss(W) = |W X - Y|^2 / 2N

  dion::EigenBackend cpu;
  dion::Muon<dion::EigenBackend> opt{cpu, {.lr = 0.05f}};
  opt.add_group().add("w", dion::host_view(w.data(), {m, n}),   // views of your memory: no copies
                           dion::host_view(g.data(), {m, n}));

  const int steps = 300;
  const float first = problem.loss_and_grad(w, g);  // your backward pass fills g
  float loss = first;
  for (int step = 0; step < steps; ++step) {
    opt.set_lr(0, 0.05f * (1.0f - float(step) / steps));  // your schedule: read at each step
    opt.step();                                           // updates w in place
    loss = problem.loss_and_grad(w, g);
  }
  std::printf("loss %.5f -> %.5f; optimizer state %lld bytes (%s)\n", first, loss,
              static_cast<long long>(opt.state_bytes()), opt.state()[0].name.c_str());
  return loss < 0.01f * first ? 0 : 1;
}
// readme-end
