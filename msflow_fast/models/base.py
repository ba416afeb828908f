"""The model protocol: what every model of the zoo offers the engine, and what it returns.

The engine (training, evaluation, prediction), the checkpoints and the exporter know a model only
through this module:

- :class:`AnomalyModel`: an ``nn.Module`` with a frozen config dataclass (:class:`ModelConfig`),
  ``loss(batch) -> scalar``, ``predict(images) -> Prediction``, ``recipe() -> TrainRecipe`` and
  ``metric_maps`` (which map feeds which pixel metric).
- :class:`Prediction`: ``anomaly_map [B, H, W]`` (higher = more anomalous, at the input
  resolution), ``score [B]`` and ``maps``, a dict of the other named maps and scores a model
  reports.
- :class:`TrainRecipe`: the training defaults, as one or more :class:`TrainStage` run in order.
- :func:`as_batch`: the batch dict ``loss`` receives: ``"image"`` ``[B, 3, H, W]`` and, where the
  data has them, ``"mask"`` ``[B, H, W]`` (non-zero = anomalous), ``"label"`` ``[B]``, ``"path"``
  and ``"defect"`` (lists of str). Models supervised by pseudo anomalies read the mask and label.
- :meth:`AnomalyModel.pseudo_anomalies`: a model that trains on pseudo anomalies says so per stage
  (the generator's settings, a plain dict); ``fit`` then wraps the good training images in the
  engine's pseudo-anomaly dataset, draws new anomalies every epoch (``set_epoch``) and adds
  ``"clean_image"`` ``[B, 3, H, W]`` to the batch: the good image before the anomaly was drawn on it.
  A model with a frozen part (:meth:`AnomalyModel.frozen_features`) also takes ``"features"``
  (its frozen part's outputs, a list of ``[B, ...]`` tensors) instead of ``"image"``: the engine
  computes them once per dataset and trains later epochs on the cache.

Images are ImageNet-normalised float tensors. Spatial models (feature maps) and fiber models
(per-pixel vectors) alike take images and return maps at the input size; what happens between
is the model's own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from .. import ops
from .._sizes import image_size_hw

METRICS = ("pixel_auroc", "aupro", "spro")
"""Pixel metrics a model routes maps to through :attr:`AnomalyModel.metric_maps`."""


# ---------------------------------------------------------------------------------------------- batches


def as_batch(batch: Any) -> dict[str, Any]:
    """The batch dict of a tensor ``[B, 3, H, W]`` (or ``[3, H, W]``), a dict with ``"image"``, or a
    tuple/list whose first item is the images; the dict is a shallow copy, images always 4-D.

    Raises:
        KeyError: a dict without ``"image"``.
        TypeError, ValueError: anything else, or images that are not ``[B, 3, H, W]``.
    """
    if isinstance(batch, torch.Tensor):
        out: dict[str, Any] = {"image": batch}
    elif isinstance(batch, Mapping):
        if "image" not in batch:
            if "features" in batch:  # a batch of cached frozen features (see AnomalyModel.frozen_features)
                return dict(batch)
            raise KeyError(f"batch dict has no 'image' (or 'features') entry (keys: {sorted(map(str, batch))})")
        out = dict(batch)
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        out = {"image": batch[0]}
    else:
        raise TypeError(
            f"batch: expected a tensor [B, 3, H, W], a dict with 'image' or an (images, ...) tuple, got {type(batch).__name__}"
        )
    images = out["image"]
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"batch 'image' must be a tensor [B, 3, H, W], got {type(images).__name__}")
    if images.dim() == 3:
        out["image"] = images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"batch images: expected [B, 3, H, W], got shape {tuple(images.shape)}")
    return out


def batch_paths(batch: Any) -> list[str] | None:
    """The ``"path"`` entries of a dict batch (file names for error messages), else ``None``."""
    if isinstance(batch, Mapping):
        value = batch.get("path")
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        if isinstance(value, str):
            return [value]
    return None


# ---------------------------------------------------------------------------------------------- outputs


class Prediction(NamedTuple):
    """What :meth:`AnomalyModel.predict` returns.

    Attributes:
        anomaly_map: ``[B, H, W]`` at the input resolution, higher = more anomalous (the default
            map of every pixel metric and of the heat-map overlays).
        score: ``[B]`` image scores, higher = more anomalous.
        maps: the model's other named outputs: maps ``[B, H, W]`` (or per-scale ``[B, h, w]``)
            and scores ``[B]``; :attr:`AnomalyModel.metric_maps` names the ones metrics use.
    """

    anomaly_map: torch.Tensor
    score: torch.Tensor
    maps: dict[str, torch.Tensor]

    def get(self, name: str) -> torch.Tensor:
        """``anomaly_map``, ``score`` or ``maps[name]``; ``KeyError`` lists the names there are."""
        if name in ("anomaly_map", "score"):
            return getattr(self, name)
        if name not in self.maps:
            raise KeyError(f"the prediction has no map {name!r}; it has anomaly_map, score and {sorted(self.maps)}")
        return self.maps[name]


# ---------------------------------------------------------------------------------------------- recipes


def _positive(value: Any, name: str, kind: type = float, allow_zero: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise TypeError(f"{name} must be {'a number' if kind is float else 'an int'}, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return kind(value)


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate factor per epoch: a linear warm-up, then a step decay at milestones.

    Lengths are fractions of the stage's epochs, so a shorter run keeps the shape of the schedule:
    :meth:`resolve` turns them into epochs (rounded). The default is a constant rate.

    Attributes:
        warmup: fraction of the epochs over which the factor rises linearly from ``warmup_start`` to 1.
        milestones: fractions of the epochs at which the factor is multiplied by ``gamma``.
        gamma: decay factor per milestone.
        warmup_start: factor at epoch 0 of the warm-up.
    """

    warmup: float = 0.0
    milestones: tuple[float, ...] = ()
    gamma: float = 1.0
    warmup_start: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.warmup) <= 1.0:
            raise ValueError(f"warmup must be a fraction in [0, 1], got {self.warmup!r}")
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        if any(not 0.0 <= m <= 1.0 for m in self.milestones):
            raise ValueError(f"milestones must be fractions in [0, 1], got {self.milestones!r}")
        _positive(self.gamma, "gamma")
        _positive(self.warmup_start, "warmup_start")

    def resolve(self, epochs: int) -> tuple[int, tuple[int, ...]]:
        """``(warm-up epochs, milestone epochs)`` for a stage of ``epochs`` epochs."""
        return int(round(self.warmup * epochs)), tuple(int(round(m * epochs)) for m in self.milestones)


@dataclass(frozen=True)
class TrainStage:
    """One training stage: optimizer, schedule and length. Arguments of ``fit`` override them.

    Attributes:
        name: the stage's name (``model.set_stage(name)`` is called before it runs).
        epochs: epochs of this stage.
        batch_size: images per step (per process under DDP).
        optimizer: ``"adam"`` or ``"adamw"``.
        lr, betas, eps, weight_decay: optimizer settings (``weight_decay`` is the optimizer's own:
            L2 for Adam, decoupled for AdamW).
        grad_clip: maximum gradient norm per step, ``None`` for no clipping.
        schedule: the learning-rate schedule.
        drop_last: drop the last incomplete batch of each epoch.
    """

    name: str = "train"
    epochs: int = 100
    batch_size: int = 8
    optimizer: str = "adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = None
    schedule: LRSchedule = LRSchedule()
    drop_last: bool = False

    OPTIMIZERS: ClassVar[tuple[str, ...]] = ("adam", "adamw")

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"stage name must be a non-empty str, got {self.name!r}")
        _positive(self.epochs, "epochs", int)
        _positive(self.batch_size, "batch_size", int)
        if self.optimizer not in self.OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {self.OPTIMIZERS}, got {self.optimizer!r}")
        _positive(self.lr, "lr")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        _positive(self.eps, "eps")
        _positive(self.weight_decay, "weight_decay", allow_zero=True)
        if self.grad_clip is not None:
            _positive(self.grad_clip, "grad_clip")
        if not isinstance(self.schedule, LRSchedule):
            raise TypeError(f"schedule must be an LRSchedule, got {type(self.schedule).__name__}")

    def replace(self, **changes: Any) -> "TrainStage":
        """A validated copy with ``changes`` (``None`` values keep the current setting)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class TrainRecipe:
    """A model's training defaults: its stages, run in order (most models have one)."""

    stages: tuple[TrainStage, ...]

    def __post_init__(self) -> None:
        stages = tuple(self.stages)
        if not stages or not all(isinstance(s, TrainStage) for s in stages):
            raise TypeError("a TrainRecipe needs at least one TrainStage")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        object.__setattr__(self, "stages", stages)

    def stage(self, name: str) -> TrainStage:
        """The stage called ``name``; ``ValueError`` lists the stages there are."""
        for s in self.stages:
            if s.name == name:
                return s
        raise ValueError(f"no training stage {name!r}; this recipe has {[s.name for s in self.stages]}")


# ---------------------------------------------------------------------------------------------- configs


class ModelConfig:
    """Mixin for a model's frozen config dataclass: validated copies and a JSON-safe dict form.

    Subclasses are ``@dataclass(frozen=True)`` with defaults for every field, validate in
    ``__post_init__`` and document each field in an ``Attributes:`` docstring section (the CLI
    makes one flag per field from it).
    """

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied (validated); unknown names raise ``TypeError``."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown {type(self).__name__} field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` (lists for tuples), JSON-serialisable."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError`` naming them."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict needs a dict, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})


def normalize_input_size(config: Any) -> None:
    """Store ``config.input_size`` as ``(H, W)`` (call from a frozen config's ``__post_init__``)."""
    object.__setattr__(config, "input_size", image_size_hw(config.input_size, "input_size"))


# ---------------------------------------------------------------------------------------------- models


class AnomalyModel(nn.Module):
    """Base class of the zoo's models (see the module docstring for the protocol).

    Subclasses set :attr:`config_class`, are registered with
    :func:`msflow_fast.models.registry.register` (which sets :attr:`name`, :attr:`summary` and
    :attr:`interpretation`), take ``(config=None, backbone=None, **overrides)`` and implement
    :meth:`loss`, :meth:`predict` and :attr:`default_recipe` (or :meth:`recipe_for`).

    Attributes:
        config: the model's frozen config (an instance of :attr:`config_class`).
        check_finite: whether :meth:`check_images` run from a forward pass rejects NaN/inf images:
            ``None`` (default) follows the ops' policy (only with ``MSFLOW_FAST_CHECK_FINITE=1``;
            the check reads every value and syncs the device), ``True``/``False`` force it.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    interpretation: ClassVar[bool] = False
    config_class: ClassVar[type] = ModelConfig
    metric_maps: ClassVar[Mapping[str, str]] = {}
    """Metric (one of :data:`METRICS`) -> the name of the :class:`Prediction` map that feeds it;
    a metric not listed uses ``anomaly_map``."""
    default_recipe: ClassVar[TrainRecipe | None] = None
    """The recipe of every config (see :meth:`recipe_for`)."""
    fixed_on_load: ClassVar[tuple[str, ...]] = ()
    """Config fields that decide stored weights and so cannot be overridden when loading."""
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    """Named config settings (e.g. the published backbones), ``--preset NAME`` on the command line."""
    demo_config: ClassVar[Mapping[str, Any]] = {}
    """Config fields of ``msflow-fast demo``: a small model that trains in minutes on a CPU, no download."""
    demo_training: ClassVar[Mapping[str, Any]] = {}
    """``fit`` overrides of the demo (``epochs``, ``lr``, ``batch_size``)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.check_finite: bool | None = None

    @classmethod
    def from_preset(cls, name: str, backbone: nn.Module | None = None, **overrides: Any) -> "AnomalyModel":
        """A model of preset ``name`` (one of :attr:`presets`) with ``overrides``; ``backbone``: as the
        model's constructor takes it."""
        if name not in cls.presets:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; presets: {', '.join(cls.presets) or 'none'}")
        return cls(cls.config_class(**{**cls.presets[name], **overrides}), backbone=backbone)

    @classmethod
    def make_config(cls, config: Any = None, **overrides: Any) -> Any:
        """The config of ``cls(config, **overrides)``: the default config, or ``config``, with ``overrides``."""
        if config is None:
            config = cls.config_class()
        elif not isinstance(config, cls.config_class):
            raise TypeError(f"config must be a {cls.config_class.__name__}, got {type(config).__name__}")
        return config.replace(**overrides) if overrides else config

    @staticmethod
    def backbone_module(backbone: Any, overrides: dict[str, Any]) -> nn.Module | None:
        """The ``backbone`` argument of a model: a timm name goes into ``overrides["backbone"]``
        (so it reaches the config) and ``None`` is returned; a module is returned as it is."""
        if isinstance(backbone, str):
            overrides["backbone"] = backbone
            return None
        if backbone is not None and not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a timm model name or an nn.Module, got {type(backbone).__name__}")
        return backbone

    @property
    def input_size(self) -> tuple[int, int]:
        """``(H, W)`` the data pipeline resizes images to (``config.input_size``)."""
        return tuple(self.config.input_size)

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter or buffer (CPU for a model without any)."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's first floating parameter (float32 for a model without any)."""
        for t in self.parameters():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def metric_map(self, metric: str) -> str:
        """The :class:`Prediction` map that feeds ``metric`` (see :attr:`metric_maps`)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        return self.metric_maps.get(metric, "anomaly_map")

    # -------------------------------------------------------------- images

    def check_images(self, images: object, check_finite: bool | None = True, *, in_channels: int = 3) -> torch.Tensor:
        """Validate an image batch ``[B, in_channels, H, W]`` on the model's device; returns it unchanged.

        The type, shape and device checks read metadata only and always run; :meth:`check_image_size`
        adds the model's own size rules. The NaN/inf check reads every value and syncs the device:
        a direct call runs it by default; a forward pass passes ``check_finite=None``, which
        follows :attr:`check_finite`, then ``MSFLOW_FAST_CHECK_FINITE``. It never runs while
        torch.compile / torch.export trace.

        Raises:
            TypeError: not a floating tensor, or on another device than the model.
            ValueError: wrong rank or channel count, empty, a size the model cannot take, or (when
                checked) NaN or infinite values.
        """
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, {in_channels}, H, W], got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating tensor (normalized images), got dtype {images.dtype}")
        if images.dim() != 4:
            raise ValueError(f"images must be 4-D [B, {in_channels}, H, W], got shape {tuple(images.shape)}")
        if images.shape[1] != in_channels:
            raise ValueError(
                f"images must have {in_channels} channels, got shape {tuple(images.shape)} "
                "(replicate grayscale images to 3 channels)"
            )
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch")
        self.check_image_size(int(images.shape[-2]), int(images.shape[-1]))
        device = self.device
        if images.device != device:
            raise TypeError(f"images are on {images.device} but the model is on {device}; move one of them")
        dtype = self.dtype
        if images.dtype != dtype:
            raise TypeError(
                f"images are {images.dtype} but the model's weights are {dtype}; pass images.to({dtype}) "
                "(for mixed precision keep float32 weights and use torch.autocast)"
            )
        if check_finite is None:
            check_finite = self.check_finite
        if ops.check_finite_enabled(check_finite) and not torch.compiler.is_compiling():
            bad = ~torch.isfinite(images)
            if bool(bad.any()):
                images_bad = bad.flatten(1).any(1).nonzero().flatten().tolist()
                raise ValueError(
                    f"images contain NaN or infinite values ({int(bad.sum())} of {images.numel()}, in batch "
                    f"image(s) {images_bad}); check the data pipeline (decoding, normalisation). "
                    f"A forward pass checks this only with model.check_finite=True or {ops.ENV_CHECK_FINITE}=1"
                )
        return images

    def check_image_size(self, height: int, width: int) -> None:
        """Raise ``ValueError`` for an image size the model cannot take (default: any size)."""

    # -------------------------------------------------------------- protocol

    def loss(self, batch: Any) -> torch.Tensor:
        """Training loss of a batch (see :func:`as_batch`): a scalar, in the model's units."""
        raise NotImplementedError(f"{type(self).__name__} does not implement loss(batch)")

    def predict(self, images: torch.Tensor) -> Prediction:
        """:class:`Prediction` of images ``[B, 3, H, W]`` (no autograd)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement predict(images)")

    @classmethod
    def recipe_for(cls, config: Any) -> TrainRecipe:
        """The training defaults of a model with ``config`` (the authors' recipe where it is known):
        :attr:`default_recipe`, unless a model's recipe depends on its config."""
        if cls.default_recipe is None:
            raise NotImplementedError(f"{cls.__name__} sets no default_recipe and does not implement recipe_for(config)")
        return cls.default_recipe

    def recipe(self) -> TrainRecipe:
        """The training defaults of this model: ``recipe_for(self.config)``."""
        return type(self).recipe_for(self.config)

    def frozen_features(self, images: torch.Tensor) -> list[torch.Tensor] | None:
        """The outputs of the model's frozen part for images ``[B, 3, H, W]`` (a list of ``[B, ...]``
        tensors), or ``None`` for a model without one (the default).

        They must be a pure function of the image (frozen weights, no randomness, no batch
        statistics), and ``loss({"features": ...})`` must equal ``loss({"image": ...})``: the
        engine then computes them once per dataset and trains on the cache (``fit(feature_cache=)``).
        A model whose loss reads masks must not offer them (the cache keeps ``"label"``,
        ``"path"`` and ``"defect"`` besides the features, not the masks).
        """
        return None

    def frozen_fingerprint(self) -> str | None:
        """A sha256 hex digest of everything :meth:`frozen_features` depends on besides the image
        (the frozen weights and the settings that shape the features), or ``None`` without a frozen
        part. It keys the on-disk feature cache: two models with equal digests must give equal features.
        """
        return None

    def digest_frozen(self, frozen: nn.Module) -> str:
        """:meth:`frozen_fingerprint` for a model whose frozen part is the module ``frozen``: its
        state, the model's name and config (less ``pretrained``: the weights are in the state) and
        the dtype the features come in. Conservative: any config change gives a new digest."""
        config = {k: v for k, v in self.config.to_dict().items() if k != "pretrained"} if self.config is not None else None
        dtype = next((p.dtype for p in self.parameters() if p.requires_grad), None)
        return tensor_digest(frozen.state_dict(), {"model": self.name, "config": config, "dtype": str(dtype)})

    def pseudo_anomalies(self, stage: str) -> Mapping[str, Any] | None:
        """The pseudo anomalies the stage ``stage`` trains on, or ``None`` (the default): train on the
        data as given.

        A dict of ``PseudoAnomalyConfig`` fields (:mod:`msflow_fast.engine.data.pseudo_anomaly`; an
        empty dict for its defaults): ``fit`` wraps a map-style dataset of good images in a
        ``PseudoAnomalyDataset`` with them (the dataset's ``category``, where it has one and the dict
        names none, picks the category's priors), calls its ``set_epoch`` every epoch (new anomalies
        each epoch, a function of the seed, stage and epoch) and the batches carry ``"image"`` (the
        corrupted image), ``"mask"``, ``"label"`` and ``"clean_image"``. Such inputs change every
        epoch, so the feature cache is off for that stage.
        """
        return None

    def set_stage(self, stage: str) -> None:
        """Called by ``fit`` before the stage named ``stage`` of :meth:`recipe` runs (default: nothing)."""

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        """The parameters the stage ``stage`` optimises (default: all with ``requires_grad``)."""
        return [p for p in self.parameters() if p.requires_grad]

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def tensor_digest(tensors: Mapping[str, torch.Tensor], settings: Any = None) -> str:
    """sha256 hex digest of named tensors (names, dtypes, shapes, bytes) and JSON-able ``settings``."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        t = tensors[name].detach()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        data = t.cpu().contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


__all__ = [
    "METRICS",
    "AnomalyModel",
    "LRSchedule",
    "ModelConfig",
    "Prediction",
    "TrainRecipe",
    "TrainStage",
    "as_batch",
    "batch_paths",
    "normalize_input_size",
    "tensor_digest",
]
