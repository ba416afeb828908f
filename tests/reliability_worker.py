"""A training process for the kill / resume tests: ``python tests/reliability_worker.py OUT [resume]``.

Trains the tiny registered stand-in (``tiny_flow``) into OUT with a fixed seed, slowly enough
(a short sleep per image) that a test can kill it mid-epoch. ``resume`` continues OUT/last.pt.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_engine_protocol import TinyFlowModel  # noqa: E402  (registers tiny_flow)

from msflow_fast.engine import fit, seed_everything  # noqa: E402

EPOCHS, IMAGES, BATCH, SEED = 6, 8, 2, 3
FIT = dict(epochs=EPOCHS, lr=0.02, batch_size=BATCH, shuffle=True, seed=SEED, progress=False)


class SlowImages(Dataset):
    """Fixed random images; each item takes ``delay`` seconds."""

    images_are_finite = True

    def __init__(self, delay: float = 0.0) -> None:
        self.x = torch.rand(IMAGES, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
        self.delay = delay

    def __len__(self) -> int:
        return IMAGES

    def __getitem__(self, i: int) -> dict:
        if self.delay:
            time.sleep(self.delay)
        return {"image": self.x[i]}


def initial_model() -> TinyFlowModel:
    seed_everything(0)
    return TinyFlowModel(input_size=16)


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    resume = len(argv) > 1 and argv[1] == "resume"
    delay = float(argv[2]) if len(argv) > 2 else 0.02
    fit(initial_model(), SlowImages(delay), out_dir=out, resume=resume, **FIT)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
