// Chunk kernels of the CPU channels-first LayerNorm (forward and backward).
//
// NO include guard: layer_norm_cf.cpp includes this once per instruction set, each time inside its own
// namespace and `#pragma GCC target` region (see ln_mlp_tile_math.h).
//
// Backward: grad_x = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)) with g = grad_out * weight;
// grad_weight = sum over voxels of grad_out * xhat, grad_bias = sum of grad_out (as per-chunk partials).
#include "cpu/ln_mlp_tile_math.h"

// ---- channels_last_3d: voxel by voxel; a voxel's C channels are contiguous, lane = channel --------------------

// The C values of a per-channel parameter as lane vectors, zero past C.
template <typename acc_t>
UXNET_LN_MLP_INLINE void channel_lanes(const acc_t* param, int64_t C, Lanes<acc_t>* out) {
  for (int64_t j = 0; j * kLanes < C; ++j) {
    out[j] = row_lanes<acc_t>(param, j, C);
  }
}

// Sum of the lanes, pairwise in a fixed order.
template <typename V>
UXNET_LN_MLP_INLINE auto lane_sum(V v) {
  for (int64_t half = kLanes / 2; half >= 1; half /= 2) {
    for (int64_t b = 0; b < half; ++b) {
      v[b] += v[b + half];
    }
  }
  return v[0];
}

template <typename scalar_t, typename acc_t>
void layer_norm_forward_voxels(const ::uxnet::ln_mlp::LayerNormForwardArgs<scalar_t, acc_t>& a,
                               int64_t chunk_begin, int64_t chunk_end) {
  using V = Lanes<acc_t>;
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  const int64_t channel_vectors = (C + kLanes - 1) / kLanes;
  LaneBuffer<V> weight(channel_vectors);
  LaneBuffer<V> bias(channel_vectors);
  channel_lanes(a.weight, C, weight.data());
  channel_lanes(a.bias, C, bias.data());
  V in_last_vector{};  // 1 in the lanes of the partial last channel vector that hold a channel
  for (int64_t b = 0; b < kLanes; ++b) {
    in_last_vector[b] = (channel_vectors - 1) * kLanes + b < C ? acc_t(1) : acc_t(0);
  }
  const int64_t tile_end = std::min(t.num_tiles, chunk_end * t.tiles_per_chunk);
  for (int64_t i = chunk_begin * t.tiles_per_chunk; i < tile_end; ++i) {
    const TileRef tile = ::uxnet::ln_mlp::tile_ref(t, i);
    for (int64_t voxel = tile.n * t.voxels + tile.v0; voxel < tile.n * t.voxels + tile.v0 + tile.count; ++voxel) {
      const scalar_t* x = a.x + voxel * C;
      V sum{};
      for_each_lane_vector(C, [&](int64_t j, auto whole) { sum += lanes_at<acc_t>(x, j, C, whole); });
      const acc_t mean = lane_sum(sum) / static_cast<acc_t>(C);
      V squares{};
      for_each_lane_vector(C, [&](int64_t j, auto whole) {
        V d = lanes_at<acc_t>(x, j, C, whole) - mean;
        if constexpr (!decltype(whole)::value) {
          d *= in_last_vector;  // the padding lanes read 0, not mean
        }
        squares += d * d;
      });
      const acc_t rstd = acc_t(1) / std::sqrt(lane_sum(squares) / static_cast<acc_t>(C) + a.eps);
      scalar_t* out = a.out + voxel * C;
      for_each_lane_vector(C, [&](int64_t j, auto whole) {
        const V y = (lanes_at<acc_t>(x, j, C, whole) - mean) * rstd * weight[j] + bias[j];
        store_lanes_at<scalar_t, acc_t>(out, j, C, whole, y);
      });
      a.mean[voxel] = mean;
      a.rstd[voxel] = rstd;
    }
  }
}

template <typename scalar_t, typename acc_t>
void layer_norm_backward_voxels(const ::uxnet::ln_mlp::LayerNormBackwardArgs<scalar_t, acc_t>& a,
                                int64_t chunk_begin, int64_t chunk_end) {
  using V = Lanes<acc_t>;
  using DoubleLanes = Lanes<double>;
  constexpr int64_t kRows = ::uxnet::ln_mlp::kLayerNormParams;
  constexpr int64_t kVoxelsPerFlush = 16;  // float lane sums are moved into the double sums this often
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  const int64_t channel_vectors = (C + kLanes - 1) / kLanes;
  LaneBuffer<V> weight(channel_vectors);
  LaneBuffer<V> grad_weight(channel_vectors);  // since the last flush
  LaneBuffer<V> grad_bias(channel_vectors);
  LaneBuffer<DoubleLanes> param_sums(kRows * channel_vectors);  // [kRows][channel_vectors], this chunk
  channel_lanes(a.weight, C, weight.data());
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int64_t tile_begin = chunk * t.tiles_per_chunk;
    const int64_t tile_end = std::min(t.num_tiles, tile_begin + t.tiles_per_chunk);
    for (int64_t i = tile_begin; i < tile_end; ++i) {
      const TileRef tile = ::uxnet::ln_mlp::tile_ref(t, i);
      for (int64_t p = 0; p < tile.count; ++p) {
        const int64_t voxel = tile.n * t.voxels + tile.v0 + p;
        const scalar_t* x = a.x + voxel * C;
        const scalar_t* grad_out = a.grad_out + voxel * C;
        const acc_t mean = a.mean[voxel];
        const acc_t rstd = a.rstd[voxel];
        V sum_g{};   // grad_out * weight (padding lanes: grad_out is 0)
        V sum_gx{};  // grad_out * weight * xhat
        for_each_lane_vector(C, [&](int64_t j, auto whole) {
          const V g = lanes_at<acc_t>(grad_out, j, C, whole);
          const V xhat = (lanes_at<acc_t>(x, j, C, whole) - mean) * rstd;
          grad_weight[j] += g * xhat;
          grad_bias[j] += g;
          const V gw = g * weight[j];
          sum_g += gw;
          sum_gx += gw * xhat;
        });
        if (a.grad_x != nullptr) {
          const acc_t mean_g = lane_sum(sum_g) / static_cast<acc_t>(C);
          const acc_t mean_gx = lane_sum(sum_gx) / static_cast<acc_t>(C);
          scalar_t* grad_x = a.grad_x + voxel * C;
          for_each_lane_vector(C, [&](int64_t j, auto whole) {
            const V g = lanes_at<acc_t>(grad_out, j, C, whole);
            const V xhat = (lanes_at<acc_t>(x, j, C, whole) - mean) * rstd;
            store_lanes_at<scalar_t, acc_t>(grad_x, j, C, whole, rstd * (g * weight[j] - mean_g - xhat * mean_gx));
          });
        }
        if ((p + 1) % kVoxelsPerFlush == 0 || p + 1 == tile.count) {
          for (int64_t j = 0; j < channel_vectors; ++j) {
            param_sums[j] += __builtin_convertvector(grad_weight[j], DoubleLanes);
            param_sums[channel_vectors + j] += __builtin_convertvector(grad_bias[j], DoubleLanes);
            grad_weight[j] = V{};
            grad_bias[j] = V{};
          }
        }
      }
    }
    if (a.partials != nullptr) {
      double* partial = a.partials + chunk * kRows * C;
      for (int64_t row = 0; row < kRows; ++row) {
        for (int64_t c = 0; c < C; ++c) {
          partial[row * C + c] = param_sums[row * channel_vectors + c / kLanes][c % kLanes];
        }
      }
    }
    for (int64_t j = 0; j < kRows * channel_vectors; ++j) {
      param_sums[j] = DoubleLanes{};
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
        V dw{};
        V db{};
        for_each_lane_vector(tile.count, [&](int64_t v, auto whole) {
          __builtin_prefetch(g_row + t.voxels + v * kLanes);
          __builtin_prefetch(x_row + t.voxels + v * kLanes);
          const V g = lanes_at<acc_t>(g_row, v, tile.count, whole);
          const V xhat = (lanes_at<acc_t>(x_row, v, tile.count, whole) - mean[v]) * rstd[v];
          dw += g * xhat;
          db += g;
          const V gw = g * w;
          mean_g[v] += gw;
          mean_gx[v] += gw * xhat;
        });
        if (a.partials != nullptr) {
          param_lanes[c * kRows + 0] += __builtin_convertvector(dw, DoubleLanes);
          param_lanes[c * kRows + 1] += __builtin_convertvector(db, DoubleLanes);
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
