// Subnet ops: op schemas, argument checks and CPU kernels of the fused channel LayerNorm + ReLU
//   out[b, :, p] = relu(LayerNorm_C(x[b, :, p] + addend[b or 0, :, p]) * weight + bias)
// (see msflow_fast/ops/reference.py: channel_layer_norm_relu). The CUDA kernels live in
// csrc/cuda/norm.cu.
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

}  // namespace msflow_fast

TORCH_LIBRARY_FRAGMENT(msflow_fast, m) {
  m.def(
      "channel_layer_norm_relu_fwd(Tensor x, Tensor weight, Tensor bias, Tensor? addend, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "channel_layer_norm_relu_bwd(Tensor grad, Tensor x, Tensor weight, Tensor bias, Tensor? addend, "
      "Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(msflow_fast, CPU, m) {
  m.impl("channel_layer_norm_relu_fwd", &msflow_fast::channel_layer_norm_relu_fwd_cpu);
  m.impl("channel_layer_norm_relu_bwd", &msflow_fast::channel_layer_norm_relu_bwd_cpu);
}
