"""``mlff`` (an interpretation of Tang et al. 2025): its two training steps and inference.

One provider (``msflow_fast``, :class:`msflow_fast.models.mlff.MLFF`); the op names the fusion,
``fpn`` (the default) or ``concat`` (DeSTSeg's plain concatenation, the ablation baseline), so the
FPN path's cost shows beside it. Modes:

- ``student step``: the student stage's loss (teacher on the clean images, student on the
  corrupted ones, cosine feature loss), backward, Adam step;
- ``segmentation step``: the segmentation stage's loss (teacher and frozen student on the corrupted
  images, fusion, head, focal + L1 consistency and BCE + margin score), backward, Adam step;
- ``predict``: ``model.predict`` (map at the input size and top-k score).

The batch is a pseudo-anomaly batch drawn once (:class:`PseudoAnomalyGenerator`, the mixture) on the
engine's synthetic textures; drawing it is not timed here (``--suite pseudo_anomaly`` times the
generator). Random weights (speed does not depend on them), float32. CPU: 256 px, batch 8, default
widths; CUDA: 256 px, batch 32 (DeSTSeg's batch). ``smoke``: 64 px, batch 2, narrow head.
"""

from __future__ import annotations

import torch

from msflow_fast.engine import SyntheticDefects, denormalize, normalize
from msflow_fast.engine.data.pseudo_anomaly import PseudoAnomalyGenerator

from .harness import Job, Result, throughput_row, time_ms

FUSIONS = ("fpn", "concat")
MODES = ("student step", "segmentation step", "predict")


def _settings(device: torch.device, smoke: bool) -> dict:
    if smoke:
        return {"size": 64, "batch": 2, "config": {"fpn_channels": 8, "seg_channels": 16, "aspp_rates": (2, 4), "top_k": 10}}
    return {"size": 256, "batch": 32 if device.type == "cuda" else 8, "config": {}}


def _batch(size: int, batch: int, device: torch.device) -> dict:
    goods = SyntheticDefects("train", batch, size, seed=0)
    clean = torch.stack([denormalize(goods[i]["image"]) for i in range(batch)])
    drawn = PseudoAnomalyGenerator(seed=0).batch(clean)
    return {"image": normalize(drawn.images).to(device), "clean_image": normalize(clean).to(device), "mask": drawn.masks.to(device),
            "label": drawn.labels.to(device)}


def jobs(device: torch.device, *, min_run_time: float = 0.5, smoke: bool = False) -> list[Job]:
    """One job per fusion: the three modes."""
    cfg = _settings(device, smoke)
    shape = f"B{cfg['batch']} {cfg['size']}px"
    state: dict = {}

    def setup() -> dict:
        if not state:
            state["batch"] = _batch(cfg["size"], cfg["batch"], device)
        return state["batch"]

    return [
        Job(f"[mlff] {shape} {fusion}", (0, j), lambda fusion=fusion: _run(fusion, cfg, shape, setup(), device, min_run_time))
        for j, fusion in enumerate(FUSIONS)
    ]


def _run(fusion: str, cfg: dict, shape: str, batch: dict, device: torch.device, min_run_time: float) -> list[Result]:
    from msflow_fast.models.mlff import MLFF

    torch.manual_seed(0)
    model = MLFF(input_size=cfg["size"], pretrained=False, fusion=fusion, **cfg["config"]).to(device)
    rows = []
    images = batch["image"].shape[0]
    for mode in MODES:
        if mode == "predict":
            model.eval()

            def fn():
                return model.predict(batch["image"])
        else:
            stage = mode.split()[0]
            model.set_stage(stage)
            model.train()
            params = model.stage_parameters(stage)
            optimizer = torch.optim.Adam(params, lr=1e-3)

            def fn(optimizer=optimizer):
                loss = model.loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        timing = time_ms(fn, device, min_run_time=min_run_time)
        rows.append(throughput_row("mlff", f"MLFF ({fusion} fusion), interpretation", mode, "msflow_fast", shape, device, timing, images))
    return rows


__all__ = ["FUSIONS", "MODES", "jobs"]
