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

// exp, tanh and atan for double written the same way (integer masks, no branches) so that double
// loops vectorise too; within about 1 ulp of std::. Used by the coupling kernels, whose double
// inner loops are dominated by these calls; the _approx double overloads above keep std::.
inline int64_t double_bits(double v) { return bit_copy<int64_t>(v); }
inline double bits_double(int64_t b) { return bit_copy<double>(b); }
inline double select_bits(int64_t mask, double a, double b) {
  return bits_double((double_bits(a) & mask) | (double_bits(b) & ~mask));
}
inline int64_t magnitude_above(double v, double limit) {
  return -static_cast<int64_t>((double_bits(v) & 0x7fffffffffffffffLL) > double_bits(limit));
}

inline double exp_f64(double v) {
  // exp(v) = 2^n exp(r), n = round(v / ln 2), r = v - n ln 2 in two parts (|r| <= ln 2 / 2); exp(r) by its
  // Taylor series to r^13 (truncation below 1e-17). n is read from the bits of the rounding sum, so no
  // float-to-int conversion is needed. |v| is clamped to 708 (results saturate near 3e307 and 3e-308);
  // NaN propagates.
  constexpr double kRound = 6755399441055744.0;  // 2^52 + 2^51: v / ln 2 + kRound has n in its low bits
  const int64_t is_nan = -static_cast<int64_t>((double_bits(v) & 0x7fffffffffffffffLL) > 0x7ff0000000000000LL);
  const double w = select_bits(magnitude_above(v, 708.0), std::copysign(708.0, v), v);
  const double t = w * 1.4426950408889634 + kRound;
  const double n = t - kRound;
  const double r = (w - n * 6.93145751953125e-1) - n * 1.42860682030941723212e-6;
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  const double er = p * (r * r) + r + 1.0;
  const int64_t scale = (double_bits(t) - double_bits(kRound) + 1023) << 52;
  return select_bits(is_nan, v, er * bits_double(scale));
}

inline double tanh_f64(double v) {
  // |v| < 0.625: v + v^3 P(v^2) / Q(v^2) (Cephes' rational form); else sign(v) (1 - 2 / (exp(2|v|) + 1));
  // NaN propagates
  const double z = v * v;
  const double p = (-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z - 1.61468768441708447952e3;
  const double q = ((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z + 4.84406305325125486048e3;
  const double small = v + v * z * (p / q);
  const double large = 1.0 - 2.0 / (exp_f64(2.0 * std::fabs(v)) + 1.0);
  return std::copysign(select_bits(magnitude_above(v, 0.625), large, small), v);
}

inline double atan_f64(double v) {
  // Cephes-style: |v| > tan(3pi/8): pi/2 + atan(-1/|v|); |v| > 0.66: pi/4 + atan((|v|-1)/(|v|+1)); then
  // r + r^3 P(r^2) / Q(r^2) plus the low bits of pi/2 or pi/4; sign restored. NaN propagates, atan(inf) = pi/2.
  const double x = std::fabs(v);
  const int64_t big = magnitude_above(x, 2.41421356237309504880);
  const int64_t mid = magnitude_above(x, 0.66) & ~big;
  const double r = select_bits(big, -1.0 / x, select_bits(mid, (x - 1.0) / (x + 1.0), x));
  const double base = select_bits(big, 1.57079632679489661923, select_bits(mid, 0.78539816339744830962, 0.0));
  const double low = select_bits(big, 6.123233995736765886130e-17, select_bits(mid, 3.061616997868382943065e-17, 0.0));
  const double z = r * r;
  double p = -8.750608600031904122785e-1;
  p = p * z - 1.615753718733365076637e1;
  p = p * z - 7.500855792314704667340e1;
  p = p * z - 1.228866684490136173410e2;
  p = p * z - 6.485021904942025371773e1;
  double q = z + 2.485846490142306297962e1;
  q = q * z + 1.650270098316988542046e2;
  q = q * z + 4.328810604912902668951e2;
  q = q * z + 4.853903996359136964868e2;
  q = q * z + 1.945506571482613964425e2;
  return std::copysign(base + ((r * (z * p / q) + r) + low), v);
}

}  // namespace msflow_fast
