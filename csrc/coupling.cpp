// Flow-block ops: soft-clamped affine coupling, global affine + channel permutation, and the
// fused block tail (coupling -> global affine -> permutation). Schemas, shared argument checks
// and CPU kernels; CUDA kernels live in csrc/cuda/coupling.cu. The maths is
// msflow_fast/ops/reference.py.
//
// Layout: NCHW contiguous, N = H * W. Per (b, c) plane the N elements are contiguous; the
// subnet output a = [a_s, a_t] has 2 * C_active channels (scale half, then shift half).
// Log-dets are accumulated in double per plane, then summed over the planes of each sample
// in a fixed order (deterministic). Parameter gradients are reduced per channel in double.
//
// Dtypes: x, a, grad_y and the element outputs share x's dtype. The per-channel parameters
// (global_scale, global_offset), the log-dets, grad_logdet and the parameter gradients are in the
// accumulation dtype acc = at::opmath_type of x's dtype (float for float/half/bfloat16, double for
// double), so float32 parameters of half inputs are used unrounded and log-dets stay float32.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <c10/util/string_view.h>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "coupling_math.h"
#include "cpu_math.h"

namespace msflow_fast {
namespace coupling {

int64_t parse_clamp_form(c10::string_view clamp_form) {
  if (clamp_form == "tanh") return kTanh;
  if (clamp_form == "tanh_scaled") return kTanhScaled;
  if (clamp_form == "atan") return kAtan;
  TORCH_CHECK(false, "msflow_fast: clamp_form must be one of 'tanh', 'tanh_scaled', 'atan', got '", clamp_form, "'");
}

int64_t parse_affine_type(c10::string_view affine_type) {
  if (affine_type == "SOFTPLUS") return kSoftplus;
  if (affine_type == "SIGMOID") return kSigmoid;
  if (affine_type == "EXP") return kExp;
  TORCH_CHECK(false, "msflow_fast: affine_type must be one of 'SOFTPLUS', 'SIGMOID', 'EXP', got '", affine_type,
              "'");
}

namespace {

void check_nchw(const at::Tensor& x) {
  MSFLOW_CHECK_DIM(x, 4);
  MSFLOW_CHECK_FLOAT(x);
  MSFLOW_CHECK_CONTIGUOUS(x);
}

void check_like(const at::Tensor& x, const at::Tensor& other, const char* name) {
  TORCH_CHECK(other.device() == x.device(), "msflow_fast: ", name, " is on ", other.device(), " but x is on ",
              x.device());
  TORCH_CHECK(other.scalar_type() == x.scalar_type(), "msflow_fast: ", name, " has dtype ", other.scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(other.is_contiguous(), "msflow_fast: ", name, " must be contiguous, got strides ", other.strides());
}

void check_subnet_output(const at::Tensor& x, const at::Tensor& a, int64_t active) {
  MSFLOW_CHECK_DIM(a, 4);
  check_like(x, a, "a");
  TORCH_CHECK(a.size(0) == x.size(0) && a.size(1) == 2 * active && a.size(2) == x.size(2) && a.size(3) == x.size(3),
              "msflow_fast: a must have shape [", x.size(0), ", ", 2 * active, ", ", x.size(2), ", ", x.size(3),
              "] (2 * ", active, " channels: scale half then shift half), got ", a.sizes());
}

void check_clamp(double clamp) {
  TORCH_CHECK(std::isfinite(clamp) && clamp > 0.0, "msflow_fast: clamp must be a finite float > 0, got ", clamp);
}

// Same device as x, contiguous, in the accumulation dtype of x.
void check_acc(const at::Tensor& x, const at::Tensor& other, const char* name) {
  TORCH_CHECK(other.device() == x.device(), "msflow_fast: ", name, " is on ", other.device(), " but x is on ",
              x.device());
  TORCH_CHECK(other.scalar_type() == acc_dtype(x), "msflow_fast: ", name, " has dtype ", other.scalar_type(),
              " but must have ", acc_dtype(x), " (the accumulation dtype of x, which has ", x.scalar_type(), ")");
  TORCH_CHECK(other.is_contiguous(), "msflow_fast: ", name, " must be contiguous, got strides ", other.strides());
}

void check_channel_vector(const at::Tensor& x, const at::Tensor& v, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), "msflow_fast: ", name, " must have shape [", x.size(1),
              "] (one element per channel), got ", v.sizes());
  check_acc(x, v, name);
}

void check_perm(const at::Tensor& x, const at::Tensor& perm) {
  TORCH_CHECK(perm.scalar_type() == at::kLong, "msflow_fast: perm must have dtype int64, got ", perm.scalar_type());
  TORCH_CHECK(perm.dim() == 1 && perm.size(0) == x.size(1), "msflow_fast: perm must have shape [", x.size(1),
              "], got ", perm.sizes());
  TORCH_CHECK(perm.device() == x.device(), "msflow_fast: perm is on ", perm.device(), " but x is on ", x.device());
  TORCH_CHECK(perm.is_contiguous(), "msflow_fast: perm must be contiguous, got strides ", perm.strides());
  if (perm.device().is_cpu()) {
    // O(C) on the host; on CUDA the indices are trusted (checking would synchronise).
    const int64_t channels = perm.size(0);
    const int64_t* p = perm.data_ptr<int64_t>();
    std::vector<char> seen(static_cast<size_t>(channels), 0);
    for (int64_t i = 0; i < channels; ++i) {
      TORCH_CHECK(p[i] >= 0 && p[i] < channels && !seen[p[i]], "msflow_fast: perm must be a permutation of 0..",
                  channels - 1, ", got value ", p[i], " at position ", i);
      seen[p[i]] = 1;
    }
  }
}

void check_grads(const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& grad_logdet) {
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "msflow_fast: grad_y must have the shape of x ", x.sizes(), ", got ",
              grad_y.sizes());
  check_like(x, grad_y, "grad_y");
  TORCH_CHECK(grad_logdet.dim() == 1 && grad_logdet.size(0) == x.size(0), "msflow_fast: grad_logdet must have shape [",
              x.size(0), "], got ", grad_logdet.sizes());
  check_acc(x, grad_logdet, "grad_logdet");
}

}  // namespace

// Argument checks, also called by the CUDA host functions.
void check_affine_coupling(const at::Tensor& x, const at::Tensor& a, double clamp) {
  check_nchw(x);
  check_subnet_output(x, a, x.size(1));
  check_clamp(clamp);
}

void check_affine_coupling_bwd(const at::Tensor& grad_y, const at::Tensor& grad_logdet, const at::Tensor& x,
                               const at::Tensor& a, double clamp) {
  check_affine_coupling(x, a, clamp);
  check_grads(x, grad_y, grad_logdet);
}

void check_global_affine_permute(const at::Tensor& x, const at::Tensor& global_scale,
                                 const at::Tensor& global_offset, const at::Tensor& perm) {
  check_nchw(x);
  check_channel_vector(x, global_scale, "global_scale");
  check_channel_vector(x, global_offset, "global_offset");
  check_perm(x, perm);
}

void check_global_affine_permute_bwd(const at::Tensor& grad_y, const at::Tensor& grad_logdet, const at::Tensor& x,
                                     const at::Tensor& global_scale, const at::Tensor& global_offset,
                                     const at::Tensor& perm) {
  check_global_affine_permute(x, global_scale, global_offset, perm);
  check_grads(x, grad_y, grad_logdet);
}

void check_coupling_affine_permute(const at::Tensor& x, const at::Tensor& a, const at::Tensor& global_scale,
                                   const at::Tensor& global_offset, const at::Tensor& perm, double clamp) {
  check_nchw(x);
  TORCH_CHECK(x.size(1) >= 2, "msflow_fast: x must have at least 2 channels to split into halves, got shape ",
              x.sizes());
  check_subnet_output(x, a, x.size(1) / 2);
  check_channel_vector(x, global_scale, "global_scale");
  check_channel_vector(x, global_offset, "global_offset");
  check_perm(x, perm);
  check_clamp(clamp);
}

void check_coupling_affine_permute_bwd(const at::Tensor& grad_y, const at::Tensor& grad_logdet, const at::Tensor& x,
                                       const at::Tensor& a, const at::Tensor& global_scale, const at::Tensor& perm,
                                       double clamp) {
  check_nchw(x);
  TORCH_CHECK(x.size(1) >= 2, "msflow_fast: x must have at least 2 channels to split into halves, got shape ",
              x.sizes());
  check_subnet_output(x, a, x.size(1) / 2);
  check_channel_vector(x, global_scale, "global_scale");
  check_perm(x, perm);
  check_clamp(clamp);
  check_grads(x, grad_y, grad_logdet);
}

namespace {

// ---------------------------------------------------------------------------------------------
// Scalar maths (T = at::opmath_type<scalar_t>: float for float32/half/bfloat16, double for double)

// exp_approx / tanh_approx / atan_approx (float: vectorisable approximations; double: std::) are in cpu_math.h.

// The CPU maths policy of coupling_math.h: vectorisable float approximations, std:: for double.
struct CpuMath {
  static float exp(float v) { return exp_approx(v); }
  static double exp(double v) { return std::exp(v); }
  static float tanh(float v) { return tanh_approx(v); }
  static double tanh(double v) { return std::tanh(v); }
  static float atan(float v) { return atan_approx(v); }
  static double atan(double v) { return std::atan(v); }
  static double log1p(double v) { return std::log1p(v); }
};

template <int64_t FORM, typename T>
inline T soft_clamp(T a, T alpha) {
  return coupling::soft_clamp<FORM, CpuMath>(a, alpha);
}

template <int64_t FORM, typename T>
inline T soft_clamp_and_grad(T a, T alpha, T& ds) {
  return coupling::soft_clamp_and_grad<FORM, CpuMath>(a, alpha, ds);
}

// g = psi(gamma) and dg/dgamma, in double.
inline double global_scale_and_grad(double gamma, int64_t affine_type, double& dg) {
  return coupling::global_scale_and_grad<CpuMath>(gamma, affine_type, dg);
}

// Calls fn(std::integral_constant<int64_t, FORM>{}) for the runtime clamp form.
template <typename Fn>
void dispatch_clamp_form(int64_t form, Fn&& fn) {
  if (form == kTanh) {
    fn(std::integral_constant<int64_t, kTanh>{});
  } else if (form == kTanhScaled) {
    fn(std::integral_constant<int64_t, kTanhScaled>{});
  } else {
    fn(std::integral_constant<int64_t, kAtan>{});
  }
}

// Log-det partial sums: s is staged per chunk of a plane, then summed in double.
constexpr int64_t kChunk = 512;

template <typename T>
inline double chunk_sum(const T* values, int64_t len) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < len; ++i) sum += static_cast<double>(values[i]);
  return sum;
}

template <typename A, typename B>
inline double chunk_dot(const A* a, const B* b, int64_t len) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < len; ++i) sum += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return sum;
}

int64_t plane_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

// Per-channel scale g, dg/dgamma and sum_c log g, in double.
struct ChannelScales {
  std::vector<double> g;
  std::vector<double> dg;
  double log_sum = 0.0;
};

template <typename scalar_t>
ChannelScales channel_scales(const at::Tensor& global_scale, int64_t affine_type) {
  const int64_t channels = global_scale.size(0);
  const at::opmath_type<scalar_t>* gamma = global_scale.data_ptr<at::opmath_type<scalar_t>>();
  ChannelScales out;
  out.g.resize(channels);
  out.dg.resize(channels);
  for (int64_t c = 0; c < channels; ++c) {
    out.g[c] = global_scale_and_grad(static_cast<double>(gamma[c]), affine_type, out.dg[c]);
    out.log_sum += std::log(out.g[c]);
  }
  return out;
}

// logdet[b] = sign * sum_c partial[b, c] + constant (logdet in the accumulation dtype T).
template <typename T>
void reduce_planes(const double* partial, int64_t batch, int64_t channels, double sign, double constant,
                   T* logdet) {
  for (int64_t b = 0; b < batch; ++b) {
    double sum = 0.0;
    for (int64_t c = 0; c < channels; ++c) sum += partial[b * channels + c];
    logdet[b] = static_cast<T>(sign * sum + constant);
  }
}

// ---------------------------------------------------------------------------------------------
// affine coupling

template <typename scalar_t, int64_t FORM, bool REVERSE>
void affine_coupling_kernel(const scalar_t* x, const scalar_t* a, scalar_t* y, double* partial, int64_t batch,
                            int64_t channels, int64_t n, double clamp) {
  using T = at::opmath_type<scalar_t>;
  at::parallel_for(0, batch * channels, plane_grain(n), [=](int64_t begin, int64_t end) {
    const T alpha = static_cast<T>(clamp);
    const T k = shift_factor<FORM, T>();
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / channels;
      const int64_t c = p % channels;
      const scalar_t* xp = x + p * n;
      const scalar_t* a_s = a + (b * 2 * channels + c) * n;
      const scalar_t* a_t = a_s + channels * n;
      scalar_t* yp = y + p * n;
      double sum = 0.0;
      T s_chunk[kChunk];
      for (int64_t start = 0; start < n; start += kChunk) {
        const int64_t len = std::min<int64_t>(kChunk, n - start);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          const T s = soft_clamp<FORM>(static_cast<T>(a_s[start + i]), alpha);
          const T t = k * static_cast<T>(a_t[start + i]);
          const T xv = static_cast<T>(xp[start + i]);
          // forward: y = x e^s + t; reverse: y = (x - t) e^-s
          yp[start + i] = static_cast<scalar_t>(REVERSE ? (xv - t) * exp_approx(-s) : xv * exp_approx(s) + t);
          s_chunk[i] = s;
        }
        sum += chunk_sum(s_chunk, len);
      }
      partial[p] = sum;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_cpu(const at::Tensor& x, const at::Tensor& a, double clamp,
                                                       c10::string_view clamp_form, bool reverse) {
  check_affine_coupling(x, a, clamp);
  const int64_t form = parse_clamp_form(clamp_form);
  const int64_t batch = x.size(0), channels = x.size(1), n = x.size(2) * x.size(3);
  at::Tensor y = new_output(x.sizes(), x.options());
  at::Tensor logdet = new_output({batch}, x.options().dtype(acc_dtype(x)));
  at::Tensor partial = at::zeros({batch * channels}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_coupling_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    dispatch_clamp_form(form, [&](auto form_tag) {
      constexpr int64_t FORM = decltype(form_tag)::value;
      if (reverse) {
        affine_coupling_kernel<scalar_t, FORM, true>(x.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                                                     y.data_ptr<scalar_t>(), partial.data_ptr<double>(), batch,
                                                     channels, n, clamp);
      } else {
        affine_coupling_kernel<scalar_t, FORM, false>(x.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                                                      y.data_ptr<scalar_t>(), partial.data_ptr<double>(), batch,
                                                      channels, n, clamp);
      }
    });
    reduce_planes(partial.data_ptr<double>(), batch, channels, reverse ? -1.0 : 1.0, 0.0, logdet.data_ptr<T>());
  });
  return {y, logdet};
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_fwd_cpu(const at::Tensor& x, const at::Tensor& a, double clamp,
                                                           c10::string_view clamp_form) {
  return affine_coupling_cpu(x, a, clamp, clamp_form, false);
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_inv_cpu(const at::Tensor& x, const at::Tensor& a, double clamp,
                                                           c10::string_view clamp_form) {
  return affine_coupling_cpu(x, a, clamp, clamp_form, true);
}

// Gradients, recomputing s, t and e^{+-s} from a:
//   forward: dx = gy e^s, da_s = (gy x e^s + gl) s', da_t = k gy
//   reverse: dx = gy e^-s, da_s = -(gy y + gl) s' with y = (x - t) e^-s, da_t = -k gy e^-s
template <typename scalar_t, int64_t FORM, bool REVERSE>
void affine_coupling_bwd_kernel(const scalar_t* grad_y, const at::opmath_type<scalar_t>* grad_logdet, const scalar_t* x,
                                const scalar_t* a, scalar_t* grad_x, scalar_t* grad_a, int64_t batch,
                                int64_t channels, int64_t n, double clamp) {
  using T = at::opmath_type<scalar_t>;
  const T alpha = static_cast<T>(clamp);
  const T k = shift_factor<FORM, T>();
  at::parallel_for(0, batch * channels, plane_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / channels;
      const int64_t c = p % channels;
      const T gl = static_cast<T>(grad_logdet[b]);
      const scalar_t* gyp = grad_y + p * n;
      const scalar_t* xp = x + p * n;
      const int64_t a_offset = (b * 2 * channels + c) * n;
      const scalar_t* a_s = a + a_offset;
      const scalar_t* a_t = a_s + channels * n;
      scalar_t* gxp = grad_x + p * n;
      scalar_t* grad_as = grad_a + a_offset;
      scalar_t* grad_at = grad_as + channels * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        T ds;
        const T s = soft_clamp_and_grad<FORM>(static_cast<T>(a_s[i]), alpha, ds);
        const T gy = static_cast<T>(gyp[i]);
        const T xv = static_cast<T>(xp[i]);
        if constexpr (REVERSE) {
          const T e = exp_approx(-s);
          const T yv = (xv - k * static_cast<T>(a_t[i])) * e;
          gxp[i] = static_cast<scalar_t>(gy * e);
          grad_as[i] = static_cast<scalar_t>(-(gy * yv + gl) * ds);
          grad_at[i] = static_cast<scalar_t>(-k * gy * e);
        } else {
          const T e = exp_approx(s);
          gxp[i] = static_cast<scalar_t>(gy * e);
          grad_as[i] = static_cast<scalar_t>((gy * xv * e + gl) * ds);
          grad_at[i] = static_cast<scalar_t>(k * gy);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& grad_logdet,
                                                           const at::Tensor& x, const at::Tensor& a, double clamp,
                                                           c10::string_view clamp_form, bool reverse) {
  check_affine_coupling_bwd(grad_y, grad_logdet, x, a, clamp);
  const int64_t form = parse_clamp_form(clamp_form);
  const int64_t batch = x.size(0), channels = x.size(1), n = x.size(2) * x.size(3);
  at::Tensor grad_x = new_output(x.sizes(), x.options());
  at::Tensor grad_a = new_output(a.sizes(), a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_coupling_bwd_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    dispatch_clamp_form(form, [&](auto form_tag) {
      constexpr int64_t FORM = decltype(form_tag)::value;
      if (reverse) {
        affine_coupling_bwd_kernel<scalar_t, FORM, true>(
            grad_y.data_ptr<scalar_t>(), grad_logdet.data_ptr<T>(), x.data_ptr<scalar_t>(),
            a.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), grad_a.data_ptr<scalar_t>(), batch, channels, n,
            clamp);
      } else {
        affine_coupling_bwd_kernel<scalar_t, FORM, false>(
            grad_y.data_ptr<scalar_t>(), grad_logdet.data_ptr<T>(), x.data_ptr<scalar_t>(),
            a.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), grad_a.data_ptr<scalar_t>(), batch, channels, n,
            clamp);
      }
    });
  });
  return {grad_x, grad_a};
}

// ---------------------------------------------------------------------------------------------
// global affine + permutation
//   forward: y[:, i] = x[:, p[i]] g[p[i]] + b[p[i]]
//   reverse: y[:, p[i]] = (x[:, i] - b[p[i]]) / g[p[i]]
// In both directions plane i of the "permuted side" pairs with plane p[i] of the other side.

template <typename scalar_t, bool REVERSE>
void global_affine_permute_kernel(const scalar_t* x, const ChannelScales& scales,
                                  const at::opmath_type<scalar_t>* offset,
                                  const int64_t* perm, scalar_t* y, int64_t batch, int64_t channels, int64_t n) {
  using T = at::opmath_type<scalar_t>;
  at::parallel_for(0, batch * channels, plane_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / channels;
      const int64_t i = p % channels;
      const int64_t c = perm[i];
      const T g = static_cast<T>(scales.g[c]);
      const T off = static_cast<T>(offset[c]);
      if constexpr (REVERSE) {
        const scalar_t* xp = x + p * n;
        scalar_t* yp = y + (b * channels + c) * n;
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) yp[k] = static_cast<scalar_t>((static_cast<T>(xp[k]) - off) / g);
      } else {
        const scalar_t* xp = x + (b * channels + c) * n;
        scalar_t* yp = y + p * n;
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) yp[k] = static_cast<scalar_t>(static_cast<T>(xp[k]) * g + off);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> global_affine_permute_cpu(const at::Tensor& x, const at::Tensor& global_scale,
                                                             const at::Tensor& global_offset, const at::Tensor& perm,
                                                             c10::string_view affine_type, bool reverse) {
  check_global_affine_permute(x, global_scale, global_offset, perm);
  const int64_t type = parse_affine_type(affine_type);
  const int64_t batch = x.size(0), channels = x.size(1), n = x.size(2) * x.size(3);
  at::Tensor y = new_output(x.sizes(), x.options());
  at::Tensor logdet = new_output({batch}, x.options().dtype(acc_dtype(x)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "global_affine_permute_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const ChannelScales scales = channel_scales<scalar_t>(global_scale, type);
    if (reverse) {
      global_affine_permute_kernel<scalar_t, true>(x.data_ptr<scalar_t>(), scales,
                                                   global_offset.data_ptr<T>(), perm.data_ptr<int64_t>(),
                                                   y.data_ptr<scalar_t>(), batch, channels, n);
    } else {
      global_affine_permute_kernel<scalar_t, false>(x.data_ptr<scalar_t>(), scales,
                                                    global_offset.data_ptr<T>(), perm.data_ptr<int64_t>(),
                                                    y.data_ptr<scalar_t>(), batch, channels, n);
    }
    // H*W * sum_c log g_c, the same for every sample
    const double value = (reverse ? -1.0 : 1.0) * static_cast<double>(n) * scales.log_sum;
    T* ld = logdet.data_ptr<T>();
    for (int64_t b = 0; b < batch; ++b) ld[b] = static_cast<T>(value);
  });
  return {y, logdet};
}

std::tuple<at::Tensor, at::Tensor> global_affine_permute_fwd_cpu(const at::Tensor& x, const at::Tensor& global_scale,
                                                                 const at::Tensor& global_offset,
                                                                 const at::Tensor& perm, c10::string_view affine_type) {
  return global_affine_permute_cpu(x, global_scale, global_offset, perm, affine_type, false);
}

std::tuple<at::Tensor, at::Tensor> global_affine_permute_inv_cpu(const at::Tensor& x, const at::Tensor& global_scale,
                                                                 const at::Tensor& global_offset,
                                                                 const at::Tensor& perm, c10::string_view affine_type) {
  return global_affine_permute_cpu(x, global_scale, global_offset, perm, affine_type, true);
}

// Gradients, parallel over channels (each thread owns one parameter channel c = p[i]):
//   forward: dx[:, c] = gy[:, i] g_c; dg_c = sum gy[:, i] x[:, c] + HW sum_b gl_b / g_c; db_c = sum gy[:, i]
//   reverse: dx[:, i] = gy[:, c] / g_c; dg_c = -(sum gy[:, c] y[:, c] + HW sum_b gl_b) / g_c;
//            db_c = -sum gy[:, c] / g_c
// and dgamma_c = dg_c psi'(gamma_c).
template <typename scalar_t, bool REVERSE>
void global_affine_permute_bwd_kernel(const scalar_t* grad_y, const at::opmath_type<scalar_t>* grad_logdet,
                                      const scalar_t* x, const ChannelScales& scales,
                                      const at::opmath_type<scalar_t>* offset, const int64_t* perm, scalar_t* grad_x,
                                      at::opmath_type<scalar_t>* grad_scale, at::opmath_type<scalar_t>* grad_offset,
                                      int64_t batch, int64_t channels, int64_t n) {
  using T = at::opmath_type<scalar_t>;
  double gl_sum = 0.0;
  for (int64_t b = 0; b < batch; ++b) gl_sum += static_cast<double>(grad_logdet[b]);
  at::parallel_for(0, channels, std::max<int64_t>(1, plane_grain(n * batch)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = perm[i];
      const double g64 = scales.g[c];
      const T g = static_cast<T>(g64);
      const T off = static_cast<T>(offset[c]);
      double sum_gy_v = 0.0;  // sum gy * (x for forward, y for reverse)
      double sum_gy = 0.0;
      for (int64_t b = 0; b < batch; ++b) {
        const int64_t out_plane = (b * channels + (REVERSE ? c : i)) * n;
        const int64_t in_plane = (b * channels + (REVERSE ? i : c)) * n;
        const scalar_t* gyp = grad_y + out_plane;
        const scalar_t* xp = x + in_plane;
        scalar_t* gxp = grad_x + in_plane;
#pragma omp simd reduction(+ : sum_gy_v, sum_gy)
        for (int64_t k = 0; k < n; ++k) {
          const T gy = static_cast<T>(gyp[k]);
          const T xv = static_cast<T>(xp[k]);
          if constexpr (REVERSE) {
            gxp[k] = static_cast<scalar_t>(gy / g);
            sum_gy_v += static_cast<double>(gy) * static_cast<double>((xv - off) / g);
          } else {
            gxp[k] = static_cast<scalar_t>(gy * g);
            sum_gy_v += static_cast<double>(gy) * static_cast<double>(xv);
          }
          sum_gy += static_cast<double>(gy);
        }
      }
      const double hw_gl = static_cast<double>(n) * gl_sum;
      double dg, db;
      if constexpr (REVERSE) {
        dg = -(sum_gy_v + hw_gl) / g64;
        db = -sum_gy / g64;
      } else {
        dg = sum_gy_v + hw_gl / g64;
        db = sum_gy;
      }
      grad_scale[c] = static_cast<T>(dg * scales.dg[c]);
      grad_offset[c] = static_cast<T>(db);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> global_affine_permute_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& grad_logdet, const at::Tensor& x, const at::Tensor& global_scale,
    const at::Tensor& global_offset, const at::Tensor& perm, c10::string_view affine_type, bool reverse) {
  check_global_affine_permute_bwd(grad_y, grad_logdet, x, global_scale, global_offset, perm);
  const int64_t type = parse_affine_type(affine_type);
  const int64_t batch = x.size(0), channels = x.size(1), n = x.size(2) * x.size(3);
  at::Tensor grad_x = new_output(x.sizes(), x.options());
  at::Tensor grad_scale = new_output(global_scale.sizes(), global_scale.options());
  at::Tensor grad_offset = new_output(global_offset.sizes(), global_offset.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "global_affine_permute_bwd_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const ChannelScales scales = channel_scales<scalar_t>(global_scale, type);
    if (reverse) {
      global_affine_permute_bwd_kernel<scalar_t, true>(
          grad_y.data_ptr<scalar_t>(), grad_logdet.data_ptr<T>(), x.data_ptr<scalar_t>(), scales,
          global_offset.data_ptr<T>(), perm.data_ptr<int64_t>(), grad_x.data_ptr<scalar_t>(),
          grad_scale.data_ptr<T>(), grad_offset.data_ptr<T>(), batch, channels, n);
    } else {
      global_affine_permute_bwd_kernel<scalar_t, false>(
          grad_y.data_ptr<scalar_t>(), grad_logdet.data_ptr<T>(), x.data_ptr<scalar_t>(), scales,
          global_offset.data_ptr<T>(), perm.data_ptr<int64_t>(), grad_x.data_ptr<scalar_t>(),
          grad_scale.data_ptr<T>(), grad_offset.data_ptr<T>(), batch, channels, n);
    }
  });
  return {grad_x, grad_scale, grad_offset};
}

// ---------------------------------------------------------------------------------------------
// fused block tail: u = [x1, x2 e^s + t]; y[:, i] = u[:, p[i]] g[p[i]] + b[p[i]]
// Passive channels c < C - C/2, active channel c = C - C/2 + j uses a[:, j] and a[:, C/2 + j].

template <typename scalar_t, int64_t FORM>
void coupling_affine_permute_kernel(const scalar_t* x, const scalar_t* a, const ChannelScales& scales,
                                    const at::opmath_type<scalar_t>* offset, const int64_t* perm, scalar_t* y,
                                    double* partial,
                                    int64_t batch, int64_t channels, int64_t n, double clamp) {
  using T = at::opmath_type<scalar_t>;
  const int64_t active = channels / 2;
  const int64_t passive = channels - active;
  const T alpha = static_cast<T>(clamp);
  const T kt = shift_factor<FORM, T>();
  at::parallel_for(0, batch * channels, plane_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / channels;
      const int64_t i = p % channels;
      const int64_t c = perm[i];
      const T g = static_cast<T>(scales.g[c]);
      const T off = static_cast<T>(offset[c]);
      const scalar_t* xp = x + (b * channels + c) * n;
      scalar_t* yp = y + p * n;
      if (c < passive) {
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) yp[k] = static_cast<scalar_t>(static_cast<T>(xp[k]) * g + off);
        partial[p] = 0.0;
        continue;
      }
      const scalar_t* a_s = a + (b * 2 * active + (c - passive)) * n;
      const scalar_t* a_t = a_s + active * n;
      double sum = 0.0;
      T s_chunk[kChunk];
      for (int64_t start = 0; start < n; start += kChunk) {
        const int64_t len = std::min<int64_t>(kChunk, n - start);
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) {
          const T s = soft_clamp<FORM>(static_cast<T>(a_s[start + k]), alpha);
          // u rounded to scalar_t like the unfused composition
          const T u = static_cast<T>(static_cast<scalar_t>(static_cast<T>(xp[start + k]) * exp_approx(s) +
                                                           kt * static_cast<T>(a_t[start + k])));
          yp[start + k] = static_cast<scalar_t>(u * g + off);
          s_chunk[k] = s;
        }
        sum += chunk_sum(s_chunk, len);
      }
      partial[p] = sum;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> coupling_affine_permute_fwd_cpu(const at::Tensor& x, const at::Tensor& a,
                                                                   const at::Tensor& global_scale,
                                                                   const at::Tensor& global_offset,
                                                                   const at::Tensor& perm, double clamp,
                                                                   c10::string_view clamp_form,
                                                                   c10::string_view affine_type) {
  check_coupling_affine_permute(x, a, global_scale, global_offset, perm, clamp);
  const int64_t form = parse_clamp_form(clamp_form);
  const int64_t type = parse_affine_type(affine_type);
  const int64_t batch = x.size(0), channels = x.size(1), n = x.size(2) * x.size(3);
  at::Tensor y = new_output(x.sizes(), x.options());
  at::Tensor logdet = new_output({batch}, x.options().dtype(acc_dtype(x)));
  at::Tensor partial = at::zeros({batch * channels}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coupling_affine_permute_fwd_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const ChannelScales scales = channel_scales<scalar_t>(global_scale, type);
    dispatch_clamp_form(form, [&](auto form_tag) {
      constexpr int64_t FORM = decltype(form_tag)::value;
      coupling_affine_permute_kernel<scalar_t, FORM>(x.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), scales,
                                                     global_offset.data_ptr<T>(), perm.data_ptr<int64_t>(),
                                                     y.data_ptr<scalar_t>(), partial.data_ptr<double>(), batch,
                                                     channels, n, clamp);
    });
    reduce_planes(partial.data_ptr<double>(), batch, channels, 1.0, static_cast<double>(n) * scales.log_sum,
                  logdet.data_ptr<T>());
  });
  return {y, logdet};
}

// Gradients, parallel over channels (one parameter channel c = p[i] per iteration):
//   du[:, c] = gy[:, i] g_c; dg_c = sum gy[:, i] u[:, c] + HW sum_b gl_b / g_c; db_c = sum gy[:, i]
//   passive c: dx = du; active c: dx = du e^s, da_s = (du x e^s + gl) s', da_t = k du
template <typename scalar_t, int64_t FORM>
void coupling_affine_permute_bwd_kernel(const scalar_t* grad_y, const at::opmath_type<scalar_t>* grad_logdet,
                                        const scalar_t* x, const scalar_t* a, const ChannelScales& scales,
                                        const int64_t* perm, scalar_t* grad_x, scalar_t* grad_a,
                                        at::opmath_type<scalar_t>* grad_scale, at::opmath_type<scalar_t>* grad_offset,
                                        int64_t batch, int64_t channels, int64_t n, double clamp) {
  using T = at::opmath_type<scalar_t>;
  const int64_t active = channels / 2;
  const int64_t passive = channels - active;
  const T alpha = static_cast<T>(clamp);
  const T kt = shift_factor<FORM, T>();
  double gl_sum = 0.0;
  for (int64_t b = 0; b < batch; ++b) gl_sum += static_cast<double>(grad_logdet[b]);
  at::parallel_for(0, channels, std::max<int64_t>(1, plane_grain(n * batch)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = perm[i];
      const double g64 = scales.g[c];
      const T g = static_cast<T>(g64);
      double sum_gy_u = 0.0;
      double sum_gy = 0.0;
      for (int64_t b = 0; b < batch; ++b) {
        const scalar_t* gyp = grad_y + (b * channels + i) * n;
        const scalar_t* xp = x + (b * channels + c) * n;
        scalar_t* gxp = grad_x + (b * channels + c) * n;
        if (c < passive) {
#pragma omp simd
          for (int64_t k = 0; k < n; ++k) gxp[k] = static_cast<scalar_t>(static_cast<T>(gyp[k]) * g);
          sum_gy_u += chunk_dot(gyp, xp, n);
          sum_gy += chunk_sum(gyp, n);
          continue;
        }
        const T gl = static_cast<T>(grad_logdet[b]);
        const int64_t a_offset = (b * 2 * active + (c - passive)) * n;
        const scalar_t* a_s = a + a_offset;
        const scalar_t* a_t = a_s + active * n;
        scalar_t* grad_as = grad_a + a_offset;
        scalar_t* grad_at = grad_as + active * n;
        T u_chunk[kChunk];
        for (int64_t start = 0; start < n; start += kChunk) {
          const int64_t len = std::min<int64_t>(kChunk, n - start);
#pragma omp simd
          for (int64_t k = start; k < start + len; ++k) {
            const T gu = static_cast<T>(gyp[k]) * g;
            const T xv = static_cast<T>(xp[k]);
            T ds;
            const T s = soft_clamp_and_grad<FORM>(static_cast<T>(a_s[k]), alpha, ds);
            const T e = exp_approx(s);
            u_chunk[k - start] = xv * e + kt * static_cast<T>(a_t[k]);
            gxp[k] = static_cast<scalar_t>(gu * e);
            grad_as[k] = static_cast<scalar_t>((gu * xv * e + gl) * ds);
            grad_at[k] = static_cast<scalar_t>(kt * gu);
          }
          sum_gy_u += chunk_dot(gyp + start, u_chunk, len);
          sum_gy += chunk_sum(gyp + start, len);
        }
      }
      grad_scale[c] = static_cast<T>((sum_gy_u + static_cast<double>(n) * gl_sum / g64) * scales.dg[c]);
      grad_offset[c] = static_cast<T>(sum_gy);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> coupling_affine_permute_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& grad_logdet, const at::Tensor& x, const at::Tensor& a,
    const at::Tensor& global_scale, const at::Tensor& perm, double clamp, c10::string_view clamp_form,
    c10::string_view affine_type) {
  check_coupling_affine_permute_bwd(grad_y, grad_logdet, x, a, global_scale, perm, clamp);
  const int64_t form = parse_clamp_form(clamp_form);
  const int64_t type = parse_affine_type(affine_type);
  const int64_t batch = x.size(0), channels = x.size(1), n = x.size(2) * x.size(3);
  at::Tensor grad_x = new_output(x.sizes(), x.options());
  at::Tensor grad_a = new_output(a.sizes(), a.options());
  at::Tensor grad_scale = new_output(global_scale.sizes(), global_scale.options());
  at::Tensor grad_offset = new_output(global_scale.sizes(), global_scale.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coupling_affine_permute_bwd_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const ChannelScales scales = channel_scales<scalar_t>(global_scale, type);
    dispatch_clamp_form(form, [&](auto form_tag) {
      constexpr int64_t FORM = decltype(form_tag)::value;
      coupling_affine_permute_bwd_kernel<scalar_t, FORM>(
          grad_y.data_ptr<scalar_t>(), grad_logdet.data_ptr<T>(), x.data_ptr<scalar_t>(),
          a.data_ptr<scalar_t>(), scales, perm.data_ptr<int64_t>(), grad_x.data_ptr<scalar_t>(),
          grad_a.data_ptr<scalar_t>(), grad_scale.data_ptr<T>(), grad_offset.data_ptr<T>(), batch, channels, n,
          clamp);
    });
  });
  return {grad_x, grad_a, grad_scale, grad_offset};
}

}  // namespace

}  // namespace coupling
}  // namespace msflow_fast

TORCH_LIBRARY_FRAGMENT(msflow_fast, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def("affine_coupling_fwd(Tensor x, Tensor a, float clamp, str clamp_form) -> (Tensor, Tensor)", tags);
  m.def("affine_coupling_inv(Tensor x, Tensor a, float clamp, str clamp_form) -> (Tensor, Tensor)", tags);
  m.def(
      "affine_coupling_bwd(Tensor grad_y, Tensor grad_logdet, Tensor x, Tensor a, float clamp, str clamp_form, "
      "bool reverse) -> (Tensor, Tensor)",
      tags);
  m.def(
      "global_affine_permute_fwd(Tensor x, Tensor global_scale, Tensor global_offset, Tensor perm, "
      "str affine_type) -> (Tensor, Tensor)",
      tags);
  m.def(
      "global_affine_permute_inv(Tensor x, Tensor global_scale, Tensor global_offset, Tensor perm, "
      "str affine_type) -> (Tensor, Tensor)",
      tags);
  m.def(
      "global_affine_permute_bwd(Tensor grad_y, Tensor grad_logdet, Tensor x, Tensor global_scale, "
      "Tensor global_offset, Tensor perm, str affine_type, bool reverse) -> (Tensor, Tensor, Tensor)",
      tags);
  m.def(
      "coupling_affine_permute_fwd(Tensor x, Tensor a, Tensor global_scale, Tensor global_offset, Tensor perm, "
      "float clamp, str clamp_form, str affine_type) -> (Tensor, Tensor)",
      tags);
  m.def(
      "coupling_affine_permute_bwd(Tensor grad_y, Tensor grad_logdet, Tensor x, Tensor a, Tensor global_scale, "
      "Tensor perm, float clamp, str clamp_form, str affine_type) -> (Tensor, Tensor, Tensor, Tensor)",
      tags);
}

TORCH_LIBRARY_IMPL(msflow_fast, CPU, m) {
  using namespace msflow_fast::coupling;
  m.impl("affine_coupling_fwd", &affine_coupling_fwd_cpu);
  m.impl("affine_coupling_inv", &affine_coupling_inv_cpu);
  m.impl("affine_coupling_bwd", &affine_coupling_bwd_cpu);
  m.impl("global_affine_permute_fwd", &global_affine_permute_fwd_cpu);
  m.impl("global_affine_permute_inv", &global_affine_permute_inv_cpu);
  m.impl("global_affine_permute_bwd", &global_affine_permute_bwd_cpu);
  m.impl("coupling_affine_permute_fwd", &coupling_affine_permute_fwd_cpu);
  m.impl("coupling_affine_permute_bwd", &coupling_affine_permute_bwd_cpu);
}
