"""``loractl fleet rollout ...``: the thin MQTT driver around :mod:`lorad.ota.rollout`.

State lives in the fleet repository (``rollouts/<name>.json``: plan and state, replaced
atomically under an exclusive lock, so ``pause`` from another shell is never lost). The
driver loop: read every device's status, :func:`lorad.ota.rollout.decide`, write the new
state, then act (re-sign the rollout's target for a stage's audience and push it; or
withdraw it and send signed rollback commands). Because the state is written before the
actions and every action is idempotent, ``rollout run`` after a crash resumes.

What changes the repository (:func:`start_rollout`, :func:`apply_to_repository`) is apart
from what reaches the broker, so a simulation of the repository (``benchmarks/fleet_metadata.py``)
signs exactly what the driver signs. ``rollout status`` reads as a table, JSON (``--json``)
or Prometheus' text format (``--prometheus``: stage, status and devices by state).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorad.adapters.fsutil import atomic_write_bytes

from . import cli_support
from .errors import TransportError
from .rollout import (
    STATUSES,
    TIMEOUT_ACTIONS,
    Decision,
    Deploy,
    DeviceObs,
    RolloutPlan,
    RolloutState,
    Stage,
    acted,
    decide,
    observe,
    only_counts_changed,
    parse_stages,
    select,
    stage_audience,
    summary,
    with_counts,
)
from .undo import DirUndo

if TYPE_CHECKING:  # imported where used: registering `fleet rollout` must not load numpy, tuf or paho
    from lorad.adapters.lora import LoraAdapter

    from .privacy import PrivacyRecord
    from .repository import FleetRepository
    from .status import FleetView
    from .target import ProbeSet, TargetSpec

__all__ = ["register_rollout", "RolloutStore", "RolloutDriver", "create_rollout", "start_rollout", "apply_to_repository",
           "prometheus_text"]

#: seconds between saves of the counts alone (a stage change or a decision is saved at once)
_COUNTS_EVERY_S = 10.0

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")


class RolloutStore:
    """``<repo>/rollouts/<name>.json`` with an exclusive lock around read-modify-write."""

    def __init__(self, repo_dir: Path, name: str) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"rollout name {name!r} must match {_NAME_RE.pattern}")
        self.dir = Path(repo_dir) / "rollouts"
        self.path = self.dir / f"{name}.json"
        self.name = name

    def exists(self) -> bool:
        return self.path.is_file()

    @staticmethod
    def names(repo_dir: Path) -> list[str]:
        """Every rollout of the repository at ``repo_dir``."""
        d = Path(repo_dir) / "rollouts"
        return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []

    def load(self) -> tuple[RolloutPlan, RolloutState]:
        if not self.exists():
            known = sorted(p.stem for p in self.dir.glob("*.json")) if self.dir.is_dir() else []
            raise LookupError(f"no rollout {self.name!r} in this repository; known: {', '.join(known) or 'none'}")
        try:
            d = json.loads(self.path.read_bytes())
            return RolloutPlan.from_dict(d["plan"]), RolloutState.from_dict(d["state"])
        except (ValueError, KeyError, TypeError) as e:
            raise RuntimeError(f"rollout state {self.path} is unreadable: {e!r}") from e

    def save(self, plan: RolloutPlan, state: RolloutState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, json.dumps({"plan": plan.to_dict(), "state": state.to_dict()},
                                                 indent=1, sort_keys=True).encode())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f".{self.name}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


class RolloutDriver:
    """Runs decisions against the broker: one session, the fleet's live status view."""

    def __init__(self, repo: FleetRepository, store: RolloutStore, session: cli_support.FleetSession, view: FleetView, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.repo = repo
        self.store = store
        self.session = session
        self.view = view
        self.clock = clock

    def observations(self, plan: RolloutPlan) -> dict[str, DeviceObs]:
        """What each device of the plan reports; one whose status cannot be read has failed
        (``status_unreadable``): a device that stops making sense may be what the update broke."""
        st = {d: json.loads(s.encode()) for d, s in self.view.snapshot().items()}
        unreadable = self.view.error_snapshot()
        return {d: DeviceObs("failed", None, "status_unreadable") if d in unreadable
                else observe(st.get(d), plan.adapter, plan.version, adapter_sha256=plan.adapter_sha256)
                for d in plan.population}

    def step(self) -> tuple[RolloutPlan, RolloutState, dict[str, DeviceObs]]:
        """Decide once and act; returns the plan, the state now and what devices report."""
        with self.store.locked():
            plan, state = self.store.load()
            obs = self.observations(plan)
            now = self.clock()
            new, decisions = decide(plan, state, obs, now)
            new = with_counts(plan, new, obs, now)
            # the counts alone are saved now and then (a large fleet's file is large)
            if not only_counts_changed(state, new) or (new.counts != state.counts and
                                                       now - state.counted_at >= _COUNTS_EVERY_S):
                self.store.save(plan, new)
        for d in decisions:
            self._act(plan, d)
        if decisions:
            with self.store.locked():
                plan, latest = self.store.load()
                new = acted(latest)  # an operator's pause meanwhile is kept
                self.store.save(plan, new)
        return plan, new, obs

    def _act(self, plan: RolloutPlan, d: Decision) -> None:
        apply_to_repository(self.repo, plan, d)
        if isinstance(d, Deploy) or d.withdraw:
            self.session.push(self.repo)
        if isinstance(d, Deploy):
            return
        for dev, version in d.devices.items():
            if version is None:
                self.repo.send_command(self.session.transport, dev, "remove", adapter=plan.adapter)
            else:
                self.repo.send_command(self.session.transport, dev, "rollback", adapter=plan.adapter,
                                       version=version)

    def run(self, *, max_s: float, settle_s: float = 2.0) -> dict[str, Any]:
        """Drive until done, aborted (and rolled back), paused, or ``max_s`` passed."""
        deadline = time.monotonic() + max_s
        settle_until: float | None = None
        while True:
            seen = self.view.changes
            plan, state, obs = self.step()
            if state.status in ("done", "paused"):
                break
            targeted = select(plan, state.stage)
            if state.status == "aborted":
                # devices that were installing when the target was withdrawn may still
                # finish: keep sending them back until none is pending or settle_s passed
                settle_until = settle_until or time.monotonic() + settle_s
                if all(obs[d].state != "pending" for d in targeted) or time.monotonic() >= settle_until:
                    break
            if time.monotonic() >= deadline:
                break
            wait = 1.0
            if state.status == "running":
                wait = min(wait, max(0.01, state.stage_started_at + plan.min_wait_s - self.clock()))
            # wait_for returns before the loop moves on, so the lambda sees this iteration's `seen`
            self.view.wait_for(lambda v: v.changes != seen, min(wait, max(0.0, deadline - time.monotonic())))  # noqa: B023
        return summary(plan, state, obs, self.clock())


# --- what a rollout signs (no broker) -------------------------------------------------

def start_rollout(repo: FleetRepository, plan: RolloutPlan, adapter: LoraAdapter, *, probes: ProbeSet | None = None,
                  privacy: PrivacyRecord | None = None, chunk_size: int = 8 * 1024, dtype: str = "fp32",
                  compression: str = "zstd") -> tuple[RolloutPlan, TargetSpec]:
    """Sign ``plan``'s version of its adapter for the first stage's audience, under the
    rollout's label; returns the plan with the signed adapter's digest, and the spec."""
    spec = repo.publish_adapter(plan.adapter, adapter, audience=stage_audience(plan, 0), probes=probes, dtype=dtype,
                                compression=compression, chunk_size=chunk_size, privacy=privacy, label=plan.label)
    if spec.version != plan.version:
        raise RuntimeError(f"signed version {spec.version}, planned {plan.version}")
    return replace(plan, adapter_sha256=spec.adapter_sha256), spec


def apply_to_repository(repo: FleetRepository, plan: RolloutPlan, decision: Decision) -> None:
    """What ``decision`` changes in the repository: the target re-signed for a stage's
    audience, or withdrawn (once) after a halt. Idempotent."""
    if isinstance(decision, Deploy):
        try:
            repo.retarget(plan.label, plan.adapter, decision.audience)
        except LookupError as e:
            later = repo.latest_version(plan.adapter)
            raise RuntimeError(f"rollout {plan.name}: its target ({plan.adapter} v{plan.version}) is no longer "
                               f"signed{f' (v{later} was signed for everyone since)' if later > plan.version else ''}"
                               f"; abort it (`loractl fleet rollout abort REPO {plan.name}`)") from e
    elif decision.withdraw:
        with contextlib.suppress(LookupError):  # withdrawn before a crash: nothing to do
            repo.retarget(plan.label, plan.adapter, None)


# --- commands ------------------------------------------------------------------------

def _fraction(text: str) -> float:
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction in (0, 1] or a percentage like 90%") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction in (0, 1] or a percentage like 90%")
    return v


def _seconds(text: str) -> float | None:
    """Seconds > 0, or ``none`` / ``0`` for no limit."""
    if text.strip().lower() in ("none", "0", "off"):
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds (> 0), or none") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds (> 0), or none")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of devices >= 1") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of devices >= 1")
    return v


def _session_view(args: argparse.Namespace) -> tuple[Any, FleetView]:
    session = cli_support.FleetSession.connect(args)
    try:
        return session, cli_support.fleet_view(session.transport, args.timeout)
    except BaseException:
        session.close()
        raise


def create_rollout(repo: FleetRepository, store: RolloutStore, session: cli_support.FleetSession, view: FleetView, *,
                   adapter_name: str, adapter: LoraAdapter, stages: tuple[Stage, ...],
                   probes: ProbeSet | None = None, privacy: PrivacyRecord | None = None,
                   success_threshold: float = 1.0, abort_threshold: float = 0.2,
                   min_wait_s: float = 0.0, only: Sequence[str] | None = None, chunk_size: int = 8 * 1024,
                   dtype: str = "fp32", compression: str = "zstd", device_timeout_s: float | None = None,
                   on_timeout: str = "exclude", min_executed: int | None = None) -> dict[str, Any]:
    """Plan the rollout over the devices reporting a status, sign its first stage, push it.

    The repository is put back as it was if anything fails before the push."""
    if store.exists():
        raise FileExistsError(f"rollout {store.name!r} already exists (fleet rollout status {repo.dir} {store.name})")
    population = {d: tuple(s.groups) for d, s in view.snapshot().items()}
    seen = population  # recorded (members.json) once the rollout is signed
    unreadable = sorted(d for d in view.error_snapshot() if not only or d in only)
    if only:
        unknown = sorted(set(only) - set(population))
        if unknown:
            raise LookupError(f"unknown devices {unknown}: no status on the broker" +
                              (f" ({', '.join(unreadable)}: status unreadable)" if unreadable else ""))
        population = {d: g for d, g in population.items() if d in only}
    plan = RolloutPlan(name=store.name, adapter=adapter_name, version=repo.latest_version(adapter_name) + 1,
                       stages=stages, population=population, success_threshold=success_threshold,
                       abort_threshold=abort_threshold, min_wait_s=min_wait_s, label=f"r-{store.name}",
                       device_timeout_s=device_timeout_s, on_timeout=on_timeout, min_executed=min_executed,
                       restricted=bool(only))
    now = time.time()
    state = RolloutState().log(now, f"created: {len(population)} devices, stages "
                               f"{','.join(s.label for s in stages)}" +
                               (f"; left out, status unreadable: {', '.join(unreadable)}" if unreadable else ""))
    state, [first] = decide(plan, state, {}, now)
    assert isinstance(first, Deploy)

    undo = DirUndo([repo.dir, *repo.key_dirs], write_once=[repo.dir / "targets", repo.dir / "canonical"])
    try:
        plan, _spec = start_rollout(repo, plan, adapter, probes=probes, privacy=privacy, chunk_size=chunk_size,
                                    dtype=dtype, compression=compression)
        store.save(plan, state)
    except BaseException:
        undo.restore()
        raise
    repo.record_members(seen)
    try:
        session.push(repo)
    except TransportError as e:  # the first stage stays pending: `run` deploys it again
        raise cli_support.CliError(cli_support.EXIT_BROKER, f"rollout created and signed, but sending failed: {e}; "
                                            f"`loractl fleet rollout run {repo.dir} {store.name}` sends it") from e
    state = acted(state)
    store.save(plan, state)
    return summary(plan, state)


def _create(args: argparse.Namespace) -> dict[str, Any]:
    from .privacy import read_privacy_record
    store = RolloutStore(args.repo, args.rollout)
    stages = parse_stages(args.stages)
    if store.exists():
        raise FileExistsError(f"rollout {args.rollout!r} already exists (fleet rollout status {args.repo} {args.rollout})")
    cli_support.check_broker_args(args)
    repo = cli_support.open_repo(args)
    repo.check_signing_keys(("targets", "snapshot", "timestamp"))
    session, view = _session_view(args)
    try:
        adapter, probes = cli_support.load_adapter(args)
        privacy = read_privacy_record(args.adapter, args.privacy_record)
        return create_rollout(repo, store, session, view, adapter_name=args.name, adapter=adapter,
                              stages=stages, probes=probes, privacy=privacy,
                              success_threshold=args.success_threshold, abort_threshold=args.abort_threshold,
                              min_wait_s=args.min_wait, only=args.only_device, chunk_size=args.chunk_size,
                              dtype="fp16" if args.fp16 else "fp32", compression=args.compress,
                              device_timeout_s=args.device_timeout, on_timeout=args.on_timeout,
                              min_executed=args.min_executed)
    finally:
        session.close()


def _run(args: argparse.Namespace) -> dict[str, Any]:
    store = RolloutStore(args.repo, args.rollout)
    store.load()
    if args.max_time <= 0:
        raise ValueError(f"--max-time must be > 0 seconds, got {args.max_time:g}")
    cli_support.check_broker_args(args)
    repo = cli_support.open_repo(args)
    repo.check_signing_keys(("targets", "snapshot", "timestamp", "command"))
    session, view = _session_view(args)
    try:
        out = RolloutDriver(repo, store, session, view).run(max_s=args.max_time, settle_s=args.settle)
    finally:
        session.close()
    if out["status"] == "aborted":
        raise cli_support.CliError(cli_support.EXIT_HALTED, f"rollout {args.rollout} halted: {out['reason']}; "
                                            f"{out['rolled_back']} devices sent back", data={"rollout": out})
    if out["status"] == "paused":
        raise cli_support.CliError(cli_support.EXIT_NOT_DONE, f"rollout {args.rollout} is paused at stage "
                                   f"{out['stage']}/{out['stages']}: `loractl fleet rollout resume {args.repo} "
                                   f"{args.rollout}`, then run it again", data={"rollout": out})
    if out["status"] == "running":
        raise cli_support.CliError(cli_support.EXIT_NOT_DONE, f"rollout {args.rollout} is still running at stage "
                                   f"{out['stage']}/{out['stages']} ({out.get('healthy', 0)} of "
                                   f"{out.get('counted', 0)} devices healthy) after --max-time {args.max_time:g} s: "
                                   "run it again to go on", data={"rollout": out})
    return out


def _status_one(args: argparse.Namespace, store: RolloutStore, live: tuple[Any, FleetView] | None) -> dict[str, Any]:
    plan, state = store.load()
    if live is None:
        out = summary(plan, state)
    else:
        obs = RolloutDriver(cli_support.open_repo(args), store, live[0], live[1]).observations(plan)
        out = summary(plan, state, obs, time.time())
    out["history"] = [f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))} {m}" for t, m in state.history]
    return out


def _status(args: argparse.Namespace) -> dict[str, Any] | str:
    if args.prometheus and getattr(args, "json", False):
        raise ValueError("--prometheus and --json: choose one output format")
    names = [args.rollout] if args.rollout else RolloutStore.names(args.repo)
    stores = [RolloutStore(args.repo, n) for n in names]
    for s in stores:
        s.load()  # an unknown name is refused before the broker is reached
    live = None
    if args.broker:
        live = _session_view(args)
    try:
        outs = [_status_one(args, s, live) for s in stores]
    finally:
        if live is not None:
            live[0].close()
    if args.prometheus:
        return prometheus_text(outs)
    return outs[0] if args.rollout else {"rollouts": outs}


def prometheus_text(summaries: Sequence[Mapping[str, Any]]) -> str:
    """Rollout summaries in Prometheus' text format (for node_exporter's textfile collector)."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    labels = ("rollout", "adapter", "version")
    stage = Gauge("lorad_rollout_stage", "Running stage of the rollout (1-based)", labels, registry=registry)
    stages = Gauge("lorad_rollout_stages", "Stages the rollout has", labels, registry=registry)
    status = Gauge("lorad_rollout_status", "1 for the rollout's status, 0 for the others",
                   (*labels, "status"), registry=registry)
    population = Gauge("lorad_rollout_population_devices", "Devices that reported a status when the rollout "
                       "was created", labels, registry=registry)
    targeted = Gauge("lorad_rollout_targeted_devices", "Known devices targeted by the running stage",
                     labels, registry=registry)
    devices = Gauge("lorad_rollout_devices", "Targeted devices by state (healthy, failed, pending, timed_out)",
                    (*labels, "state"), registry=registry)
    rolled_back = Gauge("lorad_rollout_rolled_back_devices", "Devices sent back after a halt", labels,
                        registry=registry)
    counted = Gauge("lorad_rollout_counted_timestamp_seconds", "When the counts were taken (0: never)", labels,
                    registry=registry)
    for s in summaries:
        key = (str(s["rollout"]), str(s["adapter"]), str(s["version"]))
        stage.labels(*key).set(s["stage"])
        stages.labels(*key).set(s["stages"])
        for st in STATUSES:
            status.labels(*key, st).set(1 if s["status"] == st else 0)
        population.labels(*key).set(s["devices"])
        rolled_back.labels(*key).set(s["rolled_back"])
        counted.labels(*key).set(s.get("counted_at") or 0)
        if "targeted" in s:
            targeted.labels(*key).set(s["targeted"])
            for st in ("healthy", "failed", "pending", "timed_out"):
                devices.labels(*key, st).set(s.get(st, 0))
    return generate_latest(registry).decode()


def _set_status(to: str, allowed: tuple[str, ...], why: str) -> Callable[[argparse.Namespace], dict[str, Any]]:
    def fn(args: argparse.Namespace) -> dict[str, Any]:
        store = RolloutStore(args.repo, args.rollout)
        with store.locked():
            plan, state = store.load()
            if state.status not in allowed:
                raise RuntimeError(f"rollout {args.rollout} is {state.status}; {why} needs it "
                                   f"{' or '.join(allowed)}")
            extra = {"reason": "aborted by the operator"} if to == "aborted" else {}
            state = state.log(time.time(), f"{why} by the operator", status=to, **extra)
            if to == "running":  # a resumed stage waits its minimum time again
                state = state.log(time.time(), "resumed", stage_started_at=time.time())
            store.save(plan, state)
        out = summary(plan, state)
        if to == "aborted":
            out["next"] = f"loractl fleet rollout run {args.repo} {args.rollout} rolls the installed devices back"
        return out
    return fn


def _summary_table(d: dict[str, Any]) -> str:
    if "rollouts" in d:
        listed = [(r["rollout"], r["adapter"], r["version"], r["status"], f"{r['stage']}/{r['stages']}",
                   r["stage_label"], r.get("healthy"), r.get("failed"), r.get("pending"), r.get("timed_out"))
                  for r in d["rollouts"]]
        return cli_support.table(("rollout", "adapter", "version", "status", "stage", "label", "healthy",
                                  "failed", "pending", "timed out"), listed)
    rows = [(k, v) for k, v in d.items() if k != "history"]
    text = cli_support.table(("field", "value"), rows)
    if d.get("history"):
        text += "\n\nhistory:\n" + "\n".join(f"  {h}" for h in d["history"])
    return text


def register_rollout(fs: Any, leaf: Callable[..., argparse.ArgumentParser],
                     broker_args: Callable[[argparse.ArgumentParser], None]) -> None:
    rp = fs.add_parser("rollout", help="staged, health-gated rollouts",
                       description="staged, health-gated rollouts (state in REPO_DIR/rollouts/)")
    rs = rp.add_subparsers(dest="rollout_command", required=True, metavar="ROLLOUT_COMMAND")

    def named(p: argparse.ArgumentParser, nargs: str | None = None) -> argparse.ArgumentParser:
        p.add_argument("rollout", metavar="NAME", help="rollout name", nargs=nargs)
        return p

    p = named(leaf("create", _create, "sign an adapter for a rollout's first stage and push it",
                   broker=True, parent=rs, fmt=_summary_table, signs=False))
    cli_support.add_adapter_args(p)
    p.add_argument("--stages", required=True,
                   help="cumulative stages: 5%%,25%%,100%%; an exponential ramp 1%%x2 (1, 2, 4 ... 64, 100 %%); "
                        "groups (canary,east,100%%); named canaries devices:kiosk-1+kiosk-2 (at most 100)")
    p.add_argument("--success-threshold", type=_fraction, default=1.0,
                   help="share of a stage's devices that must report a healthy install to go on (default 100%%)")
    p.add_argument("--abort-threshold", type=_fraction, default=0.2,
                   help="share of targeted devices failing that halts and rolls back (default 20%%)")
    p.add_argument("--min-executed", type=_count, metavar="N",
                   help="the abort share is of the devices that reported a result (healthy or failed), and counts "
                        "only once N have (default: of every device targeted so far)")
    p.add_argument("--device-timeout", type=_seconds, default=3600.0, metavar="SECONDS",
                   help="a device still pending this long after its stage started has timed out (default 3600; "
                        "none: wait forever)")
    p.add_argument("--on-timeout", choices=TIMEOUT_ACTIONS, default="exclude",
                   help="a timed-out device is left out of the shares (exclude, the default) or counts as failed")
    p.add_argument("--min-wait", type=float, default=0.0, metavar="SECONDS", help="soak time per stage")
    p.add_argument("--only-device", action="append", help="restrict the population (repeatable, at most 100)")

    p = named(leaf("run", _run, "drive a rollout: advance stages, halt and roll back at the abort threshold "
                   "(exit 0 done, 4 halted, 5 paused or still running at --max-time)",
                   broker=True, parent=rs, fmt=_summary_table, signs=False))
    p.add_argument("--max-time", type=float, default=3600.0, metavar="SECONDS", help="stop driving after this long")
    p.add_argument("--settle", type=float, default=2.0, metavar="SECONDS",
                   help="after a halt, how long to watch for late installs to send back")

    p = named(leaf("status", _status, "a rollout's stage, counts and history (live counts with --broker; every "
                   "rollout without NAME)", broker=True, parent=rs, fmt=_summary_table, signs=False), nargs="?")
    p.add_argument("--prometheus", action="store_true",
                   help="print Prometheus' text format (stage, status, devices by state) instead of a table")
    for name, to, allowed in (("pause", "paused", ("running",)), ("resume", "running", ("paused",)),
                              ("abort", "aborted", ("running", "paused"))):
        named(leaf(name, _set_status(to, allowed, name), f"{name} a rollout", parent=rs, fmt=_summary_table))
