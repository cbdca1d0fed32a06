// Compiled by the fast_math_* tests (tests/CMakeLists.txt): fine as it is, and must be rejected by
// dion's headers under -ffast-math or -ffinite-math-only (RELIABILITY.md N16).
#include "dion/core/error.hpp"

int main() { return 0; }
