"""Pseudo anomalies for any model: synthetic defects drawn onto good images, with exact masks.

A sample is normal with probability ``p_normal`` (the image, label 0, an empty mask); otherwise
one branch is drawn with ``branch_weights``: DRAEM texture intrusion, CutPaste patch, CutPaste
scar or NSA Poisson blend (:mod:`.pseudo.branches`). Before that the image is turned by the
category's rotation rule, and anomalies of object categories are kept on the foreground
(:mod:`.pseudo.priors`). A mask covering less than ``min_area`` or more than ``max_area`` of the
image (after the foreground restriction), or whose change is fainter than ``min_contrast``, is
redrawn up to ``max_attempts`` times; then a texture square of a valid size is pasted (branch
``"fallback"``), so an anomalous sample always has a valid mask.

Images are float ``[3, H, W]`` in [0, 1] on any device (CPU or CUDA; the work stays on the
tensor's device). Determinism: sample ``index`` (and ``epoch``) of a generator with ``seed``
draws from its own CPU ``torch.Generator`` (:func:`.pseudo.draws.generator`), so the same
(seed, epoch, index) and image give bit-identical output on CPU (same torch build and thread
count), whatever ran before, and batches or workers may run in any order. Another thread count or
CUDA makes the same draws; values then differ by float rounding only (about 1e-7; a decision that
falls exactly on a threshold could flip).

:class:`PseudoAnomalyDataset` wraps any dataset of good images (dict items with ``"image"``,
ImageNet-normalised as the engine's datasets yield them, or in [0, 1]: ``normalization=``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from .checks import decoded_finite
from .images import denormalize, normalize
from .pseudo.branches import BRANCH_FUNCTIONS, Context, fallback
from .pseudo.config import BRANCHES, TEXTURE_SOURCES, PseudoAnomalyConfig
from .pseudo.draws import generator, randint, uniform, weighted_choice
from .pseudo.priors import apply_rotation, draw_rotation, estimate_foreground

__all__ = [
    "BRANCHES",
    "MODES",
    "NORMALIZATIONS",
    "PseudoAnomalyBatch",
    "PseudoAnomalyConfig",
    "PseudoAnomalyDataset",
    "PseudoAnomalyGenerator",
    "PseudoSample",
    "TEXTURE_SOURCES",
]

NORMALIZATIONS = ("imagenet", "none")
MODES = ("mixture", "anomalous", "paired")
_FORCE = (None, "normal", "anomaly")


@dataclass(frozen=True)
class PseudoSample:
    """One generated sample.

    Attributes:
        image: float ``[3, H, W]`` in [0, 1] (the rotated good image, changed inside ``mask``).
        mask: float ``[H, W]`` in {0, 1}; all 0 for a normal sample.
        label: 0 normal, 1 anomalous.
        branch: ``"normal"``, a branch of :data:`BRANCHES`, or ``"fallback"``.
        attempts: draws used (0 for a normal sample).
        clean: float ``[3, H, W]`` in [0, 1]: the good image as it was before the anomaly was drawn
            on it (rotated like ``image``), the target of a model that learns to undo anomalies.
    """

    image: torch.Tensor
    mask: torch.Tensor
    label: int
    branch: str
    attempts: int
    clean: torch.Tensor | None = None

    @property
    def area(self) -> float:
        """The mask's area as a fraction of the image."""
        return float(self.mask.mean())


@dataclass(frozen=True)
class PseudoAnomalyBatch:
    """A generated batch: ``images`` ``[B, 3, H, W]`` in [0, 1], ``masks`` ``[B, H, W]`` float,
    ``labels`` long ``[B]`` and ``branches`` (``B`` names)."""

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    branches: list[str]


def _check_image(image: Any, what: str = "image") -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{what}: expected a float tensor [3, H, W] in [0, 1], got {shape}")
    low, high = torch.aminmax(image)
    if float(low) < -1e-4 or float(high) > 1.0 + 1e-4:
        raise ValueError(
            f"{what}: values span [{float(low):.3g}, {float(high):.3g}], expected [0, 1]; ImageNet-normalised images "
            "must be denormalised first (msflow_fast.engine.denormalize), or wrapped in "
            "PseudoAnomalyDataset(..., normalization='imagenet')"
        )
    return image.clamp(0.0, 1.0)


class PseudoAnomalyGenerator:
    """Draws pseudo-anomalous samples from good images (see the module docstring).

    Args:
        config: a :class:`PseudoAnomalyConfig` (default: DRAEM-like defaults, no category).
        seed: the generator's seed; with ``(epoch, index)`` it fixes every draw of a sample.
    """

    def __init__(self, config: PseudoAnomalyConfig | None = None, seed: int = 0) -> None:
        if config is None:
            config = PseudoAnomalyConfig()
        if not isinstance(config, PseudoAnomalyConfig):
            raise TypeError(f"config: expected a PseudoAnomalyConfig, got {type(config).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {seed!r}")
        self.config, self.seed = config, seed
        self.sources = config.sources()
        self._names = [name for name, _ in config.branch_weights]
        self._weights = [weight for _, weight in config.branch_weights]

    def __repr__(self) -> str:
        return f"PseudoAnomalyGenerator(seed={self.seed}, config={self.config!r})"

    def __call__(
        self, image: torch.Tensor, index: int = 0, *, epoch: int = 0, other: torch.Tensor | Callable[[], torch.Tensor] | None = None,
        force: str | None = None,
    ) -> PseudoSample:
        """One sample from ``image`` ``[3, H, W]`` in [0, 1].

        Args:
            index, epoch: with the seed, fix every draw (change ``epoch`` for new anomalies each epoch).
            other: another good image ``[3, H', W']`` in [0, 1] (or a function returning one or ``None``,
                called only when the Poisson branch is drawn) to blend from; ``None`` blends from
                ``image`` itself.
            force: ``None`` (the mixture), ``"normal"`` (the image as it is, no rotation) or
                ``"anomaly"`` (always anomalous).
        """
        if force not in _FORCE:
            raise ValueError(f"force: expected None, 'normal' or 'anomaly', got {force!r}")
        x = _check_image(image)
        if force == "normal":
            return PseudoSample(x.clone(), torch.zeros(x.shape[-2:], device=x.device), 0, "normal", 0, x)
        cfg = self.config
        rng = generator(self.seed, epoch, index)
        turns, degrees = draw_rotation(cfg.rotation_rule(), rng, square=x.shape[-1] == x.shape[-2])
        x = apply_rotation(x, turns, degrees)
        normal = uniform(rng, 0.0, 1.0) < cfg.p_normal
        if force is None and (normal or sum(self._weights) <= 0):
            return PseudoSample(x, torch.zeros(x.shape[-2:], device=x.device), 0, "normal", 0, x)
        branch = self._names[weighted_choice(rng, self._weights)]
        ctx = Context(cfg, self.sources, self._foreground(x), self._supplier(other))
        for attempt in range(1, cfg.max_attempts + 1):
            proposal = BRANCH_FUNCTIONS[branch](x, rng, ctx)
            if proposal is None:
                continue
            out, mask = self._composite(x, proposal, ctx)
            if self._acceptable(x, out, mask):
                return PseudoSample(out, mask, 1, branch, attempt, x)
        out, mask = fallback(x, rng, ctx)
        if ctx.area_ok(mask):
            out, mask = self._composite(x, (out, mask), ctx)
        return PseudoSample(out.clamp(0.0, 1.0), mask, 1, "fallback", cfg.max_attempts + 1, x)

    def batch(
        self, images: torch.Tensor, start_index: int = 0, *, epoch: int = 0, others: torch.Tensor | None = None, force: str | None = None,
    ) -> PseudoAnomalyBatch:
        """Samples for ``images`` ``[B, 3, H, W]`` in [0, 1]; image ``i`` is sample ``start_index + i``.

        ``others``: ``[B, 3, H, W]`` good images to blend from; ``None`` blends image ``i`` from image
        ``(i + 1) % B`` of the batch (itself when ``B == 1``).
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images: expected a float tensor [B, 3, H, W] in [0, 1], got {getattr(images, 'shape', type(images).__name__)}")
        n = images.shape[0]
        if others is not None and (others.dim() != 4 or others.shape[0] != n):
            raise ValueError(f"others: expected [B, 3, H, W] with B = {n}, got {tuple(others.shape)}")
        samples = [
            self(images[i], start_index + i, epoch=epoch, other=others[i] if others is not None else (images[(i + 1) % n] if n > 1 else None), force=force)
            for i in range(n)
        ]
        return PseudoAnomalyBatch(
            torch.stack([s.image for s in samples]), torch.stack([s.mask for s in samples]),
            torch.tensor([s.label for s in samples], dtype=torch.long), [s.branch for s in samples],
        )

    # ------------------------------------------------------------------------------------------

    def _foreground(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.config.uses_foreground():
            return None
        foreground = estimate_foreground(x, self.config.foreground_threshold)
        # Too little foreground (a failed estimate): no restriction rather than no valid mask.
        return foreground if float(foreground.mean()) >= self.config.min_area else None

    @staticmethod
    def _supplier(other: Any) -> Callable[[], torch.Tensor | None]:
        if other is None:
            return lambda: None
        if callable(other):

            def supply() -> torch.Tensor | None:
                value = other()
                return None if value is None else _check_image(value, "other")

            return supply
        return lambda: _check_image(other, "other")

    @staticmethod
    def _composite(x: torch.Tensor, proposal: tuple[torch.Tensor, torch.Tensor], ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """The change kept only on the foreground; the mask restricted the same way."""
        out, mask = proposal
        if ctx.foreground is not None:
            out = x + (out - x) * ctx.foreground[None]
            mask = mask * ctx.foreground
        return out.clamp(0.0, 1.0), mask

    def _acceptable(self, x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> bool:
        cfg = self.config
        area = float(mask.mean())
        if not cfg.min_area <= area <= cfg.max_area:
            return False
        change = ((out - x).abs().amax(0) * mask).sum() / mask.sum()
        return float(change) >= cfg.min_contrast


class PseudoAnomalyDataset(Dataset):
    """Pseudo-anomalous items from any dataset of good images.

    Items: ``image`` (normalised as the base's: ImageNet for ``normalization="imagenet"``, else in
    [0, 1]), ``mask`` float ``[H, W]`` in {0, 1}, ``label`` int, ``branch`` str, ``defect``
    (``"good"`` or ``"pseudo_<branch>"``), ``path`` (the base item's, or ``""``) and ``index`` (of
    the base item); with ``clean_image=True`` also ``clean_image``, the good image before the
    anomaly (rotated like ``image``, normalised the same way). An item is a function of (seed,
    epoch, index): call :meth:`set_epoch` each epoch for new anomalies. Generation is many small per-image ops: on CPU use DataLoader workers
    (``num_workers > 0``, one torch thread each) rather than intra-op threads.

    Args:
        base: a map-style dataset of good images whose items are dicts with ``"image"`` ``[3, H, W]``
            (the engine's :class:`MVTecDataset` train split, :class:`SyntheticDefects` train split,
            :class:`ImageFolderDataset`); an item with a non-zero ``"label"`` is refused.
        config, seed: the generator's (see :class:`PseudoAnomalyGenerator`).
        normalization: ``"imagenet"`` (the default: the engine's datasets yield ImageNet-normalised
            images; they are denormalised, changed, normalised again) or ``"none"`` (images in [0, 1]).
        mode: ``"mixture"`` (the default): ``len(base)`` items from the mixture; ``"anomalous"``:
            ``len(base)`` items, every one anomalous; ``"paired"``: ``2 * len(base)`` items, item
            ``2i`` the good image ``i`` unchanged and ``2i + 1`` an anomalous version of it (an
            evaluation set with both classes of every image).
        clean_image: add the ``"clean_image"`` entry (for a student trained to reproduce a teacher's
            features of the clean image from the corrupted one).
    """

    deterministic_items = False  # set_epoch changes the items: never feature-cached

    def __init__(
        self, base: Any, config: PseudoAnomalyConfig | None = None, *, seed: int = 0, normalization: str = "imagenet", mode: str = "mixture",
        clean_image: bool = False,
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization: expected 'imagenet' (the engine's datasets) or 'none' (images in [0, 1]), got {normalization!r}")
        if not hasattr(base, "__getitem__") or not hasattr(base, "__len__"):
            raise TypeError(f"base: expected a map-style dataset (with __getitem__ and __len__), got {type(base).__name__}")
        if len(base) == 0:
            raise ValueError("base: the dataset of good images is empty")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")
        self.base, self.normalization, self.mode = base, normalization, mode
        self.clean_image = bool(clean_image)
        self.generator = PseudoAnomalyGenerator(config, seed)
        self.epoch = 0
        self.images_are_finite = decoded_finite(base)

    @property
    def config(self) -> PseudoAnomalyConfig:
        return self.generator.config

    def set_epoch(self, epoch: int) -> None:
        """Draw the anomalies of ``epoch`` from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base) * (2 if self.mode == "paired" else 1)

    def _good(self, index: int) -> tuple[torch.Tensor, Mapping[str, Any]]:
        item = self.base[index]
        if not isinstance(item, Mapping) or "image" not in item:
            raise TypeError(f"base[{index}]: expected a dict with an 'image' entry, got {type(item).__name__}")
        label = item.get("label", 0)
        if int(label) != 0:
            raise ValueError(
                f"base[{index}] ({item.get('path') or 'no path'}) has label {int(label)}: pseudo anomalies are made from good "
                "images only; use the train split or the good test images"
            )
        image = item["image"]
        if self.normalization == "imagenet":
            image = denormalize(image.float())
        return image, item

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if self.mode == "paired":
            base_index, force = index // 2, ("normal" if index % 2 == 0 else "anomaly")
        else:
            base_index, force = index, ("anomaly" if self.mode == "anomalous" else None)
        image, item = self._good(base_index)
        n = len(self.base)

        def other() -> torch.Tensor | None:
            if n < 2:
                return None
            pick = generator(self.generator.seed, self.epoch, index, "other")
            j = (base_index + randint(pick, 1, n - 1)) % n
            return self._good(j)[0]

        sample = self.generator(image, index, epoch=self.epoch, other=other, force=force)
        out = normalize(sample.image) if self.normalization == "imagenet" else sample.image
        item_out = {
            "image": out,
            "mask": sample.mask,
            "label": sample.label,
            "branch": sample.branch,
            "defect": "good" if sample.label == 0 else f"pseudo_{sample.branch}",
            "path": str(item.get("path", "")),
            "index": base_index,
        }
        if self.clean_image:
            item_out["clean_image"] = normalize(sample.clean) if self.normalization == "imagenet" else sample.clean
        return item_out
