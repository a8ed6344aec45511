# Included before find_package(Torch): hints that let a CUDA build of torch installed by pip configure on a machine
# without a GPU whose CUDA toolkit is partial. pip's torch ships CUDA's runtime libraries (libnvrtc among them) in
# site-packages/nvidia/*/lib, which the toolkit may lack, and nvcc may be a wrapper outside the toolkit, from which
# torch's FindCUDA cannot locate the toolkit. Nothing here is used with a CPU build of torch.

# The toolkit: $CUDA_HOME or $CUDA_PATH, else /usr/local/cuda when the nvcc on PATH is not inside a toolkit.
if(NOT CUDA_TOOLKIT_ROOT_DIR)
  if(DEFINED ENV{CUDA_HOME})
    set(CUDA_TOOLKIT_ROOT_DIR "$ENV{CUDA_HOME}" CACHE PATH "CUDA toolkit used by torch's CMake config")
  elseif(DEFINED ENV{CUDA_PATH})
    set(CUDA_TOOLKIT_ROOT_DIR "$ENV{CUDA_PATH}" CACHE PATH "CUDA toolkit used by torch's CMake config")
  else()
    find_program(UXNET_NVCC nvcc)
    if(UXNET_NVCC)
      get_filename_component(_uxnet_nvcc_root "${UXNET_NVCC}" DIRECTORY)
      get_filename_component(_uxnet_nvcc_root "${_uxnet_nvcc_root}" DIRECTORY)
      if(NOT EXISTS "${_uxnet_nvcc_root}/include/cuda_runtime.h" AND EXISTS /usr/local/cuda/include/cuda_runtime.h)
        set(CUDA_TOOLKIT_ROOT_DIR /usr/local/cuda CACHE PATH "CUDA toolkit used by torch's CMake config")
      endif()
    endif()
  endif()
endif()

# libnvrtc, which torch's CMake config links: the toolkit's, else the one pip installed beside torch
# (CMAKE_PREFIX_PATH holds site-packages/torch/share/cmake; pip's libraries carry only versioned names).
if(NOT CUDA_nvrtc_LIBRARY AND CUDA_TOOLKIT_ROOT_DIR)
  find_library(CUDA_nvrtc_LIBRARY nvrtc PATHS "${CUDA_TOOLKIT_ROOT_DIR}" PATH_SUFFIXES lib64 lib NO_DEFAULT_PATH)
endif()
if(NOT CUDA_nvrtc_LIBRARY)
  foreach(_uxnet_prefix IN LISTS CMAKE_PREFIX_PATH)
    file(GLOB _uxnet_nvrtc "${_uxnet_prefix}/../../../nvidia/*/lib/libnvrtc.so*")
    list(FILTER _uxnet_nvrtc EXCLUDE REGEX "builtins|\\.alt\\.")
    if(_uxnet_nvrtc)
      list(GET _uxnet_nvrtc 0 _uxnet_nvrtc)
      get_filename_component(_uxnet_nvrtc "${_uxnet_nvrtc}" REALPATH)
      set(CUDA_nvrtc_LIBRARY "${_uxnet_nvrtc}" CACHE FILEPATH "libnvrtc from pip's CUDA wheels" FORCE)
      break()
    endif()
  endforeach()
endif()
