// Registration of the CPU 3x3x3 convolution (forward.cpp, backward.cpp).
#include <torch/library.h>

#include "cpu/conv3d_3x3x3/driver.h"

TORCH_LIBRARY_IMPL(uxnet, CPU, m) {
  m.impl("conv3d_3x3x3", &uxnet::cpu::conv3d_3x3x3::conv3d_3x3x3_cpu);
  m.impl("conv3d_3x3x3_pack_weight", &uxnet::cpu::conv3d_3x3x3::conv3d_3x3x3_pack_weight_cpu);
  m.impl("conv3d_3x3x3_packed", &uxnet::cpu::conv3d_3x3x3::conv3d_3x3x3_packed_cpu);
  m.impl("conv3d_3x3x3_backward", &uxnet::cpu::conv3d_3x3x3::conv3d_3x3x3_backward_cpu);
}
