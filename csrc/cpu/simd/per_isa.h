// Picking a kernel compiled per ISA variant at run time (see compile_per_isa.inc for the compile side).
#pragma once

#include "cpu/simd/isa.h"

namespace uxnet {
namespace cpu {
namespace simd {

// One function pointer per Isa, in Isa order.
template <typename Fn>
struct PerIsa {
  Fn fn[kIsaCount];
  Fn operator[](Isa isa) const { return fn[static_cast<int>(isa)]; }
};

}  // namespace simd
}  // namespace cpu
}  // namespace uxnet

// PerIsa<Fn> of the kernel `name<template arguments>` (the macro's variadic arguments) of every variant, e.g.
//   static const auto table = UXNET_SIMD_PER_ISA(KernelFn, my_kernel<float, true>);
//   table[simd::selected_isa()](args);
#define UXNET_SIMD_PER_ISA(Fn, ...)                                                                        \
  ::uxnet::cpu::simd::PerIsa<Fn> {                                                                         \
    {                                                                                                      \
      &::uxnet::cpu::isa_generic::__VA_ARGS__, &::uxnet::cpu::isa_avx2::__VA_ARGS__,                       \
          &::uxnet::cpu::isa_avx512::__VA_ARGS__, &::uxnet::cpu::isa_avx512_emulated::__VA_ARGS__          \
    }                                                                                                      \
  }
