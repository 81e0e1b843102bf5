"""trainer/released.py: the privacy report never says less than the stored versions record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorad.adapters.registry import META_FILE, AdapterRegistry
from lorad.trainer.released import ReleasedVersion, released_versions, trained_adapters, with_released

FILES = {"adapter_model.safetensors": b"w" * 64, "adapter_config.json": b"{}"}


def _state(epsilon: float, run_ids: list[int], **extra: Any) -> dict[str, Any]:
    return {"adapter": "alice", "epsilon_spent": epsilon, "delta": 1e-5 if run_ids else None,
            "budget_epsilon": 8.0 if run_ids else None, "budget_left": 8.0 - epsilon if run_ids else None,
            "runs": [{"run_id": r} for r in run_ids], **extra}


def test_released_versions_are_read_from_the_registry(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    reg.put("alice", FILES, meta={"source": "trainer", "run_id": 3, "epsilon_spent": 3.996, "delta": 1e-5})
    reg.put("alice", FILES, meta={"source": "upload"})
    reg.put("alice", FILES, meta={"source": "trainer", "run_id": 5, "epsilon_spent": "lots"})
    reg.put("bob", FILES, meta={"source": "upload"})
    assert released_versions(reg, "alice") == [ReleasedVersion(1, 3, 3.996, 1e-5), ReleasedVersion(3, 5, None, None)]
    assert trained_adapters(reg) == ["alice"]
    (tmp_path / "alice" / "1" / META_FILE).write_bytes(b"{")  # damaged: what it records is unknown
    assert released_versions(reg, "alice") == [ReleasedVersion(3, 5, None, None)]


def test_a_ledger_that_knows_every_run_is_reported_as_it_is() -> None:
    released = [ReleasedVersion(1, 3, 3.996, 1e-5)]
    state = with_released(_state(3.996, [3]), released)
    assert (state["epsilon_spent"], state["ledger_missing_runs"], state["ledger_warning"]) == (3.996, [], None)
    # ε computed again may differ in the last bits: no alarm
    assert with_released(_state(3.996 * (1 - 1e-12), [3]), released)["ledger_warning"] is None
    assert with_released(_state(0.0, []), [])["ledger_missing_runs"] == []


def test_a_lost_ledger_reports_at_least_what_the_versions_record() -> None:
    released = [ReleasedVersion(1, 3, 2.5, 1e-5), ReleasedVersion(2, 4, 3.996, 1e-6)]
    state = with_released(_state(0.0, [], user_epsilon_spent=0.0, device_user_epsilon_spent=0.0), released)
    assert state["epsilon_spent"] == 3.996 and state["delta"] == 1e-6
    assert state["user_epsilon_spent"] == state["device_user_epsilon_spent"] == 3.996
    assert [r["run_id"] for r in state["ledger_missing_runs"]] == [3, 4]
    assert "it lacks run 3 (version 1), run 4 (version 2)" in state["ledger_warning"]
    assert "no new run" in state["ledger_warning"]


def test_a_replaced_ledger_lowers_the_budget_left() -> None:
    state = with_released(_state(1.0, [3]), [ReleasedVersion(1, 3, 1.0, 1e-5), ReleasedVersion(2, 4, 6.0, 1e-5)])
    assert (state["epsilon_spent"], state["budget_left"]) == (6.0, pytest.approx(2.0))
    assert [r["run_id"] for r in state["ledger_missing_runs"]] == [4]
    tampered = with_released(_state(1.0, [3, 4]), [ReleasedVersion(2, 4, 6.0, 1e-5)])
    assert tampered["epsilon_spent"] == 6.0 and tampered["ledger_missing_runs"] == []
    assert "at least the 6" in tampered["ledger_warning"] and "no new run" not in tampered["ledger_warning"]
