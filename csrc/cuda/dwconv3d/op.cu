// CUDA kernels of uxnet::dwconv3d and uxnet::dwconv3d_backward (depthwise 3D convolution, stride 1,
// zero "same" padding, odd kernel sizes per axis).
//
// The kernels work on NCDHW-contiguous tensors. A channels_last_3d input is computed on an
// NCDHW-contiguous copy and the output converted back: correct but slower than the Triton backend,
// which is the fast GPU path for that layout.
//
//   forward      one block per (n, c, d, 16x32 output tile); the block walks the KD input planes, staging
//                each plane's tile plus halo (and the KH x KW weights of that plane) in shared memory; each
//                thread accumulates 4 outputs along W in registers (float accumulation, double for double).
//   grad input   the forward with the weight flipped along all three axes (same padding, odd kernel).
//   grad weight  one block per (c, kd, tile column): its threads own taps (kh, kw) and sum
//                grad_out * x over their tiles into a (tiles, C * K) partial-sum buffer, reduced over tiles
//                by a second kernel in a fixed order: bit-identical run to run.
//   grad bias    at::sum of grad_out over (N, D, H, W).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/flip.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "common/arg_checks.h"
#include "cuda/common/host.cuh"
#include "cuda/dwconv3d/kernels.cuh"
#include "uxnet_ops.h"

namespace uxnet {
namespace gpu {
namespace {

constexpr int64_t kMaxGradWeightPartialBytes = int64_t{256} << 20;

constexpr int64_t kMaxKernelSize = 1023;
constexpr size_t kDefaultSharedMemory = 48 * 1024;

template <typename Kernel>
void allow_shared_memory(const char* op, Kernel kernel, size_t bytes) {
  if (bytes <= kDefaultSharedMemory) {
    return;
  }
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), op,
              ": kernel size too large for the CUDA kernels (a block needs ", bytes,
              " bytes of shared memory, this device allows ", optin, ")");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

struct ConvGeometry {
  int64_t N, C, D, H, W;
  int KD, KH, KW;
};

ConvGeometry geometry(const at::Tensor& x, const at::Tensor& weight) {
  for (int i = 2; i < 5; ++i) {
    TORCH_CHECK(weight.size(i) <= kMaxKernelSize, "uxnet::dwconv3d: the CUDA kernels take kernel sizes up to ",
                kMaxKernelSize, " per axis, got ", weight.sizes().slice(2));
  }
  return ConvGeometry{x.size(0),
                      x.size(1),
                      x.size(2),
                      x.size(3),
                      x.size(4),
                      static_cast<int>(weight.size(2)),
                      static_cast<int>(weight.size(3)),
                      static_cast<int>(weight.size(4))};
}

// out = dwconv3d(x, weight, bias) for NCDHW-contiguous x, out and contiguous weight, bias.
void launch_forward(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias,
                    at::Tensor& out) {
  const ConvGeometry g = geometry(x, weight);
  const int64_t tiles_h = ceil_div(g.H, kTileH);
  const int64_t tiles_w = ceil_div(g.W, kTileW);
  const int64_t blocks = g.N * g.C * g.D * tiles_h * tiles_w;
  if (blocks == 0) {
    return;
  }
  check_grid(op, blocks);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "uxnet_dwconv3d_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t shared =
        sizeof(acc_t) * (static_cast<size_t>(kTileH + g.KH - 1) * (kTileW + g.KW - 1) +
                         static_cast<size_t>(g.KH) * g.KW);
    auto kernel = dwconv3d_forward_kernel<scalar_t, acc_t>;
    allow_shared_memory(op, kernel, shared);
    kernel<<<static_cast<unsigned int>(blocks), kForwardThreads, shared, stream>>>(
        x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
        bias != nullptr ? bias->const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), g.C,
        g.D, g.H, g.W, g.KD, g.KH, g.KW, tiles_h, tiles_w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// dwconv3d with the output in the memory format of x (see uxnet::suggested_memory_format).
at::Tensor forward_any_layout(const char* op, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor* bias) {
  const at::MemoryFormat format = suggested_memory_format(x);
  const at::Tensor x_ncdhw = x.contiguous();
  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor bias_c = bias != nullptr ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch_forward(op, x_ncdhw, weight_c, bias != nullptr ? &bias_c : nullptr, out);
  return format == at::MemoryFormat::ChannelsLast3d ? out.contiguous(format) : out;
}

at::Tensor grad_weight(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                       const at::Tensor& weight) {
  const ConvGeometry g = geometry(x, weight);
  const at::Tensor g_ncdhw = grad_out.contiguous();
  const at::Tensor x_ncdhw = x.contiguous();
  const int64_t K = static_cast<int64_t>(g.KD) * g.KH * g.KW;
  const int64_t tiles_h = ceil_div(g.H, kTileH);
  const int64_t tiles_w = ceil_div(g.W, kTileW);
  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t acc_bytes = acc_type == at::kDouble ? 8 : 4;
  // Fewer, taller tile columns per block when the partial-sum buffer would grow past its budget.
  int64_t h_tiles_per_block = 1;
  while (h_tiles_per_block < tiles_h &&
         g.N * ceil_div(tiles_h, h_tiles_per_block) * tiles_w * g.C * K * acc_bytes > kMaxGradWeightPartialBytes) {
    h_tiles_per_block *= 2;
  }
  const int64_t h_groups = tiles_h == 0 ? 0 : ceil_div(tiles_h, h_tiles_per_block);
  const int64_t blocks_per_channel = g.N * h_groups * tiles_w;
  const int64_t blocks = g.C * blocks_per_channel * g.KD;
  if (blocks == 0 || g.D == 0) {
    return at::zeros(weight.sizes(), weight.options());
  }
  check_grid(op, blocks);
  at::Tensor partial = at::empty({blocks_per_channel, g.C * K}, x.options().dtype(acc_type));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "uxnet_dwconv3d_grad_weight_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t shared =
        sizeof(acc_t) * (static_cast<size_t>(kTileH + g.KH - 1) * (kTileW + g.KW - 1) +
                         static_cast<size_t>(kTileH) * kTileW + kGradWeightThreads);
    auto kernel = dwconv3d_grad_weight_kernel<scalar_t, acc_t>;
    allow_shared_memory(op, kernel, shared);
    kernel<<<static_cast<unsigned int>(blocks), kGradWeightThreads, shared, stream>>>(
        g_ncdhw.const_data_ptr<scalar_t>(), x_ncdhw.const_data_ptr<scalar_t>(),
        partial.mutable_data_ptr<acc_t>(), g.C, g.D, g.H, g.W, g.KD, g.KH, g.KW, tiles_h, tiles_w,
        h_tiles_per_block, h_groups, blocks_per_channel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gradient_like(reduce_partial_rows(op, partial), weight);
}

at::Tensor dwconv3d_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "uxnet::dwconv3d";
  checks::dwconv3d_inputs(op, x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool has_bias = bias.has_value() && bias->defined();
  return forward_any_layout(op, x, weight, has_bias ? &*bias : nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv3d_backward_cuda(const at::Tensor& grad_out,
                                                                      const at::Tensor& x,
                                                                      const at::Tensor& weight,
                                                                      std::array<bool, 3> output_mask) {
  constexpr const char* op = "uxnet::dwconv3d_backward";
  checks::dwconv3d_inputs(op, x, weight, c10::nullopt);
  checks::like(op, grad_out, "grad_out", x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor empty = at::empty({0}, x.options());
  at::Tensor grad_x = empty;
  at::Tensor grad_w = empty;
  at::Tensor grad_b = empty;
  if (output_mask[0]) {
    // d out / d x is the correlation with the kernel mirrored along every axis ("same" padding, odd sizes).
    grad_x = forward_any_layout(op, grad_out, at::flip(weight, {2, 3, 4}), nullptr);
  }
  if (output_mask[1]) {
    grad_w = grad_weight(op, grad_out, x, weight);
  }
  if (output_mask[2]) {
    grad_b = at::sum(grad_out, {0, 2, 3, 4});
  }
  return std::make_tuple(grad_x, grad_w, grad_b);
}

}  // namespace
}  // namespace gpu
}  // namespace uxnet

TORCH_LIBRARY_IMPL(uxnet, CUDA, m) {
  m.impl("dwconv3d", &uxnet::gpu::dwconv3d_cuda);
  m.impl("dwconv3d_backward", &uxnet::gpu::dwconv3d_backward_cuda);
}
