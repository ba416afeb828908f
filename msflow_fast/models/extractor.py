"""Frozen multi-scale feature extractor: a timm ``features_only`` model or any module returning feature maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

_PROBE_SIZE = 128
# The official extractor uses torchvision's V1 weights; timm's untagged default for this name differs.
_OFFICIAL_WEIGHTS = {"wide_resnet50_2": "wide_resnet50_2.tv_in1k"}


def use_reflect_padding(module: nn.Module) -> int:
    """Switch every zero-padded ``Conv2d`` in ``module`` to reflect padding (the official extractor).

    Returns:
        The number of convolutions changed. Unpadded (1x1) convs and pooling layers are untouched.
    """
    changed = 0
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str) and any(m.padding):
            m.padding_mode = "reflect"
            changed += 1
    return changed


def _as_feature_list(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        out = [out]
    elif isinstance(out, Mapping):
        out = list(out.values())
    if not isinstance(out, Sequence) or not out or not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in out):
        raise TypeError(
            "the backbone must return a non-empty list (or dict) of 4-D feature maps [B, C_k, H_k, W_k], "
            f"got {type(out).__name__}"
        )
    return list(out)


class FeatureExtractor(nn.Module):
    """Frozen backbone returning a list of feature maps; always in eval mode, run under ``no_grad``.

    Args:
        backbone: a timm model name (built with ``features_only=True, out_indices=out_indices``)
            or an ``nn.Module`` whose forward returns a list/tuple/dict of ``[B, C_k, H_k, W_k]`` maps.
        out_indices: timm stages (ignored for a module).
        pretrained: load timm's pretrained weights (ignored for a module).
        reflect_padding: switch padded convs to reflect padding (see :func:`use_reflect_padding`).
        in_channels: image channels (3).

    Attributes:
        channels: ``C_k`` per output map, inferred with one dry forward.
        strides: input-to-map downsampling factor per output map.
        source: where the weights come from: ``"pretrained"`` (timm's pretrained weights, rebuilt
            from the name: checkpoints do not store them), ``"random"`` (a timm name with random
            initialisation) or ``"module"`` (a given module); checkpoints store the last two.
    """

    SOURCES = ("pretrained", "random", "module")

    def __init__(
        self,
        backbone: str | nn.Module,
        *,
        out_indices: Sequence[int] = (1, 2, 3),
        pretrained: bool = False,
        reflect_padding: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if isinstance(backbone, str):
            try:
                import timm
            except ImportError as exc:
                raise ImportError(f"backbone={backbone!r} needs timm (pip install timm) or pass an nn.Module") from exc
            name = _OFFICIAL_WEIGHTS.get(backbone, backbone) if pretrained else backbone
            self.name = name
            self.source = "pretrained" if pretrained else "random"
            self.backbone = timm.create_model(name, features_only=True, out_indices=tuple(out_indices), pretrained=pretrained)
        elif isinstance(backbone, nn.Module):
            self.name = type(backbone).__name__
            self.source = "module"
            self.backbone = backbone
        else:
            raise TypeError(f"backbone must be a timm model name or an nn.Module, got {type(backbone).__name__}")
        if reflect_padding:
            use_reflect_padding(self.backbone)
        self.in_channels = int(in_channels)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        param = next(self.backbone.parameters(), None)
        probe = torch.zeros(1, self.in_channels, _PROBE_SIZE, _PROBE_SIZE,
                            device=param.device if param is not None else None,
                            dtype=param.dtype if param is not None else None)
        with torch.no_grad():
            maps = _as_feature_list(self.backbone(probe))
        self.channels = [int(m.shape[1]) for m in maps]
        self.strides = [max(1, round(_PROBE_SIZE / m.shape[-1])) for m in maps]

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """The backbone stays in eval mode (batch norm uses running statistics), whatever ``mode``."""
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def max_stride(self) -> int:
        return max(self.strides)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``[B, 3, H, W] -> [[B, C_k, H / s_k, W / s_k], ...]`` without autograd."""
        with torch.no_grad():
            return _as_feature_list(self.backbone(images))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, channels={self.channels}, strides={self.strides}"


__all__ = ["FeatureExtractor", "use_reflect_padding"]
