// 07-nccl-data-parallel: data-parallel training on GPUs with dion::NcclComm, one process per GPU.
//
// What
//   Every rank (one GPU each) fits the same layer-stacked weight W (L x m x n, one cudaMalloc) to its
//   own noisy copy of a target, loss_r(W) = |W - T - E_r|^2 / 2, with biases b (L x m) on AdamW. The
//   program averages the gradients itself with ncclAllReduce(ncclAvg) on its stream (what a DDP
//   backward hook does), then calls opt.step(): Muon splits the L orthogonalizations over the ranks
//   and all-gathers the results, so every rank ends with bit-identical weights. Run it with
//     mpiexec -n <GPUs> ./dion_example_nccl_data_parallel [--optimizer muon|dion] [--steps N]
//   MPI only starts the processes and hands out the ncclUniqueId (as llm.c does); every tensor moves
//   through NCCL. Exit status 1 unless the loss falls below 5% of its start and the weights are
//   identical on every rank; 77 when no GPU is visible.
//
// Why it looks like this
//   * dion never creates or destroys your communicator or stream: you create the ncclComm_t (here
//     non-blocking, so that a stuck peer becomes dion::CommTimeout instead of a hang) and wrap it,
//     with your stream, in a dion::NcclComm named in the optimizer's Mesh (`replicate` = DDP).
//   * Registration and step() are collective: every rank registers the same parameters in the same
//     order. Parameters and gradients stay in your device buffers (dion::cuda_view).
//   * Dion (`--optimizer dion`) averages full-rank gradients itself (replicate_mesh_grad_sync),
//     or, for low-rank matrices, only its P and R factors; then the program's own average is skipped.

#include <dion/cuda.hpp>
#include <dion/nccl.hpp>

#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
void nccl_check(ncclResult_t r, ncclComm_t comm, const char* what) {
  // a non-blocking communicator returns ncclInProgress while it works: poll until it settles
  while (r == ncclInProgress && comm != nullptr) {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
    ncclCommGetAsyncError(comm, &r);
  }
  if (r != ncclSuccess) throw std::runtime_error(std::string(what) + ": " + ncclGetErrorString(r));
}

/// g = w - t - e (element-wise), and the loss |g|^2 / 2 accumulated into *loss.
__global__ void residual(const float* w, const float* t, const float* e, float* g, std::int64_t n, float* loss) {
  float part = 0.0f;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float r = w[i] - t[i] - e[i];
    g[i] = r;
    part += 0.5f * r * r;
  }
  atomicAdd(loss, part);
}

struct DeviceVec {
  float* p = nullptr;
  std::int64_t n = 0;
  explicit DeviceVec(std::int64_t count) : n(count) {
    cuda_check(cudaMalloc(&p, static_cast<std::size_t>(n) * sizeof(float)), "cudaMalloc");
  }
  DeviceVec(const DeviceVec&) = delete;
  DeviceVec& operator=(const DeviceVec&) = delete;
  ~DeviceVec() { cudaFree(p); }
  void upload(const std::vector<float>& h, cudaStream_t s) {
    cuda_check(cudaMemcpyAsync(p, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice, s), "upload");
  }
  std::vector<float> download(cudaStream_t s) const {
    std::vector<float> h(static_cast<std::size_t>(n));
    cuda_check(cudaMemcpyAsync(h.data(), p, h.size() * sizeof(float), cudaMemcpyDeviceToHost, s), "download");
    cuda_check(cudaStreamSynchronize(s), "sync");
    return h;
  }
};

std::vector<float> normals(std::size_t n, unsigned seed, float scale) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

template <class Opt>
int train(Opt& opt, ncclComm_t nccl, cudaStream_t stream, int rank, int size, bool average_grads_myself, int steps) {
  const std::int64_t L = 4, m = 128, n = 256, nw = L * m * n, nb = L * m;
  DeviceVec w(nw), gw(nw), tw(nw), ew(nw), b(nb), gb(nb), tb(nb), eb(nb), loss(2);
  w.upload(std::vector<float>(static_cast<std::size_t>(nw), 0.0f), stream);
  b.upload(std::vector<float>(static_cast<std::size_t>(nb), 0.0f), stream);
  tw.upload(normals(static_cast<std::size_t>(nw), 7, 1.0f / std::sqrt(static_cast<float>(n))), stream);  // shared
  tb.upload(normals(static_cast<std::size_t>(nb), 8, 1.0f), stream);
  ew.upload(normals(static_cast<std::size_t>(nw), 100 + static_cast<unsigned>(rank), 0.01f), stream);  // per rank
  eb.upload(normals(static_cast<std::size_t>(nb), 200 + static_cast<unsigned>(rank), 0.01f), stream);

  // Registration is collective: the same names, shapes and groups on every rank.
  auto hidden = opt.add_group();
  if constexpr (Opt::default_algorithm == dion::Algorithm::dion) {
    for (std::int64_t l = 0; l < L; ++l)  // Dion: one 2-D view per layer, into the same buffer
      hidden.add("blocks." + std::to_string(l) + ".w", dion::cuda_view(w.p + l * m * n, {m, n}),
                 dion::cuda_view(gw.p + l * m * n, {m, n}));
  } else {  // the Muon family: the stacked buffer as one (L, m, n) parameter, a batch of L matrices
    hidden.add("blocks.w", dion::cuda_view(w.p, {L, m, n}), dion::cuda_view(gw.p, {L, m, n}));
  }
  opt.add_group({.algorithm = dion::Algorithm::adamw, .lr = 0.05f, .weight_decay = 0.0f})
      .add("blocks.b", dion::cuda_view(b.p, {L, m}), dion::cuda_view(gb.p, {L, m}));

  auto forward_backward = [&]() {  // gradients into gw, gb; this rank's loss into loss.p[0]
    cuda_check(cudaMemsetAsync(loss.p, 0, 2 * sizeof(float), stream), "memset");
    residual<<<256, 256, 0, stream>>>(w.p, tw.p, ew.p, gw.p, nw, loss.p);
    residual<<<64, 256, 0, stream>>>(b.p, tb.p, eb.p, gb.p, nb, loss.p);
    cuda_check(cudaGetLastError(), "residual");
    nccl_check(ncclAllReduce(loss.p, loss.p + 1, 1, ncclFloat32, ncclAvg, nccl, stream), nccl, "loss all-reduce");
    return loss.download(stream)[1];
  };

  const float first = forward_backward();
  float last = first;
  for (int step = 0; step < steps; ++step) {
    if (average_grads_myself) {  // what DDP's backward hook does: average the gradients in place
      nccl_check(ncclAllReduce(gw.p, gw.p, static_cast<std::size_t>(nw), ncclFloat32, ncclAvg, nccl, stream), nccl,
                 "gradient all-reduce");
      nccl_check(ncclAllReduce(gb.p, gb.p, static_cast<std::size_t>(nb), ncclFloat32, ncclAvg, nccl, stream), nccl,
                 "gradient all-reduce");
    }
    opt.set_lr(0, 0.05f * (1.0f - static_cast<float>(step) / static_cast<float>(steps)));
    opt.step();  // collective, enqueued on `stream`
    last = forward_backward();
  }

  // every rank must hold the same weights: compare with rank 0's copy, broadcast through NCCL
  DeviceVec w0(nw);
  cuda_check(cudaMemcpyAsync(w0.p, w.p, static_cast<std::size_t>(nw) * sizeof(float), cudaMemcpyDeviceToDevice, stream),
             "copy");
  nccl_check(ncclBroadcast(w0.p, w0.p, static_cast<std::size_t>(nw), ncclFloat32, 0, nccl, stream), nccl, "broadcast");
  const auto mine = w.download(stream), root = w0.download(stream);
  int same = std::memcmp(mine.data(), root.data(), mine.size() * sizeof(float)) == 0 ? 1 : 0, all_same = 0;
  MPI_Allreduce(&same, &all_same, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (rank == 0)
    std::printf("%d GPU(s): loss %.4f -> %.4f (%.2f%%); weights identical on all ranks: %s\n", size, first, last,
                100.0 * last / first, all_same ? "yes" : "no");
  return last < 0.05f * first && all_same ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  std::string optimizer = "muon";
  int steps = 100;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--optimizer") == 0) optimizer = argv[i + 1];
    else if (std::strcmp(argv[i], "--steps") == 0) steps = std::atoi(argv[i + 1]);
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    if (rank == 0) std::printf("no GPU visible: skipped\n");
    MPI_Finalize();
    return 77;
  }
  int rc = 1;
  ncclComm_t nccl = nullptr;
  cudaStream_t stream = nullptr;
  try {
    cuda_check(cudaSetDevice(rank % devices), "cudaSetDevice");  // one GPU per rank on each node
    cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    ncclUniqueId id;
    if (rank == 0) nccl_check(ncclGetUniqueId(&id), nullptr, "ncclGetUniqueId");
    MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // non-blocking: dion polls with a deadline instead of hanging
    ncclResult_t r = ncclCommInitRankConfig(&nccl, size, id, rank, &config);
    nccl_check(r, nccl, "ncclCommInitRankConfig");

    dion::CudaBackend gpu{stream};
    dion::NcclComm comm{nccl, stream, std::chrono::seconds(60)};  // borrowed; 60 s deadline
    const dion::Mesh<dion::NcclComm> mesh{.replicate = &comm};
    dion::Options o{.lr = 0.05f};
    o.non_finite = dion::NonFinitePolicy::propagate;  // no screening pass (skip_step would screen on the device)
    if (optimizer == "dion") {
      dion::Dion<dion::CudaBackend, dion::NcclComm> opt{gpu, mesh, o};
      rc = train(opt, nccl, stream, rank, size, /*average_grads_myself=*/false, steps);
    } else {
      dion::Muon<dion::CudaBackend, dion::NcclComm> opt{gpu, mesh, o};
      rc = train(opt, nccl, stream, rank, size, /*average_grads_myself=*/true, steps);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
    rc = 1;
  }
  if (nccl) ncclCommDestroy(nccl);
  if (stream) cudaStreamDestroy(stream);
  MPI_Finalize();
  return rc;
}
