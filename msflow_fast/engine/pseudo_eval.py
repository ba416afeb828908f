"""Estimated metrics without defective samples: a checkpoint scored on pseudo anomalies.

Which good images (they must be unseen by the model):

- ``test/good`` (``test/ok`` in the BTAD layout; MVTec LOCO AD's ``test/good``) of the category: ``msflow-fast train`` trains on
  ``train/good`` only, so these are never seen. Defect folders under ``test/`` are ignored.
- the ``train/good`` files that ``msflow-fast train --holdout FRACTION`` held back: it trains on
  ``holdout_split(files, FRACTION)[0]`` and lists the held-back files (their names in ``train/good``)
  in :data:`HOLDOUT_FILE` next to the checkpoint (:func:`write_holdout`); ``eval --pseudo-anomalies``
  reads that record (:func:`read_holdout`) and adds them, known unseen.
- with ``holdout=FRACTION`` and no record, a fixed selection of the ``train/good`` files
  (:func:`holdout_split`: the files sorted by name, a permutation of ``torch.Generator`` seeded
  with :data:`HOLDOUT_SEED`, its first ``round(FRACTION * n)``): the selection ``train --holdout``
  makes, but without its record this cannot be checked: the images are unseen only if the model
  was trained without them. The result carries a warning saying so.

Each good image gives two items (:class:`PseudoAnomalyDataset` ``mode="paired"``): itself,
unchanged (label 0), and a pseudo-anomalous version (label 1; mixture branches by their weights,
no rotation), so image AUROC compares every image with its own defective version. The result
is :func:`~.evaluate.evaluate`'s, labelled ``"estimate": "pseudo_anomalies"``, with the setting
and the image AUROC of each branch against the unchanged images under ``"pseudo_anomalies"``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._files import atomic_write_json
from .data.folders import LAYOUTS, ImageFolderDataset, detect_layout, list_images
from .data.pseudo_anomaly import PseudoAnomalyConfig, PseudoAnomalyDataset
from .evaluate import evaluate
from .metrics import auroc

__all__ = [
    "ESTIMATE_NOTE", "HOLDOUT_FILE", "HOLDOUT_SEED", "evaluate_pseudo_anomalies", "good_folders", "holdout_split", "pseudo_eval_images",
    "read_holdout", "write_holdout",
]

HOLDOUT_SEED = 0
HOLDOUT_FILE = "holdout.json"
"""The record ``train --holdout`` writes next to its checkpoint: the held-back ``train/good`` files."""
ESTIMATE_NOTE = (
    "pseudo-anomaly estimate: synthetic defects drawn on good images the model did not train on; not a test-set "
    "result (real defects may be easier or harder to find)"
)


def holdout_split(files: Sequence[str | os.PathLike], fraction: float, seed: int = HOLDOUT_SEED) -> tuple[list[Path], list[Path]]:
    """``(kept, held_back)``: a fixed selection of ``round(fraction * n)`` files (at least 1, at most
    ``n - 1``) held back, the rest kept; both sorted by name. The same files and fraction always
    give the same split (see the module docstring).

    Raises:
        ValueError: ``fraction`` outside (0, 1), or fewer than 2 files.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout: expected a fraction in (0, 1), got {fraction!r}")
    ordered = sorted((Path(f) for f in files), key=lambda p: p.name)
    if len(ordered) < 2:
        raise ValueError(f"holdout: needs at least 2 training images to hold some back, found {len(ordered)}")
    count = min(len(ordered) - 1, max(1, round(fraction * len(ordered))))
    rng = torch.Generator()
    rng.manual_seed(seed)
    chosen = set(torch.randperm(len(ordered), generator=rng)[:count].tolist())
    held = [p for i, p in enumerate(ordered) if i in chosen]
    kept = [p for i, p in enumerate(ordered) if i not in chosen]
    return kept, held


def write_holdout(folder: str | os.PathLike, fraction: float, held: Sequence[str | os.PathLike], kept: int) -> Path:
    """Write :data:`HOLDOUT_FILE` in ``folder``: ``{"fraction", "seed", "kept", "files"}``, ``"files"``
    the held-back files' names relative to the ``train/good`` folder (so a differently spelled
    ``--data`` still matches them); atomic. Returns its path."""
    record = {"fraction": float(fraction), "seed": HOLDOUT_SEED, "kept": int(kept), "files": [Path(p).name for p in held]}
    return atomic_write_json(Path(folder) / HOLDOUT_FILE, record)


def read_holdout(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The :data:`HOLDOUT_FILE` record in ``folder``, or ``None`` without one. ``"files"``: the
    held-back files' names in ``train/good`` (a record that lists paths, as the first version of
    ``train --holdout`` wrote, gives their names).

    Raises:
        ValueError: a record that is not one; the message names the file and the field.
    """
    path = Path(folder) / HOLDOUT_FILE
    if not path.is_file():
        return None
    fix = "remove it (a resumed run or eval then treats the run as trained on every train/good image) or train again with --holdout"
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a holdout record written by msflow-fast train --holdout (not JSON: {exc}); {fix}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a holdout record: expected a JSON object, got {type(record).__name__}; {fix}")

    def bad(field: str, expected: str) -> ValueError:
        shown = repr(record[field]) if field in record else "missing"
        return ValueError(f"{path}: field {field!r} must be {expected}, got {shown[:80]}; {fix}")

    fraction = record.get("fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) or not 0.0 < fraction < 1.0:
        raise bad("fraction", "a number between 0 and 1 (exclusive)")
    files = record.get("files")
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise bad("files", "a non-empty list of file names (strings)")
    names = [Path(f).name for f in files]  # a path (first-version record) gives its name
    if any(n in ("", ".", "..") for n in names) or len(set(names)) != len(names):
        raise bad("files", "a list of distinct file names in train/good")
    kept = record.get("kept")
    if isinstance(kept, bool) or not isinstance(kept, int) or kept < 1:
        raise bad("kept", "a positive integer (the number of training images kept)")
    return {**record, "fraction": float(fraction), "files": names, "path": str(path)}


def good_folders(root: str | os.PathLike, category: str | None = None, *, layout: str = "auto") -> tuple[Path, Path]:
    """``(test good folder, train good folder)`` of a category (``good/``, or ``ok/`` for BTAD); they may not exist.

    Raises:
        FileNotFoundError: no such category folder.
        ValueError: an unknown layout.
    """
    base = Path(root) / category if category else Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"category folder not found: {base} (check --data and --category)")
    if layout == "auto":
        layout = detect_layout(base) or "mvtec"
    normals = {**LAYOUTS, "loco": "good"}  # MVTec LOCO AD keeps its good images in train/good and test/good too
    if layout not in normals:
        raise ValueError(f"layout: expected 'auto', {', '.join(repr(k) for k in normals)}, got {layout!r}")
    return base / "test" / normals[layout], base / "train" / normals[layout]


def pseudo_eval_images(
    root: str | os.PathLike, category: str | None = None, *, layout: str = "auto", holdout: float | None = None,
    recorded: dict[str, Any] | None = None,
) -> tuple[list[Path], dict[str, Any]]:
    """The good images to evaluate on (module docstring) and a description of where they came from.

    Args:
        holdout: the fraction of ``train/good`` to add (:func:`holdout_split`) when there is no record.
        recorded: :func:`read_holdout`'s record of the training run: its held-back files are added
            (``holdout``, if given, must be its fraction).

    Raises:
        FileNotFoundError: no such category folder, no good test images and nothing held back, or
            a recorded file that is gone.
        ValueError: ``holdout`` differs from the recorded fraction.
    """
    test_dir, train_dir = good_folders(root, category, layout=layout)
    test_files = list_images(test_dir) if test_dir.is_dir() else []
    held: list[Path] = []
    if recorded is not None:
        if holdout is not None and abs(float(holdout) - recorded["fraction"]) > 1e-12:
            raise ValueError(
                f"--holdout {holdout:g} differs from the {recorded['fraction']:g} the model was trained with "
                f"({recorded.get('path', HOLDOUT_FILE)}); omit --holdout to use the recorded files"
            )
        held = [train_dir / name for name in recorded["files"]]
        missing = [p.name for p in held if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the {len(held)} held-back training images listed in {recorded.get('path', HOLDOUT_FILE)} are not in "
                f"{train_dir} ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): the model was trained on another "
                "dataset or category (check --data and --category), or they were removed since (restore them)"
            )
        holdout = recorded["fraction"]
    elif holdout is not None:
        held = holdout_split(list_images(train_dir), holdout)[1]
    if not test_files and not held:
        raise FileNotFoundError(
            f"no good test images in {test_dir}: the pseudo-anomaly estimate needs good images the model did not train on; "
            f"move a few good images there before training (msflow-fast train reads only {train_dir}), train with "
            "msflow-fast train --holdout FRACTION (it records the images it held back), or pass --holdout FRACTION here "
            "(only valid if the model was trained without those images)"
        )
    info = {
        "test_good": len(test_files), "test_folder": str(test_dir), "train_holdout": len(held),
        "holdout": None if holdout is None else {"fraction": float(holdout), "seed": HOLDOUT_SEED, "files": [str(p) for p in held],
                                                 "recorded": recorded is not None},
    }
    return test_files + held, info


def _branch_results(scores_csv: Path) -> tuple[dict[str, int], dict[str, float | None]]:
    """Per branch: how many items, and the image AUROC of its items against the unchanged ones."""
    with open(scores_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    normal = [float(r["score"]) for r in rows if r["label"] == "0"]
    by_branch: dict[str, list[float]] = {}
    for r in rows:
        if r["label"] != "0":
            by_branch.setdefault(r["defect"].removeprefix("pseudo_"), []).append(float(r["score"]))
    counts = {b: len(v) for b, v in sorted(by_branch.items())}
    aurocs = {}
    for b, values in sorted(by_branch.items()):
        scores = torch.tensor(normal + values)
        labels = torch.tensor([0] * len(normal) + [1] * len(values))
        aurocs[b] = auroc(scores, labels) if normal and values else None
    return counts, aurocs


def _stages_with_pseudo_anomalies(model: Any) -> list[str]:
    """The names of the recipe stages for which ``model.pseudo_anomalies(stage)`` declares pseudo anomalies."""
    declares, recipe = getattr(model, "pseudo_anomalies", None), getattr(model, "recipe", None)
    if not callable(declares) or not callable(recipe):
        return []
    return [stage.name for stage in recipe().stages if declares(stage.name) is not None]


def evaluate_pseudo_anomalies(
    model: Any, files: Sequence[str | os.PathLike], *, config: PseudoAnomalyConfig | None = None, seed: int = 0,
    source: dict[str, Any] | None = None, out_dir: str | os.PathLike | None = None, **evaluate_options: Any,
) -> dict[str, Any]:
    """Evaluate ``model`` on pseudo anomalies made from the good image ``files`` (module docstring).

    Args:
        config: the generator's config; default: DRAEM-like defaults with no rotation
            (``rotation="none"``: the images are scored as they are).
        seed: the generator's seed (the same seed gives the same items).
        source: where the files came from (:func:`pseudo_eval_images`), stored in the result.
        out_dir, evaluate_options: passed to :func:`~.evaluate.evaluate` (``batch_size``, ``device``,
            ``fpr_limit``, ``heatmaps``, ...).

    Returns:
        :func:`~.evaluate.evaluate`'s result with ``"estimate"``, ``"note"`` and ``"pseudo_anomalies"``.
    """
    config = config if config is not None else PseudoAnomalyConfig(rotation="none")
    data = PseudoAnomalyDataset(ImageFolderDataset(list(files), input_size=model.input_size), config, seed=seed, mode="paired")
    source = dict(source or {})
    warnings = []
    if source.get("train_holdout") and not (source.get("holdout") or {}).get("recorded"):
        warnings.append(
            f"{source['train_holdout']} held-back training images are in the estimate: they are unseen only if the model "
            "was trained without them; no holdout record (holdout.json, written by msflow-fast train --holdout) is next "
            "to the checkpoint, so this cannot be checked: a model trained on them gives an optimistic estimate"
        )
    trained_on = _stages_with_pseudo_anomalies(model)
    if trained_on:
        warnings.append(
            f"{type(model).__name__} trained on pseudo anomalies from this generator (stages {', '.join(trained_on)}): the "
            "estimate measures anomalies like its training ones, not unseen defects, and is optimistic"
        )
    details = {
        "seed": seed, "config": config.to_dict(), "texture_entries": list(data.generator.sources),
        "good_images": len(files), "items": "each good image once unchanged (label 0) and once with a pseudo anomaly (label 1)",
        **source,
    }
    annotate = {"estimate": "pseudo_anomalies", "note": ESTIMATE_NOTE, "pseudo_anomalies": details, "warnings": warnings}
    result = evaluate(model, data, out_dir=out_dir, annotate=annotate, **evaluate_options)
    if out_dir is not None:
        counts, aurocs = _branch_results(Path(out_dir) / "scores.csv")
        details["branch_counts"], details["branch_image_auroc"] = counts, aurocs
        atomic_write_json(Path(out_dir) / "metrics.json", result)
    return result
