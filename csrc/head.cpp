// Likelihood and anomaly-map ops: schemas and CPU kernels.
//
//   gaussian_nll_fwd(z [B, ...], logdet [B])            -> nll [B]      = 0.5 * sum z^2 - logdet
//   gaussian_nll_bwd(grad [B], z)                        -> grad_z       = grad[b] * z
//   log_likelihood_map_fwd(z [B, C, H, W])               -> [B, H, W]    = -0.5 * mean_c z^2
//   log_likelihood_map_bwd(grad [B, H, W], z)            -> grad_z       = -grad * z / C
//   aggregate_anomaly_maps_fwd(maps, output_size, top_k) -> (map_add, map_mul, score)
//   log_space_score_fwd(maps, output_size, top_k)        -> score [B]    (nats)
//
// Accumulation is float32 for half/bfloat16/float32 inputs and float64 for float64 inputs.
// The CUDA kernels live in csrc/cuda/head.cu.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <tuple>
#include <vector>

#include "common.h"

namespace msflow_fast {
namespace {

constexpr int64_t kSumChunk = 16384;  // elements per partial sum of the NLL
constexpr int64_t kPixelBlock = 512;  // pixels per task of the log-likelihood map

// Sum of squares of x[0:n] with 16 independent lanes (vectorisable), returned in double.
template <typename scalar_t>
double sum_squares(const scalar_t* x, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t v = static_cast<acc_t>(x[i + l]);
      lanes[l] += v * v;
    }
  }
  double total = 0.0;
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    total += static_cast<double>(v * v);
  }
  for (int l = 0; l < kLanes; ++l) total += static_cast<double>(lanes[l]);
  return total;
}

// Mean of the k largest of values[0:n] (values is reordered), summed in double.
template <typename acc_t>
acc_t top_k_mean_inplace(acc_t* values, int64_t n, int64_t k) {
  std::nth_element(values, values + (k - 1), values + n, std::greater<acc_t>());
  double total = 0.0;
  for (int64_t i = 0; i < k; ++i) total += static_cast<double>(values[i]);
  return static_cast<acc_t>(total / static_cast<double>(k));
}

// align_corners=True source taps of one axis: out index d reads i0[d], i1[d] with weight w1[d] on i1.
template <typename acc_t>
struct LinearTaps {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> w0, w1;
};

template <typename acc_t>
LinearTaps<acc_t> linear_taps(int64_t in_size, int64_t out_size) {
  LinearTaps<acc_t> taps;
  taps.i0.resize(out_size);
  taps.i1.resize(out_size);
  taps.w0.resize(out_size);
  taps.w1.resize(out_size);
  const acc_t scale = out_size > 1 ? static_cast<acc_t>(in_size - 1) / static_cast<acc_t>(out_size - 1) : acc_t(0);
  for (int64_t d = 0; d < out_size; ++d) {
    const acc_t src = scale * static_cast<acc_t>(d);
    const int64_t i0 = std::min(static_cast<int64_t>(std::floor(src)), in_size - 1);
    const acc_t w1 = std::min(std::max(src - static_cast<acc_t>(i0), acc_t(0)), acc_t(1));
    taps.i0[d] = i0;
    taps.i1[d] = i0 + (i0 < in_size - 1 ? 1 : 0);
    taps.w1[d] = w1;
    taps.w0[d] = acc_t(1) - w1;
  }
  return taps;
}

template <typename acc_t>
struct ScaleMaps {
  at::Tensor logp;  // [B, h, w] in acc_t, contiguous
  at::Tensor prob;  // [B, h, w] exp(logp - max logp), per image; undefined when not needed
  int64_t h, w;
  LinearTaps<acc_t> rows, cols;
};

// Per-scale pre-pass on the small maps: acc_t copies, per-image max and exp(logp - max).
template <typename acc_t>
std::vector<ScaleMaps<acc_t>> prepare_scales(at::TensorList maps, int64_t H, int64_t W, bool with_prob) {
  std::vector<ScaleMaps<acc_t>> scales;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  for (const auto& m : maps) {
    ScaleMaps<acc_t> s;
    s.logp = m.to(acc_dtype).contiguous();
    const int64_t B = m.size(0);
    s.h = m.size(1);
    s.w = m.size(2);
    s.rows = linear_taps<acc_t>(s.h, H);
    s.cols = linear_taps<acc_t>(s.w, W);
    if (with_prob) {
      s.prob = at::empty_like(s.logp);
      const acc_t* lp = s.logp.template data_ptr<acc_t>();
      acc_t* pr = s.prob.template data_ptr<acc_t>();
      const int64_t n = s.h * s.w;
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const acc_t* x = lp + b * n;
          acc_t mx = x[0];
          for (int64_t i = 1; i < n; ++i) mx = std::max(mx, x[i]);
          for (int64_t i = 0; i < n; ++i) pr[b * n + i] = std::exp(x[i] - mx);
        }
      });
    }
    scales.push_back(std::move(s));
  }
  return scales;
}

// Adds the bilinear interpolation of map [h, w] (image b) at output row y into row[0:W].
template <typename acc_t>
inline void add_upsampled_row(const acc_t* map, const ScaleMaps<acc_t>& s, int64_t y, int64_t W, acc_t* row) {
  const acc_t* r0 = map + s.rows.i0[y] * s.w;
  const acc_t* r1 = map + s.rows.i1[y] * s.w;
  const acc_t h0 = s.rows.w0[y], h1 = s.rows.w1[y];
  const int64_t* c0 = s.cols.i0.data();
  const int64_t* c1 = s.cols.i1.data();
  const acc_t* w0 = s.cols.w0.data();
  const acc_t* w1 = s.cols.w1.data();
  for (int64_t x = 0; x < W; ++x) {
    row[x] += h0 * (w0[x] * r0[c0[x]] + w1[x] * r0[c1[x]]) + h1 * (w0[x] * r1[c0[x]] + w1[x] * r1[c1[x]]);
  }
}

// Fused pass: sum_prob (optional) and sum_log [B, H*W] with per-image maxima.
template <typename acc_t>
void sum_upsampled(const std::vector<ScaleMaps<acc_t>>& scales, int64_t B, int64_t H, int64_t W, acc_t* sum_prob,
                   acc_t* sum_log, std::vector<acc_t>& max_prob, std::vector<acc_t>& max_log) {
  std::vector<acc_t> row_max_prob(B * H), row_max_log(B * H);
  at::parallel_for(0, B * H, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / H, y = r % H;
      acc_t* lrow = sum_log + r * W;
      std::fill(lrow, lrow + W, acc_t(0));
      for (const auto& s : scales) add_upsampled_row(s.logp.template data_ptr<acc_t>() + b * s.h * s.w, s, y, W, lrow);
      row_max_log[r] = *std::max_element(lrow, lrow + W);
      if (sum_prob != nullptr) {
        acc_t* prow = sum_prob + r * W;
        std::fill(prow, prow + W, acc_t(0));
        for (const auto& s : scales) add_upsampled_row(s.prob.template data_ptr<acc_t>() + b * s.h * s.w, s, y, W, prow);
        row_max_prob[r] = *std::max_element(prow, prow + W);
      }
    }
  });
  max_prob.assign(B, acc_t(0));
  max_log.assign(B, acc_t(0));
  for (int64_t b = 0; b < B; ++b) {
    max_log[b] = *std::max_element(row_max_log.begin() + b * H, row_max_log.begin() + (b + 1) * H);
    if (sum_prob != nullptr) {
      max_prob[b] = *std::max_element(row_max_prob.begin() + b * H, row_max_prob.begin() + (b + 1) * H);
    }
  }
}

template <typename scalar_t>
void top_k_mean_rows(const scalar_t* values, int64_t B, int64_t N, int64_t k, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> buffer(N);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t i = 0; i < N; ++i) buffer[i] = static_cast<acc_t>(values[b * N + i]);
      out[b] = static_cast<scalar_t>(top_k_mean_inplace(buffer.data(), N, k));
    }
  });
}

}  // namespace

void check_head_maps(at::TensorList maps, at::IntArrayRef output_size, double top_k) {
  TORCH_CHECK(!maps.empty(), "msflow_fast: log_likelihood_maps is empty; pass at least one [B, h, w] map");
  TORCH_CHECK(output_size.size() == 2, "msflow_fast: output_size must be (H, W), got ", output_size);
  TORCH_CHECK(output_size[0] >= 1 && output_size[1] >= 1, "msflow_fast: output_size must be positive, got ",
              output_size);
  TORCH_CHECK(top_k > 0.0 && top_k <= 1.0, "msflow_fast: top_k must be in (0, 1], got ", top_k);
  const at::Tensor& first = maps[0];
  for (size_t i = 0; i < maps.size(); ++i) {
    const at::Tensor& m = maps[i];
    TORCH_CHECK(m.dim() == 3, "msflow_fast: log_likelihood_maps[", i, "] must be 3-D [B, h, w], got shape ",
                m.sizes());
    TORCH_CHECK(at::isFloatingType(m.scalar_type()), "msflow_fast: log_likelihood_maps[", i,
                "] must be floating, got ", m.scalar_type());
    TORCH_CHECK(m.scalar_type() == first.scalar_type(), "msflow_fast: log_likelihood_maps[", i, "] has dtype ",
                m.scalar_type(), " but log_likelihood_maps[0] has ", first.scalar_type());
    TORCH_CHECK(m.device() == first.device(), "msflow_fast: log_likelihood_maps[", i, "] is on ", m.device(),
                " but log_likelihood_maps[0] is on ", first.device());
    TORCH_CHECK(m.size(0) == first.size(0), "msflow_fast: log_likelihood_maps[", i, "] has batch ", m.size(0),
                " but log_likelihood_maps[0] has ", first.size(0));
    TORCH_CHECK(m.size(0) > 0 && m.size(1) > 0 && m.size(2) > 0, "msflow_fast: log_likelihood_maps[", i,
                "] is empty, shape ", m.sizes());
  }
}

int64_t head_top_k_count(int64_t num_pixels, double top_k) {
  return std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(num_pixels) * top_k));
}

at::ScalarType head_acc_dtype(at::ScalarType dtype) {
  return (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
}

// ---------------------------------------------------------------------------------------------
// Gaussian NLL

at::Tensor gaussian_nll_fwd_cpu(const at::Tensor& z, const at::Tensor& logdet) {
  MSFLOW_CHECK_FLOAT(z);
  MSFLOW_CHECK_FLOAT(logdet);
  MSFLOW_CHECK_DIM(logdet, 1);
  MSFLOW_CHECK_SAME_DEVICE(z, logdet);
  TORCH_CHECK(z.dim() >= 1 && z.size(0) == logdet.size(0), "msflow_fast: logdet must have shape [B] with B = z.size(0)",
              ", got z ", z.sizes(), " and logdet ", logdet.sizes());
  const int64_t B = z.size(0);
  const int64_t N = B > 0 ? z.numel() / B : 0;
  const auto acc_dtype = head_acc_dtype(z.scalar_type());
  at::Tensor zc = z.contiguous();
  at::Tensor ld = logdet.to(acc_dtype).contiguous();
  at::Tensor out = new_output({B}, z.options().dtype(acc_dtype));
  const int64_t chunks = std::max<int64_t>(1, (N + kSumChunk - 1) / kSumChunk);
  std::vector<double> partial(B * chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "gaussian_nll_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / chunks, c = t % chunks;
        const int64_t start = c * kSumChunk, stop = std::min(N, start + kSumChunk);
        partial[t] = start < stop ? sum_squares(zp + b * N + start, stop - start) : 0.0;
      }
    });
    const acc_t* lp = ld.data_ptr<acc_t>();
    acc_t* op = out.data_ptr<acc_t>();
    for (int64_t b = 0; b < B; ++b) {
      double total = 0.0;
      for (int64_t c = 0; c < chunks; ++c) total += partial[b * chunks + c];
      op[b] = static_cast<acc_t>(0.5 * total) - lp[b];
    }
  });
  return out;
}

at::Tensor gaussian_nll_bwd_cpu(const at::Tensor& grad, const at::Tensor& z) {
  MSFLOW_CHECK_FLOAT(grad);
  MSFLOW_CHECK_FLOAT(z);
  MSFLOW_CHECK_DIM(grad, 1);
  MSFLOW_CHECK_SAME_DEVICE(z, grad);
  TORCH_CHECK(z.dim() >= 1 && z.size(0) == grad.size(0), "msflow_fast: grad must have shape [B] with B = z.size(0)",
              ", got z ", z.sizes(), " and grad ", grad.sizes());
  const int64_t B = z.size(0);
  const int64_t N = B > 0 ? z.numel() / B : 0;
  at::Tensor zc = z.contiguous();
  at::Tensor g = grad.to(head_acc_dtype(z.scalar_type())).contiguous();
  at::Tensor out = new_output(z.sizes(), zc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "gaussian_nll_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    const acc_t* gp = g.data_ptr<acc_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t chunks = std::max<int64_t>(1, (N + kSumChunk - 1) / kSumChunk);
    at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / chunks, c = t % chunks;
        const int64_t start = b * N + c * kSumChunk, stop = b * N + std::min(N, (c + 1) * kSumChunk);
        const acc_t gb = gp[b];
        for (int64_t i = start; i < stop; ++i) op[i] = static_cast<scalar_t>(gb * static_cast<acc_t>(zp[i]));
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Log-likelihood map

at::Tensor log_likelihood_map_fwd_cpu(const at::Tensor& z) {
  MSFLOW_CHECK_FLOAT(z);
  MSFLOW_CHECK_DIM(z, 4);
  const int64_t B = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3), N = H * W;
  const auto acc_dtype = head_acc_dtype(z.scalar_type());
  at::Tensor zc = z.contiguous();
  at::Tensor out = new_output({B, H, W}, z.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "log_likelihood_map_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    acc_t* op = out.data_ptr<acc_t>();
    const int64_t blocks = (N + kPixelBlock - 1) / kPixelBlock;
    at::parallel_for(0, B * blocks, 1, [&](int64_t t0, int64_t t1) {
      acc_t acc[kPixelBlock];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / blocks, n0 = (t % blocks) * kPixelBlock, len = std::min(kPixelBlock, N - n0);
        std::fill(acc, acc + len, acc_t(0));
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* row = zp + (b * C + c) * N + n0;
          for (int64_t j = 0; j < len; ++j) {
            const acc_t v = static_cast<acc_t>(row[j]);
            acc[j] += v * v;
          }
        }
        const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
        for (int64_t j = 0; j < len; ++j) op[b * N + n0 + j] = acc_t(-0.5) * (acc[j] * inv_c);
      }
    });
  });
  return out;
}

at::Tensor log_likelihood_map_bwd_cpu(const at::Tensor& grad, const at::Tensor& z) {
  MSFLOW_CHECK_FLOAT(grad);
  MSFLOW_CHECK_FLOAT(z);
  MSFLOW_CHECK_DIM(z, 4);
  MSFLOW_CHECK_DIM(grad, 3);
  MSFLOW_CHECK_SAME_DEVICE(z, grad);
  const int64_t B = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3), N = H * W;
  TORCH_CHECK(grad.size(0) == B && grad.size(1) == H && grad.size(2) == W,
              "msflow_fast: grad must have shape [B, H, W] of z ", z.sizes(), ", got ", grad.sizes());
  at::Tensor zc = z.contiguous();
  at::Tensor g = grad.to(head_acc_dtype(z.scalar_type())).contiguous();
  at::Tensor out = new_output(z.sizes(), zc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "log_likelihood_map_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    const acc_t* gp = g.data_ptr<acc_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t scale = acc_t(-1) / static_cast<acc_t>(C);
    at::parallel_for(0, B * C, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const acc_t* grow = gp + (t / C) * N;
        const scalar_t* zrow = zp + t * N;
        scalar_t* orow = op + t * N;
        for (int64_t j = 0; j < N; ++j) {
          orow[j] = static_cast<scalar_t>(scale * grow[j] * static_cast<acc_t>(zrow[j]));
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Multi-scale aggregation and image scores

std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregate_anomaly_maps_fwd_cpu(at::TensorList maps,
                                                                               at::IntArrayRef output_size,
                                                                               double top_k) {
  check_head_maps(maps, output_size, top_k);
  const int64_t B = maps[0].size(0), H = output_size[0], W = output_size[1], N = H * W;
  const auto options = maps[0].options();
  at::Tensor map_add = new_output({B, H, W}, options);
  at::Tensor map_mul = new_output({B, H, W}, options);
  at::Tensor score = new_output({B}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps[0].scalar_type(), "aggregate_anomaly_maps_fwd_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto scales = prepare_scales<acc_t>(maps, H, W, /*with_prob=*/true);
    std::vector<acc_t> sum_prob(B * N), sum_log(B * N), max_prob, max_log;
    sum_upsampled(scales, B, H, W, sum_prob.data(), sum_log.data(), max_prob, max_log);
    scalar_t* add = map_add.data_ptr<scalar_t>();
    scalar_t* mul = map_mul.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / H;
        const acc_t ms = max_prob[b], ml = max_log[b];
        for (int64_t i = r * W; i < (r + 1) * W; ++i) {
          add[i] = static_cast<scalar_t>(ms - sum_prob[i]);
          mul[i] = static_cast<scalar_t>(acc_t(1) - std::exp(sum_log[i] - ml));  // max_P = exp(0) = 1
        }
      }
    });
    top_k_mean_rows(mul, B, N, head_top_k_count(N, top_k), score.data_ptr<scalar_t>());
  });
  return {map_add, map_mul, score};
}

at::Tensor log_space_score_fwd_cpu(at::TensorList maps, at::IntArrayRef output_size, double top_k) {
  check_head_maps(maps, output_size, top_k);
  const int64_t B = maps[0].size(0), H = output_size[0], W = output_size[1], N = H * W;
  at::Tensor score = new_output({B}, maps[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps[0].scalar_type(), "log_space_score_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto scales = prepare_scales<acc_t>(maps, H, W, /*with_prob=*/false);
    std::vector<acc_t> sum_log(B * N), max_prob, max_log;
    sum_upsampled(scales, B, H, W, static_cast<acc_t*>(nullptr), sum_log.data(), max_prob, max_log);
    const int64_t k = head_top_k_count(N, top_k);
    scalar_t* sp = score.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* gap = sum_log.data() + b * N;
        for (int64_t i = 0; i < N; ++i) gap[i] = max_log[b] - gap[i];
        sp[b] = static_cast<scalar_t>(top_k_mean_inplace(gap, N, k));
      }
    });
  });
  return score;
}

}  // namespace msflow_fast

TORCH_LIBRARY_FRAGMENT(msflow_fast, m) {
  m.def("gaussian_nll_fwd(Tensor z, Tensor logdet) -> Tensor");
  m.def("gaussian_nll_bwd(Tensor grad, Tensor z) -> Tensor");
  m.def("log_likelihood_map_fwd(Tensor z) -> Tensor");
  m.def("log_likelihood_map_bwd(Tensor grad, Tensor z) -> Tensor");
  m.def(
      "aggregate_anomaly_maps_fwd(Tensor[] log_likelihood_maps, int[] output_size, float top_k) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("log_space_score_fwd(Tensor[] log_likelihood_maps, int[] output_size, float top_k) -> Tensor");
}

TORCH_LIBRARY_IMPL(msflow_fast, CPU, m) {
  m.impl("gaussian_nll_fwd", &msflow_fast::gaussian_nll_fwd_cpu);
  m.impl("gaussian_nll_bwd", &msflow_fast::gaussian_nll_bwd_cpu);
  m.impl("log_likelihood_map_fwd", &msflow_fast::log_likelihood_map_fwd_cpu);
  m.impl("log_likelihood_map_bwd", &msflow_fast::log_likelihood_map_bwd_cpu);
  m.impl("aggregate_anomaly_maps_fwd", &msflow_fast::aggregate_anomaly_maps_fwd_cpu);
  m.impl("log_space_score_fwd", &msflow_fast::log_space_score_fwd_cpu);
}
