# Target helpers in the style of absl_cc_library. Every folder declares its
# library, test and binaries with these, so that all targets share include
# paths, warnings and test registration.
#
#   kvrecall_cc_library(NAME foo HDRS a.h SRCS a.cc DEPS kvrecall::common absl::status)
#     -> target kvrecall_foo, alias kvrecall::foo (INTERFACE when SRCS is empty)
#   kvrecall_cc_test(NAME foo_test SRCS a_test.cc DEPS kvrecall::foo LABELS unit)
#     -> one gtest binary, tests discovered at ctest time, labelled
#   kvrecall_cc_binary(NAME kvrecalld SRCS main.cc DEPS ...)

function(kvrecall_cc_library)
  cmake_parse_arguments(KVR "" "NAME" "HDRS;SRCS;DEPS;COPTS;DEFINES" ${ARGN})
  set(_target kvrecall_${KVR_NAME})
  if(KVR_SRCS)
    add_library(${_target} STATIC ${KVR_SRCS} ${KVR_HDRS})
    target_include_directories(${_target} PUBLIC ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
    target_link_libraries(${_target} PUBLIC ${KVR_DEPS})
    target_compile_options(${_target} PRIVATE ${KVR_COPTS})
    target_compile_definitions(${_target} PUBLIC ${KVR_DEFINES})
    kvrecall_apply_warnings(${_target})
  else()
    add_library(${_target} INTERFACE ${KVR_HDRS})
    target_include_directories(${_target} INTERFACE ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
    target_link_libraries(${_target} INTERFACE ${KVR_DEPS})
  endif()
  add_library(kvrecall::${KVR_NAME} ALIAS ${_target})
endfunction()

function(kvrecall_cc_test)
  if(NOT KVRECALL_BUILD_TESTS)
    return()
  endif()
  cmake_parse_arguments(KVR "" "NAME;TIMEOUT" "SRCS;DEPS;LABELS;COPTS" ${ARGN})
  add_executable(${KVR_NAME} ${KVR_SRCS})
  target_link_libraries(${KVR_NAME} PRIVATE ${KVR_DEPS} kvrecall::testing GTest::gmock_main)
  target_compile_options(${KVR_NAME} PRIVATE ${KVR_COPTS})
  kvrecall_apply_warnings(${KVR_NAME})
  if(NOT KVR_LABELS)
    set(KVR_LABELS unit)
  endif()
  if(NOT KVR_TIMEOUT)
    set(KVR_TIMEOUT 300)
  endif()
  gtest_discover_tests(${KVR_NAME}
    DISCOVERY_MODE PRE_TEST
    DISCOVERY_TIMEOUT 60
    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR}
    PROPERTIES LABELS "${KVR_LABELS}" TIMEOUT ${KVR_TIMEOUT}
               # One variable only: CMake 3.25's gtest_discover_tests splits a list-valued
               # property into separate arguments. Tests find the build tree through
               # compile definitions where they need it (tests/integration).
               ENVIRONMENT "KVRECALL_SOURCE_DIR=${PROJECT_SOURCE_DIR}")
endfunction()

function(kvrecall_cc_binary)
  cmake_parse_arguments(KVR "" "NAME;OUTPUT_NAME" "SRCS;DEPS;COPTS" ${ARGN})
  add_executable(${KVR_NAME} ${KVR_SRCS})
  target_link_libraries(${KVR_NAME} PRIVATE ${KVR_DEPS})
  target_compile_options(${KVR_NAME} PRIVATE ${KVR_COPTS})
  if(KVR_OUTPUT_NAME)
    set_target_properties(${KVR_NAME} PROPERTIES OUTPUT_NAME ${KVR_OUTPUT_NAME})
  endif()
  set_target_properties(${KVR_NAME} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bin)
  kvrecall_apply_warnings(${KVR_NAME})
endfunction()
