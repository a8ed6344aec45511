// Non-finite weights in the CPU dwconv3d: the float64 reference's semantics, position for position.
//
// F.conv3d in float64 on the CPU (the ground truth of the tests) zero-pads x and multiplies every tap, so one
// NaN or Inf weight makes every output of its channel non-finite (0 * Inf = NaN in the padding). Its input
// gradient instead skips the taps that fall outside grad_out, so grad_x is non-finite exactly where a non-finite
// tap of the flipped kernel meets an in-range grad_out voxel. The kernels clip the D and H taps but multiply the
// zero W padding, which matches neither, so the drivers fix those channels up here. Costs nothing when every
// weight is finite (one vectorisable pass over the C * taps weights).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/dwconv3d/drivers.h"

namespace uxnet {
namespace cpu {
namespace dwconv3d {

// [C][taps] 1 where the weight (as stored, not flipped) is not finite; empty if every weight is finite.
template <typename Tin>
std::vector<uint8_t> nonfinite_taps(const Tin* weight, const Geometry& g) {
  std::vector<uint8_t> taps;
  const int64_t count = g.C * g.taps();
  // The common case first, in one sweep the compiler vectorises (a branch per weight cost ~0.1 ms at 384 x 7^3, a
  // fifth of a 384 x 6^3 forward): w * 0 is +-0 for a finite w and NaN otherwise (or for a float64 beyond float's
  // range, which the exact scan below then clears), so the OR of its bits without the sign is 0 iff all are finite.
  uint32_t probe = 0;
  for (int64_t i = 0; i < count; ++i) {
    const float zero_or_nan = static_cast<float>(weight[i]) * 0.0f;
    uint32_t bits;
    std::memcpy(&bits, &zero_or_nan, sizeof bits);
    probe |= bits;
  }
  if ((probe & 0x7fffffffu) == 0) return taps;
  for (int64_t i = 0; i < count; ++i) {
    if (!std::isfinite(static_cast<double>(weight[i]))) {
      if (taps.empty()) taps.assign(static_cast<size_t>(count), 0);
      taps[static_cast<size_t>(i)] = 1;
    }
  }
  return taps;
}

inline bool channel_has(const std::vector<uint8_t>& taps, const Geometry& g, int64_t c) {
  for (int64_t t = 0; t < g.taps(); ++t) {
    if (taps[static_cast<size_t>(c * g.taps() + t)]) return true;
  }
  return false;
}

// Zeroes the blocked (flipped) weight entries of the non-finite taps, so the kernels compute the finite part.
template <typename Tc>
void zero_nonfinite_taps(const std::vector<uint8_t>& taps, const Geometry& g, bool flipped, Tc* blocked) {
  const int64_t T = g.taps();
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t t = 0; t < T; ++t) {
      if (taps[static_cast<size_t>(c * T + t)]) {
        blocked[(c / g.lanes) * T * g.lanes + (flipped ? T - 1 - t : t) * g.lanes + c % g.lanes] = Tc(0);
      }
    }
  }
}

// Forward: every finite output of a channel with a non-finite weight becomes NaN.
template <typename Tout>
void poison_channels(const std::vector<uint8_t>& taps, const Geometry& g, Tout* dst, Strides5 s) {
  const Tout nan = static_cast<Tout>(std::numeric_limits<float>::quiet_NaN());
  for (int64_t c = 0; c < g.C; ++c) {
    if (!channel_has(taps, g, c)) continue;
    at::parallel_for(0, g.N * g.D, 1, [&](int64_t begin, int64_t end) {
      for (int64_t nd = begin; nd < end; ++nd) {
        Tout* plane = dst + (nd / g.D) * s.n + c * s.c + (nd % g.D) * s.d;
        for (int64_t h = 0; h < g.H; ++h) {
          for (int64_t w = 0; w < g.W; ++w) {
            Tout& v = plane[h * s.h + w * s.w];
            if (std::isfinite(static_cast<double>(v))) v = nan;
          }
        }
      }
    });
  }
}

// Input gradient: NaN wherever a non-finite tap of the flipped kernel (kernel offset k - pad) meets an in-range
// grad_out voxel. A voxel p reaches the taps k with 0 <= p + k - pad < size along every axis, a box of taps; a 3-d
// prefix count of the non-finite taps answers "any in that box?" per voxel in O(1).
template <typename Tout>
void poison_reached_voxels(const std::vector<uint8_t>& taps, const Geometry& g, Tout* dst, Strides5 s) {
  const Tout nan = static_cast<Tout>(std::numeric_limits<float>::quiet_NaN());
  const int64_t KD = g.KD, KH = g.KH, KW = g.KW, T = g.taps();
  // below(a, b, e): the number of non-finite flipped taps with kd < a, kh < b, kw < e.
  std::vector<int64_t> prefix(static_cast<size_t>((KD + 1) * (KH + 1) * (KW + 1)));
  auto below = [&](int64_t a, int64_t b, int64_t e) -> int64_t& {
    return prefix[static_cast<size_t>((a * (KH + 1) + b) * (KW + 1) + e)];
  };
  // Tap range [lo, hi) reached by voxel i along an axis of `size` voxels with `k` taps.
  auto range = [](int64_t i, int64_t size, int64_t k) {
    const int64_t pad = k / 2;
    return std::pair<int64_t, int64_t>{std::max<int64_t>(0, pad - i), std::min<int64_t>(k, pad - i + size)};
  };
  for (int64_t c = 0; c < g.C; ++c) {
    if (!channel_has(taps, g, c)) continue;
    std::fill(prefix.begin(), prefix.end(), 0);
    for (int64_t a = 1; a <= KD; ++a) {
      for (int64_t b = 1; b <= KH; ++b) {
        for (int64_t e = 1; e <= KW; ++e) {
          const int64_t flipped = ((a - 1) * KH + (b - 1)) * KW + (e - 1);
          below(a, b, e) = taps[static_cast<size_t>(c * T + (T - 1 - flipped))] + below(a - 1, b, e) +
                           below(a, b - 1, e) + below(a, b, e - 1) - below(a - 1, b - 1, e) - below(a - 1, b, e - 1) -
                           below(a, b - 1, e - 1) + below(a - 1, b - 1, e - 1);
        }
      }
    }
    at::parallel_for(0, g.D, 1, [&](int64_t begin, int64_t end) {
      for (int64_t d = begin; d < end; ++d) {
        const auto [d0, d1] = range(d, g.D, KD);
        for (int64_t h = 0; h < g.H; ++h) {
          const auto [h0, h1] = range(h, g.H, KH);
          for (int64_t w = 0; w < g.W; ++w) {
            const auto [w0, w1] = range(w, g.W, KW);
            if (d0 >= d1 || h0 >= h1 || w0 >= w1) continue;
            const int64_t count = below(d1, h1, w1) - below(d0, h1, w1) - below(d1, h0, w1) - below(d1, h1, w0) +
                                  below(d0, h0, w1) + below(d0, h1, w0) + below(d1, h0, w0) - below(d0, h0, w0);
            if (count == 0) continue;
            for (int64_t n = 0; n < g.N; ++n) dst[n * s.n + c * s.c + d * s.d + h * s.h + w * s.w] = nan;
          }
        }
      }
    });
  }
}

}  // namespace dwconv3d
}  // namespace cpu
}  // namespace uxnet
