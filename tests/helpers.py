"""Comparison helpers shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(
    name: str,
    actual: torch.Tensor,
    eager: torch.Tensor,
    exact: torch.Tensor,
    *,
    ratio: float = 2.0,
    atol: float | None = None,
) -> None:
    """``err(actual) <= ratio * err(eager) + atol`` with errors measured against a float64 result.

    ``eager`` is the reference op in ``actual``'s dtype, ``exact`` the reference in float64. For
    float64 inputs the check is a tight ``allclose``.
    """
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten output?)"
    if actual.dtype == torch.float64:
        torch.testing.assert_close(actual, exact, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
        return
    if atol is None:
        atol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[actual.dtype]
    scale = exact.abs().max().item() if exact.numel() else 0.0
    err, err_eager = max_abs_err(actual, exact), max_abs_err(eager, exact)
    bound = ratio * err_eager + atol * max(1.0, scale)
    assert err <= bound, f"{name}: max error {err:.3e} > {ratio} x eager error {err_eager:.3e} + atol (bound {bound:.3e})"


class TinyBackbone(nn.Module):
    """Three feature maps at strides 4 / 8 / 16 with 8 / 16 / 32 channels (batch norm included, to test eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.stem(x)
        b = self.layer2(a)
        return [a, b, self.layer3(b)]
