// The Catch2 2.x main of dion's test binaries (Catch2 3 links Catch2::Catch2WithMain instead).
#define CATCH_CONFIG_MAIN
#include "catch_compat.hpp"
