// Exact (erf) GELU for float32, shared by pointwise.cc (GELU alone) and batchnorm.cc (BatchNorm and GELU in one
// pass): gelu(x) = x Phi(x), and its slope Phi(x) + x phi(x), with Phi the standard normal CDF and phi its density.
// Plain inline functions whose loops the compiler vectorizes at every ISA level (kernels.py's -fno-trapping-math).
#ifndef REPLKNET_FN_GELU_H_
#define REPLKNET_FN_GELU_H_

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// erf(x) = x P(x^2) / Q(x^2) on [-4, 4]; beyond, erf(x) rounds to +-1 in float.
inline float erf_float(float x) {
  x = x < -4.0f ? -4.0f : (x > 4.0f ? 4.0f : x);
  const float x2 = x * x;
  float p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = x2 * p - 2.10102402082508e-06f;
  p = x2 * p - 5.69250639462346e-05f;
  p = x2 * p - 7.34990630326855e-04f;
  p = x2 * p - 2.95459980854025e-03f;
  p = x2 * p - 1.60960333262415e-02f;
  float q = x2 * -1.45660718464996e-05f - 2.13374055278905e-04f;
  q = x2 * q - 1.68282697438203e-03f;
  q = x2 * q - 7.37332916720468e-03f;
  q = x2 * q - 1.42647390514189e-02f;
  return x * p / q;
}

// exp(x) for x <= 0 (all GELU needs): 2^n exp(r), r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2] (ln 2 split in two for
// an exact product), exp(r) by Cephes' polynomial; below -87 (exp < 1.2e-38) the input is clamped.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

constexpr float kSqrtHalf = 0.70710678118654752f;         // 1 / sqrt(2)
constexpr float kInvSqrtTwoPi = 0.39894228040143268f;     // 1 / sqrt(2 pi)

// Phi(x) = (1 + erf(x / sqrt 2)) / 2, shared by the forward and the gradient.
inline float normal_cdf(float x) { return 0.5f * (1.0f + erf_float(x * kSqrtHalf)); }

inline float gelu(float x) { return x * normal_cdf(x); }

inline float gelu_slope(float x) { return normal_cdf(x) + x * (kInvSqrtTwoPi * exp_nonpositive(-0.5f * x * x)); }

}  // namespace

#endif  // REPLKNET_FN_GELU_H_
