// main() of dion's MPI test binaries (RELIABILITY.md §4): MPI_Init_thread, run Catch2 on every
// rank, then MAX-reduce the failure counts so every rank (and mpiexec) reports the same result.
// Tests must not REQUIRE between collectives on one rank only: CHECK, or agree first.
#define DION_CATCH_RUNNER
#include <mpi.h>

#include "catch_compat.hpp"

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int rc = 0;
  {
    Catch::Session session;
    rc = session.applyCommandLine(argc, argv);
    if (rc == 0) rc = session.run();
  }
  int worst = 0;
  MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
