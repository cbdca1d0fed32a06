// A rank that stops participating (RELIABILITY.md X7): the others raise dion::CommTimeout within
// the communicator's deadline instead of hanging, the communicator is poisoned, and the optimizer's
// next step throws CommPoisoned at once. Runs in its own mpiexec (the abandoned collective is
// completed by the silent rank afterwards, so the job still finalizes cleanly).
#include <chrono>
#include <thread>

#include "mpi/mpi_test_util.hpp"

using namespace dion_mpi_test;

TEST_CASE("distributed: a silent rank makes the others raise CommTimeout within the deadline", "[mpi][timeout]") {
  const auto deadline = std::chrono::milliseconds(1500);
  dion::MpiComm comm{MPI_COMM_WORLD, deadline};
  const int W = comm.size(), me = comm.rank();
  dion::EigenBackend be;
  std::vector<float> x(6 * 10, 0.5f), g(6 * 10, 0.1f);
  dion::Muon<dion::EigenBackend, dion::MpiComm> opt{be, {.replicate = &comm}, {}};
  opt.add_group().add("w", dion::host_view(x.data(), {6, 10}), dion::host_view(g.data(), {6, 10}));
  opt.step();  // everyone participates
  if (W == 1) return;

  const SilentRank r = silent_rank_0(opt, me, deadline, [] {});
  if (me != 0) {
    CHECK(r.message.find("did not complete within") != std::string::npos);
    CHECK(comm.poisoned());
  }
  // Complete the collective the others abandoned (the step's first all-reduce), so that their
  // requests finish and the job finalizes: rank 0 posts its matching half now.
  if (me == 0) {
    // (has a gradient, lacks one) for the one parameter, the non-finite flag; non-blocking, because
    // a blocking collective does not match a non-blocking one (MPI-3 §5.12)
    int v[3] = {0, 0, 0};
    MPI_Request rq;
    MPI_Iallreduce(MPI_IN_PLACE, v, 3, MPI_INT, MPI_MAX, comm.native(), &rq);
    MPI_Wait(&rq, MPI_STATUS_IGNORE);
  }
  CHECK(sum_over_ranks(r.timeouts) == W - 1);
  CHECK(sum_over_ranks(r.poisoned) == W - 1);
  // within the deadline plus polling slack (2 cores, oversubscribed)
  CHECK(max_over_ranks(r.waited) < 1.5 + 2.0);
  CHECK(max_over_ranks(r.waited) >= (W > 1 ? 1.4 : 0.0));
}
