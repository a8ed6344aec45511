// Chunk kernels of the CPU channels-first LayerNorm (forward and backward), written once over the SIMD layer.
//
// NO include guard: kernels.cpp compiles this through simd/compile_per_isa.inc, once per ISA variant.
//
// Backward: grad_x = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)) with g = grad_out * weight and
// xhat = centred(x) * rstd (the saved mean plus a correction, tile_math.h); grad_weight = sum over voxels of
// grad_out * xhat, grad_bias = sum of grad_out (as per-chunk partials).
#include "cpu/common/tile_math.h"

namespace layer_norm_channels_first_kernels {

template <typename scalar_t, typename acc_t>
using ForwardArgs = ::uxnet::cpu::layer_norm_channels_first::ForwardArgs<scalar_t, acc_t>;
template <typename scalar_t, typename acc_t>
using BackwardArgs = ::uxnet::cpu::layer_norm_channels_first::BackwardArgs<scalar_t, acc_t>;
using ::uxnet::cpu::voxel_tiling::for_each_chunk_voxel;
using ::uxnet::cpu::voxel_tiling::tile_ref;

// ---- channels_last_3d: voxel by voxel; a voxel's C channels are contiguous, lane = channel --------------------

// The C values of a per-channel parameter as lane vectors, zero past C.
template <typename acc_t>
UXNET_SIMD_INLINE void channel_lanes(const acc_t* param, int64_t C, Lanes<acc_t>* out) {
  for_each_lane_vector(C, [&](int64_t j, auto whole) { out[j] = lanes_at<acc_t>(param, j, C, whole); });
}

// mean_c(x - mean) over the voxel's C channels at x (the padding lanes of the partial last vector masked out).
template <typename acc_t, typename scalar_t>
UXNET_SIMD_INLINE acc_t voxel_mean_correction(const scalar_t* x, int64_t C, acc_t mean,
                                              const Lanes<acc_t>& in_last_vector) {
  Lanes<acc_t> sum{};
  for_each_lane_vector(C, [&](int64_t j, auto whole) {
    Lanes<acc_t> d = lanes_at<acc_t>(x, j, C, whole) - mean;
    if constexpr (!decltype(whole)::value) {
      d *= in_last_vector;
    }
    sum += d;
  });
  return hsum(sum) / static_cast<acc_t>(C);
}

// 1 in the lanes of the last channel vector that hold a channel, 0 in its padding lanes.
template <typename acc_t>
UXNET_SIMD_INLINE Lanes<acc_t> last_vector_lanes(int64_t C) {
  const int64_t channel_vectors = (C + kWidth - 1) / kWidth;
  Lanes<acc_t> in_last_vector{};
  for (int64_t b = 0; b < kWidth; ++b) {
    in_last_vector[b] = (channel_vectors - 1) * kWidth + b < C ? acc_t(1) : acc_t(0);
  }
  return in_last_vector;
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
  const V in_last_vector = last_vector_lanes<acc_t>(C);
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
  constexpr int64_t kRows = ::uxnet::cpu::layer_norm_channels_first::kLayerNormParams;
  constexpr int64_t kVoxelsPerFlush = 16;  // float lane sums are moved into the double sums this often
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  const int64_t channel_vectors = (C + kWidth - 1) / kWidth;
  LaneBuffer<V> weight(channel_vectors);
  LaneBuffer<V> grad_weight(channel_vectors);  // since the last flush
  LaneBuffer<V> grad_bias(channel_vectors);
  LaneBuffer<DoubleLanes> param_sums(kRows * channel_vectors);  // [kRows][channel_vectors], this chunk
  channel_lanes(a.weight, C, weight.data());
  const V in_last_vector = last_vector_lanes<acc_t>(C);
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int64_t tile_begin = chunk * t.tiles_per_chunk;
    const int64_t tile_end = std::min(t.num_tiles, tile_begin + t.tiles_per_chunk);
    for (int64_t i = tile_begin; i < tile_end; ++i) {
      const TileRef tile = tile_ref(t, i);
      for (int64_t p = 0; p < tile.count; ++p) {
        const int64_t voxel = tile.n * t.voxels + tile.v0 + p;
        const scalar_t* x = a.x + voxel * C;
        const scalar_t* grad_out = a.grad_out + voxel * C;
        const V mean = broadcast<V>(a.mean[voxel]);
        const V mean_lo = broadcast<V>(voxel_mean_correction(x, C, a.mean[voxel], in_last_vector));
        const acc_t rstd = a.rstd[voxel];
        V sum_g{};   // grad_out * weight (padding lanes: grad_out is 0)
        V sum_gx{};  // grad_out * weight * xhat
        for_each_lane_vector(C, [&](int64_t j, auto whole) {
          const V g = lanes_at<acc_t>(grad_out, j, C, whole);
          const V xhat = centred(lanes_at<acc_t>(x, j, C, whole), mean, mean_lo) * rstd;
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
            const V xhat = centred(lanes_at<acc_t>(x, j, C, whole), mean, mean_lo) * rstd;
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

// Corrected two-pass statistics (mean, then the centred values' sum and sum of squares): Welford's update in
// float32 lost up to ~1e-5 of rstd when a voxel's channels are close to their mean (e.g. C = 2), which the
// backward, ill-conditioned there, amplifies. x is read three times; a row block stays in L2 after the first.
template <typename scalar_t, typename acc_t>
void forward_rows(const ForwardArgs<scalar_t, acc_t>& a, int64_t chunk_begin, int64_t chunk_end) {
  using V = Lanes<acc_t>;
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  LaneBuffer<V> mean(t.tile_voxels / kWidth);
  LaneBuffer<V> mean_lo(t.tile_voxels / kWidth);  // sum of the centred values, then the mean's correction
  LaneBuffer<V> rstd(t.tile_voxels / kWidth);     // sum of squared centred values, then 1 / sqrt(var + eps)
  const int64_t tile_end = std::min(t.num_tiles, chunk_end * t.tiles_per_chunk);
  for (int64_t i = chunk_begin * t.tiles_per_chunk; i < tile_end; ++i) {
    const TileRef tile = tile_ref(t, i);
    const int64_t nv = (tile.count + kWidth - 1) / kWidth;
    const scalar_t* x = a.x + tile.n * C * t.voxels + tile.v0;
    scalar_t* out = a.out + tile.n * C * t.voxels + tile.v0;
    for (int64_t v = 0; v < nv; ++v) {
      mean[v] = V{};
      mean_lo[v] = V{};
      rstd[v] = V{};
    }
    // Pass 1: the means.
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* row = x + c * t.voxels;
      for_each_lane_vector(tile.count, [&](int64_t v, auto whole) {
        __builtin_prefetch(row + t.voxels + v * kWidth);
        mean[v] += lanes_at<acc_t>(row, v, tile.count, whole);
      });
    }
    for (int64_t v = 0; v < nv; ++v) {
      mean[v] /= static_cast<acc_t>(C);
    }
    // Pass 2: sums of the centred values and of their squares.
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* row = x + c * t.voxels;
      for_each_lane_vector(tile.count, [&](int64_t v, auto whole) {
        const V d = lanes_at<acc_t>(row, v, tile.count, whole) - mean[v];
        mean_lo[v] += d;
        rstd[v] = fma(d, d, rstd[v]);
      });
    }
    for (int64_t v = 0; v < nv; ++v) {
      mean_lo[v] /= static_cast<acc_t>(C);
      V var = rstd[v] / static_cast<acc_t>(C) - mean_lo[v] * mean_lo[v];
      var = select(lt(var, V{}), V{}, var);  // rounding below 0 when every channel is equal (NaN stays NaN)
      rstd[v] = lane_rsqrt(var + a.eps);
      mean[v] += mean_lo[v];
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
  constexpr int64_t kRows = ::uxnet::cpu::layer_norm_channels_first::kLayerNormParams;
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  const int64_t width = t.tile_voxels / kWidth;
  LaneBuffer<V> mean(width);
  LaneBuffer<V> mean_lo(width);  // mean_c(x - mean): the saved mean's correction
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
      load_stats(a.mean, a.rstd, t, tile, mean.data(), rstd.data());
      for (int64_t v = 0; v < nv; ++v) {
        mean_lo[v] = V{};
        mean_g[v] = V{};
        mean_gx[v] = V{};
      }
      // Pass 0: the corrections of the saved means.
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* x_row = a.x + offset + c * t.voxels;
        for_each_lane_vector(tile.count, [&](int64_t v, auto whole) {
          __builtin_prefetch(x_row + t.voxels + v * kWidth);
          mean_lo[v] += lanes_at<acc_t>(x_row, v, tile.count, whole) - mean[v];
        });
      }
      for (int64_t v = 0; v < nv; ++v) {
        mean_lo[v] /= static_cast<acc_t>(C);
      }
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
          const V xhat = centred(lanes_at<acc_t>(x_row, v, tile.count, whole), mean[v], mean_lo[v]) * rstd[v];
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
          const V xhat = centred(lanes_at<acc_t>(x_row, v, tile.count, whole), mean[v], mean_lo[v]) * rstd[v];
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

// ---- few channels (C <= kFewChannels): the backward in float64, voxel by voxel -------------------------------
// With few channels the input gradient is ill-conditioned (C = 2: xhat = +-1 up to eps terms, and grad_x is what
// is left after cancelling terms of size |grad_out|; C = 1: it is exactly 0). In float32 the cancellation leaves
// errors as large as PyTorch's own; in float64 the only error left is the rounding of the saved float32 rstd
// (the op is not given eps to recompute it). Scalar code: a handful of channels, little work per voxel.

template <typename scalar_t, typename acc_t>
void backward_few_channels(const BackwardArgs<scalar_t, acc_t>& a, int64_t chunk_begin, int64_t chunk_end) {
  using ::uxnet::cpu::simd::convert;
  constexpr int64_t kMax = ::uxnet::cpu::layer_norm_channels_first::kFewChannels;
  constexpr int64_t kRows = ::uxnet::cpu::layer_norm_channels_first::kLayerNormParams;
  const VoxelTiling& t = a.tiling;
  const int64_t C = t.channels;
  const int64_t channel_stride = t.channels_last ? 1 : t.voxels;
  double w[kMax];
  for (int64_t c = 0; c < C; ++c) {
    w[c] = static_cast<double>(a.weight[c]);
  }
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    double sums[kRows][kMax] = {};  // grad_weight, grad_bias of this chunk
    for_each_chunk_voxel(t, chunk, [&](int64_t voxel, int64_t base) {
      double x[kMax], g[kMax], xhat[kMax], gw[kMax];
      const double mean = load_voxel_channels(a.x, a.grad_out, base, channel_stride, C, x, g);
      const double rstd = static_cast<double>(a.rstd[voxel]);
      double mean_g = 0.0, mean_gx = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        xhat[c] = (x[c] - mean) * rstd;
        gw[c] = g[c] * w[c];
        mean_g += gw[c];
        mean_gx += gw[c] * xhat[c];
        sums[0][c] += g[c] * xhat[c];
        sums[1][c] += g[c];
      }
      mean_g /= static_cast<double>(C);
      mean_gx /= static_cast<double>(C);
      if (a.grad_x != nullptr) {
        for (int64_t c = 0; c < C; ++c) {
          a.grad_x[base + c * channel_stride] = convert<scalar_t>(rstd * (gw[c] - mean_g - xhat[c] * mean_gx));
        }
      }
    });
    if (a.partials != nullptr) {
      double* partial = a.partials + chunk * kRows * C;
      for (int64_t row = 0; row < kRows; ++row) {
        for (int64_t c = 0; c < C; ++c) {
          partial[row * C + c] = sums[row][c];
        }
      }
    }
  }
}

}  // namespace layer_norm_channels_first_kernels
