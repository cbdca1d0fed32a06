# Builds tests/package/ (a consumer of dion) and runs it. Called by the package_* ctest tests:
#   cmake -DMODE=install|subdirectory -DDION_SOURCE_DIR=... -DWORK_DIR=... -DGENERATOR=...
#         -DCXX_COMPILER=... -DBUILD_TYPE=... -DEXPECT_VERSION=x.y.z -DCOMPONENTS=cuda,mpi
#         [-DCUDA_COMPILER=...] -P run.cmake
# install:      configure dion's source tree afresh (its own programs off), build, `cmake --install`
#               into WORK_DIR/prefix, then build the consumer with find_package(dion).
# subdirectory: build the consumer with add_subdirectory(DION_SOURCE_DIR).
cmake_minimum_required(VERSION 3.25)

foreach(_v MODE DION_SOURCE_DIR WORK_DIR GENERATOR CXX_COMPILER EXPECT_VERSION)
  if(NOT DEFINED ${_v} OR "${${_v}}" STREQUAL "")
    message(FATAL_ERROR "run.cmake: ${_v} is not set")
  endif()
endforeach()
# Lists travel comma-separated: a ';' would split the command lines.
set(_components_csv "${COMPONENTS}")
string(REPLACE "," ";" COMPONENTS "${COMPONENTS}")
if(NOT BUILD_TYPE)
  set(BUILD_TYPE Release)
endif()

function(run)
  string(REPLACE ";" " " _shown "${ARGN}")
  message(STATUS "package test: ${_shown}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _out)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "command failed (${_rc}): ${_shown}\n${_out}")
  endif()
  set(run_output "${_out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

# The same dependency choices as the build that runs this test: ON where the component exists.
set(_dion_options -DDION_BUILD_TESTS=OFF -DDION_BUILD_EXAMPLES=OFF -DDION_BUILD_BENCH=OFF
                  -DDION_BUILD_TOOLS=OFF)
foreach(_comp cuda mpi nccl)
  string(TOUPPER "${_comp}" _up)
  if(_comp IN_LIST COMPONENTS)
    list(APPEND _dion_options -DDION_ENABLE_${_up}=ON)
  else()
    list(APPEND _dion_options -DDION_ENABLE_${_up}=OFF)
  endif()
endforeach()
set(_common -G "${GENERATOR}" "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}"
            -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
if(CUDA_COMPILER)
  list(APPEND _common "-DCMAKE_CUDA_COMPILER=${CUDA_COMPILER}")
  if("cuda" IN_LIST COMPONENTS)
    list(APPEND _common -DDION_CONSUMER_CUDA=ON)  # the consumer compiles a .cu file too
  endif()
endif()

set(_consumer_src "${DION_SOURCE_DIR}/tests/package")
set(_consumer_build "${WORK_DIR}/consumer")
if(MODE STREQUAL "install")
  set(_prefix "${WORK_DIR}/prefix")
  run("${CMAKE_COMMAND}" -S "${DION_SOURCE_DIR}" -B "${WORK_DIR}/dion-build" ${_common} ${_dion_options}
      -DDION_INSTALL=ON "-DCMAKE_INSTALL_PREFIX=${_prefix}")
  run("${CMAKE_COMMAND}" --build "${WORK_DIR}/dion-build")
  run("${CMAKE_COMMAND}" --install "${WORK_DIR}/dion-build")
  foreach(_f include/dion/version.hpp include/dion/core/view.hpp share/cmake/dion/dionConfig.cmake
             share/cmake/dion/dionConfigVersion.cmake share/cmake/dion/FindNCCL.cmake)
    if(NOT EXISTS "${_prefix}/${_f}")
      message(FATAL_ERROR "the install lacks ${_f}")
    endif()
  endforeach()
  run("${CMAKE_COMMAND}" -S "${_consumer_src}" -B "${_consumer_build}" ${_common}
      -DDION_CONSUMER_MODE=install "-DCMAKE_PREFIX_PATH=${_prefix}"
      "-DDION_CONSUMER_EXPECT_PREFIX=${_prefix}" "-DDION_CONSUMER_COMPONENTS=${_components_csv}")
elseif(MODE STREQUAL "subdirectory")
  run("${CMAKE_COMMAND}" -S "${_consumer_src}" -B "${_consumer_build}" ${_common} ${_dion_options}
      -DDION_CONSUMER_MODE=subdirectory "-DDION_SOURCE_DIR=${DION_SOURCE_DIR}"
      "-DDION_CONSUMER_COMPONENTS=${_components_csv}")
else()
  message(FATAL_ERROR "run.cmake: MODE must be install or subdirectory, not '${MODE}'")
endif()
run("${CMAKE_COMMAND}" --build "${_consumer_build}")

find_program(_consumer consumer PATHS "${_consumer_build}" "${_consumer_build}/${BUILD_TYPE}"
             NO_DEFAULT_PATH NO_CACHE)
if(NOT _consumer)
  message(FATAL_ERROR "the consumer program was not built in ${_consumer_build}")
endif()
run("${_consumer}")
message(STATUS "consumer: ${run_output}")
if(NOT run_output MATCHES "dion ${EXPECT_VERSION} ")
  message(FATAL_ERROR "the consumer printed '${run_output}', expected version ${EXPECT_VERSION}")
endif()
foreach(_comp IN LISTS COMPONENTS)  # the component programs link and start (no device needed)
  find_program(_prog_${_comp} consumer_${_comp} PATHS "${_consumer_build}"
               "${_consumer_build}/${BUILD_TYPE}" NO_DEFAULT_PATH NO_CACHE)
  if(NOT _prog_${_comp})
    message(FATAL_ERROR "consumer_${_comp} was not built")
  endif()
  run("${_prog_${_comp}}")
endforeach()
message(STATUS "package test (${MODE}) passed")
