"""The zoo's models as anomalib 2.7 ``AnomalibModule`` s, for ``anomalib.engine.Engine``.

:class:`ZooModule` wraps any registered :class:`~msflow_fast.models.base.AnomalyModel` and knows
it only through the model protocol (``loss``, ``predict``, ``recipe``, ``set_stage``,
``stage_parameters``); :class:`MSFlowModule` and :class:`FastFlowModule` name the two models::

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from msflow_fast.integrations.anomalib import MSFlowModule

    datamodule = MVTecAD(root="datasets/MVTecAD", category="bottle", train_batch_size=8)
    model = MSFlowModule(backbone="resnet18", input_size=256, parallel_blocks=(1, 1, 1))
    engine = Engine(max_epochs=20)
    engine.fit(model=model, datamodule=datamodule)
    engine.test(model=model, datamodule=datamodule)   # [{"image_AUROC": ..., "pixel_AUROC": ...}]

What anomalib gets:

- ``self.model``: the zoo model itself (``module.model.predict(images)`` works as in msflow_fast).
- the pre-processor: ``Resize(config.input_size)`` and ImageNet ``Normalize`` (torchvision v2),
  applied by anomalib to the images (and the masks) of every batch, and inside ``forward``.
- training: ``{"loss": model.loss({"image": images})}`` per batch; the optimizer, learning-rate
  schedule and gradient clipping of the model's :class:`~msflow_fast.models.base.TrainStage`.
- validation, test and predict: the batch with ``anomaly_map [B, H, W]`` (at the input size) and
  ``pred_score [B]`` from ``model.predict``; anomalib's ``PostProcessor`` then normalises them and
  sets thresholds, its ``Evaluator`` computes image and pixel AUROC (and F1 at test).
- ``forward(images [B, 3, H, W])`` (what ``Engine.export`` saves and ``TorchInferencer`` calls):
  pre-process, predict, post-process -> ``InferenceBatch(pred_score [B], pred_label [B],
  anomaly_map [B, 1, H, W], pred_mask [B, 1, H, W])``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch
from torch import nn

try:
    from anomalib import LearningType
    from anomalib.data import Batch, InferenceBatch
    from anomalib.metrics import AUROC, Evaluator, F1Score
    from anomalib.models.components import AnomalibModule
    from anomalib.pre_processing import PreProcessor
    from anomalib.visualization import Visualizer
except ImportError as exc:  # pragma: no cover - anomalib is a test dependency
    raise ImportError(
        "msflow_fast.integrations.anomalib needs anomalib: pip install 'anomalib==2.7.*' -c constraints.txt "
        "(the constraints file keeps your torch)"
    ) from exc
from torchvision.transforms.v2 import Compose, Normalize, Resize

from ...engine.data import IMAGENET_MEAN, IMAGENET_STD
from ...engine.optim import EpochSchedule, make_optimizer
from ...models import registry
from ...models.base import AnomalyModel, TrainStage

logger = logging.getLogger(__name__)

LIGHTNING_DEFAULT_EPOCHS = 1000
"""The epochs Lightning runs when neither ``max_epochs`` nor ``max_steps`` is set: a fit that
ends up with exactly this number runs the recipe's epochs instead (see :meth:`ZooModule.setup`)."""


class ZooModule(AnomalibModule):
    """Any registered msflow_fast model as an anomalib ``AnomalibModule`` (one-class learning).

    Args:
        model: an :class:`~msflow_fast.models.base.AnomalyModel` (used as given), a registry name
            (``"msflow"``, ``"fastflow"``, ``"csflow"``, ... see ``msflow_fast.available()``), or
            ``None``: the model of the subclass (:attr:`model_name`).
        max_epochs: epochs of a fit; ``None``: the ``Engine``'s / ``Trainer``'s ``max_epochs``
            and, where neither sets it, the recipe's. anomalib applies a model's trainer arguments
            over the ``Engine``'s, so a value here wins over ``Engine(max_epochs=...)``.
        lr, weight_decay: override the recipe's learning rate and weight decay (``None``: recipe).
        grad_clip: maximum gradient norm (``None``: the recipe's; ``False``: no clipping).
        pre_processor: ``True`` for the model's input size and ImageNet normalisation (see
            :meth:`configure_pre_processor`), ``False`` for none, or a ``PreProcessor``.
        post_processor, evaluator, visualizer: as for every anomalib model (``True`` = default,
            ``False`` = none, or an instance).
        **config_overrides: fields of the model's config (e.g. ``backbone="resnet18"``,
            ``pretrained=False``, ``input_size=256``) for a model built here; not with an instance.

    The training settings are the model's single-stage recipe (``model.recipe()``): its optimizer
    (Adam or AdamW with the recipe's lr, betas, eps and weight decay, over
    ``model.stage_parameters(stage)``), its learning-rate schedule (per epoch, scaled to the run's
    epochs as ``msflow_fast.engine.fit`` scales it) and its gradient clipping (Lightning's
    ``gradient_clip_val``). The batch size is the datamodule's: pass
    ``train_batch_size=module.train_stage.batch_size`` for the recipe's.

    Raises:
        TypeError: a bad ``model``, or config overrides given with a model instance.
        ValueError: an unknown model name, or a recipe of several stages (train those with
            ``msflow_fast.engine.fit``).
    """

    model_name: ClassVar[str] = ""
    """The registry name of the model a subclass wraps (``""``: any model, given as ``model``)."""

    def __init__(
        self,
        model: AnomalyModel | str | None = None,
        *,
        max_epochs: int | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        grad_clip: float | bool | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        **config_overrides: Any,
    ) -> None:
        if max_epochs is not None and (isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1):
            raise ValueError(f"max_epochs must be a positive int or None, got {max_epochs!r}")
        if grad_clip is True or (isinstance(grad_clip, (int, float)) and not isinstance(grad_clip, bool) and not grad_clip > 0):
            raise ValueError(f"grad_clip must be a positive max norm, False (no clipping) or None (the recipe's), got {grad_clip!r}")
        zoo = self._build_model(model, config_overrides)
        stage = self._recipe_stage(zoo, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(zoo.input_size)
        # AnomalibModule.__init__ records this frame's arguments as hyper-parameters; the model is
        # recorded below by name and config (a module there would be pickled into checkpoints).
        model = zoo.name
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer)
        self.model = zoo
        self.train_stage: TrainStage = stage
        self._max_epochs = max_epochs
        self.save_hyperparameters(
            {"model": model, "max_epochs": max_epochs, "lr": lr, "weight_decay": weight_decay, "grad_clip": grad_clip, **zoo.config.to_dict()}
        )

    # ------------------------------------------------------------------ construction

    @classmethod
    def _build_model(cls, model: AnomalyModel | str | None, overrides: dict[str, Any]) -> AnomalyModel:
        """The zoo model of ``model`` (an instance, a registry name or ``None``) with config ``overrides``."""
        expected = registry.get(cls.model_name) if cls.model_name else None
        if isinstance(model, AnomalyModel):
            if overrides:
                raise TypeError(
                    f"{cls.__name__}: config overrides {sorted(overrides)} cannot change a model that is already built; "
                    f"build it with them, or pass the overrides without model="
                )
        elif model is None or isinstance(model, str):
            name = model if model is not None else cls.model_name
            if not name:
                raise TypeError(f"{cls.__name__} needs a model: an msflow_fast model instance or a registry name ({', '.join(registry.available())})")
            # checkpoints store tuples as lists (ModelConfig.to_dict); configs take both
            config = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
            model = registry.create(name, **config)
        else:
            raise TypeError(f"{cls.__name__}: model must be an msflow_fast AnomalyModel, a registry name or None, got {type(model).__name__}")
        if expected is not None and not isinstance(model, expected):
            raise TypeError(
                f"{cls.__name__} wraps {expected.__name__} models, got {type(model).__name__}; "
                f"use ZooModule(model) for any registered model"
            )
        return model

    @staticmethod
    def _recipe_stage(model: AnomalyModel, **changes: Any) -> TrainStage:
        """The model's single training stage with ``changes`` (``None`` keeps the recipe's, ``grad_clip=False`` clears it)."""
        stages = model.recipe().stages
        if len(stages) != 1:
            raise ValueError(
                f"{type(model).__name__}'s recipe has {len(stages)} stages ({[s.name for s in stages]}); anomalib trains one "
                "optimizer over one run: train this model with msflow_fast.engine.fit"
            )
        clip = changes.pop("grad_clip", None)
        stage = stages[0].replace(**changes)
        return dataclasses.replace(stage, grad_clip=None) if clip is False else stage.replace(grad_clip=clip)

    # ------------------------------------------------------------------ anomalib hooks

    @classmethod
    def configure_pre_processor(cls, image_size: int | tuple[int, int] | None = None) -> PreProcessor:
        """``Resize(image_size)`` (antialiased) then ImageNet ``Normalize``, as torchvision v2 transforms.

        Args:
            image_size: ``(H, W)`` or a side; ``None``: the default input size of :attr:`model_name`'s config.
        """
        if image_size is None:
            if not cls.model_name:
                raise ValueError(f"{cls.__name__}.configure_pre_processor needs image_size (the model's input size)")
            image_size = registry.get(cls.model_name).config_class().input_size
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        return PreProcessor(transform=Compose([Resize(size, antialias=True), Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))]))

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image and pixel AUROC at validation; image and pixel AUROC and F1 at test (pixel metrics
        only where the data has masks)."""
        val_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ]
        test_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
        ]
        return Evaluator(val_metrics=val_metrics, test_metrics=test_metrics)

    @property
    def learning_type(self) -> LearningType:
        """``ONE_CLASS``: the models train on normal images only."""
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """The recipe's gradient clipping (by norm; 0 = none), no sanity validation and, where
        given to the module, ``max_epochs``. anomalib applies these over the ``Engine``'s arguments."""
        arguments: dict[str, Any] = {
            "gradient_clip_val": self.train_stage.grad_clip or 0,
            "gradient_clip_algorithm": "norm",
            "num_sanity_val_steps": 0,
        }
        if self._max_epochs is not None:
            arguments["max_epochs"] = self._max_epochs
        return arguments

    def setup(self, stage: str) -> None:
        """Before a fit: the recipe's epochs where no ``max_epochs`` (nor ``max_steps``) was set
        (Lightning would run :data:`LIGHTNING_DEFAULT_EPOCHS`), and the model's training stage."""
        if stage != "fit":
            return
        trainer = self.trainer
        loop = trainer.fit_loop
        if self._max_epochs is None and loop.max_epochs == LIGHTNING_DEFAULT_EPOCHS and trainer.max_steps == -1:
            logger.info(
                "%s: max_epochs not set: training the recipe's %d epochs (pass max_epochs to the module or the Engine)",
                type(self).__name__, self.train_stage.epochs,
            )
            loop.max_epochs = self.train_stage.epochs
        self.model.set_stage(self.train_stage.name)

    def configure_optimizers(self) -> dict[str, Any]:
        """The recipe's optimizer over ``model.stage_parameters(stage)`` and, where the recipe has
        one, its per-epoch learning-rate schedule (a ``LambdaLR``) over the run's epochs.

        Returns:
            ``{"optimizer": ...}``, plus ``"lr_scheduler": {"scheduler", "interval": "epoch"}`` for a schedule.
        """
        params = self.model.stage_parameters(self.train_stage.name)
        if not params:
            raise ValueError(f"{type(self.model).__name__} has no trainable parameters in stage {self.train_stage.name!r}")
        trainer = self._trainer
        precision = str(getattr(trainer, "precision", "")) if trainer is not None else ""
        if precision.startswith("16"):  # a GradScaler unscales before clipping: not with a fused optimizer
            options = {"lr": self.train_stage.lr, "betas": self.train_stage.betas, "eps": self.train_stage.eps, "weight_decay": self.train_stage.weight_decay}
            optimizer = (torch.optim.Adam if self.train_stage.optimizer == "adam" else torch.optim.AdamW)(params, **options)
        else:
            optimizer = make_optimizer(self.train_stage, params)
        schedule = self.train_stage.schedule
        if schedule.warmup == 0 and (not schedule.milestones or schedule.gamma == 1.0):
            return {"optimizer": optimizer}
        epochs = trainer.max_epochs if trainer is not None and trainer.max_epochs and trainer.max_epochs > 0 else self.train_stage.epochs
        lambda_lr = EpochSchedule.for_stage(self.train_stage.replace(epochs=int(epochs)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "frequency": 1}}

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """``{"loss": model.loss({"image": batch.image})}`` (a scalar, the model's units), logged as ``train_loss``."""
        del args, kwargs
        loss = self.model.loss({"image": batch.image})
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, logger=True, batch_size=batch.image.shape[0])
        return {"loss": loss}

    def _predict_batch(self, batch: Batch) -> Batch:
        prediction = self.model.predict(batch.image)
        return batch.update(anomaly_map=prediction.anomaly_map, pred_score=prediction.score)

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """The batch with ``anomaly_map [B, H, W]`` and ``pred_score [B]`` of ``model.predict`` (raw model units)."""
        del args, kwargs
        return self._predict_batch(batch)

    def test_step(self, batch: Batch, batch_idx: int, *args: Any, **kwargs: Any) -> Batch:
        """As :meth:`validation_step` (anomalib's PostProcessor then normalises and thresholds)."""
        del batch_idx, args, kwargs
        return self._predict_batch(batch)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Batch:
        """As :meth:`validation_step` (anomalib's PostProcessor then normalises and thresholds)."""
        del batch_idx, dataloader_idx
        return self._predict_batch(batch)

    def forward(self, batch: torch.Tensor, *args: Any, **kwargs: Any) -> InferenceBatch:
        """``images [B, 3, H, W]`` (float in [0, 1], any size) -> post-processed ``InferenceBatch``
        (``pred_score [B]``, ``anomaly_map [B, 1, H, W]`` at the input size, labels and masks once
        thresholds are known): what an exported model computes."""
        del args, kwargs
        images = self.pre_processor(batch) if self.pre_processor else batch
        prediction = self.model.predict(images)
        output = InferenceBatch(pred_score=prediction.score, anomaly_map=prediction.anomaly_map.unsqueeze(1))
        return self.post_processor(output) if self.post_processor else output


class MSFlowModule(ZooModule):
    """MSFlow (:class:`msflow_fast.MSFlow`) for anomalib: ``MSFlowModule(**MSFlowConfig fields)``.

    The default config is the official one: wide_resnet50_2 (pretrained weights are downloaded
    unless timm has them cached) at 512x512, and the official recipe (100 epochs, Adam 1e-4 with a
    warm-up and two decays, gradient norm 2, batch 8). For a quick run, e.g.
    ``MSFlowModule(backbone="resnet18", input_size=256, parallel_blocks=(1, 1, 1))``.
    """

    model_name = "msflow"


class FastFlowModule(ZooModule):
    """FastFlow (:class:`msflow_fast.FastFlow`) for anomalib: ``FastFlowModule(**FastFlowConfig fields)``.

    The default config is the ``resnet18`` preset at 256x256 and the anomalib / gathierry recipe
    (Adam 1e-3, weight decay 1e-5, no clipping, 500 epochs, batch 32). With the default
    ``feature_norm="layer_norm"`` the model takes only its ``input_size``, which the pre-processor
    resizes to.
    """

    model_name = "fastflow"


__all__ = ["FastFlowModule", "LIGHTNING_DEFAULT_EPOCHS", "MSFlowModule", "ZooModule"]
