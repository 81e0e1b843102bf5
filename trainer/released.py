"""What the stored adapter versions record of the privacy they cost, next to the ledger.

Every version the trainer installs records its run id, the adapter's ε spent when it was
released and δ (``TrainingRun._release``). A ledger that lost runs (deleted, or replaced by
an older copy) shows: a stored version names a run the ledger does not record. New runs are
then refused (``TrainingRun._check_ledger_knows_trained_versions``), and the privacy report
never says less than the stored versions record (:func:`with_released`).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from lorad.adapters.errors import AdapterNotFoundError, AdapterStorageError
from lorad.adapters.registry import AdapterRegistry

__all__ = ["ReleasedVersion", "released_versions", "trained_adapters", "with_released"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReleasedVersion:
    """A stored version this trainer installed, and what it records."""

    version: int
    run_id: int
    #: The adapter's ε spent (all its runs composed) when the version was released.
    epsilon_spent: float | None
    delta: float | None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def released_versions(registry: AdapterRegistry, adapter: str) -> list[ReleasedVersion]:
    """The adapter's stored versions trained here, oldest first; a damaged one is left out:
    what it recorded cannot be read."""
    out = []
    for version in registry.versions(adapter):
        try:
            meta = registry.get(adapter, version).meta
        except AdapterNotFoundError:
            continue  # pruned meanwhile
        except AdapterStorageError as e:  # logged as a warning by the registry at start, and when served
            _log.debug("privacy report of adapter %r leaves out version %d: %s", adapter, version, e)
            continue
        run_id = meta.get("run_id")
        if meta.get("source") != "trainer" or not isinstance(run_id, int) or isinstance(run_id, bool):
            continue
        out.append(ReleasedVersion(version, run_id, _number(meta.get("epsilon_spent")), _number(meta.get("delta"))))
    return out


def trained_adapters(registry: AdapterRegistry) -> list[str]:
    """Stored adapters with at least one version trained here."""
    return [name for name in registry.names() if released_versions(registry, name)]


def with_released(state: dict[str, Any], released: list[ReleasedVersion]) -> dict[str, Any]:
    """A privacy report (``PrivacyState.to_dict()`` and what the service adds) that never
    says less than the stored versions record.

    ``ledger_missing_runs``: the versions whose run the ledger does not record (empty when
    it records them all). ``epsilon_spent`` (and a per-user ε, at least the per-example ε)
    is raised to the largest ε a stored version records, ``budget_left`` lowered to match,
    and ``ledger_warning`` says why (None when the ledger accounts for every version).
    """
    out = copy.copy(state)
    known = {int(r["run_id"]) for r in state.get("runs", [])}
    missing = [r for r in released if r.run_id not in known]
    out["ledger_missing_runs"] = [asdict(r) for r in missing]
    out["ledger_warning"] = None
    top = max((r for r in released if r.epsilon_spent is not None), key=lambda r: r.epsilon_spent or 0.0, default=None)
    recorded = top.epsilon_spent if top is not None and top.epsilon_spent is not None else 0.0
    ledger = float(state["epsilon_spent"])
    if recorded > ledger:
        out["epsilon_spent"] = recorded
        if out.get("delta") is None and top is not None:
            out["delta"] = top.delta
        if out.get("budget_epsilon") is not None:
            out["budget_left"] = max(0.0, float(out["budget_epsilon"]) - recorded)
        for key in ("user_epsilon_spent", "device_user_epsilon_spent"):
            if key in out:
                out[key] = max(float(out[key]), recorded)
    if not missing and recorded <= ledger * (1 + 1e-9) + 1e-12:  # the same ε, computed again
        return out
    lacks = ", ".join(f"run {r.run_id} (version {r.version})" for r in missing)
    out["ledger_warning"] = (
        f"the privacy ledger does not account for what stored versions of {state['adapter']!r} record"
        + (f" (it lacks {lacks})" if missing else "")
        + f"; ε spent is at least the {recorded:.4g} they record, the true value is unknown. Restore the ledger"
        + (" from a backup; no new run of this adapter starts until then" if missing else " from a backup"))
    return out
