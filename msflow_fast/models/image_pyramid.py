"""The parts shared by the models that run one frozen extractor on an image pyramid and one flow
over the three feature maps (CS-Flow and ``msflow_aas``): the pyramid's features, the per-dimension
Gaussian negative log-likelihood, and :class:`ImagePyramidFlowModel`, their common pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import enable_fast_paths
from .base import AnomalyModel, as_batch
from .extractor import FeatureExtractor

LEVELS = 3
"""Scales of the pyramid: the image, its half and its quarter."""


def image_pyramid_features(extractor: nn.Module, images: torch.Tensor, dtype: torch.dtype, levels: int = LEVELS) -> list[torch.Tensor]:
    """``extractor`` on ``images [B, 3, H, W]`` and on its nearest-neighbour resizes to
    ``H / 2^l x W / 2^l`` (``F.interpolate``'s default mode, as CS-Flow's official code).

    Args:
        extractor: a module returning a list whose first item is one feature map ``[B, C, h, w]``
            (a :class:`~msflow_fast.models.extractor.FeatureExtractor`).
        images: ``[B, 3, H, W]`` normalised images.
        dtype: dtype of the returned maps (the flow's).
        levels: number of scales.

    Returns:
        ``[x_0, ..., x_{levels-1}]``, ``x_l [B, C, H / s / 2^l, W / s / 2^l]`` for a stride-``s``
        extractor (level 0 the finest), computed without autograd.
    """
    height, width = images.shape[-2:]
    feats = []
    with torch.no_grad():
        for level in range(levels):
            scaled = images if level == 0 else F.interpolate(images, size=(height // 2**level, width // 2**level))
            feats.append(extractor(scaled)[0].to(dtype))
    return feats


def per_dimension_nll(latents: Sequence[torch.Tensor], logdet: torch.Tensor) -> torch.Tensor:
    """``mean_b(0.5 * sum z^2 - logdet) / D`` over all ``D = sum_l C_l h_l w_l`` latent dimensions
    (nats per dimension, scalar; CS-Flow's official loss, without the constant ``0.5 log 2 pi``).

    Args:
        latents: ``[z_0, ...]``, ``z_l [B, C_l, h_l, w_l]``.
        logdet: ``[B]`` log-det of the whole flow, in nats.
    """
    nll = ops.gaussian_nll(latents[0], logdet)
    for z in latents[1:]:
        nll = nll + ops.gaussian_nll(z, torch.zeros_like(logdet))
    dims = sum(z[0].numel() for z in latents)
    return nll.mean() / dims


class PyramidFlowOutput(NamedTuple):
    """Output of :meth:`ImagePyramidFlowModel.forward`.

    Attributes:
        latents: ``[z_0, z_1, z_2]``, ``z_l [B, C_l, h_l, w_l]`` (level 0 the finest).
        logdet: ``[B]`` log-det of the whole flow, in nats.
    """

    latents: list[torch.Tensor]
    logdet: torch.Tensor


class ImagePyramidFlowModel(AnomalyModel):
    """The pipeline of CS-Flow and ``msflow_aas``: one frozen extractor on the image at full, half and
    quarter size (:func:`image_pyramid_features`), one flow over the three maps, the loss
    :func:`per_dimension_nll`.

    A subclass sets the config fields ``backbone``, ``pretrained``, ``input_size``, ``cnn_block`` and
    ``backbone_precision``, and implements :meth:`build_flow` (the flow: ``[x_0, x_1, x_2] ->
    (latents, logdet)``, ``rev=True`` the inverse) and ``predict``.

    Args:
        config: the subclass's config.
        backbone: a timm model name (sets ``config.backbone``) or an ``nn.Module`` returning one
            feature map (or a list holding one) at stride ``s`` for an image; used as given.
        **overrides: config fields to change.
    """

    fixed_on_load = ("backbone", "pretrained", "cnn_block")

    def __init__(self, config: Any = None, backbone: nn.Module | str | None = None, **overrides: Any) -> None:
        backbone = self.backbone_module(backbone, overrides)
        super().__init__(self.make_config(config, **overrides))
        config = self.config
        self.extractor = FeatureExtractor(
            backbone if backbone is not None else config.backbone,
            pretrained=config.pretrained,
            input_size=config.input_size,
            cnn_block=config.cnn_block if backbone is None else None,
            precision=config.backbone_precision,
        )
        if len(self.extractor.channels) != 1:
            raise ValueError(
                f"{type(self).__name__} takes one feature map per image scale; the backbone gives {len(self.extractor.channels)} "
                "(pass a module returning one map, or a timm EfficientNet name with cnn_block)"
            )
        self.channels = self.extractor.channels[0]
        self.stride = self.extractor.strides[0]
        self.flow = self.build_flow(self.channels)
        enable_fast_paths(self)
        try:
            self.check_image_size(*config.input_size)
        except ValueError as exc:
            raise ValueError(f"input_size {config.input_size} does not suit this backbone: {exc}") from None

    def build_flow(self, channels: int) -> nn.Module:
        """The flow over three ``channels``-channel maps, from ``self.config``."""
        raise NotImplementedError

    def check_image_size(self, height: int, width: int) -> None:
        unit = self.stride * 2 ** (LEVELS - 1)
        if height % unit or width % unit:
            raise ValueError(
                f"images height and width must be multiples of {unit} (the backbone's stride {self.stride} x 4, so that "
                f"the three feature grids halve exactly; EfficientNet: multiples of 128), got {height}x{width}"
            )

    def frozen_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Extractor features of the image at full, half and quarter size: ``[B, C, H/s/2^l, W/s/2^l]``
        for ``l = 0, 1, 2``, in the flow's dtype (no autograd; the flow's inputs as they are)."""
        self.check_images(images, check_finite=None)
        return image_pyramid_features(self.extractor, images, next(self.flow.parameters()).dtype)

    def frozen_fingerprint(self) -> str:
        """Digest of the extractor's state and the config (see :meth:`AnomalyModel.digest_frozen`)."""
        return self.digest_frozen(self.extractor)

    def forward(self, images: torch.Tensor) -> PyramidFlowOutput:
        """``images [B, 3, H, W]`` -> ``PyramidFlowOutput(latents, logdet)``."""
        return PyramidFlowOutput(*self.flow(self.frozen_features(images)))

    def loss(self, batch: Any) -> torch.Tensor:
        """:func:`per_dimension_nll`: ``mean_b(0.5 * sum z^2 - logdet) / D`` (nats per dimension, scalar).

        Args:
            batch: images ``[B, 3, H, W]`` or a batch dict: ``"image"``, or ``"features"`` (cached
                :meth:`frozen_features`) instead.
        """
        batch = as_batch(batch)
        feats = list(batch["features"]) if "features" in batch else self.frozen_features(batch["image"])
        return per_dimension_nll(*self.flow(feats))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, stride={self.stride}"


__all__ = ["LEVELS", "ImagePyramidFlowModel", "PyramidFlowOutput", "image_pyramid_features", "per_dimension_nll"]
