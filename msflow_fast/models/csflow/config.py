"""``CSFlowConfig``: every CS-Flow hyper-parameter in one frozen, validated dataclass (MODELS_SPEC.md
Part A §3; the official marco-rudolph/cs-flow ``config.py`` and anomalib 2.7's ``Csflow``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import ModelConfig, normalize_input_size
from ..config_checks import require_bool, require_choice, require_int, require_name, require_number
from ..extractor import BACKBONE_PRECISIONS

PERMUTATIONS = ("official", "anomalib")
ANOMALY_MAPS = ("largest_scale", "product")


@dataclass(frozen=True)
class CSFlowConfig(ModelConfig):
    """CS-Flow model configuration; the defaults are the official code's.

    Attributes:
        input_size: image size ``(H, W)`` of the finest scale; the other two are ``H/2`` and ``H/4``
            (nearest-neighbour resized). With a stride-32 backbone both sides must be multiples of
            128, so that the three feature grids halve exactly (official: 768, maps 24/12/6;
            anomalib's default 256, maps 8/4/2).
        backbone: timm EfficientNet-family name whose stage ``cnn_block`` gives the features
            (``tf_efficientnet_b5``: the TensorFlow weights and "same" padding of the
            ``efficientnet_pytorch`` model the official code uses; anomalib uses torchvision's B5).
        pretrained: load timm's pretrained backbone weights (needs network or a timm cache).
        cnn_block: the stage (0-based) whose output is used (5: EfficientNet-B5 stage 6, 304 channels).
        coupling_blocks: cross-scale coupling blocks (4), each a per-scale channel permutation and
            a two-sided affine coupling whose subnets are :class:`~msflow_fast.nn.CrossConvolutions`.
        hidden_channels: the subnets' hidden width (1024; anomalib's default 1024).
        kernel_sizes: the subnets' kernel size per block (``(3, 3, 3, 5)``: the official config's
            ``[3] * (n - 1) + [5]``); one per coupling block.
        clamp: ``alpha`` of the soft clamp ``alpha * 0.636 * atan(s / alpha)`` (3).
        leaky_slope: the subnets' LeakyReLU slope (0.1).
        use_gamma: the subnets' learnable output scales ``gamma_k`` (initialised to 0).
        permutation: how each block's per-scale channel permutations are drawn: ``"official"``
            (``np.random.seed(k)`` then one ``np.random.permutation`` per scale: three different
            permutations) or ``"anomalib"`` (``np.random.default_rng(k).permutation`` for every
            scale: one permutation, the same at the three scales). They are stored in checkpoints.
        anomaly_map: which map is ``Prediction.anomaly_map`` (both are in ``maps``):
            ``"largest_scale"`` (the official localisation: ``mean_c z_0^2`` of the finest scale,
            upsampled bilinearly) or ``"product"`` (anomalib: the product over the three scales of
            the upsampled ``mean_c z_k^2``).
        backbone_precision: ``"float32"`` or ``"bfloat16"``: the frozen backbone's compute
            precision (see :data:`~msflow_fast.models.extractor.BACKBONE_PRECISIONS`); the flows,
            log-dets and scores stay float32.
    """

    input_size: tuple[int, int] = (768, 768)
    backbone: str = "tf_efficientnet_b5"
    pretrained: bool = True
    cnn_block: int = 5
    coupling_blocks: int = 4
    hidden_channels: int = 1024
    kernel_sizes: tuple[int, ...] = (3, 3, 3, 5)
    clamp: float = 3.0
    leaky_slope: float = 0.1
    use_gamma: bool = True
    permutation: str = "official"
    anomaly_map: str = "largest_scale"
    backbone_precision: str = "float32"

    def __post_init__(self) -> None:
        normalize_input_size(self)
        require_name(self, "backbone")
        require_bool(self, "pretrained", "use_gamma")
        require_int(self, "cnn_block", 0)
        require_int(self, "coupling_blocks", 1)
        require_int(self, "hidden_channels", 1)
        kernels = tuple(self.kernel_sizes) if not isinstance(self.kernel_sizes, (str, bytes)) else ()
        if len(kernels) != self.coupling_blocks or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1 and k % 2 == 1 for k in kernels
        ):
            raise ValueError(
                f"kernel_sizes must hold one odd int >= 1 per coupling block ({self.coupling_blocks}), got {self.kernel_sizes!r}"
            )
        object.__setattr__(self, "kernel_sizes", kernels)
        require_number(self, "clamp")
        require_number(self, "leaky_slope")
        require_choice(self, "permutation", PERMUTATIONS)
        require_choice(self, "anomaly_map", ANOMALY_MAPS)
        require_choice(self, "backbone_precision", BACKBONE_PRECISIONS)


__all__ = ["ANOMALY_MAPS", "CSFlowConfig", "PERMUTATIONS"]
