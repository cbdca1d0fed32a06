# Checks that README.md's usage example is, character for character, the code of an example program.
#
#   cmake -DREADME=<README.md> -DSOURCE=<examples/01-quickstart/main.cpp> -P check_readme_snippet.cmake
#
# In SOURCE the code lies between the lines "// readme-begin" and "// readme-end". In README it is the
# first ```cpp block after the line "<!-- readme-snippet: examples/01-quickstart/main.cpp -->" (the path
# after the colon must name SOURCE relative to the project root). Fails with both texts when they differ.
cmake_minimum_required(VERSION 3.25)

foreach(_var README SOURCE)
  if(NOT DEFINED ${_var} OR NOT EXISTS "${${_var}}")
    message(FATAL_ERROR "check_readme_snippet: ${_var}='${${_var}}' is not a file")
  endif()
endforeach()

file(READ "${SOURCE}" _src)
file(READ "${README}" _readme)
string(REPLACE "\r\n" "\n" _src "${_src}")
string(REPLACE "\r\n" "\n" _readme "${_readme}")

# --- the example's region --------------------------------------------------------------------------
string(FIND "${_src}" "\n// readme-begin\n" _b)
string(FIND "${_src}" "\n// readme-end\n" _e)
if(_b EQUAL -1 OR _e EQUAL -1 OR _e LESS _b)
  message(FATAL_ERROR "check_readme_snippet: ${SOURCE} has no '// readme-begin' ... '// readme-end' region")
endif()
math(EXPR _b "${_b} + 17")  # past "\n// readme-begin\n"
math(EXPR _len "${_e} + 1 - ${_b}")
string(SUBSTRING "${_src}" ${_b} ${_len} _code)

# --- the README's block ----------------------------------------------------------------------------
get_filename_component(_name "${SOURCE}" NAME)
get_filename_component(_dir "${SOURCE}" DIRECTORY)
get_filename_component(_dir "${_dir}" NAME)
set(_marker "<!-- readme-snippet: examples/${_dir}/${_name} -->")
string(FIND "${_readme}" "${_marker}" _m)
if(_m EQUAL -1)
  message(FATAL_ERROR "check_readme_snippet: README.md has no line '${_marker}'")
endif()
string(SUBSTRING "${_readme}" ${_m} -1 _rest)
string(FIND "${_rest}" "\n```cpp\n" _fb)
if(_fb EQUAL -1)
  message(FATAL_ERROR "check_readme_snippet: no ```cpp block after '${_marker}' in README.md")
endif()
math(EXPR _fb "${_fb} + 8")  # past "\n```cpp\n"
string(SUBSTRING "${_rest}" ${_fb} -1 _rest)
string(FIND "${_rest}" "\n```" _fe)
if(_fe EQUAL -1)
  message(FATAL_ERROR "check_readme_snippet: the ```cpp block after '${_marker}' is not closed")
endif()
math(EXPR _fe "${_fe} + 1")
string(SUBSTRING "${_rest}" 0 ${_fe} _block)

if(NOT _block STREQUAL _code)
  message(FATAL_ERROR "check_readme_snippet: README.md's usage example differs from ${SOURCE}.\n"
                      "Copy the code between '// readme-begin' and '// readme-end' into the README.\n"
                      "--- ${SOURCE} ---\n${_code}--- README.md ---\n${_block}---")
endif()
message(STATUS "README.md's usage example matches ${SOURCE}")
