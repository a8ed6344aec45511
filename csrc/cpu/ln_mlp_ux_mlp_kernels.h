// Chunk kernels of the CPU fused UX MLP (forward and backward), one pass over each voxel's C channels:
//   n_c = LN(y)_c * ln_weight_c + ln_bias_c;  u_cj = w1_cj * n_c + b1_cj;  h_cj = u_cj * Phi(u_cj)
//   z_c = sum_j w2_cj * h_cj + b2_c;          out_c = residual_c + gamma_c * z_c
// The backward recomputes n, u, h from y and the saved per-voxel mean / rstd; nothing 4C-wide is stored.
//
// NO include guard: ux_mlp.cpp includes this once per instruction set, each time inside its own namespace
// and `#pragma GCC target` region (see ln_mlp_tile_math.h).
#include "cpu/ln_mlp_tile_math.h"

template <typename acc_t>
struct MlpChannelParams {
  acc_t ln_weight, ln_bias, w1[4], b1[4], w2[4], b2, gamma;
};

template <typename acc_t>
UXNET_LN_MLP_INLINE MlpChannelParams<acc_t> mlp_channel_params(const acc_t* table, int64_t C, int64_t c) {
  using namespace ::uxnet::ln_mlp;
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
void ux_mlp_forward_chunks(const ::uxnet::ln_mlp::UxMlpForwardArgs<scalar_t, acc_t>& a, int64_t chunk_begin,
                           int64_t chunk_end) {
  using V = Lanes<acc_t>;
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  LaneBuffer<V> rows(C * kSub);
  LaneBuffer<V> residual(C * kSub);  // stays zero without a residual
  V mean[kSub], rstd[kSub];
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int64_t tile_end = std::min(t.num_tiles, (chunk + 1) * t.tiles_per_chunk);
    for (int64_t i = chunk * t.tiles_per_chunk; i < tile_end; ++i) {
      const TileRef tile = ::uxnet::ln_mlp::tile_ref(t, i);
      load_tile<kChannelsLast, scalar_t, acc_t>(a.y, t, tile, rows.data());
      if (a.residual != nullptr) {
        load_tile<kChannelsLast, scalar_t, acc_t>(a.residual, t, tile, residual.data());
      }
      tile_stats(rows.data(), C, a.eps, mean, rstd);
      for (int64_t c = 0; c < C; ++c) {
        const MlpChannelParams<acc_t> p = mlp_channel_params(a.params, C, c);
        for (int64_t s = 0; s < kSub; ++s) {
          const int64_t i_cs = c * kSub + s;
          const V n = (rows[i_cs] - mean[s]) * rstd[s] * p.ln_weight + p.ln_bias;
          V z = broadcast(p.b2);
          for (int j = 0; j < 4; ++j) {
            const V u = n * p.w1[j] + p.b1[j];
            V cdf, pdf;
            normal_cdf_pdf(u, cdf, pdf);
            z += p.w2[j] * (u * cdf);
          }
          rows[i_cs] = residual[i_cs] + p.gamma * z;
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
void ux_mlp_backward_chunks(const ::uxnet::ln_mlp::UxMlpBackwardArgs<scalar_t, acc_t>& a, int64_t chunk_begin,
                            int64_t chunk_end) {
  using namespace ::uxnet::ln_mlp;
  using V = Lanes<acc_t>;
  constexpr int64_t kRows = kMlpParams;
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  LaneBuffer<V> grad(C * kSub);
  LaneBuffer<V> y(C * kSub);
  LaneBuffer<V> lanes(C * kRows * kSub);
  V mean[kSub], rstd[kSub];
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
      for (int64_t s = 0; s < kSub; ++s) {
        V sum_g{};
        V sum_gx{};
        for (int64_t c = 0; c < C; ++c) {
          const MlpChannelParams<acc_t> p = mlp_channel_params(a.params, C, c);
          const int64_t i_cs = c * kSub + s;
          V* lane = lanes.data() + c * kRows * kSub + s;  // row r of channel c at lane[r * kSub]
          const V g = grad[i_cs];
          const V xhat = (y[i_cs] - mean[s]) * rstd[s];
          const V n = xhat * p.ln_weight + p.ln_bias;
          const V gz = g * p.gamma;
          V z = broadcast(p.b2);
          V gn{};
          for (int j = 0; j < 4; ++j) {
            const V u = n * p.w1[j] + p.b1[j];
            V cdf, pdf;
            normal_cdf_pdf(u, cdf, pdf);
            const V h = u * cdf;
            const V gu = gz * p.w2[j] * (cdf + u * pdf);
            z += p.w2[j] * h;
            lane[(kW2 + j) * kSub] += gz * h;
            lane[(kB1 + j) * kSub] += gu;
            lane[(kW1 + j) * kSub] += gu * n;
            gn += gu * p.w1[j];
          }
          lane[kGamma * kSub] += g * z;
          lane[kB2 * kSub] += gz;
          lane[kLnBias * kSub] += gn;
          lane[kLnWeight * kSub] += gn * xhat;
          const V gx = gn * p.ln_weight;
          sum_g += gx;
          sum_gx += gx * xhat;
          grad[i_cs] = gx;
        }
        const V mean_g = sum_g * inv_c;
        const V mean_gx = sum_gx * inv_c;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i_cs = c * kSub + s;
          const V xhat = (y[i_cs] - mean[s]) * rstd[s];
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
