"""Export of any registered model's ``predict``: ``torch.export`` programs and ONNX files.

Both trace :class:`PredictModule`, whose ``forward(images [B, 3, H, W])`` returns the flat tuple
``(anomaly_map [B, H, W], score [B], *maps)`` of the model's
:class:`~msflow_fast.models.base.Prediction`, the named maps in the order of
:func:`output_names` (those with the batch as first dimension, sorted by name). For MSFlow:
``anomaly_map, score, anomaly_map_mul, log_likelihood_0, ..., score_log_space, score_official``.

- :func:`export_predict` -> :class:`torch.export.ExportedProgram`. With the default backend the
  program holds the ops of the backend in force when tracing (e.g. ``msflow_fast::*`` C++ ops when
  the extension is built: the program then needs ``msflow_fast`` imported to run); with
  ``backend="reference"`` it holds plain ATen ops only.
- :func:`export_onnx` writes an ``.onnx`` file, always through the reference backend (the fused
  ops have no ONNX translation). Needs the ``onnx`` and ``onnxscript`` packages.

The batch dimension is dynamic by default; the image height and width are fixed to those of the
example. The traced graph does not check the images for NaN/Inf (a data-dependent check); the
example images are validated once, eagerly, before tracing.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import ops
from .base import AnomalyModel, Prediction
from .positional import PositionalEncoding2d


def output_names(prediction: Prediction, batch: int) -> list[str]:
    """``["anomaly_map", "score", *named maps]`` of a prediction: the maps whose first dimension is the batch, sorted."""
    extra = sorted(k for k, v in prediction.maps.items() if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch)
    return ["anomaly_map", "score", *extra]


class PredictModule(nn.Module):
    """``images [B, 3, H, W] -> (anomaly_map, score, *maps)`` of ``model.predict`` (see the module docstring).

    Args:
        model: the :class:`~msflow_fast.models.base.AnomalyModel` to wrap (shared, not copied).
        names: the outputs, as :func:`output_names` gives them.
        backend: an ``msflow_fast.ops`` backend forced while the module runs (``None`` = the one in force).
    """

    def __init__(self, model: AnomalyModel, names: list[str], backend: str | None = None) -> None:
        super().__init__()
        if not isinstance(model, AnomalyModel):
            raise TypeError(f"model must be an AnomalyModel, got {type(model).__name__}")
        self.model = model
        self.names = list(names)
        self.backend = backend

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.backend is None:
            pred = self.model.predict(images)
        else:
            with ops.use_backend(self.backend):
                pred = self.model.predict(images)
        return tuple(pred.get(name) for name in self.names)


def _prepare(model: AnomalyModel, example_images: torch.Tensor, backend: str | None) -> PredictModule:
    if not isinstance(model, AnomalyModel):
        raise TypeError(f"model must be an AnomalyModel, got {type(model).__name__}")
    model.eval()
    model.check_images(example_images)
    # An eager run gives the output names and fills the positional-encoding caches with real
    # tensors, so tracing only reads them.
    if backend is None:
        pred = model.predict(example_images)
    else:
        with ops.use_backend(backend):
            pred = model.predict(example_images)
    return PredictModule(model, output_names(pred, example_images.shape[0]), backend).eval()


def _batch_shapes(dynamic_batch: bool) -> Any:
    if not dynamic_batch:
        return None
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def export_predict(
    model: AnomalyModel, example_images: torch.Tensor, *, backend: str | None = None, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model.predict`` (as :class:`PredictModule`).

    Args:
        model: a float32 registered model (put in eval mode).
        example_images: ``[B, 3, H, W]`` images at the size the program will take.
        backend: ``msflow_fast.ops`` backend traced into the program (``None`` = the one in force,
            ``"reference"`` = plain ATen ops, portable).
        dynamic_batch: export with a symbolic batch size (``B`` in ``[1, 4096]``).

    Returns:
        An :class:`~torch.export.ExportedProgram`; ``program.module()(images)`` returns the
        outputs named by :func:`output_names`.

    Raises:
        TypeError, ValueError: bad ``model`` or ``example_images`` (as ``model.check_images``).
    """
    return _export(model, example_images, backend, dynamic_batch)[0]


def _export(
    model: AnomalyModel, example_images: torch.Tensor, backend: str | None, dynamic_batch: bool
) -> tuple[torch.export.ExportedProgram, list[str]]:
    module = _prepare(model, example_images, backend)
    encodings = [m for m in model.modules() if isinstance(m, PositionalEncoding2d)]
    caches = [dict(m._cache) for m in encodings]
    try:
        return torch.export.export(module, (example_images,), dynamic_shapes=_batch_shapes(dynamic_batch)), module.names
    finally:
        for m, cache in zip(encodings, caches):
            m._cache.clear()
            m._cache.update(cache)


def export_onnx(
    model: AnomalyModel,
    example_images: torch.Tensor,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    opset_version: int | None = None,
) -> str:
    """Write ``model.predict`` as an ONNX file (through the reference backend).

    Inputs: ``images`` ``[B, 3, H, W]`` float32. Outputs: as :func:`output_names`.

    Args:
        model: a float32 registered model.
        example_images: ``[B, 3, H, W]`` images at the size the file will take.
        path: the ``.onnx`` file to write (weights embedded).
        dynamic_batch: a symbolic batch dimension.
        opset_version: ONNX opset (``None`` = the exporter's default).

    Returns:
        ``path`` as a string.

    Raises:
        ImportError: ``onnx`` or ``onnxscript`` is not installed (the message names it).
    """
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError as exc:
            raise ImportError(f"export_onnx needs the {package!r} package: pip install onnx onnxscript") from exc
    program, names = _export(model, example_images, "reference", dynamic_batch)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx_program = torch.onnx.export(
        program,
        (example_images,),
        input_names=["images"],
        output_names=names,
        opset_version=opset_version,
        dynamo=True,
        external_data=False,
    )
    onnx_program.save(path)
    return path


__all__ = ["PredictModule", "export_onnx", "export_predict", "output_names"]
