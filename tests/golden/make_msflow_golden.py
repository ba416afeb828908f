"""Write the MSFlow golden fixture: a fixed-seed checkpoint and the outputs it gives.

The committed fixture was written at commit 0b3f1a2, before the model-zoo redesign, as a format 2
checkpoint (msflow_fast 0.1). ``tests/test_golden_msflow.py`` checks that today's code gives the
same bits from the same file; :func:`outputs` computes them with today's API (the keys are the
ones the fixture was written with). Rerunning this script would pin the current code instead
(``python tests/golden/make_msflow_golden.py``); do that only on purpose.
The outputs are computed on one thread (bit-identical across machines with the same CPU capability
and torch version) on the ``reference`` and ``cpp`` backends, for the training forward (autograd on)
and for ``predict`` (``torch.no_grad``: the CPU inference fast paths, Winograd included).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from golden_backbone import GoldenBackbone, GOLDEN_CONFIG  # noqa: E402

CHECKPOINT = HERE / "msflow_v2_checkpoint.pt"
OUTPUTS = HERE / "msflow_v2_outputs.pt"


def outputs(model, images):
    """``{backend/mode/name: tensor}`` of the training forward and of ``predict``, on reference and cpp."""
    from msflow_fast import ops

    out = {}
    for backend in ("reference", "cpp"):
        with ops.use_backend(backend):
            model.train()
            latents, logdet = model(images)
            loss = model.loss(images)
            out[f"{backend}/train/logdet"] = logdet.detach().clone()
            out[f"{backend}/train/loss"] = loss.detach().clone()
            for k, z in enumerate(latents):
                out[f"{backend}/train/latent{k}"] = z.detach().clone()
            model.eval()
            with torch.no_grad():
                latents, logdet = model(images)
                pred = model.predict(images)
            out[f"{backend}/eval/logdet"] = logdet.clone()
            for k, z in enumerate(latents):
                out[f"{backend}/eval/latent{k}"] = z.clone()
            out[f"{backend}/eval/anomaly_map"] = pred.anomaly_map.clone()
            out[f"{backend}/eval/anomaly_map_mul"] = pred.maps["anomaly_map_mul"].clone()
            out[f"{backend}/eval/score"] = pred.score.clone()
            out[f"{backend}/eval/score_log_space"] = pred.maps["score_log_space"].clone()
            for k in range(len(latents)):
                out[f"{backend}/eval/log_likelihood{k}"] = pred.maps[f"log_likelihood_{k}"].clone()
    return out


def main() -> None:
    from msflow_fast import MSFlow, save

    torch.set_num_threads(1)
    torch.manual_seed(20261204)
    np.random.seed(20261204)
    model = MSFlow(backbone=GoldenBackbone(), **GOLDEN_CONFIG)
    with torch.no_grad():  # away from the identity initialisation, so every term matters
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save(model, CHECKPOINT)
    images = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(7))
    result = outputs(model, images)
    result["images"] = images
    result["meta/cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    result["meta/torch"] = str(torch.__version__)
    torch.save(result, OUTPUTS)
    print(f"wrote {CHECKPOINT} and {OUTPUTS} ({len(result)} entries)")


if __name__ == "__main__":
    main()
