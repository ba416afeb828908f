"""``MSFlowAASConfig``: the hyper-parameters of ``msflow_aas`` in one frozen, validated dataclass.

``msflow_aas`` is an INTERPRETATION of MS-Flow (Mao, Wu, Xing, Acta Automatica Sinica 2024, 50(3)),
built from the paper's abstract alone (MODELS_SPEC.md Part A §4.3): every default below is a choice
made here, not a setting published by the authors.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base import ModelConfig, normalize_input_size
from ..config_checks import require_bool, require_choice, require_int, require_name, require_number
from ..extractor import BACKBONE_PRECISIONS

WIRINGS = ("conditional", "split")
SCORES = ("mean_z2", "top_k")
ANOMALY_MAPS = ("sum", "product")


@dataclass(frozen=True)
class MSFlowAASConfig(ModelConfig):
    """Configuration of ``msflow_aas``, an INTERPRETATION of MS-Flow (Acta Automatica Sinica 2024):
    only the paper's abstract is public, so the architecture and every default here are choices
    made in this package, not the authors' settings. Not MSFlow of Zhou et al. (TNNLS 2024,
    ``--model msflow``).

    The features are CS-Flow's (EfficientNet-B5 stage 6 of the image at three scales). The flows'
    size is chosen so that their FLOPs are about 1/8 of CS-Flow's flows (the abstract's "about 1/8
    of CS-Flow's FLOPs"), measured with ``torch.utils.flop_counter.FlopCounterMode`` on the flows
    alone with the fast paths off (FLOPs = 2 x multiply-adds; 304-channel features at 24/12/6 for
    768 px, 8/4/2 for 256 px):

    =========  ============  ==========================  ==============
    input      CS-Flow flow  msflow_aas flow (defaults)  CS-Flow / this
    =========  ============  ==========================  ==============
    768 px     131.70 GFLOP  16.46 GFLOP                 8.00
    256 px     14.63 GFLOP   1.83 GFLOP                  8.00
    =========  ============  ==========================  ==============

    (``wiring="split"`` with the same widths: 14.46 GFLOP at 768 px, a ratio of 9.11.) The
    backbone is not in these figures: EfficientNet-B5 to stage 6 on the three image scales adds
    59.06 GFLOP at 768 px (6.58 at 256) to both models, so whole-model ``predict`` costs 75.5
    against CS-Flow's 190.8 GFLOP at 768 px (a ratio of 2.5; ``msflow-fast models --flops``).

    Attributes:
        input_size: image size ``(H, W)`` of the finest scale; the other two are ``H/2`` and ``H/4``
            (nearest-neighbour resized, as CS-Flow). With a stride-32 backbone both sides must be
            multiples of 128, so that the three feature grids halve exactly (768: grids 24/12/6).
        backbone: timm EfficientNet-family name whose stage ``cnn_block`` gives the features
            (``tf_efficientnet_b5``, CS-Flow's); a module can be passed to the model instead.
        pretrained: load timm's pretrained backbone weights (needs network or a timm cache).
        cnn_block: the stage (0-based) whose output is used (5: EfficientNet-B5 stage 6, 304 channels).
        blocks_per_level: ``K``, the AllInOneBlock couplings of each of the three levels (8).
        hpm_mid: hidden width of the hierarchical perception module, the couplings' subnet (704;
            a multiple of ``hpm_groups``).
        hpm_groups: ``s``, the groups the HPM splits its hidden channels into (4: receptive fields
            1, 3, 5 and 7 pixels).
        clamp: ``alpha`` of the couplings' soft clamp ``alpha * tanh(0.1 * a)`` (1.9, FrEIA 0.2's form).
        wiring: how the three levels are joined, coarse to fine (level 2 = the coarsest grid):
            ``"conditional"`` (default): ``z_2 = F_2(x_2)``, ``z_1 = F_1(x_1 | Up(z_2))``,
            ``z_0 = F_0(x_0 | Up(z_1))``, where ``Up`` is a x2 bilinear upsampling and the
            condition is concatenated to the subnet input of every coupling of the level.
            ``"split"`` (Glow-style factor-out and concatenate): ``h_2 = F_2(x_2) = [z_2, r_2]``,
            ``h_1 = F_1([x_1, D(r_2)]) = [z_1, r_1]``, ``z_0 = F_0([x_0, D(r_1)])``, where the
            carried part ``r_l`` is the last ``c_r = 4 * floor(C / 8)`` channels of ``h_l`` and ``D``
            is depth-to-space (``pixel_shuffle(2)``: ``[c_r, h, w] -> [c_r / 4, 2h, 2w]``, a
            permutation of coordinates). Both are exactly invertible with ``log|det J| = sum_l
            log|det J_l|``; see :class:`~msflow_fast.models.msflow_aas.flows.HierarchicalFlow`.
        score: the image score: ``"mean_z2"`` (CS-Flow's ``mean(z^2 / 2)`` over every dimension of
            every level) or ``"top_k"`` (the mean of the ``top_k`` fraction of largest pixels of
            the ``anomaly_map`` map). Both are in ``Prediction.maps``.
        top_k: fraction of pixels averaged by ``score="top_k"``, in ``(0, 1]`` (0.03).
        anomaly_map: which map is ``Prediction.anomaly_map`` (both are in ``maps``): ``"sum"``
            (``sum_l Up(mean_c z_l^2)``) or ``"product"`` (``prod_l Up(mean_c z_l^2)``), with
            ``Up`` bilinear to the input size.
        backbone_precision: ``"float32"`` or ``"bfloat16"``: the frozen backbone's compute
            precision (see :data:`~msflow_fast.models.extractor.BACKBONE_PRECISIONS`); the flows,
            log-dets and scores stay float32.
    """

    input_size: tuple[int, int] = (768, 768)
    backbone: str = "tf_efficientnet_b5"
    pretrained: bool = True
    cnn_block: int = 5
    blocks_per_level: int = 8
    hpm_mid: int = 704
    hpm_groups: int = 4
    clamp: float = 1.9
    wiring: str = "conditional"
    score: str = "mean_z2"
    top_k: float = 0.03
    anomaly_map: str = "sum"
    backbone_precision: str = "float32"

    def __post_init__(self) -> None:
        normalize_input_size(self)
        require_name(self, "backbone")
        require_bool(self, "pretrained")
        require_int(self, "cnn_block", 0)
        for name in ("blocks_per_level", "hpm_mid", "hpm_groups"):
            require_int(self, name, 1)
        if self.hpm_mid % self.hpm_groups:
            raise ValueError(
                f"hpm_mid ({self.hpm_mid}) must be a multiple of hpm_groups ({self.hpm_groups}): the HPM splits its "
                f"hidden channels into equal groups (e.g. hpm_mid={self.hpm_mid - self.hpm_mid % self.hpm_groups or self.hpm_groups})"
            )
        require_number(self, "clamp")
        require_number(self, "top_k", at_most=1.0)
        require_choice(self, "wiring", WIRINGS)
        require_choice(self, "score", SCORES)
        require_choice(self, "anomaly_map", ANOMALY_MAPS)
        require_choice(self, "backbone_precision", BACKBONE_PRECISIONS)


__all__ = ["ANOMALY_MAPS", "MSFlowAASConfig", "SCORES", "WIRINGS"]
