// Element-wise float32 kernels on CPU, with MindSpore's `ops.Custom(func_type="aot")` signature:
//   gelu_forward   (x)      -> y    y = x Phi(x) = x / 2 (1 + erf(x / sqrt 2))      exact GELU (torch's default)
//   gelu_backward  (x, dy)  -> dx   dx = dy (Phi(x) + x phi(x)),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//   squared_sum    (x_1, ..., x_n)    -> s    s = sum of x_t^2 over every element of every x_t (a scalar)
//   scale_all      (x_1, ..., x_n, k) -> (y_1, ..., y_n)    y_t = x_t k, k a scalar       unscaling and clipping
//   drop_path      (x, seed, stream, keep_prob) -> y    y[b, ...] = x[b, ...] mask[b]    drop path, and its gradient:
//                  mask[b] = floor(keep_prob + u[b]) / keep_prob, u[b] = model.hash_uniform(seed, stream, b)
//   adamw_update   (param_1..n, exp_avg_1..n, exp_avg_sq_1..n, grad_1..n, step_hyper, param_hypers) -> step_hyper
//                  torch.optim.AdamW in place on each param_t, exp_avg_t, exp_avg_sq_t; step_hyper = [lr, step],
//                  param_hypers[t] = [lr scale, weight decay, beta1, beta2, eps]
//
// The functions over n tensors are one op for all of a model's gradients: a MindSpore op costs ~30-50 us to launch
// on CPU whatever its size, and one op per parameter (4 per parameter per step) was ~20 ms of the demo's step.
//
// Each is one pass over memory, where MindSpore composes exact GELU and its gradient from ~10 primitives (erf, pow,
// exp, ...), and its ReduceSum and fused AdamWeightDecay kernels run at ~3 and ~5-10 ns per element. Plain loops
// the compiler vectorizes: erf is Eigen's rational approximation for float (as in TensorFlow and XLA; within
// 4.3e-7 of erf), exp the Cephes polynomial (within 1-2 ulp), both in gelu.h. NaN inputs give NaN outputs.
//
// Single-threaded on purpose. MindSpore runs a step's kernels one after another, so a second thread would halve
// these kernels' time; but measured on RepLKNet-31B (2 cores), OpenMP threads here made the step 2x slower: after
// each kernel they spin, waiting for more work, and take the cores from the convolutions and BN that follow
// (step 4.1 s with them, 1.9 s without; GELU 0.32 s -> 0.03 s, AdamW 0.77 s -> 0.18 s per step).
//
// Built once per ISA level (kernels.py): REPLKNET_LANES, the floats per vector register (16, 8 or 4), sets the
// partial sums of squared_sum; the loops are vectorized by the compiler for the level's target.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "gelu.h"

#ifndef REPLKNET_LANES
#define REPLKNET_LANES 4
#endif

namespace {

int64_t element_count(int ndims, const int64_t *shape) {
  int64_t n = 1;
  for (int d = 0; d < ndims; ++d) n *= shape[d];
  return n;
}

bool all_float32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i) {
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  }
  return true;
}

// int32 arithmetic as MindSpore's (and numpy's) int32 ops do it: products and sums wrap around; floor division
// and modulo by a power of two round towards minus infinity.
inline int32_t wrap(uint32_t x) {
  int32_t y;
  std::memcpy(&y, &x, sizeof y);
  return y;
}
inline int32_t times(int32_t a, int32_t b) { return wrap(static_cast<uint32_t>(a) * static_cast<uint32_t>(b)); }
inline int32_t plus(int32_t a, int32_t b) { return wrap(static_cast<uint32_t>(a) + static_cast<uint32_t>(b)); }
inline int32_t floor_divide_65536(int32_t x) {
  return static_cast<int32_t>(x >= 0 ? x / 65536 : -((-static_cast<int64_t>(x) + 65535) / 65536));
}

// model.hash_uniform(seed, stream, count)[sample] and DropPath's per-sample factor from it, in the same float32
// operations as the graph: floor(keep_prob + u) / keep_prob (0 or 1 / keep_prob).
inline float drop_path_factor(int32_t seed, int32_t stream, int32_t sample, float keep_prob) {
  int32_t x = plus(plus(times(seed, 1000003), times(stream, 7919)), times(sample, 104729));
  for (int round = 0; round < 2; ++round) x = times(x ^ floor_divide_65536(x), 73244475);
  x ^= floor_divide_65536(x);
  const float uniform = static_cast<float>(x & 0xFFFFFF) / 16777216.0f;
  return std::floor(keep_prob + uniform) / keep_prob;
}

}  // namespace

extern "C" int gelu_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                            void *) {
  if (nparam != 2 || !all_float32(nparam, dtypes)) return 1;
  const int64_t n = element_count(ndims[0], shapes[0]);
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  for (int64_t i = 0; i < n; ++i) {
    y[i] = gelu(x[i]);
  }
  return 0;
}

extern "C" int gelu_backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                             void *) {
  if (nparam != 3 || !all_float32(nparam, dtypes)) return 1;
  const int64_t n = element_count(ndims[0], shapes[0]);
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  for (int64_t i = 0; i < n; ++i) {
    dx[i] = dy[i] * gelu_slope(x[i]);
  }
  return 0;
}

extern "C" int squared_sum(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                           void *) {
  if (nparam < 2 || !all_float32(nparam, dtypes)) return 1;
  // kLanes float partial sums (one vector register), each over at most 2^17 / kLanes elements before it is added
  // to a double.
  constexpr int kLanes = REPLKNET_LANES;
  constexpr int64_t kBlock = int64_t(1) << 17;
  double total = 0.0;
  for (int t = 0; t + 1 < nparam; ++t) {
    const int64_t n = element_count(ndims[t], shapes[t]);
    const float *x = static_cast<const float *>(params[t]);
    for (int64_t begin = 0; begin < n; begin += kBlock) {
      const int64_t end = begin + kBlock < n ? begin + kBlock : n;
      float lanes[kLanes] = {};
      int64_t i = begin;
      for (; i + kLanes <= end; i += kLanes) {
        for (int lane = 0; lane < kLanes; ++lane) lanes[lane] += x[i + lane] * x[i + lane];
      }
      for (; i < end; ++i) lanes[0] += x[i] * x[i];
      for (int lane = 0; lane < kLanes; ++lane) total += lanes[lane];
    }
  }
  *static_cast<float *>(params[nparam - 1]) = static_cast<float>(total);
  return 0;
}

extern "C" int scale_all(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                         void *) {
  if (nparam < 3 || nparam % 2 == 0 || !all_float32(nparam, dtypes)) return 1;
  const int tensors = (nparam - 1) / 2;
  const float k = *static_cast<const float *>(params[tensors]);
  for (int t = 0; t < tensors; ++t) {
    const int64_t n = element_count(ndims[t], shapes[t]);
    const float *x = static_cast<const float *>(params[t]);
    float *y = static_cast<float *>(params[tensors + 1 + t]);
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * k;
  }
  return 0;
}

extern "C" int drop_path(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                         void *) {
  if (nparam != 5 || std::strcmp(dtypes[0], "float32") != 0 || std::strcmp(dtypes[1], "int32") != 0 ||
      std::strcmp(dtypes[2], "int32") != 0 || std::strcmp(dtypes[3], "float32") != 0 ||
      std::strcmp(dtypes[4], "float32") != 0 || ndims[0] < 1 || element_count(ndims[1], shapes[1]) != 1 ||
      element_count(ndims[2], shapes[2]) != 1 || element_count(ndims[3], shapes[3]) != 1)
    return 1;
  const int64_t samples = shapes[0][0], per_sample = element_count(ndims[0] - 1, shapes[0] + 1);
  const float *x = static_cast<const float *>(params[0]);
  const int32_t seed = *static_cast<const int32_t *>(params[1]);
  const int32_t stream = *static_cast<const int32_t *>(params[2]);
  const float keep_prob = *static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  for (int64_t b = 0; b < samples; ++b) {
    const float factor = drop_path_factor(seed, stream, static_cast<int32_t>(b), keep_prob);
    const float *from = x + b * per_sample;
    float *to = y + b * per_sample;
    for (int64_t i = 0; i < per_sample; ++i) to[i] = from[i] * factor;
  }
  return 0;
}

extern "C" int adamw_update(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                            void *) {
  if (nparam < 7 || (nparam - 3) % 4 != 0 || !all_float32(nparam, dtypes)) return 1;
  const int tensors = (nparam - 3) / 4;
  const float *step_hyper = static_cast<const float *>(params[4 * tensors]);
  const float *param_hypers = static_cast<const float *>(params[4 * tensors + 1]);
  if (element_count(ndims[4 * tensors + 1], shapes[4 * tensors + 1]) != 5 * tensors) return 1;
  for (int t = 0; t < tensors; ++t) {
    const int64_t n = element_count(ndims[t], shapes[t]);
    float *param = static_cast<float *>(params[t]);
    float *exp_avg = static_cast<float *>(params[tensors + t]);
    float *exp_avg_sq = static_cast<float *>(params[2 * tensors + t]);
    const float *grad = static_cast<const float *>(params[3 * tensors + t]);
    const float *param_hyper = param_hypers + 5 * t;
    const float lr = step_hyper[0] * param_hyper[0], step = step_hyper[1], weight_decay = param_hyper[1];
    const float beta1 = param_hyper[2], beta2 = param_hyper[3], eps = param_hyper[4];
    // torch: p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    //        p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    const float decay = 1.0f - lr * weight_decay;
    const float step_size = lr / (1.0f - std::pow(beta1, step));
    const float root_bias_correction2 = std::sqrt(1.0f - std::pow(beta2, step));
    for (int64_t i = 0; i < n; ++i) {
      const float g = grad[i];
      const float m = beta1 * exp_avg[i] + (1.0f - beta1) * g;
      const float v = beta2 * exp_avg_sq[i] + (1.0f - beta2) * g * g;
      exp_avg[i] = m;
      exp_avg_sq[i] = v;
      param[i] = param[i] * decay - step_size * m / (std::sqrt(v) / root_bias_correction2 + eps);
    }
  }
  std::memcpy(params[nparam - 1], step_hyper, 2 * sizeof(float));
  return 0;
}
