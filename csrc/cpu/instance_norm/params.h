// Arguments and kernel tables of the CPU instance-norm ops (uxnet::instance_norm_lrelu, instance_norm_add_lrelu).
// No torch headers.
//
// Statistics are per (n, c) over the D*H*W voxels of (N, C, D, H, W), NCDHW-contiguous ("planes": each (n, c) is
// one contiguous run) or channels_last_3d (each voxel holds its C channels contiguously):
//
//   forward:   out = lrelu((z - mean) * rstd + r_hat),  r_hat = 0 | r | (r - r_mean) * r_rstd   (ResidualMode)
//   backward:  gs = grad_out * lrelu'(out),  s = lrelu^-1(out),  xhat = s - r_hat
//              grad_z = rstd * (gs - a - xhat * b)
//              grad_r = gs (plain)  |  r_rstd * (gs - a - r_hat * b_r) (normalized)
//              with a = mean(gs), b = mean(gs * xhat), b_r = mean(gs * r_hat) over the plane.
//
// scalar_t is the storage type (float, simd::bf16, double), acc_t the element math type (float for float and
// bf16, double for double). Every sum over voxels accumulates in float64; the statistics are shifted by the
// plane's first value (one pass, no catastrophic cancellation for channels far from zero mean). NCDHW kernels
// take a range of planes; channels_last_3d kernels take a voxel range of one batch item and add float64 partial
// sums per channel, which the host reduces in a fixed order: results do not depend on the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/simd/config.h"
#include "cpu/simd/isa.h"

namespace uxnet {
namespace cpu {
namespace instance_norm {

enum class ResidualMode { none, plain, normalized };

struct Layout {
  int64_t batch;
  int64_t channels;
  int64_t voxels;  // D * H * W
  bool channels_last;
};

template <typename scalar_t, typename acc_t>
struct StatsArgs {
  const scalar_t* x;
  acc_t* mean;  // (N, C)
  acc_t* rstd;  // (N, C)
  double eps;
  Layout layout;
};

template <typename scalar_t, typename acc_t>
struct Args {
  const scalar_t* z;         // forward input (nullptr in backward)
  const scalar_t* out;       // backward: the forward output
  const scalar_t* grad_out;  // backward
  const scalar_t* r;         // residual (plain) or the shortcut conv output (normalized); nullptr for none
  acc_t* mean;               // (N, C) of z: written by the NCDHW forward, read otherwise
  acc_t* rstd;               // (N, C) of z
  acc_t* r_mean;             // (N, C) of r (normalized)
  acc_t* r_rstd;             // (N, C) of r (normalized)
  scalar_t* y;               // forward: out; backward: grad_z
  scalar_t* grad_r;          // backward: grad of r (plain, normalized), else nullptr
  ResidualMode mode;
  acc_t slope;
  double eps;
  Layout layout;
};

constexpr int kBackwardSums = 3;  // sum(gs), sum(gs * xhat), sum(gs * r_hat)

template <typename scalar_t, typename acc_t>
struct Kernels {
  // NCDHW: planes [p0, p1), each in two passes, the second one over data still in cache. The forward computes
  // the plane's statistics (of z, and of r when normalized) and then its output.
  void (*forward_planes)(const Args<scalar_t, acc_t>&, int64_t p0, int64_t p1);
  void (*backward_planes)(const Args<scalar_t, acc_t>&, int64_t p0, int64_t p1);
  // channels_last_3d: voxels [v0, v1) of batch item n. stats: sums[2][C] += shifted sums (shift: the item's
  // first voxel); backward sums: sums[kBackwardSums][C] +=; backward apply: coefficients[3][C] = a, b, b_r of n.
  void (*stats_voxels)(const StatsArgs<scalar_t, acc_t>&, int64_t n, int64_t v0, int64_t v1, double* sums);
  void (*forward_voxels)(const Args<scalar_t, acc_t>&, int64_t n, int64_t v0, int64_t v1);
  void (*backward_sums_voxels)(const Args<scalar_t, acc_t>&, int64_t n, int64_t v0, int64_t v1, double* sums);
  void (*backward_apply_voxels)(const Args<scalar_t, acc_t>&, int64_t n, int64_t v0, int64_t v1,
                                const acc_t* coefficients);
};

// The kernels of an ISA variant (kernels.cpp); instantiated for (float, float), (bf16, float), (double, double).
template <typename scalar_t, typename acc_t>
const Kernels<scalar_t, acc_t>& kernels(simd::Isa isa);

// mean and rstd of one (n, c) from float64 sums of its values shifted by `shift`, s1 = sum(x - shift) and
// s2 = sum((x - shift)^2) over `voxels` voxels: the kernels' NCDHW planes and the host's channels_last_3d reduction.
template <typename acc_t>
inline void finalize_stats(double shift, double s1, double s2, int64_t voxels, double eps, acc_t* mean, acc_t* rstd) {
  const double m = s1 / static_cast<double>(voxels);
  const double var = std::max(s2 / static_cast<double>(voxels) - m * m, 0.0);  // NaN stays NaN
  *mean = static_cast<acc_t>(shift + m);
  *rstd = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
}

}  // namespace instance_norm
}  // namespace cpu
}  // namespace uxnet
