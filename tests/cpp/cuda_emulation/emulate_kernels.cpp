// Runs the CUDA kernels of csrc/cuda on the CPU under cuda_emulation.h and checks them, in float and
// double, against direct double-precision formulas (forward) and central finite differences of those
// formulas (every gradient). It checks the device code only (indexing, tiling, halos, shared memory,
// warp reductions, partial-sum layout); the host wrappers in csrc/cuda/<op>/op.cu need a GPU.
//
//   g++ -std=c++20 -O2 -pthread -I csrc tests/cpp/cuda_emulation/emulate_kernels.cpp -o /tmp/uxnet_emulate
//   /tmp/uxnet_emulate        # prints one line per check, exits non-zero on any failure
#include "cuda_emulation.h"
// (the emulation header must come first)
#include "cuda/dwconv3d/kernels.cuh"
#include "cuda/layer_norm_channels_first/kernels.cuh"
#include "cuda/ux_mlp/kernels.cuh"

#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <string>

using namespace uxnet::gpu;

namespace {

int g_failures = 0;
std::mt19937_64 g_rng(1234);

using Vec = std::vector<double>;

Vec random_vec(size_t n, double scale = 1.0) {
  std::normal_distribution<double> dist(0.0, scale);
  Vec v(n);
  for (auto& e : v) e = dist(g_rng);
  return v;
}

template <typename T>
std::vector<T> cast(const Vec& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <typename T>
Vec widen(const std::vector<T>& v) {
  return Vec(v.begin(), v.end());
}

// Values rounded to T, kept in double: the reference sees exactly what the kernel sees.
template <typename T>
Vec rounded(const Vec& v) {
  return widen(cast<T>(v));
}

double rel_error(const Vec& got, const Vec& want) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return norm == 0 ? std::sqrt(diff) : std::sqrt(diff / norm);
}

template <typename T>
double tolerance(bool finite_difference) {
  if (std::is_same_v<T, double>) return finite_difference ? 1e-7 : 1e-12;
  return 1e-5;
}

void report(const std::string& what, double err, double tol) {
  const bool ok = err <= tol;
  if (!ok) ++g_failures;
  std::printf("%s %-78s rel err %.3e (tol %.0e)\n", ok ? "PASS" : "FAIL", what.c_str(), err, tol);
}

// d/dp sum(f(p) * weights) by central differences, for every entry of p.
Vec numeric_grad(Vec& p, const std::function<Vec()>& f, const Vec& weights, double h = 1e-5) {
  Vec grad(p.size());
  for (size_t i = 0; i < p.size(); ++i) {
    const double saved = p[i];
    p[i] = saved + h;
    const Vec plus = f();
    p[i] = saved - h;
    const Vec minus = f();
    p[i] = saved;
    double s = 0;
    for (size_t j = 0; j < plus.size(); ++j) s += (plus[j] - minus[j]) * weights[j];
    grad[i] = s / (2 * h);
  }
  return grad;
}

template <typename T>
std::vector<T> run_row_reduction(const std::vector<T>& partial, int64_t rows, int64_t cols) {
  std::vector<T> out(cols, std::numeric_limits<T>::quiet_NaN());
  emu::launch(reduce_rows_kernel<T>, dim3(static_cast<unsigned>((cols + kWarpSize - 1) / kWarpSize)),
              dim3(kWarpSize, kReduceThreadsY), 0, partial.data(), rows, cols, out.data());
  return out;
}

// ---------------------------------------------------------------------------------------------------
// dwconv3d
// ---------------------------------------------------------------------------------------------------

struct Conv {
  int64_t N, C, D, H, W;
  int KD, KH, KW;
  int64_t numel() const { return N * C * D * H * W; }
  int64_t K() const { return int64_t{KD} * KH * KW; }
  std::string name() const {
    return std::to_string(N) + "x" + std::to_string(C) + "x" + std::to_string(D) + "x" + std::to_string(H) + "x" +
           std::to_string(W) + " k" + std::to_string(KD) + "x" + std::to_string(KH) + "x" + std::to_string(KW);
  }
};

Vec conv_reference(const Conv& s, const Vec& x, const Vec& w, const Vec* bias) {
  Vec out(s.numel());
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t d = 0; d < s.D; ++d)
        for (int64_t h = 0; h < s.H; ++h)
          for (int64_t q = 0; q < s.W; ++q) {
            double acc = bias ? (*bias)[c] : 0.0;
            for (int kd = 0; kd < s.KD; ++kd)
              for (int kh = 0; kh < s.KH; ++kh)
                for (int kw = 0; kw < s.KW; ++kw) {
                  const int64_t di = d + kd - s.KD / 2, hi = h + kh - s.KH / 2, wi = q + kw - s.KW / 2;
                  if (di < 0 || di >= s.D || hi < 0 || hi >= s.H || wi < 0 || wi >= s.W) continue;
                  acc += w[((c * s.KD + kd) * s.KH + kh) * s.KW + kw] *
                         x[(((n * s.C + c) * s.D + di) * s.H + hi) * s.W + wi];
                }
            out[(((n * s.C + c) * s.D + d) * s.H + h) * s.W + q] = acc;
          }
  return out;
}

template <typename T>
std::vector<T> run_conv_forward(const Conv& s, const std::vector<T>& x, const std::vector<T>& w, const T* bias) {
  std::vector<T> out(s.numel(), std::numeric_limits<T>::quiet_NaN());
  const int64_t tiles_h = (s.H + kTileH - 1) / kTileH, tiles_w = (s.W + kTileW - 1) / kTileW;
  const size_t shared = sizeof(T) * (size_t(kTileH + s.KH - 1) * (kTileW + s.KW - 1) + size_t(s.KH) * s.KW);
  emu::launch(dwconv3d_forward_kernel<T, T>, dim3(static_cast<unsigned>(s.N * s.C * s.D * tiles_h * tiles_w)),
              dim3(kForwardThreads), shared, x.data(), w.data(), bias, out.data(), s.C, s.D, s.H, s.W, s.KD, s.KH,
              s.KW, tiles_h, tiles_w);
  return out;
}

template <typename T>
std::vector<T> run_conv_grad_weight(const Conv& s, const std::vector<T>& g, const std::vector<T>& x,
                                    int64_t h_tiles_per_block) {
  const int64_t tiles_h = (s.H + kTileH - 1) / kTileH, tiles_w = (s.W + kTileW - 1) / kTileW;
  const int64_t h_groups = (tiles_h + h_tiles_per_block - 1) / h_tiles_per_block;
  const int64_t blocks_per_channel = s.N * h_groups * tiles_w;
  std::vector<T> partial(blocks_per_channel * s.C * s.K(), std::numeric_limits<T>::quiet_NaN());
  const size_t shared = sizeof(T) * (size_t(kTileH + s.KH - 1) * (kTileW + s.KW - 1) + size_t(kTileH) * kTileW +
                                     kGradWeightThreads);
  emu::launch(dwconv3d_grad_weight_kernel<T, T>, dim3(static_cast<unsigned>(s.C * blocks_per_channel * s.KD)),
              dim3(kGradWeightThreads), shared, g.data(), x.data(), partial.data(), s.C, s.D, s.H, s.W, s.KD, s.KH,
              s.KW, tiles_h, tiles_w, h_tiles_per_block, h_groups, blocks_per_channel);
  return run_row_reduction(partial, blocks_per_channel, s.C * s.K());
}

template <typename T>
void check_conv(const Conv& s, const char* type_name, int64_t h_tiles_per_block) {
  const std::string tag = std::string("dwconv3d ") + type_name + " " + s.name();
  Vec x = rounded<T>(random_vec(s.numel()));
  Vec w = rounded<T>(random_vec(s.C * s.K(), 0.3));
  const Vec bias = rounded<T>(random_vec(s.C));
  const Vec g = rounded<T>(random_vec(s.numel()));
  const std::vector<T> bias_t = cast<T>(bias);

  const Vec out = widen(run_conv_forward<T>(s, cast<T>(x), cast<T>(w), bias_t.data()));
  report(tag + " forward", rel_error(out, conv_reference(s, x, w, &bias)), tolerance<T>(false));

  // grad x: the forward kernel on grad_out with the kernel flipped along all three axes.
  Vec w_flipped(w.size());
  for (int64_t c = 0; c < s.C; ++c)
    for (int64_t k = 0; k < s.K(); ++k) w_flipped[c * s.K() + k] = w[c * s.K() + (s.K() - 1 - k)];
  const Vec grad_x = widen(run_conv_forward<T>(s, cast<T>(g), cast<T>(w_flipped), nullptr));
  const Vec grad_x_fd = numeric_grad(x, [&] { return conv_reference(s, x, w, nullptr); }, g);
  report(tag + " grad x (flipped forward)", rel_error(grad_x, grad_x_fd), tolerance<T>(true));

  const Vec grad_w = widen(run_conv_grad_weight<T>(s, cast<T>(g), cast<T>(x), h_tiles_per_block));
  const Vec grad_w_fd = numeric_grad(w, [&] { return conv_reference(s, x, w, nullptr); }, g);
  report(tag + " grad weight, h tiles/block " + std::to_string(h_tiles_per_block), rel_error(grad_w, grad_w_fd),
         tolerance<T>(true));
}

// ---------------------------------------------------------------------------------------------------
// layer_norm_channels_first and ux_mlp
// ---------------------------------------------------------------------------------------------------

struct Volume {
  int64_t N, C, D, H, W;
  bool channels_last;
  int64_t S() const { return D * H * W; }
  int64_t voxels() const { return N * S(); }
  int64_t numel() const { return N * C * S(); }
  // Written independently of ChannelsFirstLayout on purpose.
  int64_t at(int64_t v, int64_t c) const {
    const int64_t n = v / S(), s = v % S();
    return channels_last ? (n * S() + s) * C + c : (n * C + c) * S() + s;
  }
  ChannelsFirstLayout layout() const {
    return channels_last ? ChannelsFirstLayout{C, S(), 1, C} : ChannelsFirstLayout{C, S(), S(), 1};
  }
  std::string name() const {
    return std::to_string(N) + "x" + std::to_string(C) + "x" + std::to_string(D) + "x" + std::to_string(H) + "x" +
           std::to_string(W) + (channels_last ? " channels_last_3d" : " ncdhw");
  }
};

constexpr double kEps = 1e-6;

void stats_reference(const Volume& s, const Vec& x, int64_t v, double& mean, double& rstd) {
  double sum = 0;
  for (int64_t c = 0; c < s.C; ++c) sum += x[s.at(v, c)];
  mean = sum / s.C;
  double sq = 0;
  for (int64_t c = 0; c < s.C; ++c) sq += (x[s.at(v, c)] - mean) * (x[s.at(v, c)] - mean);
  rstd = 1.0 / std::sqrt(sq / s.C + kEps);
}

Vec layer_norm_reference(const Volume& s, const Vec& x, const Vec& weight, const Vec& bias) {
  Vec out(s.numel());
  for (int64_t v = 0; v < s.voxels(); ++v) {
    double mean, rstd;
    stats_reference(s, x, v, mean, rstd);
    for (int64_t c = 0; c < s.C; ++c) out[s.at(v, c)] = (x[s.at(v, c)] - mean) * rstd * weight[c] + bias[c];
  }
  return out;
}

double gelu_reference(double a) { return 0.5 * a * (1.0 + std::erf(a / std::sqrt(2.0))); }

struct MlpRefParams {
  Vec ln_weight, ln_bias, w1, b1, w2, b2, gamma;  // gamma empty: no layer scale
};

Vec mlp_reference(const Volume& s, const Vec& y, const Vec* residual, const MlpRefParams& p) {
  Vec out(s.numel());
  for (int64_t v = 0; v < s.voxels(); ++v) {
    double mean, rstd;
    stats_reference(s, y, v, mean, rstd);
    for (int64_t c = 0; c < s.C; ++c) {
      const double normed = (y[s.at(v, c)] - mean) * rstd * p.ln_weight[c] + p.ln_bias[c];
      double z = p.b2[c];
      for (int j = 0; j < 4; ++j) z += p.w2[c * 4 + j] * gelu_reference(p.w1[c * 4 + j] * normed + p.b1[c * 4 + j]);
      double o = p.gamma.empty() ? z : p.gamma[c] * z;
      if (residual) o += (*residual)[s.at(v, c)];
      out[s.at(v, c)] = o;
    }
  }
  return out;
}

// The two partitions tried for the parameter-gradient kernels: one warp row per 32 voxels, and per 64
// (two iterations per lane, and a partly filled last row when voxels % 64 != 0).
const int64_t kVoxelsPerRow[] = {32, 64};

template <typename T>
void check_layer_norm(const Volume& s, const char* type_name) {
  const std::string tag = std::string("layer_norm_channels_first ") + type_name + " " + s.name();
  const ChannelsFirstLayout layout = s.layout();
  Vec x = rounded<T>(random_vec(s.numel()));
  Vec weight = rounded<T>(random_vec(s.C));
  Vec bias = rounded<T>(random_vec(s.C));
  const Vec g = rounded<T>(random_vec(s.numel()));
  const auto xt = cast<T>(x), wt = cast<T>(weight), bt = cast<T>(bias), gt = cast<T>(g);
  const unsigned blocks = static_cast<unsigned>((s.voxels() + kVoxelThreads - 1) / kVoxelThreads);

  std::vector<T> out(s.numel(), NAN), mean(s.voxels(), NAN), rstd(s.voxels(), NAN);
  emu::launch(layer_norm_channels_first_forward_kernel<T, T>, dim3(blocks), dim3(kVoxelThreads), 0, xt.data(),
              wt.data(), bt.data(), out.data(), mean.data(), rstd.data(), layout, s.voxels(), static_cast<T>(kEps));
  report(tag + " forward", rel_error(widen(out), layer_norm_reference(s, x, weight, bias)), tolerance<T>(false));
  Vec mean_ref(s.voxels()), rstd_ref(s.voxels());
  for (int64_t v = 0; v < s.voxels(); ++v) stats_reference(s, x, v, mean_ref[v], rstd_ref[v]);
  report(tag + " mean", rel_error(widen(mean), mean_ref), tolerance<T>(false));
  report(tag + " rstd", rel_error(widen(rstd), rstd_ref), tolerance<T>(false));

  std::vector<T> grad_x(s.numel(), NAN);
  emu::launch(layer_norm_channels_first_grad_input_kernel<T, T>, dim3(blocks), dim3(kVoxelThreads), 0, gt.data(),
              xt.data(), wt.data(), mean.data(), rstd.data(), grad_x.data(), layout, s.voxels());
  const auto forward = [&] { return layer_norm_reference(s, x, weight, bias); };
  report(tag + " grad x", rel_error(widen(grad_x), numeric_grad(x, forward, g)), tolerance<T>(true));

  const Vec grad_w_fd = numeric_grad(weight, forward, g);
  const Vec grad_b_fd = numeric_grad(bias, forward, g);
  for (int64_t per_row : kVoxelsPerRow) {
    const int64_t rows = (s.voxels() + per_row - 1) / per_row;
    std::vector<T> partial(rows * s.C * kLnCols, NAN);
    emu::launch(layer_norm_channels_first_param_partial_kernel<T, T>,
                dim3(static_cast<unsigned>((rows + kVoxelThreads / kWarpSize - 1) / (kVoxelThreads / kWarpSize))),
                dim3(kVoxelThreads), 0, gt.data(), xt.data(), mean.data(), rstd.data(), partial.data(), layout,
                s.voxels(), per_row, rows);
    const Vec sums = widen(run_row_reduction(partial, rows, s.C * kLnCols));
    Vec grad_w(s.C), grad_b(s.C);
    for (int64_t c = 0; c < s.C; ++c) {
      grad_w[c] = sums[c * kLnCols + kLnColWeight];
      grad_b[c] = sums[c * kLnCols + kLnColBias];
    }
    const std::string rows_tag = ", " + std::to_string(per_row) + " voxels/warp";
    report(tag + " grad weight" + rows_tag, rel_error(grad_w, grad_w_fd), tolerance<T>(true));
    report(tag + " grad bias" + rows_tag, rel_error(grad_b, grad_b_fd), tolerance<T>(true));
  }
}

template <typename T>
void check_mlp(const Volume& s, const char* type_name, bool with_residual, bool with_gamma) {
  const std::string tag = std::string("ux_mlp ") + type_name + " " + s.name() +
                          (with_residual ? " +residual" : "") + (with_gamma ? " +gamma" : "");
  const ChannelsFirstLayout layout = s.layout();
  Vec y = rounded<T>(random_vec(s.numel()));
  const Vec residual = rounded<T>(random_vec(s.numel()));
  MlpRefParams p;
  p.ln_weight = rounded<T>(random_vec(s.C));
  p.ln_bias = rounded<T>(random_vec(s.C, 0.5));
  p.w1 = rounded<T>(random_vec(s.C * 4));
  p.b1 = rounded<T>(random_vec(s.C * 4, 0.5));
  p.w2 = rounded<T>(random_vec(s.C * 4));
  p.b2 = rounded<T>(random_vec(s.C, 0.5));
  if (with_gamma) p.gamma = rounded<T>(random_vec(s.C));
  const Vec g = rounded<T>(random_vec(s.numel()));

  const auto yt = cast<T>(y), rt = cast<T>(residual), gt = cast<T>(g);
  const auto lnw = cast<T>(p.ln_weight), lnb = cast<T>(p.ln_bias), w1 = cast<T>(p.w1), b1 = cast<T>(p.b1),
             w2 = cast<T>(p.w2), b2 = cast<T>(p.b2), gamma = cast<T>(p.gamma);
  const T* gamma_ptr = with_gamma ? gamma.data() : nullptr;
  const unsigned blocks = static_cast<unsigned>((s.voxels() + kVoxelThreads - 1) / kVoxelThreads);

  std::vector<T> out(s.numel(), NAN), mean(s.voxels(), NAN), rstd(s.voxels(), NAN);
  emu::launch(ux_mlp_forward_kernel<T, T>, dim3(blocks), dim3(kVoxelThreads), 0, yt.data(),
              with_residual ? rt.data() : nullptr, lnw.data(), lnb.data(), w1.data(), b1.data(), w2.data(), b2.data(),
              gamma_ptr, out.data(), mean.data(), rstd.data(), layout, s.voxels(), static_cast<T>(kEps));
  const Vec* residual_ref = with_residual ? &residual : nullptr;
  report(tag + " forward", rel_error(widen(out), mlp_reference(s, y, residual_ref, p)), tolerance<T>(false));

  const auto forward = [&] { return mlp_reference(s, y, nullptr, p); };
  std::vector<T> grad_y(s.numel(), NAN);
  emu::launch(ux_mlp_grad_input_kernel<T, T>, dim3(blocks), dim3(kVoxelThreads), 0, gt.data(), yt.data(),
              lnw.data(), lnb.data(), w1.data(), b1.data(), w2.data(), b2.data(), gamma_ptr, mean.data(), rstd.data(),
              grad_y.data(), layout, s.voxels());
  report(tag + " grad y", rel_error(widen(grad_y), numeric_grad(y, forward, g)), tolerance<T>(true));

  struct Param {
    const char* name;
    Vec* values;
    int col;
    int width;
  };
  std::vector<Param> params{{"ln_weight", &p.ln_weight, kMlpColLnWeight, 1}, {"ln_bias", &p.ln_bias, kMlpColLnBias, 1},
                            {"w1", &p.w1, kMlpColW1, 4},                     {"b1", &p.b1, kMlpColB1, 4},
                            {"w2", &p.w2, kMlpColW2, 4},                     {"b2", &p.b2, kMlpColB2, 1}};
  if (with_gamma) params.push_back({"gamma", &p.gamma, kMlpColGamma, 1});
  std::vector<Vec> fd;
  for (auto& param : params) fd.push_back(numeric_grad(*param.values, forward, g));

  for (int64_t per_row : kVoxelsPerRow) {
    const int64_t rows = (s.voxels() + per_row - 1) / per_row;
    std::vector<T> partial(rows * s.C * kMlpCols, NAN);
    emu::launch(ux_mlp_param_partial_kernel<T, T>,
                dim3(static_cast<unsigned>((rows + kVoxelThreads / kWarpSize - 1) / (kVoxelThreads / kWarpSize))),
                dim3(kVoxelThreads), 0, gt.data(), yt.data(), lnw.data(), lnb.data(), w1.data(), b1.data(), w2.data(),
                b2.data(), gamma_ptr, mean.data(), rstd.data(), partial.data(), layout, s.voxels(), per_row, rows);
    const Vec sums = widen(run_row_reduction(partial, rows, s.C * kMlpCols));
    for (size_t k = 0; k < params.size(); ++k) {
      Vec got(s.C * params[k].width);
      for (int64_t c = 0; c < s.C; ++c)
        for (int j = 0; j < params[k].width; ++j) got[c * params[k].width + j] = sums[c * kMlpCols + params[k].col + j];
      report(tag + " grad " + params[k].name + ", " + std::to_string(per_row) + " voxels/warp", rel_error(got, fd[k]),
             tolerance<T>(true));
    }
  }
}

template <typename T>
void check_all(const char* type_name) {
  // Tiles: H > 16 and W > 32 give several tiles with partial edges; D = 1 and kernels larger than the volume;
  // an anisotropic kernel; 17 x 17 taps per plane (> 256 threads: two tap groups in grad weight).
  check_conv<T>(Conv{2, 2, 3, 19, 37, 3, 3, 3}, type_name, 1);
  check_conv<T>(Conv{1, 2, 3, 34, 9, 5, 3, 7}, type_name, 2);
  check_conv<T>(Conv{1, 2, 1, 5, 6, 7, 7, 7}, type_name, 1);
  check_conv<T>(Conv{1, 1, 2, 18, 20, 3, 17, 17}, type_name, 1);
  for (bool channels_last : {false, true}) {
    check_layer_norm<T>(Volume{2, 5, 3, 4, 5, channels_last}, type_name);
    check_mlp<T>(Volume{2, 3, 2, 3, 7, channels_last}, type_name, true, true);
    check_mlp<T>(Volume{1, 4, 3, 5, 3, channels_last}, type_name, false, false);
  }
  check_layer_norm<T>(Volume{1, 1, 1, 1, 1, false}, type_name);
}

}  // namespace

int main() {
  check_all<double>("float64");
  check_all<float>("float32");
  std::printf("%d failed\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
