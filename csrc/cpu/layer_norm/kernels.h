// Chunk kernels of the CPU channels-first LayerNorm (forward and backward), written once over the SIMD layer.
//
// NO include guard: kernels.cpp compiles this through simd/compile_per_isa.inc, once per ISA variant.
//
// Backward: grad_x = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)) with g = grad_out * weight and
// xhat = (x - mean) * rstd, the mean recomputed in float64 (centred(), tile_math.h); grad_weight = sum over
// voxels of grad_out * xhat, grad_bias = sum of grad_out (as per-chunk partials).
#include "cpu/common/tile_math.h"

namespace layer_norm_kernels {

template <typename scalar_t, typename acc_t>
using ForwardArgs = ::uxnet::cpu::layer_norm::ForwardArgs<scalar_t, acc_t>;
template <typename scalar_t, typename acc_t>
using BackwardArgs = ::uxnet::cpu::layer_norm::BackwardArgs<scalar_t, acc_t>;
using ::uxnet::cpu::ln_mlp::tile_ref;

// ---- channels_last_3d: voxel by voxel; a voxel's C channels are contiguous, lane = channel --------------------

// The C values of a per-channel parameter as lane vectors, zero past C.
template <typename acc_t>
UXNET_SIMD_INLINE void channel_lanes(const acc_t* param, int64_t C, Lanes<acc_t>* out) {
  for_each_lane_vector(C, [&](int64_t j, auto whole) { out[j] = lanes_at<acc_t>(param, j, C, whole); });
}

// The voxel's mean over its C channels at x, in float64.
template <typename acc_t, typename scalar_t>
UXNET_SIMD_INLINE double voxel_mean(const scalar_t* x, int64_t C) {
  DoubleLanes sum{};
  for_each_lane_vector(C, [&](int64_t j, auto whole) { sum += widen(lanes_at<acc_t>(x, j, C, whole)); });
  return hsum(sum) / static_cast<double>(C);
}

template <typename scalar_t, typename acc_t>
void forward_voxels(const ForwardArgs<scalar_t, acc_t>& a, int64_t chunk_begin, int64_t chunk_end) {
  using V = Lanes<acc_t>;
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  const int64_t channel_vectors = (C + kWidth - 1) / kWidth;
  LaneBuffer<V> weight(channel_vectors);
  LaneBuffer<V> bias(channel_vectors);
  channel_lanes(a.weight, C, weight.data());
  channel_lanes(a.bias, C, bias.data());
  V in_last_vector{};  // 1 in the lanes of the partial last channel vector that hold a channel
  for (int64_t b = 0; b < kWidth; ++b) {
    in_last_vector[b] = (channel_vectors - 1) * kWidth + b < C ? acc_t(1) : acc_t(0);
  }
  const int64_t tile_end = std::min(t.num_tiles, chunk_end * t.tiles_per_chunk);
  for (int64_t i = chunk_begin * t.tiles_per_chunk; i < tile_end; ++i) {
    const TileRef tile = tile_ref(t, i);
    for (int64_t voxel = tile.n * t.voxels + tile.v0; voxel < tile.n * t.voxels + tile.v0 + tile.count; ++voxel) {
      const scalar_t* x = a.x + voxel * C;
      V sum{};
      for_each_lane_vector(C, [&](int64_t j, auto whole) { sum += lanes_at<acc_t>(x, j, C, whole); });
      const acc_t mean = hsum(sum) / static_cast<acc_t>(C);
      V squares{};
      for_each_lane_vector(C, [&](int64_t j, auto whole) {
        V d = lanes_at<acc_t>(x, j, C, whole) - mean;
        if constexpr (!decltype(whole)::value) {
          d *= in_last_vector;  // the padding lanes read 0, not mean
        }
        squares = fma(d, d, squares);
      });
      const acc_t rstd = acc_t(1) / std::sqrt(hsum(squares) / static_cast<acc_t>(C) + a.eps);
      scalar_t* out = a.out + voxel * C;
      for_each_lane_vector(C, [&](int64_t j, auto whole) {
        const V y = fma((lanes_at<acc_t>(x, j, C, whole) - mean) * rstd, weight[j], bias[j]);
        store_lanes_at<scalar_t, acc_t>(out, j, C, whole, y);
      });
      a.mean[voxel] = mean;
      a.rstd[voxel] = rstd;
    }
  }
}

template <typename scalar_t, typename acc_t>
void backward_voxels(const BackwardArgs<scalar_t, acc_t>& a, int64_t chunk_begin, int64_t chunk_end) {
  using V = Lanes<acc_t>;
  constexpr int64_t kRows = ::uxnet::cpu::ln_mlp::kLayerNormParams;
  constexpr int64_t kVoxelsPerFlush = 16;  // float lane sums are moved into the double sums this often
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  const int64_t channel_vectors = (C + kWidth - 1) / kWidth;
  LaneBuffer<V> weight(channel_vectors);
  LaneBuffer<V> grad_weight(channel_vectors);  // since the last flush
  LaneBuffer<V> grad_bias(channel_vectors);
  LaneBuffer<DoubleLanes> param_sums(kRows * channel_vectors);  // [kRows][channel_vectors], this chunk
  channel_lanes(a.weight, C, weight.data());
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int64_t tile_begin = chunk * t.tiles_per_chunk;
    const int64_t tile_end = std::min(t.num_tiles, tile_begin + t.tiles_per_chunk);
    for (int64_t i = tile_begin; i < tile_end; ++i) {
      const TileRef tile = tile_ref(t, i);
      for (int64_t p = 0; p < tile.count; ++p) {
        const int64_t voxel = tile.n * t.voxels + tile.v0 + p;
        const scalar_t* x = a.x + voxel * C;
        const scalar_t* grad_out = a.grad_out + voxel * C;
        const DoubleLanes mean = broadcast<DoubleLanes>(voxel_mean<acc_t>(x, C));
        const acc_t rstd = a.rstd[voxel];
        V sum_g{};   // grad_out * weight (padding lanes: grad_out is 0)
        V sum_gx{};  // grad_out * weight * xhat
        for_each_lane_vector(C, [&](int64_t j, auto whole) {
          const V g = lanes_at<acc_t>(grad_out, j, C, whole);
          const V xhat = centred<acc_t>(lanes_at<acc_t>(x, j, C, whole), mean) * rstd;
          grad_weight[j] = fma(g, xhat, grad_weight[j]);
          grad_bias[j] += g;
          const V gw = g * weight[j];
          sum_g += gw;
          sum_gx = fma(gw, xhat, sum_gx);
        });
        if (a.grad_x != nullptr) {
          const acc_t mean_g = hsum(sum_g) / static_cast<acc_t>(C);
          const acc_t mean_gx = hsum(sum_gx) / static_cast<acc_t>(C);
          scalar_t* grad_x = a.grad_x + voxel * C;
          for_each_lane_vector(C, [&](int64_t j, auto whole) {
            const V g = lanes_at<acc_t>(grad_out, j, C, whole);
            const V xhat = centred<acc_t>(lanes_at<acc_t>(x, j, C, whole), mean) * rstd;
            // Unfused on purpose: g * weight rounds exactly as in sum_g, so C = 1 gives exact zeros.
            store_lanes_at<scalar_t, acc_t>(grad_x, j, C, whole, rstd * (g * weight[j] - mean_g - xhat * mean_gx));
          });
        }
        if ((p + 1) % kVoxelsPerFlush == 0 || p + 1 == tile.count) {
          for (int64_t j = 0; j < channel_vectors; ++j) {
            param_sums[j] += widen(grad_weight[j]);
            param_sums[channel_vectors + j] += widen(grad_bias[j]);
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
          partial[row * C + c] = param_sums[row * channel_vectors + c / kWidth][c % kWidth];
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
// block (a few lane arrays of t.tile_voxels) stays in L1, the block itself in L2 after the first pass. The
// first pass over x prefetches the next channel's rows one row ahead, as do passes that write (each row is a new
// page, where the hardware prefetchers would have to start over).

// Per-voxel float64 means of a row block: mean[v] over the C rows of x (row c at x + c * stride).
template <typename acc_t, typename scalar_t>
UXNET_SIMD_INLINE void row_block_means(const scalar_t* x, int64_t stride, int64_t C, int64_t count,
                                       DoubleLanes* mean) {
  const int64_t nv = (count + kWidth - 1) / kWidth;
  for (int64_t v = 0; v < nv; ++v) {
    mean[v] = DoubleLanes{};
  }
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* row = x + c * stride;
    for_each_lane_vector(count, [&](int64_t v, auto whole) {
      __builtin_prefetch(row + stride + v * kWidth);
      mean[v] += widen(lanes_at<acc_t>(row, v, count, whole));
    });
  }
  for (int64_t v = 0; v < nv; ++v) {
    mean[v] /= static_cast<double>(C);
  }
}

// Two-pass statistics: the mean in float64, then the variance from the centred values (Welford's update in
// float32 loses up to ~1e-5 of rstd when a voxel's channels are close to their mean, e.g. C = 2).
template <typename scalar_t, typename acc_t>
void forward_rows(const ForwardArgs<scalar_t, acc_t>& a, int64_t chunk_begin, int64_t chunk_end) {
  using V = Lanes<acc_t>;
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  LaneBuffer<DoubleLanes> mean_exact(t.tile_voxels / kWidth);
  LaneBuffer<V> mean(t.tile_voxels / kWidth);
  LaneBuffer<V> rstd(t.tile_voxels / kWidth);  // holds the sum of squared deviations until the end of pass 2
  const int64_t tile_end = std::min(t.num_tiles, chunk_end * t.tiles_per_chunk);
  for (int64_t i = chunk_begin * t.tiles_per_chunk; i < tile_end; ++i) {
    const TileRef tile = tile_ref(t, i);
    const int64_t nv = (tile.count + kWidth - 1) / kWidth;
    const scalar_t* x = a.x + tile.n * C * t.voxels + tile.v0;
    scalar_t* out = a.out + tile.n * C * t.voxels + tile.v0;
    // Pass 1: the means.
    row_block_means<acc_t>(x, t.voxels, C, tile.count, mean_exact.data());
    for (int64_t v = 0; v < nv; ++v) {
      mean[v] = to_acc<acc_t>(mean_exact[v]);
      rstd[v] = V{};
    }
    // Pass 2: the sums of squared deviations.
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* row = x + c * t.voxels;
      for_each_lane_vector(tile.count, [&](int64_t v, auto whole) {
        const V d = centred<acc_t>(lanes_at<acc_t>(row, v, tile.count, whole), mean_exact[v]);
        rstd[v] = fma(d, d, rstd[v]);
      });
    }
    for (int64_t v = 0; v < nv; ++v) {
      rstd[v] = lane_rsqrt(rstd[v] / static_cast<acc_t>(C) + a.eps);
    }
    // Pass 3: normalise, scale, shift.
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* row = x + c * t.voxels;
      const V w = broadcast<V>(a.weight[c]);
      const V b = broadcast<V>(a.bias[c]);
      scalar_t* out_row = out + c * t.voxels;
      for_each_lane_vector(tile.count, [&](int64_t v, auto whole) {
        __builtin_prefetch(out_row + t.voxels + v * kWidth, 1);
        const V xv = lanes_at<acc_t>(row, v, tile.count, whole);
        store_lanes_at<scalar_t, acc_t>(out_row, v, tile.count, whole, fma((xv - mean[v]) * rstd[v], w, b));
      });
    }
    store_stats(mean.data(), rstd.data(), t, tile, a.mean, a.rstd);
  }
}

template <typename scalar_t, typename acc_t>
void backward_rows(const BackwardArgs<scalar_t, acc_t>& a, int64_t chunk_begin, int64_t chunk_end) {
  using V = Lanes<acc_t>;
  constexpr int64_t kRows = ::uxnet::cpu::ln_mlp::kLayerNormParams;
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  const int64_t width = t.tile_voxels / kWidth;
  LaneBuffer<DoubleLanes> mean(width);
  LaneBuffer<V> rstd(width);
  LaneBuffer<V> mean_g(width);   // per voxel: mean_c(grad_out * weight)
  LaneBuffer<V> mean_gx(width);  // per voxel: mean_c(grad_out * weight * xhat)
  LaneBuffer<DoubleLanes> param_lanes(a.partials != nullptr ? C * kRows : 0);  // [C][kRows], lane-wise sums
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int64_t tile_begin = chunk * t.tiles_per_chunk;
    const int64_t tile_end = std::min(t.num_tiles, tile_begin + t.tiles_per_chunk);
    for (int64_t i = tile_begin; i < tile_end; ++i) {
      const TileRef tile = tile_ref(t, i);
      const int64_t nv = (tile.count + kWidth - 1) / kWidth;
      const int64_t offset = tile.n * C * t.voxels + tile.v0;
      load_rstd(a.rstd, t, tile, rstd.data());
      for (int64_t v = 0; v < nv; ++v) {
        mean_g[v] = V{};
        mean_gx[v] = V{};
      }
      // Pass 0: the per-voxel means in float64.
      row_block_means<acc_t>(a.x + offset, t.voxels, C, tile.count, mean.data());
      // Pass 1: the per-voxel sums over channels and the per-channel parameter sums.
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* x_row = a.x + offset + c * t.voxels;
        const scalar_t* g_row = a.grad_out + offset + c * t.voxels;
        const V w = broadcast<V>(a.weight[c]);
        V dw{};
        V db{};
        for_each_lane_vector(tile.count, [&](int64_t v, auto whole) {
          __builtin_prefetch(g_row + t.voxels + v * kWidth);
          __builtin_prefetch(x_row + t.voxels + v * kWidth);
          const V g = lanes_at<acc_t>(g_row, v, tile.count, whole);
          const V xhat = centred<acc_t>(lanes_at<acc_t>(x_row, v, tile.count, whole), mean[v]) * rstd[v];
          dw = fma(g, xhat, dw);
          db += g;
          const V gw = g * w;
          mean_g[v] += gw;
          mean_gx[v] = fma(gw, xhat, mean_gx[v]);
        });
        if (a.partials != nullptr) {
          param_lanes[c * kRows + 0] += widen(dw);
          param_lanes[c * kRows + 1] += widen(db);
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
        const V w = broadcast<V>(a.weight[c]);
        for_each_lane_vector(tile.count, [&](int64_t v, auto whole) {
          __builtin_prefetch(g_row + t.voxels + v * kWidth);
          __builtin_prefetch(x_row + t.voxels + v * kWidth);
          __builtin_prefetch(gx_row + t.voxels + v * kWidth, 1);
          const V g = lanes_at<acc_t>(g_row, v, tile.count, whole);
          const V xhat = centred<acc_t>(lanes_at<acc_t>(x_row, v, tile.count, whole), mean[v]) * rstd[v];
          // Unfused on purpose: g * w rounds exactly as in mean_g, so C = 1 gives exact zeros.
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
          for (int64_t b = 0; b < kWidth; ++b) {
            sum += lanes[b];
          }
          partial[row * C + c] = sum;
          lanes = DoubleLanes{};
        }
      }
    }
  }
}

}  // namespace layer_norm_kernels
