// Checks the MPI test harness: mpiexec (as root, oversubscribed), the MPI main and a collective.
#include <mpi.h>

#include "catch_compat.hpp"

TEST_CASE("harness: MPI ranks see each other", "[harness][mpi]") {
  int rank = -1, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int sum = 0;
  MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  CHECK(size >= 2);
  CHECK(sum == size * (size - 1) / 2);
}
