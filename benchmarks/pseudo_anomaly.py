"""Pseudo-anomaly generator throughput: images per second of :class:`PseudoAnomalyGenerator.batch`.

One provider (``msflow_fast``); the modes are the mixture (DRAEM-like defaults: half the samples
normal, then texture 0.4, CutPaste 0.2, scar 0.2, Poisson 0.2) and each branch alone (every sample
anomalous, only that branch). Every timed call draws new samples (the start index moves on), so a
mode's time is its average over draws, rejections and redraws included. Good images: the engine's
synthetic textures, in [0, 1], on the device; the Poisson branch blends from the next image of the
batch. CPU: batch 16 at 256 px; CUDA: the same on the GPU (the generator works image by image; its
random draws are made on the CPU). ``smoke``: batch 16 at 64 px.
"""

from __future__ import annotations

import itertools

import torch

from msflow_fast.engine import SyntheticDefects, denormalize
from msflow_fast.engine.data.pseudo_anomaly import BRANCHES, PseudoAnomalyConfig, PseudoAnomalyGenerator

from .harness import Job, Result, throughput_row, time_ms

MODES = ("mixture",) + BRANCHES


def _settings(device: torch.device, smoke: bool) -> dict:
    return {"batch": 16, "size": 64 if smoke else 256}


def _images(batch: int, size: int, device: torch.device) -> torch.Tensor:
    source = SyntheticDefects("train", batch, size, seed=0)
    return torch.stack([denormalize(source[i]["image"]) for i in range(batch)]).to(device)


def _generator(mode: str) -> tuple[PseudoAnomalyGenerator, str | None]:
    if mode == "mixture":
        return PseudoAnomalyGenerator(PseudoAnomalyConfig(), seed=0), None
    return PseudoAnomalyGenerator(PseudoAnomalyConfig(branch_weights={mode: 1.0}), seed=0), "anomaly"


def jobs(device: torch.device, *, min_run_time: float = 0.5, smoke: bool = False) -> list[Job]:
    """One job per mode (the mixture and each branch)."""
    cfg = _settings(device, smoke)
    shape = f"B{cfg['batch']} {cfg['size']}px"
    state: dict = {}

    def setup() -> torch.Tensor:
        if "images" not in state:
            state["images"] = _images(cfg["batch"], cfg["size"], device)
        return state["images"]

    return [
        Job(f"[pseudo_anomaly] {shape} {mode}", (0, j), lambda mode=mode: _run(mode, shape, setup(), device, min_run_time))
        for j, mode in enumerate(MODES)
    ]


def _run(mode: str, shape: str, images: torch.Tensor, device: torch.device, min_run_time: float) -> list[Result]:
    generator, force = _generator(mode)
    batch = images.shape[0]
    starts = itertools.count(0, batch)

    def step():
        return generator.batch(images, next(starts), force=force)

    timing = time_ms(step, device, min_run_time=min_run_time)
    return [throughput_row("pseudo_anomaly", "PseudoAnomalyGenerator", mode, "msflow_fast", shape, device, timing, batch)]


__all__ = ["MODES", "jobs"]
