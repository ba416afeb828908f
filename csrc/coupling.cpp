// Flow-block ops: soft-clamped affine coupling, global affine + channel permutation, and the
// fused block tail (coupling -> global affine -> permutation). Schemas, shared argument checks
// and CPU kernels; CUDA kernels live in csrc/cuda/coupling.cu. The maths is
// msflow_fast/ops/reference.py.
//
// Layout: NCHW contiguous, N = H * W. Per (b, c) plane the N elements are contiguous; the
// subnet output a = [a_s, a_t] has 2 * C_active channels (scale half, then shift half).
// Log-dets are accumulated in double per plane (small planes: per sample and channel range),
// then summed per sample in a fixed order (deterministic). Parameter gradients are reduced per
// channel in double.
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
#include <limits>
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

// The CPU maths policy of coupling_math.h for the element loops: the vectorisable approximations of
// cpu_math.h (float: exp_approx / tanh_approx / atan_approx; double: exp_f64 / tanh_f64 / atan_f64,
// within about 1 ulp of std::).
struct CpuMath {
  static float exp(float v) { return exp_approx(v); }
  static double exp(double v) { return exp_f64(v); }
  static float tanh(float v) { return tanh_approx(v); }
  static double tanh(double v) { return tanh_f64(v); }
  static float atan(float v) { return atan_approx(v); }
  static double atan(double v) { return atan_f64(v); }
};

// The policy for the per-channel scales (double, once per channel): std::, with log1p(v) as
// log(1 + v) from v = 1 up (softplus calls it on e^z > 0; as accurate there, several times cheaper).
struct ScaleMath {
  static double exp(double v) { return std::exp(v); }
  static double log1p(double v) { return v >= 1.0 ? std::log(1.0 + v) : std::log1p(v); }
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
  return coupling::global_scale_and_grad<ScaleMath>(gamma, affine_type, dg);
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

// ---------------------------------------------------------------------------------------------
// Small planes (N = H * W < kSmallPlane: fibers [B, C, 1, 1], small maps). Per-plane loops would
// spend their time on loop overhead, so the kernels take tiles of whole samples x a channel range,
// fixed by the shape alone (results do not depend on the thread count). A sample's channels are
// adjacent, so a tile is one vectorised loop across channels and pixels, in chunks of whole
// channels (at most kChunk elements); per-element tables (SmallTables) give the per-channel
// parameters and the element's place on the permuted side, which is read or written through them.
// Log-dets: a double sum per (sample, channel range), added in range order; parameter gradients:
// per-channel double sums per sample block, added in block order.

constexpr int64_t kSmallPlane = 64;
// The global affine has no per-element maths to vectorise across channels: its plane loops are as
// fast from this many pixels.
constexpr int64_t kSmallAffinePlane = 16;
constexpr int64_t kTileGrain = 16384;  // elements per tile
static_assert(kSmallPlane <= kChunk, "a chunk holds at least one whole small plane");

// (empty planes take the plane loops; element offsets within a sample are int32 in the tables below)
bool small_planes(int64_t channels, int64_t n, int64_t limit = kSmallPlane) {
  return n >= 1 && n < limit && channels * n <= std::numeric_limits<int32_t>::max();
}

// Tiles of `samples` samples x `channels` channels: whole samples when a sample is smaller than
// kTileGrain elements, else one sample x a channel range.
struct Tiling {
  int64_t samples;
  int64_t channels;
  int64_t sample_blocks;
  int64_t channel_blocks;
};

Tiling small_tiling(int64_t batch, int64_t channels, int64_t n) {
  const int64_t per_sample = std::max<int64_t>(1, channels * n);
  Tiling t;
  if (per_sample >= kTileGrain) {
    t.samples = 1;
    t.channels = std::min(channels, std::max<int64_t>(1, kTileGrain / n));
  } else {
    t.samples = std::max<int64_t>(1, kTileGrain / per_sample);
    t.channels = std::max<int64_t>(channels, 1);
  }
  t.sample_blocks = (batch + t.samples - 1) / t.samples;
  t.channel_blocks = (channels + t.channels - 1) / std::max<int64_t>(t.channels, 1);
  return t;
}

// fn(b0, b1, c0, c1, sample_block, channel_block) for every tile, tiles in parallel.
template <typename Fn>
void for_each_tile(const Tiling& t, int64_t batch, int64_t channels, const Fn& fn) {
  at::parallel_for(0, t.sample_blocks * t.channel_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t sb = u / t.channel_blocks;
      const int64_t cb = u % t.channel_blocks;
      fn(sb * t.samples, std::min(batch, (sb + 1) * t.samples), cb * t.channels,
         std::min(channels, (cb + 1) * t.channels), sb, cb);
    }
  });
}

// fn(c0, c1) for chunks [c0, c1) of [begin, end) of at most kChunk / n channels, none straddling `split`.
template <typename Fn>
inline void for_each_chunk(int64_t begin, int64_t end, int64_t n, int64_t split, const Fn& fn) {
  const int64_t step = std::max<int64_t>(1, kChunk / n);
  for (int64_t c0 = begin; c0 < end;) {
    const int64_t limit = c0 < split ? std::min(split, end) : end;
    const int64_t c1 = std::min(limit, c0 + step);
    fn(c0, c1);
    c0 = c1;
  }
}

// Sums of short runs (a channel's n < kSmallPlane pixels) in double: in order below kShortRun
// elements, where a vectorised reduction costs more than it saves, else chunk_dot / chunk_sum.
constexpr int64_t kShortRun = 16;

template <typename A, typename B>
inline double run_dot(const A* a, const B* b, int64_t n) {
  if (n >= kShortRun) return chunk_dot(a, b, n);
  double sum = 0.0;
  for (int64_t k = 0; k < n; ++k) sum += static_cast<double>(a[k]) * static_cast<double>(b[k]);
  return sum;
}

template <typename A>
inline double run_sum(const A* a, int64_t n) {
  if (n >= kShortRun) return chunk_sum(a, n);
  double sum = 0.0;
  for (int64_t k = 0; k < n; ++k) sum += static_cast<double>(a[k]);
  return sum;
}

// acc[c] += sum_k a[(c - c0) * n + k] * b[(c - c0) * n + k] (in double) for c in [c0, c1)
template <typename A, typename B>
inline void channel_dots(const A* a, const B* b, int64_t c0, int64_t c1, int64_t n, double* acc) {
  if (n == 1) {
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) acc[c] += static_cast<double>(a[c - c0]) * static_cast<double>(b[c - c0]);
    return;
  }
  for (int64_t c = c0; c < c1; ++c) acc[c] += run_dot(a + (c - c0) * n, b + (c - c0) * n, n);
}

// acc[c] += sum_k a[(c - c0) * n + k] (in double) for c in [c0, c1)
template <typename A>
inline void channel_sums(const A* a, int64_t c0, int64_t c1, int64_t n, double* acc) {
  if (n == 1) {
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) acc[c] += static_cast<double>(a[c - c0]);
    return;
  }
  for (int64_t c = c0; c < c1; ++c) acc[c] += run_sum(a + (c - c0) * n, n);
}

// Per-channel sums of a small-plane backward: per sample block sb, two [C] double vectors at
// sums[2 sb C] and sums[(2 sb + 1) C]. fn(j, first, second) with their totals over the blocks,
// added in block order.
template <typename Fn>
void reduce_sample_blocks(const std::vector<double>& sums, int64_t blocks, int64_t channels, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, kTileGrain / std::max<int64_t>(blocks, 1));
  at::parallel_for(0, channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      double first = 0.0, second = 0.0;
      for (int64_t sb = 0; sb < blocks; ++sb) {
        first += sums[(2 * sb) * channels + j];
        second += sums[(2 * sb + 1) * channels + j];
      }
      fn(j, first, second);
    }
  });
}

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
  std::vector<double> log_g(static_cast<size_t>(channels));
  // ~20 ns a channel: in parallel for wide layers, then summed in channel order
  at::parallel_for(0, channels, 512, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      out.g[c] = global_scale_and_grad(static_cast<double>(gamma[c]), affine_type, out.dg[c]);
      log_g[c] = std::log(out.g[c]);
    }
  });
  for (int64_t c = 0; c < channels; ++c) out.log_sum += log_g[c];
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

// x-order element tables of the small-plane kernels of the permuted ops. A sample's element
// e = j * n + k (x channel j, pixel k) sits at to[e] = dest[j] * n + k on the permuted side and
// uses g[e], offset[e], the values of the parameter channel of x channel j:
//   forward (y[:, i] = v[:, p[i]]): x channel c -> y channel p^-1[c], parameters of c;
//   reverse (y[:, p[i]] = v(x[:, i])): x channel i -> y channel p[i], parameters of p[i].
template <typename T>
struct SmallTables {
  std::vector<int32_t> to;
  std::vector<T> g;
  std::vector<T> offset;  // empty when no offset is given

  SmallTables(const ChannelScales& scales, const T* off, const int64_t* perm, int64_t channels, int64_t n,
              bool reverse)
      : to(static_cast<size_t>(channels * n)),
        g(static_cast<size_t>(channels * n)),
        offset(off ? static_cast<size_t>(channels * n) : 0) {
    std::vector<int64_t> dest(perm, perm + channels);
    if (!reverse) {
      for (int64_t i = 0; i < channels; ++i) dest[perm[i]] = i;
    }
    for (int64_t j = 0; j < channels; ++j) {
      const int64_t c = reverse ? perm[j] : j;
      const T gc = static_cast<T>(scales.g[c]);
      for (int64_t k = 0; k < n; ++k) {
        to[j * n + k] = static_cast<int32_t>(dest[j] * n + k);
        g[j * n + k] = gc;
        if (off) offset[j * n + k] = off[c];
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// affine coupling

// Forward: y = x e^s + t; reverse: y = (x - t) e^-s, over len contiguous elements with s, t from
// a_s, a_t; returns sum s in double.
template <typename scalar_t, int64_t FORM, bool REVERSE>
inline double couple_span(const scalar_t* xp, const scalar_t* a_s, const scalar_t* a_t, scalar_t* yp, int64_t len,
                          double clamp) {
  using T = at::opmath_type<scalar_t>;
  const T alpha = static_cast<T>(clamp);
  const T k = shift_factor<FORM, T>();
  double sum = 0.0;
  T s_chunk[kChunk];
  for (int64_t start = 0; start < len; start += kChunk) {
    const int64_t m = std::min<int64_t>(kChunk, len - start);
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      const T s = soft_clamp<FORM>(static_cast<T>(a_s[start + i]), alpha);
      const T t = k * static_cast<T>(a_t[start + i]);
      const T xv = static_cast<T>(xp[start + i]);
      yp[start + i] = static_cast<scalar_t>(REVERSE ? (xv - t) * CpuMath::exp(-s) : xv * CpuMath::exp(s) + t);
      s_chunk[i] = s;
    }
    sum += chunk_sum(s_chunk, m);
  }
  return sum;
}

// partial[b * C + c] = sum s over plane (b, c)
template <typename scalar_t, int64_t FORM, bool REVERSE>
void affine_coupling_kernel(const scalar_t* x, const scalar_t* a, scalar_t* y, double* partial, int64_t batch,
                            int64_t channels, int64_t n, double clamp) {
  at::parallel_for(0, batch * channels, plane_grain(n), [=](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / channels;
      const int64_t c = p % channels;
      const scalar_t* a_s = a + (b * 2 * channels + c) * n;
      partial[p] = couple_span<scalar_t, FORM, REVERSE>(x + p * n, a_s, a_s + channels * n, y + p * n, n, clamp);
    }
  });
}

// Small planes: partial[b * R + r] = sum s over channel range r of sample b (R ranges).
template <typename scalar_t, int64_t FORM, bool REVERSE>
void affine_coupling_small_kernel(const scalar_t* x, const scalar_t* a, scalar_t* y, double* partial,
                                  const Tiling& tiling, int64_t batch, int64_t channels, int64_t n, double clamp) {
  for_each_tile(tiling, batch, channels, [&](int64_t b0, int64_t b1, int64_t c0, int64_t c1, int64_t, int64_t r) {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* a_s = a + (b * 2 * channels + c0) * n;
      const int64_t offset = (b * channels + c0) * n;
      partial[b * tiling.channel_blocks + r] = couple_span<scalar_t, FORM, REVERSE>(
          x + offset, a_s, a_s + channels * n, y + offset, (c1 - c0) * n, clamp);
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
  const bool small = small_planes(channels, n);
  const Tiling tiling = small_tiling(batch, channels, n);
  const int64_t ranges = small ? tiling.channel_blocks : channels;  // log-det partial sums per sample
  std::vector<double> partial(static_cast<size_t>(batch * ranges));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_coupling_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    dispatch_clamp_form(form, [&](auto form_tag) {
      constexpr int64_t FORM = decltype(form_tag)::value;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* ap = a.data_ptr<scalar_t>();
      scalar_t* yp = y.data_ptr<scalar_t>();
      if (small && reverse) {
        affine_coupling_small_kernel<scalar_t, FORM, true>(xp, ap, yp, partial.data(), tiling, batch, channels, n,
                                                           clamp);
      } else if (small) {
        affine_coupling_small_kernel<scalar_t, FORM, false>(xp, ap, yp, partial.data(), tiling, batch, channels, n,
                                                            clamp);
      } else if (reverse) {
        affine_coupling_kernel<scalar_t, FORM, true>(xp, ap, yp, partial.data(), batch, channels, n, clamp);
      } else {
        affine_coupling_kernel<scalar_t, FORM, false>(xp, ap, yp, partial.data(), batch, channels, n, clamp);
      }
    });
    reduce_planes(partial.data(), batch, ranges, reverse ? -1.0 : 1.0, 0.0, logdet.data_ptr<T>());
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
inline void couple_bwd_span(const scalar_t* gyp, const scalar_t* xp, const scalar_t* a_s, const scalar_t* a_t,
                            scalar_t* gxp, scalar_t* grad_as, scalar_t* grad_at, int64_t len,
                            at::opmath_type<scalar_t> gl, double clamp) {
  using T = at::opmath_type<scalar_t>;
  const T alpha = static_cast<T>(clamp);
  const T k = shift_factor<FORM, T>();
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    T ds;
    const T s = soft_clamp_and_grad<FORM>(static_cast<T>(a_s[i]), alpha, ds);
    const T gy = static_cast<T>(gyp[i]);
    const T xv = static_cast<T>(xp[i]);
    if constexpr (REVERSE) {
      const T e = CpuMath::exp(-s);
      const T yv = (xv - k * static_cast<T>(a_t[i])) * e;
      gxp[i] = static_cast<scalar_t>(gy * e);
      grad_as[i] = static_cast<scalar_t>(-(gy * yv + gl) * ds);
      grad_at[i] = static_cast<scalar_t>(-k * gy * e);
    } else {
      const T e = CpuMath::exp(s);
      gxp[i] = static_cast<scalar_t>(gy * e);
      grad_as[i] = static_cast<scalar_t>((gy * xv * e + gl) * ds);
      grad_at[i] = static_cast<scalar_t>(k * gy);
    }
  }
}

// Per plane (b, c) of n pixels, or (small planes) per tile row: channels [c0, c1) of sample b.
template <typename scalar_t, int64_t FORM, bool REVERSE>
void affine_coupling_bwd_kernel(const scalar_t* grad_y, const at::opmath_type<scalar_t>* grad_logdet, const scalar_t* x,
                                const scalar_t* a, scalar_t* grad_x, scalar_t* grad_a, int64_t batch,
                                int64_t channels, int64_t n, double clamp) {
  using T = at::opmath_type<scalar_t>;
  const auto rows = [&](int64_t b, int64_t c0, int64_t c1) {
    const int64_t offset = (b * channels + c0) * n;
    const int64_t a_offset = (b * 2 * channels + c0) * n;
    couple_bwd_span<scalar_t, FORM, REVERSE>(grad_y + offset, x + offset, a + a_offset, a + a_offset + channels * n,
                                             grad_x + offset, grad_a + a_offset, grad_a + a_offset + channels * n,
                                             (c1 - c0) * n, static_cast<T>(grad_logdet[b]), clamp);
  };
  if (small_planes(channels, n)) {
    for_each_tile(small_tiling(batch, channels, n), batch, channels,
                  [&](int64_t b0, int64_t b1, int64_t c0, int64_t c1, int64_t, int64_t) {
                    for (int64_t b = b0; b < b1; ++b) rows(b, c0, c1);
                  });
    return;
  }
  at::parallel_for(0, batch * channels, plane_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) rows(p / channels, p % channels, p % channels + 1);
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

// Small planes: each tile in x's order, written to its places through the tables: one loop across
// channels for n == 1, else per channel (no compute to vectorise across channels).
template <typename scalar_t, bool REVERSE>
void global_affine_permute_small_kernel(const scalar_t* x, const SmallTables<at::opmath_type<scalar_t>>& tables,
                                        scalar_t* y, int64_t batch, int64_t channels, int64_t n) {
  using T = at::opmath_type<scalar_t>;
  const int64_t len = channels * n;
  const int32_t* to = tables.to.data();
  const T* g = tables.g.data();
  const T* offset = tables.offset.data();
  const auto affine = [](T xv, T gv, T ov) { return static_cast<scalar_t>(REVERSE ? (xv - ov) / gv : xv * gv + ov); };
  for_each_tile(small_tiling(batch, channels, n), batch, channels,
                [&](int64_t b0, int64_t b1, int64_t c0, int64_t c1, int64_t, int64_t) {
                  for (int64_t b = b0; b < b1; ++b) {
                    const scalar_t* xb = x + b * len;
                    scalar_t* yb = y + b * len;
                    if (n == 1) {
#pragma omp simd
                      for (int64_t j = c0; j < c1; ++j) yb[to[j]] = affine(static_cast<T>(xb[j]), g[j], offset[j]);
                      continue;
                    }
                    for (int64_t j = c0; j < c1; ++j) {
                      const scalar_t* xp = xb + j * n;
                      scalar_t* yp = yb + to[j * n];
                      const T gj = g[j * n];
                      const T oj = offset[j * n];
#pragma omp simd
                      for (int64_t k = 0; k < n; ++k) yp[k] = affine(static_cast<T>(xp[k]), gj, oj);
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
    const int64_t* p = perm.data_ptr<int64_t>();
    if (small_planes(channels, n, kSmallAffinePlane)) {
      const SmallTables<T> tables(scales, global_offset.data_ptr<T>(), p, channels, n, reverse);
      if (reverse) {
        global_affine_permute_small_kernel<scalar_t, true>(x.data_ptr<scalar_t>(), tables, y.data_ptr<scalar_t>(),
                                                           batch, channels, n);
      } else {
        global_affine_permute_small_kernel<scalar_t, false>(x.data_ptr<scalar_t>(), tables, y.data_ptr<scalar_t>(),
                                                            batch, channels, n);
      }
    } else if (reverse) {
      global_affine_permute_kernel<scalar_t, true>(x.data_ptr<scalar_t>(), scales, global_offset.data_ptr<T>(), p,
                                                   y.data_ptr<scalar_t>(), batch, channels, n);
    } else {
      global_affine_permute_kernel<scalar_t, false>(x.data_ptr<scalar_t>(), scales, global_offset.data_ptr<T>(), p,
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

// Small planes, in x's order through the tables (as global_affine_permute_small_kernel); x channel j
// has parameter channel j (forward) or p[j] (reverse). Per-channel sums per sample block.
template <typename scalar_t, bool REVERSE>
void global_affine_permute_bwd_small_kernel(const scalar_t* grad_y, const at::opmath_type<scalar_t>* grad_logdet,
                                            const scalar_t* x, const ChannelScales& scales,
                                            const SmallTables<at::opmath_type<scalar_t>>& tables,
                                            const int64_t* perm, scalar_t* grad_x,
                                            at::opmath_type<scalar_t>* grad_scale,
                                            at::opmath_type<scalar_t>* grad_offset, int64_t batch, int64_t channels,
                                            int64_t n) {
  using T = at::opmath_type<scalar_t>;
  const int64_t len = channels * n;
  const int32_t* to = tables.to.data();
  const T* g = tables.g.data();
  const T* offset = tables.offset.data();
  // gx and the factor of gy in dg: x (forward) or the reverse map's output (x - b) / g
  const auto grads = [](T gy, T xv, T gv, T ov, T& v) {
    v = REVERSE ? (xv - ov) / gv : xv;
    return static_cast<scalar_t>(REVERSE ? gy / gv : gy * gv);
  };
  const Tiling tiling = small_tiling(batch, channels, n);
  std::vector<double> sums(static_cast<size_t>(2 * tiling.sample_blocks * channels), 0.0);  // sum gy v | sum gy
  for_each_tile(tiling, batch, channels, [&](int64_t b0, int64_t b1, int64_t c0, int64_t c1, int64_t sb, int64_t) {
    double* sum_gy_v = sums.data() + 2 * sb * channels;
    double* sum_gy = sum_gy_v + channels;
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* gyb = grad_y + b * len;
      const scalar_t* xb = x + b * len;
      scalar_t* gxb = grad_x + b * len;
      if (n == 1) {
#pragma omp simd
        for (int64_t j = c0; j < c1; ++j) {
          const T gy = static_cast<T>(gyb[to[j]]);
          T v;
          gxb[j] = grads(gy, static_cast<T>(xb[j]), g[j], REVERSE ? offset[j] : T(0), v);
          sum_gy_v[j] += static_cast<double>(gy) * static_cast<double>(v);
          sum_gy[j] += static_cast<double>(gy);
        }
        continue;
      }
      for (int64_t j = c0; j < c1; ++j) {
        const scalar_t* gyp = gyb + to[j * n];
        const scalar_t* xp = xb + j * n;
        scalar_t* gxp = gxb + j * n;
        const T gj = g[j * n];
        const T oj = REVERSE ? offset[j * n] : T(0);
        T v_run[kSmallPlane];
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) gxp[k] = grads(static_cast<T>(gyp[k]), static_cast<T>(xp[k]), gj, oj, v_run[k]);
        sum_gy_v[j] += REVERSE ? run_dot(gyp, v_run, n) : run_dot(gyp, xp, n);
        sum_gy[j] += run_sum(gyp, n);
      }
    }
  });
  double gl_sum = 0.0;
  for (int64_t b = 0; b < batch; ++b) gl_sum += static_cast<double>(grad_logdet[b]);
  const double hw_gl = static_cast<double>(n) * gl_sum;
  reduce_sample_blocks(sums, tiling.sample_blocks, channels, [&](int64_t j, double sum_gy_v, double sum_gy) {
    const int64_t c = REVERSE ? perm[j] : j;
    const double g64 = scales.g[c];
    const double dg = REVERSE ? -(sum_gy_v + hw_gl) / g64 : sum_gy_v + hw_gl / g64;
    grad_scale[c] = static_cast<T>(dg * scales.dg[c]);
    grad_offset[c] = static_cast<T>(REVERSE ? -sum_gy / g64 : sum_gy);
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
    if (small_planes(channels, n, kSmallAffinePlane)) {
      const int64_t* p = perm.data_ptr<int64_t>();
      const SmallTables<T> tables(scales, reverse ? global_offset.data_ptr<T>() : nullptr, p, channels, n, reverse);
      if (reverse) {
        global_affine_permute_bwd_small_kernel<scalar_t, true>(
            grad_y.data_ptr<scalar_t>(), grad_logdet.data_ptr<T>(), x.data_ptr<scalar_t>(), scales, tables, p,
            grad_x.data_ptr<scalar_t>(), grad_scale.data_ptr<T>(), grad_offset.data_ptr<T>(), batch, channels, n);
      } else {
        global_affine_permute_bwd_small_kernel<scalar_t, false>(
            grad_y.data_ptr<scalar_t>(), grad_logdet.data_ptr<T>(), x.data_ptr<scalar_t>(), scales, tables, p,
            grad_x.data_ptr<scalar_t>(), grad_scale.data_ptr<T>(), grad_offset.data_ptr<T>(), batch, channels, n);
      }
    } else if (reverse) {
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
          const T u = static_cast<T>(static_cast<scalar_t>(static_cast<T>(xp[start + k]) * CpuMath::exp(s) +
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

// Small planes: each tile's elements in x's order, written to their places in y through the tables
// (forward tables); partial[b * R + r] = sum s over channel range r of sample b (R ranges).
template <typename scalar_t, int64_t FORM>
void coupling_affine_permute_small_kernel(const scalar_t* x, const scalar_t* a,
                                          const SmallTables<at::opmath_type<scalar_t>>& tables, scalar_t* y,
                                          double* partial, const Tiling& tiling, int64_t batch, int64_t channels,
                                          int64_t n, double clamp) {
  using T = at::opmath_type<scalar_t>;
  const int64_t active = channels / 2;
  const int64_t passive = channels - active;
  const int64_t len = channels * n;
  const T alpha = static_cast<T>(clamp);
  const T kt = shift_factor<FORM, T>();
  for_each_tile(tiling, batch, channels, [&](int64_t b0, int64_t b1, int64_t c0, int64_t c1, int64_t, int64_t r) {
    T s_chunk[kChunk];
    for (int64_t b = b0; b < b1; ++b) {
      scalar_t* yb = y + b * len;
      double sum = 0.0;
      for_each_chunk(c0, c1, n, passive, [&](int64_t j0, int64_t j1) {
        const int64_t e0 = j0 * n;
        const int64_t m = (j1 - j0) * n;
        const int32_t* to = tables.to.data() + e0;
        const T* g = tables.g.data() + e0;
        const T* offset = tables.offset.data() + e0;
        const scalar_t* xc = x + b * len + e0;
        if (j0 < passive) {
#pragma omp simd
          for (int64_t k = 0; k < m; ++k) yb[to[k]] = static_cast<scalar_t>(static_cast<T>(xc[k]) * g[k] + offset[k]);
          return;
        }
        const scalar_t* a_s = a + (b * 2 * active + (j0 - passive)) * n;
        const scalar_t* a_t = a_s + active * n;
#pragma omp simd
        for (int64_t k = 0; k < m; ++k) {
          const T s = soft_clamp<FORM>(static_cast<T>(a_s[k]), alpha);
          // u rounded to scalar_t like the unfused composition
          const T u = static_cast<T>(
              static_cast<scalar_t>(static_cast<T>(xc[k]) * CpuMath::exp(s) + kt * static_cast<T>(a_t[k])));
          yb[to[k]] = static_cast<scalar_t>(u * g[k] + offset[k]);
          s_chunk[k] = s;
        }
        sum += chunk_sum(s_chunk, m);
      });
      partial[b * tiling.channel_blocks + r] = sum;
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
  const bool small = small_planes(channels, n);
  const Tiling tiling = small_tiling(batch, channels, n);
  const int64_t ranges = small ? tiling.channel_blocks : channels;  // log-det partial sums per sample
  std::vector<double> partial(static_cast<size_t>(batch * ranges));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coupling_affine_permute_fwd_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const ChannelScales scales = channel_scales<scalar_t>(global_scale, type);
    const int64_t* p = perm.data_ptr<int64_t>();
    dispatch_clamp_form(form, [&](auto form_tag) {
      constexpr int64_t FORM = decltype(form_tag)::value;
      if (small) {
        const SmallTables<T> tables(scales, global_offset.data_ptr<T>(), p, channels, n, false);
        coupling_affine_permute_small_kernel<scalar_t, FORM>(x.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), tables,
                                                             y.data_ptr<scalar_t>(), partial.data(), tiling, batch,
                                                             channels, n, clamp);
      } else {
        coupling_affine_permute_kernel<scalar_t, FORM>(x.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), scales,
                                                       global_offset.data_ptr<T>(), p, y.data_ptr<scalar_t>(),
                                                       partial.data(), batch, channels, n, clamp);
      }
    });
    reduce_planes(partial.data(), batch, ranges, 1.0, static_cast<double>(n) * scales.log_sum, logdet.data_ptr<T>());
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
            const T e = CpuMath::exp(s);
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

// Small planes, in x's order with gy read through the (forward) tables; per-channel sums per
// sample block (see reduce_sample_blocks).
template <typename scalar_t, int64_t FORM>
void coupling_affine_permute_bwd_small_kernel(const scalar_t* grad_y, const at::opmath_type<scalar_t>* grad_logdet,
                                              const scalar_t* x, const scalar_t* a, const ChannelScales& scales,
                                              const SmallTables<at::opmath_type<scalar_t>>& tables, scalar_t* grad_x,
                                              scalar_t* grad_a, at::opmath_type<scalar_t>* grad_scale,
                                              at::opmath_type<scalar_t>* grad_offset, int64_t batch, int64_t channels,
                                              int64_t n, double clamp) {
  using T = at::opmath_type<scalar_t>;
  const int64_t active = channels / 2;
  const int64_t passive = channels - active;
  const int64_t len = channels * n;
  const T alpha = static_cast<T>(clamp);
  const T kt = shift_factor<FORM, T>();
  const Tiling tiling = small_tiling(batch, channels, n);
  std::vector<double> sums(static_cast<size_t>(2 * tiling.sample_blocks * channels), 0.0);  // sum gy u | sum gy
  for_each_tile(tiling, batch, channels, [&](int64_t b0, int64_t b1, int64_t c0, int64_t c1, int64_t sb, int64_t) {
    double* sum_gy_u = sums.data() + 2 * sb * channels;
    double* sum_gy = sum_gy_u + channels;
    scalar_t gy_chunk[kChunk];
    T u_chunk[kChunk];
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* gyb = grad_y + b * len;
      const T gl = static_cast<T>(grad_logdet[b]);
      for_each_chunk(c0, c1, n, passive, [&](int64_t j0, int64_t j1) {
        const int64_t e0 = j0 * n;
        const int64_t m = (j1 - j0) * n;
        const int32_t* to = tables.to.data() + e0;
        const T* g = tables.g.data() + e0;
        const scalar_t* xc = x + b * len + e0;
        scalar_t* gxc = grad_x + b * len + e0;
        if (j0 < passive) {
#pragma omp simd
          for (int64_t k = 0; k < m; ++k) {
            const scalar_t gy = gyb[to[k]];
            gy_chunk[k] = gy;
            gxc[k] = static_cast<scalar_t>(static_cast<T>(gy) * g[k]);
          }
          channel_dots(gy_chunk, xc, j0, j1, n, sum_gy_u);
        } else {
          const int64_t a_offset = (b * 2 * active + (j0 - passive)) * n;
          const scalar_t* a_s = a + a_offset;
          const scalar_t* a_t = a_s + active * n;
          scalar_t* grad_as = grad_a + a_offset;
          scalar_t* grad_at = grad_as + active * n;
#pragma omp simd
          for (int64_t k = 0; k < m; ++k) {
            const scalar_t gy = gyb[to[k]];
            gy_chunk[k] = gy;
            const T gu = static_cast<T>(gy) * g[k];
            const T xv = static_cast<T>(xc[k]);
            T ds;
            const T s = soft_clamp_and_grad<FORM>(static_cast<T>(a_s[k]), alpha, ds);
            const T e = CpuMath::exp(s);
            u_chunk[k] = xv * e + kt * static_cast<T>(a_t[k]);
            gxc[k] = static_cast<scalar_t>(gu * e);
            grad_as[k] = static_cast<scalar_t>((gu * xv * e + gl) * ds);
            grad_at[k] = static_cast<scalar_t>(kt * gu);
          }
          channel_dots(gy_chunk, u_chunk, j0, j1, n, sum_gy_u);
        }
        channel_sums(gy_chunk, j0, j1, n, sum_gy);
      });
    }
  });
  double gl_sum = 0.0;
  for (int64_t b = 0; b < batch; ++b) gl_sum += static_cast<double>(grad_logdet[b]);
  reduce_sample_blocks(sums, tiling.sample_blocks, channels, [&](int64_t c, double sum_gy_u, double sum_gy) {
    grad_scale[c] = static_cast<T>((sum_gy_u + static_cast<double>(n) * gl_sum / scales.g[c]) * scales.dg[c]);
    grad_offset[c] = static_cast<T>(sum_gy);
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
      if (small_planes(channels, n)) {
        const SmallTables<T> tables(scales, nullptr, perm.data_ptr<int64_t>(), channels, n, false);
        coupling_affine_permute_bwd_small_kernel<scalar_t, FORM>(
            grad_y.data_ptr<scalar_t>(), grad_logdet.data_ptr<T>(), x.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
            scales, tables, grad_x.data_ptr<scalar_t>(), grad_a.data_ptr<scalar_t>(), grad_scale.data_ptr<T>(),
            grad_offset.data_ptr<T>(), batch, channels, n, clamp);
      } else {
        coupling_affine_permute_bwd_kernel<scalar_t, FORM>(
            grad_y.data_ptr<scalar_t>(), grad_logdet.data_ptr<T>(), x.data_ptr<scalar_t>(),
            a.data_ptr<scalar_t>(), scales, perm.data_ptr<int64_t>(), grad_x.data_ptr<scalar_t>(),
            grad_a.data_ptr<scalar_t>(), grad_scale.data_ptr<T>(), grad_offset.data_ptr<T>(), batch, channels, n,
            clamp);
      }
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
