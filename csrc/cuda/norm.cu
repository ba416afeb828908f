// Norm ops: CUDA kernels of the fused channel LayerNorm + ReLU and of the per-sample LayerNorm
// (schemas, argument checks and CPU kernels in csrc/norm.cpp). half/bfloat16/float32 compute in
// float32, float64 in float64.
//
// Channel LayerNorm + ReLU. Forward and grad_x: one thread per pixel (b, n) walks the channels;
// consecutive threads own consecutive pixels, so every channel row is read coalesced (the rows of a
// block stay in L1/L2 across the passes). Parameter gradients: one block per (channel, pixel split)
// reduces over its pixels into a partial sum, and the splits are summed afterwards (deterministic,
// no atomics).
//
// Per-sample LayerNorm over N = numel / B values. Statistics: one block per (chunk of
// kSampleChunk values, sample) computes the chunk's two-pass mean and M2 (the chunk stays in L1/L2
// between the passes); one thread per sample merges its chunks in a fixed order in double; then a
// grid-stride element-wise pass normalises. Backward: the same split for the per-sample sums of
// gx = grad * weight and gx * xhat, merged per sample; then one thread per column n walks the
// batch, writing grad_x and summing grad_weight[n], grad_bias[n] over b in order. No atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "common.h"
#include "reduce.cuh"

namespace msflow_fast {

// Shared with csrc/norm.cpp.
void check_layer_norm_relu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           const c10::optional<at::Tensor>& addend, double eps, bool allow_channels_last);
void check_layer_norm_relu_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, const c10::optional<at::Tensor>& addend,
                               const at::Tensor& mean, const at::Tensor& rstd);
void check_sample_layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, double eps);
void check_sample_layer_norm_bwd(const at::Tensor& grad, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                 const at::Tensor& mean, const at::Tensor& rstd);

namespace {

using cuda_reduce::block_reduce_sum;

constexpr int kThreads = 256;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block_reduce needs whole warps, at most 1024 threads");
constexpr int64_t kMaxSplits = 64;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// v = x[c] + addend[c] along one pixel's channel column (stride N).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_channel(const scalar_t* x, const scalar_t* add, int64_t offset) {
  acc_t v = static_cast<acc_t>(x[offset]);
  if (add != nullptr) v += static_cast<acc_t>(add[offset]);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void layer_norm_relu_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ add,
                                           const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                           scalar_t* __restrict__ out, acc_t* __restrict__ mean_out,
                                           acc_t* __restrict__ rstd_out, int64_t total, int64_t C, int64_t N,
                                           int64_t add_batch_stride, acc_t eps) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t b = i / N, n = i - b * N;
  const scalar_t* xp = x + b * C * N + n;
  const scalar_t* ap = add != nullptr ? add + b * add_batch_stride + n : nullptr;
  acc_t sum = 0;
  for (int64_t c = 0; c < C; ++c) sum += load_channel<scalar_t, acc_t>(xp, ap, c * N);
  const acc_t mean = sum / static_cast<acc_t>(C);
  acc_t squares = 0;
  for (int64_t c = 0; c < C; ++c) {  // two-pass variance: no cancellation
    const acc_t d = load_channel<scalar_t, acc_t>(xp, ap, c * N) - mean;
    squares += d * d;
  }
  const acc_t rstd = acc_t(1) / sqrt(squares / static_cast<acc_t>(C) + eps);
  mean_out[i] = mean;
  rstd_out[i] = rstd;
  scalar_t* op = out + b * C * N + n;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t y = (load_channel<scalar_t, acc_t>(xp, ap, c * N) - mean) * rstd * weight[c] + bias[c];
    op[c * N] = static_cast<scalar_t>(y > acc_t(0) ? y : acc_t(0));
  }
}

// grad_x = rstd * (gx - mean_C(gx) - xhat * mean_C(gx * xhat)), gx = grad * (y > 0) * weight.
template <typename scalar_t, typename acc_t>
__global__ void layer_norm_relu_bwd_input_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                                 const scalar_t* __restrict__ add, const acc_t* __restrict__ weight,
                                                 const acc_t* __restrict__ bias, const acc_t* __restrict__ mean_in,
                                                 const acc_t* __restrict__ rstd_in, scalar_t* __restrict__ grad_x,
                                                 int64_t total, int64_t C, int64_t N, int64_t add_batch_stride) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t b = i / N, n = i - b * N;
  const int64_t base = b * C * N + n;
  const scalar_t* xp = x + base;
  const scalar_t* ap = add != nullptr ? add + b * add_batch_stride + n : nullptr;
  const acc_t mean = mean_in[i], rstd = rstd_in[i];
  acc_t s1 = 0, s2 = 0;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xhat = (load_channel<scalar_t, acc_t>(xp, ap, c * N) - mean) * rstd;
    const acc_t gx = xhat * weight[c] + bias[c] > acc_t(0) ? static_cast<acc_t>(grad[base + c * N]) * weight[c] : acc_t(0);
    s1 += gx;
    s2 += gx * xhat;
  }
  s1 /= static_cast<acc_t>(C);
  s2 /= static_cast<acc_t>(C);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xhat = (load_channel<scalar_t, acc_t>(xp, ap, c * N) - mean) * rstd;
    const acc_t gx = xhat * weight[c] + bias[c] > acc_t(0) ? static_cast<acc_t>(grad[base + c * N]) * weight[c] : acc_t(0);
    grad_x[base + c * N] = static_cast<scalar_t>(rstd * (gx - s1 - xhat * s2));
  }
}

// partial[s, 0, c] = sum over split s of g * xhat, partial[s, 1, c] = sum of g (g = grad * (y > 0)).
template <typename scalar_t, typename acc_t>
__global__ void layer_norm_relu_bwd_params_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                                  const scalar_t* __restrict__ add, const acc_t* __restrict__ weight,
                                                  const acc_t* __restrict__ bias, const acc_t* __restrict__ mean_in,
                                                  const acc_t* __restrict__ rstd_in, acc_t* __restrict__ partial,
                                                  int64_t total, int64_t C, int64_t N, int64_t add_batch_stride,
                                                  int64_t per_split) {
  const int64_t c = blockIdx.x, s = blockIdx.y;
  const int64_t first = s * per_split, last = min(total, first + per_split);
  const acc_t w = weight[c], bb = bias[c];
  acc_t sum_gxh = 0, sum_g = 0;
  for (int64_t i = first + threadIdx.x; i < last; i += blockDim.x) {
    const int64_t b = i / N, n = i - b * N;
    const int64_t offset = b * C * N + c * N + n;
    acc_t v = static_cast<acc_t>(x[offset]);
    if (add != nullptr) v += static_cast<acc_t>(add[b * add_batch_stride + c * N + n]);
    const acc_t xhat = (v - mean_in[i]) * rstd_in[i];
    const acc_t g = xhat * w + bb > acc_t(0) ? static_cast<acc_t>(grad[offset]) : acc_t(0);
    sum_gxh += g * xhat;
    sum_g += g;
  }
  sum_gxh = block_reduce_sum(sum_gxh);
  sum_g = block_reduce_sum(sum_g);
  if (threadIdx.x == 0) {
    partial[(s * 2) * C + c] = sum_gxh;
    partial[(s * 2 + 1) * C + c] = sum_g;
  }
}

// ------------------------------------------------------------------------------ per-sample norm

constexpr int64_t kSampleChunk = 2048;     // values per block of the split reductions (8 per thread)
constexpr int64_t kMaxSampleSplits = 65535;  // gridDim.x cap of the split kernels

// partial[b, s] = (mean, M2) of the values [s * chunk, min(N, (s + 1) * chunk)) of sample b (two-pass)
template <typename scalar_t, typename acc_t>
__global__ void sample_layer_norm_stats_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ partial, int64_t N,
                                               int64_t chunk) {
  const int64_t b = blockIdx.y, s = blockIdx.x, splits = gridDim.x;
  const int64_t lo = s * chunk, hi = min(N, lo + chunk);
  const scalar_t* row = x + b * N;
  __shared__ acc_t shared_mean;
  acc_t sum = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) sum += static_cast<acc_t>(row[i]);
  sum = block_reduce_sum(sum);
  if (threadIdx.x == 0) shared_mean = sum / static_cast<acc_t>(hi - lo);
  __syncthreads();
  const acc_t mean = shared_mean;
  acc_t m2 = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const acc_t d = static_cast<acc_t>(row[i]) - mean;
    m2 += d * d;
  }
  m2 = block_reduce_sum(m2);
  if (threadIdx.x == 0) {
    partial[(b * splits + s) * 2] = mean;
    partial[(b * splits + s) * 2 + 1] = m2;
  }
}

// mean[b], rstd[b] from the chunk moments of sample b (merged in order, in double)
template <typename acc_t>
__global__ void sample_layer_norm_merge_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ mean_out,
                                               acc_t* __restrict__ rstd_out, int64_t B, int64_t N, int64_t splits,
                                               int64_t chunk, double eps) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const acc_t* p = partial + b * splits * 2;
  double sum = 0.0;
  for (int64_t s = 0; s < splits; ++s) sum += static_cast<double>(min(chunk, N - s * chunk)) * static_cast<double>(p[2 * s]);
  const double mean = sum / static_cast<double>(N);
  double m2 = 0.0;
  for (int64_t s = 0; s < splits; ++s) {
    const double d = static_cast<double>(p[2 * s]) - mean;
    m2 += static_cast<double>(p[2 * s + 1]) + static_cast<double>(min(chunk, N - s * chunk)) * d * d;
  }
  mean_out[b] = static_cast<acc_t>(mean);
  rstd_out[b] = static_cast<acc_t>(1.0 / sqrt(m2 / static_cast<double>(N) + eps));
}

// out = (x - mean[b]) * rstd[b] * weight[n] + bias[n] (no affine: weight == nullptr)
template <typename scalar_t, typename acc_t>
__global__ void sample_layer_norm_fwd_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ weight,
                                             const acc_t* __restrict__ bias, const acc_t* __restrict__ mean,
                                             const acc_t* __restrict__ rstd, scalar_t* __restrict__ out, int64_t N,
                                             int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / N, n = i - b * N;
    acc_t y = (static_cast<acc_t>(x[i]) - mean[b]) * rstd[b];
    if (weight != nullptr) y = y * weight[n] + bias[n];
    out[i] = static_cast<scalar_t>(y);
  }
}

// partial[b, s] = (sum gx, sum gx * xhat) over chunk s of sample b; gx = grad * weight (or grad)
template <typename scalar_t, typename acc_t>
__global__ void sample_layer_norm_bwd_stats_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                                   const acc_t* __restrict__ weight, const acc_t* __restrict__ mean,
                                                   const acc_t* __restrict__ rstd, acc_t* __restrict__ partial,
                                                   int64_t N, int64_t chunk) {
  const int64_t b = blockIdx.y, s = blockIdx.x, splits = gridDim.x;
  const int64_t lo = s * chunk, hi = min(N, lo + chunk);
  const acc_t m = mean[b], r = rstd[b];
  acc_t s1 = 0, s2 = 0;
  for (int64_t n = lo + threadIdx.x; n < hi; n += blockDim.x) {
    const int64_t i = b * N + n;
    const acc_t xh = (static_cast<acc_t>(x[i]) - m) * r;
    acc_t gx = static_cast<acc_t>(grad[i]);
    if (weight != nullptr) gx *= weight[n];
    s1 += gx;
    s2 += gx * xh;
  }
  s1 = block_reduce_sum(s1);
  s2 = block_reduce_sum(s2);
  if (threadIdx.x == 0) {
    partial[(b * splits + s) * 2] = s1;
    partial[(b * splits + s) * 2 + 1] = s2;
  }
}

// means[b] = (mean_N gx, mean_N gx * xhat) from the chunk sums of sample b (in order, in double)
template <typename acc_t>
__global__ void sample_layer_norm_bwd_merge_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ means,
                                                   int64_t B, int64_t N, int64_t splits) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  double s1 = 0.0, s2 = 0.0;
  for (int64_t s = 0; s < splits; ++s) {
    s1 += static_cast<double>(partial[(b * splits + s) * 2]);
    s2 += static_cast<double>(partial[(b * splits + s) * 2 + 1]);
  }
  means[2 * b] = static_cast<acc_t>(s1 / static_cast<double>(N));
  means[2 * b + 1] = static_cast<acc_t>(s2 / static_cast<double>(N));
}

// grad_x = rstd * (gx - mean gx - xhat * mean(gx * xhat)); grad_weight[n] = sum_b grad * xhat, grad_bias[n] = sum_b grad
template <typename scalar_t, typename acc_t>
__global__ void sample_layer_norm_bwd_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                             const acc_t* __restrict__ weight, const acc_t* __restrict__ mean,
                                             const acc_t* __restrict__ rstd, const acc_t* __restrict__ means,
                                             scalar_t* __restrict__ grad_x, acc_t* __restrict__ grad_weight,
                                             acc_t* __restrict__ grad_bias, int64_t B, int64_t N) {
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t w = weight != nullptr ? weight[n] : acc_t(1);
    acc_t dw = 0, db = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t i = b * N + n;
      const acc_t r = rstd[b];
      const acc_t xh = (static_cast<acc_t>(x[i]) - mean[b]) * r;
      const acc_t g = static_cast<acc_t>(grad[i]);
      grad_x[i] = static_cast<scalar_t>(r * (g * w - means[2 * b] - xh * means[2 * b + 1]));
      dw += g * xh;
      db += g;
    }
    if (grad_weight != nullptr) {
      grad_weight[n] = dw;
      grad_bias[n] = db;
    }
  }
}

// Splits and chunk length of the per-sample reductions (every split non-empty).
void sample_splits(int64_t N, int64_t& splits, int64_t& chunk) {
  splits = std::min(ceil_div(N, kSampleChunk), kMaxSampleSplits);
  chunk = ceil_div(N, splits);
  splits = ceil_div(N, chunk);
}

int sample_grid(int64_t total) { return static_cast<int>(std::min<int64_t>(ceil_div(total, kThreads), 65535 * 8)); }

int64_t addend_batch_stride(const at::Tensor& x, const c10::optional<at::Tensor>& addend) {
  return addend.has_value() && addend->size(0) == x.size(0) ? x.size(1) * x.size(2) * x.size(3) : 0;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_layer_norm_relu_fwd_cuda(const at::Tensor& x,
                                                                                 const at::Tensor& weight,
                                                                                 const at::Tensor& bias,
                                                                                 const c10::optional<at::Tensor>& addend,
                                                                                 double eps) {
  check_layer_norm_relu(x, weight, bias, addend, eps, /*allow_channels_last=*/false);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3), total = B * N;
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  at::Tensor out = new_output(x.sizes(), x.options());
  at::Tensor mean = new_output({B, N}, x.options().dtype(acc));
  at::Tensor rstd = new_output({B, N}, x.options().dtype(acc));
  if (total == 0 || C == 0) return {out, mean, rstd};
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_layer_norm_relu_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    layer_norm_relu_fwd_kernel<scalar_t, acc_t><<<ceil_div(total, kThreads), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), addend.has_value() ? addend->data_ptr<scalar_t>() : nullptr, w.data_ptr<acc_t>(),
        b.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), total, C, N,
        addend_batch_stride(x, addend), static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_layer_norm_relu_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const c10::optional<at::Tensor>& addend, const at::Tensor& mean, const at::Tensor& rstd) {
  check_layer_norm_relu_bwd(grad, x, weight, bias, addend, mean, rstd);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3), total = B * N;
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  at::Tensor grad_x = new_output(x.sizes(), x.options());
  // Enough (channel, split) blocks to fill the GPU, at most kMaxSplits splits.
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({kMaxSplits, ceil_div(1024, std::max<int64_t>(C, 1)),
                                                                  ceil_div(std::max<int64_t>(total, 1), kThreads)}));
  const int64_t per_split = ceil_div(std::max<int64_t>(total, 1), splits);
  // Every (split, channel) block writes its entry; nothing to write for an empty input.
  at::Tensor partial = total > 0 && C > 0 ? at::empty({splits, 2, C}, x.options().dtype(acc))
                                          : at::zeros({splits, 2, C}, x.options().dtype(acc));
  if (total > 0 && C > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream().stream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_layer_norm_relu_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* add = addend.has_value() ? addend->data_ptr<scalar_t>() : nullptr;
      const int64_t add_stride = addend_batch_stride(x, addend);
      layer_norm_relu_bwd_input_kernel<scalar_t, acc_t><<<ceil_div(total, kThreads), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), add, w.data_ptr<acc_t>(), b.data_ptr<acc_t>(),
          mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(), total, C, N, add_stride);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      layer_norm_relu_bwd_params_kernel<scalar_t, acc_t><<<dim3(C, splits), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), add, w.data_ptr<acc_t>(), b.data_ptr<acc_t>(),
          mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), partial.data_ptr<acc_t>(), total, C, N, add_stride,
          per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor sums = partial.sum(0);  // [2, C]
  return {grad_x, sums[0].contiguous(), sums[1].contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_layer_norm_fwd_cuda(const at::Tensor& x,
                                                                           const c10::optional<at::Tensor>& weight,
                                                                           const c10::optional<at::Tensor>& bias,
                                                                           double eps) {
  check_sample_layer_norm(x, weight, bias, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), N = x.numel() / B;
  TORCH_CHECK(B <= 65535, "msflow_fast: the CUDA sample_layer_norm supports at most 65535 samples per call, got ", B);
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor w = weight.has_value() ? weight->to(acc).contiguous() : at::Tensor();
  at::Tensor b = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  at::Tensor out = new_output(x.sizes(), x.options());
  at::Tensor mean = new_output({B}, x.options().dtype(acc));
  at::Tensor rstd = new_output({B}, x.options().dtype(acc));
  int64_t splits = 1, chunk = 1;
  sample_splits(N, splits, chunk);
  at::Tensor partial = at::empty({B, splits, 2}, x.options().dtype(acc));
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sample_layer_norm_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sample_layer_norm_stats_kernel<scalar_t, acc_t><<<dim3(splits, B), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), N, chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sample_layer_norm_merge_kernel<acc_t><<<ceil_div(B, 64), 64, 0, stream>>>(
        partial.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), B, N, splits, chunk, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sample_layer_norm_fwd_kernel<scalar_t, acc_t><<<sample_grid(B * N), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), w.defined() ? w.data_ptr<acc_t>() : nullptr, b.defined() ? b.data_ptr<acc_t>() : nullptr,
        mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), N, B * N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_layer_norm_bwd_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                           const c10::optional<at::Tensor>& weight,
                                                                           const at::Tensor& mean,
                                                                           const at::Tensor& rstd) {
  check_sample_layer_norm_bwd(grad, x, weight, mean, rstd);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), N = x.numel() / B;
  TORCH_CHECK(B <= 65535, "msflow_fast: the CUDA sample_layer_norm supports at most 65535 samples per call, got ", B);
  const auto acc = acc_dtype(x.scalar_type());
  const bool affine = weight.has_value();
  at::Tensor w = affine ? weight->to(acc).contiguous() : at::Tensor();
  at::Tensor m = mean.contiguous(), r = rstd.contiguous();
  at::Tensor grad_x = new_output(x.sizes(), x.options());
  at::Tensor grad_weight = affine ? new_output(x.sizes().slice(1), x.options().dtype(acc)) : at::empty({0}, x.options().dtype(acc));
  at::Tensor grad_bias = affine ? new_output(x.sizes().slice(1), x.options().dtype(acc)) : at::empty({0}, x.options().dtype(acc));
  int64_t splits = 1, chunk = 1;
  sample_splits(N, splits, chunk);
  at::Tensor partial = at::empty({B, splits, 2}, x.options().dtype(acc));
  at::Tensor means = at::empty({B, 2}, x.options().dtype(acc));
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sample_layer_norm_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* wp = affine ? w.data_ptr<acc_t>() : nullptr;
    sample_layer_norm_bwd_stats_kernel<scalar_t, acc_t><<<dim3(splits, B), kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), wp, m.data_ptr<acc_t>(), r.data_ptr<acc_t>(),
        partial.data_ptr<acc_t>(), N, chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sample_layer_norm_bwd_merge_kernel<acc_t><<<ceil_div(B, 64), 64, 0, stream>>>(
        partial.data_ptr<acc_t>(), means.data_ptr<acc_t>(), B, N, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sample_layer_norm_bwd_kernel<scalar_t, acc_t><<<sample_grid(N), kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), wp, m.data_ptr<acc_t>(), r.data_ptr<acc_t>(),
        means.data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(), affine ? grad_weight.data_ptr<acc_t>() : nullptr,
        affine ? grad_bias.data_ptr<acc_t>() : nullptr, B, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace msflow_fast

TORCH_LIBRARY_IMPL(msflow_fast, CUDA, m) {
  m.impl("channel_layer_norm_relu_fwd", &msflow_fast::channel_layer_norm_relu_fwd_cuda);
  m.impl("channel_layer_norm_relu_bwd", &msflow_fast::channel_layer_norm_relu_bwd_cuda);
  m.impl("sample_layer_norm_fwd", &msflow_fast::sample_layer_norm_fwd_cuda);
  m.impl("sample_layer_norm_bwd", &msflow_fast::sample_layer_norm_bwd_cuda);
}
