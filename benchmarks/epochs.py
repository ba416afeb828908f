"""MSFlow end to end: epoch times and inference throughput, the official composition vs msflow_fast.

Providers:
    freia             the official composition (cool-xuan/msflow): the frozen backbone in float32
                      and the standard memory layout, run in every epoch; FrEIA 0.2 SequenceINNs of
                      AllInOneBlocks with the positional condition concatenated to every subnet
                      input, and the fusion coupling in a FrEIA GraphINN on the reference ops; the
                      official loss, clipping (2.0) and Adam; predict = those flows and the
                      reference head. The baseline of the speed-ups.
    msflow_fast       ``fit`` as a user runs it: the fused flows, the channels-last backbone, and the
                      feature cache (``feature_cache="auto"``: epoch 1 computes and keeps the
                      features, later epochs train on them); ``model.predict``.
    msflow_fast-bf16  the same with ``backbone_precision="bfloat16"`` (the backbone under bf16
                      autocast; flows, log-dets and scores in float32).

Rows: "epoch 1" (the cache is built in it), "steady epoch" (the median of the later epochs),
"infer with backbone" at the inference batch. The backbone has random weights (speed does not
depend on them). CPU: resnet18 and wide_resnet50_2 at 256 px, ``images`` training images, batch 8.
CUDA: wide_resnet50_2 at 512 px. ``smoke``: resnet18 at 64 px, 4 images, one block per scale.

``profile_steady_epoch`` prints where a steady-state epoch's time goes (torch.profiler).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from msflow_fast import MSFlow, ops
from msflow_fast.engine import SyntheticDefects, fit, seed_everything

from .harness import Job, Result, synchronize, time_ms


class _Resident(Dataset):
    """Images held in memory (generated once), so data loading costs the same in every provider."""

    deterministic_items = True
    images_are_finite = True

    def __init__(self, n: int, size: int) -> None:
        source = SyntheticDefects("train", n, size, seed=0)
        self.images = torch.stack([source[i]["image"] for i in range(n)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index]}


def _settings(device: torch.device, smoke: bool) -> list[dict]:
    if smoke:
        return [{"backbone": "resnet18", "size": 64, "images": 4, "batch": 2, "epochs": 3, "infer_batch": 2, "overrides": {"parallel_blocks": (1, 1, 1)}}]
    if device.type == "cuda":
        return [{"backbone": "wide_resnet50_2", "size": 512, "images": 256, "batch": 8, "epochs": 4, "infer_batch": 32, "overrides": {}}]
    return [
        {"backbone": "resnet18", "size": 256, "images": 32, "batch": 8, "epochs": 4, "infer_batch": 8, "overrides": {}},
        {"backbone": "wide_resnet50_2", "size": 256, "images": 32, "batch": 8, "epochs": 3, "infer_batch": 8, "overrides": {}},
    ]


def _model(cfg: dict, device: torch.device, precision: str = "float32") -> MSFlow:
    seed_everything(0)
    return MSFlow(backbone=cfg["backbone"], pretrained=False, input_size=cfg["size"], backbone_precision=precision, **cfg["overrides"]).to(device)


class _Official:
    """The official MSFlow composition on FrEIA 0.2 (see the module docstring)."""

    def __init__(self, cfg: dict, device: torch.device) -> None:
        import FrEIA.framework as Ff
        import FrEIA.modules as Fm

        from msflow_fast.nn import FusionCouplingLayer, subnet_conv_ln

        model = _model(cfg, device)
        model.extractor.set_channels_last(False)
        self.model, self.device = model, device
        config = model.config
        self.parallel = []
        for c, n in zip(model.channels, config.parallel_blocks):
            inn = Ff.SequenceINN(c, 1, 1)
            for _ in range(n):
                inn.append(Fm.AllInOneBlock, cond=0, cond_shape=(config.c_cond, 1, 1), subnet_constructor=subnet_conv_ln,
                           affine_clamping=config.clamp_alpha, global_affine_type="SOFTPLUS")
            self.parallel.append(inn.to(device))
        nodes = [Ff.InputNode(c, 1, 1, name=f"input{i}") for i, c in enumerate(model.channels)]
        perms = [Ff.Node(nodes[i], Fm.PermuteRandom, {}, name=f"permute_{i}") for i in range(len(nodes))]
        fusion = Ff.Node([(p, 0) for p in perms], FusionCouplingLayer, {"clamp": config.clamp_alpha}, name="fusion flow")
        outs = [Ff.OutputNode(fusion.out0 if i == 0 else getattr(fusion, f"out{i}"), name=f"output_{i}") for i in range(len(nodes))]
        self.graph = Ff.GraphINN(nodes + perms + [fusion] + outs).to(device)
        self.params = [p for m in [*self.parallel, self.graph] for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=1e-4)

    def flows(self, images: torch.Tensor):
        with torch.no_grad():
            feats = [F.avg_pool2d(f, 3, 2, 1) for f in self.model.extractor(images)]
        outs, logdet = [], 0
        for inn, f in zip(self.parallel, feats):
            cond = self.model.positional(f.shape[0], f.shape[2], f.shape[3], f.device, f.dtype).contiguous()
            z, ld = inn(f, [cond])
            outs.append(z)
            logdet = logdet + ld
        latents, ld_fusion = self.graph(outs)
        return list(latents), logdet + ld_fusion

    def epoch(self, loader) -> None:
        for module in [*self.parallel, self.graph]:
            module.train()
        with ops.use_backend("reference"):
            for batch in loader:
                latents, logdet = self.flows(batch["image"].to(self.device))
                loss = (sum(0.5 * z.pow(2).flatten(1).sum(1) for z in latents) - logdet).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, 2.0)
                self.optimizer.step()

    def predict(self, images: torch.Tensor):
        for module in [*self.parallel, self.graph]:
            module.eval()
        with torch.no_grad(), ops.use_backend("reference"):
            latents, _ = self.flows(images)
            return self.model.head(latents, tuple(images.shape[-2:]))


def _row(mode: str, provider: str, shape: str, device: torch.device, median: float, p20: float, p80: float, extra: str) -> Result:
    return Result(suite="epoch", op="MSFlow", provider=provider, mode=mode, shape=shape,
                  dtype="float32", device=device.type, median_ms=median, p20_ms=p20, p80_ms=p80, extra=extra)


def _epoch_rows(provider: str, shape: str, device: torch.device, seconds: list[float], images: int, extra: str = "") -> list[Result]:
    first, steady = seconds[0] * 1e3, [s * 1e3 for s in seconds[1:]]
    median = statistics.median(steady)
    rate = lambda ms: f"{images / (ms * 1e-3):.1f} img/s"  # noqa: E731
    return [
        _row("epoch 1", provider, shape, device, first, first, first, rate(first) + (f", {extra}" if extra else "")),
        _row("steady epoch", provider, shape, device, median, min(steady), max(steady), rate(median) + f", {len(steady)} epochs"),
    ]


def jobs(device: torch.device, *, min_run_time: float = 0.5, smoke: bool = False) -> list[Job]:
    """Per backbone: training epochs and inference for each provider (see the module docstring)."""
    out: list[Job] = []
    for b, cfg in enumerate(_settings(device, smoke)):
        shape = f"{cfg['images']} img B{cfg['batch']} {cfg['size']}px {cfg['backbone']}"
        infer_shape = f"B{cfg['infer_batch']} {cfg['size']}px {cfg['backbone']}"

        def official_job(cfg=cfg, shape=shape, infer_shape=infer_shape) -> list[Result]:
            data = _Resident(cfg["images"], cfg["size"])
            official = _Official(cfg, device)
            loader = DataLoader(data, batch_size=cfg["batch"], shuffle=True, generator=torch.Generator().manual_seed(0))
            seconds = []
            for _ in range(cfg["epochs"]):
                synchronize(device)
                started = time.perf_counter()
                official.epoch(loader)
                synchronize(device)
                seconds.append(time.perf_counter() - started)
            images = data.images[: cfg["infer_batch"]].to(device)
            median, p20, p80 = time_ms(lambda: official.predict(images), device, min_run_time=min_run_time)
            rows = _epoch_rows("freia", shape, device, seconds, cfg["images"], "backbone every epoch")
            rows.append(_row("infer with backbone", "freia", infer_shape, device, median, p20, p80, f"{cfg['infer_batch'] / (median * 1e-3):.1f} img/s"))
            return rows

        def fast_job(precision: str, cfg=cfg, shape=shape, infer_shape=infer_shape) -> list[Result]:
            provider = "msflow_fast" if precision == "float32" else "msflow_fast-bf16"
            data = _Resident(cfg["images"], cfg["size"])
            model = _model(cfg, device, precision)
            result = fit(model, data, epochs=cfg["epochs"], batch_size=cfg["batch"], seed=0, progress=False, device=device)
            report = result.feature_cache["train"]
            cache = f"cache {report.storage} {report.bytes / 2**20:.1f} MiB, built in {report.build_seconds:.1f} s"
            images = data.images[: cfg["infer_batch"]].to(device)
            model.eval()
            median, p20, p80 = time_ms(lambda: model.predict(images), device, min_run_time=min_run_time)
            rows = _epoch_rows(provider, shape, device, result.epoch_seconds, cfg["images"], cache)
            rows.append(_row("infer with backbone", provider, infer_shape, device, median, p20, p80, f"{cfg['infer_batch'] / (median * 1e-3):.1f} img/s"))
            return rows

        out.append(Job(f"[epoch] {shape} freia", (b, 0), official_job))
        out.append(Job(f"[epoch] {shape} msflow_fast", (b, 1), lambda f=fast_job: f("float32")))
        out.append(Job(f"[epoch] {shape} msflow_fast-bf16", (b, 2), lambda f=fast_job: f("bfloat16")))
    return out


def profile_steady_epoch(device: torch.device, backbone: str = "resnet18", size: int = 256, images: int = 32, rows: int = 15) -> str:
    """The top ops (self time) of one steady-state epoch of ``fit``: a first fit writes a disk
    feature cache, a second reuses it, so its one epoch (profiled) trains on cached features."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    cfg = {"backbone": backbone, "size": size, "images": images, "batch": 8, "overrides": {}}
    data = _Resident(images, size)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tempfile.TemporaryDirectory() as run:
        data.fingerprint = lambda: f"resident-{images}-{size}"  # keys the disk cache
        fit(_model(cfg, device), data, epochs=1, batch_size=8, seed=0, progress=False, device=device, feature_cache="disk", out_dir=run)
        model = _model(cfg, device)
        with profile(activities=activities) as prof:
            result = fit(model, data, epochs=2, batch_size=8, seed=0, progress=False, device=device, feature_cache="disk",
                         out_dir=run, overwrite=True)
        assert result.feature_cache["train"].reused
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
