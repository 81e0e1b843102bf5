"""Staged, health-gated rollouts as a pure state machine: plan and state in, decisions out.

A rollout sends one signed adapter version to a growing audience, stage by stage
(``5%,25%,100%`` of the fleet, an exponential ramp ``1%x2``, named groups, a few named
canary devices). A stage's audience is cumulative: it includes every earlier stage's
devices. What is signed for a stage (:func:`stage_audience`) lets each device decide its
own membership: groups, named canaries, and for percentages a range of hash buckets of
the device id salted by the rollout's name (:mod:`lorad.ota.audience`); its size does not
grow with the fleet. The same rollout always picks the same devices, later stages only add
to earlier ones, and the bucket bound of a share is chosen so that at least that share of
the devices known when the rollout was created (``population``) is in it.

:func:`decide` looks at what every device reports (:func:`observe` turns a device
status into healthy / failed / pending; :func:`classify` adds ``timed_out`` for a device
still pending ``device_timeout_s`` after its stage started) and says what to do next:

- :class:`Deploy` a stage (sign the target for its audience and push it);
- advance once at least ``success_threshold`` of the stage's counted devices are healthy
  (timed-out devices are left out, or count as failed: ``on_timeout``) and ``min_wait_s``
  has passed since the stage started;
- once failed devices reach ``abort_threshold`` of those counted so far (or, with
  ``min_executed``, of those that reported a result, once that many have), stop:
  :class:`RollBack` withdraws the target and sends every device that installed the
  version a signed command back to what it served before.

The caller (``lorad.ota.rollout_cli``) persists the new state, with its decisions marked
pending, *before* acting on them, and clears them (:func:`acted`) after; every decision is
idempotent, so a crash of the fleet tool anywhere in between resumes by acting again.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .audience import BUCKETS, MAX_LISTED_DEVICES, Audience, bucket

__all__ = ["Stage", "RolloutPlan", "RolloutState", "DeviceObs", "Deploy", "RollBack", "Decision",
           "parse_stages", "ramp", "select", "stage_audience", "observe", "classify", "decide", "acted", "counts",
           "with_counts", "only_counts_changed", "summary", "STATUSES", "TIMEOUT_ACTIONS", "DEVICE_STATES"]

#: running: stages advance; paused: no new stage (rollbacks still happen when aborted);
#: aborted: halted at the abort threshold or by the operator; done: every stage healthy.
STATUSES = ("running", "paused", "aborted", "done")
#: what a device silent past ``device_timeout_s`` counts as: left out of the shares, or failed
TIMEOUT_ACTIONS = ("exclude", "fail")
#: what :func:`classify` says of each targeted device
DEVICE_STATES = ("healthy", "failed", "pending", "timed_out")
#: failed devices named in a halt's reason (the rest are counted)
_NAMED = 20


@dataclass(frozen=True)
class Stage:
    """A cumulative share of the fleet (``percent``), a device group, or named devices (a canary)."""

    percent: float | None = None
    group: str | None = None
    devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.percent is not None) + (self.group is not None) + bool(self.devices) != 1:
            raise ValueError("a stage is one of: a percentage, a group, named devices")
        if self.percent is not None and not 0 < self.percent <= 100:
            raise ValueError(f"stage percentage must be in (0, 100], got {self.percent}")
        if len(self.devices) > MAX_LISTED_DEVICES:
            raise ValueError(f"a stage names {len(self.devices)} devices; at most {MAX_LISTED_DEVICES} "
                             "(a canary): use a group or a percentage for more")

    @property
    def label(self) -> str:
        if self.percent is not None:
            return f"{self.percent:g}%"
        if self.group is not None:
            return f"group {self.group}"
        return "devices " + "+".join(self.devices)

    def to_dict(self) -> dict[str, Any]:
        if self.devices:
            return {"devices": list(self.devices)}
        return {"percent": self.percent, "group": self.group}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stage:
        return cls(percent=d.get("percent"), group=d.get("group"), devices=tuple(d.get("devices") or ()))


def ramp(start: float, factor: float) -> tuple[Stage, ...]:
    """An exponential ramp: ``start`` %, times ``factor`` each stage, ending at 100 %."""
    if not 0 < start <= 100:
        raise ValueError(f"ramp start must be in (0, 100] %, got {start:g}")
    if not factor > 1:
        raise ValueError(f"ramp factor must be > 1, got {factor:g}")
    stages, p = [], start
    while p < 100:
        stages.append(Stage(percent=float(f"{p:.6g}")))
        p *= factor
    return (*stages, Stage(percent=100.0))


def _percent(text: str) -> float:
    return float(text.removesuffix("%"))


def parse_stages(spec: str) -> tuple[Stage, ...]:
    """Comma-separated stages, each cumulative: ``5%`` (a share), ``1%x2`` (an exponential
    ramp from 1 %, doubling up to 100 %), ``east`` or ``group:east`` (a group),
    ``devices:kiosk-1+kiosk-2`` (named canaries). Percentages must grow."""
    stages: list[Stage] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise ValueError(f"--stages {spec!r}: empty stage")
        try:
            if "%x" in part:
                start, _, factor = part.partition("%x")
                stages.extend(ramp(_percent(start), float(factor)))
            elif part.endswith("%"):
                stages.append(Stage(percent=_percent(part)))
            elif part.startswith(("devices:", "device:")):
                names = tuple(n for n in part.partition(":")[2].split("+") if n)
                if not names:
                    raise ValueError("no device named")
                stages.append(Stage(devices=names))
            else:
                stages.append(Stage(group=part.removeprefix("group:")))
        except ValueError as e:
            raise ValueError(f"--stages {spec!r}: {part!r}: {e}") from e
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
    #: a device still pending this long after its stage started has timed out (None: never)
    device_timeout_s: float | None = None
    #: what a timed-out device counts as (:data:`TIMEOUT_ACTIONS`)
    on_timeout: str = "exclude"
    #: None: the abort share is of the devices targeted so far; N: of the devices that
    #: reported a result (healthy or failed), and only once at least N have
    min_executed: int | None = None
    #: the population was restricted by name (``--only-device``): audiences list it
    restricted: bool = False
    #: sha256 of the adapter signed (a device reporting another one is not healthy); "" unknown
    adapter_sha256: str = ""

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
        if self.device_timeout_s is not None and not self.device_timeout_s > 0:
            raise ValueError(f"device timeout must be > 0 s, got {self.device_timeout_s}")
        if self.on_timeout not in TIMEOUT_ACTIONS:
            raise ValueError(f"on timeout {self.on_timeout!r}; allowed {TIMEOUT_ACTIONS}")
        if self.min_executed is not None and self.min_executed < 1:
            raise ValueError(f"min executed must be >= 1 device, got {self.min_executed}")
        if self.restricted and len(self.population) > MAX_LISTED_DEVICES:
            raise ValueError(f"{len(self.population)} devices named; at most {MAX_LISTED_DEVICES} are signed by "
                             "name: roll out to a group or a percentage instead")
        for i, s in enumerate(self.stages):
            if s.group is not None and not any(s.group in g for g in self.population.values()):
                raise ValueError(f"stage {i + 1} ({s.label}): no device of the fleet is in that group")
            unknown = sorted(set(s.devices) - set(self.population))
            if unknown:
                raise ValueError(f"stage {i + 1} ({s.label}): no status on the broker from {', '.join(unknown)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = [s.to_dict() for s in self.stages]
        d["population"] = {k: list(v) for k, v in sorted(self.population.items())}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutPlan:
        timeout = d.get("device_timeout_s")
        min_executed = d.get("min_executed")
        return cls(name=str(d["name"]), adapter=str(d["adapter"]), version=int(d["version"]),
                   stages=tuple(Stage.from_dict(s) for s in d["stages"]),
                   population={str(k): tuple(v) for k, v in d["population"].items()},
                   success_threshold=float(d["success_threshold"]), abort_threshold=float(d["abort_threshold"]),
                   min_wait_s=float(d["min_wait_s"]), label=str(d.get("label", "")),
                   device_timeout_s=None if timeout is None else float(timeout),
                   on_timeout=str(d.get("on_timeout", "exclude")),
                   min_executed=None if min_executed is None else int(min_executed),
                   restricted=bool(d.get("restricted", False)), adapter_sha256=str(d.get("adapter_sha256", "")))

    # --- who each stage is for (computed once per plan) ------------------------------

    @functools.cached_property
    def _buckets(self) -> dict[str, int]:
        """Every known device's bucket under the rollout's salt (its name)."""
        return {d: bucket(d, self.name) for d in self.population}

    @functools.cached_property
    def _sorted_buckets(self) -> list[int]:
        return sorted(self._buckets.values())

    def bucket_bound(self, percent: float) -> int:
        """The upper bucket bound of a ``percent`` stage: the fewest buckets that hold at least
        that share of the population (so a small fleet gets exact shares, a large one ~``percent``)."""
        if percent >= 100:
            return BUCKETS
        buckets = self._sorted_buckets
        k = max(1, math.ceil(len(buckets) * percent / 100 - 1e-9))
        return buckets[k - 1] + 1

    @functools.cached_property
    def _selected(self) -> tuple[tuple[str, ...], ...]:
        return tuple(_select(self, i) for i in range(len(self.stages)))

    @functools.cached_property
    def _first_stage(self) -> dict[str, int]:
        first: dict[str, int] = {}
        for i, devices in enumerate(self._selected):
            for d in devices:
                first.setdefault(d, i)
        return first


def _select(plan: RolloutPlan, stage: int) -> tuple[str, ...]:
    audience = _cumulative(plan, stage)
    if audience.everyone:
        return tuple(sorted(plan.population))
    chosen = set(audience.devices) & set(plan.population)
    if audience.groups:
        groups = set(audience.groups)
        chosen.update(d for d, g in plan.population.items() if groups.intersection(g))
    if audience.buckets is not None:
        lo, hi = audience.buckets
        chosen.update(d for d, b in plan._buckets.items() if lo <= b < hi)
    return tuple(sorted(chosen))


def select(plan: RolloutPlan, stage: int) -> tuple[str, ...]:
    """The known devices (``plan.population``) targeted once stage ``stage`` (0-based) runs:
    cumulative, sorted; exactly those for which ``stage_audience(plan, stage).includes`` holds."""
    return plan._selected[stage]


def _cumulative(plan: RolloutPlan, stage: int) -> Audience:
    """Every group and named device of the stages so far, plus the buckets of the largest
    share so far (salted by the rollout's name), or everyone at 100 %."""
    groups: set[str] = set()
    devices: set[str] = set()
    pct = 0.0
    for s in plan.stages[:stage + 1]:
        if s.percent is not None:
            pct = max(pct, s.percent)
        elif s.group is not None:
            groups.add(s.group)
        else:
            devices.update(s.devices)
    if pct >= 100:
        return Audience(everyone=True)
    hi = plan.bucket_bound(pct) if pct > 0 else 0
    return Audience(devices=tuple(sorted(devices)), groups=tuple(sorted(groups)),
                    buckets=(0, hi) if hi else None, salt=plan.name if hi else "")


def stage_audience(plan: RolloutPlan, stage: int) -> Audience:
    """The signed audience of stage ``stage`` (0-based): groups, named canaries and a bucket
    range, so its size does not grow with the fleet. A population restricted by name
    (``--only-device``) is signed as the list of its targeted devices instead."""
    if plan.restricted:
        return Audience(devices=select(plan, stage))
    return _cumulative(plan, stage)


@dataclass(frozen=True)
class DeviceObs:
    """What a device's status says about the rollout's version."""

    state: str  # healthy | failed | pending
    #: local version it served before installing the rollout's version (None: nothing)
    previous_local: int | None = None
    reason: str | None = None


#: what a device may report as an adapter's ``health``: passed, not yet known (anything else: failed)
_HEALTH_OK = ("ok", "healthy", "passed")
_HEALTH_PENDING = ("pending", "checking", "unchecked")


def observe(status: Mapping[str, Any] | None, adapter: str, version: int, *,
            adapter_sha256: str = "") -> DeviceObs:
    """Healthy only when the device reports that it serves exactly the rollout's target: this
    adapter, at this fleet version, health-checked (its ``health``, where it reports one, is
    ``ok``; its ``adapter_sha256``, where it reports one, is the signed ``adapter_sha256``).
    Failed: it refused the version for good (health check, install, policy), or reports it
    unhealthy or other bytes, or an operator sent it back from the version (``held``).
    Pending otherwise (a channel failure is retried)."""
    if status is None:
        return DeviceObs("pending")
    a = (status.get("adapters") or {}).get(adapter) or {}
    last = status.get("last_update") or {}
    if last.get("adapter") == adapter and last.get("version") == version and last.get("result") == "rejected":
        return DeviceObs("failed", None, last.get("reason"))
    if a.get("fleet_version") == version:
        health = a.get("health")
        if health is not None and health is not True and health not in _HEALTH_OK:
            if health in _HEALTH_PENDING:
                return DeviceObs("pending", None, f"health {health}")
            return DeviceObs("failed", None, f"health {health}")
        sha = a.get("adapter_sha256")
        if adapter_sha256 and sha is not None and sha != adapter_sha256:
            return DeviceObs("failed", None, "adapter_mismatch")
        return DeviceObs("healthy", a.get("previous_local"))
    if int((status.get("refused") or {}).get(adapter, 0)) >= version:
        return DeviceObs("failed", None, "refused")
    held = a.get("held")
    if isinstance(held, int) and not isinstance(held, bool) and held >= version:
        return DeviceObs("failed", None, "held")  # an operator sent it back from this version
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
    #: when each stage was deployed (index: stage), for the per-device timeouts
    deployed_at: tuple[float, ...] = ()
    #: the last counts the driver saw (:func:`with_counts`), and when
    counts: Mapping[str, int] = field(default_factory=dict)
    counted_at: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"rollout status {self.status!r}; allowed {STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["history"] = [list(h) for h in self.history]
        d["rolled_back"] = dict(self.rolled_back)
        d["pending"] = [_decision_dict(x) for x in self.pending]
        d["deployed_at"] = list(self.deployed_at)
        d["counts"] = dict(self.counts)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutState:
        return cls(status=str(d["status"]), stage=int(d["stage"]), deployed=int(d["deployed"]),
                   stage_started_at=float(d["stage_started_at"]),
                   rolled_back={str(k): None if v is None else int(v) for k, v in d["rolled_back"].items()},
                   withdrawn=bool(d["withdrawn"]), reason=str(d.get("reason", "")),
                   history=tuple((float(t), str(m)) for t, m in d.get("history", ())),
                   pending=tuple(_decision_from(x) for x in d.get("pending", ())),
                   deployed_at=tuple(float(t) for t in d.get("deployed_at", ())),
                   counts={str(k): int(v) for k, v in (d.get("counts") or {}).items()},
                   counted_at=float(d.get("counted_at", 0.0)))

    def log(self, now: float, message: str, **changes: Any) -> RolloutState:
        return replace(self, history=(*self.history, (now, message)), **changes)


@dataclass(frozen=True)
class Deploy:
    """Sign the rollout's target for ``audience`` (stage ``stage``'s) and push it."""

    stage: int
    audience: Audience


@dataclass(frozen=True)
class RollBack:
    """Withdraw the target (once) and send each device back to ``devices[d]`` (None: remove)."""

    devices: Mapping[str, int | None]
    withdraw: bool


Decision = Deploy | RollBack


def _decision_dict(d: Decision) -> dict[str, Any]:
    if isinstance(d, Deploy):
        return {"deploy": d.stage, "audience": d.audience.to_dict()}
    return {"rollback": dict(d.devices), "withdraw": d.withdraw}


def _decision_from(d: Mapping[str, Any]) -> Decision:
    if "deploy" in d:
        if "audience" in d:
            return Deploy(int(d["deploy"]), Audience.from_dict(d["audience"]))
        # written before audiences: the stage's devices by name
        return Deploy(int(d["deploy"]), Audience(devices=tuple(str(x) for x in d["devices"])))
    return RollBack({str(k): None if v is None else int(v) for k, v in d["rollback"].items()},
                    bool(d["withdraw"]))


def acted(state: RolloutState) -> RolloutState:
    """The state once its pending decisions have been carried out."""
    return replace(state, pending=())


def classify(plan: RolloutPlan, state: RolloutState, obs: Mapping[str, DeviceObs],
             now: float | None = None) -> dict[str, str]:
    """Each device targeted by the running stage -> one of :data:`DEVICE_STATES`: what it
    reports, or ``timed_out`` when still pending ``device_timeout_s`` after the stage that
    first targeted it was deployed (``now`` None: no timeouts)."""
    out: dict[str, str] = {}
    timeout = plan.device_timeout_s
    for d in select(plan, state.stage):
        st = obs.get(d, _PENDING).state
        if st == "pending" and timeout is not None and now is not None:
            first = plan._first_stage[d]
            started = state.deployed_at[first] if first < len(state.deployed_at) else state.stage_started_at
            if now - started >= timeout:
                st = "timed_out"
        out[d] = st
    return out


_PENDING = DeviceObs("pending")


def counts(plan: RolloutPlan, state: RolloutState, obs: Mapping[str, DeviceObs],
           now: float | None = None) -> dict[str, int]:
    """Targeted devices by state, and the two bases the gates use: ``counted`` (targeted,
    less timed-out devices when they are excluded) and ``executed`` (reported a result:
    healthy or failed, timed-out devices too when they count as failed)."""
    c = dict.fromkeys(("targeted", *DEVICE_STATES), 0)
    for st in classify(plan, state, obs, now).values():
        c["targeted"] += 1
        c[st] += 1
    timed_out_failed = c["timed_out"] if plan.on_timeout == "fail" else 0
    c["counted"] = c["targeted"] - (c["timed_out"] if plan.on_timeout == "exclude" else 0)
    c["executed"] = c["healthy"] + c["failed"] + timed_out_failed
    return c


def with_counts(plan: RolloutPlan, state: RolloutState, obs: Mapping[str, DeviceObs], now: float) -> RolloutState:
    """``state`` carrying the counts as of ``now`` (what ``rollout status`` shows without a broker)."""
    return replace(state, counts=counts(plan, state, obs, now), counted_at=now)


def only_counts_changed(old: RolloutState, new: RolloutState) -> bool:
    """Whether ``new`` differs from ``old`` in its counts alone (the driver saves those less often)."""
    return replace(new, counts=old.counts, counted_at=old.counted_at) == old


def decide(plan: RolloutPlan, state: RolloutState, obs: Mapping[str, DeviceObs],
           now: float) -> tuple[RolloutState, list[Decision]]:
    """The next state and what to do to get there: persist the state, act, then persist
    :func:`acted` of it. Decisions still pending (a crash came in between) come first."""
    if state.pending:
        return state, list(state.pending)
    new, decisions = _decide(plan, state, obs, now)
    return (replace(new, pending=tuple(decisions)) if decisions else new), decisions


def _names(devices: list[str]) -> str:
    shown = ", ".join(devices[:_NAMED])
    return shown + (f" and {len(devices) - _NAMED} more" if len(devices) > _NAMED else "")


def _decide(plan: RolloutPlan, state: RolloutState, obs: Mapping[str, DeviceObs],
            now: float) -> tuple[RolloutState, list[Decision]]:
    if state.status == "aborted":
        return _rollback(plan, state, obs)
    if state.status in ("done", "paused"):
        return state, []
    if state.deployed < state.stage:
        audience = stage_audience(plan, state.stage)
        n = len(select(plan, state.stage))
        st = state.log(now, f"stage {state.stage + 1}/{len(plan.stages)} ({plan.stages[state.stage].label}): "
                       f"{n} devices ({audience.describe()})", deployed=state.stage, stage_started_at=now,
                       deployed_at=(*state.deployed_at[:state.stage], now))
        return st, [Deploy(state.stage, audience)]
    c = counts(plan, state, obs, now)
    timed_out_failed = c["timed_out"] if plan.on_timeout == "fail" else 0
    failures = c["failed"] + timed_out_failed
    if plan.min_executed is None:
        base, of = c["counted"], "devices"
        halt = failures > 0 and failures >= plan.abort_threshold * base
    else:
        base, of = c["executed"], "devices that reported"
        halt = base >= plan.min_executed and failures > 0 and failures >= plan.abort_threshold * base
    if halt:
        states = classify(plan, state, obs, now)
        failed = sorted(d for d, s in states.items() if s == "failed" or (s == "timed_out" and timed_out_failed))
        why = (f"abort threshold reached at stage {state.stage + 1}: {failures} of {base} {of} failed "
               f"(threshold {plan.abort_threshold:.0%}" + (f", {timed_out_failed} silent past the device timeout"
                                                         if timed_out_failed else "") + f"): {_names(failed)}")
        st = state.log(now, why, status="aborted", reason=why)
        return _rollback(plan, st, obs)
    if (c["counted"] > 0 and c["healthy"] >= plan.success_threshold * c["counted"]
            and now - state.stage_started_at >= plan.min_wait_s):
        left_out = f", {c['timed_out']} silent past the device timeout left out" if c["counted"] < c["targeted"] else ""
        if state.stage + 1 >= len(plan.stages):
            return state.log(now, f"done: {c['healthy']} of {c['counted']} devices healthy{left_out}",
                             status="done"), []
        nxt = state.log(now, f"stage {state.stage + 1} healthy ({c['healthy']}/{c['counted']}{left_out})",
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


def summary(plan: RolloutPlan, state: RolloutState, obs: Mapping[str, DeviceObs] | None = None,
            now: float | None = None) -> dict[str, Any]:
    """What ``fleet rollout status`` shows: with ``obs``, counts as of ``now``; without, the
    counts the driver last saw (``counted_at``, 0 if never)."""
    out: dict[str, Any] = {"rollout": plan.name, "adapter": plan.adapter, "version": plan.version,
                           "status": state.status, "stage": state.stage + 1, "stages": len(plan.stages),
                           "stage_label": plan.stages[state.stage].label,
                           "audience": stage_audience(plan, state.stage).describe(), "reason": state.reason or None,
                           "rolled_back": len(state.rolled_back), "devices": len(plan.population),
                           "device_timeout_s": plan.device_timeout_s, "on_timeout": plan.on_timeout,
                           "min_executed": plan.min_executed}
    if obs is not None:
        out.update(counts(plan, state, obs, now))
        out["counted_at"] = now
    elif state.counts:
        out.update(state.counts)
        out["counted_at"] = state.counted_at
    out["stage_devices"] = [len(select(plan, i)) for i in range(len(plan.stages))]
    return out
