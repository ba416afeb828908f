"""MSFlow and FastFlow as anomalib 2.7 models (msflow_fast.integrations.anomalib.lightning).

On a tiny synthetic MVTec-style folder (64-px images, random-initialised resnet18: no download):
anomalib's Engine fits, tests (image/pixel AUROC from anomalib's Evaluator), predicts and exports
(ExportType.TORCH) each model, with anomalib's datamodules (MVTecAD, Folder) and post-processing.
anomalib is a required test dependency: imported here, a missing package fails the file.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

with warnings.catch_warnings():  # anomalib's and timm's import-time deprecation notices
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    import anomalib  # noqa: F401  (required: a missing anomalib is a failure, not a skip)
    from anomalib.data import Folder, ImageBatch, InferenceBatch, MVTecAD
    from anomalib.deploy import ExportType, TorchInferencer
    from anomalib.engine import Engine
    from lightning.pytorch import Trainer

from msflow_fast import FastFlow, MSFlow
from msflow_fast.engine import write_synthetic_dataset
from msflow_fast.integrations.anomalib.lightning import LIGHTNING_DEFAULT_EPOCHS, FastFlowModule, MSFlowModule, ZooModule

SIZE = 64
CATEGORY = "synthetic"
# the smallest settings: random resnet18, one flow block per scale / stage
MSFLOW_TINY = dict(backbone="resnet18", pretrained=False, input_size=SIZE, parallel_blocks=(1, 1, 1), c_cond=8)
FASTFLOW_TINY = dict(backbone="resnet18", pretrained=False, input_size=SIZE, flow_steps=1)


@pytest.fixture(autouse=True)
def _quiet():
    """anomalib's and Lightning's notices (deprecations, tiny-dataloader hints) are not under test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", module="anomalib")
        warnings.filterwarnings("ignore", module="torchmetrics")
        yield


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    write_synthetic_dataset(root, CATEGORY, num_train=8, num_test=8, input_size=SIZE, seed=0)
    return root


def _engine(tmp_path, **kwargs) -> Engine:
    return Engine(
        accelerator="cpu", devices=1, default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False, **kwargs
    )


def _check_test_metrics(results: list[dict]) -> None:
    assert results and "image_AUROC" in results[0], results
    for name in ("image_AUROC", "pixel_AUROC"):
        value = float(results[0][name])
        assert 0.0 <= value <= 1.0, (name, value)


def _check_predictions(predictions: list, num_images: int) -> None:
    assert sum(len(batch.image) for batch in predictions) == num_images
    for batch in predictions:
        b = len(batch.image)
        assert tuple(batch.anomaly_map.shape) == (b, SIZE, SIZE)
        assert tuple(batch.pred_score.shape) == (b,)
        assert torch.isfinite(batch.anomaly_map).all() and torch.isfinite(batch.pred_score).all()
        # normalised by the post-processor from the validation statistics, then thresholded
        assert float(batch.pred_score.min()) >= 0.0 and float(batch.pred_score.max()) <= 1.0
        assert batch.pred_label is not None and tuple(batch.pred_label.shape) == (b,)


def _check_torch_export(engine: Engine, module: ZooModule, tmp_path, monkeypatch) -> None:
    path = engine.export(model=module, export_type=ExportType.TORCH, export_root=tmp_path / "export")
    assert path is not None and path.is_file() and path.suffix == ".pt"
    # anomalib's TORCH format pickles the whole module: {"model": module}, read with weights_only=False
    loaded = torch.load(path, map_location="cpu", weights_only=False)["model"].eval()
    images = torch.rand(2, 3, 80, 96)  # any size: the pre-processor resizes
    with torch.no_grad():
        out = loaded(images)
        expected = module.eval()(images)
    assert isinstance(out, InferenceBatch)
    assert tuple(out.anomaly_map.shape) == (2, 1, SIZE, SIZE) and tuple(out.pred_score.shape) == (2,)
    torch.testing.assert_close(out.anomaly_map, expected.anomaly_map)
    torch.testing.assert_close(out.pred_score, expected.pred_score)
    assert out.pred_label is not None and out.pred_label.dtype == torch.bool
    # anomalib's own loader of the format (it unpickles only with TRUST_REMOTE_CODE=1)
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    result = TorchInferencer(path, device="cpu").predict(images[0])
    assert isinstance(result, ImageBatch) and tuple(result.anomaly_map.shape) == (1, SIZE, SIZE)
    torch.testing.assert_close(result.pred_score, expected.pred_score[:1])


def _check_onnx_export(engine: Engine, module: ZooModule, tmp_path) -> None:
    """anomalib's ONNX export (dynamo) of a module holding msflow_fast's fused ops: the graph holds
    standard ONNX operators only (the ops trace their reference maths) and ONNX Runtime gives the
    module's outputs."""
    import onnx
    import onnxruntime

    path = engine.export(model=module, export_type=ExportType.ONNX, export_root=tmp_path / "onnx", input_size=(SIZE, SIZE))
    assert path is not None and path.is_file() and path.suffix == ".onnx"
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}, {n.domain for n in graph.node}
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = module.eval()(images)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {session.get_inputs()[0].name: images.numpy()})))
    torch.testing.assert_close(torch.from_numpy(outputs["pred_score"]), expected.pred_score, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(outputs["anomaly_map"]), expected.anomaly_map, rtol=1e-4, atol=1e-5)


def test_msflow_fit_test_predict_export_on_mvtecad(dataset_root, tmp_path, monkeypatch):
    datamodule = MVTecAD(root=dataset_root, category=CATEGORY, train_batch_size=4, eval_batch_size=8, num_workers=0)
    module = MSFlowModule(**MSFLOW_TINY)
    assert isinstance(module.model, MSFlow) and module.input_size == (SIZE, SIZE)
    engine = _engine(tmp_path, max_epochs=2)
    engine.fit(model=module, datamodule=datamodule)
    checkpoint = engine.trainer.checkpoint_callback.best_model_path
    assert engine.trainer.current_epoch == 2  # Engine(max_epochs=2), not the recipe's 100
    # the recipe's schedule scaled to the run's 2 epochs: no warm-up (round(0.12 * 2) = 0), x0.33
    # at epochs round(0.7 * 2) = 1 and round(0.9 * 2) = 2, as msflow_fast.engine.fit(epochs=2) runs it
    assert engine.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4 * 0.33**2)
    _check_test_metrics(engine.test(model=module, datamodule=datamodule))
    _check_predictions(engine.predict(model=module, datamodule=datamodule), num_images=8)
    _check_torch_export(engine, module, tmp_path, monkeypatch)
    _check_onnx_export(engine, module, tmp_path)

    # the Lightning checkpoint rebuilds the module from its hyper-parameters (name + config)
    restored = MSFlowModule.load_from_checkpoint(checkpoint)
    assert restored.model.config == module.model.config
    for (name, a), (_, b) in zip(module.state_dict().items(), restored.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_fastflow_fit_test_predict_export_on_folder(dataset_root, tmp_path, monkeypatch):
    category = dataset_root / CATEGORY
    defects = sorted(p.name for p in (category / "test").iterdir() if p.name != "good")
    datamodule = Folder(
        name=CATEGORY,
        root=category,
        normal_dir="train/good",
        abnormal_dir=[f"test/{d}" for d in defects],
        normal_test_dir="test/good",
        mask_dir=[f"ground_truth/{d}" for d in defects],
        train_batch_size=4,
        eval_batch_size=8,
        num_workers=0,
        val_split_mode="same_as_test",
    )
    module = FastFlowModule(**FASTFLOW_TINY, visualizer=False)
    assert isinstance(module.model, FastFlow)
    engine = _engine(tmp_path, max_epochs=1)
    engine.fit(model=module, datamodule=datamodule)
    assert engine.trainer.current_epoch == 1
    _check_test_metrics(engine.test(model=module, datamodule=datamodule))
    _check_predictions(engine.predict(model=module, datamodule=datamodule), num_images=8)
    _check_torch_export(engine, module, tmp_path, monkeypatch)
    _check_onnx_export(engine, module, tmp_path)


def test_optimizer_and_trainer_arguments_follow_the_recipe():
    fastflow = FastFlowModule(**FASTFLOW_TINY)
    stage = fastflow.model.recipe().stages[0]
    config = fastflow.configure_optimizers()
    assert set(config) == {"optimizer"}  # a constant rate: no scheduler
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.Adam)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["eps"], group["betas"]) == (1e-3, 1e-5, 1e-8, (0.9, 0.999))
    assert (stage.lr, stage.weight_decay, stage.eps) == (1e-3, 1e-5, 1e-8)
    trainable = {id(p) for p in fastflow.model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable  # the frozen backbone is left out
    assert fastflow.trainer_arguments == {"gradient_clip_val": 0, "gradient_clip_algorithm": "norm", "num_sanity_val_steps": 0}

    msflow = MSFlowModule(**MSFLOW_TINY)
    config = msflow.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    group = config["optimizer"].param_groups[0]
    assert group["initial_lr"] == 1e-4 and group["lr"] == pytest.approx(1e-5)  # warm-up from 0.1 over 12 of 100 epochs
    factors = [scheduler.lr_lambdas[0](e) for e in (0, 6, 12, 69, 70, 90)]
    assert factors == pytest.approx([0.1, 0.55, 1.0, 1.0, 0.33, 0.33**2])
    assert msflow.trainer_arguments["gradient_clip_val"] == 2.0

    # overrides of the recipe and the epochs
    tuned = MSFlowModule(**MSFLOW_TINY, lr=3e-4, weight_decay=1e-6, grad_clip=False, max_epochs=7)
    group = tuned.configure_optimizers()["optimizer"].param_groups[0]
    assert (group["initial_lr"], group["weight_decay"]) == (3e-4, 1e-6)
    assert tuned.trainer_arguments["gradient_clip_val"] == 0 and tuned.trainer_arguments["max_epochs"] == 7


def test_recipe_epochs_where_no_max_epochs_is_set():
    module = FastFlowModule(**FASTFLOW_TINY)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit_loop.max_epochs = LIGHTNING_DEFAULT_EPOCHS  # what Lightning resolves an unset max_epochs to
    module.trainer = trainer
    module.setup("fit")
    assert trainer.fit_loop.max_epochs == 500  # FastFlow's recipe
    trainer.fit_loop.max_epochs = 3  # set by the user: kept
    module.setup("fit")
    assert trainer.fit_loop.max_epochs == 3


def test_pre_processor_and_learning_type():
    from anomalib import LearningType
    from torchvision.transforms.v2 import Normalize, Resize

    module = FastFlowModule(**FASTFLOW_TINY)
    assert module.learning_type == LearningType.ONE_CLASS
    resize, normalize = module.pre_processor.transform.transforms
    assert isinstance(resize, Resize) and list(resize.size) == [SIZE, SIZE]
    assert isinstance(normalize, Normalize) and normalize.mean == [0.485, 0.456, 0.406] and normalize.std == [0.229, 0.224, 0.225]
    # the class default follows the model's default config: MSFlow's official 512 px, FastFlow's 256 px
    assert list(MSFlowModule.configure_pre_processor().transform.transforms[0].size) == [512, 512]
    assert list(FastFlowModule.configure_pre_processor().transform.transforms[0].size) == [256, 256]


def test_zoo_module_wraps_any_registered_model_and_rejects_mismatches():
    model = FastFlow(**FASTFLOW_TINY)
    wrapped = ZooModule(model)
    assert wrapped.model is model and wrapped.hparams["model"] == "fastflow"
    assert wrapped.hparams["flow_steps"] == 1 and not isinstance(wrapped.hparams.get("model"), torch.nn.Module)
    by_name = ZooModule("msflow", **MSFLOW_TINY)
    assert isinstance(by_name.model, MSFlow)
    with pytest.raises(TypeError, match="wraps MSFlow"):
        MSFlowModule(model)
    with pytest.raises(TypeError, match="already built"):
        ZooModule(model, flow_steps=2)
    with pytest.raises(TypeError, match="needs a model"):
        ZooModule()
    with pytest.raises(ValueError, match="unknown model"):
        ZooModule("msflw")
    with pytest.raises(ValueError, match="grad_clip"):
        FastFlowModule(**FASTFLOW_TINY, grad_clip=0)
    assert math.isfinite(float(wrapped.model.loss(torch.randn(2, 3, SIZE, SIZE)).detach()))
