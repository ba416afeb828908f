"""``DADFConfig``: every DADF hyper-parameter in one frozen, validated dataclass, and the backbone
presets the official code offers (MODELS_SPEC.md Part B §1.3-§1.6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..base import ModelConfig, normalize_input_size
from ..config_checks import require_bool, require_choice, require_int, require_name, require_number

SCORES = ("max", "log_space")
PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class DADFConfig(ModelConfig):
    """DADF model configuration; the defaults are the official code's (WRN50, 256 px, 1440-d tokens).

    Attributes:
        input_size: image size ``(H, W)`` (an int means square). The memory tokens, the position
            table and the flows' [3C, H, W] LayerNorms are built for it: the model takes only it.
        backbone: timm CNN name (``features_only``): ``wide_resnet50_2`` (the code's flow stage),
            ``resnet18`` (its DefaultConfig), ``resnet34``, ``resnet50``, ``resnet101``, or any CNN
            whose ``out_indices`` maps have strides dividing the largest one.
        pretrained: load the backbone's pretrained weights (``weights_tag``; needs network or a timm cache).
        weights_tag: timm pretrained tag: ``tv_in1k`` = torchvision's ImageNet V1 weights, what the
            code's ``torchvision.models.*(True)`` loads (timm has them for the ResNets); ``none`` for
            timm's default tag (a backbone without torchvision weights in timm).
        out_indices: backbone stages used (timm ``out_indices``; DADF: layer1..layer3).
        embed_dim: token width per scale (480); the tokens are the scales' embeddings concatenated
            (``len(out_indices) * embed_dim`` = 1440), so that product must be a multiple of 4 and
            of ``num_heads``.
        depth: dual blocks (8), each its own weights, shared by the feature and memory streams.
        num_heads: attention heads (8: head width 180 at the defaults).
        mlp_ratio: MLP hidden width as a multiple of the token width (4).
        flow_steps: AllInOneBlocks per scale (8).
        conv3x3_only: every subnet depthwise 3x3; otherwise 3x3 and 1x1 alternate (even steps 3x3, the code).
        clamp_alpha: soft clamp of the couplings, FrEIA 0.2's ``alpha * tanh(0.1 a)`` (2.0).
        score: ``"max"`` (the maximum of the anomaly map, the code's score) or ``"log_space"``
            (the same maximum as ``-log(-map)`` in nats: the same ranking, never underflowing).
        transformer_precision: ``"float32"`` (the code) or ``"bfloat16"``: the dual-attention
            transformer under bf16 autocast (its outputs cast back to float32); the flows and their
            log-dets always run in float32.
    """

    input_size: tuple[int, int] = (256, 256)
    backbone: str = "wide_resnet50_2"
    pretrained: bool = True
    weights_tag: str | None = "tv_in1k"
    out_indices: tuple[int, ...] = (1, 2, 3)
    embed_dim: int = 480
    depth: int = 8
    num_heads: int = 8
    mlp_ratio: float = 4.0
    flow_steps: int = 8
    conv3x3_only: bool = False
    clamp_alpha: float = 2.0
    score: str = "max"
    transformer_precision: str = "float32"

    def __post_init__(self) -> None:
        normalize_input_size(self)
        require_name(self, "backbone")
        require_bool(self, "pretrained", "conv3x3_only")
        if self.weights_tag is not None and (not isinstance(self.weights_tag, str) or not self.weights_tag):
            raise TypeError(f"weights_tag must be a timm pretrained tag (e.g. 'tv_in1k') or None, got {self.weights_tag!r}")
        indices = tuple(self.out_indices) if not isinstance(self.out_indices, (str, bytes)) else ()
        if not indices or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise ValueError(f"out_indices must be a non-empty sequence of ints >= 0, got {self.out_indices!r}")
        if list(indices) != sorted(set(indices)):
            raise ValueError(f"out_indices must be increasing without repeats (the backbone's stages, finest first), got {self.out_indices!r}")
        object.__setattr__(self, "out_indices", indices)
        for name in ("embed_dim", "depth", "num_heads", "flow_steps"):
            require_int(self, name, 1)
        require_number(self, "mlp_ratio")
        if int(self.token_dim * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} gives the dual blocks' MLP no hidden unit at token width {self.token_dim}; use a ratio such as 4.0")
        require_number(self, "clamp_alpha")
        require_choice(self, "score", SCORES)
        require_choice(self, "transformer_precision", PRECISIONS)
        width = self.token_dim
        if width % 4:
            raise ValueError(
                f"the token width len(out_indices) * embed_dim = {width} must be a multiple of 4 for the 2-D sin-cos "
                "positions; change embed_dim"
            )
        if width % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide the token width len(out_indices) * embed_dim = {width}")

    @property
    def token_dim(self) -> int:
        """The token width ``len(out_indices) * embed_dim`` (1440)."""
        return len(self.out_indices) * self.embed_dim


PRESETS: dict[str, dict[str, Any]] = {
    "wide_resnet50_2": dict(backbone="wide_resnet50_2", weights_tag="tv_in1k", out_indices=(1, 2, 3)),
    "resnet18": dict(backbone="resnet18", weights_tag="tv_in1k", out_indices=(1, 2, 3)),
    "resnet34": dict(backbone="resnet34", weights_tag="tv_in1k", out_indices=(1, 2, 3)),
}
"""The code's ResNet backbones (torchvision V1 weights, layer1..3 at 256 px): ``wide_resnet50_2``
(the flow stage's ``back[-1]``, the default), ``resnet18`` (DefaultConfig) and ``resnet34``
(``reconstruction_train``'s ``__main__``)."""


__all__ = ["DADFConfig", "PRECISIONS", "PRESETS", "SCORES"]
