// Chunk kernels of the CPU channels-first LayerNorm (forward and backward).
//
// NO include guard: layer_norm_cf.cpp includes this once per instruction set, each time inside its own
// namespace and `#pragma GCC target` region (see ln_mlp_tile_math.h).
//
// Backward: grad_x = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)) with g = grad_out * weight;
// grad_weight = sum over voxels of grad_out * xhat, grad_bias = sum of grad_out (as per-chunk partials).
#include "cpu/ln_mlp_tile_math.h"

// ---- channels_last_3d: tiles of kTile voxels ---------------------------------------------------------------

template <typename scalar_t, typename acc_t>
void layer_norm_forward_tiles(const ::uxnet::ln_mlp::LayerNormForwardArgs<scalar_t, acc_t>& a,
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
      load_tile<true, scalar_t, acc_t>(a.x, t, tile, rows.data());
      tile_stats(rows.data(), C, a.eps, mean, rstd);
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t s = 0; s < kSub; ++s) {
          V& row = rows[c * kSub + s];
          row = (row - mean[s]) * rstd[s] * a.weight[c] + a.bias[c];
        }
      }
      store_tile<true, scalar_t, acc_t>(rows.data(), t, tile, a.out);
      store_stats(mean, rstd, t, tile, a.mean, a.rstd);
    }
  }
}

template <typename scalar_t, typename acc_t>
void layer_norm_backward_tiles(const ::uxnet::ln_mlp::LayerNormBackwardArgs<scalar_t, acc_t>& a,
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
      load_tile<true, scalar_t, acc_t>(a.grad_out, t, tile, grad.data());
      load_tile<true, scalar_t, acc_t>(a.x, t, tile, x.data());
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
        store_tile<true, scalar_t, acc_t>(grad.data(), t, tile, a.grad_x);
      }
      const bool flush = (i - tile_begin + 1) % ::uxnet::ln_mlp::kTilesPerFlush == 0 || i + 1 == tile_end;
      if (partial != nullptr && flush) {
        flush_lanes<acc_t>(lanes.data(), kRows, C, partial);
      }
    }
  }
}

// ---- NCDHW: row blocks of t.tile_voxels voxels, streamed channel by channel ----------------------------------
// Row c of a block is x[n, c, v0 : v0 + count], contiguous. Each pass walks the C rows one after another, so
// memory is read in long sequential runs (the C rows of a block lie a whole plane apart: gathering them voxel
// by voxel defeats the prefetchers and, for power-of-two planes, the cache sets). The per-voxel state of a
// block (a few lane arrays of t.tile_voxels) stays in L1; x is read twice, in the statistics and output passes.
// Every pass prefetches the next channel's rows one row ahead (for writing, too): each row is a new page, where
// the hardware prefetchers would have to start over.

template <typename scalar_t, typename acc_t>
void layer_norm_forward_rows(const ::uxnet::ln_mlp::LayerNormForwardArgs<scalar_t, acc_t>& a,
                             int64_t chunk_begin, int64_t chunk_end) {
  using V = Lanes<acc_t>;
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  LaneBuffer<V> mean(t.tile_voxels / kLanes);
  LaneBuffer<V> rstd(t.tile_voxels / kLanes);  // holds the sum of squared deviations until the end of pass 1
  const int64_t tile_end = std::min(t.num_tiles, chunk_end * t.tiles_per_chunk);
  for (int64_t i = chunk_begin * t.tiles_per_chunk; i < tile_end; ++i) {
    const TileRef tile = ::uxnet::ln_mlp::tile_ref(t, i);
    const int64_t nv = (tile.count + kLanes - 1) / kLanes;
    const scalar_t* x = a.x + tile.n * C * t.voxels + tile.v0;
    scalar_t* out = a.out + tile.n * C * t.voxels + tile.v0;
    for (int64_t v = 0; v < nv; ++v) {
      mean[v] = V{};
      rstd[v] = V{};
    }
    // Pass 1: Welford's update over the channels, per voxel.
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* row = x + c * t.voxels;
      const acc_t inv_count = acc_t(1) / static_cast<acc_t>(c + 1);
      for_each_lane_vector(tile.count, [&](int64_t v, auto whole) {
        __builtin_prefetch(row + t.voxels + v * kLanes);
        const V xv = lanes_at<acc_t>(row, v, tile.count, whole);
        const V delta = xv - mean[v];
        mean[v] += delta * inv_count;
        rstd[v] += delta * (xv - mean[v]);
      });
    }
    for (int64_t v = 0; v < nv; ++v) {
      rstd[v] = lane_rsqrt(rstd[v] / static_cast<acc_t>(C) + a.eps);
    }
    // Pass 2: normalise, scale, shift.
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* row = x + c * t.voxels;
      const acc_t w = a.weight[c];
      const acc_t b = a.bias[c];
      scalar_t* out_row = out + c * t.voxels;
      for_each_lane_vector(tile.count, [&](int64_t v, auto whole) {
        __builtin_prefetch(row + t.voxels + v * kLanes);
        __builtin_prefetch(out_row + t.voxels + v * kLanes, 1);
        const V xv = lanes_at<acc_t>(row, v, tile.count, whole);
        store_lanes_at<scalar_t, acc_t>(out_row, v, tile.count, whole, (xv - mean[v]) * rstd[v] * w + b);
      });
    }
    store_stats(mean.data(), rstd.data(), t, tile, a.mean, a.rstd);
  }
}

template <typename scalar_t, typename acc_t>
void layer_norm_backward_rows(const ::uxnet::ln_mlp::LayerNormBackwardArgs<scalar_t, acc_t>& a,
                              int64_t chunk_begin, int64_t chunk_end) {
  using V = Lanes<acc_t>;
  using DoubleLanes = Lanes<double>;
  constexpr int64_t kRows = ::uxnet::ln_mlp::kLayerNormParams;
  constexpr int64_t kChains = 4;  // independent accumulators per parameter sum, to hide the add latency
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  const int64_t width = t.tile_voxels / kLanes;
  LaneBuffer<V> mean(width);
  LaneBuffer<V> rstd(width);
  LaneBuffer<V> mean_g(width);   // per voxel: mean_c(grad_out * weight)
  LaneBuffer<V> mean_gx(width);  // per voxel: mean_c(grad_out * weight * xhat)
  LaneBuffer<DoubleLanes> param_lanes(a.partials != nullptr ? C * kRows : 0);  // [C][kRows], lane-wise sums
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int64_t tile_begin = chunk * t.tiles_per_chunk;
    const int64_t tile_end = std::min(t.num_tiles, tile_begin + t.tiles_per_chunk);
    for (int64_t i = tile_begin; i < tile_end; ++i) {
      const TileRef tile = ::uxnet::ln_mlp::tile_ref(t, i);
      const int64_t nv = (tile.count + kLanes - 1) / kLanes;
      const int64_t offset = tile.n * C * t.voxels + tile.v0;
      load_stats(a.mean, a.rstd, t, tile, mean.data(), rstd.data());
      for (int64_t v = 0; v < nv; ++v) {
        mean_g[v] = V{};
        mean_gx[v] = V{};
      }
      // Pass 1: the per-voxel sums over channels and the per-channel parameter sums.
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* x_row = a.x + offset + c * t.voxels;
        const scalar_t* g_row = a.grad_out + offset + c * t.voxels;
        const acc_t w = a.weight[c];
        V dw[kChains] = {};
        V db[kChains] = {};
        for_each_lane_vector(tile.count, [&](int64_t v, auto whole) {
          __builtin_prefetch(g_row + t.voxels + v * kLanes);
          __builtin_prefetch(x_row + t.voxels + v * kLanes);
          const V g = lanes_at<acc_t>(g_row, v, tile.count, whole);
          const V xhat = (lanes_at<acc_t>(x_row, v, tile.count, whole) - mean[v]) * rstd[v];
          const int64_t chain = v % kChains;
          dw[chain] += g * xhat;
          db[chain] += g;
          const V gw = g * w;
          mean_g[v] += gw;
          mean_gx[v] += gw * xhat;
        });
        if (a.partials != nullptr) {
          param_lanes[c * kRows + 0] += __builtin_convertvector((dw[0] + dw[1]) + (dw[2] + dw[3]), DoubleLanes);
          param_lanes[c * kRows + 1] += __builtin_convertvector((db[0] + db[1]) + (db[2] + db[3]), DoubleLanes);
        }
      }
      if (a.grad_x == nullptr) {
        continue;
      }
      for (int64_t v = 0; v < nv; ++v) {
        mean_g[v] /= static_cast<acc_t>(C);
        mean_gx[v] /= static_cast<acc_t>(C);
      }
      // Pass 2: grad_x.
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* x_row = a.x + offset + c * t.voxels;
        const scalar_t* g_row = a.grad_out + offset + c * t.voxels;
        scalar_t* gx_row = a.grad_x + offset + c * t.voxels;
        const acc_t w = a.weight[c];
        for_each_lane_vector(tile.count, [&](int64_t v, auto whole) {
          __builtin_prefetch(g_row + t.voxels + v * kLanes);
          __builtin_prefetch(x_row + t.voxels + v * kLanes);
          __builtin_prefetch(gx_row + t.voxels + v * kLanes, 1);
          const V g = lanes_at<acc_t>(g_row, v, tile.count, whole);
          const V xhat = (lanes_at<acc_t>(x_row, v, tile.count, whole) - mean[v]) * rstd[v];
          store_lanes_at<scalar_t, acc_t>(gx_row, v, tile.count, whole,
                                          rstd[v] * (g * w - mean_g[v] - xhat * mean_gx[v]));
        });
      }
    }
    if (a.partials != nullptr) {
      double* partial = a.partials + chunk * kRows * C;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t row = 0; row < kRows; ++row) {
          DoubleLanes& lanes = param_lanes[c * kRows + row];
          double sum = 0.0;
          for (int64_t b = 0; b < kLanes; ++b) {
            sum += lanes[b];
          }
          partial[row * C + c] = sum;
          lanes = DoubleLanes{};
        }
      }
    }
  }
}
