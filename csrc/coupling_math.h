// The flow-block maths shared by the CPU (csrc/coupling.cpp) and CUDA (csrc/cuda/coupling.cu)
// kernels: soft clamps, shift factor, global scale. Each function takes a `Math` policy that
// supplies exp, log1p, tanh and atan for the device (CPU: vectorisable approximations; CUDA:
// the device library). The formulas are those of msflow_fast/ops/reference.py.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace msflow_fast {
namespace coupling {

// Clamp forms and global-affine types, as parsed from the op's string arguments.
constexpr int64_t kTanh = 0;        // alpha * tanh(0.1 a)          (FrEIA 0.2)
constexpr int64_t kTanhScaled = 1;  // alpha * tanh(0.1 a / alpha)  (FrEIA >= 2023-08)
constexpr int64_t kAtan = 2;        // alpha * 0.636 * atan(a / alpha) (fusion layer)
constexpr int64_t kSoftplus = 0;    // 0.1 * softplus_{beta=0.5}(gamma)
constexpr int64_t kSigmoid = 1;     // 10 * sigmoid(gamma - 2)
constexpr int64_t kExp = 2;         // exp(gamma)

// s = f(a_s)
template <int64_t FORM, class Math, typename T>
C10_HOST_DEVICE inline T soft_clamp(T a, T alpha) {
  if constexpr (FORM == kTanh) {
    return alpha * Math::tanh(T(0.1) * a);
  } else if constexpr (FORM == kTanhScaled) {
    return alpha * Math::tanh(T(0.1) * a / alpha);
  } else {
    return alpha * T(0.636) * Math::atan(a / alpha);
  }
}

// s = f(a_s) and ds = f'(a_s)
template <int64_t FORM, class Math, typename T>
C10_HOST_DEVICE inline T soft_clamp_and_grad(T a, T alpha, T& ds) {
  if constexpr (FORM == kTanh) {
    const T th = Math::tanh(T(0.1) * a);
    ds = alpha * T(0.1) * (T(1) - th * th);
    return alpha * th;
  } else if constexpr (FORM == kTanhScaled) {
    const T th = Math::tanh(T(0.1) * a / alpha);
    ds = T(0.1) * (T(1) - th * th);
    return alpha * th;
  } else {
    const T r = a / alpha;
    ds = T(0.636) / (T(1) + r * r);
    return alpha * T(0.636) * Math::atan(r);
  }
}

// t = k * a_t with k = 0.1 (tanh forms) or 1 (atan)
template <int64_t FORM, typename T>
C10_HOST_DEVICE constexpr T shift_factor() {
  return FORM == kAtan ? T(1) : T(0.1);
}

// g = psi(gamma) and dg = psi'(gamma); SOFTPLUS mirrors F.softplus(beta=0.5, threshold=20)
template <class Math, typename T>
C10_HOST_DEVICE inline T global_scale_and_grad(T gamma, int64_t affine_type, T& dg) {
  if (affine_type == kSoftplus) {
    const T z = T(0.5) * gamma;
    if (z > T(20)) {
      dg = T(0.1);
      return T(0.1) * gamma;
    }
    dg = T(0.1) / (T(1) + Math::exp(-z));
    return T(0.2) * Math::log1p(Math::exp(z));
  }
  if (affine_type == kSigmoid) {
    const T sig = T(1) / (T(1) + Math::exp(T(2) - gamma));
    dg = T(10) * sig * (T(1) - sig);
    return T(10) * sig;
  }
  const T g = Math::exp(gamma);
  dg = g;
  return g;
}

}  // namespace coupling
}  // namespace msflow_fast
