# Test registration for dion (not installed). Included by the top-level CMakeLists.txt when
# DION_BUILD_TESTS is ON, so tests/, tools/, examples/ and bench/ can all call the functions below.
#
#   dion_add_test_binary(<name>
#     SOURCES <file>...              # .cpp, or .cu for GPU binaries
#     [LABELS <label>...]            # ctest labels (default: unit; gpu / mpi are added automatically;
#                                    #   one label only unless NO_DISCOVER, a Catch.cmake limit)
#     [LIBRARIES <target>...]        # extra link libraries (dion::dion and Catch2 are always linked)
#     [DEFINITIONS <def>...]         # extra compile definitions
#     [GPU]                          # needs dion::cuda: label gpu, SKIP_RETURN_CODE 77, links dion::cuda
#                                    #   and the GPU main (exits 77 without a device); collected by
#                                    #   scripts/build-gpu. Skipped (with a message) without CUDA.
#     [MPI_NP <n>]                   # run under mpiexec with n ranks: label mpi, links dion::mpi and the
#                                    #   MPI main (MPI_Init, failures MAX-reduced over ranks)
#     [CUSTOM_MAIN]                  # the sources define main() themselves (Catch2 without main)
#     [NO_DISCOVER]                  # one ctest entry for the whole binary instead of one per TEST_CASE
#     [TIMEOUT <seconds>]            # ctest timeout (default 600; MPI runs also get mpiexec --timeout)
#     [ARGS <arg>...])               # extra arguments for the test binary
#
# Every test binary gets the include path tests/ (for "catch_compat.hpp", "test_data.hpp") and the
# compile definition DION_TEST_DATA_DIR="<source>/tests/data".
include_guard(GLOBAL)

# --- Catch2: v3 (Catch2::Catch2WithMain) or v2 (Catch2::Catch2 + our tests/main.cpp) --------------
find_package(Catch2 REQUIRED)
if(NOT DEFINED Catch2_VERSION_MAJOR OR Catch2_VERSION_MAJOR STREQUAL "")
  string(REGEX MATCH "^[0-9]+" Catch2_VERSION_MAJOR "${Catch2_VERSION}")
endif()
message(STATUS "dion tests: Catch2 ${Catch2_VERSION}")

set(DION_TESTS_DIR "${dion_SOURCE_DIR}/tests")
set(DION_TEST_DATA_DIR "${DION_TESTS_DIR}/data")

# Test discovery (one ctest entry per TEST_CASE) uses Catch2's own Catch.cmake from either version.
option(DION_TEST_DISCOVERY "Register one ctest test per Catch2 TEST_CASE" ON)
if(DION_TEST_DISCOVERY)
  list(APPEND CMAKE_MODULE_PATH "${Catch2_DIR}")
  include(Catch OPTIONAL RESULT_VARIABLE _dion_catch_module)
  if(NOT _dion_catch_module)
    message(STATUS "dion tests: Catch.cmake not found next to Catch2's config; one ctest per binary")
    set(DION_TEST_DISCOVERY OFF)
  endif()
endif()

# dion_test_common: what every test translation unit needs.
add_library(dion_test_common INTERFACE)
target_link_libraries(dion_test_common INTERFACE dion::dion)
target_include_directories(dion_test_common INTERFACE "${DION_TESTS_DIR}")
target_compile_definitions(dion_test_common INTERFACE "DION_TEST_DATA_DIR=\"${DION_TEST_DATA_DIR}\"")

# dion_catch: Catch2 without a main; dion_catch_main: Catch2 with the default main.
add_library(dion_catch INTERFACE)
add_library(dion_catch_main INTERFACE)
if(Catch2_VERSION_MAJOR GREATER_EQUAL 3)
  target_link_libraries(dion_catch INTERFACE Catch2::Catch2)
  target_link_libraries(dion_catch_main INTERFACE Catch2::Catch2WithMain)
else()
  target_link_libraries(dion_catch INTERFACE Catch2::Catch2)
  # Catch2 2's main is compiled once (CATCH_CONFIG_MAIN) and linked into every binary.
  add_library(dion_catch2_v2_main STATIC "${DION_TESTS_DIR}/main.cpp")
  target_link_libraries(dion_catch2_v2_main PUBLIC Catch2::Catch2 dion_test_common)
  target_compile_features(dion_catch2_v2_main PUBLIC cxx_std_20)
  target_link_libraries(dion_catch_main INTERFACE dion_catch2_v2_main)
endif()

# Runtime helpers for MPI and GPU binaries (built on first use).
function(_dion_test_runner_library name source)
  if(TARGET ${name})
    return()
  endif()
  add_library(${name} STATIC "${DION_TESTS_DIR}/${source}")
  target_link_libraries(${name} PUBLIC dion_catch dion_test_common ${ARGN})
  target_compile_features(${name} PUBLIC cxx_std_20)
  dion_target_warnings(${name})
endfunction()

# Open MPI runs as root and beyond the core count only when told so (CI runs as root on 2 cores).
# Open MPI gets --allow-run-as-root --oversubscribe --bind-to none --timeout; DION_MPIEXEC_FLAGS
# adds more (e.g. "-x;LSAN_OPTIONS" for sanitizer runs).
set(DION_MPIEXEC_FLAGS "" CACHE STRING "Extra flags for mpiexec in MPI tests (a ;-list)")
if(TARGET dion::mpi AND MPIEXEC_EXECUTABLE)
  execute_process(COMMAND "${MPIEXEC_EXECUTABLE}" --version
                  OUTPUT_VARIABLE _dion_mpiexec_version ERROR_QUIET RESULT_VARIABLE _rc)
  if(_dion_mpiexec_version MATCHES "Open MPI|OpenRTE")
    set(_dion_openmpi ON)
  endif()
endif()

function(dion_add_test_binary name)
  cmake_parse_arguments(PARSE_ARGV 1 arg "GPU;CUSTOM_MAIN;NO_DISCOVER" "MPI_NP;TIMEOUT"
                        "SOURCES;LABELS;LIBRARIES;DEFINITIONS;ARGS")
  if(arg_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "dion_add_test_binary(${name}): unknown arguments ${arg_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT arg_SOURCES)
    message(FATAL_ERROR "dion_add_test_binary(${name}): SOURCES is empty")
  endif()
  if(NOT arg_TIMEOUT)
    set(arg_TIMEOUT 600)
  endif()
  set(_labels ${arg_LABELS})
  set(_libs ${arg_LIBRARIES})

  if(arg_GPU)
    if(NOT TARGET dion::cuda OR NOT DION_CUDA_LANGUAGE)
      message(STATUS "dion tests: ${name} skipped (needs dion::cuda and a CUDA compiler)")
      return()
    endif()
    list(APPEND _labels gpu)
    list(APPEND _libs dion::cuda)
  endif()
  if(arg_MPI_NP)
    if(NOT TARGET dion::mpi)
      message(STATUS "dion tests: ${name} skipped (needs dion::mpi)")
      return()
    endif()
    list(APPEND _labels mpi)
    list(APPEND _libs dion::mpi)
  endif()

  # The main: MPI main, else GPU main, else the default Catch2 main.
  if(arg_CUSTOM_MAIN)
    list(APPEND _libs dion_catch)
  elseif(arg_MPI_NP)
    _dion_test_runner_library(dion_test_mpi_main mpi_main.cpp dion::mpi)
    list(APPEND _libs dion_test_mpi_main)
  elseif(arg_GPU)
    _dion_test_runner_library(dion_test_gpu_main gpu_main.cpp CUDA::cudart)
    list(APPEND _libs dion_test_gpu_main)
  else()
    list(APPEND _libs dion_catch_main)
  endif()

  add_executable(${name} ${arg_SOURCES})
  target_link_libraries(${name} PRIVATE dion_catch dion_test_common ${_libs})
  target_compile_features(${name} PRIVATE cxx_std_20)
  if(arg_DEFINITIONS)
    target_compile_definitions(${name} PRIVATE ${arg_DEFINITIONS})
  endif()
  dion_target_warnings(${name})
  if(NOT _labels)
    set(_labels unit)
  endif()
  list(REMOVE_DUPLICATES _labels)

  if(arg_GPU)
    dion_mark_gpu_binary(${name} KIND test ARGS ${arg_ARGS})
  endif()

  if(arg_MPI_NP)
    set(_flags "")
    if(_dion_openmpi)
      # mpiexec's own timeout fires first, so a hang fails with the ranks' state reported.
      math(EXPR _mpi_timeout "${arg_TIMEOUT} - 10")
      if(_mpi_timeout LESS 5)
        set(_mpi_timeout ${arg_TIMEOUT})
      endif()
      set(_flags --allow-run-as-root --oversubscribe --bind-to none --timeout ${_mpi_timeout}
                 --report-state-on-timeout)
    endif()
    list(APPEND _flags ${DION_MPIEXEC_FLAGS})
    add_test(NAME ${name}
             COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${arg_MPI_NP} ${_flags}
                     ${MPIEXEC_PREFLAGS} $<TARGET_FILE:${name}> ${MPIEXEC_POSTFLAGS} ${arg_ARGS})
    # Ranks oversubscribe the 2 cores: never run next to another test.
    set_tests_properties(${name} PROPERTIES LABELS "${_labels}" TIMEOUT ${arg_TIMEOUT} RUN_SERIAL TRUE)
    if(arg_GPU)
      set_tests_properties(${name} PROPERTIES SKIP_RETURN_CODE 77)  # no (or too few) GPUs
    endif()
  elseif(arg_GPU OR arg_NO_DISCOVER OR NOT DION_TEST_DISCOVERY)
    # GPU binaries are never run at build time (discovery would execute them here).
    add_test(NAME ${name} COMMAND ${name} ${arg_ARGS})
    set_tests_properties(${name} PROPERTIES LABELS "${_labels}" TIMEOUT ${arg_TIMEOUT})
    if(arg_GPU)
      set_tests_properties(${name} PROPERTIES SKIP_RETURN_CODE 77)
    endif()
  else()
    # Catch.cmake forwards PROPERTIES as a flat list, so a discovered test carries one label.
    list(LENGTH _labels _nlabels)
    if(_nlabels GREATER 1)
      message(FATAL_ERROR "dion_add_test_binary(${name}): one label only with test discovery "
                          "(got ${_labels}); add NO_DISCOVER for more")
    endif()
    catch_discover_tests(${name}
      TEST_PREFIX "${name}:"
      EXTRA_ARGS ${arg_ARGS}
      PROPERTIES LABELS "${_labels}" TIMEOUT ${arg_TIMEOUT})
  endif()
endfunction()

# dion_add_header_check(): one translation unit per public header that includes only that header
# (DESIGN.md §4 rule 9), compiled into object libraries. Core headers are compiled with dion::dion
# alone (so a core header that pulls in CUDA, MPI or NCCL fails); headers of a component (a path
# part named cuda / mpi / nccl, or *.cuh) are compiled with that component, as CUDA for cuda/nccl,
# and only when it is enabled.
function(dion_add_header_check)
  set(_include_dir "${dion_SOURCE_DIR}/include")
  file(GLOB_RECURSE _headers CONFIGURE_DEPENDS RELATIVE "${_include_dir}"
       "${_include_dir}/dion/*.hpp" "${_include_dir}/dion/*.h" "${_include_dir}/dion/*.cuh")
  list(SORT _headers)
  set(_gen_dir "${CMAKE_CURRENT_BINARY_DIR}/header_check")
  foreach(_set core cuda mpi nccl)
    set(_srcs_${_set} "")
  endforeach()
  foreach(_h IN LISTS _headers)
    set(_word_end "([/_.-]|$)")
    if(_h MATCHES "(^|[/_.-])nccl${_word_end}")
      set(_set nccl)
    elseif(_h MATCHES "(^|[/_.-])mpi${_word_end}")
      set(_set mpi)
    elseif(_h MATCHES "(^|[/_.-])cuda${_word_end}" OR _h MATCHES "\\.cuh$")
      set(_set cuda)
    else()
      set(_set core)
    endif()
    if(_set STREQUAL "core" OR _set STREQUAL "mpi")
      set(_ext cpp)
    else()
      set(_ext cu)
    endif()
    string(MAKE_C_IDENTIFIER "${_h}" _id)
    set(_src "${_gen_dir}/${_id}.${_ext}")
    # Included twice: the second inclusion checks the include guard / #pragma once.
    file(CONFIGURE OUTPUT "${_src}" CONTENT
         "// Generated: checks that <${_h}> compiles on its own.\n#include <${_h}>\n#include <${_h}>\n"
         @ONLY)
    list(APPEND _srcs_${_set} "${_src}")
  endforeach()

  set(_checked "")
  foreach(_set core cuda mpi nccl)
    if(NOT _srcs_${_set})
      continue()
    endif()
    if(_set STREQUAL "core")
      set(_target dion_header_check)
      set(_link dion::dion)
    else()
      set(_target dion_header_check_${_set})
      set(_link dion::${_set})
      list(LENGTH _srcs_${_set} _n)
      if(NOT TARGET dion::${_set})
        message(STATUS "dion tests: ${_n} ${_set} header(s) not checked (dion::${_set} not enabled)")
        continue()
      endif()
      if(NOT _set STREQUAL "mpi" AND NOT DION_CUDA_LANGUAGE)
        message(STATUS "dion tests: ${_n} ${_set} header(s) not checked (no CUDA compiler)")
        continue()
      endif()
    endif()
    add_library(${_target} OBJECT ${_srcs_${_set}})
    target_link_libraries(${_target} PRIVATE ${_link})
    target_compile_features(${_target} PRIVATE cxx_std_20)
    dion_target_warnings(${_target})
    list(LENGTH _srcs_${_set} _n)
    list(APPEND _checked "${_set}: ${_n}")
  endforeach()
  message(STATUS "dion tests: header self-containment check [${_checked}]")
endfunction()
