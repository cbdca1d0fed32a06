// Checks the test harness itself: the Catch2 2/3 compatibility layer and the test-data lookup.
#include <stdexcept>
#include <string>

#include "catch_compat.hpp"
#include "test_data.hpp"

TEST_CASE("harness: catch_compat matchers and Approx work with this Catch2", "[harness]") {
  CHECK((DION_CATCH_VERSION == 2 || DION_CATCH_VERSION == 3));
  REQUIRE_THROWS_WITH(throw std::runtime_error("lr must be finite, got nan"), DION_CONTAINS("finite"));
  REQUIRE_THROWS_AS(throw std::invalid_argument("x"), std::invalid_argument);
  CHECK(0.1 + 0.2 == Approx(0.3));
  CHECK(1.0f == Catch::Approx(1.0f + 1e-7f));
  CHECK_THAT(1.0, Catch::Matchers::WithinRel(1.0 + 1e-9, 1e-6));
  const int n = GENERATE(1, 2, 3);
  CHECK(n > 0);
}

TEST_CASE("harness: test data directory resolves", "[harness]") {
  const auto dir = dion_test::data_dir();
  INFO("data dir: " << dir.string());
  CHECK_FALSE(dir.empty());
  CHECK(dion_test::data_path("golden/index.json").filename() == "index.json");
}
