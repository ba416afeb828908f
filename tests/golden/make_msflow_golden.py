"""Write the MSFlow golden fixture: a fixed-seed checkpoint and the outputs it gives.

Run once, with the code of the commit the fixture is meant to pin (``python tests/golden/make_msflow_golden.py``);
``tests/test_golden_msflow.py`` then checks that later code gives the same bits from the same file.
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


def _outputs(model, images):
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
            out[f"{backend}/eval/anomaly_map_mul"] = pred.anomaly_map_mul.clone()
            out[f"{backend}/eval/score"] = pred.score.clone()
            out[f"{backend}/eval/score_log_space"] = pred.score_log_space.clone()
            for k, m in enumerate(pred.log_likelihood_maps):
                out[f"{backend}/eval/log_likelihood{k}"] = m.clone()
    return out


def main() -> None:
    from msflow_fast import MSFlow
    from msflow_fast.model import save_checkpoint

    torch.set_num_threads(1)
    torch.manual_seed(20261204)
    np.random.seed(20261204)
    model = MSFlow(backbone=GoldenBackbone(), **GOLDEN_CONFIG)
    with torch.no_grad():  # away from the identity initialisation, so every term matters
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(model, CHECKPOINT)
    images = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(7))
    outputs = _outputs(model, images)
    outputs["images"] = images
    outputs["meta/cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    outputs["meta/torch"] = str(torch.__version__)
    torch.save(outputs, OUTPUTS)
    print(f"wrote {CHECKPOINT} and {OUTPUTS} ({len(outputs)} entries)")


if __name__ == "__main__":
    main()
