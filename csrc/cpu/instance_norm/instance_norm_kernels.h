// Kernels of the instance-norm ops (uxnet::instance_norm_lrelu, uxnet::instance_norm_add_lrelu): statistics per
// (n, c) over the D*H*W voxels of (N, C, D, H, W), NCDHW-contiguous ("planes": each (n, c) is one contiguous run)
// or channels_last_3d (each voxel holds its C channels contiguously).
//
// Forward:   out = lrelu((z - mean) * rstd + r_hat),  r_hat = 0 | r | (r - r_mean) * r_rstd   (ResidualMode)
// Backward:  gs = grad_out * lrelu'(out);  s = lrelu^-1(out);  xhat = s - r_hat
//            grad_z = rstd * (gs - mean(gs) - xhat * mean(gs * xhat))
//            grad_r = gs (plain residual) | r_rstd * (gs - mean(gs) - r_hat * mean(gs * r_hat)) (normalized)
// Sums over the voxels of a plane accumulate in double; element math is in acc_t (float for float32 and bfloat16,
// double for float64). Statistics use the first voxel of each (n, c) as a shift, so that the one-pass variance
// E[(x - K)^2] - E[x - K]^2 does not cancel catastrophically for channels far from zero mean.
//
// Every function works on a range of planes (NCDHW) or on a voxel range of one batch item (channels_last_3d);
// the host (instance_norm.cpp) splits the work across threads with a partition that depends on the shape only,
// so results are bitwise identical for any thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace uxnet {
namespace instance_norm {

enum class ResidualMode { none, plain, normalized };

struct Layout {
  int64_t batch;
  int64_t channels;
  int64_t voxels;  // D * H * W
  bool channels_last;
};

template <typename scalar_t, typename acc_t>
struct Tensors {
  const scalar_t* z;         // forward input, or nullptr in backward
  const scalar_t* out;       // backward: the forward output
  const scalar_t* grad_out;  // backward
  const scalar_t* r;         // residual (plain) or the shortcut conv output (normalized), nullptr for none
  const acc_t* mean;         // (N, C) of z
  const acc_t* rstd;         // (N, C) of z
  const acc_t* r_mean;       // (N, C) of r (normalized mode)
  const acc_t* r_rstd;       // (N, C) of r (normalized mode)
  scalar_t* y;               // forward: out; backward: grad_z
  scalar_t* grad_r;          // backward: grad of r (plain or normalized mode), else nullptr
  ResidualMode mode;
  acc_t slope;
  Layout layout;
};

template <typename T>
inline double to_double(T v) {
  return static_cast<double>(static_cast<float>(v));
}
inline double to_double(double v) { return v; }

template <typename acc_t, typename T>
inline acc_t to_acc(T v) {
  return static_cast<acc_t>(static_cast<float>(v));
}
template <>
inline double to_acc<double, double>(double v) {
  return v;
}

template <typename acc_t>
inline acc_t lrelu(acc_t s, acc_t slope) {
  return s > acc_t(0) ? s : s * slope;
}

// ---- statistics --------------------------------------------------------------------------------------------

// Shifted sums of plane p of an NCDHW tensor: sums[0] = sum(x - K), sums[1] = sum((x - K)^2), K = x[0].
template <typename scalar_t>
void plane_shifted_sums(const scalar_t* x, int64_t voxels, double* shift, double* sums) {
  const double k = to_double(x[0]);
  double s1 = 0.0, s2 = 0.0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t i = 0; i < voxels; ++i) {
    const double d = to_double(x[i]) - k;
    s1 += d;
    s2 += d * d;
  }
  *shift = k;
  sums[0] = s1;
  sums[1] = s2;
}

// Channels_last_3d: adds the shifted sums of voxels [v0, v1) of one batch item to s1[C], s2[C]; the shift is the
// item's first voxel (x_item[0 .. C)).
template <typename scalar_t>
void voxel_shifted_sums(const scalar_t* x_item, int64_t channels, int64_t v0, int64_t v1, double* s1,
                        double* s2) {
  for (int64_t v = v0; v < v1; ++v) {
    const scalar_t* row = x_item + v * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const double d = to_double(row[c]) - to_double(x_item[c]);
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

// mean and rstd from the shifted sums over `voxels` values.
template <typename acc_t>
inline void finalize_stats(double shift, double s1, double s2, int64_t voxels, double eps, acc_t* mean,
                           acc_t* rstd) {
  const double m = s1 / static_cast<double>(voxels);
  const double var = std::max(s2 / static_cast<double>(voxels) - m * m, 0.0);
  *mean = static_cast<acc_t>(shift + m);
  // A NaN in the plane must give NaN statistics (std::max drops a NaN first argument).
  *rstd = static_cast<acc_t>(std::isnan(s2) ? s2 : 1.0 / std::sqrt(var + eps));
}

// ---- forward -----------------------------------------------------------------------------------------------

// NCDHW planes [p0, p1): y = lrelu(xhat + r_hat).
template <typename scalar_t, typename acc_t>
void forward_planes(const Tensors<scalar_t, acc_t>& t, int64_t p0, int64_t p1) {
  const int64_t S = t.layout.voxels;
  for (int64_t p = p0; p < p1; ++p) {
    const scalar_t* z = t.z + p * S;
    scalar_t* y = t.y + p * S;
    const acc_t mean = t.mean[p], rstd = t.rstd[p], slope = t.slope;
    if (t.mode == ResidualMode::none) {
#pragma omp simd
      for (int64_t i = 0; i < S; ++i) y[i] = static_cast<scalar_t>(lrelu<acc_t>((to_acc<acc_t>(z[i]) - mean) * rstd, slope));
    } else {
      const scalar_t* r = t.r + p * S;
      const bool norm = t.mode == ResidualMode::normalized;
      const acc_t r_mean = norm ? t.r_mean[p] : acc_t(0), r_rstd = norm ? t.r_rstd[p] : acc_t(1);
#pragma omp simd
      for (int64_t i = 0; i < S; ++i) {
        const acc_t r_hat = norm ? (to_acc<acc_t>(r[i]) - r_mean) * r_rstd : to_acc<acc_t>(r[i]);
        y[i] = static_cast<scalar_t>(lrelu<acc_t>((to_acc<acc_t>(z[i]) - mean) * rstd + r_hat, slope));
      }
    }
  }
}

// Channels_last_3d: voxels [v0, v1) of batch item n.
template <typename scalar_t, typename acc_t>
void forward_voxels(const Tensors<scalar_t, acc_t>& t, int64_t n, int64_t v0, int64_t v1) {
  const int64_t C = t.layout.channels;
  const int64_t base = n * t.layout.voxels * C;
  const acc_t* mean = t.mean + n * C;
  const acc_t* rstd = t.rstd + n * C;
  const acc_t* r_mean = t.mode == ResidualMode::normalized ? t.r_mean + n * C : nullptr;
  const acc_t* r_rstd = t.mode == ResidualMode::normalized ? t.r_rstd + n * C : nullptr;
  const acc_t slope = t.slope;
  for (int64_t v = v0; v < v1; ++v) {
    const int64_t off = base + v * C;
    const scalar_t* z = t.z + off;
    scalar_t* y = t.y + off;
    if (t.mode == ResidualMode::none) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) y[c] = static_cast<scalar_t>(lrelu<acc_t>((to_acc<acc_t>(z[c]) - mean[c]) * rstd[c], slope));
    } else if (t.mode == ResidualMode::plain) {
      const scalar_t* r = t.r + off;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        y[c] = static_cast<scalar_t>(lrelu<acc_t>((to_acc<acc_t>(z[c]) - mean[c]) * rstd[c] + to_acc<acc_t>(r[c]), slope));
      }
    } else {
      const scalar_t* r = t.r + off;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t r_hat = (to_acc<acc_t>(r[c]) - r_mean[c]) * r_rstd[c];
        y[c] = static_cast<scalar_t>(lrelu<acc_t>((to_acc<acc_t>(z[c]) - mean[c]) * rstd[c] + r_hat, slope));
      }
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------------------

// Per element of the backward: gs (grad through the LeakyReLU), xhat of z and r_hat.
template <typename scalar_t, typename acc_t>
struct BackwardElement {
  acc_t gs, xhat, r_hat;
};

template <typename scalar_t, typename acc_t>
inline BackwardElement<scalar_t, acc_t> backward_element(scalar_t g, scalar_t o, const scalar_t* r, ResidualMode mode,
                                                         acc_t r_mean, acc_t r_rstd, acc_t slope) {
  const acc_t out = to_acc<acc_t>(o);
  const bool positive = out > acc_t(0);
  const acc_t gs = positive ? to_acc<acc_t>(g) : to_acc<acc_t>(g) * slope;
  const acc_t s = positive ? out : out / slope;
  acc_t r_hat = acc_t(0);
  if (mode == ResidualMode::plain) r_hat = to_acc<acc_t>(*r);
  if (mode == ResidualMode::normalized) r_hat = (to_acc<acc_t>(*r) - r_mean) * r_rstd;
  return {gs, s - r_hat, r_hat};
}

// NCDHW plane p: sums[0] = sum(gs), sums[1] = sum(gs * xhat), sums[2] = sum(gs * r_hat).
template <typename scalar_t, typename acc_t>
void backward_plane_sums(const Tensors<scalar_t, acc_t>& t, int64_t p, double* sums) {
  const int64_t S = t.layout.voxels;
  const scalar_t* g = t.grad_out + p * S;
  const scalar_t* o = t.out + p * S;
  const scalar_t* r = t.r != nullptr ? t.r + p * S : nullptr;
  const bool norm = t.mode == ResidualMode::normalized;
  const acc_t r_mean = norm ? t.r_mean[p] : acc_t(0), r_rstd = norm ? t.r_rstd[p] : acc_t(1);
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2)
  for (int64_t i = 0; i < S; ++i) {
    const auto e = backward_element<scalar_t, acc_t>(g[i], o[i], r != nullptr ? r + i : nullptr, t.mode, r_mean,
                                                     r_rstd, t.slope);
    s0 += static_cast<double>(e.gs);
    s1 += static_cast<double>(e.gs) * static_cast<double>(e.xhat);
    s2 += static_cast<double>(e.gs) * static_cast<double>(e.r_hat);
  }
  sums[0] = s0;
  sums[1] = s1;
  sums[2] = s2;
}

// Channels_last_3d: adds the sums of voxels [v0, v1) of item n to sums[3][C].
template <typename scalar_t, typename acc_t>
void backward_voxel_sums(const Tensors<scalar_t, acc_t>& t, int64_t n, int64_t v0, int64_t v1, double* sums) {
  const int64_t C = t.layout.channels;
  const int64_t base = n * t.layout.voxels * C;
  const bool norm = t.mode == ResidualMode::normalized;
  double* s0 = sums;
  double* s1 = sums + C;
  double* s2 = sums + 2 * C;
  for (int64_t v = v0; v < v1; ++v) {
    const int64_t off = base + v * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const auto e = backward_element<scalar_t, acc_t>(
          t.grad_out[off + c], t.out[off + c], t.r != nullptr ? t.r + off + c : nullptr, t.mode,
          norm ? t.r_mean[n * C + c] : acc_t(0), norm ? t.r_rstd[n * C + c] : acc_t(1), t.slope);
      s0[c] += static_cast<double>(e.gs);
      s1[c] += static_cast<double>(e.gs) * static_cast<double>(e.xhat);
      s2[c] += static_cast<double>(e.gs) * static_cast<double>(e.r_hat);
    }
  }
}

// The per-(n, c) coefficients of the backward: grad_z = rstd * (gs - a - xhat * b), and for a normalized residual
// grad_r = r_rstd * (gs - a - r_hat * b_r), with a = mean(gs), b = mean(gs * xhat), b_r = mean(gs * r_hat).
template <typename acc_t>
struct BackwardCoefficients {
  acc_t a, b, b_r;
};

template <typename acc_t>
inline BackwardCoefficients<acc_t> backward_coefficients(const double* sums, int64_t voxels) {
  const double inv = 1.0 / static_cast<double>(voxels);
  return {static_cast<acc_t>(sums[0] * inv), static_cast<acc_t>(sums[1] * inv), static_cast<acc_t>(sums[2] * inv)};
}

// NCDHW plane p with its coefficients.
template <typename scalar_t, typename acc_t>
void backward_plane_apply(const Tensors<scalar_t, acc_t>& t, int64_t p, BackwardCoefficients<acc_t> k) {
  const int64_t S = t.layout.voxels;
  const scalar_t* g = t.grad_out + p * S;
  const scalar_t* o = t.out + p * S;
  const scalar_t* r = t.r != nullptr ? t.r + p * S : nullptr;
  scalar_t* gz = t.y + p * S;
  scalar_t* gr = t.grad_r != nullptr ? t.grad_r + p * S : nullptr;
  const bool norm = t.mode == ResidualMode::normalized;
  const acc_t r_mean = norm ? t.r_mean[p] : acc_t(0), r_rstd = norm ? t.r_rstd[p] : acc_t(1);
  const acc_t rstd = t.rstd[p];
#pragma omp simd
  for (int64_t i = 0; i < S; ++i) {
    const auto e = backward_element<scalar_t, acc_t>(g[i], o[i], r != nullptr ? r + i : nullptr, t.mode, r_mean,
                                                     r_rstd, t.slope);
    gz[i] = static_cast<scalar_t>(rstd * (e.gs - k.a - e.xhat * k.b));
    if (t.mode == ResidualMode::plain) gr[i] = static_cast<scalar_t>(e.gs);
    if (norm) gr[i] = static_cast<scalar_t>(r_rstd * (e.gs - k.a - e.r_hat * k.b_r));
  }
}

// Channels_last_3d: voxels [v0, v1) of item n; coefficients k[c] of item n.
template <typename scalar_t, typename acc_t>
void backward_voxel_apply(const Tensors<scalar_t, acc_t>& t, int64_t n, int64_t v0, int64_t v1,
                          const BackwardCoefficients<acc_t>* k) {
  const int64_t C = t.layout.channels;
  const int64_t base = n * t.layout.voxels * C;
  const bool norm = t.mode == ResidualMode::normalized;
  const acc_t* rstd = t.rstd + n * C;
  for (int64_t v = v0; v < v1; ++v) {
    const int64_t off = base + v * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t r_rstd = norm ? t.r_rstd[n * C + c] : acc_t(1);
      const auto e = backward_element<scalar_t, acc_t>(t.grad_out[off + c], t.out[off + c],
                                                       t.r != nullptr ? t.r + off + c : nullptr, t.mode,
                                                       norm ? t.r_mean[n * C + c] : acc_t(0), r_rstd, t.slope);
      t.y[off + c] = static_cast<scalar_t>(rstd[c] * (e.gs - k[c].a - e.xhat * k[c].b));
      if (t.mode == ResidualMode::plain) t.grad_r[off + c] = static_cast<scalar_t>(e.gs);
      if (norm) t.grad_r[off + c] = static_cast<scalar_t>(r_rstd * (e.gs - k[c].a - e.r_hat * k[c].b_r));
    }
  }
}

}  // namespace instance_norm
}  // namespace uxnet
