// 06-mpi-data-parallel: data-parallel training over MPI with dion::MpiComm.
//
// What
//   Every rank fits the same weight matrix W (32 x 64) to its own slice of a least-squares problem,
//   loss(W) = |W X_r - Y_r|^2 / (2 N_r), plus a bias-like vector b trained by AdamW. Run it with
//   e.g. `mpiexec -n 4 ./dion_example_mpi_data_parallel [--optimizer muon|dion] [--steps N]`.
//   The program exits with status 1 unless the loss falls below 2% of its starting value on every
//   rank and the weights are bit-identical on all ranks.
//
// Why it looks like this
//   dion never owns your communicator: you wrap your MPI_Comm in a dion::MpiComm (dion duplicates
//   it, so your error handler and traffic are untouched) and name it in the optimizer's Mesh. A
//   data-parallel (DDP) run puts it in `Mesh::replicate`:
//     * Muon family (Muon, NorMuon, Dion2, NorDion2): like microsoft/dion, the optimizer expects the
//       gradients already averaged (what DDP does for you); here we average them ourselves with one
//       MPI_Allreduce. The optimizer then splits the orthogonalization of the matrices over the ranks
//       and all-gathers the results: bit-identical to a single process, W times less work each.
//     * Dion: with `replicate_mesh_grad_sync` (the default) the optimizer averages the gradients
//       itself (in place), or, for low-rank matrices, averages only the small P and R factors.
//   Registration and step() are collective: call them in the same order on every rank. Anything
//   that differs between ranks (a shape, a hyperparameter, a missing gradient) throws
//   dion::ConfigMismatch on every rank instead of hanging; a rank that stops responding turns into
//   dion::CommTimeout on the others after the communicator's deadline.

#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <dion/mpi.hpp>

namespace {

/// This rank's slice of loss(W) = |W X - Y|^2 / (2N): X (n x N) drawn from the rank's own seed,
/// Y = W* X with the same W* everywhere.
class LeastSquares {
 public:
  LeastSquares(std::int64_t m, std::int64_t n, std::int64_t examples, int rank) : m_(m), n_(n), N_(examples) {
    std::mt19937 shared(7), local(100 + static_cast<unsigned>(rank));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    target_.resize(static_cast<std::size_t>(m * n));
    for (auto& v : target_) v = normal(shared) / std::sqrt(static_cast<float>(n));
    bias_.resize(static_cast<std::size_t>(m));
    for (auto& v : bias_) v = normal(shared);
    x_.resize(static_cast<std::size_t>(n * N_));
    for (auto& v : x_) v = normal(local);
  }
  /// The loss at (W, b); writes the gradients into gw, gb.
  float loss_and_grad(const std::vector<float>& w, const std::vector<float>& b, std::vector<float>& gw,
                      std::vector<float>& gb) const {
    double loss = 0.0;
    std::fill(gw.begin(), gw.end(), 0.0f);
    std::fill(gb.begin(), gb.end(), 0.0f);
    std::vector<double> r(static_cast<std::size_t>(m_));
    for (std::int64_t k = 0; k < N_; ++k) {
      for (std::int64_t i = 0; i < m_; ++i) {
        double s = b[static_cast<std::size_t>(i)] - bias_[static_cast<std::size_t>(i)];
        for (std::int64_t j = 0; j < n_; ++j)
          s += (static_cast<double>(w[static_cast<std::size_t>(i * n_ + j)]) - target_[static_cast<std::size_t>(i * n_ + j)]) *
               x_[static_cast<std::size_t>(j * N_ + k)];
        r[static_cast<std::size_t>(i)] = s;
        loss += 0.5 * s * s;
      }
      for (std::int64_t i = 0; i < m_; ++i) {
        gb[static_cast<std::size_t>(i)] += static_cast<float>(r[static_cast<std::size_t>(i)] / N_);
        for (std::int64_t j = 0; j < n_; ++j)
          gw[static_cast<std::size_t>(i * n_ + j)] +=
              static_cast<float>(r[static_cast<std::size_t>(i)] * x_[static_cast<std::size_t>(j * N_ + k)] / N_);
      }
    }
    return static_cast<float>(loss / static_cast<double>(N_));
  }

 private:
  std::int64_t m_, n_, N_;
  std::vector<float> target_, bias_, x_;
};

template <class Opt>
int train(Opt& opt, dion::MpiComm& comm, bool average_grads_myself, int steps) {
  const std::int64_t m = 32, n = 64;
  const int rank = comm.rank(), size = comm.size();
  std::vector<float> w(m * n, 0.0f), gw(m * n), b(m, 0.0f), gb(m);
  LeastSquares problem(m, n, /*examples per rank=*/64, rank);

  opt.add_group().add("w", dion::host_view(w.data(), {m, n}), dion::host_view(gw.data(), {m, n}));
  opt.add_group({.algorithm = dion::Algorithm::adamw, .lr = 0.05f, .weight_decay = 0.0f})
      .add("b", dion::host_view(b.data(), {m}), dion::host_view(gb.data(), {m}));

  auto global_loss = [&](float local) {
    float sum = 0.0f;
    MPI_Allreduce(&local, &sum, 1, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    return sum / static_cast<float>(size);
  };
  const float first = global_loss(problem.loss_and_grad(w, b, gw, gb));
  float loss = first;
  for (int step = 0; step < steps; ++step) {
    if (average_grads_myself) {  // what DDP's backward hook would do
      MPI_Allreduce(MPI_IN_PLACE, gw.data(), static_cast<int>(gw.size()), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      MPI_Allreduce(MPI_IN_PLACE, gb.data(), static_cast<int>(gb.size()), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      for (auto& v : gw) v /= static_cast<float>(size);
      for (auto& v : gb) v /= static_cast<float>(size);
    }
    opt.set_lr(0, 0.05f * (1.0f - float(step) / steps));  // the same schedule on every rank
    opt.step();                                           // collective
    loss = global_loss(problem.loss_and_grad(w, b, gw, gb));
  }
  // every rank must hold the same weights
  std::vector<float> w0 = w;
  MPI_Bcast(w0.data(), static_cast<int>(w0.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
  int same = std::memcmp(w0.data(), w.data(), w.size() * sizeof(float)) == 0 ? 1 : 0, all_same = 0;
  MPI_Allreduce(&same, &all_same, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (rank == 0)
    std::printf("%d ranks: loss %.5f -> %.5f; weights identical on all ranks: %s\n", size, first, loss,
                all_same ? "yes" : "no");
  return loss < 0.02f * first && all_same ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  std::string optimizer = "muon";
  int steps = 200;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--optimizer") == 0) optimizer = argv[i + 1];
    if (std::strcmp(argv[i], "--steps") == 0) steps = std::atoi(argv[i + 1]);
  }
  int rc = 1;
  try {
    dion::MpiComm comm{MPI_COMM_WORLD, std::chrono::seconds(60)};  // dion's own duplicate, 60 s deadline
    dion::EigenBackend cpu;
    if (optimizer == "dion") {
      // Dion averages the gradients itself (replicate_mesh_grad_sync, the default)
      dion::Dion<dion::EigenBackend, dion::MpiComm> opt{cpu, {.replicate = &comm}, {.lr = 0.05f}};
      rc = train(opt, comm, /*average_grads_myself=*/false, steps);
    } else {
      dion::Muon<dion::EigenBackend, dion::MpiComm> opt{cpu, {.replicate = &comm}, {.lr = 0.05f}};
      rc = train(opt, comm, /*average_grads_myself=*/true, steps);
    }
  } catch (const dion::Error& e) {
    std::fprintf(stderr, "dion error: %s\n", e.what());
    rc = 2;
  }
  MPI_Finalize();
  return rc;
}
