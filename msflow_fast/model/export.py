"""Export of :meth:`MSFlow.predict`: ``torch.export`` programs and ONNX files.

Both trace :class:`PredictModule`, whose ``forward(images [B, 3, H, W])`` returns the tuple
``(anomaly_map [B, H, W], anomaly_map_mul [B, H, W], score [B])`` of :meth:`MSFlow.predict`
(``score`` is the one chosen by ``config.score``), all float32 for a float32 model.

- :func:`export_predict` -> :class:`torch.export.ExportedProgram`. With the default backend the
  program holds the ops of the backend in force when tracing (e.g. ``msflow_fast::*`` C++ ops when
  the extension is built: the program then needs ``msflow_fast`` imported to run); with
  ``backend="reference"`` it holds plain ATen ops only.
- :func:`export_onnx` writes an ``.onnx`` file, always through the reference backend (the fused
  ops have no ONNX symbolic). Needs the ``onnx`` and ``onnxscript`` packages
  (``pip install onnx onnxscript``).

The batch dimension is dynamic by default; the image height and width are fixed to those of the
example (the pooling grid, the upsampling and the top-k count depend on them). The traced graph
does not check the images for NaN/Inf (a data-dependent check); the example images are validated
once, eagerly, before tracing.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import ops
from .msflow import MSFlow


class PredictModule(nn.Module):
    """``images [B, 3, H, W] -> (anomaly_map [B, H, W], anomaly_map_mul [B, H, W], score [B])``.

    Args:
        model: the :class:`MSFlow` to wrap (shared, not copied).
        backend: an ``msflow_fast.ops`` backend forced while the module runs (``None`` = the one in
            force: argument, context, ``MSFLOW_FAST_BACKEND``, then auto).
    """

    def __init__(self, model: MSFlow, backend: str | None = None) -> None:
        super().__init__()
        if not isinstance(model, MSFlow):
            raise TypeError(f"model must be an MSFlow, got {type(model).__name__}")
        self.model = model
        self.backend = backend

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.backend is None:
            pred = self.model.predict(images)
        else:
            with ops.use_backend(self.backend):
                pred = self.model.predict(images)
        return pred.anomaly_map, pred.anomaly_map_mul, pred.score


def _prepare(model: MSFlow, example_images: torch.Tensor, backend: str | None) -> PredictModule:
    module = PredictModule(model, backend).eval()
    model.check_images(example_images)
    # An eager run validates the images and fills the positional-encoding cache with real tensors,
    # so tracing only reads it.
    module(example_images)
    return module


def _batch_shapes(example_images: torch.Tensor, dynamic_batch: bool) -> Any:
    if not dynamic_batch:
        return None
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def export_predict(
    model: MSFlow, example_images: torch.Tensor, *, backend: str | None = None, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model.predict`` (as :class:`PredictModule`).

    Args:
        model: a float32 :class:`MSFlow` (put in eval mode; the backbone always is).
        example_images: ``[B, 3, H, W]`` images at the size the program will take.
        backend: ``msflow_fast.ops`` backend traced into the program (``None`` = the one in force,
            ``"reference"`` = plain ATen ops, portable).
        dynamic_batch: export with a symbolic batch size (``B`` in ``[1, 4096]``).

    Returns:
        An :class:`~torch.export.ExportedProgram`; ``program.module()(images)`` returns
        ``(anomaly_map, anomaly_map_mul, score)``.

    Raises:
        TypeError, ValueError: bad ``model`` or ``example_images`` (as :meth:`MSFlow.check_images`).
    """
    model.eval()
    module = _prepare(model, example_images, backend)
    cache = dict(model.positional._cache)
    try:
        return torch.export.export(module, (example_images,), dynamic_shapes=_batch_shapes(example_images, dynamic_batch))
    finally:
        model.positional._cache.clear()
        model.positional._cache.update(cache)


def export_onnx(
    model: MSFlow,
    example_images: torch.Tensor,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    opset_version: int | None = None,
) -> str:
    """Write ``model.predict`` as an ONNX file (through the reference backend).

    Inputs: ``images`` ``[B, 3, H, W]`` float32. Outputs: ``anomaly_map``, ``anomaly_map_mul``
    ``[B, H, W]`` and ``score`` ``[B]``.

    Args:
        model: a float32 :class:`MSFlow`.
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
    program = export_predict(model, example_images, backend="reference", dynamic_batch=dynamic_batch)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx_program = torch.onnx.export(
        program,
        (example_images,),
        input_names=["images"],
        output_names=["anomaly_map", "anomaly_map_mul", "score"],
        opset_version=opset_version,
        dynamo=True,
        external_data=False,
    )
    onnx_program.save(path)
    return path


__all__ = ["PredictModule", "export_onnx", "export_predict"]
