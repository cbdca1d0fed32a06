# Sanitizer builds and the checkpoint fuzz targets (RELIABILITY.md S1, C10).
#
#   -DDION_SANITIZE=address,undefined   every target of this build dir (dion's tests, tools, examples)
#                                       is compiled and linked with -fsanitize=<list>, non-recovering
#                                       (-fno-sanitize-recover=all: a UBSan report fails the test),
#                                       with float-cast-overflow added to `undefined` (GCC's
#                                       `undefined` omits it), frame pointers kept, and
#                                       _GLIBCXX_ASSERTIONS. Empty (default): no sanitizer.
#                                       scripts/test runs such a build in build-asan (CPU tests only).
#
# dion_add_fuzz_targets() (called from the top level when tests are built):
#   dion_fuzz_replay      tests/fuzz/fuzz_checkpoint.cpp + a plain main() that feeds every file of
#                         tests/fuzz/corpus/ to the fuzz entry point; ctest `fuzz.corpus_replay`
#                         (label fuzz). Any compiler; the sanitizer build runs it under ASan/UBSan.
#   dion_fuzz_checkpoint  the libFuzzer binary (-fsanitize=fuzzer,address,undefined); only when the
#                         compiler is Clang (scripts/fuzz configures build-fuzz with clang++).
include_guard(GLOBAL)

set(DION_SANITIZE "" CACHE STRING
    "Sanitizers for every target of this build, e.g. address,undefined (empty: none)")

if(DION_SANITIZE)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(FATAL_ERROR "dion: DION_SANITIZE needs GCC or Clang (got ${CMAKE_CXX_COMPILER_ID})")
  endif()
  string(REPLACE "," ";" _dion_san_list "${DION_SANITIZE}")
  foreach(_s IN LISTS _dion_san_list)
    if(NOT _s MATCHES "^(address|undefined|leak|float-cast-overflow|alignment|bounds|thread)$")
      message(FATAL_ERROR "dion: DION_SANITIZE entry '${_s}' is not one of address, undefined, leak, "
                          "float-cast-overflow, alignment, bounds, thread")
    endif()
  endforeach()
  set(_dion_san "${DION_SANITIZE}")
  if("undefined" IN_LIST _dion_san_list AND NOT "float-cast-overflow" IN_LIST _dion_san_list)
    string(APPEND _dion_san ",float-cast-overflow")
  endif()
  # -g1: line tables for the reports, without the full debug info that doubles compile and link time
  set(_dion_san_flags -fsanitize=${_dion_san} -fno-sanitize-recover=all -fno-omit-frame-pointer -g1)
  # Host C++ only: nvcc would not understand these (a sanitizer build is a CPU build).
  add_compile_options("$<$<COMPILE_LANGUAGE:CXX>:${_dion_san_flags}>"
                      "$<$<COMPILE_LANGUAGE:CXX>:-D_GLIBCXX_ASSERTIONS>")
  add_link_options(-fsanitize=${_dion_san})
  message(STATUS "dion: sanitizers ${_dion_san} (non-recovering)")
endif()

function(dion_add_fuzz_targets)
  set(_dir "${PROJECT_SOURCE_DIR}/tests/fuzz")
  if(NOT EXISTS "${_dir}/fuzz_checkpoint.cpp")
    return()
  endif()
  add_executable(dion_fuzz_replay "${_dir}/fuzz_checkpoint.cpp" "${_dir}/fuzz_replay_main.cpp")
  target_link_libraries(dion_fuzz_replay PRIVATE dion::dion)
  target_include_directories(dion_fuzz_replay PRIVATE "${_dir}")
  target_compile_features(dion_fuzz_replay PRIVATE cxx_std_20)
  dion_target_warnings(dion_fuzz_replay)
  add_test(NAME fuzz.corpus_replay COMMAND dion_fuzz_replay "${_dir}/corpus")
  set_tests_properties(fuzz.corpus_replay PROPERTIES LABELS fuzz TIMEOUT 300)

  if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    add_executable(dion_fuzz_checkpoint "${_dir}/fuzz_checkpoint.cpp")
    target_link_libraries(dion_fuzz_checkpoint PRIVATE dion::dion)
    target_include_directories(dion_fuzz_checkpoint PRIVATE "${_dir}")
    target_compile_features(dion_fuzz_checkpoint PRIVATE cxx_std_20)
    target_compile_options(dion_fuzz_checkpoint PRIVATE -g -O1 -fsanitize=fuzzer,address,undefined
                           -fno-sanitize-recover=all)
    target_link_options(dion_fuzz_checkpoint PRIVATE -fsanitize=fuzzer,address,undefined)
    # Replay of the corpus through libFuzzer itself (-runs=0), next to the plain replay.
    add_test(NAME fuzz.libfuzzer_corpus
             COMMAND dion_fuzz_checkpoint -runs=0 -rss_limit_mb=1024 "${_dir}/corpus")
    set_tests_properties(fuzz.libfuzzer_corpus PROPERTIES LABELS fuzz TIMEOUT 300)
  endif()
endfunction()
