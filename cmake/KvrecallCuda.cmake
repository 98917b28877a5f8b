# Decides whether gpu/ kernels are built (KVRECALL_WITH_CUDA: AUTO, ON, OFF).
# CUDA is a link-time choice: gpu/ builds its kernels and GPU tests when
# KVRECALL_CUDA_ENABLED is true; its CPU references are built always.
include(CheckLanguage)
set(KVRECALL_CUDA_ENABLED OFF)
if(NOT KVRECALL_WITH_CUDA STREQUAL "OFF")
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    set(KVRECALL_CUDA_ENABLED ON)
  elseif(KVRECALL_WITH_CUDA STREQUAL "ON")
    message(FATAL_ERROR "KVRECALL_WITH_CUDA=ON but no CUDA compiler was found")
  endif()
endif()
message(STATUS "kvrecall: CUDA kernels ${KVRECALL_CUDA_ENABLED} (architectures ${CMAKE_CUDA_ARCHITECTURES})")
