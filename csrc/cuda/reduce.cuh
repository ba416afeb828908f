// Warp- and block-wide reductions shared by the CUDA kernels (csrc/cuda/*.cu).
#pragma once

#include <cmath>

namespace msflow_fast {
namespace cuda_reduce {

template <typename T>
__device__ __forceinline__ T warp_reduce_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_reduce_max(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;
}

// Block-wide sum / max; the result is valid in thread 0. blockDim.x is a multiple of 32.
template <typename T>
__device__ T block_reduce_sum(T v) {
  __shared__ T partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_reduce_sum(v);
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? partial[lane] : T(0);
  if (warp == 0) v = warp_reduce_sum(v);
  return v;
}

template <typename T>
__device__ T block_reduce_max(T v) {
  __shared__ T partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_reduce_max(v);
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? partial[lane] : T(-INFINITY);
  if (warp == 0) v = warp_reduce_max(v);
  return v;
}

}  // namespace cuda_reduce
}  // namespace msflow_fast
