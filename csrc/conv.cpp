// 3x3 convolution (stride 1, zero padding 1) by Winograd F(4x4, 3x3) on the CPU, for inference:
//   conv3x3_winograd_fwd(x [B, Ci, H, W], weight_winograd [36, Co, Ci], bias [Co]?) -> y [B, Co, H, W]
// with weight_winograd = G w G^T per (co, ci), flattened row-major (p = 6 i + j), from
// msflow_fast/ops/reference.py: winograd_weight. It computes what F.conv2d(x, w, bias, padding=1)
// computes with 4x fewer multiplications (36 per 4x4 output tile instead of 144). Per block of
// up to kTileBlock tiles (4x4 output tiles numbered across rows and images):
//   1. input transform: every 6x6 input tile d (the output tile plus a 1-pixel halo; zeros outside
//      the image) becomes B^T d B, stored as V[ci, p, tile];
//   2. 36 matrix products M[p] = U[p] @ V[:, p]  ([Co, Ci] @ [Ci, tiles], one at::bmm);
//   3. output transform: y tile = A^T M[:, co, tile] A + bias, cut at the image border.
// Steps 1 and 3 take kLanes consecutive tiles at a time (any rows, any images: small grids fill
// the lanes too), so the transforms' inner loops run along the lanes and vectorise. float32 and
// float64; float32 rounding error is about 30x that of a direct convolution, ~1e-5 of the
// output's scale (tests/test_conv_ops.py).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "common.h"

namespace msflow_fast {
namespace {

constexpr int64_t kLanes = 16;  // tiles transformed together

// B^T (6x6) applied down a column of six lane vectors: out[k] = sum_i B^T[k][i] in[i].
template <typename T>
inline void input_transform_1d(const T* in, int64_t in_stride, T* out, int64_t out_stride) {
  const T* d0 = in;
  const T* d1 = in + in_stride;
  const T* d2 = in + 2 * in_stride;
  const T* d3 = in + 3 * in_stride;
  const T* d4 = in + 4 * in_stride;
  const T* d5 = in + 5 * in_stride;
  T* o0 = out;
  T* o1 = out + out_stride;
  T* o2 = out + 2 * out_stride;
  T* o3 = out + 3 * out_stride;
  T* o4 = out + 4 * out_stride;
  T* o5 = out + 5 * out_stride;
  for (int64_t l = 0; l < kLanes; ++l) {
    const T a = d4[l] - T(4) * d2[l];  // shared by o1, o2
    const T b = d3[l] - T(4) * d1[l];
    const T c = d4[l] - d2[l];          // shared by o3, o4
    const T e = T(2) * (d3[l] - d1[l]);
    o0[l] = T(4) * d0[l] - T(5) * d2[l] + d4[l];
    o1[l] = a + b;
    o2[l] = a - b;
    o3[l] = c + e;
    o4[l] = c - e;
    o5[l] = T(4) * d1[l] - T(5) * d3[l] + d5[l];
  }
}

// A^T (4x6) applied down a column of six lane vectors: out[k] = sum_i A^T[k][i] in[i].
template <typename T>
inline void output_transform_1d(const T* in, int64_t in_stride, T* out, int64_t out_stride) {
  const T* m0 = in;
  const T* m1 = in + in_stride;
  const T* m2 = in + 2 * in_stride;
  const T* m3 = in + 3 * in_stride;
  const T* m4 = in + 4 * in_stride;
  const T* m5 = in + 5 * in_stride;
  for (int64_t l = 0; l < kLanes; ++l) {
    const T s12 = m1[l] + m2[l], d12 = m1[l] - m2[l];
    const T s34 = m3[l] + m4[l], d34 = m3[l] - m4[l];
    out[l] = m0[l] + s12 + s34;
    out[out_stride + l] = d12 + T(2) * d34;
    out[2 * out_stride + l] = s12 + T(4) * s34;
    out[3 * out_stride + l] = d12 + T(8) * d34 + m5[l];
  }
}

// Tiles per pass of input transform -> products -> output transform: blocks keep V and M
// [36, C, block] small (at 64x64 grids, 256-tile blocks ran 1.5x faster than one pass over all
// tiles; from 64 to 1024 tiles made little difference). MSFLOW_FAST_WINOGRAD_BLOCK=n overrides it.
constexpr int64_t kTileBlock = 256;

inline int64_t tile_block(int64_t tiles) {
  static const int64_t configured = [] {
    const char* value = std::getenv("MSFLOW_FAST_WINOGRAD_BLOCK");
    const int64_t n = value != nullptr ? std::atoll(value) : 0;
    return n > 0 ? n : kTileBlock;
  }();
  return std::min(tiles, configured);
}

// The calling thread's scratch for V and M, grown as needed and kept, so the megabytes they take
// are not allocated (and, from freshly mapped memory, page-faulted in) on every call. Holds the
// largest V + M seen per thread that ran the op: up to about 30 MB at MSFlow's 512-px widths
// (batch 8, float32).
inline at::Tensor workspace(int64_t numel, const at::TensorOptions& options) {
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.scalar_type() != options.dtype().toScalarType() || buffer.numel() < numel) {
    buffer = at::Tensor();  // release the old one first
    buffer = at::empty({numel}, options);
  }
  return buffer.narrow(0, 0, numel);
}

// The tile grid: th x tw tiles of 4x4 outputs per image; tile t = (b * th + ty) * tw + tx.
struct TileGrid {
  int64_t B, H, W, th, tw;
  int64_t tiles() const { return B * th * tw; }
  int64_t padded_h() const { return 4 * th + 2; }  // staged input rows: zero halo and round-up included
  int64_t padded_w() const { return 4 * tw + 2; }
};

// Offset of tile t's top-left output pixel in y [B, C, 4 th, 4 tw] (channel c).
inline int64_t tile_output_offset(const TileGrid& g, int64_t channels, int64_t c, int64_t t) {
  const int64_t b = t / (g.th * g.tw), ty = (t / g.tw) % g.th, tx = t % g.tw;
  return ((b * channels + c) * 4 * g.th + 4 * ty) * 4 * g.tw + 4 * tx;
}

// x [B, C, H, W] with any strides (the channel halves of a flow block are strided views).
template <typename T>
struct InputView {
  const T* data;
  int64_t stride_b, stride_c, stride_h, stride_w;
};

// V[c, p, t - first] ([C, 36, tiles]: one channel's 36 rows together) for channel c and tiles
// first <= t < first + tiles (any rows, any images). The images these tiles touch are first
// staged, zero-padded (1-pixel halo, rows and columns rounded up to whole tiles), in a per-thread
// buffer that stays in cache; the lanes are kLanes consecutive tiles, so small grids fill them.
template <typename T>
void transform_input_channel(const InputView<T>& x, const TileGrid& g, int64_t c, int64_t first, int64_t tiles,
                             T* V) {
  const int64_t ph = g.padded_h(), pw = g.padded_w(), per_image = g.th * g.tw;
  const int64_t b0 = first / per_image, b1 = (first + tiles - 1) / per_image;
  thread_local std::vector<T> staged;
  staged.assign((b1 - b0 + 1) * ph * pw, T(0));
  for (int64_t b = b0; b <= b1; ++b) {
    for (int64_t r = 0; r < g.H; ++r) {
      const T* src = x.data + b * x.stride_b + c * x.stride_c + r * x.stride_h;
      T* dst = staged.data() + ((b - b0) * ph + r + 1) * pw + 1;
      for (int64_t q = 0; q < g.W; ++q) dst[q] = src[q * x.stride_w];
    }
  }
  alignas(64) T d[36 * kLanes];    // d[i][j][lane]: the 6x6 input tiles
  alignas(64) T tmp[36 * kLanes];  // B^T d
  alignas(64) T v[36 * kLanes];    // B^T d B
  int64_t base[kLanes];
  for (int64_t t0 = 0; t0 < tiles; t0 += kLanes) {
    const int64_t lanes = std::min(kLanes, tiles - t0);
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t t = first + t0 + std::min(l, lanes - 1);
      const int64_t b = t / per_image, ty = (t / g.tw) % g.th, tx = t % g.tw;
      base[l] = ((b - b0) * ph + 4 * ty) * pw + 4 * tx;
    }
    for (int64_t i = 0; i < 6; ++i) {
      for (int64_t j = 0; j < 6; ++j) {
        T* dst = d + (i * 6 + j) * kLanes;
        const T* src = staged.data() + i * pw + j;
        for (int64_t l = 0; l < kLanes; ++l) dst[l] = src[base[l]];
      }
    }
    for (int64_t j = 0; j < 6; ++j) input_transform_1d(d + j * kLanes, 6 * kLanes, tmp + j * kLanes, 6 * kLanes);
    for (int64_t i = 0; i < 6; ++i) input_transform_1d(tmp + i * 6 * kLanes, kLanes, v + i * 6 * kLanes, kLanes);
    T* v_c = V + c * 36 * tiles + t0;
    for (int64_t p = 0; p < 36; ++p) std::copy(v + p * kLanes, v + p * kLanes + lanes, v_c + p * tiles);
  }
}

// Output channel co of tiles first <= t < first + tiles in y [B, Co, 4 th, 4 tw], from
// M[p, co, t - first].
template <typename T>
void transform_output_channel(const T* M, const TileGrid& g, int64_t co, int64_t channels, int64_t first,
                              int64_t tiles, T bias, T* y) {
  const int64_t ow = 4 * g.tw;
  alignas(64) T m[36 * kLanes];    // m[i][j][lane]
  alignas(64) T tmp[24 * kLanes];  // A^T m: [4][6][lane]
  alignas(64) T out[16 * kLanes];  // A^T m A: [4][4][lane]
  int64_t base[kLanes];
  for (int64_t t0 = 0; t0 < tiles; t0 += kLanes) {
    const int64_t lanes = std::min(kLanes, tiles - t0);
    for (int64_t p = 0; p < 36; ++p) {
      const T* src = M + (p * channels + co) * tiles + t0;
      T* dst = m + p * kLanes;
      std::copy(src, src + lanes, dst);
      std::fill(dst + lanes, dst + kLanes, T(0));
    }
    for (int64_t j = 0; j < 6; ++j) output_transform_1d(m + j * kLanes, 6 * kLanes, tmp + j * kLanes, 6 * kLanes);
    for (int64_t i = 0; i < 4; ++i) output_transform_1d(tmp + i * 6 * kLanes, kLanes, out + i * 4 * kLanes, kLanes);
    for (int64_t l = 0; l < lanes; ++l) base[l] = tile_output_offset(g, channels, co, first + t0 + l);
    for (int64_t i = 0; i < 4; ++i) {
      for (int64_t j = 0; j < 4; ++j) {
        const T* src = out + (i * 4 + j) * kLanes;
        T* dst = y + i * ow + j;
        for (int64_t l = 0; l < lanes; ++l) dst[base[l]] = src[l] + bias;
      }
    }
  }
}

void check_winograd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu(), "msflow_fast: conv3x3_winograd_fwd runs on CPU tensors, got x on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "msflow_fast: conv3x3_winograd_fwd needs float32 or float64 x, got ", x.scalar_type());
  MSFLOW_CHECK_DIM(x, 4);
  MSFLOW_CHECK_DIM(weight, 3);
  MSFLOW_CHECK_SAME_DEVICE(x, weight);
  MSFLOW_CHECK_SAME_DTYPE(x, weight);
  TORCH_CHECK(weight.size(0) == 36 && weight.size(2) == x.size(1), "msflow_fast: weight_winograd must have shape [36, ",
              "C_out, ", x.size(1), "] for x ", x.sizes(), ", got ", weight.sizes());
  if (bias.has_value()) {
    MSFLOW_CHECK_SAME_DEVICE(x, *bias);
    MSFLOW_CHECK_SAME_DTYPE(x, *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(1), "msflow_fast: bias must have shape [",
                weight.size(1), "], got ", bias->sizes());
  }
}

}  // namespace

at::Tensor conv3x3_winograd_fwd_cpu(const at::Tensor& x, const at::Tensor& weight_winograd,
                                    const c10::optional<at::Tensor>& bias) {
  check_winograd(x, weight_winograd, bias);
  const int64_t B = x.size(0), Ci = x.size(1), H = x.size(2), W = x.size(3), Co = weight_winograd.size(1);
  if (B * Ci * H * W == 0 || Co == 0) return new_output({B, Co, H, W}, x.options());
  const TileGrid g{B, H, W, (H + 3) / 4, (W + 3) / 4};
  const bool whole_tiles = H == 4 * g.th && W == 4 * g.tw;
  at::Tensor y_tiles = whole_tiles ? new_output({B, Co, H, W}, x.options())
                                   : at::empty({B, Co, 4 * g.th, 4 * g.tw}, x.options());
  at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor U = weight_winograd.contiguous();
  const int64_t block = tile_block(g.tiles());
  at::Tensor buffers = workspace(36 * (Ci + Co) * block, x.options());
  at::Tensor V = buffers.narrow(0, 0, 36 * Ci * block).view({Ci, 36, block});
  at::Tensor M = buffers.narrow(0, 36 * Ci * block, 36 * Co * block).view({36, Co, block});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv3x3_winograd_fwd_cpu", [&] {
    const InputView<scalar_t> xv{x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
    const scalar_t* bp = bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y_tiles.data_ptr<scalar_t>();
    for (int64_t first = 0; first < g.tiles(); first += block) {
      const int64_t tiles = std::min(block, g.tiles() - first);
      // The last, shorter block gets its own (contiguous) buffers.
      at::Tensor v = tiles == block ? V : at::empty({Ci, 36, tiles}, x.options());
      at::Tensor m = tiles == block ? M : at::empty({36, Co, tiles}, x.options());
      scalar_t* vp = v.data_ptr<scalar_t>();
      at::parallel_for(0, Ci, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) transform_input_channel(xv, g, c, first, tiles, vp);
      });
      at::bmm_out(m, U, v.permute({1, 0, 2}));  // [36, Co, tiles]; V read as [36, Ci, tiles], ld 36 * tiles
      const scalar_t* mp = m.data_ptr<scalar_t>();
      at::parallel_for(0, Co, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t co = c0; co < c1; ++co) {
          transform_output_channel(mp, g, co, Co, first, tiles, bp ? bp[co] : scalar_t(0), yp);
        }
      });
    }
  });
  if (whole_tiles) return y_tiles;
  at::Tensor y = new_output({B, Co, H, W}, x.options());
  y.copy_(y_tiles.narrow(2, 0, H).narrow(3, 0, W));
  return y;
}

}  // namespace msflow_fast

TORCH_LIBRARY_FRAGMENT(msflow_fast, m) {
  m.def("conv3x3_winograd_fwd(Tensor x, Tensor weight_winograd, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(msflow_fast, CPU, m) {
  m.impl("conv3x3_winograd_fwd", &msflow_fast::conv3x3_winograd_fwd_cpu);
}
