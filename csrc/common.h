// Shared helpers for the msflow_fast C++/CUDA ops: argument checks that name the tensor,
// and output allocation (NaN-poisoned under MSFLOW_FAST_POISON_OUTPUTS=1 so tests catch
// elements a kernel forgot to write).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#define MSFLOW_CHECK_CONTIGUOUS(x) \
  TORCH_CHECK((x).is_contiguous(), "msflow_fast: ", #x, " must be contiguous, got strides ", (x).strides())
#define MSFLOW_CHECK_FLOAT(x)                                                                       \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()), "msflow_fast: ", #x, " must be floating, got ", \
              (x).scalar_type())
#define MSFLOW_CHECK_DIM(x, n) \
  TORCH_CHECK((x).dim() == (n), "msflow_fast: ", #x, " must be ", (n), "-D, got shape ", (x).sizes())
#define MSFLOW_CHECK_SAME_DEVICE(x, y)                                                                   \
  TORCH_CHECK((x).device() == (y).device(), "msflow_fast: ", #y, " is on ", (y).device(), " but ", #x, \
              " is on ", (x).device())
#define MSFLOW_CHECK_SAME_DTYPE(x, y)                                                                        \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), "msflow_fast: ", #y, " has dtype ", (y).scalar_type(), \
              " but ", #x, " has ", (x).scalar_type())

namespace msflow_fast {

// The accumulation dtype of the ops (log-dets, per-channel parameters and their gradients,
// statistics): float32 for float16/bfloat16/float32 inputs, float64 for float64.
inline at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }
inline at::ScalarType acc_dtype(const at::Tensor& x) { return acc_dtype(x.scalar_type()); }

inline bool poison_outputs() {
  static const bool enabled = [] {
    const char* value = std::getenv("MSFLOW_FAST_POISON_OUTPUTS");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  return enabled;
}

// at::empty, filled with NaN when MSFLOW_FAST_POISON_OUTPUTS=1 (tests only).
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs() && at::isFloatingType(options.dtype().toScalarType())) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

}  // namespace msflow_fast
