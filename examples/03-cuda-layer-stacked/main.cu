// 03-cuda-layer-stacked: dion on the GPU the way an llm.c-style trainer holds its parameters.
//
// What it shows
//   - The program owns everything: it creates its own cudaStream_t, allocates parameters and gradients
//     with cudaMalloc, computes the gradients with its own kernel. dion::CudaBackend borrows the stream;
//     the optimizer works on views (dion::cuda_view) of that memory and updates it in place.
//   - Layer-stacked buffers. llm.c keeps the same weight of every layer in one allocation of shape
//     (L, m, n). That buffer is registered as ONE 3-D parameter: Muon treats it as a batch of L matrices
//     and orthogonalizes each layer's m x n matrix on its own (not the flattened (L*m) x n matrix); its
//     momentum is one (L, m, n) state tensor. The check after the first step below shows it: every
//     layer's update has the Frobenius norm of an orthogonalized m x n matrix.
//   - The vectors go to element-wise algorithms in groups of their own: the (L, m) biases on AdamW,
//     the (L, n) gains on Lion (shapes cannot tell dion their role, the groups do).
//   - CUDA graphs. step() enqueues work on the stream and never synchronizes or allocates, so it can
//     be captured once and replayed. The learning rate of each replay comes from set_lr(): the graph
//     re-reads the host value at every launch. The check at the end replays the graph with lr = 0
//     (parameters must stay bit for bit the same) and then with lr > 0 (they must move).
//   - The default NonFinitePolicy (skip_step) is captured too: the NaN/Inf check runs on the device
//     and predicates the step's writes, so a replay with a bad gradient changes nothing.
//
// The toy problem: per layer l, loss = |W_l - T_l|^2 / 2 + |b_l - c_l|^2 / 2 + |s_l - u_l|^2 / 2 with
// random targets; the gradient (W - T, b - c, s - u) is one kernel launch per buffer. 40 eager steps,
// then the step captured in a CUDA graph and replayed 60 times while the lr decays linearly to 0.
//
// Exit status: 0 when the loss fell below a quarter of its start, the first update was orthogonal per
// layer, and the lr = 0 / lr > 0 replays behaved; 1 otherwise; 77 without a CUDA device.

#include <dion/cuda.hpp>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#define CHECK_CUDA(call)                                                                                    \
  do {                                                                                                      \
    const cudaError_t err_ = (call);                                                                        \
    if (err_ != cudaSuccess) {                                                                              \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_));         \
      std::exit(1);                                                                                         \
    }                                                                                                       \
  } while (0)

namespace {

// ---- the program's own kernels -------------------------------------------------------------------

/// g = x - target (the gradient of |x - target|^2 / 2), over n elements.
__global__ void residual_grad(const float* x, const float* target, float* g, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n;
       i += std::int64_t{gridDim.x} * blockDim.x)
    g[i] = x[i] - target[i];
}

/// *out = sum((x - target)^2) / 2, one block of 1024 threads (deterministic order).
__global__ void half_sq_dist(const float* x, const float* target, std::int64_t n, float* out) {
  __shared__ double part[1024];
  double s = 0;
  for (std::int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double d = static_cast<double>(x[i]) - target[i];
    s += d * d;
  }
  part[threadIdx.x] = s;
  __syncthreads();
  for (unsigned w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = static_cast<float>(0.5 * part[0]);
}

/// A parameter, its gradient and its target: three device buffers the program owns.
struct Buffer {
  std::int64_t n = 0;
  float *x = nullptr, *g = nullptr, *t = nullptr;
  explicit Buffer(std::int64_t count) : n(count) {
    CHECK_CUDA(cudaMalloc(&x, n * sizeof(float)));
    CHECK_CUDA(cudaMalloc(&g, n * sizeof(float)));
    CHECK_CUDA(cudaMalloc(&t, n * sizeof(float)));
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() {
    cudaFree(x);
    cudaFree(g);
    cudaFree(t);
  }
  void upload(float* dst, const std::vector<float>& v, cudaStream_t s) const {
    CHECK_CUDA(cudaMemcpyAsync(dst, v.data(), n * sizeof(float), cudaMemcpyHostToDevice, s));
    CHECK_CUDA(cudaStreamSynchronize(s));  // v is pageable and may go away
  }
  std::vector<float> download(const float* src, cudaStream_t s) const {
    std::vector<float> v(static_cast<std::size_t>(n));
    CHECK_CUDA(cudaMemcpyAsync(v.data(), src, n * sizeof(float), cudaMemcpyDeviceToHost, s));
    CHECK_CUDA(cudaStreamSynchronize(s));
    return v;
  }
  void launch_grad(cudaStream_t s) const {
    residual_grad<<<static_cast<unsigned>(std::min<std::int64_t>((n + 255) / 256, 1024)), 256, 0, s>>>(x, t, g, n);
    CHECK_CUDA(cudaGetLastError());
  }
};

std::vector<float> normal(std::mt19937& rng, std::int64_t n, float mean, float stddev) {
  std::normal_distribution<float> d(mean, stddev);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& e : v) e = d(rng);
  return v;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "no CUDA device: skipped\n");
    return 77;
  }
  const std::int64_t L = 4, m = 256, n = 512;  // 4 layers of a 256 x 512 weight (fan_out 256, fan_in 512)
  const int eager_steps = 40, replays = 60, total = eager_steps + replays;
  const float lr = 0.05f, bias_lr = 0.01f, gain_lr = 0.005f;

  cudaStream_t stream = nullptr;  // the trainer's stream; dion only borrows it
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  // User-owned, layer-stacked buffers: W (L, m, n), b (L, m), s (L, n), each one cudaMalloc.
  Buffer W(L * m * n), b(L * m), s(L * n);
  std::mt19937 rng(7);
  W.upload(W.x, std::vector<float>(static_cast<std::size_t>(W.n), 0.0f), stream);
  W.upload(W.t, normal(rng, W.n, 0.0f, 1.0f / std::sqrt(float(n))), stream);  // singular values ~[0.3, 1.7]
  b.upload(b.x, std::vector<float>(static_cast<std::size_t>(b.n), 0.0f), stream);
  b.upload(b.t, normal(rng, b.n, 0.0f, 0.1f), stream);
  s.upload(s.x, std::vector<float>(static_cast<std::size_t>(s.n), 1.0f), stream);
  s.upload(s.t, normal(rng, s.n, 1.0f, 0.1f), stream);

  float* loss_dev = nullptr;  // three partial losses
  CHECK_CUDA(cudaMalloc(&loss_dev, 3 * sizeof(float)));
  auto loss = [&] {
    half_sq_dist<<<1, 1024, 0, stream>>>(W.x, W.t, W.n, loss_dev);
    half_sq_dist<<<1, 1024, 0, stream>>>(b.x, b.t, b.n, loss_dev + 1);
    half_sq_dist<<<1, 1024, 0, stream>>>(s.x, s.t, s.n, loss_dev + 2);
    CHECK_CUDA(cudaGetLastError());
    float h[3];
    CHECK_CUDA(cudaMemcpyAsync(h, loss_dev, sizeof h, cudaMemcpyDeviceToHost, stream));
    CHECK_CUDA(cudaStreamSynchronize(stream));
    return std::vector<float>{h[0], h[1], h[2]};
  };
  auto grads = [&] {
    W.launch_grad(stream);
    b.launch_grad(stream);
    s.launch_grad(stream);
  };

  int failures = 0;
  try {
    dion::CudaBackend be{stream};
    dion::Options opts;
    opts.lr = lr;
    dion::Muon<dion::CudaBackend> opt{be, opts};
    // Group 0: the stacked weight, ONE parameter of shape (L, m, n): a batch of L matrices for Muon.
    opt.add_group().add("blocks.weight", dion::cuda_view(W.x, {L, m, n}), dion::cuda_view(W.g, {L, m, n}));
    // Group 1: the stacked biases (L, m) on AdamW. Group 2: the stacked gains (L, n) on Lion.
    opt.add_group({.algorithm = dion::Algorithm::adamw, .lr = bias_lr, .weight_decay = 0.0f})
        .add("blocks.bias", dion::cuda_view(b.x, {L, m}), dion::cuda_view(b.g, {L, m}));
    opt.add_group({.algorithm = dion::Algorithm::lion, .lr = gain_lr, .weight_decay = 0.0f})
        .add("blocks.gain", dion::cuda_view(s.x, {L, n}), dion::cuda_view(s.g, {L, n}));
    std::printf("dion %s on %s: registered %zu parameters in %d groups; optimizer state %lld bytes:\n",
                dion::version_string, dion::CudaBackend::name, opt.num_params(), opt.num_groups(),
                static_cast<long long>(opt.state_bytes()));
    for (const auto& st : opt.state())
      std::printf("  %-24s %s\n", st.name.c_str(), st.view.shape.str().c_str());

    const float base_lr[3] = {lr, bias_lr, gain_lr};
    auto schedule = [&](int step, float factor = 1.0f) {  // linear decay to 0; dion reads it at each step
      const float scale = factor * (1.0f - static_cast<float>(step) / static_cast<float>(total));
      for (int g = 0; g < 3; ++g) opt.set_lr(g, base_lr[g] * scale);
    };

    const auto l0 = loss();
    std::printf("\nstart: loss %.4f (weights %.4f, biases %.4f, gains %.4f)\n", l0[0] + l0[1] + l0[2], l0[0], l0[1],
                l0[2]);

    // ---- eager steps ----------------------------------------------------------------------------
    for (int step = 0; step < eager_steps; ++step) {
      grads();
      schedule(step);
      opt.step();  // enqueued on `stream`
      if (step == 0) {
        // W started at 0, so after one step W_l = -lr_l * update_l: Muon's update of each layer is an
        // orthogonalized m x n matrix scaled by sqrt(fan_out / fan_in), |.|_F = sqrt(min(m, n)) * that.
        const auto w = W.download(W.x, stream);
        const double expect = lr * std::sqrt(double(m) / double(n)) * std::sqrt(double(std::min(m, n)));
        std::printf("after step 1, |W_l|_F / (lr * sqrt(m/n) * sqrt(min(m,n))) per layer:");
        for (std::int64_t l = 0; l < L; ++l) {
          double f = 0;
          for (std::int64_t i = l * m * n; i < (l + 1) * m * n; ++i) f += double(w[i]) * w[i];
          const double ratio = std::sqrt(f) / expect;
          std::printf(" %.3f", ratio);
          if (!(ratio > 0.7 && ratio < 1.2)) ++failures;  // Polar Express in bf16: singular values near 1
        }
        std::printf("  (1 = every layer orthogonalized on its own)\n");
      }
    }
    const auto l1 = loss();
    std::printf("after %d eager steps: loss %.4f\n", eager_steps, l1[0] + l1[1] + l1[2]);

    // ---- capture one step() into a CUDA graph, replay it with a changing lr --------------------
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    opt.step();  // recorded, not run
    CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
    CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    for (int step = eager_steps; step < total; ++step) {
      grads();
      schedule(step);  // set_lr between replays: the graph re-reads the value at launch
      CHECK_CUDA(cudaGraphLaunch(exec, stream));
    }
    const auto l2 = loss();
    const double start = l0[0] + l0[1] + l0[2], end = l2[0] + l2[1] + l2[2];
    std::printf("after %d graph replays: loss %.4f (weights %.4f, biases %.4f, gains %.4f), %.2f%% of the start\n",
                replays, end, l2[0], l2[1], l2[2], 100.0 * end / start);
    if (!(end < 0.25 * start)) ++failures;

    // ---- the replay honours set_lr: lr = 0 leaves the parameters bit for bit, lr > 0 moves them ----
    const auto before = W.download(W.x, stream), bb = b.download(b.x, stream), sb = s.download(s.x, stream);
    grads();
    for (int g = 0; g < 3; ++g) opt.set_lr(g, 0.0f);
    CHECK_CUDA(cudaGraphLaunch(exec, stream));
    const bool unchanged = W.download(W.x, stream) == before && b.download(b.x, stream) == bb &&
                           s.download(s.x, stream) == sb;
    grads();
    schedule(total - 1);
    CHECK_CUDA(cudaGraphLaunch(exec, stream));
    const bool moved = W.download(W.x, stream) != before;
    std::printf("graph replay with lr = 0: parameters %s; with lr = %.5f: %s\n",
                unchanged ? "unchanged (bitwise)" : "CHANGED", opt.lr(0), moved ? "moved" : "DID NOT MOVE");
    if (!unchanged || !moved) ++failures;
    CHECK_CUDA(cudaGraphExecDestroy(exec));
    CHECK_CUDA(cudaGraphDestroy(graph));
    CHECK_CUDA(cudaStreamSynchronize(stream));
  } catch (const dion::Error& e) {
    std::fprintf(stderr, "dion error: %s\n", e.what());
    ++failures;
  }
  CHECK_CUDA(cudaFree(loss_dev));
  std::printf("%s\n", failures == 0 ? "check: OK" : "check: FAILED");
  // the optimizer (and its backend) are gone before the stream they borrowed
  CHECK_CUDA(cudaStreamDestroy(stream));
  return failures == 0 ? 0 : 1;
}
