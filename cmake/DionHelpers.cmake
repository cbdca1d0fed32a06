# Helpers for dion's own build (not installed). Included by the top-level CMakeLists.txt, so every
# folder (tests/, tools/, examples/, bench/) can use them.
include_guard(GLOBAL)

# dion_tristate_option(<var> <doc>): a cache variable that is AUTO (default), ON or OFF. Any CMake
# boolean is accepted and normalised (TRUE/1/YES -> ON, FALSE/0/NO -> OFF).
function(dion_tristate_option var doc)
  set(${var} AUTO CACHE STRING "${doc}")
  set_property(CACHE ${var} PROPERTY STRINGS AUTO ON OFF)
  string(TOUPPER "${${var}}" _value)
  if(_value STREQUAL "AUTO" OR _value STREQUAL "")
    set(_value AUTO)
  elseif(_value)
    set(_value ON)
  else()
    set(_value OFF)
  endif()
  set(${var} ${_value} PARENT_SCOPE)
endfunction()

# dion_target_warnings(<target>...): the warning flags of dion's own programs (tests, tools,
# examples, bench). -Werror with DION_WERROR=ON. Never applied to dion::dion itself.
function(dion_target_warnings)
  foreach(_t IN LISTS ARGN)
    if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
      target_compile_options(${_t} PRIVATE
        $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic>
        $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<BOOL:${DION_WERROR}>>:-Werror>)
    endif()
  endforeach()
endfunction()

# dion_mark_gpu_binary(<target> [KIND test|bench|tool|example] [ARGS <arg>...]): records a program
# that needs a GPU. scripts/build-gpu builds every marked target (target `dion_gpu_binaries`) and
# copies it into .gpubin/<kind>/ for the device machine; ARGS are the arguments .gpubin/run passes
# to it (tests only).
function(dion_mark_gpu_binary target)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "KIND" "ARGS")
  if(NOT arg_KIND)
    set(arg_KIND test)
  endif()
  if(NOT arg_KIND MATCHES "^(test|bench|tool|example)$")
    message(FATAL_ERROR "dion_mark_gpu_binary(${target}): KIND must be test, bench, tool or example")
  endif()
  string(JOIN " " _args ${arg_ARGS})
  set_property(GLOBAL APPEND PROPERTY DION_GPU_BINARIES "${target}")
  set_property(GLOBAL PROPERTY DION_GPU_BINARY_KIND_${target} "${arg_KIND}")
  set_property(GLOBAL PROPERTY DION_GPU_BINARY_ARGS_${target} "${_args}")
endfunction()

# Called once at the end of the top-level CMakeLists.txt: target `dion_gpu_binaries` builds every
# marked program; ${PROJECT_BINARY_DIR}/dion_gpu_binaries.txt lists "<kind>\t<file>\t<args>" per line.
function(dion_finalize_gpu_binaries)
  get_property(_targets GLOBAL PROPERTY DION_GPU_BINARIES)
  add_custom_target(dion_gpu_binaries)
  set(_content "")
  foreach(_t IN LISTS _targets)
    get_property(_kind GLOBAL PROPERTY DION_GPU_BINARY_KIND_${_t})
    get_property(_args GLOBAL PROPERTY DION_GPU_BINARY_ARGS_${_t})
    add_dependencies(dion_gpu_binaries ${_t})
    string(APPEND _content "${_kind}\t$<TARGET_FILE:${_t}>\t${_args}\n")
  endforeach()
  file(GENERATE OUTPUT "${PROJECT_BINARY_DIR}/dion_gpu_binaries.txt" CONTENT "${_content}")
endfunction()
