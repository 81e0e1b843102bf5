"""Memory bounded per request (adapters/request_cost.py): a request is measured in the
unit its model's activations grow with, refused above its limit, and run in chunks of one
bounded call each, with the answers of one call."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lorad.adapters.engine import InferenceEngine
from lorad.adapters.errors import RequestTooLargeError
from lorad.adapters.peft_format import read_peft_dir
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.request_cost import RequestLimits
from lorad.adapters.service import AdapterService
from lorad.daemon.demo import DEMO_RANK, DEMO_TARGETS, demo_model_path

EXPORTED = Path(__file__).resolve().parents[1] / "data" / "exported"


def _bert(tmp_path: Path, limits: RequestLimits) -> AdapterService:
    targets = json.loads((EXPORTED / "peft_bert" / "adapter_config.json").read_text())["target_modules"]
    engine = InferenceEngine(EXPORTED / "bert_optimum_17.onnx", targets=sorted(targets), rank=8)
    return AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=1 << 24, limits=limits)


def _tokens(rows: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 64, size=(rows, length), dtype=np.int64)  # the fixture's vocabulary is 64
    mask = np.ones((rows, length), np.int64)
    mask[::3, length // 2:] = 0  # some rows padded
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((rows, length), np.int64)}


def test_a_token_model_is_measured_in_tokens_and_refused_over_its_limit(tmp_path: Path) -> None:
    service = _bert(tmp_path, RequestLimits(max_request_tokens=1000, chunk_tokens=64))
    assert service.cost.unit == "tokens" and service.cost.token_input == "input_ids"
    assert service.cost.check(_tokens(62, 16)) == 992
    with pytest.raises(RequestTooLargeError, match=r"1008 tokens \(63 texts or rows × 16 padded tokens\).*"
                                                   r"at most 1000 \(server.max_request_tokens\)"):
        service.cost.check(_tokens(63, 16))


def test_a_chunked_request_answers_as_one_call_would(tmp_path: Path) -> None:
    whole = _bert(tmp_path / "a", RequestLimits())
    chunked = _bert(tmp_path / "b", RequestLimits(chunk_tokens=48))  # 3 rows of 16 tokens per call
    files = read_peft_dir(EXPORTED / "peft_bert")
    for s in (whole, chunked):
        s.upload("peft", files)
    x = _tokens(10, 16)
    assert chunked.cost.calls(x) == 4 and not whole.cost.is_chunked(x)
    for target in (None, "peft"):
        a, b = whole.run(x, target), chunked.run(x, target)
        assert (b.adapter, b.version) == (a.adapter, a.version)
        np.testing.assert_allclose(b.outputs["logits"], a.outputs["logits"], rtol=1e-5, atol=1e-5)


def test_a_row_model_chunks_by_rows(tmp_path: Path) -> None:
    engine = InferenceEngine(demo_model_path(), targets=DEMO_TARGETS, rank=DEMO_RANK)
    service = AdapterService(engine, AdapterRegistry(tmp_path), cache_budget_bytes=1 << 20,
                             limits=RequestLimits(chunk_rows=7))
    x = {engine.inputs[0].name: np.random.default_rng(1).random((20, 64), dtype=np.float32)}
    assert service.cost.unit == "rows" and service.cost.calls(x) == 3
    np.testing.assert_allclose(service.run(x).outputs[engine.outputs[0].name],
                               engine.run(x, None)[engine.outputs[0].name], rtol=1e-6)
