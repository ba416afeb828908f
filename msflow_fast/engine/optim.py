"""The optimizer and learning-rate schedule of a :class:`~msflow_fast.models.base.TrainStage`."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..models.base import TrainStage


class EpochSchedule:
    """Learning-rate factor per epoch: linear warm-up times step decay (picklable, for ``LambdaLR``).

    ``factor(e) = (start + (1 - start) * min(e, W) / W) * gamma ** #{m in milestones: m <= e}``, the
    closed form of ``LinearLR(start_factor=start, total_iters=W)`` chained with
    ``MultiStepLR(milestones, gamma)``. A pure function of the epoch, so a resumed run continues
    with exactly the rate an uninterrupted one would have.

    Args:
        warmup_epochs: W; 0 disables the warm-up.
        milestones: epochs at which the factor is multiplied by ``gamma``.
        gamma: decay factor at each milestone.
        warmup_start: factor at epoch 0.
    """

    def __init__(self, warmup_epochs: int = 0, milestones: Iterable[int] = (), gamma: float = 1.0, warmup_start: float = 1.0) -> None:
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs: expected an int >= 0, got {warmup_epochs!r}")
        self.warmup_epochs = warmup_epochs
        self.milestones = tuple(sorted(int(m) for m in milestones))
        if not gamma > 0 or not warmup_start > 0:
            raise ValueError(f"gamma and warmup_start must be > 0, got {gamma!r} and {warmup_start!r}")
        self.gamma, self.warmup_start = float(gamma), float(warmup_start)

    @classmethod
    def for_stage(
        cls,
        stage: TrainStage,
        *,
        warmup_epochs: int | None = None,
        milestones: Iterable[int] | None = None,
        gamma: float | None = None,
        warmup_start: float | None = None,
    ) -> "EpochSchedule":
        """The stage's schedule over its epochs; the arguments (epochs, factors) override it.

        Raises:
            ValueError: an override that would change nothing: a warm-up that starts at factor 1
                (pass ``warmup_start``) or milestones with ``gamma`` 1 (pass ``gamma``).
        """
        warm, steps = stage.schedule.resolve(stage.epochs)
        schedule = cls(
            warm if warmup_epochs is None else warmup_epochs,
            steps if milestones is None else milestones,
            stage.schedule.gamma if gamma is None else gamma,
            stage.schedule.warmup_start if warmup_start is None else warmup_start,
        )
        if warmup_epochs and schedule.warmup_start == 1.0:
            raise ValueError(
                f"warmup_epochs={warmup_epochs} has no effect: stage {stage.name!r} warms up from factor 1.0; "
                "pass warmup_start (e.g. 0.1) as well"
            )
        if milestones is not None and schedule.milestones and schedule.gamma == 1.0:
            raise ValueError(f"milestones={list(milestones)} have no effect: stage {stage.name!r} decays by gamma 1.0; pass gamma as well")
        return schedule

    def __call__(self, epoch: int) -> float:
        if self.warmup_epochs > 0:
            warm = self.warmup_start + (1.0 - self.warmup_start) * min(epoch, self.warmup_epochs) / self.warmup_epochs
        else:
            warm = 1.0
        return warm * self.gamma ** sum(1 for m in self.milestones if m <= epoch)

    def __repr__(self) -> str:
        return (
            f"EpochSchedule(warmup_epochs={self.warmup_epochs}, milestones={self.milestones}, "
            f"gamma={self.gamma}, warmup_start={self.warmup_start})"
        )


def make_optimizer(stage: TrainStage, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The stage's optimizer (``adam`` or ``adamw``, with its lr, betas, eps and weight decay) over ``params``.

    The fused implementation (one kernel over all parameters: on CPU about 13x faster than the
    per-tensor loop for MSFlow's 100 M parameters, the same update to float32 rounding) is used
    where torch has it for every parameter (floating point, on CPU or CUDA); else the default one.
    """
    options = {"lr": stage.lr, "betas": stage.betas, "eps": stage.eps, "weight_decay": stage.weight_decay}
    if stage.optimizer not in ("adam", "adamw"):
        raise ValueError(f"unknown optimizer {stage.optimizer!r} (expected one of {TrainStage.OPTIMIZERS})")
    cls = torch.optim.Adam if stage.optimizer == "adam" else torch.optim.AdamW
    if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return cls(params, fused=True, **options)
        except (RuntimeError, TypeError, ValueError):  # a torch without the fused kernel for these tensors
            pass
    return cls(params, **options)


__all__ = ["EpochSchedule", "make_optimizer"]
