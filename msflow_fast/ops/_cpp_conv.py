"""C++ backend of the subnet convolution (``msflow_fast._C``, csrc/conv.cpp): Winograd F(4x4, 3x3)
on CPU tensors at inference, ``F.conv2d`` (oneDNN / cuDNN) otherwise.

Importing this module raises ``ImportError`` when the extension is not available.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._extension import extension_ops

_ops = extension_ops("conv3x3_winograd_fwd", "the Winograd convolution (csrc/conv.cpp)")


@torch.library.register_fake("msflow_fast::conv3x3_winograd_fwd")
def _winograd_fwd_fake(x, weight_winograd, bias):
    b, _, h, w = x.shape
    return x.new_empty((b, weight_winograd.shape[1], h, w))


def conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, weight_winograd: torch.Tensor | None = None
) -> torch.Tensor:
    """3x3 convolution; see :func:`msflow_fast.ops.reference.conv3x3` and :func:`msflow_fast.ops.conv3x3`."""
    if (
        weight_winograd is None
        or torch.is_grad_enabled()
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
    ):
        return F.conv2d(x, weight, bias, padding=1)
    return _ops.conv3x3_winograd_fwd(x, weight_winograd, bias)


__all__ = ["conv3x3"]
