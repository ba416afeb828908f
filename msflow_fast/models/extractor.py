"""Frozen multi-scale feature extractor: a timm ``features_only`` model or any module returning feature maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

_PROBE_SIZE = 128


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


def _create_timm(timm, name: str, out_indices: tuple[int, ...], pretrained: bool, **options) -> nn.Module:
    """``timm.create_model(name, features_only=True, ...)`` (or ``**options`` for a whole model) with
    errors that say what to do."""
    try:
        if options:
            return timm.create_model(name, pretrained=pretrained, **options)
        return timm.create_model(name, features_only=True, out_indices=out_indices, pretrained=pretrained)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            close = timm.list_models(f"*{name.split('.')[0][:8]}*")[:5]
            raise ValueError(f"timm has no model {name!r}{' (close: ' + ', '.join(close) + ')' if close else ''}; see timm.list_models()") from None
        if not pretrained:
            raise ValueError(f"cannot build the timm backbone {name!r} with out_indices {list(out_indices)}: {exc}") from exc
        raise _pretrained_error(name, exc) from exc
    except (IndexError, ValueError, AssertionError, KeyError, TypeError) as exc:
        raise ValueError(
            f"cannot build the timm backbone {name!r} with out_indices {list(out_indices)} "
            f"({type(exc).__name__}: {exc}); out_indices are stage numbers the model has (e.g. 1 2 3 for a ResNet)"
        ) from exc
    except Exception as exc:  # downloads: connection errors, missing cache entries, hub errors
        if not pretrained:
            raise
        raise _pretrained_error(name, exc) from exc


def _pretrained_error(name: str, exc: BaseException) -> RuntimeError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return RuntimeError(
        f"could not load the pretrained weights of {name!r} ({type(exc).__name__}: {first}); without network "
        "access timm reads them from its cache (HF_HOME). For random weights pass pretrained=False "
        "(CLI: --no-pretrained)"
    )


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


class ViTTokenMaps(nn.Module):
    """The patch tokens of a timm vision transformer after block ``block`` (0-based), through its final
    norm, as one map ``[B, C, H / p, W / p]`` (FastFlow's DeiT and CaiT features).

    For a ViT/DeiT: patch embedding, class (and distillation) tokens and positions (timm's
    ``_pos_embed``), ``patch_drop`` and ``norm_pre`` where the model has them, ``blocks[0..block]``,
    ``norm``, the prefix tokens dropped. For a CaiT (no prefix tokens in its self-attention
    stage): patch embedding plus positions, ``blocks[0..block]``, ``norm``. The state dict is the
    timm model's under ``model.``. The model is built for one image size (its position table).
    """

    def __init__(self, model: nn.Module, block: int) -> None:
        super().__init__()
        blocks = getattr(model, "blocks", None)
        if blocks is None or not hasattr(model, "patch_embed") or not hasattr(model, "norm"):
            raise ValueError(f"{type(model).__name__} is not a timm vision transformer (needs patch_embed, blocks, norm)")
        if not 0 <= block < len(blocks):
            raise ValueError(f"block {block} is outside the {len(blocks)} blocks of {type(model).__name__}")
        self.model, self.block = model, int(block)
        self.patch = int(model.patch_embed.patch_size[0])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        m = self.model
        tokens = m.patch_embed(images)
        if hasattr(m, "_pos_embed"):  # ViT / DeiT: prefix tokens and positions as timm adds them
            tokens = m._pos_embed(tokens)
            prefix = int(getattr(m, "num_prefix_tokens", 1))
        else:  # CaiT: positions only
            tokens = m.pos_drop(tokens + m.pos_embed)
            prefix = 0
        for stage in ("patch_drop", "norm_pre"):  # Identity for DeiT and CaiT, not for every ViT
            if isinstance(getattr(m, stage, None), nn.Module):
                tokens = getattr(m, stage)(tokens)
        for blk in m.blocks[: self.block + 1]:
            tokens = blk(tokens)
        tokens = m.norm(tokens)[:, prefix:]
        b, n, c = tokens.shape
        h, w = images.shape[-2] // self.patch, images.shape[-1] // self.patch
        if h * w != n:
            raise ValueError(f"{n} patch tokens do not tile a {h}x{w} grid for images {tuple(images.shape[-2:])}")
        return [tokens.transpose(1, 2).reshape(b, c, h, w)]

    def extra_repr(self) -> str:
        return f"block={self.block}, patch={self.patch}"


class CNNBlockMap(nn.Module):
    """The output of a timm EfficientNet-family CNN (``conv_stem``, ``bn1``, ``blocks``) after its
    stage ``block`` (0-based index into ``blocks``), as one map (CS-Flow's EfficientNet-B5 stage-6
    features: ``block=5``, 304 channels at stride 32). The later stages and the head are dropped;
    ``state_dict`` keys are the timm model's (``conv_stem.*``, ``bn1.*``, ``blocks.{i}.*``).
    """

    def __init__(self, model: nn.Module, block: int) -> None:
        super().__init__()
        blocks = getattr(model, "blocks", None)
        if not all(hasattr(model, name) for name in ("conv_stem", "bn1")) or not isinstance(blocks, nn.Sequential):
            raise ValueError(
                f"cnn_block needs a timm EfficientNet-family model (conv_stem, bn1, blocks); {type(model).__name__} is not one"
            )
        if not 0 <= block < len(blocks):
            raise ValueError(f"cnn_block must be in 0..{len(blocks) - 1} for this model ({len(blocks)} stages), got {block}")
        self.block = int(block)
        self.conv_stem = model.conv_stem
        self.bn1 = model.bn1
        self.blocks = blocks[: block + 1]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.blocks(self.bn1(self.conv_stem(images)))]

    def extra_repr(self) -> str:
        return f"block={self.block}"


BACKBONE_PRECISIONS = ("float32", "bfloat16")
"""The backbone precisions. ``"bfloat16"`` moves the backbone's features by about 0.2-0.5 % (relative
L2, resnet18 / wide_resnet50_2 at 256 px, random weights); its effect on scores is measured in
``benchmarks/results/`` (see the README's speed section), which is why float32 stays the default."""


class FeatureExtractor(nn.Module):
    """Frozen backbone returning a list of feature maps; always in eval mode, run under ``no_grad``.

    Args:
        backbone: a timm model name (built with ``features_only=True, out_indices=out_indices``)
            or an ``nn.Module`` whose forward returns a list/tuple/dict of ``[B, C_k, H_k, W_k]`` maps.
        out_indices: timm stages (ignored for a module).
        pretrained: load timm's pretrained weights (ignored for a module).
        reflect_padding: switch padded convs to reflect padding (see :func:`use_reflect_padding`).
        in_channels: image channels (3).
        input_size: ``(H, W)`` the model will see; the dry forward that finds channels and strides
            runs at 128 px, or at this size if the backbone needs it (ViTs).
        vit_block: for a timm vision-transformer name: the token maps after this block
            (:class:`ViTTokenMaps`; FastFlow: 7 for DeiT, 40 for CaiT), built for ``input_size``.
        cnn_block: for a timm EfficientNet-family name: the one map after this stage
            (:class:`CNNBlockMap`; CS-Flow: 5, EfficientNet-B5's stage 6); ``out_indices`` is then ignored.
        weights_tag: the timm pretrained tag to load (``name.tag``), ``None`` for timm's default for
            the name (MSFlow asks ``tv_in1k``, torchvision's weights, for wide_resnet50_2).
        precision: ``"float32"`` or ``"bfloat16"``: the backbone's compute precision. bf16 runs it
            under autocast (AVX-512 BF16 / AMX on CPU, tensor cores on GPU); its outputs are cast
            back to the input's dtype, so what follows (flows, log-dets, scores) stays float32.
            See :data:`BACKBONE_PRECISIONS` for how far that moves the features.
        channels_last: run the backbone in the channels-last memory layout (faster convolutions on
            CPU and GPU; the same maths, float32 rounding apart); outputs are returned contiguous.

    Attributes:
        channels: ``C_k`` per output map, inferred with one dry forward.
        strides: input-to-map downsampling factor per output map.
        source: where the weights come from: ``"pretrained"`` (timm's pretrained weights, rebuilt
            from the name: checkpoints do not store them), ``"random"`` (a timm name with random
            initialisation), ``"file"`` (a timm name whose weights were loaded from a file, e.g. an
            anomalib checkpoint) or ``"module"`` (a given module); checkpoints store the last three.
    """

    SOURCES = ("pretrained", "random", "file", "module")
    PRECISIONS = BACKBONE_PRECISIONS

    def __init__(
        self,
        backbone: str | nn.Module,
        *,
        out_indices: Sequence[int] = (1, 2, 3),
        pretrained: bool = False,
        reflect_padding: bool = False,
        in_channels: int = 3,
        input_size: Sequence[int] | None = None,
        vit_block: int | None = None,
        cnn_block: int | None = None,
        weights_tag: str | None = None,
        precision: str = "float32",
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if precision not in BACKBONE_PRECISIONS:
            raise ValueError(f"precision: expected one of {BACKBONE_PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.channels_last = bool(channels_last)
        if isinstance(backbone, str):
            try:
                import timm
            except ImportError as exc:
                raise ImportError(f"backbone={backbone!r} needs timm (pip install timm) or pass an nn.Module") from exc
            name = f"{backbone}.{weights_tag}" if pretrained and weights_tag and "." not in backbone else backbone
            self.name = name
            self.source = "pretrained" if pretrained else "random"
            if vit_block is not None and cnn_block is not None:
                raise ValueError("pass vit_block or cnn_block, not both")
            if cnn_block is not None:
                self.backbone = CNNBlockMap(_create_timm(timm, name, (), pretrained, num_classes=0), cnn_block)
            elif vit_block is None:
                self.backbone = _create_timm(timm, name, tuple(out_indices), pretrained)
            else:
                options = {"img_size": tuple(int(v) for v in input_size)} if input_size is not None else {"num_classes": 0}
                self.backbone = ViTTokenMaps(_create_timm(timm, name, (), pretrained, **options), vit_block)
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
        self.set_channels_last(self.channels_last)
        maps, size = self._probe(input_size, vit=vit_block is not None)
        self.channels = [int(m.shape[1]) for m in maps]
        self.strides = [max(1, round(size / m.shape[-1])) for m in maps]

    def _probe(self, input_size: Sequence[int] | None, vit: bool = False) -> tuple[list[torch.Tensor], int]:
        """One dry forward (at 128 px, else at ``input_size``; a ViT at its own size): the maps and the size."""
        param = next(self.backbone.parameters(), None)
        sizes = [(_PROBE_SIZE, _PROBE_SIZE)]
        if input_size is not None:
            own = (int(input_size[0]), int(input_size[-1]))
            sizes = [own] if vit else sizes + ([own] if own != sizes[0] else [])
        errors = []
        for height, width in sizes:
            probe = torch.zeros(1, self.in_channels, height, width,
                                device=param.device if param is not None else None,
                                dtype=param.dtype if param is not None else None)
            try:
                with torch.no_grad():
                    out = self.backbone(probe)
            except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
                errors.append(f"at {height}x{width}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
                continue
            return _as_feature_list(out), width
        raise ValueError(f"the backbone {self.name!r} fails on a probe image ({'; '.join(errors)}); check its input size")

    def set_channels_last(self, enabled: bool) -> "FeatureExtractor":
        """Switch the backbone's layout (weights and inputs) to channels-last or back to the standard one."""
        self.channels_last = bool(enabled)
        self.backbone.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        return self

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """The backbone stays in eval mode (batch norm uses running statistics), whatever ``mode``."""
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def max_stride(self) -> int:
        return max(self.strides)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``[B, 3, H, W] -> [[B, C_k, H / s_k, W / s_k], ...]`` (contiguous, the images' dtype) without autograd."""
        with torch.no_grad():
            x = images.contiguous(memory_format=torch.channels_last) if self.channels_last and images.dim() == 4 else images
            if self.precision == "bfloat16" and images.is_floating_point():
                with torch.autocast(images.device.type, dtype=torch.bfloat16):
                    maps = _as_feature_list(self.backbone(x))
                return [m.to(images.dtype).contiguous() for m in maps]
            return [m.contiguous() for m in _as_feature_list(self.backbone(x))]

    def extra_repr(self) -> str:
        extra = f", precision={self.precision!r}" if self.precision != "float32" else ""
        return f"name={self.name!r}, channels={self.channels}, strides={self.strides}{extra}"


__all__ = ["BACKBONE_PRECISIONS", "CNNBlockMap", "FeatureExtractor", "ViTTokenMaps", "use_reflect_padding"]
