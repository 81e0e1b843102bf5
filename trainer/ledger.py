"""The privacy ledger: what every adapter's training data has been charged, across restarts.

One JSON file holds, per adapter, every DP-SGD run its data took part in: sampling rate
q, noise multiplier σ, clipping norm C, steps, examples, accountant, δ, times and status
— enough for anyone to recompute ε with :mod:`lorad.trainer.accountant` or their own code.

Write-ahead rule: :meth:`PrivacyLedger.begin_run` checks the budget and durably records a
charge for *all* planned steps before it returns, so nothing trained in the run can be
released before it is paid for. :meth:`PrivacyLedger.end_run` may lower the charge to the
steps actually done, and only by writing that final record; a crash anywhere in between
leaves the full planned charge (over-count, never under-count). Each write replaces the
whole file atomically (``lorad.adapters.fsutil.atomic_write_bytes``), so a crash leaves the old
or the new ledger, never a torn one.

A ledger that fails its checks on load is an error (:class:`BadTrainingDataError`), never
reset: resetting would silently give the data its whole budget again. One process at a
time may hold a ledger open (an exclusive ``flock`` on ``<path>.lock``), because two
writers would overwrite each other's charges.

Fault injection: ``fault_hook`` is called with ``"<operation>:before-write"`` and
``"<operation>:after-write"`` around every write; tests use it to kill the process there.
"""

from __future__ import annotations

import copy
import datetime
import fcntl
import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lorad.adapters.fsutil import atomic_write_bytes
from lorad.trainer._names import check_adapter_name, is_adapter_name
from lorad.trainer.accountant import ACCOUNTANTS, AccountantName, Charge, PureCharge, RunCharge, epsilon
from lorad.trainer.errors import BadTrainingDataError, PrivacyBudgetExceededError, TrainingFailedError

__all__ = ["PrivacyLedger", "PrivacyState", "RunStatus", "END_STATUSES", "QUERY_STATUS", "run_charges"]

RunStatus = Literal["running", "completed", "failed", "cancelled"]
END_STATUSES: tuple[RunStatus, ...] = ("completed", "failed", "cancelled")
#: The status of a record that charges queries only (no training): the scheduler's
#: start test, or the private count of a run refused for too few examples. Its q, σ and
#: C are placeholders (no steps); its ``mechanisms`` are what it charges.
QUERY_STATUS = "query"

#: How to recover from a damaged ledger (never by starting an empty one, which would hand
#: the data its budget again; the daemon serves meanwhile, without training).
_RECOVER = ("restore it from a backup and restart; until then training stays off and serving goes on (an empty "
            "ledger would hand the data its whole budget again)")
_FORMAT = "lorad-privacy-ledger"
_VERSION = 1
_RUN_KEYS: dict[str, type | tuple[type, ...]] = {
    "run_id": int, "q": float, "sigma": float, "clip_norm": float, "planned_steps": int,
    "steps_done": int, "steps_charged": int, "examples": int, "accountant": str,
    "delta": float, "budget_epsilon": float, "started_at": str, "ended_at": (str, type(None)),
    "status": str,
}
#: Keys a run record may carry: energy is known only on a device with a power source.
_OPTIONAL_RUN_KEYS: dict[str, type | tuple[type, ...]] = {"energy_joules": float}
#: Optional run key: the run's other Gaussian mechanisms on the same data (a noisy count
#: of the examples, the validation gate's noisy decision), each ``{"what": str, "sigma": σ}``
#: with sensitivity 1 in units of its noise std, i.e. one step with q = 1. They are charged
#: in full at begin_run and stay charged whatever the run's outcome. An entry
#: ``{"what": str, "epsilon": ε₀}`` instead is a pure ε₀-DP mechanism (accountant.PureCharge).
_MECHANISMS = "mechanisms"
_ADAPTER_KEYS: dict[str, type | tuple[type, ...]] = {"accountant": str, "delta": float, "budget_epsilon": float, "runs": list}


@dataclass(frozen=True)
class PrivacyState:
    """An adapter's privacy as of now. ``runs`` are JSON-ready copies of the run records.

    The adapter's budget and accountant are those of its latest run, its δ the smallest
    any run asked for (None before any): δ never goes up, so ε spent never goes down.
    ``epsilon_spent`` composes the charged steps of every run at that δ.
    """

    adapter: str
    epsilon_spent: float
    delta: float | None
    budget_epsilon: float | None
    budget_left: float | None
    accountant: AccountantName | None
    runs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter, "epsilon_spent": self.epsilon_spent, "delta": self.delta,
            "budget_epsilon": self.budget_epsilon, "budget_left": self.budget_left,
            "accountant": self.accountant, "runs": copy.deepcopy(self.runs),
        }


class PrivacyLedger:
    """Persistent per-adapter privacy charges; thread-safe, one process per file."""

    def __init__(self, path: Path, *, fault_hook: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self._fault_hook = fault_hook
        self._lock = threading.RLock()
        self._lock_fd = self._acquire_file_lock()
        try:
            self._doc = self._load()
        except BaseException:
            self.close()
            raise

    # --- public API ---------------------------------------------------------------------

    def begin_run(
        self, adapter: str, *, q: float, sigma: float, clip_norm: float, planned_steps: int,
        examples: int, accountant: AccountantName, delta: float, budget_epsilon: float,
        mechanisms: Sequence[tuple[str, float]] = (),
    ) -> int:
        """Charge ``planned_steps`` and ``mechanisms`` ((what, σ) Gaussian queries of
        sensitivity 1, see :data:`_MECHANISMS`) durably, or refuse; returns the run id."""
        check_adapter_name(adapter)
        charge = RunCharge(q=q, sigma=sigma, steps=planned_steps)
        extra: list[dict[str, Any]] = [{"what": str(what), "sigma": float(s)} for what, s in mechanisms]
        extra_charges = [RunCharge(q=1.0, sigma=float(m["sigma"]), steps=1) for m in extra]
        if planned_steps < 1:
            raise ValueError(f"planned_steps must be >= 1, got {planned_steps}")
        _check_positive("clip_norm", clip_norm)
        _check_positive("budget_epsilon", budget_epsilon)
        if not (isinstance(examples, int) and not isinstance(examples, bool) and examples >= 0):
            raise ValueError(f"examples must be an integer >= 0, got {examples!r}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}")
        with self._lock:
            self._check_open()
            entry = self._doc["adapters"].get(adapter)
            previous = _charges(entry["runs"]) if entry else []
            # δ only goes down: ε of the runs already charged at a larger δ would be smaller,
            # so raising δ later would hand the data back budget it has spent.
            at_delta = min(float(delta), entry["delta"]) if entry else float(delta)
            spent = epsilon(runs=previous, delta=at_delta, accountant=accountant)
            after = epsilon(runs=[*previous, *extra_charges, charge], delta=at_delta, accountant=accountant)
            if after > budget_epsilon:
                raise PrivacyBudgetExceededError(
                    adapter, spent_epsilon=spent, requested_epsilon=after,
                    budget_epsilon=budget_epsilon,
                )
            doc = copy.deepcopy(self._doc)
            run_id = doc["next_run_id"]
            doc["next_run_id"] = run_id + 1
            new_entry = doc["adapters"].setdefault(adapter, {"runs": []})
            new_entry.update(accountant=accountant, delta=at_delta,
                             budget_epsilon=float(budget_epsilon))
            new_entry["runs"].append({
                "run_id": run_id, "q": float(q), "sigma": float(sigma),
                "clip_norm": float(clip_norm), "planned_steps": planned_steps, "steps_done": 0,
                "steps_charged": planned_steps, "examples": examples, "accountant": accountant,
                "delta": float(delta), "budget_epsilon": float(budget_epsilon),
                "started_at": _now(), "ended_at": None, "status": "running",
                **({_MECHANISMS: extra} if extra else {}),
            })
            self._persist(doc, "begin_run")
            return int(run_id)

    def charge_queries(
        self, adapter: str, *, mechanisms: Sequence[tuple[str, str, float]], examples: int = 0,
        accountant: AccountantName, delta: float, budget_epsilon: float, clip_norm: float,
    ) -> int:
        """Charge queries that train nothing, durably, or refuse; returns the record's id.

        ``mechanisms``: (what, kind, value) with kind ``"sigma"`` (a Gaussian query of
        sensitivity 1) or ``"epsilon"`` (a pure ε-DP mechanism). ``examples`` is the
        private estimate a refused run was planned from (public like a run's)."""
        check_adapter_name(adapter)
        extra = [{"what": str(what), kind: float(value)} for what, kind, value in mechanisms]
        if not extra or any(kind not in ("sigma", "epsilon") for _, kind, _ in mechanisms):
            raise ValueError(f"mechanisms must be (what, 'sigma' | 'epsilon', value) entries, got {mechanisms!r}")
        _check_positive("budget_epsilon", budget_epsilon)
        with self._lock:
            self._check_open()
            entry = self._doc["adapters"].get(adapter)
            previous = _charges(entry["runs"]) if entry else []
            at_delta = min(float(delta), entry["delta"]) if entry else float(delta)
            after = epsilon(runs=[*previous, *(_mechanism_charge(m) for m in extra)], delta=at_delta,
                            accountant=accountant)
            if after > budget_epsilon:
                raise PrivacyBudgetExceededError(
                    adapter, spent_epsilon=epsilon(runs=previous, delta=at_delta, accountant=accountant),
                    requested_epsilon=after, budget_epsilon=budget_epsilon)
            doc = copy.deepcopy(self._doc)
            record_id = doc["next_run_id"]
            doc["next_run_id"] = record_id + 1
            new_entry = doc["adapters"].setdefault(adapter, {"runs": []})
            new_entry.update(accountant=accountant, delta=at_delta, budget_epsilon=float(budget_epsilon))
            now = _now()
            new_entry["runs"].append({
                "run_id": record_id, "q": 1.0, "sigma": 1.0, "clip_norm": float(clip_norm), "planned_steps": 0,
                "steps_done": 0, "steps_charged": 0, "examples": int(examples), "accountant": accountant,
                "delta": float(delta), "budget_epsilon": float(budget_epsilon), "started_at": now, "ended_at": now,
                "status": QUERY_STATUS, _MECHANISMS: extra,
            })
            self._persist(doc, "charge_queries")
            return int(record_id)

    def record_progress(self, run_id: int, steps_done: int) -> None:
        """Durably note progress (informational: the charge stays at planned_steps)."""
        with self._lock:
            self._check_open()
            doc = copy.deepcopy(self._doc)
            run = self._running(doc, run_id)
            _check_steps_done(run, steps_done)
            run["steps_done"] = steps_done
            self._persist(doc, "record_progress")

    def end_run(self, run_id: int, *, steps_done: int, status: RunStatus, energy_joules: float | None = None) -> None:
        """Close a run; its charge becomes the ``steps_done`` really trained.

        Works for a run begun before a restart too (it stays "running", charged in full,
        until then); ``steps_done`` may not go below the progress already recorded.
        ``energy_joules`` (what the run cost, from the daemon's power source) is kept in
        the record next to the charge when known.
        """
        if status not in END_STATUSES:
            raise ValueError(f"status must be one of {list(END_STATUSES)}, got {status!r}")
        with self._lock:
            self._check_open()
            doc = copy.deepcopy(self._doc)
            run = self._running(doc, run_id)
            _check_steps_done(run, steps_done)
            run.update(steps_done=steps_done, steps_charged=steps_done, status=status,
                       ended_at=_now())
            if energy_joules is not None:
                if not (math.isfinite(energy_joules) and energy_joules >= 0):
                    raise ValueError(f"energy_joules must be a finite number >= 0, got {energy_joules!r}")
                run["energy_joules"] = float(energy_joules)
            self._persist(doc, "end_run")

    def state(self, adapter: str) -> PrivacyState:
        """ε spent, δ, budget and every run of ``adapter`` (an empty state if never trained)."""
        check_adapter_name(adapter)
        with self._lock:
            self._check_open()
            entry = self._doc["adapters"].get(adapter)
            if entry is None:
                return PrivacyState(adapter, 0.0, None, None, None, None, [])
            runs = copy.deepcopy(entry["runs"])
            spent = epsilon(runs=_charges(runs), delta=entry["delta"],
                            accountant=entry["accountant"])
            return PrivacyState(
                adapter=adapter, epsilon_spent=spent, delta=entry["delta"],
                budget_epsilon=entry["budget_epsilon"],
                budget_left=max(0.0, entry["budget_epsilon"] - spent),
                accountant=entry["accountant"], runs=runs,
            )

    def adapters(self) -> list[str]:
        with self._lock:
            self._check_open()
            return sorted(self._doc["adapters"])

    def close(self) -> None:
        """Release the file lock; safe to call twice."""
        with self._lock:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing drops the flock
                self._lock_fd = None

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError(f"privacy ledger {self.path} is closed")

    def _running(self, doc: dict[str, Any], run_id: int) -> dict[str, Any]:
        for entry in doc["adapters"].values():
            for run in entry["runs"]:
                if run["run_id"] == run_id:
                    if run["status"] != "running":
                        raise RuntimeError(f"run {run_id} already ended with status "
                                           f"{run['status']!r}")
                    return run
        raise ValueError(f"run_id {run_id!r} is not in the privacy ledger {self.path}")

    def _acquire_file_lock(self) -> int | None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise TrainingFailedError(f"cannot open the ledger lock {lock_path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"privacy ledger {self.path} is open in another process (lock {lock_path}); "
                f"only one process may charge it"
            ) from None
        return fd

    def _load(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {"format": _FORMAT, "version": _VERSION, "next_run_id": 1, "adapters": {}}
        except OSError as e:
            raise TrainingFailedError(f"cannot read privacy ledger {self.path}: {e}") from e
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadTrainingDataError(f"privacy ledger {self.path} is not valid JSON: {e}; {_RECOVER}") from e
        try:
            _validate(doc)
        except _Invalid as e:
            raise BadTrainingDataError(f"privacy ledger {self.path} is corrupt: {e}; {_RECOVER}") from None
        return doc

    def _persist(self, doc: dict[str, Any], operation: str) -> None:
        data = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
        if self._fault_hook is not None:
            self._fault_hook(f"{operation}:before-write")
        try:
            atomic_write_bytes(self.path, data, mode=0o600)
        except OSError as e:
            raise TrainingFailedError(f"cannot write privacy ledger {self.path}: {e}") from e
        # Memory follows the disk only once the disk has it.
        self._doc = doc
        if self._fault_hook is not None:
            self._fault_hook(f"{operation}:after-write")


class _Invalid(Exception):
    pass


def _charges(runs: list[dict[str, Any]]) -> list[Charge]:
    return [charge for r in runs for charge in run_charges(r)]


def run_charges(run: dict[str, Any]) -> list[Charge]:
    """What one run record charges: its DP-SGD steps and its other mechanisms."""
    return [RunCharge(q=run["q"], sigma=run["sigma"], steps=run["steps_charged"]),
            *(_mechanism_charge(m) for m in run.get(_MECHANISMS, []))]


def _mechanism_charge(m: dict[str, Any]) -> Charge:
    return PureCharge(m["epsilon"]) if "epsilon" in m else RunCharge(q=1.0, sigma=m["sigma"], steps=1)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_steps_done(run: dict[str, Any], steps_done: int) -> None:
    if not (isinstance(steps_done, int) and not isinstance(steps_done, bool)
            and run["steps_done"] <= steps_done <= run["planned_steps"]):
        raise ValueError(
            f"steps_done for run {run['run_id']} must be an integer in "
            f"[{run['steps_done']} (progress already recorded), {run['planned_steps']} "
            f"(planned)], got {steps_done!r}"
        )


def _expect(where: str, value: object, kind: type | tuple[type, ...]) -> None:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        kinds = (*kinds, int)  # JSON writes 1.0 as 1.0, but accept integral numbers
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _Invalid(f"{where} must be {' or '.join(k.__name__ for k in kinds)}, "
                       f"got {value!r}")


def _validate(doc: object) -> None:
    """Check everything a charge depends on; _Invalid names the first bad place."""
    if not isinstance(doc, dict):
        raise _Invalid("top level must be an object")
    if doc.get("format") != _FORMAT:
        raise _Invalid(f"format must be {_FORMAT!r}, got {doc.get('format')!r}")
    if doc.get("version") != _VERSION:
        raise _Invalid(f"version must be {_VERSION}, got {doc.get('version')!r} "
                       f"(written by another lorad?)")
    if set(doc) != {"format", "version", "next_run_id", "adapters"}:
        raise _Invalid(f"top-level keys must be format, version, next_run_id, adapters; "
                       f"got {sorted(doc)}")
    _expect("next_run_id", doc["next_run_id"], int)
    _expect("adapters", doc["adapters"], dict)
    seen: set[int] = set()
    for name, entry in doc["adapters"].items():
        where = f"adapters[{name!r}]"
        if not is_adapter_name(name):
            raise _Invalid(f"{where}: not a valid adapter name")
        _expect(where, entry, dict)
        if set(entry) != set(_ADAPTER_KEYS):
            raise _Invalid(f"{where} keys must be {sorted(_ADAPTER_KEYS)}, got {sorted(entry)}")
        for key, kind in _ADAPTER_KEYS.items():
            _expect(f"{where}.{key}", entry[key], kind)
        _check_common(where, entry)
        for i, run in enumerate(entry["runs"]):
            _validate_run(f"{where}.runs[{i}]", run, doc["next_run_id"], seen)
            if run["delta"] < entry["delta"]:
                # ε of all runs is composed at the entry's δ; a larger one would under-count.
                raise _Invalid(f"{where}.runs[{i}].delta {run['delta']!r} is below the adapter's "
                               f"delta {entry['delta']!r}, which must be the smallest δ of its runs")


def _check_common(where: str, rec: dict[str, Any]) -> None:
    if rec["accountant"] not in ACCOUNTANTS:
        raise _Invalid(f"{where}.accountant must be one of {list(ACCOUNTANTS)}, "
                       f"got {rec['accountant']!r}")
    if not 0 < rec["delta"] < 1:
        raise _Invalid(f"{where}.delta must be in (0, 1), got {rec['delta']!r}")
    if not (math.isfinite(rec["budget_epsilon"]) and rec["budget_epsilon"] > 0):
        raise _Invalid(f"{where}.budget_epsilon must be > 0, got {rec['budget_epsilon']!r}")


def _validate_run(where: str, run: object, next_run_id: int, seen: set[int]) -> None:
    _expect(where, run, dict)
    assert isinstance(run, dict)
    optional = set(_OPTIONAL_RUN_KEYS) | {_MECHANISMS}
    if set(run) - optional != set(_RUN_KEYS):
        raise _Invalid(f"{where} keys must be {sorted(_RUN_KEYS)} (and optionally {sorted(optional)}), "
                       f"got {sorted(run)}")
    for key, kind in _OPTIONAL_RUN_KEYS.items():
        if key in run:
            _expect(f"{where}.{key}", run[key], kind)
    mechanisms = run.get(_MECHANISMS, [])
    _expect(f"{where}.{_MECHANISMS}", mechanisms, list)
    for j, m in enumerate(mechanisms):
        if not (isinstance(m, dict) and set(m) in ({"what", "sigma"}, {"what", "epsilon"})
                and isinstance(m["what"], str)):
            raise _Invalid(f"{where}.{_MECHANISMS}[{j}] must be an object with keys what and sigma or epsilon")
        _expect(f"{where}.{_MECHANISMS}[{j}].{set(m).difference({'what'}).pop()}", m.get("sigma", m.get("epsilon")),
                float)
        try:
            _mechanism_charge(m)
        except ValueError as e:
            raise _Invalid(f"{where}.{_MECHANISMS}[{j}]: {e}") from None
    for key, kind in _RUN_KEYS.items():
        _expect(f"{where}.{key}", run[key], kind)
    _check_common(where, run)
    try:
        RunCharge(q=run["q"], sigma=run["sigma"], steps=run["steps_charged"])
    except ValueError as e:
        raise _Invalid(f"{where}: {e}") from None
    if not (math.isfinite(run["clip_norm"]) and run["clip_norm"] > 0):
        raise _Invalid(f"{where}.clip_norm must be > 0, got {run['clip_norm']!r}")
    if not 1 <= run["run_id"] < next_run_id or run["run_id"] in seen:
        raise _Invalid(f"{where}.run_id {run['run_id']} is duplicated or >= next_run_id")
    seen.add(run["run_id"])
    if run["examples"] < 0 or not 0 <= run["steps_done"] <= run["planned_steps"]:
        raise _Invalid(f"{where}: examples must be >= 0 and 0 <= steps_done <= planned_steps")
    status = run["status"]
    if status == "running":
        # The write-ahead charge: a run not ended is charged in full.
        if run["steps_charged"] != run["planned_steps"] or run["ended_at"] is not None:
            raise _Invalid(f"{where}: a running run must be charged planned_steps and not ended")
    elif status in END_STATUSES:
        if run["steps_charged"] != run["steps_done"] or run["ended_at"] is None:
            raise _Invalid(f"{where}: an ended run must be charged steps_done and have ended_at")
    elif status == QUERY_STATUS:
        if run["planned_steps"] != 0 or run["steps_charged"] != 0 or not mechanisms or run["ended_at"] is None:
            raise _Invalid(f"{where}: a query record trains nothing (0 steps) and charges its mechanisms")
    else:
        raise _Invalid(f"{where}.status must be running, {QUERY_STATUS} or one of {list(END_STATUSES)}, "
                       f"got {status!r}")
