// Chunk kernels of the CPU channels-first LayerNorm (forward and backward).
//
// NO include guard: layer_norm_cf.cpp includes this once per instruction set, each time inside its own
// namespace and `#pragma GCC target` region (see ln_mlp_tile_math.h).
#include "cpu/ln_mlp_tile_math.h"

template <typename scalar_t, typename acc_t, bool kChannelsLast>
void layer_norm_forward_chunks(const ::uxnet::ln_mlp::LayerNormForwardArgs<scalar_t, acc_t>& a,
                               int64_t chunk_begin, int64_t chunk_end) {
  using V = Lanes<acc_t>;
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  LaneBuffer<V> rows(C * kSub);
  V mean[kSub], rstd[kSub];
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int64_t tile_end = std::min(t.num_tiles, (chunk + 1) * t.tiles_per_chunk);
    for (int64_t i = chunk * t.tiles_per_chunk; i < tile_end; ++i) {
      const TileRef tile = ::uxnet::ln_mlp::tile_ref(t, i);
      load_tile<kChannelsLast, scalar_t, acc_t>(a.x, t, tile, rows.data());
      tile_stats(rows.data(), C, a.eps, mean, rstd);
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t s = 0; s < kSub; ++s) {
          V& row = rows[c * kSub + s];
          row = (row - mean[s]) * rstd[s] * a.weight[c] + a.bias[c];
        }
      }
      store_tile<kChannelsLast, scalar_t, acc_t>(rows.data(), t, tile, a.out);
      store_stats(mean, rstd, t, tile, a.mean, a.rstd);
    }
  }
}

// grad_x = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)) with g = grad_out * weight;
// grad_weight = sum over voxels of grad_out * xhat, grad_bias = sum of grad_out (as per-chunk partials).
template <typename scalar_t, typename acc_t, bool kChannelsLast>
void layer_norm_backward_chunks(const ::uxnet::ln_mlp::LayerNormBackwardArgs<scalar_t, acc_t>& a,
                                int64_t chunk_begin, int64_t chunk_end) {
  using V = Lanes<acc_t>;
  constexpr int64_t kRows = ::uxnet::ln_mlp::kLayerNormParams;
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  LaneBuffer<V> grad(C * kSub);
  LaneBuffer<V> x(C * kSub);
  LaneBuffer<V> lanes(a.partials != nullptr ? C * kRows * kSub : 0);
  V mean[kSub], rstd[kSub];
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    double* partial = a.partials != nullptr ? a.partials + chunk * kRows * C : nullptr;
    if (partial != nullptr) {
      std::fill(partial, partial + kRows * C, 0.0);
    }
    const int64_t tile_begin = chunk * t.tiles_per_chunk;
    const int64_t tile_end = std::min(t.num_tiles, tile_begin + t.tiles_per_chunk);
    for (int64_t i = tile_begin; i < tile_end; ++i) {
      const TileRef tile = ::uxnet::ln_mlp::tile_ref(t, i);
      load_tile<kChannelsLast, scalar_t, acc_t>(a.grad_out, t, tile, grad.data());
      load_tile<kChannelsLast, scalar_t, acc_t>(a.x, t, tile, x.data());
      load_stats(a.mean, a.rstd, t, tile, mean, rstd);
      for (int64_t s = 0; s < kSub; ++s) {
        V sum_g{};
        V sum_gx{};
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i_cs = c * kSub + s;
          const V xhat = (x[i_cs] - mean[s]) * rstd[s];
          if (partial != nullptr) {
            lanes[(c * kRows + 0) * kSub + s] += grad[i_cs] * xhat;
            lanes[(c * kRows + 1) * kSub + s] += grad[i_cs];
          }
          const V gw = grad[i_cs] * a.weight[c];
          sum_g += gw;
          sum_gx += gw * xhat;
          grad[i_cs] = gw;
        }
        if (a.grad_x != nullptr) {
          const V mean_g = sum_g * inv_c;
          const V mean_gx = sum_gx * inv_c;
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i_cs = c * kSub + s;
            const V xhat = (x[i_cs] - mean[s]) * rstd[s];
            grad[i_cs] = rstd[s] * (grad[i_cs] - mean_g - xhat * mean_gx);
          }
        }
      }
      if (a.grad_x != nullptr) {
        store_tile<kChannelsLast, scalar_t, acc_t>(grad.data(), t, tile, a.grad_x);
      }
      const bool flush = (i - tile_begin + 1) % ::uxnet::ln_mlp::kTilesPerFlush == 0 || i + 1 == tile_end;
      if (partial != nullptr && flush) {
        flush_lanes<acc_t>(lanes.data(), kRows, C, partial);
      }
    }
  }
}
