// A multilayer perceptron classifier, forward and backward, in plain Eigen.
//
//   x (784) -> fc1 (256x784) + b1 -> ReLU -> fc2 (128x256) + b2 -> ReLU -> fc3 (10x128) + b3 -> softmax
//
// The model owns its memory the way a C++ training program does: every weight, bias and gradient is a
// std::vector<float>, weights row-major (out, in) like torch.nn.Linear. The optimizer never sees this
// class; it sees views of these buffers (dion::host_view) and updates the weights in place.
#pragma once

#include <Eigen/Dense>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace mlp {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MapMat = Eigen::Map<RowMat>;
using CMapMat = Eigen::Map<const RowMat>;
using MapVec = Eigen::Map<Eigen::VectorXf>;

/// y = x W^T + b for a batch of rows x.
struct Linear {
  std::string name;  // "fc1", "fc2", ...
  int in = 0, out = 0;
  std::vector<float> w, b;    // parameters: w is (out, in) row-major, b is (out)
  std::vector<float> gw, gb;  // their gradients, same shapes

  MapMat W() { return {w.data(), out, in}; }
  MapVec B() { return {b.data(), out}; }
  MapMat GW() { return {gw.data(), out, in}; }
  MapVec GB() { return {gb.data(), out}; }
};

class Model {
 public:
  /// Layer widths, e.g. {784, 256, 128, 10}. Initialization as torch.nn.Linear: U(-1/sqrt(in), 1/sqrt(in))
  /// for weights and biases, from a fixed seed so every optimizer starts from the same point.
  Model(const std::vector<int>& widths, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    // Uniform in [-a, a) from 24 random bits: the same numbers on every platform.
    auto uniform = [&](float a) { return (static_cast<float>(rng() >> 40) * 0x1p-24f * 2.0f - 1.0f) * a; };
    for (std::size_t l = 0; l + 1 < widths.size(); ++l) {
      Linear L;
      L.name = "fc" + std::to_string(l + 1);
      L.in = widths[l];
      L.out = widths[l + 1];
      const float a = 1.0f / std::sqrt(static_cast<float>(L.in));
      L.w.resize(static_cast<std::size_t>(L.out) * L.in);
      L.b.resize(static_cast<std::size_t>(L.out));
      for (auto& v : L.w) v = uniform(a);
      for (auto& v : L.b) v = uniform(a);
      L.gw.assign(L.w.size(), 0.0f);
      L.gb.assign(L.b.size(), 0.0f);
      layers.push_back(std::move(L));
    }
  }

  std::vector<Linear> layers;

  std::int64_t num_params() const {
    std::int64_t n = 0;
    for (const auto& L : layers) n += static_cast<std::int64_t>(L.w.size() + L.b.size());
    return n;
  }

  /// Logits (batch, classes) of a batch of inputs (batch, in); keeps the activations for backward().
  const RowMat& forward(const CMapMat& x) {
    acts_.resize(layers.size() + 1);
    acts_[0] = x;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      auto& L = layers[l];
      RowMat& z = acts_[l + 1];
      z.noalias() = acts_[l] * L.W().transpose();
      z.rowwise() += L.B().transpose();
      if (l + 1 < layers.size()) z = z.cwiseMax(0.0f);  // ReLU (the output layer has none)
    }
    return acts_.back();
  }

  /// Mean softmax cross-entropy of the last forward() against `labels`; fills every gradient.
  float backward(const std::uint8_t* labels) {
    const RowMat& logits = acts_.back();
    const auto n = logits.rows();
    // Softmax with the max subtracted per row, then dL/dlogits = (softmax - onehot) / n.
    RowMat dz = (logits.colwise() - logits.rowwise().maxCoeff()).array().exp().matrix();
    const Eigen::VectorXf sums = dz.rowwise().sum();
    double loss = 0.0;
    for (Eigen::Index i = 0; i < n; ++i) {
      dz.row(i) /= sums(i);
      loss -= std::log(std::max(dz(i, labels[i]), 1e-30f));
      dz(i, labels[i]) -= 1.0f;
    }
    dz /= static_cast<float>(n);
    for (std::size_t l = layers.size(); l-- > 0;) {
      auto& L = layers[l];
      const RowMat& a = acts_[l];
      L.GW().noalias() = dz.transpose() * a;  // (out, batch) x (batch, in)
      L.GB() = dz.colwise().sum().transpose();
      if (l == 0) break;
      RowMat da = dz * L.W();                                    // (batch, in)
      dz = (a.array() > 0.0f).select(da, RowMat::Zero(da.rows(), da.cols()));  // ReLU'
    }
    return static_cast<float>(loss / static_cast<double>(n));
  }

  /// Mean loss and the number of correct predictions over `n` examples (in chunks).
  std::pair<double, std::int64_t> evaluate(const float* x, const std::uint8_t* labels, std::int64_t n,
                                           std::int64_t chunk = 1000) {
    double loss = 0.0;
    std::int64_t correct = 0;
    for (std::int64_t i0 = 0; i0 < n; i0 += chunk) {
      const std::int64_t m = std::min(chunk, n - i0);
      const RowMat& logits = forward(CMapMat(x + i0 * layers.front().in, m, layers.front().in));
      for (std::int64_t i = 0; i < m; ++i) {
        Eigen::Index arg = 0;
        const float mx = logits.row(i).maxCoeff(&arg);
        const double lse = mx + std::log((logits.row(i).array() - mx).exp().sum());
        loss += lse - logits(i, labels[i0 + i]);
        correct += arg == labels[i0 + i];
      }
    }
    return {loss / static_cast<double>(n), correct};
  }

 private:
  std::vector<RowMat> acts_;  // acts_[0] = input, acts_[l+1] = output of layer l (after ReLU)
};

}  // namespace mlp
