// Catch2 2.x / 3.x compatibility for dion's tests. The build machine has Catch2 2.13 (single header
// <catch2/catch.hpp>); the GPU machine has Catch2 3 (<catch2/catch_all.hpp>). Include this header
// instead of Catch2's and use only what both versions share: TEST_CASE, SECTION, GENERATE,
// REQUIRE/CHECK(_THROWS_AS/_THROWS_WITH/_THAT), Catch::Matchers::WithinRel/WithinAbs, plus:
//   DION_CONTAINS(s)   substring matcher (Catch::Contains in 2, Catch::Matchers::ContainsSubstring in 3)
//   Approx, Catch::Approx   usable unqualified and qualified in both versions
//   DION_SKIP(msg)     skips the rest of a test case (SKIP in 3; a WARN and return in 2)
//   DION_CATCH_VERSION 2 or 3
// A translation unit that defines main() itself defines DION_CATCH_RUNNER before including this.
#pragma once

#if __has_include(<catch2/catch_all.hpp>)
#include <catch2/catch_all.hpp>
#define DION_CATCH_VERSION 3
#define DION_CONTAINS(s) ::Catch::Matchers::ContainsSubstring(s)
using Catch::Approx;
#if defined(CATCH_VERSION_MINOR) && (CATCH_VERSION_MAJOR > 3 || CATCH_VERSION_MINOR >= 3)
#define DION_SKIP(msg) SKIP(msg)
#else
#define DION_SKIP(msg) \
  do {                 \
    WARN(msg);         \
    return;            \
  } while (0)
#endif

#elif __has_include(<catch2/catch.hpp>)
#if defined(DION_CATCH_RUNNER) && !defined(CATCH_CONFIG_RUNNER) && !defined(CATCH_CONFIG_MAIN)
#define CATCH_CONFIG_RUNNER
#endif
#include <catch2/catch.hpp>
#define DION_CATCH_VERSION 2
#define DION_CONTAINS(s) ::Catch::Contains(s)
namespace Catch {
using ::Catch::Detail::Approx;
}  // namespace Catch
#define DION_SKIP(msg) \
  do {                 \
    WARN(msg);         \
    return;            \
  } while (0)

#else
#error "dion tests need Catch2 (2.x: <catch2/catch.hpp>, 3.x: <catch2/catch_all.hpp>)"
#endif
