"""The paths by which one person's data could change a run's output beyond what the
ledger says: sequence lengths, the example count, the per-user bound, and a run left
between training and release."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from lorad.trainer.batching import TensorLayout, collate, normalize_example
from lorad.trainer.config import parse_trainer_section
from lorad.trainer.errors import BadTrainingDataError
from lorad.trainer.example_store import Example
from lorad.trainer.noise import SeededNoise
from lorad.trainer.run import TrainingRun, pending_release
from lorad.trainer.service import TrainerService
from tests.unit.trainer_helpers import fill_store, inputs, labelled_by, make_env, make_service, run_config, teacher

_LAYOUTS = [TensorLayout("ids", np.dtype(np.int64), (None, None)),
            TensorLayout("attention_mask", np.dtype(np.int64), (None, None))]
_LABEL = TensorLayout("labels", np.dtype(np.int64), (None,))


def _seq(i: int, length: int) -> Example:
    ids = np.arange(1, length + 1, dtype=np.int64) + 100 * i
    return Example(i, "a", {"ids": ids, "attention_mask": np.ones(length, np.int64)}, np.asarray(i % 3), 0.0)


def test_no_example_length_decides_whether_another_is_used() -> None:
    # Before: rows shaped unlike the first were skipped, so one long example as the
    # first of a batch emptied the rest of it.
    batch = [_seq(0, 7), _seq(1, 3), _seq(2, 5), _seq(3, 12)]
    out, skipped = collate(batch, inputs_layout=_LAYOUTS, label_layout=_LABEL, pad_to=8)
    assert skipped == 0 and out["ids"].shape == (4, 8) and out["labels"].tolist() == [0, 1, 2, 0]
    # Zero padding is masked out; a longer example is truncated (a function of itself only).
    assert out["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert out["ids"][3].tolist() == list(range(301, 309))
    # Removing one example changes its row and nothing else.
    without, _ = collate([batch[0], *batch[2:]], inputs_layout=_LAYOUTS, label_layout=_LABEL, pad_to=8)
    np.testing.assert_array_equal(without["ids"], np.delete(out["ids"], 1, axis=0))


def test_inputs_are_bounded_at_ingestion() -> None:
    layout = [TensorLayout("x", np.dtype(np.float32), (None, 4))]
    label = TensorLayout("label", np.dtype(np.int64), (None,))
    for bad in (3e38, np.inf, np.nan, -2e6):
        with pytest.raises(BadTrainingDataError, match="not finite or larger than 1e\\+06"):
            normalize_example({"x": np.array([0.0, 1.0, bad, 0.0])}, 1, inputs_layout=layout, label_layout=label)
    rows, _ = normalize_example({"x": np.array([0.0, 1.0, 1e6, 0.0])}, 1, inputs_layout=layout, label_layout=label)
    assert rows["x"].dtype == np.float32


def test_the_plan_comes_from_a_charged_noisy_count_not_from_n(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    env = make_env(tmp_path, service, seed=5)
    try:
        x = inputs(50, seed=1)
        fill_store(env.store, "alice", x, labelled_by(service, teacher(service), x))
        n = len(env.store.split("alice", 0.2, 0)[0])
        run = TrainingRun(env, "alice", run_config(count_noise=4.0))
        run.begin()
        (record,) = env.ledger.state("alice").runs
        # The estimate is n plus the first draw of the run's (seeded) noise source, and
        # its query is charged with the run: q and the update's scale follow from it.
        estimate = n + float(SeededNoise(5).gaussian64(1, 4.0)[0])
        assert record["examples"] == round(estimate) != n
        assert record["q"] == pytest.approx(min(1.0, 8.0 / estimate))
        assert {"what": "example_count", "sigma": 4.0} in record["mechanisms"]
    finally:
        env.ledger.close()
        env.store.close()


def test_too_few_examples_are_refused_on_the_charged_private_count(tmp_path: Path) -> None:
    # Refusing on the exact count would publish it at the threshold (a run appears in the
    # open ledger or not): the refusal is decided on the noisy count, which is charged.
    service = make_service(tmp_path)
    env = make_env(tmp_path, service)
    try:
        x = inputs(2, seed=1)
        fill_store(env.store, "alice", x, labelled_by(service, teacher(service), x))
        with pytest.raises(ValueError, match=r"too few examples.*private estimate.*nothing else was"):
            TrainingRun(env, "alice", run_config(min_train_examples=100, min_holdout_examples=20)).begin()
        (record,) = env.ledger.state("alice").runs
        assert record["status"] == "query" and record["steps_charged"] == 0
        assert record["mechanisms"] == [{"what": "example_count", "sigma": 5.0}]
        assert 0 < env.ledger.state("alice").epsilon_spent < 2
    finally:
        env.ledger.close()
        env.store.close()


def _trainer(tmp_path: Path, **store: object) -> TrainerService:
    config = parse_trainer_section({
        "testing": True, "noise": "seeded", "schedule": False, "isolate": False, "store": store,
        "defaults": {"rank": 4, "alpha": 8, "noise_multiplier": 1.0, "batch_size": 8, "steps": 4, "epochs": None,
                     "target_epsilon": 100, "validation_margin": -100, "min_train_examples": 1,
                     "min_holdout_examples": 1, "gate_noise_multiplier": 1.0},
    })
    return TrainerService(config, adapters=make_service(tmp_path), state_dir=tmp_path, proc_root=tmp_path,
                          sys_root=tmp_path)


def test_examples_are_bounded_per_user_and_the_report_says_per_user(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_examples_per_user=3)
    try:
        x = inputs(5, seed=2)
        for row in x[:3]:
            trainer.add_example("alice", {"x": row}, 1, user="u1")
        with pytest.raises(BadTrainingDataError, match=r"'u1' already has 3 examples.*max_examples_per_user"):
            trainer.add_example("alice", {"x": x[3]}, 1, user="u1")
        trainer.add_example("alice", {"x": x[3]}, 1, user="u2")
        assert trainer.examples_count("alice") == 4
        state = trainer.privacy_state("alice")
        assert state["guarantee"] == "per user" and state["max_examples_per_user"] == 3
    finally:
        trainer.close()
    plain = _trainer(tmp_path / "plain")
    try:
        assert plain.privacy_state("alice")["guarantee"] == "per example"
    finally:
        plain.close()


def test_a_run_stopped_while_validating_is_finished_at_the_next_start(tmp_path: Path) -> None:
    # Before: the ledger said completed, the scheduler forgot the run, and its result
    # was released only when someone happened to start another run.
    trainer = _trainer(tmp_path)
    x = inputs(40, seed=3)
    for row, label in zip(x, labelled_by(trainer.adapters, teacher(trainer.adapters), x), strict=True):
        trainer.add_example("alice", {"x": row}, int(label))
    run = TrainingRun(trainer.env, "alice", trainer.config.for_adapter("alice"))
    run.begin()
    stepper = run._stepper(run._artifacts(), run.plan)  # train to the end, then "die" before the gate
    run._train(stepper, run._artifacts(), run.plan)
    stepper.save_checkpoint(run._dir / "checkpoint")
    trainer.ledger.end_run(run.run_id, steps_done=run.plan.steps, status="completed")
    assert pending_release(trainer.dir, trainer.ledger, "alice")
    trainer.close()

    again = _trainer(tmp_path)
    try:
        again.start()
        deadline = time.monotonic() + 120
        while again.run_status("alice").get("state") != "finished" and time.monotonic() < deadline:
            time.sleep(0.05)  # polling a condition, with a deadline
        status = again.run_status("alice")
        assert status.get("status") == "accepted" and status.get("steps_done") == 4, status
        assert again.adapters.registry.current_version("alice") == 1
        assert len(again.ledger.state("alice").runs) == 1  # nothing charged twice
        assert not pending_release(again.dir, again.ledger, "alice")
    finally:
        again.close()


def test_an_automatic_run_that_would_not_finish_in_its_window_is_not_started(tmp_path: Path) -> None:
    from lorad.trainer.run import RunControl, _save_measured_step

    service = make_service(tmp_path)
    env = make_env(tmp_path, service)
    try:
        x = inputs(60, seed=1)
        fill_store(env.store, "alice", x, labelled_by(service, teacher(service), x))
        # The last run measured 10 ms per step and batch row; 12 steps of 8 rows at twice
        # that (the device is loaded) take ~2 s, and 1 s of the window is left.
        _save_measured_step(env.state_dir, "alice", 0.01)
        late = RunControl(time_left_s=1.0, slowdown=2.0)
        with pytest.raises(ValueError, match=r"would take about .* time window .* later window"):
            TrainingRun(env, "alice", run_config(), control=late).begin()
        (record,) = env.ledger.state("alice").runs
        assert record["status"] == "query"  # only the private count it was planned from
        # With the window's time, or as a manual run (no window), it starts.
        assert TrainingRun(env, "alice", run_config(), control=RunControl(time_left_s=60.0, slowdown=2.0)).begin()
    finally:
        env.ledger.close()
        env.store.close()
