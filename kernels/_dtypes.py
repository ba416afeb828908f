"""Accumulation dtypes shared by the Triton launchers: float64 for float64 tensors, else float32."""

from __future__ import annotations

import torch
import triton.language as tl


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Torch dtype of the arithmetic, log-dets, statistics and per-channel parameters."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype) -> tl.dtype:
    """The same, as the Triton dtype passed to kernels as a constexpr."""
    return tl.float64 if dtype == torch.float64 else tl.float32
