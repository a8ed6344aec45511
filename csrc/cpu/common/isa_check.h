// The ISA variant an op's kernels run with, as a torch error naming the op when UXNET_CPU_ISA is wrong.
#pragma once

#include <c10/util/Exception.h>

#include <stdexcept>

#include "cpu/simd/isa.h"

namespace uxnet {
namespace cpu {

inline simd::Isa selected_isa_for(const char* op) {
  try {
    return simd::selected_isa();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
}

}  // namespace cpu
}  // namespace uxnet
