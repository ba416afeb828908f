"""The subcommands: ``train``, ``eval``, ``predict``, ``demo``, ``models`` and ``pseudo-anomalies`` (:mod:`.pseudo`)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .config_flags import add_config_arguments, config_from_args, config_overrides

__all__ = ["COMMANDS", "DEFAULT_MODEL", "model_name_from_argv"]

DEFAULT_MODEL = "msflow"
_MODEL_COMMANDS = ("train", "demo")


def model_name_from_argv(argv: list[str]) -> str:
    """The ``--model`` of a ``train`` / ``demo`` command line (before parsing: it decides the flags).

    Raises:
        ValueError: an unknown model name (the message lists close and registered names).
    """
    from msflow_fast.models import registry

    name = DEFAULT_MODEL
    if not argv or argv[0] not in _MODEL_COMMANDS:
        return name
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--model="):
            name = arg.split("=", 1)[1]
    registry.get(name)
    return name


def _model_class(name: str) -> type:
    from msflow_fast.models import registry

    return registry.get(name)


# ---------------------------------------------------------------------------------------------- shared


def _device(name: str | None):
    """``--device``: ``auto`` (cuda if available, else cpu) or a torch device that exists here."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:1, ... or auto") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: no CUDA GPU is usable here (torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def _model_from_checkpoint(path: str | Path, device) -> tuple[Any, dict]:
    """Rebuild the model a checkpoint holds (``train``'s ``last.pt``, its folder or a saved model), on ``device``.

    Stored backbone weights are used as they are; a pretrained backbone (not stored) comes from
    timm's pretrained weights (network access or the timm cache).
    """
    from msflow_fast.models import checkpoint

    state = checkpoint.read(path)
    model = checkpoint.load_model(state)
    return model.to(device), state


def _print_metrics(metrics: dict[str, Any], stream=None) -> None:
    stream = stream or sys.stdout

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100.0 * v:.2f}"

    print(
        f"image AUROC {pct(metrics['image_auroc'])}  pixel AUROC {pct(metrics['pixel_auroc'])}  "
        f"AUPRO {pct(metrics['aupro'])}  (percent; {metrics['num_images']} test images, "
        f"{metrics['images_per_second']:.1f} images/s)",
        file=stream,
    )
    if metrics.get("spro") is not None:  # MVTec LOCO AD: sPRO and image AUROC per defect kind
        by_kind = metrics["image_auroc_by_kind"]
        print(f"image AUROC logical {pct(by_kind['logical'])}  structural {pct(by_kind['structural'])}", file=stream)
        for limit, values in metrics["spro"].items():
            print(
                f"sPRO (FPR limit {limit}) all {pct(values['all'])}  logical {pct(values['logical'])}  "
                f"structural {pct(values['structural'])}  ({metrics['spro_regions']['all']} defect regions)",
                file=stream,
            )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def _finite_number(text: str, *, minimum: float, inclusive: bool) -> float:
    expected = f"a finite number {'>=' if inclusive else '>'} {minimum:g}"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not (value >= minimum if inclusive else value > minimum) or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    return _finite_number(text, minimum=0.0, inclusive=False)


def _non_negative_float(text: str) -> float:
    return _finite_number(text, minimum=0.0, inclusive=True)


def _grad_clip(text: str) -> float | bool:
    if text.lower() in ("none", "off", "no"):
        return False
    try:
        return _positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive max norm, or 'none' for no clipping, got {text!r}") from None


def _add_common(p: argparse.ArgumentParser, *, data: bool, batch_default: int | None = 8) -> None:
    if data:
        p.add_argument("--data", required=True, help="dataset root in the MVTec AD layout (MVTec AD, VisA 1cls, ...), the BTAD layout (BTech_Dataset_transformed) or the MVTec LOCO AD layout")
        p.add_argument("--category", default=None, help="class folder under --data (e.g. bottle, or BTAD's 01); omit if --data is the class folder")
        p.add_argument(
            "--layout", choices=["auto", "mvtec", "btad", "loco"], default="auto",
            help="folder layout: mvtec (train/good, test/<defect>), btad (train/ok, test/ok, test/ko), loco (MVTec LOCO AD: "
            "test/logical_anomalies, test/structural_anomalies, a mask folder per image, defects_config.json; adds sPRO) or auto "
            "(the default: loco when defects_config.json or a *_anomalies folder is there, else from the good/ or ok/ folders)",
        )
    if batch_default is not None:
        p.add_argument("--batch-size", type=_positive_int, default=batch_default, help=f"images per batch (default: {batch_default})")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_model_choice(p: argparse.ArgumentParser, model: str) -> Any:
    from msflow_fast.models import registry

    p.add_argument(
        "--model", default=DEFAULT_MODEL, metavar="NAME",
        help=f"registered model (one of {', '.join(registry.available())}; default: {DEFAULT_MODEL}); "
        "its config fields are the flags below (msflow-fast <command> --model NAME --help)",
    )
    return _model_class(model)


def _add_preset(p: argparse.ArgumentParser, cls: type) -> None:
    if cls.presets:
        p.add_argument(
            "--preset", choices=sorted(cls.presets), default=None,
            help=f"a published {cls.name} setting (config flags given as well override it): "
            + "; ".join(f"{name}: " + ", ".join(f"{k}={_show_value(v)}" for k, v in fields.items()) for name, fields in cls.presets.items()),
        )


def _show_value(value: Any) -> str:
    return "x".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def _model_config(args: argparse.Namespace, cls: type, defaults: dict[str, Any] | None = None) -> Any:
    """The config of ``cls``: ``defaults``, then the ``--preset``, then the config flags given."""
    base = dict(defaults or {})
    preset = getattr(args, "preset", None)
    if preset is not None:
        base.update(cls.presets[preset])
    return config_from_args(args, cls.config_class, **base)


def _add_recipe_flags(p: argparse.ArgumentParser, cls: type, defaults: dict[str, Any] | None = None) -> None:
    """Training flags; unset ones keep the model's recipe (first stage shown)."""
    stage = cls.recipe_for(cls.config_class()).stages[0]
    defaults = defaults or {}
    group = p.add_argument_group(f"training (unset flags keep the {cls.name} recipe{' of each stage' if len(cls.recipe_for(cls.config_class()).stages) > 1 else ''})")

    def shown(name: str, value: Any) -> str:
        return str(defaults.get(name, value))

    group.add_argument("--epochs", type=_positive_int, default=defaults.get("epochs"), help=f"epochs (default: {shown('epochs', stage.epochs)})")
    group.add_argument("--lr", type=_positive_float, default=defaults.get("lr"), help=f"learning rate (default: {shown('lr', stage.lr)}, {stage.optimizer})")
    group.add_argument("--batch-size", type=_positive_int, default=defaults.get("batch_size"), help=f"images per step, per process under torchrun (default: {shown('batch_size', stage.batch_size)})")
    group.add_argument("--weight-decay", type=_non_negative_float, default=None, help=f"optimizer weight decay (default: {stage.weight_decay})")
    group.add_argument("--grad-clip", type=_grad_clip, default=None, metavar="NORM", help=f"max gradient norm, or 'none' (default: {stage.grad_clip or 'none'})")
    group.add_argument(
        "--feature-cache", choices=["auto", "memory", "disk", "off"], default="auto",
        help="compute the frozen backbone's features once and train later epochs on them: in memory, else on disk in --out "
        "(auto, the default), or as given; 'off' runs the backbone every epoch. The same training either way",
    )
    group.add_argument(
        "--feature-cache-dtype", choices=["bfloat16"], default=None,
        help="store cached features in bf16 (half the memory; rounds the flows' inputs). Default: their own dtype",
    )


def _fit_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
            "feature_cache": args.feature_cache, "feature_cache_dtype": args.feature_cache_dtype}


def _cache_summary(result: Any) -> str:
    """`` (features cached in memory, 12.0 MiB)`` from a FitResult, or ``""`` when nothing was cached."""
    used = [r for r in result.feature_cache.values() if r.storage != "off"]
    if not used:
        return ""
    report = used[-1]
    return f" (features {'reused from' if report.reused else 'cached'} {report.reason.split(' (')[0]}, {report.bytes / 2**20:.1f} MiB)"


# ---------------------------------------------------------------------------------------------- train


def _add_train(p: argparse.ArgumentParser, model: str) -> None:
    cls = _add_model_choice(p, model)
    _add_common(p, data=True, batch_default=None)
    p.add_argument("--out", default=None, help="output folder for last.pt, metrics.json, scores.csv (default: runs/<category>)")
    _add_recipe_flags(p, cls)
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast mixed precision (default: off)")
    p.add_argument("--seed", type=int, default=9826, help="seed for weights and shuffling (default: 9826)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt after its last finished epoch")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds an earlier run (its files are removed)")
    p.add_argument("--checkpoint", default=None, help="resume from this checkpoint instead of <out>/last.pt")
    p.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation after training")
    from .pseudo import add_train_holdout_argument

    add_train_holdout_argument(p)
    p.add_argument("--heatmaps", action="store_true", help="write heat-map overlays of the test images")
    _add_preset(p, cls)
    add_config_arguments(p, cls.config_class)


def _train_and_eval(args: argparse.Namespace, model: Any, out: Path, *, heatmaps: bool, resume: Any = None) -> dict[str, Any] | None:
    """Train (then evaluate). ``resume``: the checkpoint dict the model was built from, handed to
    ``fit`` so the file is read once."""
    import torch

    from msflow_fast.engine import MVTecDataset, evaluate, fit

    device = _device(args.device)
    input_size = model.input_size
    train_set = MVTecDataset(args.data, args.category, "train", input_size=input_size, layout=args.layout)
    test_set = None
    if not args.no_eval:
        test_set = MVTecDataset(args.data, args.category, "test", input_size=input_size, layout=args.layout)
    from .pseudo import apply_train_holdout

    apply_train_holdout(args, train_set, out, resuming=resume is not None)
    # Before epoch 1: every image and mask opens, masks fit their images (not hours later, at evaluation).
    train_set.check_files()
    if test_set is not None:
        test_set.check_files()
    args.checkpoint_written = out / "last.pt"
    result = fit(
        model, train_set, **_fit_options(args), num_workers=args.workers, out_dir=out, resume=resume or False,
        overwrite=getattr(args, "overwrite", False), amp=args.amp, device=device, seed=args.seed, progress=not args.no_progress,
    )
    _print_warnings(result.warnings)
    rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0
    if rank0:
        if result.start_epoch >= result.epochs:
            print(f"nothing to train: {out / 'last.pt'} has finished all {result.epochs} epochs; evaluating it")
        else:
            print(f"trained epochs {result.start_epoch + 1}-{result.epochs} in {result.seconds:.1f} s{_cache_summary(result)}; checkpoint {out / 'last.pt'}")
    if test_set is None or not rank0:
        return None
    batch = args.batch_size or model.recipe().stages[-1].batch_size
    metrics = evaluate(model, test_set, batch_size=batch, num_workers=args.workers, device=device, out_dir=out, heatmaps=heatmaps, progress=not args.no_progress)
    _print_metrics(metrics)
    _print_warnings(metrics["warnings"])
    return metrics


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def _init_distributed(args: argparse.Namespace) -> bool:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on GPU, gloo on CPU."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    device = _device(args.device)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _run_train(args: argparse.Namespace) -> int:
    import torch

    joined = _init_distributed(args)
    try:
        return _train(args)
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _train(args: argparse.Namespace) -> int:
    from msflow_fast.engine.run_folder import RunLock

    out = Path(args.out) if args.out else Path("runs") / (args.category or Path(args.data).name)
    config = _model_config(args, _model_class(args.model))
    _device(args.device)  # a bad --device or config fails before anything is built or written
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return _train_locked(args, out, config)
    with RunLock(out):  # one training per folder; fit takes it again (re-entrant)
        return _train_locked(args, out, config)


def _train_locked(args: argparse.Namespace, out: Path, config: Any) -> int:
    from msflow_fast.engine import CHECKPOINT_NAME, seed_everything
    from msflow_fast.engine.run_folder import previous_run

    cls = _model_class(args.model)
    resuming = bool(args.resume or args.checkpoint)
    earlier = previous_run(out)
    if earlier and not resuming and not args.overwrite:
        raise ValueError(
            f"{out} already holds a run ({', '.join(earlier)}); continue it with --resume, start over with "
            "--overwrite, or choose another --out"
        )
    seed_everything(args.seed)
    state = None
    if args.resume or args.checkpoint:
        ckpt = Path(args.checkpoint) if args.checkpoint else out / CHECKPOINT_NAME
        if ckpt.exists():
            model, state = _model_from_checkpoint(ckpt, "cpu")
            if state["model"] != cls.name:
                raise ValueError(f"{ckpt} holds a {state['model']!r} model; resume it with --model {state['model']}")
            if config_overrides(args, cls.config_class) or getattr(args, "preset", None):
                print("note: config flags and --preset are ignored when resuming; the checkpoint's config is used", file=sys.stderr)
        elif args.checkpoint:
            raise FileNotFoundError(f"checkpoint not found: {ckpt}")
        else:
            print(f"note: --resume found no {ckpt}; starting a new run", file=sys.stderr)
            model = cls(config)
    else:
        model = cls(config)
    # The checkpoint dict goes to fit as it is: last.pt is read once per resume.
    _train_and_eval(args, model, out, heatmaps=args.heatmaps, resume=state)
    return 0


# ---------------------------------------------------------------------------------------------- eval / predict

_CHECKPOINT_HELP = (
    "last.pt written by train (or its folder) or a saved model; a pretrained timm backbone is not stored "
    "and is rebuilt from timm (network or its cache)"
)


def _add_eval(p: argparse.ArgumentParser, model: str) -> None:
    _add_common(p, data=True)
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    p.add_argument("--out", default=None, help="folder for metrics.json, scores.csv, heatmaps/ (default: the checkpoint's folder)")
    p.add_argument("--heatmaps", action="store_true", help="write heat-map overlays of the test images")
    p.add_argument("--fpr-limit", type=_positive_float, default=0.3, help="AUPRO integration limit (default: 0.3)")
    p.add_argument(
        "--spro-fpr-limits", type=_positive_float, nargs="+", default=[0.05, 0.3], metavar="LIMIT",
        help="sPRO integration limits, for MVTec LOCO AD (default: 0.05, the benchmark's, and 0.3)",
    )
    from .pseudo import add_pseudo_eval_arguments

    add_pseudo_eval_arguments(p)


def _run_eval(args: argparse.Namespace) -> int:
    from msflow_fast.engine import MVTecDataset, evaluate
    from msflow_fast.engine.run_folder import RunLock

    from .pseudo import check_pseudo_flags, run_pseudo_eval

    check_pseudo_flags(args)
    device = _device(args.device)
    model, state = _model_from_checkpoint(args.checkpoint, device)
    if args.pseudo_anomalies:
        return run_pseudo_eval(args, model, state, device)
    out = Path(args.out) if args.out else Path(state["path"]).parent
    test_set = MVTecDataset(args.data, args.category, "test", input_size=model.input_size, layout=args.layout)
    test_set.check_files()
    with RunLock(out, "evaluation"):
        metrics = evaluate(model, test_set, batch_size=args.batch_size, num_workers=args.workers, device=device, fpr_limit=args.fpr_limit, out_dir=out, heatmaps=args.heatmaps, progress=not args.no_progress,
                           spro_fpr_limits=tuple(args.spro_fpr_limits))
    _print_metrics(metrics)
    _print_warnings(metrics["warnings"])
    print(f"wrote {out / 'metrics.json'}")
    return 0


def _add_predict(p: argparse.ArgumentParser, model: str) -> None:
    _add_common(p, data=False)
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    p.add_argument("--input", required=True, nargs="+", help="image files or one folder of images")
    p.add_argument("--out", required=True, help="folder for heatmaps/*.png and scores.csv")
    p.add_argument("--vmin", type=float, default=None, help="bottom of the heat-map colour range (default: the smallest map value)")
    p.add_argument("--vmax", type=float, default=None, help="top of the heat-map colour range (default: the largest map value)")
    p.add_argument("--skip-unreadable", action="store_true", help="score the readable images and list the others (default: stop, naming them)")


def _run_predict(args: argparse.Namespace) -> int:
    import torch

    from msflow_fast.engine import predict_folder
    from msflow_fast.engine.evaluate import score_warnings
    from msflow_fast.engine.run_folder import RunLock

    device = _device(args.device)
    model, _ = _model_from_checkpoint(args.checkpoint, device)
    source: Any = args.input[0] if len(args.input) == 1 else args.input
    with RunLock(args.out, "prediction"):
        results = predict_folder(
            model, source, args.out, batch_size=args.batch_size, num_workers=args.workers, device=device, vmin=args.vmin, vmax=args.vmax,
            skip_unreadable=args.skip_unreadable, progress=not args.no_progress,
        )
    scored = [r for r in results if r["error"] is None]
    for r in scored:
        print(f"{r['score']:.6g}\t{r['path']}")
    for r in results:
        if r["error"] is not None:
            print(f"skipped: {r['error']}", file=sys.stderr)
    _print_warnings(score_warnings(torch.tensor([r["score"] for r in scored])) if len(scored) > 1 else [])
    print(f"wrote {len(scored)} heat maps to {Path(args.out) / 'heatmaps'} and {Path(args.out) / 'scores.csv'}")
    return 1 if len(scored) < len(results) else 0


# ---------------------------------------------------------------------------------------------- demo


def _add_demo(p: argparse.ArgumentParser, model: str) -> None:
    cls = _add_model_choice(p, model)
    p.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    p.add_argument("--num-train", type=_positive_int, default=48, help="synthetic normal training images (default: 48)")
    p.add_argument("--num-test", type=_positive_int, default=32, help="synthetic test images, half with defects (default: 32)")
    _add_recipe_flags(p, cls, dict(cls.demo_training))
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the weights (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_preset(p, cls)
    add_config_arguments(p, cls.config_class, dict(cls.demo_config))


def _run_demo(args: argparse.Namespace) -> int:
    from msflow_fast.engine import MVTecDataset, evaluate, fit, seed_everything, write_synthetic_dataset

    started = time.perf_counter()
    cls = _model_class(args.model)
    config = _model_config(args, cls, dict(cls.demo_config))
    device = _device(args.device)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="msflow_demo_"))
    height, width = config.input_size
    data_root = write_synthetic_dataset(out / "data", "synthetic", num_train=args.num_train, num_test=args.num_test, input_size=height, seed=args.seed)
    print(f"synthetic dataset: {data_root} ({args.num_train} train, {args.num_test} test images, {height}x{width} px)")
    seed_everything(args.seed)
    model = cls(config)
    train_set = MVTecDataset(data_root, None, "train", input_size=config.input_size)
    test_set = MVTecDataset(data_root, None, "test", input_size=config.input_size)
    run = out / "run"
    args.checkpoint_written = run / "last.pt"
    result = fit(model, train_set, **_fit_options(args), out_dir=run, overwrite=True, device=device, seed=args.seed, progress=not args.no_progress)
    _print_warnings(result.warnings)
    print(f"trained {result.epochs} epochs of {cls.name} in {result.seconds:.1f} s (final loss {result.losses[-1]:.6g}){_cache_summary(result)}")
    batch = args.batch_size or model.recipe().stages[-1].batch_size
    metrics = evaluate(model, test_set, batch_size=batch, device=device, out_dir=run, heatmaps=True, progress=not args.no_progress)
    _print_metrics(metrics)
    _print_warnings(metrics["warnings"])
    print(f"heat maps: {run / 'heatmaps'}  metrics: {run / 'metrics.json'}  checkpoint: {run / 'last.pt'}")
    print(f"demo finished in {time.perf_counter() - started:.1f} s")
    return 0


# ---------------------------------------------------------------------------------------------- models


def _add_models(p: argparse.ArgumentParser, model: str) -> None:
    p.add_argument("--verbose", action="store_true", help="also print each model's class and recipe")
    p.add_argument(
        "--flops", action="store_true",
        help="instead of the list, measure each model: parameters and GFLOPs per image (whole model, frozen backbone, "
        "flows + head, training step) of its default config with random weights (no download), on the CPU",
    )
    p.add_argument(
        "--input-size", type=_positive_int, default=None, metavar="N",
        help="with --flops: measure at N x N pixels (default: each model's config input size)",
    )
    p.add_argument(
        "--model", nargs="+", default=None, metavar="NAME",
        help="with --flops: the registered models to measure (default: all of them)",
    )


_FLOPS_NOTE = """\
GFLOPs: 1e9 FLOPs per image; FLOPs = 2 x the multiply-adds of convolutions and matrix products, as
torch.utils.flop_counter counts them (elementwise, norm and gather ops count 0); random weights, float32,
fast paths off. backbone: the frozen part (frozen_features); flows+head: the rest of predict;
train step: forward + backward of the loss on cached backbone features."""


def _measured_model(cls: type, input_size: int | None) -> Any:
    """``cls`` with its default config, random weights (``pretrained=False`` where the config has it)
    and ``input_size`` (where given and the config has the field), on the CPU in float32."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    overrides: dict[str, Any] = {}
    if "pretrained" in fields:
        overrides["pretrained"] = False
    if input_size is not None and "input_size" in fields:
        overrides["input_size"] = input_size
    return cls(cls.make_config(None, **overrides))


def _run_flops(args: argparse.Namespace) -> int:
    from msflow_fast.models import complexity, registry

    names = list(dict.fromkeys(args.model or registry.available()))
    classes = [registry.get(name) for name in names]  # an unknown name fails before anything is built
    width = max(len("model"), *(len(name) for name in names))

    def giga(flops: float | None) -> str:
        return "-" if flops is None else f"{flops / 1e9:.2f}"

    for row, (name, cls) in enumerate(zip(names, classes)):
        try:
            model = _measured_model(cls, args.input_size)
            report = complexity.measure(model, args.input_size)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{name}: {err}") from None
        if row == 0:  # after the first model: a bad size is then one error line, no table
            print(f"{'':<{width}}  {'':>9}  {'parameters (M)':^18}  {'GFLOPs per image':^42}".rstrip())
            print(
                f"{'model':<{width}}  {'input':>9}  {'total':>7}  {'trainable':>9}  {'model':>8}  {'backbone':>8}  "
                f"{'flows+head':>10}  {'train step':>10}"
            )
        height, width_px = report.input_size
        print(
            f"{name:<{width}}  {f'{height}x{width_px}':>9}  {report.parameters / 1e6:>7.2f}  "
            f"{report.trainable_parameters / 1e6:>9.2f}  {giga(report.predict_flops):>8}  {giga(report.frozen_flops):>8}  "
            f"{giga(report.rest_flops):>10}  {giga(report.train_step_flops):>10}",
            flush=True,
        )
        del model
    print(_FLOPS_NOTE)
    return 0


def _run_models(args: argparse.Namespace) -> int:
    from msflow_fast.models import registry

    if args.flops:
        return _run_flops(args)
    if args.input_size is not None or args.model is not None:
        raise ValueError("--input-size and --model choose what --flops measures; add --flops (msflow-fast models --flops --model NAME)")
    rows = registry.describe()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        tag = " [interpretation of a paper without public code]" if r["interpretation"] else ""
        print(f"{r['name']:<{width}}  {r['summary']}{tag}")
        if args.verbose:
            cls = registry.get(r["name"])
            stages = cls.recipe_for(cls.config_class()).stages
            recipe = "; ".join(
                f"{s.name}: {s.optimizer} lr {s.lr:g}, {s.epochs} epochs, batch {s.batch_size}, clip {s.grad_clip or 'none'}" for s in stages
            )
            print(f"{'':<{width}}  {r['class']}  ({recipe})")
    return 0


# ---------------------------------------------------------------------------------------------- pseudo-anomalies


def _add_pseudo_anomalies(p: argparse.ArgumentParser, model: str) -> None:
    from .pseudo import add_gallery_arguments

    add_gallery_arguments(p, model)


def _run_pseudo_anomalies(args: argparse.Namespace) -> int:
    from .pseudo import run_gallery

    return run_gallery(args)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser, str], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("train on the train/good images of a class, then evaluate its test split", _add_train, _run_train),
    "eval": ("evaluate a checkpoint on a test split: image AUROC, pixel AUROC, AUPRO (and sPRO on MVTec LOCO AD)", _add_eval, _run_eval),
    "predict": ("score images and write heat-map overlays (PNG) and scores.csv", _add_predict, _run_predict),
    "demo": ("generate a synthetic defect dataset, train a small model on CPU, evaluate, write heat maps", _add_demo, _run_demo),
    "models": ("list the registered models, one line each (--flops: their parameters and FLOPs)", _add_models, _run_models),
    "pseudo-anomalies": (
        "draw pseudo anomalies on a class's good images and write a gallery: image/mask/overlay PNGs, index.csv",
        _add_pseudo_anomalies, _run_pseudo_anomalies,
    ),
}
