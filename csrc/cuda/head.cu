// Likelihood and anomaly-map ops: CUDA kernels (schemas and CPU kernels in csrc/head.cpp).
// half/bfloat16/float32 inputs accumulate in float32, float64 inputs in float64.
//
// FastFlow map: one block per image converts each scale's maps to the acc type and takes
// P = exp(L + log_offset) on the low-res grid (counting NaNs); one thread per output pixel then
// walks every scale (up to kMaxFastflowScales, passed by value) for the map -mean_k Up(P_k)
// (align_corners=False) and, for the log-space score, the exact logsumexp of log w + L over the
// scales' taps (max over taps of nonzero weight, then sum of w exp(L - max)); per-block maxima and
// NaN counts, reduced per image by one block (deterministic: maxima, integer counts).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common.h"
#include "reduce.cuh"

namespace msflow_fast {

// Shared with csrc/head.cpp.
void check_per_sample(const at::Tensor& z, const at::Tensor& per_sample, const char* name);
void check_log_likelihood_map(const at::Tensor& z);
void check_log_likelihood_map_bwd(const at::Tensor& grad, const at::Tensor& z);
void check_head_maps(at::TensorList maps, at::IntArrayRef output_size, double top_k);
int64_t head_top_k_count(int64_t num_pixels, double top_k);
void check_fastflow_maps(at::TensorList maps, at::IntArrayRef output_size, double log_offset);

namespace {

using namespace cuda_reduce;  // warp/block sums and maxima (reduce.cuh)

// Launches put the batch on gridDim.y, which CUDA caps at 65535.
void check_batch_fits_grid(int64_t batch) {
  TORCH_CHECK(batch <= 65535, "msflow_fast: the CUDA head kernels support at most 65535 images per call, got ", batch,
              "; split the batch");
}

constexpr int kThreads = 256;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block_reduce needs whole warps, at most 1024 threads");
constexpr int kSelectThreads = 1024;
static_assert(kSelectThreads % 32 == 0 && kSelectThreads <= 1024, "block_reduce needs whole warps, at most 1024 threads");
constexpr int kMaxScales = 4;
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
constexpr int64_t kNllChunk = 1 << 16;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------- NLL

// partial[b, s] = sum_{n in chunk s} z[b, n]^2
template <typename scalar_t, typename acc_t>
__global__ void gaussian_nll_partial_kernel(const scalar_t* __restrict__ z, acc_t* __restrict__ partial, int64_t N,
                                            int64_t chunk) {
  const int64_t b = blockIdx.y, s = blockIdx.x;
  const int64_t lo = s * chunk, hi = min(N, lo + chunk);
  const scalar_t* row = z + b * N;
  acc_t acc = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const acc_t v = static_cast<acc_t>(row[i]);
    acc += v * v;
  }
  acc = block_reduce_sum(acc);
  if (threadIdx.x == 0) partial[b * gridDim.x + s] = acc;
}

// nll[b] = 0.5 * sum_s partial[b, s] - logdet[b]
template <typename acc_t>
__global__ void gaussian_nll_reduce_kernel(const acc_t* __restrict__ partial, const acc_t* __restrict__ logdet,
                                           acc_t* __restrict__ out, int64_t splits) {
  const int64_t b = blockIdx.x;
  acc_t acc = 0;
  for (int64_t s = threadIdx.x; s < splits; s += blockDim.x) acc += partial[b * splits + s];
  acc = block_reduce_sum(acc);
  if (threadIdx.x == 0) out[b] = acc_t(0.5) * acc - logdet[b];
}

// dz[b, n] = grad[b] * z[b, n]
template <typename scalar_t, typename acc_t>
__global__ void gaussian_nll_bwd_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ z,
                                        scalar_t* __restrict__ dz, int64_t N, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dz[i] = static_cast<scalar_t>(grad[i / N] * static_cast<acc_t>(z[i]));
  }
}

// ---------------------------------------------------------------------------- log-likelihood map

// out[b, n] = -0.5 * (sum_c z[b, c, n]^2) / C
template <typename scalar_t, typename acc_t>
__global__ void log_likelihood_map_fwd_kernel(const scalar_t* __restrict__ z, acc_t* __restrict__ out, int64_t C,
                                              int64_t N, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / N, n = i % N;
    const scalar_t* p = z + b * C * N + n;
    acc_t acc = 0;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(p[c * N]);
      acc += v * v;
    }
    out[i] = acc_t(-0.5) * (acc / static_cast<acc_t>(C));
  }
}

// dz[b, c, n] = -grad[b, n] * z[b, c, n] / C
template <typename scalar_t, typename acc_t>
__global__ void log_likelihood_map_bwd_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ z,
                                              scalar_t* __restrict__ dz, int64_t C, int64_t N, int64_t total) {
  const acc_t scale = acc_t(-1) / static_cast<acc_t>(C);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i % N, b = i / (C * N);
    dz[i] = static_cast<scalar_t>(scale * grad[b * N + n] * static_cast<acc_t>(z[i]));
  }
}

// ----------------------------------------------------------------------------------- aggregation

template <typename acc_t>
struct ScaleGroup {
  const acc_t* logp[kMaxScales];
  const acc_t* prob[kMaxScales];
  int64_t h[kMaxScales];
  int64_t w[kMaxScales];
  int count;
};

// logp_acc[b] = logp[b] in acc_t; prob[b] = exp(logp[b] - max logp[b]) (optional), one block per image
template <typename scalar_t, typename acc_t>
__global__ void scale_probability_kernel(const scalar_t* __restrict__ logp, acc_t* __restrict__ logp_acc,
                                         acc_t* __restrict__ prob, int64_t n) {
  const int64_t base = blockIdx.x * n;
  __shared__ acc_t shared_max;
  acc_t mx = -INFINITY;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t v = static_cast<acc_t>(logp[base + i]);
    logp_acc[base + i] = v;
    mx = max(mx, v);
  }
  mx = block_reduce_max(mx);
  if (threadIdx.x == 0) shared_max = mx;
  __syncthreads();
  if (prob == nullptr) return;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) prob[base + i] = exp(logp_acc[base + i] - shared_max);
}

template <typename acc_t>
__device__ __forceinline__ void bilinear_taps(int64_t o, int64_t in_size, int64_t out_size, int64_t& i0, int64_t& i1,
                                              acc_t& lambda) {
  const acc_t scale = out_size > 1 ? static_cast<acc_t>(in_size - 1) / static_cast<acc_t>(out_size - 1) : acc_t(0);
  const acc_t src = scale * static_cast<acc_t>(o);
  i0 = min(static_cast<int64_t>(src), in_size - 1);
  lambda = min(max(src - static_cast<acc_t>(i0), acc_t(0)), acc_t(1));
  i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
}

// L = sum_k Up(L_k) and S = sum_k Up(P_k) per output pixel, plus per-block maxima [B, blocks, 2]
template <typename acc_t>
__global__ void aggregate_anomaly_maps_fwd_kernel(ScaleGroup<acc_t> group, acc_t* __restrict__ sum_log,
                                                  acc_t* __restrict__ sum_prob, acc_t* __restrict__ block_max,
                                                  int64_t H, int64_t W, bool accumulate) {
  const int64_t b = blockIdx.y, N = H * W;
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  acc_t lsum = -INFINITY, psum = -INFINITY;
  if (n < N) {
    const int64_t oy = n / W, ox = n % W;
    lsum = accumulate ? sum_log[b * N + n] : acc_t(0);
    psum = (accumulate && sum_prob != nullptr) ? sum_prob[b * N + n] : acc_t(0);
    for (int k = 0; k < group.count; ++k) {
      int64_t y0, y1, x0, x1;
      acc_t ly, lx;
      bilinear_taps(oy, group.h[k], H, y0, y1, ly);
      bilinear_taps(ox, group.w[k], W, x0, x1, lx);
      const int64_t base = b * group.h[k] * group.w[k];
      const int64_t i00 = base + y0 * group.w[k] + x0, i01 = base + y0 * group.w[k] + x1;
      const int64_t i10 = base + y1 * group.w[k] + x0, i11 = base + y1 * group.w[k] + x1;
      const acc_t hy0 = acc_t(1) - ly, wx0 = acc_t(1) - lx;
      const acc_t* lp = group.logp[k];
      lsum += hy0 * (wx0 * lp[i00] + lx * lp[i01]) + ly * (wx0 * lp[i10] + lx * lp[i11]);
      if (sum_prob != nullptr) {
        const acc_t* pp = group.prob[k];
        psum += hy0 * (wx0 * pp[i00] + lx * pp[i01]) + ly * (wx0 * pp[i10] + lx * pp[i11]);
      }
    }
    sum_log[b * N + n] = lsum;
    if (sum_prob != nullptr) sum_prob[b * N + n] = psum;
  }
  const acc_t lmax = block_reduce_max(lsum);
  const acc_t pmax = block_reduce_max(psum);
  if (threadIdx.x == 0) {
    const int64_t slot = (b * gridDim.x + blockIdx.x) * 2;
    block_max[slot] = lmax;
    block_max[slot + 1] = pmax;
  }
}

// image_max[b, j] = max over blocks of block_max[b, :, j]
template <typename acc_t>
__global__ void image_max_kernel(const acc_t* __restrict__ block_max, acc_t* __restrict__ image_max, int64_t blocks) {
  const int64_t b = blockIdx.x;
  acc_t lmax = -INFINITY, pmax = -INFINITY;
  for (int64_t i = threadIdx.x; i < blocks; i += blockDim.x) {
    lmax = max(lmax, block_max[(b * blocks + i) * 2]);
    pmax = max(pmax, block_max[(b * blocks + i) * 2 + 1]);
  }
  lmax = block_reduce_max(lmax);
  pmax = block_reduce_max(pmax);
  if (threadIdx.x == 0) {
    image_max[b * 2] = lmax;
    image_max[b * 2 + 1] = pmax;
  }
}

// add = max S - S; mul = 1 - exp(L - max L) (max P = exp(0) = 1); or mul = max L - L when log_space
template <typename out_t, typename acc_t>
__global__ void anomaly_maps_finish_kernel(const acc_t* __restrict__ sum_log, const acc_t* __restrict__ sum_prob,
                                           const acc_t* __restrict__ image_max, out_t* __restrict__ map_add,
                                           out_t* __restrict__ map_mul, int64_t N, bool log_space) {
  const int64_t b = blockIdx.y;
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  const int64_t i = b * N + n;
  const acc_t lmax = image_max[b * 2];
  if (log_space) {
    map_mul[i] = static_cast<out_t>(lmax - sum_log[i]);
  } else {
    map_mul[i] = static_cast<out_t>(acc_t(1) - exp(sum_log[i] - lmax));
  }
  if (sum_prob != nullptr) map_add[i] = static_cast<out_t>(image_max[b * 2 + 1] - sum_prob[i]);
}

__device__ __forceinline__ uint32_t to_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint64_t to_bits(double v) { return static_cast<uint64_t>(__double_as_longlong(v)); }
__device__ __forceinline__ float from_bits(uint32_t v) { return __uint_as_float(v); }
__device__ __forceinline__ double from_bits(uint64_t v) { return __longlong_as_double(static_cast<long long>(v)); }

// out[b] = mean of the k largest values[b, :] (negatives read as 0): radix select of the k-th value v
// on the bit patterns, then (sum of values > v + (k - count > v) * v) / k; NaN if the row holds a NaN
// (as topk). One block per image.
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kSelectThreads) top_k_mean_kernel(const in_t* __restrict__ values, in_t* __restrict__ out, int64_t N, int64_t k) {
  using bits_t = decltype(to_bits(acc_t(0)));
  constexpr int kBits = sizeof(bits_t) * 8;
  __shared__ unsigned int hist[kRadixBins];
  __shared__ bits_t prefix, known;
  __shared__ int64_t remaining;
  const in_t* row = values + blockIdx.x * N;
  if (threadIdx.x == 0) {
    prefix = 0;
    known = 0;
    remaining = k;
  }
  for (int shift = kBits - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int i = threadIdx.x; i < kRadixBins; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    const bits_t want = prefix, mask = known;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      const acc_t v = static_cast<acc_t>(row[i]);
      const bits_t bits = to_bits(v > acc_t(0) ? v : acc_t(0));
      if ((bits & mask) == want) atomicAdd(&hist[(bits >> shift) & (kRadixBins - 1)], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t above = 0;
      int digit = kRadixBins - 1;
      for (; digit > 0; --digit) {
        if (above + hist[digit] >= remaining) break;
        above += hist[digit];
      }
      remaining -= above;
      prefix |= static_cast<bits_t>(digit) << shift;
      known |= static_cast<bits_t>(kRadixBins - 1) << shift;
    }
    __syncthreads();
  }
  const acc_t kth = from_bits(prefix);
  acc_t total = 0;
  long long count = 0, nans = 0;  // exact at any N (a float count is not past 2^24)
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const acc_t v = static_cast<acc_t>(row[i]);
    const acc_t x = v > acc_t(0) ? v : acc_t(0);
    if (x > kth) {
      total += x;
      ++count;
    }
    if (v != v) ++nans;
  }
  total = block_reduce_sum(total);
  count = block_reduce_sum(count);
  nans = block_reduce_sum(nans);
  if (threadIdx.x == 0) {
    const acc_t mean = (total + static_cast<acc_t>(k - count) * kth) / static_cast<acc_t>(k);
    out[blockIdx.x] = static_cast<in_t>(nans > 0 ? acc_t(NAN) : mean);
  }
}

// ------------------------------------------------------------------------------------ FastFlow map

constexpr int kMaxFastflowScales = 32;

struct FastflowScales {
  int64_t offset[kMaxFastflowScales];  // first value of scale k in an image's [T] buffers
  int64_t h[kMaxFastflowScales];
  int64_t w[kMaxFastflowScales];
  double scale_y[kMaxFastflowScales];  // h / H and w / W, in double
  double scale_x[kMaxFastflowScales];
  int count;
};

// logp_acc[b, offset:offset+n] = L[b] in acc_t, prob[...] = exp(L[b] + log_offset); nans[b] = NaN count
template <typename scalar_t, typename acc_t>
__global__ void fastflow_exp_kernel(const scalar_t* __restrict__ logp, acc_t* __restrict__ logp_acc,
                                    acc_t* __restrict__ prob, int* __restrict__ nans, int64_t n, int64_t T,
                                    int64_t offset, acc_t log_offset) {
  const int64_t b = blockIdx.x;
  int count = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t v = static_cast<acc_t>(logp[b * n + i]);
    logp_acc[b * T + offset + i] = v;
    prob[b * T + offset + i] = exp(v + log_offset);
    count += v != v ? 1 : 0;
  }
  count = block_reduce_sum(count);
  if (threadIdx.x == 0) nans[b] = count;
}

// align_corners=False source taps of output index o, in double with the rounding of
// reference.bilinear_taps (src = max(0, (o + 0.5) * scale - 0.5), no FMA), so a weight is exactly
// zero where the reference's is; the identity when in == out. Weights in acc_t.
template <typename acc_t>
__device__ __forceinline__ void half_pixel_taps(int64_t o, int64_t in_size, int64_t out_size, double scale,
                                                int64_t& i0, int64_t& i1, acc_t& w0, acc_t& w1) {
  if (in_size == out_size) {
    i0 = i1 = o;
    w0 = acc_t(1);
    w1 = acc_t(0);
    return;
  }
  const double src = fmax(__dsub_rn(__dmul_rn(static_cast<double>(o) + 0.5, scale), 0.5), 0.0);
  i0 = min(static_cast<int64_t>(src), in_size - 1);
  const double lambda = src - static_cast<double>(i0);
  i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  w0 = static_cast<acc_t>(1.0 - lambda);
  w1 = static_cast<acc_t>(lambda);
}

// map = -mean_k Up(P_k); nats = -(logsumexp_{k, taps}(log w + L_k) + nats_shift), nats_shift = log_offset - log K;
// block_max[b, block] = (max map, max nats, NaN count)
template <typename scalar_t, typename acc_t>
__global__ void fastflow_anomaly_map_fwd_kernel(const acc_t* __restrict__ logp, const acc_t* __restrict__ prob,
                                                FastflowScales scales, int64_t T, int64_t H, int64_t W,
                                                scalar_t* __restrict__ map_out, acc_t* __restrict__ block_max,
                                                bool log_space, acc_t nats_shift) {
  const int64_t b = blockIdx.y, N = H * W;
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  acc_t map_value = -INFINITY, nats = -INFINITY;
  int nans = 0;
  if (n < N) {
    const int64_t oy = n / W, ox = n % W;
    const acc_t* lb = logp + b * T;
    const acc_t* pb = prob + b * T;
    acc_t sum = 0, top = -INFINITY;
    for (int k = 0; k < scales.count; ++k) {
      int64_t y0, y1, x0, x1;
      acc_t hy0, hy1, wx0, wx1;
      half_pixel_taps(oy, scales.h[k], H, scales.scale_y[k], y0, y1, hy0, hy1);
      half_pixel_taps(ox, scales.w[k], W, scales.scale_x[k], x0, x1, wx0, wx1);
      const int64_t base = scales.offset[k], w = scales.w[k];
      const int64_t i00 = base + y0 * w + x0, i01 = base + y0 * w + x1, i10 = base + y1 * w + x0, i11 = base + y1 * w + x1;
      sum += hy0 * (wx0 * pb[i00] + wx1 * pb[i01]) + hy1 * (wx0 * pb[i10] + wx1 * pb[i11]);
      if (log_space) {
        if (hy0 * wx0 > acc_t(0)) top = max(top, lb[i00]);
        if (hy0 * wx1 > acc_t(0)) top = max(top, lb[i01]);
        if (hy1 * wx0 > acc_t(0)) top = max(top, lb[i10]);
        if (hy1 * wx1 > acc_t(0)) top = max(top, lb[i11]);
      }
    }
    map_value = -sum / static_cast<acc_t>(scales.count);
    map_out[b * N + n] = static_cast<scalar_t>(map_value);
    nans += map_value != map_value ? 1 : 0;
    if (log_space) {
      const bool finite = isfinite(top);
      const acc_t shift = finite ? top : acc_t(0);
      acc_t total = 0;
      for (int k = 0; k < scales.count; ++k) {
        int64_t y0, y1, x0, x1;
        acc_t hy0, hy1, wx0, wx1;
        half_pixel_taps(oy, scales.h[k], H, scales.scale_y[k], y0, y1, hy0, hy1);
        half_pixel_taps(ox, scales.w[k], W, scales.scale_x[k], x0, x1, wx0, wx1);
        const int64_t base = scales.offset[k], w = scales.w[k];
        const acc_t q[4] = {hy0 * wx0, hy0 * wx1, hy1 * wx0, hy1 * wx1};
        const int64_t idx[4] = {base + y0 * w + x0, base + y0 * w + x1, base + y1 * w + x0, base + y1 * w + x1};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (q[j] > acc_t(0)) total += q[j] * exp(lb[idx[j]] - shift);
        }
      }
      nats = -((finite ? top + log(total) : top) + nats_shift);
      nans += nats != nats ? 1 : 0;
    }
  }
  map_value = block_reduce_max(map_value);
  nats = block_reduce_max(nats);
  nans = block_reduce_sum(nans);
  if (threadIdx.x == 0) {
    acc_t* slot = block_max + (b * gridDim.x + blockIdx.x) * 3;
    slot[0] = map_value;
    slot[1] = nats;
    slot[2] = static_cast<acc_t>(nans);
  }
}

// score[b] = max map, score_log[b] = max nats; NaN where the image's maps or map hold a NaN
template <typename scalar_t, typename acc_t>
__global__ void fastflow_scores_kernel(const acc_t* __restrict__ block_max, const int* __restrict__ input_nans,
                                       int64_t blocks, int64_t B, int scale_count, scalar_t* __restrict__ score,
                                       scalar_t* __restrict__ score_log) {
  const int64_t b = blockIdx.x;
  acc_t map_max = -INFINITY, nats_max = -INFINITY, nans = 0;
  for (int64_t i = threadIdx.x; i < blocks; i += blockDim.x) {
    const acc_t* slot = block_max + (b * blocks + i) * 3;
    map_max = max(map_max, slot[0]);
    nats_max = max(nats_max, slot[1]);
    nans += slot[2];
  }
  map_max = block_reduce_max(map_max);
  nats_max = block_reduce_max(nats_max);
  nans = block_reduce_sum(nans);
  if (threadIdx.x == 0) {
    for (int k = 0; k < scale_count; ++k) nans += static_cast<acc_t>(input_nans[k * B + b]);
    score[b] = static_cast<scalar_t>(nans > acc_t(0) ? acc_t(NAN) : map_max);
    if (score_log != nullptr) score_log[b] = static_cast<scalar_t>(nans > acc_t(0) ? acc_t(NAN) : nats_max);
  }
}

// Fills sum_log (and sum_prob) [B, H*W] and image_max [B, 2] from the per-scale maps.
template <typename scalar_t, typename acc_t>
void upsampled_sums(at::TensorList maps, int64_t H, int64_t W, bool with_prob, at::Tensor& sum_log,
                    at::Tensor& sum_prob, at::Tensor& image_max, cudaStream_t stream) {
  const int64_t B = maps[0].size(0), N = H * W;
  const auto acc_options = maps[0].options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  std::vector<at::Tensor> logp_acc, prob;
  for (const auto& m : maps) {
    const at::Tensor mc = m.contiguous();
    const int64_t n = mc.size(1) * mc.size(2);
    logp_acc.push_back(at::empty(mc.sizes(), acc_options));
    prob.push_back(with_prob ? at::empty(mc.sizes(), acc_options) : at::Tensor());
    scale_probability_kernel<scalar_t, acc_t><<<B, kThreads, 0, stream>>>(
        mc.data_ptr<scalar_t>(), logp_acc.back().data_ptr<acc_t>(),
        with_prob ? prob.back().data_ptr<acc_t>() : nullptr, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t blocks = ceil_div(N, kThreads);
  sum_log = at::empty({B, N}, acc_options);
  sum_prob = with_prob ? at::empty({B, N}, acc_options) : at::Tensor();
  at::Tensor block_max = at::empty({B, blocks, 2}, acc_options);
  for (size_t first = 0; first < maps.size(); first += kMaxScales) {
    ScaleGroup<acc_t> group{};
    group.count = static_cast<int>(std::min<size_t>(kMaxScales, maps.size() - first));
    for (int k = 0; k < group.count; ++k) {
      group.logp[k] = logp_acc[first + k].data_ptr<acc_t>();
      group.prob[k] = with_prob ? prob[first + k].data_ptr<acc_t>() : nullptr;
      group.h[k] = maps[first + k].size(1);
      group.w[k] = maps[first + k].size(2);
    }
    aggregate_anomaly_maps_fwd_kernel<acc_t><<<dim3(blocks, B), kThreads, 0, stream>>>(
        group, sum_log.data_ptr<acc_t>(), with_prob ? sum_prob.data_ptr<acc_t>() : nullptr,
        block_max.data_ptr<acc_t>(), H, W, first > 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  image_max = at::empty({B, 2}, acc_options);
  image_max_kernel<acc_t><<<B, kThreads, 0, stream>>>(block_max.data_ptr<acc_t>(), image_max.data_ptr<acc_t>(),
                                                       blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int launch_blocks(int64_t total) { return static_cast<int>(std::min<int64_t>(ceil_div(total, kThreads), 65535 * 8)); }

// score[b] = top-k mean of max L - L (nats) from the upsampled log sums L [B, N] and per-image maxima.
template <typename acc_t>
void log_space_top_k(const at::Tensor& sum_log, const at::Tensor& image_max, int64_t B, int64_t N, int64_t k,
                     at::Tensor& score, cudaStream_t stream) {
  at::Tensor gap = at::empty({B, N}, sum_log.options());
  anomaly_maps_finish_kernel<acc_t, acc_t><<<dim3(ceil_div(N, kThreads), B), kThreads, 0, stream>>>(
      sum_log.data_ptr<acc_t>(), nullptr, image_max.data_ptr<acc_t>(), nullptr, gap.data_ptr<acc_t>(), N,
      /*log_space=*/true);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor score_acc = at::empty({B}, sum_log.options());
  top_k_mean_kernel<acc_t, acc_t><<<B, kSelectThreads, 0, stream>>>(gap.data_ptr<acc_t>(),
                                                                     score_acc.data_ptr<acc_t>(), N, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  score.copy_(score_acc);
}

}  // namespace

// --------------------------------------------------------------------------------- host functions

at::Tensor gaussian_nll_fwd_cuda(const at::Tensor& z, const at::Tensor& logdet) {
  check_per_sample(z, logdet, "logdet");
  const c10::cuda::CUDAGuard guard(z.device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t B = z.size(0);
  const int64_t N = B > 0 ? z.numel() / B : 0;
  const auto acc_type = acc_dtype(z.scalar_type());
  const at::Tensor zc = z.contiguous();
  const at::Tensor ld = logdet.to(acc_type).contiguous();
  at::Tensor out = new_output({B}, z.options().dtype(acc_type));
  if (B == 0) return out;
  check_batch_fits_grid(B);
  const int64_t splits = std::max<int64_t>(1, ceil_div(N, kNllChunk));
  const int64_t chunk = std::max<int64_t>(1, ceil_div(N, splits));
  at::Tensor partial = at::empty({B, splits}, out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "gaussian_nll_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gaussian_nll_partial_kernel<scalar_t, acc_t><<<dim3(splits, B), kThreads, 0, stream>>>(
        zc.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), N, chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gaussian_nll_reduce_kernel<acc_t><<<B, kThreads, 0, stream>>>(partial.data_ptr<acc_t>(), ld.data_ptr<acc_t>(),
                                                                  out.data_ptr<acc_t>(), splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gaussian_nll_bwd_cuda(const at::Tensor& grad, const at::Tensor& z) {
  check_per_sample(z, grad, "grad");
  const c10::cuda::CUDAGuard guard(z.device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t B = z.size(0), total = z.numel();
  const int64_t N = B > 0 ? total / B : 0;
  const at::Tensor zc = z.contiguous();
  const at::Tensor g = grad.to(acc_dtype(z.scalar_type())).contiguous();
  at::Tensor out = new_output(z.sizes(), zc.options());
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "gaussian_nll_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gaussian_nll_bwd_kernel<scalar_t, acc_t><<<launch_blocks(total), kThreads, 0, stream>>>(
        g.data_ptr<acc_t>(), zc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor log_likelihood_map_fwd_cuda(const at::Tensor& z) {
  check_log_likelihood_map(z);
  const c10::cuda::CUDAGuard guard(z.device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t B = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3), N = H * W;
  const at::Tensor zc = z.contiguous();
  at::Tensor out = new_output({B, H, W}, z.options().dtype(acc_dtype(z.scalar_type())));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "log_likelihood_map_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    log_likelihood_map_fwd_kernel<scalar_t, acc_t><<<launch_blocks(B * N), kThreads, 0, stream>>>(
        zc.data_ptr<scalar_t>(), out.data_ptr<acc_t>(), C, N, B * N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor log_likelihood_map_bwd_cuda(const at::Tensor& grad, const at::Tensor& z) {
  check_log_likelihood_map_bwd(grad, z);
  const int64_t B = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3), N = H * W;
  const c10::cuda::CUDAGuard guard(z.device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor zc = z.contiguous();
  const at::Tensor g = grad.to(acc_dtype(z.scalar_type())).contiguous();
  at::Tensor out = new_output(z.sizes(), zc.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "log_likelihood_map_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    log_likelihood_map_bwd_kernel<scalar_t, acc_t><<<launch_blocks(out.numel()), kThreads, 0, stream>>>(
        g.data_ptr<acc_t>(), zc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), C, N, out.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aggregate_anomaly_maps_fwd_cuda(
    at::TensorList maps, at::IntArrayRef output_size, double top_k, bool log_space_score) {
  check_head_maps(maps, output_size, top_k);
  check_batch_fits_grid(maps[0].size(0));
  const c10::cuda::CUDAGuard guard(maps[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t B = maps[0].size(0), H = output_size[0], W = output_size[1], N = H * W;
  const auto options = maps[0].options();
  at::Tensor map_add = new_output({B, H, W}, options);
  at::Tensor map_mul = new_output({B, H, W}, options);
  at::Tensor score = new_output({B}, options);
  at::Tensor score_log = new_output({log_space_score ? B : 0}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps[0].scalar_type(), "aggregate_anomaly_maps_fwd_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor sum_log, sum_prob, image_max;
    upsampled_sums<scalar_t, acc_t>(maps, H, W, /*with_prob=*/true, sum_log, sum_prob, image_max, stream);
    anomaly_maps_finish_kernel<scalar_t, acc_t><<<dim3(ceil_div(N, kThreads), B), kThreads, 0, stream>>>(
        sum_log.data_ptr<acc_t>(), sum_prob.data_ptr<acc_t>(), image_max.data_ptr<acc_t>(),
        map_add.data_ptr<scalar_t>(), map_mul.data_ptr<scalar_t>(), N, /*log_space=*/false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    top_k_mean_kernel<scalar_t, acc_t><<<B, kSelectThreads, 0, stream>>>(
        map_mul.data_ptr<scalar_t>(), score.data_ptr<scalar_t>(), N, head_top_k_count(N, top_k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (log_space_score) {
      log_space_top_k<acc_t>(sum_log, image_max, B, N, head_top_k_count(N, top_k), score_log, stream);
    }
  });
  return {map_add, map_mul, score, score_log};
}

at::Tensor log_space_score_fwd_cuda(at::TensorList maps, at::IntArrayRef output_size, double top_k) {
  check_head_maps(maps, output_size, top_k);
  check_batch_fits_grid(maps[0].size(0));
  const c10::cuda::CUDAGuard guard(maps[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t B = maps[0].size(0), H = output_size[0], W = output_size[1], N = H * W;
  at::Tensor score = new_output({B}, maps[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps[0].scalar_type(), "log_space_score_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor sum_log, sum_prob, image_max;
    upsampled_sums<scalar_t, acc_t>(maps, H, W, /*with_prob=*/false, sum_log, sum_prob, image_max, stream);
    log_space_top_k<acc_t>(sum_log, image_max, B, N, head_top_k_count(N, top_k), score, stream);
  });
  return score;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fastflow_anomaly_map_fwd_cuda(at::TensorList maps,
                                                                              at::IntArrayRef output_size,
                                                                              bool log_space_score, double log_offset) {
  check_fastflow_maps(maps, output_size, log_offset);
  check_batch_fits_grid(maps[0].size(0));
  TORCH_CHECK(static_cast<int64_t>(maps.size()) <= kMaxFastflowScales, "msflow_fast: the CUDA FastFlow map supports at most ",
              kMaxFastflowScales, " scales per call, got ", maps.size());
  const c10::cuda::CUDAGuard guard(maps[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t B = maps[0].size(0), H = output_size[0], W = output_size[1], N = H * W;
  const int K = static_cast<int>(maps.size());
  const auto options = maps[0].options();
  at::Tensor anomaly_map = new_output({B, H, W}, options);
  at::Tensor score = new_output({B}, options);
  at::Tensor score_log = new_output({log_space_score ? B : 0}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps[0].scalar_type(), "fastflow_anomaly_map_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = options.dtype(c10::CppTypeToScalarType<acc_t>::value);
    FastflowScales scales{};
    scales.count = K;
    int64_t T = 0;
    for (int k = 0; k < K; ++k) {
      scales.offset[k] = T;
      scales.h[k] = maps[k].size(1);
      scales.w[k] = maps[k].size(2);
      scales.scale_y[k] = static_cast<double>(scales.h[k]) / static_cast<double>(H);
      scales.scale_x[k] = static_cast<double>(scales.w[k]) / static_cast<double>(W);
      T += scales.h[k] * scales.w[k];
    }
    at::Tensor logp = at::empty({B, T}, acc_options);
    at::Tensor prob = at::empty({B, T}, acc_options);
    at::Tensor input_nans = at::empty({K, B}, options.dtype(at::kInt));
    for (int k = 0; k < K; ++k) {
      const at::Tensor m = maps[k].contiguous();
      fastflow_exp_kernel<scalar_t, acc_t><<<B, kThreads, 0, stream>>>(
          m.data_ptr<scalar_t>(), logp.data_ptr<acc_t>(), prob.data_ptr<acc_t>(), input_nans.data_ptr<int>() + k * B,
          scales.h[k] * scales.w[k], T, scales.offset[k], static_cast<acc_t>(log_offset));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t blocks = ceil_div(N, kThreads);
    at::Tensor block_max = at::empty({B, blocks, 3}, acc_options);
    const acc_t nats_shift = static_cast<acc_t>(log_offset - std::log(static_cast<double>(K)));
    fastflow_anomaly_map_fwd_kernel<scalar_t, acc_t><<<dim3(blocks, B), kThreads, 0, stream>>>(
        logp.data_ptr<acc_t>(), prob.data_ptr<acc_t>(), scales, T, H, W, anomaly_map.data_ptr<scalar_t>(),
        block_max.data_ptr<acc_t>(), log_space_score, nats_shift);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fastflow_scores_kernel<scalar_t, acc_t><<<B, kThreads, 0, stream>>>(
        block_max.data_ptr<acc_t>(), input_nans.data_ptr<int>(), blocks, B, K, score.data_ptr<scalar_t>(),
        log_space_score ? score_log.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {anomaly_map, score, score_log};
}

}  // namespace msflow_fast

TORCH_LIBRARY_IMPL(msflow_fast, CUDA, m) {
  m.impl("gaussian_nll_fwd", &msflow_fast::gaussian_nll_fwd_cuda);
  m.impl("gaussian_nll_bwd", &msflow_fast::gaussian_nll_bwd_cuda);
  m.impl("log_likelihood_map_fwd", &msflow_fast::log_likelihood_map_fwd_cuda);
  m.impl("log_likelihood_map_bwd", &msflow_fast::log_likelihood_map_bwd_cuda);
  m.impl("aggregate_anomaly_maps_fwd", &msflow_fast::aggregate_anomaly_maps_fwd_cuda);
  m.impl("log_space_score_fwd", &msflow_fast::log_space_score_fwd_cuda);
  m.impl("fastflow_anomaly_map_fwd", &msflow_fast::fastflow_anomaly_map_fwd_cuda);
}
