"""Staged, health-gated rollouts as a pure state machine: plan and state in, decisions out.

A rollout sends one signed adapter version to a growing audience, stage by stage
(``5%,25%,100%`` of the fleet, or named groups). A stage's audience is cumulative: it
includes every earlier stage's devices. Percentages pick devices by a hash of rollout
name and device id, so the same rollout always picks the same devices and later stages
only add to earlier ones.

:func:`decide` looks at what every device reports (:func:`observe` turns a device
status into healthy / failed / pending) and says what to do next:

- :class:`Deploy` a stage (sign the target for its devices and push it);
- advance once at least ``success_threshold`` of the stage's devices are healthy and
  ``min_wait_s`` has passed since the stage started;
- once failed devices reach ``abort_threshold`` of those targeted so far, stop:
  :class:`RollBack` withdraws the target and sends every device that installed the
  version a signed command back to what it served before.

The caller (``lorad.ota.rollout_cli``) persists the new state, with its decisions marked
pending, *before* acting on them, and clears them (:func:`acted`) after; every decision is
idempotent, so a crash of the fleet tool anywhere in between resumes by acting again.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["Stage", "RolloutPlan", "RolloutState", "DeviceObs", "Deploy", "RollBack", "Decision",
           "parse_stages", "select", "observe", "decide", "acted", "counts", "summary", "STATUSES"]

#: running: stages advance; paused: no new stage (rollbacks still happen when aborted);
#: aborted: halted at the abort threshold or by the operator; done: every stage healthy.
STATUSES = ("running", "paused", "aborted", "done")


@dataclass(frozen=True)
class Stage:
    """A cumulative share of the population (``percent``) or a device group."""

    percent: float | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if (self.percent is None) == (self.group is None):
            raise ValueError("a stage is a percentage or a group, not both")
        if self.percent is not None and not 0 < self.percent <= 100:
            raise ValueError(f"stage percentage must be in (0, 100], got {self.percent}")

    @property
    def label(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else f"group {self.group}"


def parse_stages(spec: str) -> tuple[Stage, ...]:
    """``5%,25%,100%`` or ``canary,east,100%``; percentages must grow."""
    stages: list[Stage] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise ValueError(f"--stages {spec!r}: empty stage")
        if part.endswith("%"):
            try:
                stages.append(Stage(percent=float(part[:-1])))
            except ValueError as e:
                raise ValueError(f"--stages {spec!r}: {part!r}: {e}") from e
        else:
            stages.append(Stage(group=part.removeprefix("group:")))
    pct = [s.percent for s in stages if s.percent is not None]
    if pct != sorted(pct) or len(set(pct)) != len(pct):
        raise ValueError(f"--stages {spec!r}: percentages must grow from stage to stage")
    return tuple(stages)


@dataclass(frozen=True)
class RolloutPlan:
    """What is rolled out to whom, and the gates. Thresholds are fractions in (0, 1]."""

    name: str
    adapter: str
    version: int
    stages: tuple[Stage, ...]
    #: device id -> its groups, as the devices reported when the rollout was created
    population: Mapping[str, tuple[str, ...]]
    success_threshold: float = 1.0
    abort_threshold: float = 0.2
    #: seconds a stage runs at least before the next one starts (soak time)
    min_wait_s: float = 0.0
    #: target path label of the rollout's target (``adapters/<adapter>/<label>/...``)
    label: str = ""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a rollout needs at least one stage")
        if not self.population:
            raise ValueError("a rollout needs devices (none has reported a status)")
        if not 0 < self.success_threshold <= 1:
            raise ValueError(f"success threshold must be in (0, 1], got {self.success_threshold}")
        if not 0 < self.abort_threshold <= 1:
            raise ValueError(f"abort threshold must be in (0, 1], got {self.abort_threshold}")
        if self.min_wait_s < 0:
            raise ValueError(f"min wait must be >= 0 s, got {self.min_wait_s}")
        for i, s in enumerate(self.stages):
            if s.group is not None and not any(s.group in g for g in self.population.values()):
                raise ValueError(f"stage {i + 1} ({s.label}): no device of the fleet is in that group")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["population"] = {k: list(v) for k, v in sorted(self.population.items())}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutPlan:
        return cls(name=str(d["name"]), adapter=str(d["adapter"]), version=int(d["version"]),
                   stages=tuple(Stage(percent=s.get("percent"), group=s.get("group")) for s in d["stages"]),
                   population={str(k): tuple(v) for k, v in d["population"].items()},
                   success_threshold=float(d["success_threshold"]), abort_threshold=float(d["abort_threshold"]),
                   min_wait_s=float(d["min_wait_s"]), label=str(d.get("label", "")))


def _rank(rollout: str, device: str) -> str:
    return hashlib.sha256(f"{rollout}\0{device}".encode()).hexdigest()


def select(plan: RolloutPlan, stage: int) -> tuple[str, ...]:
    """The devices targeted once stage ``stage`` (0-based) runs: cumulative, sorted."""
    order = sorted(plan.population, key=lambda d: _rank(plan.name, d))
    chosen: set[str] = set()
    for s in plan.stages[:stage + 1]:
        if s.percent is not None:
            chosen.update(order[:max(1, math.ceil(len(order) * s.percent / 100 - 1e-9))])
        else:
            chosen.update(d for d, g in plan.population.items() if s.group in g)
    return tuple(sorted(chosen))


@dataclass(frozen=True)
class DeviceObs:
    """What a device's status says about the rollout's version."""

    state: str  # healthy | failed | pending
    #: local version it served before installing the rollout's version (None: nothing)
    previous_local: int | None = None
    reason: str | None = None


def observe(status: Mapping[str, Any] | None, adapter: str, version: int) -> DeviceObs:
    """Healthy: serving ``version`` (installed and health-checked); failed: refused it
    (health check, install, policy); pending otherwise (a channel failure is retried)."""
    if status is None:
        return DeviceObs("pending")
    a = (status.get("adapters") or {}).get(adapter) or {}
    if a.get("fleet_version") == version:
        return DeviceObs("healthy", a.get("previous_local"))
    last = status.get("last_update") or {}
    if last.get("adapter") == adapter and last.get("version") == version and last.get("result") == "rejected":
        return DeviceObs("failed", None, last.get("reason"))
    if int((status.get("refused") or {}).get(adapter, 0)) >= version:
        return DeviceObs("failed", None, "refused")
    return DeviceObs("pending")


@dataclass(frozen=True)
class RolloutState:
    status: str = "running"
    #: index of the running stage
    stage: int = 0
    #: highest stage whose target was deployed (-1: none yet)
    deployed: int = -1
    stage_started_at: float = 0.0
    #: devices sent a rollback, -> what they were told to serve (None: removed)
    rolled_back: Mapping[str, int | None] = field(default_factory=dict)
    #: whether the target was withdrawn after an abort
    withdrawn: bool = False
    reason: str = ""
    #: (time, message) of every transition
    history: tuple[tuple[float, str], ...] = ()
    #: decisions written with this state but not yet confirmed done (:func:`acted`): a
    #: crash between writing the state and acting leaves them here, to be acted on again
    pending: tuple[Decision, ...] = ()

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"rollout status {self.status!r}; allowed {STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["history"] = [list(h) for h in self.history]
        d["rolled_back"] = dict(self.rolled_back)
        d["pending"] = [_decision_dict(x) for x in self.pending]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutState:
        return cls(status=str(d["status"]), stage=int(d["stage"]), deployed=int(d["deployed"]),
                   stage_started_at=float(d["stage_started_at"]),
                   rolled_back={str(k): None if v is None else int(v) for k, v in d["rolled_back"].items()},
                   withdrawn=bool(d["withdrawn"]), reason=str(d.get("reason", "")),
                   history=tuple((float(t), str(m)) for t, m in d.get("history", ())),
                   pending=tuple(_decision_from(x) for x in d.get("pending", ())))

    def log(self, now: float, message: str, **changes: Any) -> RolloutState:
        return replace(self, history=(*self.history, (now, message)), **changes)


@dataclass(frozen=True)
class Deploy:
    stage: int
    devices: tuple[str, ...]


@dataclass(frozen=True)
class RollBack:
    """Withdraw the target (once) and send each device back to ``devices[d]`` (None: remove)."""

    devices: Mapping[str, int | None]
    withdraw: bool


Decision = Deploy | RollBack


def _decision_dict(d: Decision) -> dict[str, Any]:
    if isinstance(d, Deploy):
        return {"deploy": d.stage, "devices": list(d.devices)}
    return {"rollback": dict(d.devices), "withdraw": d.withdraw}


def _decision_from(d: Mapping[str, Any]) -> Decision:
    if "deploy" in d:
        return Deploy(int(d["deploy"]), tuple(str(x) for x in d["devices"]))
    return RollBack({str(k): None if v is None else int(v) for k, v in d["rollback"].items()},
                    bool(d["withdraw"]))


def acted(state: RolloutState) -> RolloutState:
    """The state once its pending decisions have been carried out."""
    return replace(state, pending=())


def counts(plan: RolloutPlan, state: RolloutState, obs: Mapping[str, DeviceObs]) -> dict[str, int]:
    targeted = select(plan, state.stage)
    c = {"targeted": len(targeted), "healthy": 0, "failed": 0, "pending": 0}
    for d in targeted:
        c[obs.get(d, DeviceObs("pending")).state] += 1
    return c


def decide(plan: RolloutPlan, state: RolloutState, obs: Mapping[str, DeviceObs],
           now: float) -> tuple[RolloutState, list[Decision]]:
    """The next state and what to do to get there: persist the state, act, then persist
    :func:`acted` of it. Decisions still pending (a crash came in between) come first."""
    if state.pending:
        return state, list(state.pending)
    new, decisions = _decide(plan, state, obs, now)
    return (replace(new, pending=tuple(decisions)) if decisions else new), decisions


def _decide(plan: RolloutPlan, state: RolloutState, obs: Mapping[str, DeviceObs],
            now: float) -> tuple[RolloutState, list[Decision]]:
    if state.status == "aborted":
        return _rollback(plan, state, obs)
    if state.status in ("done", "paused"):
        return state, []
    if state.deployed < state.stage:
        devices = select(plan, state.stage)
        st = state.log(now, f"stage {state.stage + 1}/{len(plan.stages)} ({plan.stages[state.stage].label}): "
                       f"{len(devices)} devices", deployed=state.stage, stage_started_at=now)
        return st, [Deploy(state.stage, devices)]
    c = counts(plan, state, obs)
    if c["failed"] and c["failed"] >= plan.abort_threshold * c["targeted"]:
        failed = sorted(d for d in select(plan, state.stage) if obs.get(d, DeviceObs("pending")).state == "failed")
        why = (f"abort threshold reached at stage {state.stage + 1}: {c['failed']} of {c['targeted']} devices "
               f"failed (threshold {plan.abort_threshold:.0%}): {', '.join(failed)}")
        st = state.log(now, why, status="aborted", reason=why)
        return _rollback(plan, st, obs)
    if c["healthy"] >= plan.success_threshold * c["targeted"] and now - state.stage_started_at >= plan.min_wait_s:
        if state.stage + 1 >= len(plan.stages):
            return state.log(now, f"done: {c['healthy']} of {c['targeted']} devices healthy", status="done"), []
        nxt = state.log(now, f"stage {state.stage + 1} healthy ({c['healthy']}/{c['targeted']})",
                        stage=state.stage + 1)
        return _decide(plan, nxt, obs, now)
    return state, []


def _rollback(plan: RolloutPlan, state: RolloutState,
              obs: Mapping[str, DeviceObs]) -> tuple[RolloutState, list[Decision]]:
    # every device that reports the version installed, and was not yet sent back
    todo = {d: o.previous_local for d, o in sorted(obs.items())
            if o.state == "healthy" and d not in state.rolled_back and d in plan.population}
    if not todo and state.withdrawn:
        return state, []
    st = replace(state, withdrawn=True, rolled_back={**state.rolled_back, **todo})
    return st, [RollBack(todo, withdraw=not state.withdrawn)]


def summary(plan: RolloutPlan, state: RolloutState, obs: Mapping[str, DeviceObs] | None = None) -> dict[str, Any]:
    """What ``fleet rollout status`` shows."""
    out: dict[str, Any] = {"rollout": plan.name, "adapter": plan.adapter, "version": plan.version,
                           "status": state.status, "stage": state.stage + 1, "stages": len(plan.stages),
                           "stage_label": plan.stages[state.stage].label, "reason": state.reason or None,
                           "rolled_back": len(state.rolled_back), "devices": len(plan.population)}
    if obs is not None:
        out.update(counts(plan, state, obs))
    out["stage_devices"] = [len(select(plan, i)) for i in range(len(plan.stages))]
    return out
