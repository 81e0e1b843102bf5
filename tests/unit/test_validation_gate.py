"""The validation gate: a worse adapter is kept aside, a better one is served."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest

from benchmarks.reference_encoder import REFERENCE_TARGETS
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.adapters.peft_format import load_peft
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService
from lorad.trainer.example_store import Example
from lorad.trainer.run import TrainingRun
from lorad.trainer.validation import keep_rejected, validate_candidate
from tests.unit.trainer_helpers import (
    RANK,
    fill_store,
    inputs,
    labelled_by,
    make_env,
    make_service,
    run_config,
    teacher,
    tiny_model,
)


@pytest.fixture
def service(tmp_path: Path) -> AdapterService:
    return make_service(tmp_path)


def _examples(x: np.ndarray, labels: np.ndarray) -> list[Example]:
    return [Example(i, "alice", {"x": row}, np.asarray(int(lab)), 0.0) for i, (row, lab) in enumerate(zip(x, labels, strict=True))]


def _scrambled(service: AdapterService) -> LoraAdapter:
    return teacher(service, seed=99, scale=1.0)


@pytest.mark.parametrize("metric", ["loss", "accuracy"])
def test_accepts_better_rejects_worse(service: AdapterService, metric: str) -> None:
    good = teacher(service)
    x = inputs(80, seed=3)
    holdout = _examples(x, labelled_by(service, good, x))
    better = validate_candidate(service, "alice", good, holdout, metric=metric, loss="cross_entropy",
                                output="logits", margin=0.0, noise=None, noise_multiplier=0.0)
    assert better.accepted and better.baseline == "base" and better.examples == 80
    # Once the teacher is the served version, a scrambled candidate is compared with it.
    service.install("alice", good)
    worse = validate_candidate(service, "alice", _scrambled(service), holdout, metric=metric,
                               loss="cross_entropy", output="logits", margin=0.0, noise=None, noise_multiplier=0.0)
    assert not worse.accepted and worse.baseline == "v1" and worse.baseline_version == 1
    assert "by more than margin 0" in worse.reason
    # A negative margin wide enough lets the worse one through.
    assert validate_candidate(service, "alice", _scrambled(service), holdout, metric=metric, loss="cross_entropy",
                              output="logits", margin=-2.0, noise=None, noise_multiplier=0.0).accepted


def test_no_holdout_is_a_rejection(service: AdapterService) -> None:
    gate = validate_candidate(service, "alice", teacher(service), [], metric="loss", loss="cross_entropy",
                              output="logits", margin=1.0, noise=None, noise_multiplier=0.0)
    assert not gate.accepted and gate.reason == "no held-out examples to validate on"


def test_reason_never_carries_the_private_scores(service: AdapterService, tmp_path: Path) -> None:
    x = inputs(20, seed=4)
    holdout = _examples(x, labelled_by(service, None, x))
    gate = validate_candidate(service, "alice", _scrambled(service), holdout, metric="loss",
                              loss="cross_entropy", output="logits", margin=0.0, noise=None, noise_multiplier=0.0)
    assert not gate.accepted
    assert f"{gate.candidate_score:.2}"[:4] not in gate.reason
    where = keep_rejected(tmp_path / "rejected" / "alice" / "3", _scrambled(service), gate, run_id=3)
    files = sorted(p.name for p in where.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "reason.json"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in where.iterdir())
    doc = json.loads((where / "reason.json").read_text())
    assert doc["run_id"] == 3 and doc["accepted"] is False and doc["candidate_score"] == gate.candidate_score
    restored = load_peft({p.name: p.read_bytes() for p in where.iterdir() if p.name != "reason.json"})
    assert restored.rank == 4


def test_training_run_keeps_a_worse_version_aside(tmp_path: Path, service: AdapterService) -> None:
    env = make_env(tmp_path, service)
    try:
        good = teacher(service)
        x = inputs(80, seed=5)
        fill_store(env.store, "alice", x, labelled_by(service, good, x))
        service.install("alice", good)  # the served version is the perfect one
        # Few, very noisy steps with a large learning rate: worse than the teacher.
        run = TrainingRun(env, "alice", run_config(validation_margin=0.0, noise_multiplier=5.0, steps=3,
                                                   learning_rate=0.5))
        run_id = run.begin()
        result = run.execute()
        assert result.status == "rejected" and result.version is None
        assert service.registry.current_version("alice") == 1
        kept = env.state_dir / "rejected" / "alice" / str(run_id)
        assert (kept / "adapter_model.safetensors").is_file() and (kept / "reason.json").is_file()
        # Rejected or not, the steps were charged.
        (record,) = env.ledger.state("alice").runs
        assert (record["status"], record["steps_charged"]) == ("completed", 3)
    finally:
        env.ledger.close()
        env.store.close()


def test_first_version_compares_with_the_base_model(tmp_path: Path, service: AdapterService) -> None:
    env = make_env(tmp_path, service)
    try:
        x = inputs(60, seed=6)
        fill_store(env.store, "alice", x, labelled_by(service, None, x))  # the base model is perfect
        run = TrainingRun(env, "alice", run_config(validation_margin=0.0, noise_multiplier=5.0, steps=3,
                                                   learning_rate=0.5))
        run.begin()
        result = run.execute()
        assert result.status == "rejected" and "base" in result.reason
        assert service.registry.current_version("alice") is None
    finally:
        env.ledger.close()
        env.store.close()



def test_one_extreme_held_out_example_moves_the_decision_statistic_by_at_most_the_clip(
        service: AdapterService) -> None:
    # Before the gate was private, one held-out example with a huge loss under the
    # candidate decided accept/reject alone (the mean loss carried it).
    good = teacher(service)
    x = inputs(30, seed=8)
    holdout = _examples(x, labelled_by(service, good, x))
    without = validate_candidate(service, "alice", good, holdout, metric="loss", loss="cross_entropy",
                                 output="logits", margin=0.0, noise=None, noise_multiplier=0.0, score_clip=0.5)
    extreme = Example(999, "alice", {"x": x[0] * 1e4}, np.asarray((int(holdout[0].label) + 1) % 5), 0.0)
    with_it = validate_candidate(service, "alice", good, [*holdout, extreme], metric="loss", loss="cross_entropy",
                                 output="logits", margin=0.0, noise=None, noise_multiplier=0.0, score_clip=0.5)
    assert abs(with_it.noisy_sum - without.noisy_sum) <= 0.5 + 1e-9
    assert without.accepted and with_it.accepted


def test_the_gate_decision_is_noised_and_charged_to_the_ledger(tmp_path: Path, service: AdapterService) -> None:
    env = make_env(tmp_path, service)
    try:
        good = teacher(service)
        x = inputs(60, seed=9)
        fill_store(env.store, "alice", x, labelled_by(service, good, x))
        run = TrainingRun(env, "alice", run_config(steps=2, gate_noise_multiplier=5.0))
        run.begin()
        (record,) = env.ledger.state("alice").runs
        # Charged before the first step, with the count query, before any gate ran.
        assert {m["what"]: m["sigma"] for m in record["mechanisms"]}["validation_gate"] == 5.0
        result = run.execute()
        assert "private decision, σ 5" in result.reason
    finally:
        env.ledger.close()
        env.store.close()


def test_the_gate_scores_the_output_the_run_trained_on(tmp_path: Path) -> None:
    """A model whose first output is an embedding (as an imported text model's is): the run
    trains on ``logits`` and the gate scores ``logits`` too, not the first output."""
    model = onnx.ModelProto()
    model.CopyFrom(tiny_model())
    head_input = next(n for n in model.graph.node if n.output[0] == "logits").input[0]
    model.graph.node.append(onnx.helper.make_node("Identity", [head_input], ["embedding"]))
    model.graph.output.insert(0, onnx.helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, ["batch", 32]))
    engine = InferenceEngine(model, targets=REFERENCE_TARGETS, rank=RANK)
    service = AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=1 << 24)
    env = make_env(tmp_path, service)
    try:
        x = inputs(60, seed=4)
        fill_store(env.store, "alice", x, labelled_by(service, None, x))  # the base model's own answers
        # A margin no candidate can beat: the run is rejected and its private scores kept aside.
        run = TrainingRun(env, "alice", run_config(steps=2, validation_metric="accuracy", validation_margin=2.0))
        run.begin()
        assert run.execute().status == "rejected"
        (reason,) = (env.state_dir / "rejected" / "alice").glob("*/reason.json")
        # Scored on logits, the base model answers its own labels exactly.
        assert json.loads(reason.read_text())["baseline_score"] == 1.0
    finally:
        env.ledger.close()
        env.store.close()


def test_a_held_out_example_with_a_non_finite_score_counts_as_the_worst_case(service: AdapterService) -> None:
    good = teacher(service)
    x = inputs(30, seed=8)
    holdout = _examples(x, labelled_by(service, good, x))
    kwargs: dict = {"metric": "loss", "loss": "cross_entropy", "output": "logits", "margin": 0.0, "noise": None,
                    "noise_multiplier": 0.0, "score_clip": 0.5}
    without = validate_candidate(service, "alice", good, holdout, **kwargs)
    poisoned = Example(999, "alice", {"x": np.full_like(x[0], np.nan)}, np.asarray(0), 0.0)  # NaN logits
    with_it = validate_candidate(service, "alice", good, [*holdout, poisoned], **kwargs)
    assert np.isfinite(with_it.noisy_sum) and with_it.noisy_sum == pytest.approx(without.noisy_sum - 0.5)
    assert without.accepted and with_it.accepted  # one example cannot force a rejection


def test_the_gate_scores_padded_batches_whatever_the_lengths(tmp_path: Path) -> None:
    """Held-out token examples of different lengths: with the run's fixed length the gate
    makes one call per model per 256 examples, so no count shows through call counters."""
    from tests.model_matrix import EXPORTED

    engine = InferenceEngine(EXPORTED / "encoder_torchscript_17.onnx", targets=["q_proj", "v_proj"], rank=4)
    service = AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=1 << 24)
    rng = np.random.default_rng(3)
    holdout = [Example(i, "alice", {"input_ids": rng.integers(1, 64, size=n), "attention_mask": np.ones(n, np.int64)},
                       np.asarray(int(rng.integers(4))), 0.0) for i, n in enumerate(rng.integers(3, 9, size=40))]
    calls: list[object] = []
    real_run = service.run

    def counting_run(tensors: object, adapter: object = None) -> object:
        calls.append(adapter)
        return real_run(tensors, adapter)  # type: ignore[arg-type]

    service.run = counting_run  # type: ignore[method-assign]
    kwargs: dict = {"metric": "loss", "loss": "cross_entropy", "output": "logits", "margin": 0.0, "noise": None,
                    "noise_multiplier": 0.0}
    padded = validate_candidate(service, "alice", teacher_for(engine), holdout, pad_to=8, **kwargs)
    assert padded.examples == 40 and len(calls) == 2  # the base model's and the candidate's
    calls.clear()
    unpadded = validate_candidate(service, "alice", teacher_for(engine), holdout, **kwargs)
    assert len(calls) == 80  # without a fixed length: two calls per example
    # Padding is masked out: the same scores either way.
    assert padded.noisy_sum == pytest.approx(unpadded.noisy_sum, abs=1e-4)


def teacher_for(engine: InferenceEngine) -> LoraAdapter:
    rng = np.random.default_rng(1)
    return LoraAdapter(rank=4, alpha=4.0, base_fingerprint=engine.fingerprint, weights={
        t.weight: LoraWeights((rng.normal(size=(t.in_features, 4)) * 0.3).astype(np.float32),
                              (rng.normal(size=(4, t.out_features)) * 0.3).astype(np.float32)) for t in engine.targets})
