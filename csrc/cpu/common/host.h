// Torch-side helpers of the CPU ops (no kernel code): the kernels' view of a tensor's dtype and data and the
// dtypes the CPU kernels implement (every op); for the voxel-tiled ops (LayerNorm, UX MLP) the stats and
// parameter tables, the chunk runner, and the fixed-order reduction of per-chunk parameter-gradient partials.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <initializer_list>
#include <type_traits>

#include "cpu/common/voxel_tiling.h"
#include "cpu/simd/config.h"
#include "uxnet_ops.h"

namespace uxnet {
namespace cpu {
namespace host {

// Math and statistics type: float for float32 and bfloat16, double for float64.
template <typename scalar_t>
using acc_type = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

// The kernels' storage type of a tensor dtype: c10::BFloat16 becomes the bit-compatible simd::bf16.
template <typename scalar_t>
using kernel_type =
    typename std::conditional<std::is_same<scalar_t, c10::BFloat16>::value, simd::bf16, scalar_t>::type;
static_assert(sizeof(simd::bf16) == sizeof(c10::BFloat16) && alignof(simd::bf16) == alignof(c10::BFloat16),
              "simd::bf16 must have c10::BFloat16's layout");

template <typename scalar_t>
const kernel_type<scalar_t>* kernel_data(const at::Tensor& t) {
  return reinterpret_cast<const kernel_type<scalar_t>*>(t.data_ptr<scalar_t>());
}

template <typename scalar_t>
kernel_type<scalar_t>* kernel_data_mut(at::Tensor& t) {
  return reinterpret_cast<kernel_type<scalar_t>*>(t.data_ptr<scalar_t>());
}

// The op's tiling of x (canonical layout `format`); row_blocks: LayerNorm's row blocks.
inline voxel_tiling::VoxelTiling make_tiling(const at::Tensor& x, at::MemoryFormat format, bool row_blocks) {
  return voxel_tiling::make_tiling(x.size(0), x.size(1), x.size(2) * x.size(3) * x.size(4),
                     format == at::MemoryFormat::ChannelsLast3d, row_blocks);
}

// The dtypes the CPU kernels implement (the device-independent checks: common/arg_checks.h).
inline void check_kernel_dtype(const char* op, const at::Tensor& x) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kDouble, op,
              ": the CPU kernel supports float32, bfloat16 and float64 inputs, got ", dtype);
}

// mean / rstd: (N, D, H, W) in the stats dtype.
inline at::Tensor empty_stats(const at::Tensor& x) {
  return at::empty({x.size(0), x.size(2), x.size(3), x.size(4)}, x.options().dtype(stats_dtype(x.scalar_type())));
}

// A parameter as a contiguous table in the math type (rows as in the tensor's own layout).
template <typename acc_t>
at::Tensor param_table(const at::Tensor& param) {
  return param.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

// Runs a chunk kernel over every chunk of args.tiling, split across torch's intra-op threads.
template <typename Args>
void run_chunks(const Args& args, voxel_tiling::ChunkKernel<Args> kernel) {
  at::parallel_for(0, args.tiling.num_chunks, 1, [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
}

// Per-chunk partial sums of `rows` parameter-gradient rows: [num_chunks][rows][C] float64, written by the kernels.
inline at::Tensor empty_partials(const at::Tensor& x, const voxel_tiling::VoxelTiling& tiling, int64_t rows) {
  return at::empty({tiling.num_chunks, rows, tiling.channels}, x.options().dtype(at::kDouble));
}

// Sum of the chunk partials in chunk order: the same bits whatever the number of threads was.
inline at::Tensor sum_partials_in_order(const at::Tensor& partials) {
  const int64_t chunks = partials.size(0);
  const int64_t width = partials.size(1) * partials.size(2);
  at::Tensor total = at::zeros({partials.size(1), partials.size(2)}, partials.options());
  const double* src = partials.data_ptr<double>();
  double* dst = total.data_ptr<double>();
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t i = 0; i < width; ++i) {
      dst[i] += src[k * width + i];
    }
  }
  return total;
}

// Row `row` of the chunk partials [num_chunks][rows][C] summed in chunk order (float64, the same bits as
// sum_partials_in_order), as a (C,) tensor of scalar_t.
template <typename scalar_t>
at::Tensor partial_row_sum(const at::Tensor& partials, int64_t row, const at::TensorOptions& options) {
  const int64_t chunks = partials.size(0);
  const int64_t rows = partials.size(1);
  const int64_t C = partials.size(2);
  at::Tensor out = at::empty({C}, options);
  const double* src = partials.data_ptr<double>() + row * C;
  scalar_t* dst = out.data_ptr<scalar_t>();
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0.0;
    for (int64_t k = 0; k < chunks; ++k) {
      sum += src[k * rows * C + c];
    }
    dst[c] = static_cast<scalar_t>(sum);
  }
  return out;
}

}  // namespace host
}  // namespace cpu
}  // namespace uxnet
