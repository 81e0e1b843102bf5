"""The embedded demo model and its adapters: what ships is sound, small and reproducible.

Adapters are applied by a numpy reference (``x·(W + s·A·B)``) written here, independent
of the builder's training code, and once through the serving engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from lorad.adapters.engine import InferenceEngine
from lorad.adapters.lora import LoraAdapter
from lorad.adapters.lora_graph import find_targets, fingerprint
from lorad.adapters.peft_format import load_peft, read_peft_dir
from lorad.daemon.demo import DEMO_RANK, DEMO_TARGETS, build, demo_adapter_dirs, demo_model_path

# A recorded accuracy is rounded to 4 digits; an argmax at a near-tie may also flip
# between float32 code paths (ORT, numpy): one test image is 1/359 ≈ 0.0028.
_ONE_IMAGE = 1.0 / 300
_LAYERS = ("fc1", "fc2", "head")


@pytest.fixture(scope="module")
def split() -> build.DigitsSplit:
    return build.load_split()


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(str(demo_model_path()))


@pytest.fixture(scope="module")
def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


@pytest.fixture(scope="module")
def demo_adapters() -> dict[str, LoraAdapter]:
    return {name: load_peft(read_peft_dir(path)) for name, path in demo_adapter_dirs().items()}


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _logits(weights: dict[str, np.ndarray], x: np.ndarray, adapter: LoraAdapter | None = None) -> np.ndarray:
    h = x.astype(np.float32)
    for layer in _LAYERS:
        w = weights[f"{layer}.weight"]
        if adapter is not None and f"{layer}.weight" in adapter.weights:
            lw = adapter.weights[f"{layer}.weight"]
            w = w + np.float32(adapter.scale) * (lw.A @ lw.B)
        h = h @ w + weights[f"{layer}.bias"]
        if layer != "head":
            h = np.maximum(h, 0)
    return h


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(logits.argmax(axis=1) == y))


def _task(name: str) -> build.DemoTask:
    return next(t for t in build.DEMO_TASKS if t.name == name)


def test_model_is_an_onnx_mlp_with_torch_style_weight_names(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model)
    assert model.ir_version == 9
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (pixels,) = model.graph.input
    assert pixels.name == "pixels"
    assert [d.dim_param or d.dim_value for d in pixels.type.tensor_type.shape.dim] == ["N", 64]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    shapes = {name: list(array.shape) for name, array in _weights(model).items()}
    assert shapes == {
        "fc1.weight": [64, 128], "fc1.bias": [128],
        "fc2.weight": [128, 128], "fc2.bias": [128],
        "head.weight": [128, 10], "head.bias": [10],
    }
    targets = find_targets(model, DEMO_TARGETS)
    assert [(t.weight, t.in_features, t.out_features, t.op) for t in targets] == [
        ("fc1.weight", 64, 128, "MatMul"), ("fc2.weight", 128, 128, "MatMul"), ("head.weight", 128, 10, "MatMul"),
    ]


def test_base_accuracy_in_onnxruntime_is_the_recorded_one(
    model: onnx.ModelProto, metadata: dict[str, str], split: build.DigitsSplit
) -> None:
    session = ort.InferenceSession(str(demo_model_path()), providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(None, {"pixels": split.x_test.astype(np.float32)})
    recorded = float(metadata["lorad.demo.test_accuracy"])
    assert recorded >= 0.9
    assert _accuracy(logits, split.y_test) == pytest.approx(recorded, abs=_ONE_IMAGE)
    assert int(metadata["lorad.demo.test_images"]) == len(split.y_test)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(logits, _logits(_weights(model), split.x_test), atol=1e-4)


def test_demo_adapters_are_peft_files_made_for_the_shipped_model(
    model: onnx.ModelProto, metadata: dict[str, str], demo_adapters: dict[str, LoraAdapter]
) -> None:
    assert list(demo_adapters) == sorted(t.name for t in build.DEMO_TASKS)
    assert metadata["lorad.demo.adapters"].split(",") == [t.name for t in build.DEMO_TASKS]
    targets = find_targets(model, DEMO_TARGETS)
    base_fingerprint = fingerprint(model, targets)
    for name, adapter in demo_adapters.items():
        assert adapter.base_fingerprint == base_fingerprint, name
        assert adapter.rank == _task(name).rank == int(metadata[f"lorad.demo.adapter.{name}.rank"])
        assert adapter.rank <= DEMO_RANK
        assert adapter.extra["lorad.demo.task"] == _task(name).description
        for t in targets:
            lw = adapter.weights[t.weight]
            assert lw.A.shape == (t.in_features, adapter.rank) and lw.B.shape == (adapter.rank, t.out_features)
    # One adapter must be narrower than the slot, so serving it exercises zero padding.
    assert min(a.rank for a in demo_adapters.values()) < DEMO_RANK


@pytest.mark.parametrize("name", [t.name for t in build.DEMO_TASKS])
def test_each_adapter_changes_predictions_and_learns_its_task(
    name: str,
    model: onnx.ModelProto,
    metadata: dict[str, str],
    demo_adapters: dict[str, LoraAdapter],
    split: build.DigitsSplit,
) -> None:
    x, y = _task(name).apply(split.x_test, split.y_test)
    weights = _weights(model)
    base_logits = _logits(weights, x)
    adapted_logits = _logits(weights, x, demo_adapters[name])
    changed = np.mean(base_logits.argmax(axis=1) != adapted_logits.argmax(axis=1))
    assert changed >= 0.4, f"{name} changes only {changed:.0%} of the predictions"
    base_acc, adapted_acc = _accuracy(base_logits, y), _accuracy(adapted_logits, y)
    prefix = f"lorad.demo.adapter.{name}"
    assert base_acc == pytest.approx(float(metadata[f"{prefix}.base_accuracy"]), abs=_ONE_IMAGE)
    assert adapted_acc == pytest.approx(float(metadata[f"{prefix}.accuracy"]), abs=_ONE_IMAGE)
    assert base_acc <= 0.5
    assert adapted_acc >= 0.8
    assert adapted_acc - base_acc >= 0.4


def test_engine_serves_the_demo_adapters_as_the_numpy_reference(
    model: onnx.ModelProto, demo_adapters: dict[str, LoraAdapter], split: build.DigitsSplit
) -> None:
    engine = InferenceEngine(demo_model_path(), targets=DEMO_TARGETS, rank=DEMO_RANK, intra_op_threads=1)
    x = split.x_test[:64].astype(np.float32)
    weights = _weights(model)
    np.testing.assert_allclose(engine.run({"pixels": x})["logits"], _logits(weights, x), atol=1e-4)
    for version, (name, adapter) in enumerate(demo_adapters.items(), start=1):
        prepared = engine.prepare(adapter, name=name, version=version)
        served = engine.run({"pixels": x}, prepared)["logits"]
        np.testing.assert_allclose(served, _logits(weights, x, adapter), atol=1e-4, err_msg=name)


def test_shipped_artifacts_are_small() -> None:
    files = [demo_model_path()] + [f for d in demo_adapter_dirs().values() for f in d.iterdir() if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 5 * 1024**2


# Minutes of numpy training on a loaded machine: a correctness test, not a timing one.
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_rebuild_reproduces_what_ships(
    tmp_path: Path, model: onnx.ModelProto, metadata: dict[str, str],
    demo_adapters: dict[str, LoraAdapter], split: build.DigitsSplit,
) -> None:
    result = build.build(tmp_path)
    assert set(result.metadata) == set(metadata)
    for key, value in result.metadata.items():
        if key.endswith("accuracy"):
            # Other CPUs' BLAS kernels may round differently along training.
            assert float(value) == pytest.approx(float(metadata[key]), abs=0.01), key
        else:
            assert value == metadata[key], key

    rebuilt = onnx.load(str(result.model_path))
    rebuilt_weights, shipped_weights = _weights(rebuilt), _weights(model)
    same = np.mean(_logits(rebuilt_weights, split.x_test).argmax(1) == _logits(shipped_weights, split.x_test).argmax(1))
    assert same >= 0.98
    assert sorted(result.adapter_dirs) == list(demo_adapters)
    for name, directory in result.adapter_dirs.items():
        adapter = load_peft(read_peft_dir(directory))
        x, _ = _task(name).apply(split.x_test, split.y_test)
        ours = _logits(rebuilt_weights, x, adapter).argmax(1)
        shipped = _logits(shipped_weights, x, demo_adapters[name]).argmax(1)
        assert np.mean(ours == shipped) >= 0.95, name
