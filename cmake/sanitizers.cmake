# Sanitizer and fuzzing builds (CMakePresets.json: asan, tsan, fuzz; docs/testing.md).
#
# PTQLAB_SANITIZE instruments every target of the build (core, CLI, plugins, tests):
#   address,undefined  ASan + UBSan; any UBSan report aborts (-fno-sanitize-recover), so a test fails
#   thread             TSan (TBB itself is not instrumented: see tests/sanitizers/tsan.supp)
# PTQLAB_FUZZ (clang only) builds the libFuzzer targets of fuzz/ with ASan + UBSan instead of the
# rest of the project (scripts/fuzz).
set(PTQLAB_SANITIZE "" CACHE STRING "Sanitizers for every target: address,undefined or thread (empty: none)")
option(PTQLAB_FUZZ "Build only the libFuzzer targets of fuzz/ (clang; see scripts/fuzz)" OFF)

if(PTQLAB_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "PTQLAB_FUZZ needs clang (libFuzzer): configure with -DCMAKE_CXX_COMPILER=clang++")
  endif()
  set(PTQLAB_SANITIZE "address,undefined")
  add_compile_options(-fsanitize=fuzzer-no-link)
endif()

if(PTQLAB_SANITIZE)
  # Frame pointers for readable stacks; -O1 keeps the build and the tests fast enough while
  # the reports stay exact.
  add_compile_options(-fsanitize=${PTQLAB_SANITIZE} -fno-omit-frame-pointer -g)
  add_link_options(-fsanitize=${PTQLAB_SANITIZE})
  if(PTQLAB_SANITIZE MATCHES "undefined")
    add_compile_options(-fno-sanitize-recover=undefined)
  endif()
endif()
