// Chunk kernels of the CPU fused UX MLP (forward and backward), one pass over each voxel's C channels:
//   n_c = LN(y)_c * ln_weight_c + ln_bias_c;  u_cj = w1_cj * n_c + b1_cj;  h_cj = u_cj * Phi(u_cj)
//   z_c = sum_j w2_cj * h_cj + b2_c;          out_c = residual_c + gamma_c * z_c
// The backward recomputes n, u, h from y and the saved per-voxel mean (plus a correction, centred() in
// tile_math.h) and rstd; nothing 4C-wide is stored.
//
// NO include guard: kernels.cpp compiles this through simd/compile_per_isa.inc, once per ISA variant.
#include "cpu/common/tile_math.h"

namespace ux_mlp_kernels {

using namespace ::uxnet::cpu::voxel_tiling;
using namespace ::uxnet::cpu::ux_mlp::param_rows;  // kLnWeight, ...
template <typename scalar_t, typename acc_t>
using ForwardArgs = ::uxnet::cpu::ux_mlp::ForwardArgs<scalar_t, acc_t>;
template <typename scalar_t, typename acc_t>
using BackwardArgs = ::uxnet::cpu::ux_mlp::BackwardArgs<scalar_t, acc_t>;

template <typename acc_t>
struct MlpChannelParams {
  acc_t ln_weight, ln_bias, w1[4], b1[4], w2[4], b2, gamma;
};

template <typename acc_t>
UXNET_SIMD_INLINE MlpChannelParams<acc_t> mlp_channel_params(const acc_t* table, int64_t C, int64_t c) {
  MlpChannelParams<acc_t> p;
  p.ln_weight = table[kLnWeight * C + c];
  p.ln_bias = table[kLnBias * C + c];
  for (int j = 0; j < 4; ++j) {
    p.w1[j] = table[(kW1 + j) * C + c];
    p.b1[j] = table[(kB1 + j) * C + c];
    p.w2[j] = table[(kW2 + j) * C + c];
  }
  p.b2 = table[kB2 * C + c];
  p.gamma = table[kGamma * C + c];
  return p;
}

template <typename scalar_t, typename acc_t, bool kChannelsLast>
void forward_chunks(const ForwardArgs<scalar_t, acc_t>& a, int64_t chunk_begin, int64_t chunk_end) {
  using V = Lanes<acc_t>;
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  LaneBuffer<V> rows(C * kSub);
  LaneBuffer<V> residual(C * kSub);  // stays zero without a residual
  V mean[kSub], rstd[kSub];
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int64_t tile_end = std::min(t.num_tiles, (chunk + 1) * t.tiles_per_chunk);
    for (int64_t i = chunk * t.tiles_per_chunk; i < tile_end; ++i) {
      const TileRef tile = tile_ref(t, i);
      load_tile<kChannelsLast, scalar_t, acc_t>(a.y, t, tile, rows.data());
      if (a.residual != nullptr) {
        load_tile<kChannelsLast, scalar_t, acc_t>(a.residual, t, tile, residual.data());
      }
      tile_stats(rows.data(), C, a.eps, mean, rstd);
      for (int64_t c = 0; c < C; ++c) {
        const MlpChannelParams<acc_t> p = mlp_channel_params(a.params, C, c);
        for (int64_t s = 0; s < kSub; ++s) {
          const int64_t i_cs = c * kSub + s;
          const V n = fma((rows[i_cs] - mean[s]) * rstd[s], broadcast<V>(p.ln_weight), broadcast<V>(p.ln_bias));
          V z = broadcast<V>(p.b2);
          for (int j = 0; j < 4; ++j) {
            const V u = fma(n, broadcast<V>(p.w1[j]), broadcast<V>(p.b1[j]));
            V cdf, pdf;
            normal_cdf_pdf(u, cdf, pdf);
            z = fma(broadcast<V>(p.w2[j]), u * cdf, z);
          }
          rows[i_cs] = fma(broadcast<V>(p.gamma), z, residual[i_cs]);
        }
      }
      store_tile<kChannelsLast, scalar_t, acc_t>(rows.data(), t, tile, a.out);
      store_stats(mean, rstd, t, tile, a.mean, a.rstd);
    }
  }
}

// Per channel (g = grad_out, gz = g * gamma):
//   d gamma += g * z;  d b2 += gz;  d w2_j += gz * h_j;  gu_j = gz * w2_j * GELU'(u_j)
//   d b1_j += gu_j;  d w1_j += gu_j * n;  gn = sum_j gu_j * w1_j;  d ln_bias += gn;  d ln_weight += gn * xhat
// then the LayerNorm input gradient of gxhat = gn * ln_weight, as in the LayerNorm backward.
template <typename scalar_t, typename acc_t, bool kChannelsLast>
void backward_chunks(const BackwardArgs<scalar_t, acc_t>& a, int64_t chunk_begin, int64_t chunk_end) {
  using V = Lanes<acc_t>;
  constexpr int64_t kRows = kMlpParams;
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  LaneBuffer<V> grad(C * kSub);
  LaneBuffer<V> y(C * kSub);
  LaneBuffer<V> lanes(C * kRows * kSub);
  V mean[kSub], mean_lo[kSub], rstd[kSub];
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    double* partial = a.partials + chunk * kRows * C;
    std::fill(partial, partial + kRows * C, 0.0);
    const int64_t tile_begin = chunk * t.tiles_per_chunk;
    const int64_t tile_end = std::min(t.num_tiles, tile_begin + t.tiles_per_chunk);
    for (int64_t i = tile_begin; i < tile_end; ++i) {
      const TileRef tile = tile_ref(t, i);
      load_tile<kChannelsLast, scalar_t, acc_t>(a.grad_out, t, tile, grad.data());
      load_tile<kChannelsLast, scalar_t, acc_t>(a.y, t, tile, y.data());
      load_stats(a.mean, a.rstd, t, tile, mean, rstd);
      tile_mean_corrections(y.data(), C, mean, mean_lo);
      for (int64_t s = 0; s < kSub; ++s) {
        V sum_g{};
        V sum_gx{};
        for (int64_t c = 0; c < C; ++c) {
          const MlpChannelParams<acc_t> p = mlp_channel_params(a.params, C, c);
          const int64_t i_cs = c * kSub + s;
          V* lane = lanes.data() + c * kRows * kSub + s;  // row r of channel c at lane[r * kSub]
          const V g = grad[i_cs];
          const V xhat = centred(y[i_cs], mean[s], mean_lo[s]) * rstd[s];
          const V n = fma(xhat, broadcast<V>(p.ln_weight), broadcast<V>(p.ln_bias));
          const V gz = g * p.gamma;
          V z = broadcast<V>(p.b2);
          V gn{};
          for (int j = 0; j < 4; ++j) {
            const V w1 = broadcast<V>(p.w1[j]);
            const V w2 = broadcast<V>(p.w2[j]);
            const V u = fma(n, w1, broadcast<V>(p.b1[j]));
            V cdf, pdf;
            normal_cdf_pdf(u, cdf, pdf);
            const V h = u * cdf;
            const V gu = gz * w2 * fma(u, pdf, cdf);
            z = fma(w2, h, z);
            lane[(kW2 + j) * kSub] = fma(gz, h, lane[(kW2 + j) * kSub]);
            lane[(kB1 + j) * kSub] += gu;
            lane[(kW1 + j) * kSub] = fma(gu, n, lane[(kW1 + j) * kSub]);
            gn = fma(gu, w1, gn);
          }
          lane[kGamma * kSub] = fma(g, z, lane[kGamma * kSub]);
          lane[kB2 * kSub] += gz;
          lane[kLnBias * kSub] += gn;
          lane[kLnWeight * kSub] = fma(gn, xhat, lane[kLnWeight * kSub]);
          const V gx = gn * p.ln_weight;
          sum_g += gx;
          sum_gx = fma(gx, xhat, sum_gx);
          grad[i_cs] = gx;
        }
        const V mean_g = sum_g * inv_c;
        const V mean_gx = sum_gx * inv_c;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i_cs = c * kSub + s;
          const V xhat = centred(y[i_cs], mean[s], mean_lo[s]) * rstd[s];
          // Unfused on purpose: for C = 1, grad - mean_g is exactly 0 and xhat is exactly 0.
          grad[i_cs] = rstd[s] * (grad[i_cs] - mean_g - xhat * mean_gx);
        }
      }
      store_tile<kChannelsLast, scalar_t, acc_t>(grad.data(), t, tile, a.grad_y);
      if ((i - tile_begin + 1) % kTilesPerFlush == 0 || i + 1 == tile_end) {
        flush_lanes<acc_t>(lanes.data(), kRows, C, partial);
      }
    }
  }
}

// ---- few channels (C <= kFewChannels): the backward in float64, voxel by voxel -------------------------------
// As for the LayerNorm (layer_norm_channels_first/kernels.h): with few channels grad_y is ill-conditioned, and
// with C = 1 every voxel shares its pre-activations, so the parameter gradients are one GELU'-weighted sum that can
// cancel. float64 arithmetic (and libm's erfc / exp) leaves only the rounding of the saved float32 rstd.

template <typename scalar_t, typename acc_t, bool kChannelsLast>
void backward_few_channels(const BackwardArgs<scalar_t, acc_t>& a, int64_t chunk_begin, int64_t chunk_end) {
  using ::uxnet::cpu::simd::convert;
  constexpr int64_t kMax = ::uxnet::cpu::ux_mlp::kFewChannels;
  constexpr int64_t kRows = kMlpParams;
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  const int64_t channel_stride = kChannelsLast ? 1 : t.voxels;
  double table[kRows][kMax];
  for (int64_t row = 0; row < kRows; ++row) {
    for (int64_t c = 0; c < C; ++c) {
      table[row][c] = static_cast<double>(a.params[row * C + c]);
    }
  }
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    double* partial = a.partials + chunk * kRows * C;
    std::fill(partial, partial + kRows * C, 0.0);
    for_each_chunk_voxel(t, chunk, [&](int64_t voxel, int64_t base) {
      double y[kMax], g[kMax], xhat[kMax], gx[kMax];
      const double mean = load_voxel_channels(a.y, a.grad_out, base, channel_stride, C, y, g);
      const double rstd = static_cast<double>(a.rstd[voxel]);
      double sum_g = 0.0, sum_gx = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        xhat[c] = (y[c] - mean) * rstd;
        const double n = xhat[c] * table[kLnWeight][c] + table[kLnBias][c];
        const double gz = g[c] * table[kGamma][c];
        double z = table[kB2][c];
        double gn = 0.0;
        for (int64_t j = 0; j < 4; ++j) {
          const double u = n * table[kW1 + j][c] + table[kB1 + j][c];
          const double cdf = 0.5 * std::erfc(-u * 0.70710678118654752440);
          const double pdf = std::exp(-0.5 * u * u) * 0.39894228040143267794;
          const double h = u * cdf;
          const double gu = gz * table[kW2 + j][c] * (cdf + u * pdf);
          z += table[kW2 + j][c] * h;
          partial[(kW2 + j) * C + c] += gz * h;
          partial[(kB1 + j) * C + c] += gu;
          partial[(kW1 + j) * C + c] += gu * n;
          gn += gu * table[kW1 + j][c];
        }
        partial[kGamma * C + c] += g[c] * z;
        partial[kB2 * C + c] += gz;
        partial[kLnBias * C + c] += gn;
        partial[kLnWeight * C + c] += gn * xhat[c];
        gx[c] = gn * table[kLnWeight][c];
        sum_g += gx[c];
        sum_gx += gx[c] * xhat[c];
      }
      const double mean_g = sum_g / static_cast<double>(C);
      const double mean_gx = sum_gx / static_cast<double>(C);
      for (int64_t c = 0; c < C; ++c) {
        a.grad_y[base + c * channel_stride] = convert<scalar_t>(rstd * (gx[c] - mean_g - xhat[c] * mean_gx));
      }
    });
  }
}

}  // namespace ux_mlp_kernels
