// Warp- and block-wide reductions shared by the CUDA kernels (csrc/cuda/*.cu).
#pragma once

#include <cmath>

namespace msflow_fast {
namespace cuda_reduce {

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return max(a, b); }
};

template <typename Op, typename T>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;
}

// Block-wide reduction with `op` (identity `identity`); the result is valid in thread 0.
// blockDim.x is a multiple of 32. Each Op has its own shared buffer, as separate functions did.
template <typename Op, typename T>
__device__ T block_reduce(T v, Op op, T identity) {
  __shared__ T partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_reduce(v, op);
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? partial[lane] : identity;
  if (warp == 0) v = warp_reduce(v, op);
  return v;
}

template <typename T>
__device__ __forceinline__ T block_reduce_sum(T v) {
  return block_reduce(v, SumOp{}, T(0));
}

template <typename T>
__device__ __forceinline__ T block_reduce_max(T v) {
  return block_reduce(v, MaxOp{}, T(-INFINITY));
}

}  // namespace cuda_reduce
}  // namespace msflow_fast
