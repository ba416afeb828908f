"""``DADF``: frozen CNN -> dual-attention transformer (stage 1) -> per scale
``LayerNorm_[3C,H,W](E, R_self, R_mem)`` -> 2-D flow (stage 2) -> head."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from ... import ops
from ...nn import SampleLayerNorm, enable_fast_paths
from ..base import AnomalyModel, Prediction, TrainRecipe, TrainStage, as_batch
from ..extractor import FeatureExtractor
from ..stage_flow import FastFlowHead
from ..registry import register
from .config import PRESETS, DADFConfig
from .flows import build_scale_flow
from .transformer import DualAttentionTransformer, Reconstructions, reconstruction_loss

STAGES = ("reconstruction", "flow")
"""The training stages, in order: the transformer, then the flows (the transformer frozen)."""

OFFICIAL_RECIPE = TrainRecipe(
    (
        TrainStage(name="reconstruction", epochs=200, batch_size=8, optimizer="adamw", lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01),
        TrainStage(name="flow", epochs=15, batch_size=16, optimizer="adam", lr=1e-3, weight_decay=1e-5),
    )
)
"""The official code's recipe: stage 1 AdamW 1e-4, betas (0.9, 0.95), weight decay 0.01 (torch's
default: the code sets none), batch 8, 200 epochs at a constant rate; stage 2 Adam 1e-3, weight
decay 1e-5, batch 16, 15 epochs. No clipping, no augmentation. The code keeps the stage-2 epoch
with the best test-set AUROC; msflow_fast reports the last epoch."""


class DADFOutput(NamedTuple):
    """Output of :meth:`DADF.forward`.

    Attributes:
        latents: per-scale ``z_k [B, 3 C_k, h_k, w_k]`` (float32, or the flows' dtype).
        logdets: per-scale log-dets ``[B]`` in nats, in the flows' dtype.
    """

    latents: list[torch.Tensor]
    logdets: list[torch.Tensor]


@register(
    "dadf",
    summary="DADF (Yao et al., IEEE T-ASE 2024): dual-attention transformer with memory tokens, then 2-D flows on "
    "prior + self + memory reconstructions; faithful to the official code, two stages",
)
class DADF(AnomalyModel):
    """DADF (Yao et al., "Dual-Attention Transformer and Discriminative Flow for Industrial Visual
    Anomaly Detection", IEEE T-ASE 2024, arXiv 2303.17882), as its official code computes it
    (MODELS_SPEC.md Part B §1).

    Stage ``"reconstruction"``: a :class:`~.transformer.DualAttentionTransformer` on the frozen
    backbone's maps ``E_k`` learns to rebuild them from the feature tokens (self attention) and
    from learned memory tokens (memorial attention); loss: the six MSEs. Stage ``"flow"``: the
    transformer frozen, per scale ``F_k = LayerNorm_[3C,H,W](cat(E_k, R^self_k, R^mem_k))`` goes
    through ``flow_steps`` AllInOneBlocks; loss ``sum_k mean_b(0.5 sum z_k^2 - logdet_k)``.
    Map: the scale mean of ``-Up(exp(1 - 0.5 mean_c z_k^2))`` (bilinear, ``align_corners=False``);
    score: its maximum (or the exact log-space score, see
    :class:`~msflow_fast.models.stage_flow.FastFlowHead` with ``log_offset=1``).

    :meth:`set_stage` decides what trains and what :meth:`loss` and :meth:`frozen_features`
    mean: in stage 1 the frozen part is the backbone; in stage 2 it is backbone + transformer,
    whose outputs ``cat(E_k, R^self_k, R^mem_k)`` are then a pure function of the image, so
    ``fit`` computes them once and trains the flows on the cache. A new model is in stage 1.

    Args:
        config: a :class:`DADFConfig` (default: the code's, WRN50).
        backbone: a timm model name (sets ``config.backbone``) or an ``nn.Module`` returning a list
            of feature maps (used as given).
        **overrides: :class:`DADFConfig` fields to change.

    ``state_dict`` keys: ``transformer.{embed.k, memory, blocks.i.{norm1, attn.qkv, attn.proj,
    norm2, mlp.0, mlp.2}, norm, heads.k}.*``, ``norms.{k}.{weight, bias}``,
    ``flows.{k}.module_list.{i}.{global_scale, global_offset, w_perm, w_perm_inv, subnet.0.*,
    subnet.2.*}`` (FrEIA ``SequenceINN`` keys) and ``extractor.*``.
    """

    config_class = DADFConfig
    presets = PRESETS
    default_recipe = OFFICIAL_RECIPE
    fixed_on_load = ("backbone", "pretrained", "weights_tag", "out_indices")
    # A random-initialised resnet18 at 128 px, 64-d tokens per scale, two dual blocks, four flow steps.
    demo_config = {"input_size": 128, "backbone": "resnet18", "pretrained": False, "embed_dim": 64, "depth": 2, "num_heads": 4,
                   "flow_steps": 4}
    demo_training = {"epochs": 6, "lr": 1e-3, "batch_size": 8}

    def __init__(self, config: DADFConfig | None = None, backbone: nn.Module | str | None = None, **overrides: Any) -> None:
        backbone = self.backbone_module(backbone, overrides)
        super().__init__(self.make_config(config, **overrides))
        c = self.config
        self.extractor = FeatureExtractor(
            backbone if backbone is not None else c.backbone, out_indices=c.out_indices, pretrained=c.pretrained,
            input_size=c.input_size, weights_tag=c.weights_tag,
        )
        height, width = c.input_size
        stride = self.extractor.max_stride
        if height % stride or width % stride:
            raise ValueError(f"input_size {c.input_size} must be divisible by the backbone's largest stride {stride}; choose a multiple of {stride}")
        self.channels = list(self.extractor.channels)
        self.grids = [(height // s, width // s) for s in self.extractor.strides]
        if len(self.channels) * c.embed_dim != c.token_dim:
            raise ValueError(f"the backbone gives {len(self.channels)} maps but out_indices names {len(c.out_indices)}; set out_indices "
                             "to one entry per map the backbone returns (the token width is len(out_indices) * embed_dim)")
        try:
            self.transformer = DualAttentionTransformer(self.channels, self.grids, c.embed_dim, c.depth, c.num_heads, c.mlp_ratio)
        except ValueError as exc:
            raise ValueError(f"input_size {c.input_size} does not suit this backbone's maps {self.grids}: {exc}") from None
        self.norms = nn.ModuleList(SampleLayerNorm((3 * ch, h, w), affine="element") for ch, (h, w) in zip(self.channels, self.grids))
        self.flows = nn.ModuleList(
            build_scale_flow(3 * ch, h, w, c.flow_steps, conv3x3_only=c.conv3x3_only, clamp=c.clamp_alpha)
            for ch, (h, w) in zip(self.channels, self.grids)
        )
        self.head = FastFlowHead(c.score, log_offset=1.0)
        enable_fast_paths(self)
        self.stage = STAGES[0]
        self.set_stage(STAGES[0])

    def check_image_size(self, height: int, width: int) -> None:
        if (height, width) != tuple(self.config.input_size):
            raise ValueError(
                f"images must be {self.config.input_size[0]}x{self.config.input_size[1]}: the memory tokens, positions and "
                f"[3C, H, W] LayerNorms are built for that size, got {height}x{width}"
            )

    # ------------------------------------------------------------------ stages

    def set_stage(self, stage: str) -> None:
        """``"reconstruction"``: only the transformer trains; ``"flow"``: only the norms and flows
        (the transformer frozen). Sets ``requires_grad`` and what :meth:`loss` and
        :meth:`frozen_features` compute."""
        if stage not in STAGES:
            raise ValueError(f"no DADF stage {stage!r}; the stages are {list(STAGES)}")
        self.stage = stage
        flow = stage == "flow"
        self.transformer.requires_grad_(not flow)
        self.norms.requires_grad_(flow)
        self.flows.requires_grad_(flow)

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        """The transformer's parameters (``"reconstruction"``) or the norms' and flows' (``"flow"``)."""
        if stage not in STAGES:
            raise ValueError(f"no DADF stage {stage!r}; the stages are {list(STAGES)}")
        if stage == "reconstruction":
            return list(self.transformer.parameters())
        return [*self.norms.parameters(), *self.flows.parameters()]

    # ------------------------------------------------------------------ pipeline

    def backbone_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``E_k [B, C_k, h_k, w_k]`` of the frozen backbone (no autograd)."""
        self.check_images(images, check_finite=None)
        return self.extractor(images)

    def reconstruct(self, features: list[torch.Tensor]) -> Reconstructions:
        """The transformer on backbone maps (under bf16 autocast with ``transformer_precision="bfloat16"``,
        its outputs then cast back to the maps' dtype)."""
        if self.config.transformer_precision != "bfloat16":
            return self.transformer(features)
        dtype = features[0].dtype
        with torch.autocast(features[0].device.type, dtype=torch.bfloat16):
            rec = self.transformer(features)
        return Reconstructions([r.to(dtype) for r in rec.own], [r.to(dtype) for r in rec.memory])

    def fuse(self, features: list[torch.Tensor], rec: Reconstructions) -> list[torch.Tensor]:
        """Per scale ``cat_c(E_k, R^self_k, R^mem_k)`` ``[B, 3 C_k, h_k, w_k]`` (before the norms)."""
        return [torch.cat([e, own.to(e.dtype), mem.to(e.dtype)], dim=1) for e, own, mem in zip(features, rec.own, rec.memory)]

    def frozen_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen part's outputs for the current stage (no autograd): stage 1 the backbone maps
        ``E_k``; stage 2 the fused ``cat(E_k, R^self_k, R^mem_k)`` ``[B, 3 C_k, h_k, w_k]``."""
        with torch.no_grad():
            features = self.backbone_features(images)
            if self.stage == "reconstruction":
                return features
            return self.fuse(features, self.reconstruct(features))

    def frozen_fingerprint(self) -> str:
        """Digest of the frozen part of the current stage: the extractor (stage 1), or the extractor
        and the transformer (stage 2), with the config (see :meth:`AnomalyModel.digest_frozen`)."""
        if self.stage == "reconstruction":
            return self.digest_frozen(self.extractor)
        return self.digest_frozen(nn.ModuleDict({"extractor": self.extractor, "transformer": self.transformer}))

    def flows_of(self, fused: list[torch.Tensor]) -> DADFOutput:
        """The norms and flows on fused inputs -> ``DADFOutput(latents, logdets)``, in the flows'
        dtype with autocast off (float32 log-dets under a bf16 run)."""
        self._check_maps(fused, [3 * c for c in self.channels], "flow")
        dtype = self.flows[0][0].global_scale.dtype
        with torch.autocast(fused[0].device.type, enabled=False):
            latents, logdets = [], []
            for norm, flow, x in zip(self.norms, self.flows, fused):
                z, logdet = flow(norm(x.to(dtype)))
                latents.append(z)
                logdets.append(logdet)
        return DADFOutput(latents, logdets)

    def _check_maps(self, maps: Any, channels: list[int], stage: str) -> None:
        if not isinstance(maps, (list, tuple)) or len(maps) != len(channels) or any(
            not isinstance(m, torch.Tensor) or m.dim() != 4 or m.shape[1] != c or tuple(m.shape[-2:]) != tuple(grid)
            for m, c, grid in zip(maps, channels, self.grids)
        ):
            got = [tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__ for m in maps] if isinstance(maps, (list, tuple)) else type(maps).__name__
            raise ValueError(
                f"stage {stage!r} takes {len(channels)} maps [B, C, h, w] with C = {channels} and (h, w) = {self.grids}, got {got}; features cached in "
                "one stage do not serve the other (call set_stage, or let fit build each stage's cache)"
            )

    def forward(self, images: torch.Tensor) -> DADFOutput:
        """``images [B, 3, H, W]`` -> ``DADFOutput(latents, logdets)`` (the whole pipeline, any stage)."""
        features = self.backbone_features(images)
        return self.flows_of(self.fuse(features, self.reconstruct(features)))

    def loss(self, batch: Any) -> torch.Tensor:
        """The current stage's loss (scalar): stage 1 ``sum_k [MSE(R^mem_k, E_k) + MSE(R^self_k, E_k)]``;
        stage 2 ``sum_k mean_b(0.5 * sum z_k^2 - logdet_k)`` (nats, FastFlow's).

        Args:
            batch: images ``[B, 3, H, W]`` or a batch dict: ``"image"``, or ``"features"`` (this
                stage's cached :meth:`frozen_features`) instead.
        """
        batch = as_batch(batch)
        raw = list(batch["features"]) if "features" in batch else self.frozen_features(batch["image"])
        if self.stage == "reconstruction":
            self._check_maps(raw, self.channels, "reconstruction")
            return reconstruction_loss(raw, self.reconstruct(raw))
        latents, logdets = self.flows_of(raw)
        total = None
        for z, logdet in zip(latents, logdets):
            term = ops.gaussian_nll(z, logdet).mean()
            total = term if total is None else total + term
        return total

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Anomaly map ``[B, H, W]`` in ``[-e, 0]`` and image scores ``[B]``; ``maps``: ``score_max``,
        ``score_log_space`` and the per-scale ``log_likelihood_{k}`` (``-0.5 mean_c z_k^2``)."""
        latents, _ = self(images)
        return self.head(latents, tuple(images.shape[-2:]))

    def extra_repr(self) -> str:
        return f"stage={self.stage!r}, channels={self.channels}, grids={self.grids}"


__all__ = ["DADF", "DADFOutput", "OFFICIAL_RECIPE", "STAGES"]
