// Likelihood and anomaly-map ops: schemas and CPU kernels.
//
//   gaussian_nll_fwd(z [B, ...], logdet [B])            -> nll [B]      = 0.5 * sum z^2 - logdet
//   gaussian_nll_bwd(grad [B], z)                        -> grad_z       = grad[b] * z
//   log_likelihood_map_fwd(z [B, C, H, W])               -> [B, H, W]    = -0.5 * mean_c z^2
//   log_likelihood_map_bwd(grad [B, H, W], z)            -> grad_z       = -grad * z / C
//   aggregate_anomaly_maps_fwd(maps, output_size, top_k, log_space_score)
//                                                        -> (map_add, map_mul, score, score_log_space)
//                                                           (score_log_space [B] in nats, or [0] if not asked)
//   log_space_score_fwd(maps, output_size, top_k)        -> score [B]    (nats)
//   fastflow_anomaly_map_fwd(maps, output_size, log_space_score, log_offset)
//                                                        -> (anomaly_map, score, score_log_space)
//                                                           (score_log_space [B] in nats, or [0] if not asked)
//
// Accumulation is float32 for half/bfloat16/float32 inputs and float64 for float64 inputs.
// The CUDA kernels live in csrc/cuda/head.cu.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_math.h"

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

// Mean of the k largest of values[0:n] (values is reordered), summed in double. Used for double.
template <typename acc_t>
acc_t top_k_mean_inplace(acc_t* values, int64_t n, int64_t k) {
  std::nth_element(values, values + (k - 1), values + n, std::greater<acc_t>());
  double total = 0.0;
  for (int64_t i = 0; i < k; ++i) total += static_cast<double>(values[i]);
  return static_cast<acc_t>(total / static_cast<double>(k));
}

// ---------------------------------------------------------------------------------------------
// Top-k mean of float values by radix selection on the bit patterns.
//
// The anomaly maps it runs on are >= 0 (1 - exp(L - max L) and max L - L), but any float is
// handled: the key below orders every non-NaN float like `>` does (-0 just below +0, which
// does not change a sum) and ranks every NaN above +inf, as torch.topk does (so a NaN among
// the k largest makes the score NaN). Ties at the k-th value are filled with copies of it, so
// the result is the mean of torch.topk's values (summed in double, in another order).

// Order-preserving unsigned key of a float (see above); order_key_float inverts it (NaN -> NaN).
inline uint32_t float_order_key(float v) {
  const uint32_t b = bit_copy<uint32_t>(v);
  const uint32_t key = b ^ (static_cast<uint32_t>(static_cast<int32_t>(b) >> 31) | 0x80000000u);
  return (b & 0x7fffffffu) > 0x7f800000u ? 0xffffffffu : key;
}
inline float order_key_float(uint32_t key) {
  return bit_copy<float>((key & 0x80000000u) != 0 ? key ^ 0x80000000u : ~key);
}

constexpr int64_t kRadixBins = int64_t(1) << 16;  // one radix digit = 16 bits of the key
constexpr int64_t kSortCandidates = 2048;         // boundary-bin size below which it is sorted

struct TopKScratch {
  std::unique_ptr<uint32_t[]> hist;  // [kRadixBins]
  std::unique_ptr<uint32_t[]> cand;  // [n] keys of the boundary bin
  explicit TopKScratch(int64_t n) : hist(new uint32_t[kRadixBins]), cand(new uint32_t[std::max<int64_t>(n, 1)]) {}
  void clear() { std::fill(hist.get(), hist.get() + kRadixBins, 0u); }
};

// hist[high 16 bits of key(v)] += 1 for v in values[0:n]
inline void top_k_histogram(const float* values, int64_t n, uint32_t* hist) {
  for (int64_t i = 0; i < n; ++i) ++hist[float_order_key(values[i]) >> 16];
}

// Bin t of the k-th largest counted element (k >= 1, k <= total count): count(bins > t) < k
// <= count(bins >= t). Returns t and sets above = count(bins > t).
inline int64_t boundary_bin(const uint32_t* hist, int64_t k, int64_t& above) {
  int64_t t = kRadixBins - 1;
  above = 0;
  while (above + hist[t] < k) above += hist[t--];
  return t;
}

// Mean of the k largest of values[0:n] (1 <= k <= n), given the first-digit histogram of values
// in scratch.hist (overwritten).
inline float top_k_mean_from_histogram(const float* values, int64_t n, int64_t k, TopKScratch& scratch) {
  uint32_t* hist = scratch.hist.get();
  uint32_t* cand = scratch.cand.get();
  int64_t above = 0;
  const uint32_t t = static_cast<uint32_t>(boundary_bin(hist, k, above));
  // Sum of the values whose high digit is above t (vectorised, 8 double lanes) ...
  constexpr int kLanes = 8;
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = values[i + l];
      lanes[l] += (float_order_key(v) >> 16) > t ? static_cast<double>(v) : 0.0;
    }
  }
  double total = 0.0;
  for (; i < n; ++i) total += (float_order_key(values[i]) >> 16) > t ? static_cast<double>(values[i]) : 0.0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  // ... and the keys in bin t (branch-free compaction).
  int64_t m = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t key = float_order_key(values[j]);
    cand[m] = key;
    m += (key >> 16) == t;
  }
  const int64_t need = k - above;  // 1 <= need <= m
  if (m <= kSortCandidates) {
    std::nth_element(cand, cand + (need - 1), cand + m, std::greater<uint32_t>());
    for (int64_t j = 0; j < need; ++j) total += static_cast<double>(order_key_float(cand[j]));
  } else {
    // Second digit (the low 16 bits) on the candidates: exact keys, ties filled at the boundary.
    std::fill(hist, hist + kRadixBins, 0u);
    for (int64_t j = 0; j < m; ++j) ++hist[cand[j] & 0xffffu];
    int64_t above2 = 0;
    const uint32_t t2 = static_cast<uint32_t>(boundary_bin(hist, need, above2));
    for (int64_t j = 0; j < m; ++j) {
      total += (cand[j] & 0xffffu) > t2 ? static_cast<double>(order_key_float(cand[j])) : 0.0;
    }
    total += static_cast<double>(need - above2) * static_cast<double>(order_key_float((t << 16) | t2));
  }
  return static_cast<float>(total / static_cast<double>(k));
}

// Dispatch of the image top-k on acc_t: radix selection (float, histogram built row by row with
// top_k_add_row after scratch->clear()) or nth_element (double; values is reordered).
template <typename acc_t>
inline void top_k_add_row(const acc_t* row, int64_t n, TopKScratch* scratch) {
  if constexpr (std::is_same_v<acc_t, float>) top_k_histogram(row, n, scratch->hist.get());
}

template <typename acc_t>
inline acc_t top_k_mean_image(acc_t* values, int64_t n, int64_t k, TopKScratch* scratch) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return top_k_mean_from_histogram(values, n, k, *scratch);
  } else {
    return top_k_mean_inplace(values, n, k);
  }
}

// ---------------------------------------------------------------------------------------------
// Bilinear upsampling (align_corners=True), separable: each scale's rows are first upsampled
// along x (small: h rows of W), then each output row is a two-tap blend of those rows.

// Source taps of one axis: out index d reads i0[d], i1[d] with weights w0[d], w1[d].
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
struct Scale {
  at::Tensor logp;  // [B, h, w] in acc_t, contiguous
  int64_t h, w;
  int64_t row_offset;  // first row of this scale in the per-image x-upsampled buffers
  LinearTaps<acc_t> rows, cols;
};

template <typename acc_t>
std::vector<Scale<acc_t>> prepare_scales(at::TensorList maps, int64_t H, int64_t W, int64_t& total_rows) {
  std::vector<Scale<acc_t>> scales;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  total_rows = 0;
  for (const auto& m : maps) {
    Scale<acc_t> s;
    s.logp = m.to(acc_type).contiguous();
    s.h = m.size(1);
    s.w = m.size(2);
    s.row_offset = total_rows;
    total_rows += s.h;
    s.rows = linear_taps<acc_t>(s.h, H);
    s.cols = linear_taps<acc_t>(s.w, W);
    scales.push_back(std::move(s));
  }
  return scales;
}

// Maximum of x[0:n] (n >= 1), 16 independent lanes.
template <typename acc_t>
acc_t max_of(const acc_t* x, int64_t n) {
  constexpr int kLanes = 16;
  acc_t result = x[0];
  int64_t i = 0;
  if (n >= kLanes) {
    acc_t lanes[kLanes];
    for (int l = 0; l < kLanes; ++l) lanes[l] = x[l];
    for (i = kLanes; i + kLanes <= n; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) lanes[l] = lanes[l] < x[i + l] ? x[i + l] : lanes[l];
    }
    for (int l = 0; l < kLanes; ++l) result = std::max(result, lanes[l]);
  }
  for (; i < n; ++i) result = std::max(result, x[i]);
  return result;
}

// Per-thread buffers of the image pipeline.
template <typename acc_t>
struct ImageBuffers {
  std::vector<acc_t> xlog, xprob;  // [total_rows, W] rows upsampled along x
  std::vector<acc_t> src_prob;     // [max w] exp(logp - max logp) of one source row
  ImageBuffers(int64_t total_rows, int64_t W, int64_t max_w, bool with_prob)
      : xlog(total_rows * W), xprob(with_prob ? total_rows * W : 0), src_prob(with_prob ? max_w : 0) {}
};

template <typename acc_t>
inline void upsample_x(const acc_t* src, const LinearTaps<acc_t>& cols, int64_t W, acc_t* out) {
  const int64_t* c0 = cols.i0.data();
  const int64_t* c1 = cols.i1.data();
  const acc_t* w0 = cols.w0.data();
  const acc_t* w1 = cols.w1.data();
  for (int64_t x = 0; x < W; ++x) out[x] = w0[x] * src[c0[x]] + w1[x] * src[c1[x]];
}

// Fills buf.xlog (and buf.xprob: exp(logp - max logp), per scale) for image b.
template <typename acc_t>
void upsample_image_x(const std::vector<Scale<acc_t>>& scales, int64_t b, int64_t W, ImageBuffers<acc_t>& buf) {
  const bool with_prob = !buf.xprob.empty();
  for (const auto& s : scales) {
    const acc_t* x = s.logp.template data_ptr<acc_t>() + b * s.h * s.w;
    const acc_t mx = with_prob ? max_of(x, s.h * s.w) : acc_t(0);
    for (int64_t i = 0; i < s.h; ++i) {
      const acc_t* row = x + i * s.w;
      upsample_x(row, s.cols, W, buf.xlog.data() + (s.row_offset + i) * W);
      if (with_prob) {
        acc_t* pr = buf.src_prob.data();
        for (int64_t j = 0; j < s.w; ++j) pr[j] = exp_approx(row[j] - mx);
        upsample_x(static_cast<const acc_t*>(pr), s.cols, W, buf.xprob.data() + (s.row_offset + i) * W);
      }
    }
  }
}

// out[0:W] = sum over scales of the y-blend of the x-upsampled rows (xrows) at output row y.
template <typename acc_t>
inline void sum_row(const std::vector<Scale<acc_t>>& scales, const acc_t* xrows, int64_t y, int64_t W, acc_t* out) {
  bool first = true;
  for (const auto& s : scales) {
    const acc_t* r0 = xrows + (s.row_offset + s.rows.i0[y]) * W;
    const acc_t* r1 = xrows + (s.row_offset + s.rows.i1[y]) * W;
    const acc_t h0 = s.rows.w0[y], h1 = s.rows.w1[y];
    if (first) {
      for (int64_t x = 0; x < W; ++x) out[x] = h0 * r0[x] + h1 * r1[x];
    } else {
      for (int64_t x = 0; x < W; ++x) out[x] += h0 * r0[x] + h1 * r1[x];
    }
    first = false;
  }
}

// ---------------------------------------------------------------------------------------------
// FastFlow map: bilinear resampling with align_corners=False (PyTorch's rule) of per-scale values.

// Source taps of one axis (align_corners=False), computed in double as reference.bilinear_taps does
// (src = max(0, (d + 0.5) * (in / out) - 0.5), each operation rounded, no FMA; i0 = min(floor(src),
// in - 1), i1 = min(i0 + 1, in - 1), weight src - i0 on i1), so that a weight is exactly zero where
// the reference's is (a tiny weight on a tap far above the others moves the log-space score);
// the identity when in == out (PyTorch's rule for the map; the same log-space value).
template <typename acc_t>
LinearTaps<acc_t> half_pixel_taps(int64_t in_size, int64_t out_size) {
  LinearTaps<acc_t> taps;
  taps.i0.resize(out_size);
  taps.i1.resize(out_size);
  taps.w0.resize(out_size);
  taps.w1.resize(out_size);
  const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  for (int64_t d = 0; d < out_size; ++d) {
    int64_t i0 = d;
    double w1 = 0.0;
    if (in_size != out_size) {
      volatile double scaled = (static_cast<double>(d) + 0.5) * scale;  // rounded before the subtraction
      const double src = std::max(scaled - 0.5, 0.0);
      i0 = std::min(static_cast<int64_t>(std::floor(src)), in_size - 1);
      w1 = src - static_cast<double>(i0);
    }
    taps.i0[d] = i0;
    taps.i1[d] = i0 + (i0 < in_size - 1 && in_size != out_size ? 1 : 0);
    taps.w1[d] = static_cast<acc_t>(w1);
    taps.w0[d] = static_cast<acc_t>(1.0 - w1);
  }
  return taps;
}

// exp(v) over the whole float range: below the smallest normal result, exp(v + 64 ln 2) * 2^-64
// rounds to the denormal (0 below about -103.97, as std::exp); +inf above FLT_MAX; exp_approx in
// between. Double: std::exp.
inline float exp_full_range(float v) {
  const float e = exp_approx(v);
  const float tiny = exp_approx(v + 44.3614195558365f) * 5.42101086242752217e-20f;
  const float low = select_bits(-static_cast<int32_t>(v < -87.3365447f), tiny, e);
  return select_bits(-static_cast<int32_t>(v > 88.7228394f), std::numeric_limits<float>::infinity(), low);
}
inline double exp_full_range(double v) { return std::exp(v); }

// Whether a value is finite (not inf or NaN), by the float's exponent bits (vectorisable).
inline bool is_finite_value(float v) { return (float_bits(v) & 0x7f800000) != 0x7f800000; }
inline bool is_finite_value(double v) { return std::isfinite(v); }

template <typename acc_t>
struct FastflowScale {
  at::Tensor logp;        // [B, h, w] in acc_t, contiguous
  int64_t h, w;
  int64_t offset;         // first value of this scale in an image's [T] exp buffer
  int64_t row_offset;     // first row of this scale in the per-thread row buffers
  LinearTaps<acc_t> rows, cols;
};

// Per-thread rows of one task: x-upsampled exp rows, and (log space) the two column taps of log rows.
template <typename acc_t>
struct FastflowBuffers {
  std::vector<acc_t> xprob, tap0, tap1;  // [total_rows, W]
  std::vector<acc_t> sum, top, lse;      // [W]
  FastflowBuffers(int64_t total_rows, int64_t W, bool log_space)
      : xprob(total_rows * W), tap0(log_space ? total_rows * W : 0), tap1(log_space ? total_rows * W : 0),
        sum(W), top(log_space ? W : 0), lse(log_space ? W : 0) {}
};

}  // namespace

void check_per_sample(const at::Tensor& z, const at::Tensor& per_sample, const char* name) {
  MSFLOW_CHECK_FLOAT(z);
  TORCH_CHECK(at::isFloatingType(per_sample.scalar_type()), "msflow_fast: ", name, " must be floating, got ",
              per_sample.scalar_type());
  TORCH_CHECK(per_sample.dim() == 1, "msflow_fast: ", name, " must be 1-D, got shape ", per_sample.sizes());
  TORCH_CHECK(per_sample.device() == z.device(), "msflow_fast: ", name, " is on ", per_sample.device(),
              " but z is on ", z.device());
  TORCH_CHECK(z.dim() >= 1 && z.size(0) == per_sample.size(0), "msflow_fast: ", name,
              " must have shape [B] with B = z.size(0), got z ", z.sizes(), " and ", name, " ", per_sample.sizes());
}

void check_log_likelihood_map(const at::Tensor& z) {
  MSFLOW_CHECK_FLOAT(z);
  MSFLOW_CHECK_DIM(z, 4);
}

void check_log_likelihood_map_bwd(const at::Tensor& grad, const at::Tensor& z) {
  MSFLOW_CHECK_FLOAT(grad);
  check_log_likelihood_map(z);
  MSFLOW_CHECK_DIM(grad, 3);
  MSFLOW_CHECK_SAME_DEVICE(z, grad);
  TORCH_CHECK(grad.size(0) == z.size(0) && grad.size(1) == z.size(2) && grad.size(2) == z.size(3),
              "msflow_fast: grad must have shape [B, H, W] of z ", z.sizes(), ", got ", grad.sizes());
}

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

void check_fastflow_maps(at::TensorList maps, at::IntArrayRef output_size, double log_offset) {
  check_head_maps(maps, output_size, /*top_k=*/1.0);
  TORCH_CHECK(std::isfinite(log_offset), "msflow_fast: log_offset must be a finite number, got ", log_offset);
}

int64_t head_top_k_count(int64_t num_pixels, double top_k) {
  return std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(num_pixels) * top_k));
}

// ---------------------------------------------------------------------------------------------
// Gaussian NLL

at::Tensor gaussian_nll_fwd_cpu(const at::Tensor& z, const at::Tensor& logdet) {
  check_per_sample(z, logdet, "logdet");
  const int64_t B = z.size(0);
  const int64_t N = B > 0 ? z.numel() / B : 0;
  const auto acc_type = acc_dtype(z.scalar_type());
  at::Tensor zc = z.contiguous();
  at::Tensor ld = logdet.to(acc_type).contiguous();
  at::Tensor out = new_output({B}, z.options().dtype(acc_type));
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
  check_per_sample(z, grad, "grad");
  const int64_t B = z.size(0);
  const int64_t N = B > 0 ? z.numel() / B : 0;
  at::Tensor zc = z.contiguous();
  at::Tensor g = grad.to(acc_dtype(z.scalar_type())).contiguous();
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
  check_log_likelihood_map(z);
  const int64_t B = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3), N = H * W;
  const auto acc_type = acc_dtype(z.scalar_type());
  at::Tensor zc = z.contiguous();
  at::Tensor out = new_output({B, H, W}, z.options().dtype(acc_type));
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
  check_log_likelihood_map_bwd(grad, z);
  const int64_t B = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3), N = H * W;
  at::Tensor zc = z.contiguous();
  at::Tensor g = grad.to(acc_dtype(z.scalar_type())).contiguous();
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aggregate_anomaly_maps_fwd_cpu(
    at::TensorList maps, at::IntArrayRef output_size, double top_k, bool log_space_score) {
  check_head_maps(maps, output_size, top_k);
  const int64_t B = maps[0].size(0), H = output_size[0], W = output_size[1], N = H * W;
  const int64_t k = head_top_k_count(N, top_k);
  const auto options = maps[0].options();
  at::Tensor map_add = new_output({B, H, W}, options);
  at::Tensor map_mul = new_output({B, H, W}, options);
  at::Tensor score = new_output({B}, options);
  at::Tensor score_log = new_output({log_space_score ? B : 0}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps[0].scalar_type(), "aggregate_anomaly_maps_fwd_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;  // float32 / float64: sums built in the outputs
    constexpr bool kFloat = std::is_same_v<acc_t, float>;         // radix top-k (else nth_element, double)
    int64_t total_rows = 0, max_w = 1;
    const auto scales = prepare_scales<acc_t>(maps, H, W, total_rows);
    for (const auto& s : scales) max_w = std::max(max_w, s.w);
    scalar_t* add = map_add.data_ptr<scalar_t>();
    scalar_t* mul = map_mul.data_ptr<scalar_t>();
    scalar_t* sp = score.data_ptr<scalar_t>();
    scalar_t* slp = log_space_score ? score_log.data_ptr<scalar_t>() : nullptr;
    // One image per task: x-upsampled rows, row sums with maxima, maps, then the top-k means,
    // all on per-thread buffers that stay in cache.
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      ImageBuffers<acc_t> buf(total_rows, W, max_w, /*with_prob=*/true);
      std::unique_ptr<acc_t[]> own_prob(kSameType ? nullptr : new acc_t[N]);
      std::unique_ptr<acc_t[]> own_log(kSameType && kFloat ? nullptr : new acc_t[N]);
      std::unique_ptr<acc_t[]> gap(log_space_score ? new acc_t[N] : nullptr);  // max L - L (nats)
      std::unique_ptr<TopKScratch> topk(kFloat ? new TopKScratch(N) : nullptr);
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t* add_b = add + b * N;
        scalar_t* mul_b = mul + b * N;
        acc_t* sum_prob = kSameType ? reinterpret_cast<acc_t*>(add_b) : own_prob.get();
        acc_t* sum_log = kSameType ? reinterpret_cast<acc_t*>(mul_b) : own_log.get();
        upsample_image_x(scales, b, W, buf);
        acc_t max_prob = std::numeric_limits<acc_t>::lowest(), max_log = max_prob;
        for (int64_t y = 0; y < H; ++y) {
          sum_row(scales, buf.xprob.data(), y, W, sum_prob + y * W);
          sum_row(scales, buf.xlog.data(), y, W, sum_log + y * W);
          max_prob = std::max(max_prob, max_of(sum_prob + y * W, W));
          max_log = std::max(max_log, max_of(sum_log + y * W, W));
        }
        // map_add = max S - S; map_mul = max P - P = 1 - exp(L - max L). The float top-k reads
        // map_mul as rounded to scalar_t: in place (float32) or in sum_log (half, bfloat16).
        acc_t* rounded_mul = kSameType ? reinterpret_cast<acc_t*>(mul_b) : sum_log;
        if constexpr (kFloat) topk->clear();
        for (int64_t y = 0; y < H; ++y) {
          if (log_space_score) {
            for (int64_t i = y * W; i < (y + 1) * W; ++i) gap[i] = max_log - sum_log[i];
          }
          for (int64_t i = y * W; i < (y + 1) * W; ++i) {
            add_b[i] = static_cast<scalar_t>(max_prob - sum_prob[i]);
            const scalar_t m = static_cast<scalar_t>(acc_t(1) - exp_approx(sum_log[i] - max_log));
            mul_b[i] = m;
            if constexpr (!kSameType) rounded_mul[i] = static_cast<acc_t>(m);
          }
          if constexpr (kFloat) top_k_add_row(rounded_mul + y * W, W, topk.get());
        }
        if constexpr (kFloat) {
          sp[b] = static_cast<scalar_t>(top_k_mean_image(rounded_mul, N, k, topk.get()));
        } else {
          std::copy(mul_b, mul_b + N, own_log.get());
          sp[b] = static_cast<scalar_t>(top_k_mean_image(own_log.get(), N, k, topk.get()));
        }
        if (log_space_score) {  // the same selection as log_space_score_fwd_cpu, on the same L
          if constexpr (kFloat) {
            topk->clear();
            for (int64_t y = 0; y < H; ++y) top_k_add_row(gap.get() + y * W, W, topk.get());
          }
          slp[b] = static_cast<scalar_t>(top_k_mean_image(gap.get(), N, k, topk.get()));
        }
      }
    });
  });
  return {map_add, map_mul, score, score_log};
}

at::Tensor log_space_score_fwd_cpu(at::TensorList maps, at::IntArrayRef output_size, double top_k) {
  check_head_maps(maps, output_size, top_k);
  const int64_t B = maps[0].size(0), H = output_size[0], W = output_size[1], N = H * W;
  const int64_t k = head_top_k_count(N, top_k);
  at::Tensor score = new_output({B}, maps[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps[0].scalar_type(), "log_space_score_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kFloat = std::is_same_v<acc_t, float>;
    int64_t total_rows = 0;
    const auto scales = prepare_scales<acc_t>(maps, H, W, total_rows);
    scalar_t* sp = score.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      ImageBuffers<acc_t> buf(total_rows, W, 1, /*with_prob=*/false);
      std::unique_ptr<acc_t[]> gap(new acc_t[N]);
      std::unique_ptr<TopKScratch> topk(kFloat ? new TopKScratch(N) : nullptr);
      for (int64_t b = b0; b < b1; ++b) {
        upsample_image_x(scales, b, W, buf);
        acc_t max_log = std::numeric_limits<acc_t>::lowest();
        for (int64_t y = 0; y < H; ++y) {
          sum_row(scales, buf.xlog.data(), y, W, gap.get() + y * W);
          max_log = std::max(max_log, max_of(gap.get() + y * W, W));
        }
        if constexpr (kFloat) topk->clear();
        for (int64_t y = 0; y < H; ++y) {
          acc_t* row = gap.get() + y * W;
          for (int64_t x = 0; x < W; ++x) row[x] = max_log - row[x];
          if constexpr (kFloat) top_k_add_row(row, W, topk.get());
        }
        sp[b] = static_cast<scalar_t>(top_k_mean_image(gap.get(), N, k, topk.get()));
      }
    });
  });
  return score;
}

// ---------------------------------------------------------------------------------------------
// FastFlow map and scores (reference.fastflow_anomaly_map), one pass over the output pixels:
//   1. per image, P_k = exp(L_k + log_offset) on the low-res grids (and whether L holds a NaN);
//   2. per task (image, block of output rows): the source rows it needs, upsampled along x
//      (P rows blended, and for the log-space score the two column taps of the L rows gathered),
//      then per output row: the map -mean_k Up(P_k) and, for the log-space score, the exact
//      logsumexp over scales and taps of (log w + L): max over taps of nonzero weight, then
//      sum of w exp(L - max); per-task maxima of both, and a NaN flag;
//   3. per image: score = max of the map, score_log_space = max of -(lse + log_offset - log K),
//      both NaN when the image's maps (or its map) hold a NaN.

namespace {

template <typename scalar_t>
void fastflow_anomaly_map_kernel(at::TensorList maps, int64_t H, int64_t W, bool log_space_score, double log_offset,
                                 at::Tensor& anomaly_map, at::Tensor& score, at::Tensor& score_log) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = maps[0].size(0), K = static_cast<int64_t>(maps.size());
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  std::vector<FastflowScale<acc_t>> scales;
  int64_t T = 0, total_rows = 0;
  for (const auto& m : maps) {
    FastflowScale<acc_t> s;
    s.logp = m.to(acc_type).contiguous();
    s.h = m.size(1);
    s.w = m.size(2);
    s.offset = T;
    s.row_offset = total_rows;
    s.rows = half_pixel_taps<acc_t>(s.h, H);
    s.cols = half_pixel_taps<acc_t>(s.w, W);
    T += s.h * s.w;
    total_rows += s.h;
    scales.push_back(std::move(s));
  }
  const acc_t offset = static_cast<acc_t>(log_offset);
  const acc_t inv_k = acc_t(1) / static_cast<acc_t>(K);
  const acc_t nats_shift = offset - static_cast<acc_t>(std::log(static_cast<double>(K)));
  // 1. exp on the low-res grids, NaN flags
  std::vector<acc_t> prob(B * T);
  std::vector<uint8_t> input_nan(B, 0);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int32_t nans = 0;
      for (const auto& s : scales) {
        const acc_t* x = s.logp.template data_ptr<acc_t>() + b * s.h * s.w;
        acc_t* p = prob.data() + b * T + s.offset;
#pragma omp simd reduction(| : nans)
        for (int64_t j = 0; j < s.h * s.w; ++j) {
          p[j] = exp_full_range(x[j] + offset);
          nans |= static_cast<int32_t>(x[j] != x[j]);
        }
      }
      input_nan[b] = nans != 0;
    }
  });
  // 2. tasks of output rows
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t blocks_per_image = std::max<int64_t>(1, std::min<int64_t>((4 * threads + B - 1) / B, (H + 7) / 8));
  const int64_t rows_per_block = (H + blocks_per_image - 1) / blocks_per_image;
  const int64_t tasks = B * blocks_per_image;
  std::vector<acc_t> task_map_max(tasks), task_nats_max(tasks);
  std::vector<uint8_t> task_nan(tasks, 0);
  scalar_t* map_out = anomaly_map.data_ptr<scalar_t>();
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    FastflowBuffers<acc_t> buf(total_rows, W, log_space_score);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / blocks_per_image;
      const int64_t ya = (t % blocks_per_image) * rows_per_block, yb = std::min(H, ya + rows_per_block);
      acc_t map_max = -std::numeric_limits<acc_t>::infinity(), nats_max = map_max;
      int32_t nans = 0;
      if (ya >= yb) {
        task_map_max[t] = map_max;
        task_nats_max[t] = nats_max;
        continue;
      }
      for (const auto& s : scales) {  // the source rows of output rows [ya, yb), upsampled along x
        const int64_t* c0 = s.cols.i0.data();
        const int64_t* c1 = s.cols.i1.data();
        const acc_t* w0 = s.cols.w0.data();
        const acc_t* w1 = s.cols.w1.data();
        for (int64_t r = s.rows.i0[ya]; r <= s.rows.i1[yb - 1]; ++r) {
          const acc_t* p = prob.data() + b * T + s.offset + r * s.w;
          acc_t* xp = buf.xprob.data() + (s.row_offset + r) * W;
          for (int64_t x = 0; x < W; ++x) xp[x] = w0[x] * p[c0[x]] + w1[x] * p[c1[x]];
          if (log_space_score) {
            const acc_t* l = s.logp.template data_ptr<acc_t>() + b * s.h * s.w + r * s.w;
            acc_t* g0 = buf.tap0.data() + (s.row_offset + r) * W;
            acc_t* g1 = buf.tap1.data() + (s.row_offset + r) * W;
            for (int64_t x = 0; x < W; ++x) {
              g0[x] = l[c0[x]];
              g1[x] = l[c1[x]];
            }
          }
        }
      }
      for (int64_t y = ya; y < yb; ++y) {
        acc_t* sum = buf.sum.data();
        std::fill(sum, sum + W, acc_t(0));
        for (const auto& s : scales) {
          const acc_t* r0 = buf.xprob.data() + (s.row_offset + s.rows.i0[y]) * W;
          const acc_t* r1 = buf.xprob.data() + (s.row_offset + s.rows.i1[y]) * W;
          const acc_t h0 = s.rows.w0[y], h1 = s.rows.w1[y];
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) sum[x] += h0 * r0[x] + h1 * r1[x];
        }
        scalar_t* out_row = map_out + (b * H + y) * W;
#pragma omp simd reduction(max : map_max) reduction(| : nans)
        for (int64_t x = 0; x < W; ++x) {
          const acc_t v = -sum[x] * inv_k;
          out_row[x] = static_cast<scalar_t>(v);
          map_max = v > map_max ? v : map_max;
          nans |= static_cast<int32_t>(v != v);
        }
        if (!log_space_score) continue;
        acc_t* top = buf.top.data();
        acc_t* lse = buf.lse.data();
        std::fill(top, top + W, -std::numeric_limits<acc_t>::infinity());
        for (const auto& s : scales) {  // max over the taps of nonzero weight
          const acc_t* a0 = buf.tap0.data() + (s.row_offset + s.rows.i0[y]) * W;
          const acc_t* a1 = buf.tap1.data() + (s.row_offset + s.rows.i0[y]) * W;
          const acc_t* b0 = buf.tap0.data() + (s.row_offset + s.rows.i1[y]) * W;
          const acc_t* b1 = buf.tap1.data() + (s.row_offset + s.rows.i1[y]) * W;
          const acc_t* w0 = s.cols.w0.data();
          const acc_t* w1 = s.cols.w1.data();
          const acc_t h0 = s.rows.w0[y], h1 = s.rows.w1[y];
          const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) {
            acc_t m = top[x];
            const acc_t v00 = h0 * w0[x] > acc_t(0) ? a0[x] : ninf;
            const acc_t v01 = h0 * w1[x] > acc_t(0) ? a1[x] : ninf;
            const acc_t v10 = h1 * w0[x] > acc_t(0) ? b0[x] : ninf;
            const acc_t v11 = h1 * w1[x] > acc_t(0) ? b1[x] : ninf;
            m = m < v00 ? v00 : m;
            m = m < v01 ? v01 : m;
            m = m < v10 ? v10 : m;
            m = m < v11 ? v11 : m;
            top[x] = m;
          }
        }
        std::fill(lse, lse + W, acc_t(0));
        for (const auto& s : scales) {  // sum of w exp(L - max) over the taps of nonzero weight
          const acc_t* a0 = buf.tap0.data() + (s.row_offset + s.rows.i0[y]) * W;
          const acc_t* a1 = buf.tap1.data() + (s.row_offset + s.rows.i0[y]) * W;
          const acc_t* b0 = buf.tap0.data() + (s.row_offset + s.rows.i1[y]) * W;
          const acc_t* b1 = buf.tap1.data() + (s.row_offset + s.rows.i1[y]) * W;
          const acc_t* w0 = s.cols.w0.data();
          const acc_t* w1 = s.cols.w1.data();
          const acc_t h0 = s.rows.w0[y], h1 = s.rows.w1[y];
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) {
            const acc_t shift = is_finite_value(top[x]) ? top[x] : acc_t(0);
            const acc_t q00 = h0 * w0[x], q01 = h0 * w1[x], q10 = h1 * w0[x], q11 = h1 * w1[x];
            acc_t total = q00 > acc_t(0) ? q00 * exp_approx(a0[x] - shift) : acc_t(0);
            total += q01 > acc_t(0) ? q01 * exp_approx(a1[x] - shift) : acc_t(0);
            total += q10 > acc_t(0) ? q10 * exp_approx(b0[x] - shift) : acc_t(0);
            total += q11 > acc_t(0) ? q11 * exp_approx(b1[x] - shift) : acc_t(0);
            lse[x] += total;
          }
        }
#pragma omp simd reduction(max : nats_max) reduction(| : nans)
        for (int64_t x = 0; x < W; ++x) {
          const acc_t m = top[x];
          const acc_t l = is_finite_value(m) ? m + log_approx(lse[x]) : m;
          const acc_t nats = -(l + nats_shift);
          nats_max = nats > nats_max ? nats : nats_max;
          nans |= static_cast<int32_t>(nats != nats);
        }
      }
      task_map_max[t] = map_max;
      task_nats_max[t] = nats_max;
      task_nan[t] = nans != 0;
    }
  });
  // 3. per-image scores
  scalar_t* sp = score.data_ptr<scalar_t>();
  scalar_t* slp = log_space_score ? score_log.data_ptr<scalar_t>() : nullptr;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  for (int64_t b = 0; b < B; ++b) {
    acc_t map_max = -std::numeric_limits<acc_t>::infinity(), nats_max = map_max;
    bool any_nan = input_nan[b] != 0;
    for (int64_t t = b * blocks_per_image; t < (b + 1) * blocks_per_image; ++t) {
      map_max = std::max(map_max, task_map_max[t]);
      nats_max = std::max(nats_max, task_nats_max[t]);
      any_nan = any_nan || task_nan[t] != 0;
    }
    sp[b] = static_cast<scalar_t>(any_nan ? nan : map_max);
    if (log_space_score) slp[b] = static_cast<scalar_t>(any_nan ? nan : nats_max);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fastflow_anomaly_map_fwd_cpu(at::TensorList maps,
                                                                             at::IntArrayRef output_size,
                                                                             bool log_space_score, double log_offset) {
  check_fastflow_maps(maps, output_size, log_offset);
  const int64_t B = maps[0].size(0), H = output_size[0], W = output_size[1];
  const auto options = maps[0].options();
  at::Tensor anomaly_map = new_output({B, H, W}, options);
  at::Tensor score = new_output({B}, options);
  at::Tensor score_log = new_output({log_space_score ? B : 0}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps[0].scalar_type(), "fastflow_anomaly_map_fwd_cpu", [&] {
    fastflow_anomaly_map_kernel<scalar_t>(maps, H, W, log_space_score, log_offset, anomaly_map, score, score_log);
  });
  return {anomaly_map, score, score_log};
}

}  // namespace msflow_fast

TORCH_LIBRARY_FRAGMENT(msflow_fast, m) {
  m.def("gaussian_nll_fwd(Tensor z, Tensor logdet) -> Tensor");
  m.def("gaussian_nll_bwd(Tensor grad, Tensor z) -> Tensor");
  m.def("log_likelihood_map_fwd(Tensor z) -> Tensor");
  m.def("log_likelihood_map_bwd(Tensor grad, Tensor z) -> Tensor");
  m.def(
      "aggregate_anomaly_maps_fwd(Tensor[] log_likelihood_maps, int[] output_size, float top_k, "
      "bool log_space_score=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("log_space_score_fwd(Tensor[] log_likelihood_maps, int[] output_size, float top_k) -> Tensor");
  m.def(
      "fastflow_anomaly_map_fwd(Tensor[] log_likelihood_maps, int[] output_size, bool log_space_score=False, "
      "float log_offset=0.0) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(msflow_fast, CPU, m) {
  m.impl("gaussian_nll_fwd", &msflow_fast::gaussian_nll_fwd_cpu);
  m.impl("gaussian_nll_bwd", &msflow_fast::gaussian_nll_bwd_cpu);
  m.impl("log_likelihood_map_fwd", &msflow_fast::log_likelihood_map_fwd_cpu);
  m.impl("log_likelihood_map_bwd", &msflow_fast::log_likelihood_map_bwd_cpu);
  m.impl("aggregate_anomaly_maps_fwd", &msflow_fast::aggregate_anomaly_maps_fwd_cpu);
  m.impl("log_space_score_fwd", &msflow_fast::log_space_score_fwd_cpu);
  m.impl("fastflow_anomaly_map_fwd", &msflow_fast::fastflow_anomaly_map_fwd_cpu);
}
