// Training-mode BatchNorm2d on float32 NCHW tensors, with MindSpore's `ops.Custom(func_type="aot")` signature:
//   batch_norm_forward   (x, gamma, beta, moving_mean, moving_var, hyper) -> (y, mean, invstd)
//       y = (x - mean) invstd gamma + beta over each channel's N x H x W values, invstd = 1 / sqrt(var + eps) with
//       the biased batch variance; moving_mean and moving_var are updated in place as torch.nn.BatchNorm2d does
//       (moving = momentum moving + (1 - momentum) batch, the variance unbiased), hyper = [eps, momentum] (the
//       MindSpore momentum: 0.9 is PyTorch's 0.1). With `_relu`, y = max(y, 0) (conv-BN-ReLU in one pass); with
//       `_gelu`, y = gelu(y), the exact GELU of gelu.h (ConvFFN's conv-BN-GELU).
//   batch_norm_apply     (x, gamma, beta, mean, invstd) -> y, the forward's y (and `_relu`, `_gelu`'s) again from the
//       statistics it returned, with its arithmetic: the same bits. A training step that recomputes y in the
//       backward need not keep it (conv1x1.NormalizedInput, dwconv.NormalizedInput: y only feeds the next conv).
//   batch_norm_backward  (x, gamma, mean, invstd, dy) -> (dx, dgamma, dbeta)
//   batch_norm_relu_backward (x, gamma, mean, invstd, y, dy) -> (dx, dgamma, dbeta), dy masked by y > 0
//   batch_norm_gelu_backward (x, gamma, beta, mean, invstd, dy) -> (dx, dgamma, dbeta), dy times GELU's slope at
//       the normalized x, recomputed from x: training keeps no copy of the normalized tensor for GELU's gradient
//       (four times the channels in every ConvFFN; RepLKNet-31B at batch 4 peaks ~0.17 GB lower, BENCHMARKS.md).
//
// Why: MindSpore 2.8's CPU BatchNorm and BatchNormGrad took 4.6-11.6 ns per element forward+backward (Zen 3), 30 ms
// of the demo's ~80 ms of op time per step; these take 2.0-3.3 ns (BENCHMARKS.md). Per channel, one pass sums, a second
// sums squared deviations (two-pass: no cancellation), a third writes; a channel's N planes stay in cache between
// the passes. Sums are kLanes float partial sums per plane, added into doubles. Planes of fewer than kSmallPlane
// pixels (7x7 and below: 31B's last stage, most of the demo's) are too short for a channel's loops (a 2x2 plane ran
// at 6.5 ns per element forward): there each pass runs over an image's C x plane values at once, the per-channel
// factors spread over their channel's pixels, and sums add over the batch per position before over the plane.
//
// Single-threaded, as pointwise.cc (see there: OpenMP's spinning threads took the cores from the ops after them).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gelu.h"

#ifndef REPLKNET_LANES
#define REPLKNET_LANES 4
#endif

namespace {

constexpr int kLanes = REPLKNET_LANES;

// What follows the normalization in the same pass.
enum class Activation { kNone, kRelu, kGelu };

template <Activation kActivation>
inline float activate(float v) {
  if (kActivation == Activation::kRelu) return v > 0.0f ? v : 0.0f;
  if (kActivation == Activation::kGelu) return gelu(v);
  return v;
}

bool all_float32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i) {
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  }
  return true;
}

// sum of f(i) for i in [0, n), as kLanes float partial sums.
template <typename F>
double lane_sum(int64_t n, F f) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) lanes[lane] += f(i + lane);
  }
  for (; i < n; ++i) lanes[0] += f(i);
  double total = 0.0;
  for (int lane = 0; lane < kLanes; ++lane) total += lanes[lane];
  return total;
}

struct Layout {
  int64_t batch, channels, plane;  // N, C, H x W
  int64_t count() const { return batch * plane; }
  int64_t image() const { return channels * plane; }
  int64_t offset(int64_t n, int64_t c) const { return (n * channels + c) * plane; }
};

constexpr int64_t kSmallPlane = 64;

// One image's C x plane values, each its channel's value.
std::vector<float> expand(const Layout &s, const float *per_channel) {
  std::vector<float> expanded(s.image());
  for (int64_t c = 0; c < s.channels; ++c) {
    for (int64_t i = 0; i < s.plane; ++i) expanded[c * s.plane + i] = per_channel[c];
  }
  return expanded;
}

// Small planes: per-channel sums of f(at, e) (at: the element's index, e: its index within its image), summed
// over the batch at each position (floats, vectorized over the image), then over each plane (doubles).
template <typename F>
std::vector<double> small_plane_sums(const Layout &s, F f) {
  std::vector<float> positions(s.image(), 0.0f);
  for (int64_t n = 0; n < s.batch; ++n) {
    const int64_t first = n * s.image();
    for (int64_t e = 0; e < s.image(); ++e) positions[e] += f(first + e, e);
  }
  std::vector<double> sums(s.channels, 0.0);
  for (int64_t c = 0; c < s.channels; ++c) {
    for (int64_t i = 0; i < s.plane; ++i) sums[c] += positions[c * s.plane + i];
  }
  return sums;
}

bool nchw(int ndims, const int64_t *shape, Layout *layout) {
  if (ndims != 4) return false;
  *layout = {shape[0], shape[1], shape[2] * shape[3]};
  return layout->count() > 1;
}

template <Activation kActivation>
int forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  Layout s;
  if (nparam != 9 || !all_float32(nparam, dtypes) || !nchw(ndims[0], shapes[0], &s)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]);
  float *moving_mean = static_cast<float *>(params[3]);
  float *moving_var = static_cast<float *>(params[4]);
  const float *hyper = static_cast<const float *>(params[5]);
  float *y = static_cast<float *>(params[6]);
  float *mean_out = static_cast<float *>(params[7]);
  float *invstd_out = static_cast<float *>(params[8]);
  const float eps = hyper[0], momentum = hyper[1];
  const double count = static_cast<double>(s.count());
  // Channel c's mean and squared deviations -> invstd, the running statistics, and y's scale and shift.
  auto statistics = [&](int64_t c, float mean, double squares, float *scale, float *shift) {
    const float invstd = static_cast<float>(1.0 / std::sqrt(squares / count + eps));
    *scale = gamma[c] * invstd;
    *shift = beta[c] - mean * *scale;
    mean_out[c] = mean;
    invstd_out[c] = invstd;
    moving_mean[c] = momentum * moving_mean[c] + (1.0f - momentum) * mean;
    moving_var[c] = momentum * moving_var[c] + (1.0f - momentum) * static_cast<float>(squares / (count - 1.0));
  };
  if (s.plane < kSmallPlane) {
    const std::vector<double> sums = small_plane_sums(s, [x](int64_t at, int64_t) { return x[at]; });
    for (int64_t c = 0; c < s.channels; ++c) mean_out[c] = static_cast<float>(sums[c] / count);
    const std::vector<float> means = expand(s, mean_out);
    const float *m = means.data();
    const std::vector<double> squares = small_plane_sums(s, [x, m](int64_t at, int64_t e) {
      const float d = x[at] - m[e];
      return d * d;
    });
    std::vector<float> scales(s.channels), shifts(s.channels);
    for (int64_t c = 0; c < s.channels; ++c) statistics(c, mean_out[c], squares[c], &scales[c], &shifts[c]);
    const std::vector<float> scale = expand(s, scales.data()), shift = expand(s, shifts.data());
    for (int64_t n = 0; n < s.batch; ++n) {
      const float *p = x + n * s.image();
      float *q = y + n * s.image();
      for (int64_t e = 0; e < s.image(); ++e) q[e] = activate<kActivation>(p[e] * scale[e] + shift[e]);
    }
    return 0;
  }
  for (int64_t c = 0; c < s.channels; ++c) {
    double sum = 0.0;
    for (int64_t n = 0; n < s.batch; ++n) {
      const float *p = x + s.offset(n, c);
      sum += lane_sum(s.plane, [p](int64_t i) { return p[i]; });
    }
    const float mean = static_cast<float>(sum / count);
    double squares = 0.0;
    for (int64_t n = 0; n < s.batch; ++n) {
      const float *p = x + s.offset(n, c);
      squares += lane_sum(s.plane, [p, mean](int64_t i) { const float d = p[i] - mean; return d * d; });
    }
    float scale, shift;
    statistics(c, mean, squares, &scale, &shift);
    for (int64_t n = 0; n < s.batch; ++n) {
      const float *p = x + s.offset(n, c);
      float *q = y + s.offset(n, c);
      for (int64_t i = 0; i < s.plane; ++i) q[i] = activate<kActivation>(p[i] * scale + shift);
    }
  }
  return 0;
}

template <Activation kActivation>
int apply(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  Layout s;
  if (nparam != 6 || !all_float32(nparam, dtypes) || !nchw(ndims[0], shapes[0], &s)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]);
  const float *mean = static_cast<const float *>(params[3]);
  const float *invstd = static_cast<const float *>(params[4]);
  float *y = static_cast<float *>(params[5]);
  for (int64_t n = 0; n < s.batch; ++n) {
    for (int64_t c = 0; c < s.channels; ++c) {
      const float scale = gamma[c] * invstd[c], shift = beta[c] - mean[c] * scale;  // as statistics() in forward
      const float *p = x + s.offset(n, c);
      float *q = y + s.offset(n, c);
      for (int64_t i = 0; i < s.plane; ++i) q[i] = activate<kActivation>(p[i] * scale + shift);
    }
  }
  return 0;
}

// dbeta = sum dy', dgamma = invstd sum dy' (x - mean), dx = gamma invstd (dy' - dbeta / M - xhat dgamma / M) with
// xhat = (x - mean) invstd, M = N H W, and dy' = dy (masked by y > 0 after a fused ReLU; after a fused GELU, times
// its slope at gamma xhat + beta, written to dx first and finished there in place).
template <Activation kActivation>
int backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  constexpr bool kRelu = kActivation == Activation::kRelu, kGelu = kActivation == Activation::kGelu;
  Layout s;
  const int inputs = kActivation == Activation::kNone ? 5 : 6;
  if (nparam != inputs + 3 || !all_float32(nparam, dtypes) || !nchw(ndims[0], shapes[0], &s)) return 1;
  const int statistics = kGelu ? 3 : 2;  // after beta, with GELU
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = kGelu ? static_cast<const float *>(params[2]) : nullptr;
  const float *mean = static_cast<const float *>(params[statistics]);
  const float *invstd = static_cast<const float *>(params[statistics + 1]);
  const float *y = kRelu ? static_cast<const float *>(params[4]) : nullptr;
  const float *dy = static_cast<const float *>(params[inputs - 1]);
  float *dx = static_cast<float *>(params[inputs]);
  float *dgamma = static_cast<float *>(params[inputs + 1]);
  float *dbeta = static_cast<float *>(params[inputs + 2]);
  const double count = static_cast<double>(s.count());
  if (kGelu) {
    for (int64_t n = 0; n < s.batch; ++n) {
      for (int64_t c = 0; c < s.channels; ++c) {
        // The forward's own scale and shift (statistics() there), so the slope is taken where GELU was.
        const float scale = gamma[c] * invstd[c], shift = beta[c] - mean[c] * scale;
        const float *p = x + s.offset(n, c), *g = dy + s.offset(n, c);
        float *q = dx + s.offset(n, c);
        for (int64_t i = 0; i < s.plane; ++i) q[i] = g[i] * gelu_slope(p[i] * scale + shift);
      }
    }
    dy = dx;
  }
  // Channel c's sums of dy' and dy' (x - mean) -> dgamma, dbeta, and dx's factors: dx = k_dy dy' + k_x x + k_0.
  auto factors = [&](int64_t c, double sum_dy, double sum_dy_centered, float *k_dy, float *k_x, float *k_0) {
    const float r = invstd[c];
    dbeta[c] = static_cast<float>(sum_dy);
    dgamma[c] = static_cast<float>(sum_dy_centered * r);
    *k_dy = gamma[c] * r;
    *k_x = static_cast<float>(-static_cast<double>(*k_dy) * r * r * sum_dy_centered / count);
    *k_0 = static_cast<float>(-static_cast<double>(*k_dy) * sum_dy / count) - *k_x * mean[c];
  };
  if (s.plane < kSmallPlane) {
    const std::vector<float> means = expand(s, mean);
    const float *m = means.data();
    const std::vector<double> sum_dy = small_plane_sums(s, [dy, y](int64_t at, int64_t) {
      return !kRelu || y[at] > 0.0f ? dy[at] : 0.0f;
    });
    const std::vector<double> sum_dy_centered = small_plane_sums(s, [x, dy, y, m](int64_t at, int64_t e) {
      return !kRelu || y[at] > 0.0f ? dy[at] * (x[at] - m[e]) : 0.0f;
    });
    std::vector<float> k_dys(s.channels), k_xs(s.channels), k_0s(s.channels);
    for (int64_t c = 0; c < s.channels; ++c) {
      factors(c, sum_dy[c], sum_dy_centered[c], &k_dys[c], &k_xs[c], &k_0s[c]);
    }
    const std::vector<float> k_dy = expand(s, k_dys.data()), k_x = expand(s, k_xs.data()),
                             k_0 = expand(s, k_0s.data());
    for (int64_t n = 0; n < s.batch; ++n) {
      const int64_t first = n * s.image();
      const float *p = x + first, *g = dy + first, *o = kRelu ? y + first : nullptr;
      float *q = dx + first;
      for (int64_t e = 0; e < s.image(); ++e) {
        q[e] = (!kRelu || o[e] > 0.0f ? k_dy[e] * g[e] : 0.0f) + k_x[e] * p[e] + k_0[e];
      }
    }
    return 0;
  }
  for (int64_t c = 0; c < s.channels; ++c) {
    const float m = mean[c];
    double sum_dy = 0.0, sum_dy_centered = 0.0;
    for (int64_t n = 0; n < s.batch; ++n) {
      const int64_t at = s.offset(n, c);
      const float *p = x + at, *g = dy + at, *o = kRelu ? y + at : nullptr;
      if (kRelu) {
        sum_dy += lane_sum(s.plane, [g, o](int64_t i) { return o[i] > 0.0f ? g[i] : 0.0f; });
        sum_dy_centered += lane_sum(s.plane, [p, g, o, m](int64_t i) {
          return o[i] > 0.0f ? g[i] * (p[i] - m) : 0.0f;
        });
      } else {
        sum_dy += lane_sum(s.plane, [g](int64_t i) { return g[i]; });
        sum_dy_centered += lane_sum(s.plane, [p, g, m](int64_t i) { return g[i] * (p[i] - m); });
      }
    }
    float k_dy, k_x, k_0;
    factors(c, sum_dy, sum_dy_centered, &k_dy, &k_x, &k_0);
    for (int64_t n = 0; n < s.batch; ++n) {
      const int64_t at = s.offset(n, c);
      const float *p = x + at, *g = dy + at;
      float *q = dx + at;
      if (kRelu) {
        const float *o = y + at;
        for (int64_t i = 0; i < s.plane; ++i) q[i] = (o[i] > 0.0f ? k_dy * g[i] : 0.0f) + k_x * p[i] + k_0;
      } else {
        for (int64_t i = 0; i < s.plane; ++i) q[i] = k_dy * g[i] + k_x * p[i] + k_0;
      }
    }
  }
  return 0;
}

}  // namespace

extern "C" int batch_norm_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *, void *) {
  return forward<Activation::kNone>(nparam, params, ndims, shapes, dtypes);
}

extern "C" int batch_norm_relu_forward(int nparam, void **params, int *ndims, int64_t **shapes,
                                       const char **dtypes, void *, void *) {
  return forward<Activation::kRelu>(nparam, params, ndims, shapes, dtypes);
}

extern "C" int batch_norm_gelu_forward(int nparam, void **params, int *ndims, int64_t **shapes,
                                       const char **dtypes, void *, void *) {
  return forward<Activation::kGelu>(nparam, params, ndims, shapes, dtypes);
}

extern "C" int batch_norm_apply(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *, void *) {
  return apply<Activation::kNone>(nparam, params, ndims, shapes, dtypes);
}

extern "C" int batch_norm_relu_apply(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *, void *) {
  return apply<Activation::kRelu>(nparam, params, ndims, shapes, dtypes);
}

extern "C" int batch_norm_gelu_apply(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *, void *) {
  return apply<Activation::kGelu>(nparam, params, ndims, shapes, dtypes);
}

extern "C" int batch_norm_backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *, void *) {
  return backward<Activation::kNone>(nparam, params, ndims, shapes, dtypes);
}

extern "C" int batch_norm_relu_backward(int nparam, void **params, int *ndims, int64_t **shapes,
                                        const char **dtypes, void *, void *) {
  return backward<Activation::kRelu>(nparam, params, ndims, shapes, dtypes);
}

extern "C" int batch_norm_gelu_backward(int nparam, void **params, int *ndims, int64_t **shapes,
                                        const char **dtypes, void *, void *) {
  return backward<Activation::kGelu>(nparam, params, ndims, shapes, dtypes);
}
