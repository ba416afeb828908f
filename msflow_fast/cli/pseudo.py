"""Pseudo anomalies on the command line: the ``pseudo-anomalies`` gallery command and ``eval --pseudo-anomalies``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .commands import _add_common, _device, _positive_int, _print_warnings

__all__ = [
    "add_gallery_arguments", "add_pseudo_eval_arguments", "add_train_holdout_argument", "apply_train_holdout", "check_pseudo_flags",
    "run_gallery", "run_pseudo_eval",
]


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (exclusive), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (exclusive), got {text!r}")
    return value


def _branches() -> tuple[str, ...]:
    from msflow_fast.engine.data.pseudo.config import BRANCHES

    return BRANCHES


# ---------------------------------------------------------------------------------------------- gallery


def add_gallery_arguments(p: argparse.ArgumentParser, model: str) -> None:
    _add_common(p, data=True, batch_default=None)
    p.add_argument("--out", required=True, help="gallery folder: samples/*_image.png, *_mask.png, *_overlay.png, index.csv, contact_sheet.png")
    p.add_argument("--count", type=_positive_int, default=16, help="samples to draw (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="generator seed: the same seed gives the same gallery (default: 0)")
    p.add_argument("--input-size", type=_positive_int, default=256, metavar="N", help="images are resized to N x N pixels (default: 256)")
    p.add_argument("--split", choices=["train", "test"], default="train", help="good images from train/good (default) or test/good")
    p.add_argument("--branch", choices=_branches(), default=None, help="draw only this branch (default: the mixture's weights)")
    p.add_argument("--mixture", action="store_true", help="draw from the full mixture, normal samples included (default: anomalies only)")


def _good_images(args: argparse.Namespace, split: str, input_size: int) -> Any:
    from msflow_fast.engine import MVTecDataset
    from msflow_fast.engine.data import ImageFolderDataset
    from msflow_fast.engine.pseudo_eval import good_folders

    if split == "train":
        return MVTecDataset(args.data, args.category, "train", input_size=input_size, layout=args.layout)
    return ImageFolderDataset(good_folders(args.data, args.category, layout=args.layout)[0], input_size=input_size)


def run_gallery(args: argparse.Namespace) -> int:
    import torch

    from msflow_fast.engine.data.pseudo_anomaly import PseudoAnomalyConfig
    from msflow_fast.engine.pseudo_gallery import write_gallery
    from msflow_fast.engine.run_folder import RunLock

    category = args.category or Path(args.data).name
    weights = {args.branch: 1.0} if args.branch else PseudoAnomalyConfig().branch_weights
    config = PseudoAnomalyConfig(category=category, branch_weights=weights)
    base = _good_images(args, args.split, args.input_size)
    out = Path(args.out)
    device = _device(args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # One image at a time is many small ops: intra-op threads only add overhead (on a busy
        # machine tens of times), so the CPU gallery runs on one thread.
        torch.set_num_threads(1)
    try:
        with RunLock(out, "pseudo-anomaly gallery"):
            rows = write_gallery(
                base, out, count=args.count, seed=args.seed, config=config, mixture=args.mixture,
                describe={"data": str(args.data), "category": category, "split": args.split, "input_size": args.input_size},
                device=device, num_workers=args.workers, progress=not args.no_progress,
            )
    finally:
        torch.set_num_threads(threads)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["branch"]] = counts.get(row["branch"], 0) + 1
    shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"wrote {len(rows)} samples ({shown}) to {out / 'samples'}; index {out / 'index.csv'}, contact sheet {out / 'contact_sheet.png'}")
    return 0


# ---------------------------------------------------------------------------------------------- train --holdout


def add_train_holdout_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--holdout", type=_fraction, default=None, metavar="FRACTION",
        help="hold back a fixed selection of this fraction of train/good (engine.pseudo_eval.holdout_split): training skips "
        "them and <out>/holdout.json lists them, so eval --pseudo-anomalies can use them as unseen good images",
    )


def _is_rank0() -> bool:
    """Whether this process writes the run folder's files: no process group, or its rank 0 (under
    ``torchrun`` every rank runs ``train``; only rank 0 writes or deletes ``holdout.json``)."""
    import torch

    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def _resumed_folder(args: argparse.Namespace, out: Path) -> Path:
    """The folder of the run being resumed: ``--checkpoint``'s (a ``last.pt`` or its folder), else ``--out``."""
    checkpoint = getattr(args, "checkpoint", None)
    if not checkpoint:
        return out
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def _same_record(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is b
    return (abs(a["fraction"] - b["fraction"]) <= 1e-12 and a["kept"] == b["kept"] and sorted(a["files"]) == sorted(b["files"]))


def apply_train_holdout(args: argparse.Namespace, train_set: Any, out: Path, *, resuming: bool) -> None:
    """``train --holdout``: drop the held-back files from ``train_set`` and record them in
    ``out/holdout.json`` (names relative to ``train/good``). A resumed run keeps the selection
    recorded next to the checkpoint it resumes (copied to ``out`` when that is another folder) and
    checks it against ``train_set``; a new run without ``--holdout`` removes a stale record. Only
    rank 0 writes or deletes the record.

    Raises:
        ValueError: ``--holdout`` on a resumed run that held nothing back or with another fraction;
            recorded files not in ``train/good`` or a changed number of images; ``out`` holding a
            different record than the resumed run's; a corrupt record.
    """
    from msflow_fast.engine.pseudo_eval import HOLDOUT_FILE, holdout_split, read_holdout, write_holdout

    target = out / HOLDOUT_FILE
    if not resuming:
        if args.holdout is None:
            if _is_rank0():
                target.unlink(missing_ok=True)  # the record of the earlier run this one overwrites
            return
        held_paths = holdout_split([s[0] for s in train_set.samples], args.holdout)[1]
        held_names = {p.name for p in held_paths}
        train_set.samples = [s for s in train_set.samples if Path(s[0]).name not in held_names]
        if _is_rank0():
            out.mkdir(parents=True, exist_ok=True)
            write_holdout(out, args.holdout, held_paths, len(train_set.samples))
            print(f"holding back {len(held_paths)} of {len(held_paths) + len(train_set.samples)} training images (listed in {target})")
        return

    source = _resumed_folder(args, out)
    recorded = read_holdout(source)
    elsewhere = source.resolve() != out.resolve()
    if elsewhere:
        existing = read_holdout(out)
        if existing is not None and not _same_record(existing, recorded):
            what = "records no holdout" if recorded is None else f"records its own ({recorded['path']})"
            raise ValueError(
                f"{target} records a different holdout than the run being resumed ({source}, which {what}); "
                f"choose another --out or remove {target}"
            )
    if recorded is None:
        if args.holdout is not None:
            raise ValueError(
                f"the run being resumed ({source}) trained on every train/good image; --holdout applies to a new run: "
                "resume without --holdout, or start a new run (another --out, or --overwrite)"
            )
        return
    if args.holdout is not None and abs(args.holdout - recorded["fraction"]) > 1e-12:
        raise ValueError(f"--holdout {args.holdout:g} differs from the {recorded['fraction']:g} of the run being resumed "
                         f"({recorded['path']}); resume with --holdout {recorded['fraction']:g} or without --holdout")
    held = set(recorded["files"])
    names = {Path(s[0]).name for s in train_set.samples}
    folder = Path(train_set.samples[0][0]).parent if train_set.samples else "train/good"
    missing = sorted(held - names)
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(held)} held-back images listed in {recorded['path']} are not in {folder} "
            f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): the run was trained on another dataset or "
            "category (check --data and --category), or they were removed (restore them)"
        )
    kept = [s for s in train_set.samples if Path(s[0]).name not in held]
    if len(kept) != recorded["kept"]:
        raise ValueError(
            f"{folder} holds {len(kept)} training images besides the held-back ones, but the run being resumed trained on "
            f"{recorded['kept']} ({recorded['path']}): images were added or removed since; restore the folder, or start a "
            "new run (another --out, or --overwrite)"
        )
    train_set.samples = kept
    if elsewhere and _is_rank0() and not target.is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_holdout(out, recorded["fraction"], sorted(held), len(kept))


# ---------------------------------------------------------------------------------------------- eval --pseudo-anomalies


def add_pseudo_eval_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("without defective samples (estimates)")
    group.add_argument(
        "--pseudo-anomalies", action="store_true",
        help="estimate image AUROC, pixel AUROC and AUPRO on pseudo anomalies drawn on good images the model did not "
        "train on: test/good (test/ok), plus --holdout; writes a labelled metrics.json to --out (default: "
        "<checkpoint folder>/pseudo_eval)",
    )
    group.add_argument(
        "--holdout", type=_fraction, default=None, metavar="FRACTION",
        help="with --pseudo-anomalies: also use a fixed selection of this fraction of train/good (engine.pseudo_eval.holdout_split). "
        "The files a train --holdout run held back (its holdout.json, next to the checkpoint) are used without this flag; "
        "without such a record the selection is only valid for a model trained without those files (a warning says so)",
    )
    group.add_argument("--pseudo-seed", type=int, default=0, help="with --pseudo-anomalies: the generator's seed (default: 0)")


def run_pseudo_eval(args: argparse.Namespace, model: Any, state: dict, device: Any) -> int:
    from msflow_fast.engine.data.pseudo_anomaly import PseudoAnomalyConfig
    from msflow_fast.engine.pseudo_eval import evaluate_pseudo_anomalies, pseudo_eval_images
    from msflow_fast.engine.run_folder import RunLock

    from msflow_fast.engine.pseudo_eval import read_holdout

    out = Path(args.out) if args.out else Path(state["path"]).parent / "pseudo_eval"
    recorded = read_holdout(Path(state["path"]).parent)  # the record next to the checkpoint
    files, source = pseudo_eval_images(args.data, args.category, layout=args.layout, holdout=args.holdout, recorded=recorded)
    config = PseudoAnomalyConfig(category=args.category or Path(args.data).name, rotation="none")
    with RunLock(out, "pseudo-anomaly evaluation"):
        metrics = evaluate_pseudo_anomalies(
            model, files, config=config, seed=args.pseudo_seed, source=source, out_dir=out, batch_size=args.batch_size,
            num_workers=args.workers, device=device, fpr_limit=args.fpr_limit, heatmaps=args.heatmaps, progress=not args.no_progress,
        )

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100.0 * v:.2f}"

    print(
        f"pseudo-anomaly estimate (not a test-set result): image AUROC {pct(metrics['image_auroc'])}  pixel AUROC "
        f"{pct(metrics['pixel_auroc'])}  AUPRO {pct(metrics['aupro'])}  (percent; {len(files)} good images, each "
        "unchanged and with one pseudo anomaly)"
    )
    by_branch = metrics["pseudo_anomalies"].get("branch_image_auroc", {})
    if by_branch:
        print("image AUROC by branch: " + "  ".join(f"{b} {pct(v)}" for b, v in by_branch.items()))
    _print_warnings(metrics["warnings"])
    print(f"wrote {out / 'metrics.json'}")
    return 0


def check_pseudo_flags(args: argparse.Namespace) -> None:
    """``--holdout`` and ``--pseudo-seed`` mean nothing without ``--pseudo-anomalies``."""
    if not args.pseudo_anomalies and (args.holdout is not None or args.pseudo_seed != 0):
        raise ValueError("--holdout and --pseudo-seed choose the pseudo-anomaly estimate; add --pseudo-anomalies")
