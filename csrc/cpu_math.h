// Float maths helpers shared by the CPU kernels (csrc/coupling.cpp, csrc/head.cpp).
#pragma once

#include <cstring>
#include <cmath>
#include <cstdint>
#include <limits>

namespace msflow_fast {

// exp, tanh and atan for the float compute path (float32, and half/bfloat16 computed in float), written
// with integer masks instead of branches or float compares so that the inner loops vectorise
// (std::exp/std::tanh/std::atan on float do not); about 1-2 ulp, like the vectorised eager kernels.
// Double keeps std::.

// Branch-free helpers on the float bit pattern (integer compares and masks only).
// Bit casts through memcpy (C++17; compiles to a register move).
template <typename To, typename From>
inline To bit_copy(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_copy needs types of one size");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}
inline int32_t float_bits(float v) { return bit_copy<int32_t>(v); }
inline float bits_float(int32_t b) { return bit_copy<float>(b); }
// a where mask is all ones, b where mask is zero
inline float select_bits(int32_t mask, float a, float b) {
  return bits_float((float_bits(a) & mask) | (float_bits(b) & ~mask));
}
// all ones where |v| > limit (limit >= 0, finite; NaN counts as greater)
inline int32_t magnitude_above(float v, float limit) {
  return -static_cast<int32_t>((float_bits(v) & 0x7fffffff) > float_bits(limit));
}

inline float exp_approx(float v) {
  // exp(v) = 2^n exp(r), n = round(v / ln 2), |r| <= ln 2 / 2; degree-6 polynomial for exp(r).
  // |v| is clamped to 87 (results saturate near 6e37 and 1.6e-38); NaN propagates.
  const int32_t is_nan = -static_cast<int32_t>((float_bits(v) & 0x7fffffff) > 0x7f800000);
  const float w = select_bits(magnitude_above(v, 87.0f), std::copysign(87.0f, v), v);
  const float n = (w * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (w - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * (r * r) + r + 1.0f;
  const float result = er * bits_float((static_cast<int32_t>(n) + 127) << 23);
  return select_bits(is_nan, v, result);
}

inline float tanh_approx(float v) {
  // |v| < 0.625: odd polynomial; else sign(v) (1 - 2 / (exp(2|v|) + 1)); NaN propagates
  const float z = v * v;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * v + v;
  const float large = std::copysign(1.0f - 2.0f / (exp_approx(2.0f * std::fabs(v)) + 1.0f), v);
  return select_bits(magnitude_above(v, 0.625f), large, small);
}

inline float atan_approx(float v) {
  // Cephes-style: |v| > tan(3pi/8): pi/2 + atan(-1/|v|); |v| > tan(pi/8): pi/4 + atan((|v|-1)/(|v|+1));
  // then an odd degree-9 polynomial on |r| <= tan(pi/8); sign restored. NaN propagates, atan(inf) = pi/2.
  const float x = std::fabs(v);
  const int32_t big = magnitude_above(x, 2.414213562373095f);
  const int32_t mid = magnitude_above(x, 0.4142135623730950f) & ~big;
  const float r = select_bits(big, -1.0f / x, select_bits(mid, (x - 1.0f) / (x + 1.0f), x));
  const float base = select_bits(big, 1.5707963267948966f, select_bits(mid, 0.7853981633974483f, 0.0f));
  const float z = r * r;
  float p = 8.05374449538e-2f;
  p = p * z - 1.38776856032e-1f;
  p = p * z + 1.99777106478e-1f;
  p = p * z - 3.33329491539e-1f;
  return std::copysign(base + (p * z * r + r), v);
}

inline float log_approx(float v) {
  // log(v) = e ln 2 + log(m), v = m 2^e with m in (sqrt(1/2), sqrt(2)]; log(m) = 2 atanh(f),
  // f = (m - 1) / (m + 1), |f| < 0.172, by its odd series to f^9 (truncation < 1e-9). Denormals are
  // scaled by 2^23 first; log(+-0) = -inf, log(+inf) = +inf, negatives and NaN give NaN.
  const int32_t b0 = float_bits(v);
  const int32_t sub = -static_cast<int32_t>((b0 & 0x7f800000) == 0);
  const int32_t b = float_bits(select_bits(sub, v * 8388608.0f, v));
  const int32_t big = -static_cast<int32_t>((b & 0x007fffff) > 0x003504f3);  // mantissa above sqrt(2)
  const float m = bits_float((b & 0x007fffff) | 0x3f800000) * select_bits(big, 0.5f, 1.0f);
  const float e = static_cast<float>(((b >> 23) & 0xff) - 127 - (sub & 23) + (big & 1));
  const float f = (m - 1.0f) / (m + 1.0f);
  const float f2 = f * f;
  float p = 1.0f / 9.0f;
  p = p * f2 + 1.0f / 7.0f;
  p = p * f2 + 0.2f;
  p = p * f2 + 1.0f / 3.0f;
  p = p * f2 + 1.0f;
  const float result = (e * 0.693359375f + 2.0f * f * p) + e * -2.12194440e-4f;
  const int32_t special = -static_cast<int32_t>(b0 < 0 || (b0 & 0x7f800000) == 0x7f800000);  // < 0, inf, NaN
  const float special_value = select_bits(-static_cast<int32_t>(b0 < 0), std::numeric_limits<float>::quiet_NaN(), v);
  const int32_t zero = -static_cast<int32_t>((b0 & 0x7fffffff) == 0);
  return select_bits(zero, -std::numeric_limits<float>::infinity(), select_bits(special, special_value, result));
}

inline double exp_approx(double v) { return std::exp(v); }
inline double log_approx(double v) { return std::log(v); }
inline double atan_approx(double v) { return std::atan(v); }
inline double tanh_approx(double v) { return std::tanh(v); }

}  // namespace msflow_fast
