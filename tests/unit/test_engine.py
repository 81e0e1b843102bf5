import numpy as np
import pytest

from lorad.adapters.engine import InferenceEngine, TensorSpec
from lorad.adapters.errors import BaseModelMismatchError, InvalidAdapterError
from lorad.adapters.lora import LoraAdapter, LoraWeights
from tests.unit.lora_models import random_adapter, tiny_model


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    model, _ = tiny_model()
    return InferenceEngine(model, targets=["fc*"], rank=4)


def test_describes_inputs_and_outputs_without_lora_slots(engine: InferenceEngine) -> None:
    assert engine.inputs == [TensorSpec("x", "FP32", (-1, 3, 6))]
    assert engine.outputs == [TensorSpec("y", "FP32", (-1, 4))]


def test_adapter_for_another_base_model_is_refused(engine: InferenceEngine) -> None:
    other, _ = tiny_model(seed=9)
    other_engine = InferenceEngine(other, targets=["fc*"], rank=4)
    adapter = random_adapter(other_engine.targets, other_engine.fingerprint, rank=2)
    with pytest.raises(BaseModelMismatchError, match="made for base model sha256:"):
        engine.prepare(adapter, name="a", version=1)


def test_rank_above_slot_rank_is_refused(engine: InferenceEngine) -> None:
    with pytest.raises(InvalidAdapterError, match="rank 5 exceeds the slot rank 4"):
        engine.check(random_adapter(engine.targets, engine.fingerprint, rank=5))


def test_wrong_shapes_and_unknown_targets_are_refused(engine: InferenceEngine) -> None:
    bad_shape = LoraAdapter(rank=2, alpha=2, base_fingerprint=engine.fingerprint,
                            weights={"fc1.weight": LoraWeights(np.zeros((7, 2), np.float32), np.zeros((2, 5), np.float32))})
    with pytest.raises(InvalidAdapterError, match=r"'fc1'.*A \[7, 2\].*needs A \[6, r\] and B \[r, 5\]"):
        engine.check(bad_shape)
    unknown = LoraAdapter(rank=2, alpha=2, base_fingerprint=engine.fingerprint,
                          weights={"head.weight": LoraWeights(np.zeros((6, 2), np.float32), np.zeros((2, 5), np.float32))})
    with pytest.raises(InvalidAdapterError, match=r"'head' \(ONNX weight 'head.weight'\), which is not a LoRA target.*fc1, fc2"):
        engine.check(unknown)


def test_prepared_adapter_counts_padded_bytes(engine: InferenceEngine) -> None:
    prepared = engine.prepare(random_adapter(engine.targets, engine.fingerprint, rank=1), name="a", version=3)
    # A [6,4] + B [4,5] + A [5,4] + B [4,4], float32, padded to the slot rank 4
    assert prepared.nbytes == 4 * (24 + 20 + 20 + 16)
    assert (prepared.name, prepared.version, prepared.rank) == ("a", 3, 1)


def test_unknown_device_is_a_caller_error() -> None:
    model, _ = tiny_model()
    with pytest.raises(ValueError, match="device 'tpu' is not supported; allowed: cpu, cuda"):
        InferenceEngine(model, targets=["fc*"], rank=4, device="tpu")


def test_cuda_request_without_cuda_runs_on_cpu_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    model, _ = tiny_model()
    engine = InferenceEngine(model, targets=["fc*"], rank=4, device="cuda")
    assert (engine.requested_device, engine.active_device) == ("cuda", "cpu")
    assert "CUDAExecutionProvider is not available" in caplog.text
    x = np.ones((1, 3, 6), np.float32)
    engine.run({"x": x}, engine.prepare(random_adapter(engine.targets, engine.fingerprint, rank=2), name="a", version=1))
