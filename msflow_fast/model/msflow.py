"""``MSFlow``: frozen extractor -> pooling -> parallel flows (positional condition) -> fusion flow -> head."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import AnomalyHead, AnomalyPrediction, FusionFlow, ParallelFlows
from .config import MSFlowConfig
from .extractor import FeatureExtractor
from .positional import PositionalEncoding2d


class FlowOutput(NamedTuple):
    """Output of :meth:`MSFlow.forward`.

    Attributes:
        latents: per-scale ``z_k [B, C_k, h_k, w_k]``.
        logdet: total log-det ``[B]`` in nats (all parallel flows plus the fusion flow).
    """

    latents: list[torch.Tensor]
    logdet: torch.Tensor


class MSFlow(nn.Module):
    """Multi-scale flow anomaly detector (MSFlow, TNNLS 2024), built on this package's fused modules.

    Args:
        config: an :class:`MSFlowConfig` (default: the official configuration).
        backbone: optional ``nn.Module`` returning a list of feature maps; overrides
            ``config.backbone`` (a timm name). Its channels and strides are inferred; it is used
            as given (``config.reflect_padding`` applies only to backbones built from a name).
        **overrides: :class:`MSFlowConfig` fields to change, e.g. ``parallel_blocks=(1, 1, 1)``.

    The backbone is frozen and runs under ``no_grad``. Parameters live in ``parallel_flows``
    (``flows.{k}.module_list.{i}.*``, FrEIA SequenceINN keys) and ``fusion_flow``
    (``permutations.{k}.*`` keyed by scale, ``coupling.*``).

    Attributes:
        check_finite: whether :meth:`forward` (and so ``loss`` / ``predict``) rejects images holding
            NaN or infinity. ``None`` (default) follows the ops' policy: checked only with
            ``MSFLOW_FAST_CHECK_FINITE=1`` in the environment, because the check costs a full pass
            over the batch and a device sync per call. ``True`` / ``False`` force it on / off for
            this model. The engine (``fit``, ``evaluate``, ``predict_folder`` and the CLI) checks
            each batch itself on the CPU, before moving it to the device, and names the files;
            a direct :meth:`check_images` call checks by default.
    """

    def __init__(self, config: MSFlowConfig | None = None, backbone: nn.Module | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = MSFlowConfig()
        elif not isinstance(config, MSFlowConfig):
            raise TypeError(f"config must be an MSFlowConfig, got {type(config).__name__}")
        config = config.replace(**overrides) if overrides else config
        self.config = config
        # Checkpoints store the weights of a user-supplied backbone (the config cannot rebuild it).
        self.backbone_is_module = backbone is not None
        self.extractor = FeatureExtractor(
            backbone if backbone is not None else config.backbone,
            out_indices=config.out_indices,
            pretrained=config.pretrained,
            reflect_padding=config.reflect_padding and backbone is None,
        )
        channels = self.extractor.channels
        if len(channels) != len(config.parallel_blocks):
            raise ValueError(
                f"the backbone returns {len(channels)} feature maps (channels {channels}) but parallel_blocks "
                f"{config.parallel_blocks} has {len(config.parallel_blocks)} entries; they must match"
            )
        self.channels = list(channels)
        self.positional = PositionalEncoding2d(config.c_cond)
        self.parallel_flows = ParallelFlows(
            channels, config.parallel_blocks, config.c_cond, config.clamp_alpha, clamp_form=config.clamp_form
        )
        self.fusion_flow = FusionFlow(channels, clamp=config.clamp_alpha)
        self.head = AnomalyHead(config.top_k)
        self.check_finite: bool | None = None

    # ------------------------------------------------------------------ inputs

    def check_images(self, images: object, check_finite: bool | None = True) -> torch.Tensor:
        """Validate an image batch ``[B, 3, H, W]``; returns it unchanged.

        The type, shape and device checks are free (metadata only) and always run. The NaN/inf
        check reads every value and synchronises the device: a direct call (a one-off validation,
        e.g. of export's example images) runs it by default; :meth:`forward` passes
        ``check_finite=None``, which runs it only when asked: :attr:`check_finite` of the model,
        else ``MSFLOW_FAST_CHECK_FINITE=1`` (the ops' policy). ``False`` skips it. It never runs
        inside torch.compile / torch.export graphs.

        Raises:
            TypeError: not a floating tensor, or on another device than the model.
            ValueError: wrong rank, channel count, empty, size not divisible by the backbone's
                largest stride, or (when checked) NaN or infinite values.
        """
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating tensor (normalized images), got dtype {images.dtype}")
        if images.dim() != 4:
            raise ValueError(f"images must be 4-D [B, 3, H, W], got shape {tuple(images.shape)}")
        if images.shape[1] != self.extractor.in_channels:
            raise ValueError(
                f"images must have {self.extractor.in_channels} channels, got shape {tuple(images.shape)} "
                "(replicate grayscale images to 3 channels)"
            )
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch")
        stride = self.extractor.max_stride
        h, w = images.shape[-2:]
        if h % stride or w % stride:
            raise ValueError(
                f"images height and width must be divisible by the backbone's largest stride {stride}, "
                f"got {h}x{w}; resize to e.g. {max(stride, h // stride * stride)}x{max(stride, w // stride * stride)}"
            )
        param = next(self.parallel_flows.parameters())
        if images.device != param.device:
            raise TypeError(f"images are on {images.device} but the model is on {param.device}; move one of them")
        if check_finite is None:
            check_finite = self.check_finite
        # A data-dependent check (a pass and a sync): opt-in, and skipped while torch.compile /
        # torch.export trace the model.
        if ops.check_finite_enabled(check_finite) and not torch.compiler.is_compiling():
            bad = ~torch.isfinite(images)
            if bool(bad.any()):
                images_bad = bad.flatten(1).any(1).nonzero().flatten().tolist()
                raise ValueError(
                    f"images contain NaN or infinite values ({int(bad.sum())} of {images.numel()}, in batch "
                    f"image(s) {images_bad}); check the data pipeline (decoding, normalisation). "
                    f"forward() checks this only with model.check_finite=True or {ops.ENV_CHECK_FINITE}=1"
                )
        return images

    # ------------------------------------------------------------------ pipeline

    def _pool(self, feature: torch.Tensor) -> torch.Tensor:
        if self.config.pool_type == "avg":
            return F.avg_pool2d(feature, 3, 2, 1)
        if self.config.pool_type == "max":
            return F.max_pool2d(feature, 3, 2, 1)
        return feature

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Pooled backbone features ``y_k [B, C_k, h_k, w_k]`` (no autograd)."""
        self.check_images(images, check_finite=None)  # NaN/inf: only when asked (see check_finite)
        with torch.no_grad():
            feats = self.extractor(images)
            dtype = next(self.parallel_flows.parameters()).dtype
            return [self._pool(f).to(dtype) for f in feats]

    def flows(self, features: list[torch.Tensor]) -> FlowOutput:
        """Parallel flows (with positional conditions) then the fusion flow."""
        conds = [
            self.positional(f.shape[0], f.shape[2], f.shape[3], f.device, f.dtype) for f in features
        ]
        outs, logdets = self.parallel_flows(features, conds)
        latents, logdet_fusion = self.fusion_flow(outs)
        return FlowOutput(latents, sum(logdets) + logdet_fusion)

    def forward(self, images: torch.Tensor) -> FlowOutput:
        """``images [B, 3, H, W]`` -> ``FlowOutput(latents, logdet [B])``.

        Images are validated by :meth:`check_images`; NaN/inf values are rejected only when the
        finiteness check is on (see :attr:`check_finite`), otherwise they give non-finite outputs.
        """
        return self.flows(self.features(images))

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Official training loss: mean over the batch of ``sum_k 0.5 * sum z_k^2 - logdet`` (nats, scalar)."""
        latents, logdet = self(images)
        nll = ops.gaussian_nll(latents[0], logdet)
        for z in latents[1:]:
            nll = nll + ops.gaussian_nll(z, torch.zeros_like(logdet))
        return nll.mean()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyPrediction:
        """Anomaly maps ``[B, H, W]`` at the input resolution and image scores ``[B]``.

        ``score`` is the score named by ``config.score``; ``score_log_space`` is always the
        log-space score. See :class:`~msflow_fast.nn.AnomalyPrediction`.
        """
        latents, _ = self(images)
        out = self.head(latents, tuple(images.shape[-2:]))
        if self.config.score == "log_space":
            out = out._replace(score=out.score_log_space)
        return out

    def flow_state_dict(self) -> dict[str, torch.Tensor]:
        """``state_dict`` without the backbone (what checkpoints store)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("extractor.")}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, strides={self.extractor.strides}"


__all__ = ["FlowOutput", "MSFlow"]
