// 05-gpu-training: a real GPU training run on user-owned buffers. A multilayer perceptron classifier
// (784 -> 2048 -> 2048 -> 2048 -> 10, ReLU, softmax cross-entropy) learns Fashion-MNIST on one GPU, once
// per optimizer: Muon, NorMuon, Dion, Dion2 against AdamW, from the same initialization and the same
// batch order.
//
// What it shows
//   - The trainer owns the GPU: its stream, its cuBLAS handle, and llm.c-style memory: every weight and
//     bias lives in ONE cudaMalloc'ed parameter arena, every gradient in one gradient arena, activations
//     in buffers of its own. Forward and backward are this file's cuBLAS calls (cublasSgemm, TF32 tensor
//     cores unless --no-tf32) and a few small kernels (gather a batch, bias + ReLU, softmax cross-entropy,
//     bias gradient, ReLU backward). dion sees views into the two arenas (dion::cuda_view) and updates the
//     weights in place, on the trainer's stream (dion::CudaBackend borrows it).
//   - The groups are the roles, as in examples/00-demo-fashion-mnist and microsoft/dion's README: the
//     hidden matrices (fc1..fc3) on the optimizer's own algorithm; the output layer fc4 (its rows are the
//     classes) in a group of its own, Lion at lr / sqrt(fan_in); every bias on Lion at lr. The baseline
//     (AdamW, or Lion) puts everything in one group. Dion runs at rank_fraction 0.25. Hyperparameters are
//     the CPU demo's: lr 0.02 for the orthonormal optimizers, 1e-3 for AdamW, linear decay to 0.
//   - No host synchronization inside a training step: the per-step loss is reduced on the device into an
//     array read back once per epoch; set_lr() before each step travels with the work (no sync either).
//     The optimizers run with NonFinitePolicy::propagate (no NaN/Inf screening: this trainer watches its
//     loss); the default skip_step screens on the device without a synchronization, at the cost of one
//     more read of every gradient.
//
// What is measured (CUDA events on the stream, so these are GPU-timeline times)
//   "opt step ms": from just before opt.step() to just after it: the optimizer's GPU work (and any gap
//   while the GPU waited for the host to enqueue it). "total step ms": the whole training step (batch
//   gather, forward, loss, backward, optimizer step). "host step() ms": CPU time spent inside the
//   opt.step() call (enqueueing). Means over every step of the run but the first 3 (module loading,
//   cuBLAS heuristics). "state bytes": opt.state_bytes(). "final train loss": mean of the last 100 steps.
//   "test accuracy": over the 10000 test images after the last epoch.
//
// Outputs (--out DIR): losses.csv (optimizer,step,train_loss: every step), summary.csv, table.md and
// results.json (per-epoch numbers and a windowed loss curve; tools/plot_losses.py draws it).
//
// Usage
//   dion_example_gpu_training [--data DIR] [--out DIR] [--epochs N] [--batch N] [--hidden N]
//       [--layers N] [--optimizers muon,normuon,dion,dion2,adamw] [--train N] [--test N] [--seed N]
//       [--log-every N] [--min-accuracy F] [--no-tf32]
//   --data: the Fashion-MNIST IDX files (default $DION_FASHION_MNIST or /usr/share/datasets/fashion-mnist,
//   where Debian's dataset-fashion-mnist puts them; .gz or not). --layers: hidden layers (default 3).
//   Also accepted in --optimizers: nordion2 (= dion3), lion.
// Exit status: 0 when every optimizer lowered the training loss and reached --min-accuracy (default
// 0.80) on the test set; 1 otherwise; 77 without the data set or a CUDA device; 2 on bad arguments.

#include <dion/cuda.hpp>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "../00-demo-fashion-mnist/fashion_mnist.hpp"  // the demo's IDX loader (zlib)
#include "../00-demo-fashion-mnist/recipes.hpp"        // the demo's learning rates and optimizers

#define CHECK_CUDA(call)                                                                                    \
  do {                                                                                                      \
    const cudaError_t err_ = (call);                                                                        \
    if (err_ != cudaSuccess)                                                                                \
      throw std::runtime_error(std::string(#call) + ": " + cudaGetErrorString(err_));                      \
  } while (0)
#define CHECK_CUBLAS(call)                                                                                  \
  do {                                                                                                      \
    const cublasStatus_t st_ = (call);                                                                      \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                                       \
      throw std::runtime_error(std::string(#call) + ": cuBLAS status " + std::to_string(static_cast<int>(st_))); \
  } while (0)

namespace {

using Clock = std::chrono::steady_clock;
using Opt = dion::Optimizer<dion::CudaBackend>;  // the engine every named optimizer derives from

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// ================================================================================================
// The trainer's kernels
// ================================================================================================

unsigned blocks_for(std::int64_t n, int threads = 256) {
  return static_cast<unsigned>(std::clamp<std::int64_t>((n + threads - 1) / threads, 1, 8192));
}

/// x[r, :] = src[idx[r], :] and y[r] = labels[idx[r]] for r < rows (a batch in the epoch's order).
__global__ void gather_batch(const float* src, const int* labels, const int* idx, int rows, int dim, float* x,
                             int* y) {
  const std::int64_t n = std::int64_t{rows} * dim;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t r = i / dim, c = i % dim;
    x[i] = src[std::int64_t{idx[r]} * dim + c];
    if (c == 0) y[r] = labels[idx[r]];
  }
}

/// z[r, c] += b[c], then ReLU when `relu`.
__global__ void bias_act(float* z, const float* b, int rows, int cols, bool relu) {
  const std::int64_t n = std::int64_t{rows} * cols;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const float v = z[i] + b[i % cols];
    z[i] = relu ? fmaxf(v, 0.0f) : v;
  }
}

/// Softmax cross-entropy of each row of logits (rows x C): row_loss[r] = logsumexp - logit[y],
/// row_correct[r] = (argmax == y); with dlogits, (softmax - onehot) * scale (the mean's gradient).
__global__ void softmax_xent(const float* logits, const int* y, int rows, int C, float scale, float* dlogits,
                             float* row_loss, float* row_correct) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const float* z = logits + std::int64_t{r} * C;
  float mx = z[0];
  int arg = 0;
  for (int c = 1; c < C; ++c)
    if (z[c] > mx) {
      mx = z[c];
      arg = c;
    }
  float sum = 0.0f;
  for (int c = 0; c < C; ++c) sum += expf(z[c] - mx);
  const int label = y[r];
  row_loss[r] = mx + logf(sum) - z[label];
  row_correct[r] = arg == label ? 1.0f : 0.0f;
  if (dlogits) {
    float* d = dlogits + std::int64_t{r} * C;
    for (int c = 0; c < C; ++c) d[c] = (expf(z[c] - mx) / sum - (c == label ? 1.0f : 0.0f)) * scale;
  }
}

/// *out = scale * sum(x[0..n)): one block of 1024 threads, a fixed order (deterministic).
__global__ void reduce_sum(const float* x, int n, float scale, float* out) {
  __shared__ double part[1024];
  double s = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (unsigned w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = static_cast<float>(scale * part[0]);
}

/// gb[c] = sum over rows of dz[r, c] (one thread per column: coalesced across the warp).
__global__ void bias_grad(const float* dz, int rows, int cols, float* gb) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float s = 0.0f;
  for (int r = 0; r < rows; ++r) s += dz[std::int64_t{r} * cols + c];
  gb[c] = s;
}

/// da *= (a > 0): the ReLU's derivative, from its output a.
__global__ void relu_backward(float* da, const float* a, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n;
       i += std::int64_t{gridDim.x} * blockDim.x)
    if (!(a[i] > 0.0f)) da[i] = 0.0f;
}

// ================================================================================================
// Device memory the trainer owns
// ================================================================================================

template <class T>
struct DeviceArray {
  T* p = nullptr;
  std::size_t n = 0;
  DeviceArray() = default;
  explicit DeviceArray(std::size_t count) : n(count) {
    if (n) CHECK_CUDA(cudaMalloc(&p, n * sizeof(T)));
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr; o.n = 0; }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    std::swap(p, o.p);
    std::swap(n, o.n);
    return *this;
  }
  ~DeviceArray() {
    if (p) cudaFree(p);
  }
};

/// A fully connected layer: pointers into the parameter and gradient arenas. W is (out, in) row-major
/// like torch.nn.Linear, b is (out).
struct Layer {
  std::string name;  // fc1, fc2, ...
  int in = 0, out = 0;
  float *w = nullptr, *b = nullptr, *gw = nullptr, *gb = nullptr;
};

struct Config {
  std::string data_dir;
  std::string out_dir = "gpu-training-results";
  int epochs = 5, batch = 512, hidden = 2048, layers = 3, log_every = 10;
  std::int64_t train_limit = 0, test_limit = 0;
  std::uint64_t seed = 42;
  double min_accuracy = 0.80;
  bool tf32 = true;
  std::vector<std::string> optimizers = {"muon", "normuon", "dion", "dion2", "adamw"};
};

/// The model: the arenas, the layers' views into them, the activation buffers, cuBLAS.
class Mlp {
 public:
  static constexpr int kEvalChunk = 2000;

  Mlp(const Config& cfg, cudaStream_t stream) : stream_(stream) {
    std::vector<int> widths{fmnist::kImageSize};
    for (int l = 0; l < cfg.layers; ++l) widths.push_back(cfg.hidden);
    widths.push_back(fmnist::kClasses);
    std::size_t count = 0;
    for (std::size_t l = 0; l + 1 < widths.size(); ++l)
      count += static_cast<std::size_t>(widths[l + 1]) * (widths[l] + 1);
    params_ = DeviceArray<float>(count);  // ONE allocation for every weight and bias
    grads_ = DeviceArray<float>(count);   // and one for every gradient
    std::size_t off = 0;
    int widest = 0;
    for (std::size_t l = 0; l + 1 < widths.size(); ++l) {
      Layer L;
      L.name = "fc" + std::to_string(l + 1);
      L.in = widths[l];
      L.out = widths[l + 1];
      L.w = params_.p + off;
      L.gw = grads_.p + off;
      off += static_cast<std::size_t>(L.out) * L.in;
      L.b = params_.p + off;
      L.gb = grads_.p + off;
      off += static_cast<std::size_t>(L.out);
      widest = std::max({widest, L.in, L.out});
      layers.push_back(L);
    }
    rows_ = std::max(cfg.batch, kEvalChunk);
    for (const auto& L : layers) acts_.emplace_back(static_cast<std::size_t>(rows_) * L.out);
    dz_[0] = DeviceArray<float>(static_cast<std::size_t>(rows_) * widest);
    dz_[1] = DeviceArray<float>(static_cast<std::size_t>(rows_) * widest);
    row_loss_ = DeviceArray<float>(static_cast<std::size_t>(rows_));
    row_correct_ = DeviceArray<float>(static_cast<std::size_t>(rows_));
    CHECK_CUBLAS(cublasCreate(&cublas_));
    CHECK_CUBLAS(cublasSetStream(cublas_, stream_));
    CHECK_CUBLAS(cublasSetMathMode(cublas_, cfg.tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  }
  Mlp(const Mlp&) = delete;
  Mlp& operator=(const Mlp&) = delete;
  ~Mlp() { cublasDestroy(cublas_); }

  std::vector<Layer> layers;

  std::int64_t num_params() const { return static_cast<std::int64_t>(params_.n); }

  /// Initialization as torch.nn.Linear, U(-1/sqrt(in), 1/sqrt(in)) for weights and biases, from `seed`
  /// (the demo's generator): every optimizer starts from the same point. Gradients are zeroed.
  void init(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    auto uniform = [&](float a) { return (static_cast<float>(rng() >> 40) * 0x1p-24f * 2.0f - 1.0f) * a; };
    std::vector<float> host(params_.n);
    std::size_t off = 0;
    for (const auto& L : layers) {
      const float a = 1.0f / std::sqrt(static_cast<float>(L.in));
      for (std::size_t i = 0; i < static_cast<std::size_t>(L.out) * (L.in + 1); ++i) host[off + i] = uniform(a);
      off += static_cast<std::size_t>(L.out) * (L.in + 1);
    }
    CHECK_CUDA(cudaMemcpyAsync(params_.p, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice, stream_));
    CHECK_CUDA(cudaMemsetAsync(grads_.p, 0, grads_.n * sizeof(float), stream_));
    CHECK_CUDA(cudaStreamSynchronize(stream_));
  }

  /// Logits of `rows` inputs x (rows x 784, row-major, on the device); keeps the activations.
  const float* forward(const float* x, int rows) {
    const float one = 1.0f, zero = 0.0f;
    input_ = x;
    const float* a = x;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const auto& L = layers[l];
      float* z = acts_[l].p;
      // Row-major Z (rows x out) = A (rows x in) W^T is, column-major, Z^T = W A^T: (W^T)^T A^T.
      CHECK_CUBLAS(cublasSgemm(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, L.out, rows, L.in, &one, L.w, L.in, a, L.in, &zero, z,
                               L.out));
      const std::int64_t n = std::int64_t{rows} * L.out;
      bias_act<<<blocks_for(n), 256, 0, stream_>>>(z, L.b, rows, L.out, l + 1 < layers.size());
      CHECK_CUDA(cudaGetLastError());
      a = z;
    }
    return a;
  }

  /// Loss of the last forward() against labels y: the mean goes to *loss_out (device); with
  /// `backward`, every gradient in the arena is written.
  void loss_and_backward(const int* y, int rows, float* loss_out, bool backward) {
    const int C = layers.back().out;
    softmax_xent<<<(rows + 127) / 128, 128, 0, stream_>>>(acts_.back().p, y, rows, C, 1.0f / static_cast<float>(rows),
                                                         backward ? dz_[0].p : nullptr, row_loss_.p, row_correct_.p);
    reduce_sum<<<1, 1024, 0, stream_>>>(row_loss_.p, rows, 1.0f / static_cast<float>(rows), loss_out);
    CHECK_CUDA(cudaGetLastError());
    if (!backward) return;
    const float one = 1.0f, zero = 0.0f;
    int cur = 0;
    for (std::size_t l = layers.size(); l-- > 0;) {
      const auto& L = layers[l];
      const float* a = l == 0 ? input_ : acts_[l - 1].p;  // the layer's input (after the previous ReLU)
      const float* dz = dz_[cur].p;                        // dLoss/dZ of this layer (rows x out)
      // dW (out x in) = dZ^T A; column-major: dW^T = A^T dZ.
      CHECK_CUBLAS(cublasSgemm(cublas_, CUBLAS_OP_N, CUBLAS_OP_T, L.in, L.out, rows, &one, a, L.in, dz, L.out, &zero,
                               L.gw, L.in));
      bias_grad<<<(L.out + 255) / 256, 256, 0, stream_>>>(dz, rows, L.out, L.gb);
      CHECK_CUDA(cudaGetLastError());
      if (l == 0) break;
      // dA (rows x in) = dZ W; column-major: dA^T = W^T dZ^T.
      float* da = dz_[1 - cur].p;
      CHECK_CUBLAS(cublasSgemm(cublas_, CUBLAS_OP_N, CUBLAS_OP_N, L.in, rows, L.out, &one, L.w, L.in, dz, L.out, &zero,
                               da, L.in));
      const std::int64_t n = std::int64_t{rows} * L.in;
      relu_backward<<<blocks_for(n), 256, 0, stream_>>>(da, a, n);
      CHECK_CUDA(cudaGetLastError());
      cur = 1 - cur;
    }
  }

  /// Sum of the correct predictions of the last loss_and_backward() into *out (device).
  void count_correct(int rows, float* out) {
    reduce_sum<<<1, 1024, 0, stream_>>>(row_correct_.p, rows, 1.0f, out);
    CHECK_CUDA(cudaGetLastError());
  }

 private:
  cudaStream_t stream_;
  cublasHandle_t cublas_ = nullptr;
  DeviceArray<float> params_, grads_;
  std::vector<DeviceArray<float>> acts_;  // acts_[l]: output of layer l (after its ReLU)
  DeviceArray<float> dz_[2];
  DeviceArray<float> row_loss_, row_correct_;
  const float* input_ = nullptr;
  int rows_ = 0;
};

/// The data set on the device: normalized pixels and int labels.
struct DeviceSplit {
  std::int64_t count = 0;
  DeviceArray<float> x;
  DeviceArray<int> y;
  std::vector<int> host_labels;
};

DeviceSplit upload(const fmnist::Split& s, cudaStream_t stream) {
  DeviceSplit d;
  d.count = s.count;
  d.x = DeviceArray<float>(s.pixels.size());
  d.y = DeviceArray<int>(s.labels.size());
  d.host_labels.assign(s.labels.begin(), s.labels.end());
  CHECK_CUDA(cudaMemcpyAsync(d.x.p, s.pixels.data(), s.pixels.size() * sizeof(float), cudaMemcpyHostToDevice, stream));
  CHECK_CUDA(cudaMemcpyAsync(d.y.p, d.host_labels.data(), d.host_labels.size() * sizeof(int), cudaMemcpyHostToDevice,
                             stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  return d;
}

// ================================================================================================
// Recipes and parameter groups (the demo's)
// ================================================================================================

using recipes::human_bytes;
using recipes::Recipe;
using recipes::recipe_for;

std::string describe(const Recipe& r, const Mlp& m) {
  std::ostringstream s;
  s.precision(3);
  const auto n = m.layers.size();
  if (!r.orthonormal) s << "all parameters, lr " << r.lr;
  else
    s << "fc1.." << m.layers[n - 2].name << " lr " << r.lr << "; " << m.layers[n - 1].name << " Lion " << r.head_lr
      << "; biases Lion " << r.bias_lr;
  return s.str();
}

void register_parameters(Opt& opt, Mlp& m, const Recipe& r) {
  auto& layers = m.layers;
  auto W = [](const Layer& L) { return dion::cuda_view(L.w, {L.out, L.in}); };
  auto GW = [](const Layer& L) { return dion::cuda_view(L.gw, {L.out, L.in}); };
  auto B = [](const Layer& L) { return dion::cuda_view(L.b, {L.out}); };
  auto GB = [](const Layer& L) { return dion::cuda_view(L.gb, {L.out}); };
  if (!r.orthonormal) {  // the baseline: one group, the optimizer's own algorithm
    auto all = opt.add_group();
    for (auto& L : layers) all.add(L.name + ".weight", W(L), GW(L)).add(L.name + ".bias", B(L), GB(L));
    return;
  }
  // group 0: the hidden matrices, on the optimizer's own algorithm
  auto hidden = opt.add_group();
  for (std::size_t l = 0; l + 1 < layers.size(); ++l) hidden.add(layers[l].name + ".weight", W(layers[l]), GW(layers[l]));
  // group 1: the output layer (rows are classes), Lion at its own lr
  const auto& head = layers.back();
  opt.add_group({.algorithm = dion::Algorithm::lion, .lr = r.head_lr}).add(head.name + ".weight", W(head), GW(head));
  // group 2: every bias, Lion
  auto biases = opt.add_group({.algorithm = dion::Algorithm::lion, .lr = r.bias_lr});
  for (auto& L : layers) biases.add(L.name + ".bias", B(L), GB(L));
}

// ================================================================================================
// Training
// ================================================================================================

struct EpochStats {
  int epoch = 0;
  double train_loss = 0, test_loss = 0, test_accuracy = 0, seconds = 0, opt_ms = 0, step_ms = 0;
};

struct RunResult {
  Recipe recipe;
  std::string setup;
  std::vector<std::string> groups;
  std::vector<EpochStats> epochs;
  std::vector<float> losses;  // every step
  std::vector<std::pair<std::int64_t, double>> curve;
  double first_loss = 0, final_train_loss = 0, test_accuracy = 0, test_loss = 0;
  double opt_ms = 0, step_ms = 0, host_ms = 0, train_seconds = 0;
  std::int64_t state_bytes = 0, steps = 0;
};

struct Data {
  DeviceSplit train, test;
};

/// Mean loss and accuracy over the test split, in chunks (no synchronization until the end).
std::pair<double, double> evaluate(Mlp& m, const DeviceSplit& test, cudaStream_t stream, DeviceArray<float>& acc) {
  const std::int64_t chunks = (test.count + Mlp::kEvalChunk - 1) / Mlp::kEvalChunk;
  if (acc.n < static_cast<std::size_t>(2 * chunks)) acc = DeviceArray<float>(static_cast<std::size_t>(2 * chunks));
  for (std::int64_t c = 0; c < chunks; ++c) {
    const std::int64_t i0 = c * Mlp::kEvalChunk;
    const int rows = static_cast<int>(std::min<std::int64_t>(Mlp::kEvalChunk, test.count - i0));
    m.forward(test.x.p + i0 * fmnist::kImageSize, rows);
    m.loss_and_backward(test.y.p + i0, rows, acc.p + 2 * c, false);  // mean loss of the chunk
    m.count_correct(rows, acc.p + 2 * c + 1);
  }
  std::vector<float> h(static_cast<std::size_t>(2 * chunks));
  CHECK_CUDA(cudaMemcpyAsync(h.data(), acc.p, h.size() * sizeof(float), cudaMemcpyDeviceToHost, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  double loss = 0, correct = 0;
  for (std::int64_t c = 0; c < chunks; ++c) {
    const auto rows = static_cast<double>(std::min<std::int64_t>(Mlp::kEvalChunk, test.count - c * Mlp::kEvalChunk));
    loss += h[static_cast<std::size_t>(2 * c)] * rows;
    correct += h[static_cast<std::size_t>(2 * c + 1)];
  }
  return {loss / static_cast<double>(test.count), correct / static_cast<double>(test.count)};
}

RunResult train(Opt& opt, Mlp& m, const Recipe& r, const Data& d, const Config& cfg, cudaStream_t stream) {
  RunResult res;
  res.recipe = r;
  res.setup = describe(r, m);
  res.state_bytes = opt.state_bytes();
  std::vector<float> base_lr;
  for (int g = 0; g < opt.num_groups(); ++g) {
    std::ostringstream s;
    s << dion::algorithm_name(opt.algorithm(g)) << " lr " << opt.lr(g);
    res.groups.push_back(s.str());
    base_lr.push_back(opt.lr(g));
  }
  const int B = cfg.batch;
  const std::int64_t steps_per_epoch = d.train.count / B;  // the last partial batch is dropped
  const std::int64_t total_steps = steps_per_epoch * cfg.epochs;

  DeviceArray<float> x(static_cast<std::size_t>(B) * fmnist::kImageSize);
  DeviceArray<int> y(static_cast<std::size_t>(B));
  DeviceArray<int> order_dev(static_cast<std::size_t>(d.train.count));
  DeviceArray<float> losses_dev(static_cast<std::size_t>(total_steps));
  DeviceArray<float> eval_acc;
  std::vector<int> order(static_cast<std::size_t>(d.train.count));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 shuffle_rng(cfg.seed + 1);  // the same batches for every optimizer

  // Three events per step of an epoch: start of the step, before opt.step(), after it.
  std::vector<cudaEvent_t> ev(static_cast<std::size_t>(3 * steps_per_epoch));
  for (auto& e : ev) CHECK_CUDA(cudaEventCreate(&e));
  std::vector<double> host_ms;
  const int skip = 3;  // steps left out of the timing means
  double opt_total = 0, step_total = 0, host_total = 0;
  std::int64_t timed = 0;

  res.losses.resize(static_cast<std::size_t>(total_steps));
  const auto run_t0 = Clock::now();
  std::int64_t step = 0;
  for (int e = 1; e <= cfg.epochs; ++e) {
    const auto t0 = Clock::now();
    std::shuffle(order.begin(), order.end(), shuffle_rng);
    CHECK_CUDA(cudaMemcpyAsync(order_dev.p, order.data(), order.size() * sizeof(int), cudaMemcpyHostToDevice, stream));
    host_ms.assign(static_cast<std::size_t>(steps_per_epoch), 0.0);
    const std::int64_t epoch_first = step;
    for (std::int64_t s = 0; s < steps_per_epoch; ++s, ++step) {
      CHECK_CUDA(cudaEventRecord(ev[static_cast<std::size_t>(3 * s)], stream));
      gather_batch<<<blocks_for(std::int64_t{B} * fmnist::kImageSize), 256, 0, stream>>>(
          d.train.x.p, d.train.y.p, order_dev.p + s * B, B, fmnist::kImageSize, x.p, y.p);
      CHECK_CUDA(cudaGetLastError());
      m.forward(x.p, B);
      m.loss_and_backward(y.p, B, losses_dev.p + step, true);  // fills the gradient arena dion views

      // Schedule: linear decay to 0. The caller owns it; dion reads the lr at each step.
      const float scale = 1.0f - static_cast<float>(step) / static_cast<float>(total_steps);
      for (int g = 0; g < opt.num_groups(); ++g) opt.set_lr(g, base_lr[static_cast<std::size_t>(g)] * scale);

      CHECK_CUDA(cudaEventRecord(ev[static_cast<std::size_t>(3 * s + 1)], stream));
      timespec c0{}, c1{};
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
      opt.step();  // enqueued on the stream: updates the parameter arena in place
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
      CHECK_CUDA(cudaEventRecord(ev[static_cast<std::size_t>(3 * s + 2)], stream));
      host_ms[static_cast<std::size_t>(s)] =
          1e3 * (static_cast<double>(c1.tv_sec - c0.tv_sec) + 1e-9 * static_cast<double>(c1.tv_nsec - c0.tv_nsec));
    }
    // once per epoch: the losses and the step times come back
    CHECK_CUDA(cudaMemcpyAsync(res.losses.data() + epoch_first, losses_dev.p + epoch_first,
                               static_cast<std::size_t>(steps_per_epoch) * sizeof(float), cudaMemcpyDeviceToHost, stream));
    CHECK_CUDA(cudaStreamSynchronize(stream));
    double e_opt = 0, e_step = 0, e_loss = 0;
    std::int64_t e_timed = 0;
    for (std::int64_t s = 0; s < steps_per_epoch; ++s) {
      float a = 0, b = 0;
      CHECK_CUDA(cudaEventElapsedTime(&a, ev[static_cast<std::size_t>(3 * s + 1)], ev[static_cast<std::size_t>(3 * s + 2)]));
      CHECK_CUDA(cudaEventElapsedTime(&b, ev[static_cast<std::size_t>(3 * s)], ev[static_cast<std::size_t>(3 * s + 2)]));
      e_loss += res.losses[static_cast<std::size_t>(epoch_first + s)];
      if (epoch_first + s < skip) continue;
      e_opt += a;
      e_step += b;
      ++e_timed;
      host_total += host_ms[static_cast<std::size_t>(s)];
    }
    opt_total += e_opt;
    step_total += e_step;
    timed += e_timed;
    const auto [test_loss, accuracy] = evaluate(m, d.test, stream, eval_acc);
    EpochStats es;
    es.epoch = e;
    es.train_loss = e_loss / static_cast<double>(steps_per_epoch);
    es.test_loss = test_loss;
    es.test_accuracy = accuracy;
    es.seconds = seconds_since(t0);
    es.opt_ms = e_opt / static_cast<double>(std::max<std::int64_t>(e_timed, 1));
    es.step_ms = e_step / static_cast<double>(std::max<std::int64_t>(e_timed, 1));
    res.epochs.push_back(es);
    std::printf("  %-8s epoch %d/%d  train loss %.4f  test loss %.4f  test acc %5.2f%%  %5.2f s  "
                "(opt step %.3f ms, whole step %.3f ms, GPU)\n",
                r.label.c_str(), e, cfg.epochs, es.train_loss, es.test_loss, 100.0 * es.test_accuracy, es.seconds,
                es.opt_ms, es.step_ms);
    std::fflush(stdout);
  }
  for (auto& e : ev) cudaEventDestroy(e);
  res.train_seconds = seconds_since(run_t0);
  res.steps = step;
  const double denom = static_cast<double>(std::max<std::int64_t>(timed, 1));
  res.opt_ms = opt_total / denom;
  res.step_ms = step_total / denom;
  res.host_ms = host_total / denom;
  res.test_accuracy = res.epochs.back().test_accuracy;
  res.test_loss = res.epochs.back().test_loss;
  const auto& L = res.losses;
  const std::size_t n = L.size(), w = std::min<std::size_t>(n, 100), w0 = std::min<std::size_t>(n, 10);
  res.final_train_loss = std::accumulate(L.end() - static_cast<std::ptrdiff_t>(w), L.end(), 0.0) / static_cast<double>(w);
  res.first_loss = std::accumulate(L.begin(), L.begin() + static_cast<std::ptrdiff_t>(w0), 0.0) / static_cast<double>(w0);
  const auto window = static_cast<std::size_t>(cfg.log_every);
  for (std::size_t i = 0; i < n; i += window) {
    const std::size_t j = std::min(n, i + window);
    if (i > 0 && 2 * (j - i) < window) break;  // a short last window is mostly noise
    const double mean = std::accumulate(L.begin() + static_cast<std::ptrdiff_t>(i), L.begin() + static_cast<std::ptrdiff_t>(j), 0.0) /
                        static_cast<double>(j - i);
    res.curve.emplace_back(static_cast<std::int64_t>(j), mean);
  }
  return res;
}

/// Builds the named optimizer on a backend that borrows `stream`, registers the model and trains.
RunResult run(const Recipe& r, Mlp& m, const Data& d, const Config& cfg, cudaStream_t stream) {
  m.init(cfg.seed);  // the same initialization for every optimizer
  dion::CudaBackend be{stream};
  auto go = [&](Opt& opt) {
    register_parameters(opt, m, r);
    return train(opt, m, r, d, cfg, stream);
  };
  dion::Options base;
  base.seed = cfg.seed;
  base.non_finite = dion::NonFinitePolicy::propagate;  // no screening pass (see the header)
  return recipes::with_optimizer(r, be, base, go);
}

// ================================================================================================
// Reporting
// ================================================================================================

std::string table(const std::vector<RunResult>& results) {
  std::ostringstream s;
  s << "| optimizer | learning rates | test accuracy | final train loss | opt step ms (GPU) | total step ms (GPU) "
       "| host ms in step() | optimizer state |\n";
  s << "|---|---|---:|---:|---:|---:|---:|---:|\n";
  for (const auto& r : results) {
    char line[400];
    std::snprintf(line, sizeof line, "| %s | %s | %.2f%% | %.4f | %.3f | %.3f | %.3f | %s (%lld B) |\n",
                  r.recipe.label.c_str(), r.setup.c_str(), 100.0 * r.test_accuracy, r.final_train_loss, r.opt_ms,
                  r.step_ms, r.host_ms, human_bytes(r.state_bytes).c_str(), static_cast<long long>(r.state_bytes));
    s << line;
  }
  return s.str();
}

std::string json_str(const std::string& v) {
  std::string o = "\"";
  for (char c : v) {
    if (c == '"' || c == '\\') o += '\\';
    if (static_cast<unsigned char>(c) < 0x20) continue;
    o += c;
  }
  return o + "\"";
}

void write_outputs(const std::vector<RunResult>& results, const Config& cfg, const Data& d, const std::string& model,
                   const std::string& device, double total_seconds, const std::string& table_md) {
  namespace fs = std::filesystem;
  fs::create_directories(cfg.out_dir);
  const fs::path out(cfg.out_dir);
  {
    std::ofstream f(out / "losses.csv");
    f << "optimizer,step,train_loss\n";
    for (const auto& r : results)
      for (std::size_t i = 0; i < r.losses.size(); ++i) f << r.recipe.name << ',' << i + 1 << ',' << r.losses[i] << '\n';
  }
  {
    std::ofstream f(out / "summary.csv");
    f << "optimizer,setup,test_accuracy,test_loss,final_train_loss,opt_step_ms_gpu,total_step_ms_gpu,host_ms_in_step,"
         "state_bytes,steps,train_seconds\n";
    for (const auto& r : results)
      f << r.recipe.name << ",\"" << r.setup << "\"," << r.test_accuracy << ',' << r.test_loss << ','
        << r.final_train_loss << ',' << r.opt_ms << ',' << r.step_ms << ',' << r.host_ms << ',' << r.state_bytes << ','
        << r.steps << ',' << r.train_seconds << '\n';
  }
  { std::ofstream(out / "table.md") << table_md; }
  // results.json: the demo's layout (tools/plot_losses.py reads both), plus "device"
  std::ofstream j(out / "results.json");
  j.precision(6);
  j << "{\n  \"dataset\": {\"name\": \"Fashion-MNIST\", \"path\": " << json_str(cfg.data_dir) << ", \"train\": "
    << d.train.count << ", \"test\": " << d.test.count << "},\n";
  j << "  \"model\": " << json_str(model) << ",\n  \"device\": " << json_str(device) << ",\n";
  j << "  \"config\": {\"epochs\": " << cfg.epochs << ", \"batch\": " << cfg.batch << ", \"seed\": " << cfg.seed
    << ", \"tf32\": " << (cfg.tf32 ? "true" : "false") << ", \"schedule\": \"linear decay to 0\", \"log_every\": "
    << cfg.log_every << "},\n";
  j << "  \"dion_version\": " << json_str(dion::version_string) << ",\n  \"total_seconds\": " << total_seconds
    << ",\n  \"runs\": [";
  for (std::size_t k = 0; k < results.size(); ++k) {
    const auto& r = results[k];
    j << (k ? "," : "") << "\n    {\"optimizer\": " << json_str(r.recipe.name) << ", \"label\": " << json_str(r.recipe.label)
      << ", \"setup\": " << json_str(r.setup) << ",\n     \"groups\": [";
    for (std::size_t g = 0; g < r.groups.size(); ++g) j << (g ? ", " : "") << json_str(r.groups[g]);
    j << "],\n     \"test_accuracy\": " << r.test_accuracy << ", \"test_loss\": " << r.test_loss
      << ", \"final_train_loss\": " << r.final_train_loss << ", \"opt_step_ms_gpu\": " << r.opt_ms
      << ", \"total_step_ms_gpu\": " << r.step_ms << ", \"host_ms_in_step\": " << r.host_ms
      << ", \"state_bytes\": " << r.state_bytes << ", \"steps\": " << r.steps << ", \"train_seconds\": " << r.train_seconds
      << ",\n     \"epochs\": [";
    for (std::size_t e = 0; e < r.epochs.size(); ++e) {
      const auto& es = r.epochs[e];
      j << (e ? ", " : "") << "{\"epoch\": " << es.epoch << ", \"train_loss\": " << es.train_loss
        << ", \"test_loss\": " << es.test_loss << ", \"test_accuracy\": " << es.test_accuracy
        << ", \"seconds\": " << es.seconds << ", \"opt_step_ms_gpu\": " << es.opt_ms
        << ", \"total_step_ms_gpu\": " << es.step_ms << "}";
    }
    j << "],\n     \"curve\": {\"step\": [";
    for (std::size_t i = 0; i < r.curve.size(); ++i) j << (i ? ", " : "") << r.curve[i].first;
    j << "], \"train_loss\": [";
    for (std::size_t i = 0; i < r.curve.size(); ++i) j << (i ? ", " : "") << r.curve[i].second;
    j << "]}}";
  }
  j << "\n  ]\n}\n";
}

// ================================================================================================
// Command line
// ================================================================================================

[[noreturn]] void usage(const std::string& msg) {
  std::fprintf(stderr,
               "dion_example_gpu_training: %s\nusage: dion_example_gpu_training [--data DIR] [--out DIR] [--epochs N] "
               "[--batch N] [--hidden N] [--layers N] [--optimizers a,b,...] [--train N] [--test N] [--seed N] "
               "[--log-every N] [--min-accuracy F] [--no-tf32]\n",
               msg.c_str());
  std::exit(2);
}

Config parse(int argc, char** argv) {
  Config c;
  const char* env = std::getenv("DION_FASHION_MNIST");
  c.data_dir = env && *env ? env : "/usr/share/datasets/fashion-mnist";
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) usage(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  auto number = [&](int& i) -> long long {
    const std::string v = value(i);
    try {
      std::size_t pos = 0;
      const long long x = std::stoll(v, &pos);
      if (pos != v.size() || x < 0) throw std::invalid_argument(v);
      return x;
    } catch (const std::exception&) {
      usage(std::string(argv[i - 1]) + ": not a non-negative integer: " + v);
    }
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--data") c.data_dir = value(i);
    else if (a == "--out") c.out_dir = value(i);
    else if (a == "--epochs") c.epochs = static_cast<int>(number(i));
    else if (a == "--batch") c.batch = static_cast<int>(number(i));
    else if (a == "--hidden") c.hidden = static_cast<int>(number(i));
    else if (a == "--layers") c.layers = static_cast<int>(number(i));
    else if (a == "--train") c.train_limit = number(i);
    else if (a == "--test") c.test_limit = number(i);
    else if (a == "--seed") c.seed = static_cast<std::uint64_t>(number(i));
    else if (a == "--log-every") c.log_every = static_cast<int>(number(i));
    else if (a == "--no-tf32") c.tf32 = false;
    else if (a == "--min-accuracy") {
      const std::string v = value(i);
      char* end = nullptr;
      c.min_accuracy = std::strtod(v.c_str(), &end);
      if (end == v.c_str() || *end || !(c.min_accuracy >= 0 && c.min_accuracy <= 1)) usage("--min-accuracy: a number in [0, 1]");
    } else if (a == "--optimizers") {
      c.optimizers.clear();
      std::stringstream ss(value(i));
      for (std::string name; std::getline(ss, name, ',');)
        if (!name.empty()) c.optimizers.push_back(name);
      if (c.optimizers.empty()) usage("--optimizers: empty list");
    } else if (a == "-h" || a == "--help") {
      std::printf("see the header comment of examples/05-gpu-training/main.cu\n");
      std::exit(0);
    } else usage("unknown argument " + a);
  }
  if (c.epochs < 1 || c.batch < 1 || c.hidden < 1 || c.layers < 1 || c.log_every < 1)
    usage("--epochs, --batch, --hidden, --layers and --log-every must be >= 1");
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  const Config cfg = parse(argc, argv);
  std::vector<Recipe> recipes;
  try {
    for (const auto& name : cfg.optimizers) recipes.push_back(recipe_for(name, cfg.hidden));
  } catch (const std::exception& e) {
    usage(e.what());
  }
  if (!fmnist::available(cfg.data_dir)) {
    std::fprintf(stderr, "dion_example_gpu_training: Fashion-MNIST not found in %s (Debian: dataset-fashion-mnist; or --data DIR)\n",
                 cfg.data_dir.c_str());
    return 77;
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "dion_example_gpu_training: no CUDA device: skipped\n");
    return 77;
  }
  cudaStream_t stream = nullptr;
  int failures = 0;
  try {
    const auto t0 = Clock::now();
    cudaDeviceProp prop{};
    CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));  // the trainer's stream
    Data d;
    {
      const auto train = fmnist::load(cfg.data_dir, "train", cfg.train_limit);
      const auto test = fmnist::load(cfg.data_dir, "t10k", cfg.test_limit);
      if (train.count < cfg.batch) usage("--train is smaller than one batch");
      d.train = upload(train, stream);
      d.test = upload(test, stream);
    }
    Mlp model(cfg, stream);
    std::ostringstream ms;
    ms << "MLP 784";
    for (const auto& L : model.layers) ms << "-" << L.out;
    ms << ", ReLU, softmax cross-entropy";
    const std::string model_name = ms.str();
    const std::string device = std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ")";
    std::printf("dion %s GPU training: %s; Fashion-MNIST from %s (%lld train / %lld test images, loaded and uploaded in "
                "%.1f s)\n",
                dion::version_string, device.c_str(), cfg.data_dir.c_str(), static_cast<long long>(d.train.count),
                static_cast<long long>(d.test.count), seconds_since(t0));
    std::printf("model: %s (%lld parameters in one arena); %d epoch(s) of %lld steps, batch %d, seed %llu, %s GEMMs; "
                "lr decays linearly to 0\n\n",
                model_name.c_str(), static_cast<long long>(model.num_params()), cfg.epochs,
                static_cast<long long>(d.train.count / cfg.batch), cfg.batch, static_cast<unsigned long long>(cfg.seed),
                cfg.tf32 ? "TF32" : "FP32");

    std::vector<RunResult> results;
    for (const auto& r : recipes) {
      std::printf("%s: %s\n", r.label.c_str(), describe(r, model).c_str());
      results.push_back(run(r, model, d, cfg, stream));
    }
    const double total = seconds_since(t0);
    const std::string md = table(results);
    std::printf("\n%s\n", md.c_str());
    write_outputs(results, cfg, d, model_name, device, total, md);
    std::printf("total %.1f s; results in %s/ (losses.csv, summary.csv, table.md, results.json)\n", total,
                cfg.out_dir.c_str());
    for (const auto& r : results) {
      if (!(r.final_train_loss < r.first_loss)) {
        std::fprintf(stderr, "FAILED: %s did not lower the training loss (%.4f -> %.4f)\n", r.recipe.label.c_str(),
                     r.first_loss, r.final_train_loss);
        ++failures;
      }
      if (!(r.test_accuracy >= cfg.min_accuracy)) {
        std::fprintf(stderr, "FAILED: %s test accuracy %.2f%% is below %.0f%%\n", r.recipe.label.c_str(),
                     100.0 * r.test_accuracy, 100.0 * cfg.min_accuracy);
        ++failures;
      }
    }
  } catch (const dion::Error& e) {
    std::fprintf(stderr, "dion_example_gpu_training: dion error: %s\n", e.what());
    ++failures;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dion_example_gpu_training: %s\n", e.what());
    ++failures;
  }
  if (stream) cudaStreamDestroy(stream);
  return failures == 0 ? 0 : 1;
}
