"""A device's side of a federated round (trainer/federated.py) on a real trainer: the round
starts from the federation's B, charges the ledger at most round_epsilon, trains every
local example, hands B back and installs nothing; a round that does not fit is refused
before anything is charged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lorad.trainer.config import parse_trainer_section
from lorad.trainer.errors import PrivacyBudgetExceededError
from lorad.trainer.federated import FederatedDevice, RoundDeclined, RoundRefused, RoundStart
from lorad.trainer.policy import Decision
from lorad.trainer.service import TrainerService
from tests.unit.trainer_helpers import inputs, labelled_by, make_service, teacher

ADAPTER = "fleet"


def _trainer(tmp_path: Path, **defaults: Any) -> TrainerService:
    service = make_service(tmp_path)
    (tmp_path / "proc").mkdir(exist_ok=True)
    config = parse_trainer_section({
        "testing": True, "noise": "seeded", "schedule": False, "isolate": False,
        "defaults": {"rank": 4, "alpha": 8, "batch_size": 8, "steps": 10, "epochs": None, "target_epsilon": 4,
                     "learning_rate": 0.05, "count_noise": 20.0, **defaults},
    })
    trainer = TrainerService(config, adapters=service, state_dir=tmp_path, proc_root=tmp_path / "proc",
                             sys_root=tmp_path, federated=[ADAPTER])
    x = inputs(48, seed=2)
    for row, label in zip(x, labelled_by(service, teacher(service), x), strict=True):
        trainer.add_example(ADAPTER, {"x": row[None]}, int(label))
    trainer.start()
    return trainer


def _start(device: FederatedDevice, round_: int = 1, b: dict[str, np.ndarray] | None = None) -> RoundStart:
    info = device.info()
    zeros = {name: np.zeros(shape, np.float32) for name, shape in info["shapes"].items()}
    return RoundStart(round_, b if b is not None else zeros, info["a_digest"])


def test_a_round_trains_b_from_the_federations_start_and_charges_its_share(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    try:
        device = FederatedDevice(trainer, adapter=ADAPTER, round_epsilon=1.0, min_examples=10)
        info = device.info()
        assert info["ready"], info["reasons"]
        assert info["shapes"] and all(name.endswith(".B") for name in info["shapes"])
        assert info["epsilon_spent"] == 0.0 and info["epsilon_budget"] == 4.0
        first = device.train_round(_start(device))
        assert 0 < first.epsilon_after - first.epsilon_before <= 1.0 + 0.01
        assert any(np.any(v != 0) for v in first.b.values())
        # The next round starts where the federation says, not where this device ended.
        start = {name: value * 0.5 for name, value in first.b.items()}
        second = device.train_round(_start(device, 2, start))
        assert second.epsilon_after - first.epsilon_after <= 1.0 + 0.01
        assert second.epsilon_after > first.epsilon_after
        runs = trainer.ledger.state(ADAPTER).runs
        assert [r["status"] for r in runs] == ["completed", "completed"]
        # No gate query is planned for a round (nothing is validated here), only the count.
        assert all([m["what"] for m in r.get("mechanisms", [])] == ["example_count"] for r in runs)
        assert trainer.run_status(ADAPTER)["status"] == "delivered"
        assert not trainer.adapters.registry.versions(ADAPTER)  # nothing installed on the device
        assert ADAPTER not in trainer._candidates()  # never an automatic local run
    finally:
        trainer.close()


def test_a_round_that_does_not_fit_is_refused_before_any_charge(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    try:
        device = FederatedDevice(trainer, adapter=ADAPTER, round_epsilon=1.0, min_examples=10)
        good = _start(device)
        name, shape = next(iter(device.info()["shapes"].items()))
        bad_shape = {**good.b, name: np.zeros((shape[0] + 1, shape[1]), np.float32)}
        nan = {**good.b, name: np.full(shape, np.nan, np.float32)}
        cases = [
            (RoundStart(1, bad_shape, good.a_digest), "shape"),
            (RoundStart(1, nan, good.a_digest), "non-finite"),
            (RoundStart(1, {k: v for k, v in good.b.items() if k != name}, good.a_digest), "missing"),
            (RoundStart(1, good.b, "sha256:" + "0" * 64), "base model, targets, rank"),
        ]
        for start, why in cases:
            with pytest.raises(RoundRefused, match=why):
                device.train_round(start)
        assert trainer.ledger.state(ADAPTER).runs == []
    finally:
        trainer.close()


def test_a_busy_or_spent_device_declines_without_a_charge(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, target_epsilon=1.0)
    try:
        device = FederatedDevice(trainer, adapter=ADAPTER, round_epsilon=5.0, min_examples=10)
        busy = trainer.policy.device
        trainer.policy.device = lambda: Decision.of(["load 3.0 per CPU above max_load_per_cpu 0.5"])  # type: ignore[method-assign]
        with pytest.raises(RoundDeclined, match="load"):
            device.train_round(_start(device))
        assert not device.info()["ready"]
        trainer.policy.device = busy  # type: ignore[method-assign]
        assert trainer.ledger.state(ADAPTER).runs == []
        device.train_round(_start(device))  # spends what is left (round_epsilon is above it)
        spent = trainer.ledger.state(ADAPTER).epsilon_spent
        assert spent == pytest.approx(1.0, abs=0.02)
        assert "privacy budget spent" in " ".join(device.info()["reasons"])
        with pytest.raises(PrivacyBudgetExceededError):
            device.train_round(_start(device, 2))
        assert trainer.ledger.state(ADAPTER).epsilon_spent == spent
    finally:
        trainer.close()


def test_too_few_examples_by_the_private_count_ends_the_round_charging_only_the_count(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    try:
        device = FederatedDevice(trainer, adapter=ADAPTER, round_epsilon=1.0, min_examples=500)
        with pytest.raises(ValueError, match=r"federated\.min_examples"):
            device.train_round(_start(device))
        runs = trainer.ledger.state(ADAPTER).runs
        assert len(runs) == 1 and runs[0]["status"] == "query"  # the count query only
    finally:
        trainer.close()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_trained_update_that_is_not_finite_never_leaves_the_device(tmp_path: Path) -> None:
    """A diverging device (SGD at a learning rate beyond float32) trains and is
    charged (the divergence shows only after the charge), but its update is refused on the
    device instead of being sent to the federation."""
    trainer = _trainer(tmp_path, optimizer="sgd", learning_rate=1e39)
    try:
        device = FederatedDevice(trainer, adapter=ADAPTER, round_epsilon=1.0, min_examples=10)
        with pytest.raises(RoundRefused, match=r"the trained update: .* has non-finite values"):
            device.train_round(_start(device))
        assert [r["status"] for r in trainer.ledger.state(ADAPTER).runs] == ["completed"]
    finally:
        trainer.close()
