// Norm ops: op schemas, argument checks and CPU kernels of
//   * the fused channel LayerNorm + ReLU of MSFlow's coupling subnet
//       out[b, :, p] = relu(LayerNorm_C(x[b, :, p] + addend[b or 0, :, p]) * weight + bias)
//     (see msflow_fast/ops/reference.py: channel_layer_norm_relu);
//   * the per-sample LayerNorm over [C, H, W] of FastFlow's features (reference.sample_layer_norm)
//       out[b, n] = (x[b, n] - mean_b) * rstd_b * weight[n] + bias[n],  n < N = numel / B
//     (the section "Per-sample LayerNorm" below).
// The CUDA kernels live in csrc/cuda/norm.cu.
//
// Layout: addend, out and the backward's tensors are NCHW-contiguous; the CPU forward also reads a
// channels-last x (what a channels-last conv returns), transposing it on the fly. The CPU kernels
// walk tiles of kTile consecutive pixels of one image: the forward stages x + addend for a tile
// in an L1 buffer (one read of x), the backward re-reads the tile's C rows, which stay in cache;
// every inner loop runs along the pixels, so it vectorises without gathers.
// half/bfloat16/float32 compute in float32, float64 in float64; mean and rstd [B, H*W] are
// saved in that type for the backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common.h"

namespace msflow_fast {

// ---------------------------------------------------------------------------------------------
// Argument checks (shared with csrc/cuda/norm.cu)

void check_layer_norm_relu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           const c10::optional<at::Tensor>& addend, double eps, bool allow_channels_last) {
  MSFLOW_CHECK_FLOAT(x);
  MSFLOW_CHECK_DIM(x, 4);
  TORCH_CHECK(x.is_contiguous() || (allow_channels_last && x.is_contiguous(at::MemoryFormat::ChannelsLast)),
              "msflow_fast: x must be contiguous", allow_channels_last ? " (NCHW or channels-last)" : "",
              ", got strides ", x.strides());
  const auto acc = acc_dtype(x);
  for (const at::Tensor* p : {&weight, &bias}) {
    const char* name = p == &weight ? "weight" : "bias";
    TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), "msflow_fast: ", name, " must have shape [C] = (",
                x.size(1), "), got ", p->sizes());
    TORCH_CHECK(p->scalar_type() == x.scalar_type() || p->scalar_type() == acc, "msflow_fast: ", name,
                " must have x's dtype ", x.scalar_type(), " or ", acc, ", got ", p->scalar_type());
    TORCH_CHECK(p->device() == x.device(), "msflow_fast: ", name, " is on ", p->device(), " but x is on ",
                x.device());
  }
  if (addend.has_value()) {
    const at::Tensor& a = *addend;
    MSFLOW_CHECK_SAME_DEVICE(x, a);
    MSFLOW_CHECK_SAME_DTYPE(x, a);
    MSFLOW_CHECK_CONTIGUOUS(a);
    TORCH_CHECK(a.dim() == 4 && (a.size(0) == 1 || a.size(0) == x.size(0)) && a.size(1) == x.size(1) &&
                    a.size(2) == x.size(2) && a.size(3) == x.size(3),
                "msflow_fast: addend must have shape [1 or B, C, H, W] with x ", x.sizes(), ", got ", a.sizes());
  }
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "msflow_fast: eps must be a finite float > 0, got ", eps);
}

void check_layer_norm_relu_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, const c10::optional<at::Tensor>& addend,
                               const at::Tensor& mean, const at::Tensor& rstd) {
  check_layer_norm_relu(x, weight, bias, addend, 1.0, /*allow_channels_last=*/false);
  MSFLOW_CHECK_SAME_DEVICE(x, grad);
  MSFLOW_CHECK_SAME_DTYPE(x, grad);
  MSFLOW_CHECK_CONTIGUOUS(grad);
  TORCH_CHECK(grad.sizes() == x.sizes(), "msflow_fast: grad must have x's shape ", x.sizes(), ", got ", grad.sizes());
  for (const at::Tensor* s : {&mean, &rstd}) {
    const char* name = s == &mean ? "mean" : "rstd";
    MSFLOW_CHECK_CONTIGUOUS(*s);
    TORCH_CHECK(s->device() == x.device(), "msflow_fast: ", name, " is on ", s->device(), " but x is on ",
                x.device());
    TORCH_CHECK(s->dim() == 2 && s->size(0) == x.size(0) && s->size(1) == x.size(2) * x.size(3),
                "msflow_fast: ", name, " must have shape [B, H*W], got ", s->sizes());
    TORCH_CHECK(s->scalar_type() == acc_dtype(x), "msflow_fast: ", name, " must be ", acc_dtype(x), ", got ",
                s->scalar_type());
  }
}

namespace {

constexpr int64_t kTile = 16;  // pixels per tile: one AVX-512 register of floats

struct Dims {
  int64_t B, C, N;        // N = H * W
  int64_t addend_stride;  // batch stride of addend (0 when broadcast)
};

// v[p] = x[c, p] + addend[c, p] for the n pixels of a tile row (acc_t).
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* x_row, const scalar_t* add_row, int64_t n, acc_t* v) {
  if (add_row != nullptr) {
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) v[p] = static_cast<acc_t>(x_row[p]) + static_cast<acc_t>(add_row[p]);
  } else {
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) v[p] = static_cast<acc_t>(x_row[p]);
  }
}

// Forward on one tile: v[c, p] = x + addend staged in an L1 buffer (read once, from NCHW rows or,
// channels-last, from NHWC pixel columns), then mean, two-pass variance and the write of NCHW rows.
template <typename scalar_t, typename acc_t>
void forward_kernel(const scalar_t* x, bool x_channels_last, const scalar_t* addend, const acc_t* weight,
                    const acc_t* bias, scalar_t* out, acc_t* mean_out, acc_t* rstd_out, const Dims& d, double eps) {
  const int64_t tiles = (d.N + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(d.C * kTile, 1));
  at::parallel_for(0, d.B * tiles, grain, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> staged(d.C * kTile);
    acc_t sum[kTile], mean[kTile], rstd[kTile];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / tiles, p0 = (t % tiles) * kTile, n = std::min(kTile, d.N - p0);
      const scalar_t* ab = addend != nullptr ? addend + b * d.addend_stride + p0 : nullptr;
      if (x_channels_last) {
        const scalar_t* xb = x + (b * d.N + p0) * d.C;  // [pixel, channel]
        for (int64_t p = 0; p < n; ++p) {
          const scalar_t* column = xb + p * d.C;
          for (int64_t c = 0; c < d.C; ++c) staged[c * kTile + p] = static_cast<acc_t>(column[c]);
        }
        if (ab != nullptr) {
          for (int64_t c = 0; c < d.C; ++c) {
#pragma omp simd
            for (int64_t p = 0; p < n; ++p) staged[c * kTile + p] += static_cast<acc_t>(ab[c * d.N + p]);
          }
        }
      } else {
        const scalar_t* xb = x + b * d.C * d.N + p0;
        for (int64_t c = 0; c < d.C; ++c) load_row(xb + c * d.N, ab != nullptr ? ab + c * d.N : nullptr, n, &staged[c * kTile]);
      }
      for (int64_t p = 0; p < kTile; ++p) sum[p] = acc_t(0);
      for (int64_t c = 0; c < d.C; ++c) {
        const acc_t* v = &staged[c * kTile];
#pragma omp simd
        for (int64_t p = 0; p < n; ++p) sum[p] += v[p];
      }
      const acc_t inv_c = acc_t(1) / static_cast<acc_t>(d.C);
      for (int64_t p = 0; p < kTile; ++p) {
        mean[p] = sum[p] * inv_c;
        sum[p] = acc_t(0);
      }
      for (int64_t c = 0; c < d.C; ++c) {  // two-pass variance: no cancellation
        const acc_t* v = &staged[c * kTile];
#pragma omp simd
        for (int64_t p = 0; p < n; ++p) sum[p] += (v[p] - mean[p]) * (v[p] - mean[p]);
      }
      for (int64_t p = 0; p < n; ++p) {
        rstd[p] = acc_t(1) / std::sqrt(sum[p] * inv_c + static_cast<acc_t>(eps));
        mean_out[b * d.N + p0 + p] = mean[p];
        rstd_out[b * d.N + p0 + p] = rstd[p];
      }
      scalar_t* ob = out + b * d.C * d.N + p0;
      for (int64_t c = 0; c < d.C; ++c) {
        const acc_t* v = &staged[c * kTile];
        const acc_t w = weight[c], bb = bias[c];
        scalar_t* orow = ob + c * d.N;
#pragma omp simd
        for (int64_t p = 0; p < n; ++p) {
          const acc_t y = (v[p] - mean[p]) * rstd[p] * w + bb;
          orow[p] = static_cast<scalar_t>(y > acc_t(0) ? y : acc_t(0));
        }
      }
    }
  });
}

// grad_x, and per-block partial sums of grad_weight / grad_bias (reduced in double afterwards).
// With g = grad * (y > 0), xhat = (v - mean) * rstd and gx = g * weight:
//   grad_x = rstd * (gx - mean_C(gx) - xhat * mean_C(gx * xhat)),
//   grad_weight = sum_{b,p} g * xhat,  grad_bias = sum_{b,p} g.
template <typename scalar_t, typename acc_t>
void backward_kernel(const scalar_t* grad, const scalar_t* x, const scalar_t* addend, const acc_t* weight,
                     const acc_t* bias, const acc_t* mean_in, const acc_t* rstd_in, scalar_t* grad_x,
                     std::vector<acc_t>& partial, int64_t blocks, const Dims& d) {
  const int64_t tiles = (d.N + kTile - 1) / kTile;
  const int64_t total = d.B * tiles;
  at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
    acc_t v[kTile], g[kTile], xh[kTile], s1[kTile], s2[kTile], mean[kTile], rstd[kTile];
    for (int64_t k = k0; k < k1; ++k) {
      acc_t* dw = partial.data() + k * 2 * d.C;
      acc_t* db = dw + d.C;
      const int64_t first = total * k / blocks, last = total * (k + 1) / blocks;
      for (int64_t t = first; t < last; ++t) {
        const int64_t b = t / tiles, p0 = (t % tiles) * kTile, n = std::min(kTile, d.N - p0);
        const int64_t base = b * d.C * d.N + p0;
        const scalar_t* ab = addend != nullptr ? addend + b * d.addend_stride + p0 : nullptr;
        for (int64_t p = 0; p < kTile; ++p) {
          s1[p] = s2[p] = acc_t(0);
          mean[p] = p < n ? mean_in[b * d.N + p0 + p] : acc_t(0);
          rstd[p] = p < n ? rstd_in[b * d.N + p0 + p] : acc_t(0);
        }
        for (int64_t c = 0; c < d.C; ++c) {
          load_row(x + base + c * d.N, ab != nullptr ? ab + c * d.N : nullptr, n, v);
          const scalar_t* grow = grad + base + c * d.N;
          const acc_t w = weight[c], bb = bias[c];
          acc_t sum_gxh = acc_t(0), sum_g = acc_t(0);
#pragma omp simd reduction(+ : sum_gxh, sum_g)
          for (int64_t p = 0; p < n; ++p) {
            xh[p] = (v[p] - mean[p]) * rstd[p];
            g[p] = xh[p] * w + bb > acc_t(0) ? static_cast<acc_t>(grow[p]) : acc_t(0);
            s1[p] += g[p] * w;
            s2[p] += g[p] * w * xh[p];
            sum_gxh += g[p] * xh[p];
            sum_g += g[p];
          }
          dw[c] += sum_gxh;
          db[c] += sum_g;
        }
        const acc_t inv_c = acc_t(1) / static_cast<acc_t>(d.C);
        for (int64_t p = 0; p < kTile; ++p) {
          s1[p] *= inv_c;
          s2[p] *= inv_c;
        }
        for (int64_t c = 0; c < d.C; ++c) {
          load_row(x + base + c * d.N, ab != nullptr ? ab + c * d.N : nullptr, n, v);
          const scalar_t* grow = grad + base + c * d.N;
          scalar_t* dxrow = grad_x + base + c * d.N;
          const acc_t w = weight[c], bb = bias[c];
#pragma omp simd
          for (int64_t p = 0; p < n; ++p) {
            const acc_t xhat = (v[p] - mean[p]) * rstd[p];
            const acc_t gx = xhat * w + bb > acc_t(0) ? static_cast<acc_t>(grow[p]) * w : acc_t(0);
            dxrow[p] = static_cast<scalar_t>(rstd[p] * (gx - s1[p] - xhat * s2[p]));
          }
        }
      }
    }
  });
}

Dims dims_of(const at::Tensor& x, const c10::optional<at::Tensor>& addend) {
  Dims d;
  d.B = x.size(0);
  d.C = x.size(1);
  d.N = x.size(2) * x.size(3);
  d.addend_stride = addend.has_value() && addend->size(0) == x.size(0) ? d.C * d.N : 0;
  return d;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_layer_norm_relu_fwd_cpu(const at::Tensor& x,
                                                                                const at::Tensor& weight,
                                                                                const at::Tensor& bias,
                                                                                const c10::optional<at::Tensor>& addend,
                                                                                double eps) {
  check_layer_norm_relu(x, weight, bias, addend, eps, /*allow_channels_last=*/true);
  const Dims d = dims_of(x, addend);
  const bool x_channels_last = !x.is_contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  at::Tensor out = new_output(x.sizes(), x.options());
  at::Tensor mean = new_output({d.B, d.N}, x.options().dtype(acc));
  at::Tensor rstd = new_output({d.B, d.N}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_layer_norm_relu_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(x.data_ptr<scalar_t>(), x_channels_last, addend.has_value() ? addend->data_ptr<scalar_t>() : nullptr,
                                    w.data_ptr<acc_t>(), b.data_ptr<acc_t>(), out.data_ptr<scalar_t>(),
                                    mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), d, eps);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_layer_norm_relu_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const c10::optional<at::Tensor>& addend, const at::Tensor& mean, const at::Tensor& rstd) {
  check_layer_norm_relu_bwd(grad, x, weight, bias, addend, mean, rstd);
  const Dims d = dims_of(x, addend);
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  at::Tensor grad_x = new_output(x.sizes(), x.options());
  at::Tensor grad_weight = new_output({d.C}, x.options().dtype(acc));
  at::Tensor grad_bias = new_output({d.C}, x.options().dtype(acc));
  const int64_t tiles = (d.N + kTile - 1) / kTile;
  // A fixed number of blocks (not of threads): the parameter-gradient sums are deterministic.
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(d.B * tiles, 64));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_layer_norm_relu_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> partial(blocks * 2 * d.C, acc_t(0));
    backward_kernel<scalar_t, acc_t>(grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                     addend.has_value() ? addend->data_ptr<scalar_t>() : nullptr, w.data_ptr<acc_t>(),
                                     b.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
                                     grad_x.data_ptr<scalar_t>(), partial, blocks, d);
    acc_t* gw = grad_weight.data_ptr<acc_t>();
    acc_t* gb = grad_bias.data_ptr<acc_t>();
    for (int64_t c = 0; c < d.C; ++c) {
      double sw = 0.0, sb = 0.0;
      for (int64_t k = 0; k < blocks; ++k) {
        sw += static_cast<double>(partial[k * 2 * d.C + c]);
        sb += static_cast<double>(partial[k * 2 * d.C + d.C + c]);
      }
      gw[c] = static_cast<acc_t>(sw);
      gb[c] = static_cast<acc_t>(sb);
    }
  });
  return {grad_x, grad_weight, grad_bias};
}

// ---------------------------------------------------------------------------------------------
// Per-sample LayerNorm (FastFlow's nn.LayerNorm([C, H, W])): one mean and one biased variance per
// sample over its N = C * H * W values, element-wise affine [N] (optional).
//
// The statistics are a split reduction: every chunk of kStatChunk consecutive values of a sample
// gets its own two-pass mean m_i and M2_i (the chunk is still in cache for the second pass), and
// the chunks of a sample are merged in a fixed order, in double (see sample_layer_norm_forward_kernel
// for the two task layouts):
//   mean = sum_i n_i m_i / N,  M2 = sum_i (M2_i + n_i (m_i - mean)^2),  rstd = 1 / sqrt(M2 / N + eps).
// The backward, with xhat = (x - mean) * rstd and gx = grad * weight (grad without affine):
//   grad_x = rstd * (gx - mean_N(gx) - xhat * mean_N(gx * xhat)),
//   grad_weight[n] = sum_b grad * xhat,  grad_bias[n] = sum_b grad.
// Its first pass runs over column chunks of kColumnChunk values, each walking the batch in order:
// it owns grad_weight/grad_bias of its columns (sums over b in a fixed order, no partials) and
// writes per-(sample, chunk) partial sums of gx and gx * xhat, merged in double. Every result is
// independent of the thread count.

void check_sample_layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, double eps) {
  MSFLOW_CHECK_FLOAT(x);
  TORCH_CHECK(x.dim() >= 2 && x.numel() > 0,
              "msflow_fast: x must be a non-empty [B, ...] tensor with at least 2 dims, got shape ", x.sizes());
  MSFLOW_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(weight.has_value() == bias.has_value(),
              "msflow_fast: weight and bias must be given together (or both None for no affine)");
  const auto acc = acc_dtype(x);
  for (const c10::optional<at::Tensor>* p : {&weight, &bias}) {
    if (!p->has_value()) continue;
    const at::Tensor& t = **p;
    const char* name = p == &weight ? "weight" : "bias";
    TORCH_CHECK(t.sizes() == x.sizes().slice(1), "msflow_fast: ", name, " must have x's per-sample shape ",
                x.sizes().slice(1), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == acc, "msflow_fast: ", name,
                " must have x's dtype ", x.scalar_type(), " or ", acc, ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "msflow_fast: ", name, " is on ", t.device(), " but x is on ", x.device());
  }
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "msflow_fast: eps must be a finite float > 0, got ", eps);
}

void check_sample_layer_norm_bwd(const at::Tensor& grad, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                 const at::Tensor& mean, const at::Tensor& rstd) {
  check_sample_layer_norm(x, weight, weight, 1.0);
  MSFLOW_CHECK_SAME_DEVICE(x, grad);
  MSFLOW_CHECK_SAME_DTYPE(x, grad);
  MSFLOW_CHECK_CONTIGUOUS(grad);
  TORCH_CHECK(grad.sizes() == x.sizes(), "msflow_fast: grad must have x's shape ", x.sizes(), ", got ", grad.sizes());
  for (const at::Tensor* s : {&mean, &rstd}) {
    const char* name = s == &mean ? "mean" : "rstd";
    TORCH_CHECK(s->device() == x.device(), "msflow_fast: ", name, " is on ", s->device(), " but x is on ",
                x.device());
    TORCH_CHECK(s->dim() == 1 && s->size(0) == x.size(0), "msflow_fast: ", name, " must have shape [B] = (",
                x.size(0), "), got ", s->sizes());
    TORCH_CHECK(s->scalar_type() == acc_dtype(x), "msflow_fast: ", name, " must be ", acc_dtype(x), ", got ",
                s->scalar_type());
  }
}

namespace {

constexpr int64_t kStatChunk = 8192;    // values per partial statistic (32 KB of float32)
constexpr int64_t kColumnChunk = 2048;  // values per backward column task (its grad_weight/bias stay in L1)

inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Two-pass mean and M2 of x[0:n] (n >= 1) with 16 independent lanes (vectorisable).
template <typename scalar_t, typename acc_t>
void chunk_moments(const scalar_t* x, int64_t n, double& mean_out, double& m2_out) {
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<acc_t>(x[i + l]);
  }
  acc_t sum = acc_t(0);
  for (; i < n; ++i) sum += static_cast<acc_t>(x[i]);
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  const acc_t mean = sum / static_cast<acc_t>(n);
  for (int l = 0; l < kLanes; ++l) lanes[l] = acc_t(0);
  for (i = 0; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t d = static_cast<acc_t>(x[i + l]) - mean;
      lanes[l] += d * d;
    }
  }
  acc_t m2 = acc_t(0);
  for (; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(x[i]) - mean;
    m2 += d * d;
  }
  for (int l = 0; l < kLanes; ++l) m2 += lanes[l];
  mean_out = static_cast<double>(mean);
  m2_out = static_cast<double>(m2);
}

// mean[b], rstd[b] from the chunk moments of sample b, merged in order in double.
template <typename acc_t>
void merge_moments(const double* part_mean, const double* part_m2, int64_t chunks, int64_t N, double eps, acc_t& mean_out,
                   acc_t& rstd_out) {
  double sum = 0.0;
  for (int64_t i = 0; i < chunks; ++i) sum += static_cast<double>(std::min(kStatChunk, N - i * kStatChunk)) * part_mean[i];
  const double mean = sum / static_cast<double>(N);
  double m2 = 0.0;
  for (int64_t i = 0; i < chunks; ++i) {
    const double d = part_mean[i] - mean;
    m2 += part_m2[i] + static_cast<double>(std::min(kStatChunk, N - i * kStatChunk)) * d * d;
  }
  mean_out = static_cast<acc_t>(mean);
  rstd_out = static_cast<acc_t>(1.0 / std::sqrt(m2 / static_cast<double>(N) + eps));
}

// out[0:n] = (x - mean) * rstd * weight + bias (no affine: weight == nullptr)
template <typename scalar_t, typename acc_t>
void normalize_chunk(const scalar_t* x, const acc_t* weight, const acc_t* bias, scalar_t* out, int64_t n, acc_t mean,
                     acc_t rstd) {
  if (weight != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>((static_cast<acc_t>(x[i]) - mean) * rstd * weight[i] + bias[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>((static_cast<acc_t>(x[i]) - mean) * rstd);
  }
}

// With at least as many samples as threads, one task per sample (its values stay in L2 from the
// statistics to the write); else one task per chunk in both passes. The chunks, and so the bits of
// every result, are the same either way.
template <typename scalar_t, typename acc_t>
void sample_layer_norm_forward_kernel(const scalar_t* x, const acc_t* weight, const acc_t* bias, scalar_t* out,
                                      acc_t* mean_out, acc_t* rstd_out, int64_t B, int64_t N, double eps) {
  const int64_t chunks = ceil_div64(N, kStatChunk);
  std::vector<double> part_mean(B * chunks), part_m2(B * chunks);
  auto moments = [&](int64_t t) {
    const int64_t b = t / chunks, start = (t % chunks) * kStatChunk;
    chunk_moments<scalar_t, acc_t>(x + b * N + start, std::min(kStatChunk, N - start), part_mean[t], part_m2[t]);
  };
  auto write = [&](int64_t t) {
    const int64_t b = t / chunks, start = (t % chunks) * kStatChunk;
    normalize_chunk<scalar_t, acc_t>(x + b * N + start, weight != nullptr ? weight + start : nullptr,
                                     bias != nullptr ? bias + start : nullptr, out + b * N + start,
                                     std::min(kStatChunk, N - start), mean_out[b], rstd_out[b]);
  };
  auto merge = [&](int64_t b) {
    merge_moments(part_mean.data() + b * chunks, part_m2.data() + b * chunks, chunks, N, eps, mean_out[b], rstd_out[b]);
  };
  if (B >= at::get_num_threads()) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t t = b * chunks; t < (b + 1) * chunks; ++t) moments(t);
        merge(b);
        for (int64_t t = b * chunks; t < (b + 1) * chunks; ++t) write(t);
      }
    });
    return;
  }
  at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) moments(t);
  });
  for (int64_t b = 0; b < B; ++b) merge(b);
  at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) write(t);
  });
}

template <typename scalar_t, typename acc_t>
void sample_layer_norm_backward_kernel(const scalar_t* grad, const scalar_t* x, const acc_t* weight,
                                       const acc_t* mean, const acc_t* rstd, scalar_t* grad_x, acc_t* grad_weight,
                                       acc_t* grad_bias, int64_t B, int64_t N) {
  const int64_t cols = ceil_div64(N, kColumnChunk);
  std::vector<double> partial(B * cols * 2);  // [B, cols, (sum gx, sum gx * xhat)]
  at::parallel_for(0, cols, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t start = k * kColumnChunk, n = std::min(kColumnChunk, N - start);
      acc_t* dw = grad_weight != nullptr ? grad_weight + start : nullptr;
      acc_t* db = grad_bias != nullptr ? grad_bias + start : nullptr;
      const acc_t* w = weight != nullptr ? weight + start : nullptr;
      if (dw != nullptr) {
        std::fill(dw, dw + n, acc_t(0));
        std::fill(db, db + n, acc_t(0));
      }
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t* xs = x + b * N + start;
        const scalar_t* gs = grad + b * N + start;
        const acc_t m = mean[b], r = rstd[b];
        acc_t s1 = acc_t(0), s2 = acc_t(0);
        if (w != nullptr) {
#pragma omp simd reduction(+ : s1, s2)
          for (int64_t i = 0; i < n; ++i) {
            const acc_t xh = (static_cast<acc_t>(xs[i]) - m) * r;
            const acc_t g = static_cast<acc_t>(gs[i]);
            const acc_t gx = g * w[i];
            s1 += gx;
            s2 += gx * xh;
            dw[i] += g * xh;
            db[i] += g;
          }
        } else {
#pragma omp simd reduction(+ : s1, s2)
          for (int64_t i = 0; i < n; ++i) {
            const acc_t xh = (static_cast<acc_t>(xs[i]) - m) * r;
            const acc_t g = static_cast<acc_t>(gs[i]);
            s1 += g;
            s2 += g * xh;
          }
        }
        partial[(b * cols + k) * 2] = static_cast<double>(s1);
        partial[(b * cols + k) * 2 + 1] = static_cast<double>(s2);
      }
    }
  });
  std::vector<acc_t> m1(B), m2(B);
  for (int64_t b = 0; b < B; ++b) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t k = 0; k < cols; ++k) {
      s1 += partial[(b * cols + k) * 2];
      s2 += partial[(b * cols + k) * 2 + 1];
    }
    m1[b] = static_cast<acc_t>(s1 / static_cast<double>(N));
    m2[b] = static_cast<acc_t>(s2 / static_cast<double>(N));
  }
  const int64_t chunks = ceil_div64(N, kStatChunk);
  at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, start = (t % chunks) * kStatChunk, n = std::min(kStatChunk, N - start);
      const scalar_t* xs = x + b * N + start;
      const scalar_t* gs = grad + b * N + start;
      scalar_t* dxs = grad_x + b * N + start;
      const acc_t m = mean[b], r = rstd[b], a1 = m1[b], a2 = m2[b];
      if (weight != nullptr) {
        const acc_t* w = weight + start;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const acc_t xh = (static_cast<acc_t>(xs[i]) - m) * r;
          dxs[i] = static_cast<scalar_t>(r * (static_cast<acc_t>(gs[i]) * w[i] - a1 - xh * a2));
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const acc_t xh = (static_cast<acc_t>(xs[i]) - m) * r;
          dxs[i] = static_cast<scalar_t>(r * (static_cast<acc_t>(gs[i]) - a1 - xh * a2));
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_layer_norm_fwd_cpu(const at::Tensor& x,
                                                                          const c10::optional<at::Tensor>& weight,
                                                                          const c10::optional<at::Tensor>& bias,
                                                                          double eps) {
  check_sample_layer_norm(x, weight, bias, eps);
  const int64_t B = x.size(0), N = x.numel() / B;
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor w = weight.has_value() ? weight->to(acc).contiguous() : at::Tensor();
  at::Tensor b = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  at::Tensor out = new_output(x.sizes(), x.options());
  at::Tensor mean = new_output({B}, x.options().dtype(acc));
  at::Tensor rstd = new_output({B}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sample_layer_norm_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sample_layer_norm_forward_kernel<scalar_t, acc_t>(
        x.data_ptr<scalar_t>(), w.defined() ? w.data_ptr<acc_t>() : nullptr, b.defined() ? b.data_ptr<acc_t>() : nullptr,
        out.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), B, N, eps);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_layer_norm_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                          const c10::optional<at::Tensor>& weight,
                                                                          const at::Tensor& mean,
                                                                          const at::Tensor& rstd) {
  check_sample_layer_norm_bwd(grad, x, weight, mean, rstd);
  const int64_t B = x.size(0), N = x.numel() / B;
  const auto acc = acc_dtype(x.scalar_type());
  const bool affine = weight.has_value();
  at::Tensor w = affine ? weight->to(acc).contiguous() : at::Tensor();
  at::Tensor m = mean.contiguous(), r = rstd.contiguous();
  at::Tensor grad_x = new_output(x.sizes(), x.options());
  at::Tensor grad_weight = affine ? new_output(x.sizes().slice(1), x.options().dtype(acc)) : at::empty({0}, x.options().dtype(acc));
  at::Tensor grad_bias = affine ? new_output(x.sizes().slice(1), x.options().dtype(acc)) : at::empty({0}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sample_layer_norm_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sample_layer_norm_backward_kernel<scalar_t, acc_t>(
        grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), affine ? w.data_ptr<acc_t>() : nullptr, m.data_ptr<acc_t>(),
        r.data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(), affine ? grad_weight.data_ptr<acc_t>() : nullptr,
        affine ? grad_bias.data_ptr<acc_t>() : nullptr, B, N);
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace msflow_fast

TORCH_LIBRARY_FRAGMENT(msflow_fast, m) {
  m.def(
      "channel_layer_norm_relu_fwd(Tensor x, Tensor weight, Tensor bias, Tensor? addend, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "channel_layer_norm_relu_bwd(Tensor grad, Tensor x, Tensor weight, Tensor bias, Tensor? addend, "
      "Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
  m.def("sample_layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sample_layer_norm_bwd(Tensor grad, Tensor x, Tensor? weight, Tensor mean, Tensor rstd) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(msflow_fast, CPU, m) {
  m.impl("channel_layer_norm_relu_fwd", &msflow_fast::channel_layer_norm_relu_fwd_cpu);
  m.impl("channel_layer_norm_relu_bwd", &msflow_fast::channel_layer_norm_relu_bwd_cpu);
  m.impl("sample_layer_norm_fwd", &msflow_fast::sample_layer_norm_fwd_cpu);
  m.impl("sample_layer_norm_bwd", &msflow_fast::sample_layer_norm_bwd_cpu);
}
