"""The rollout state machine, the install window and the privacy policy: pure, no broker."""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

import pytest

from lorad.ota.audience import Audience
from lorad.ota.errors import UpdateRejectedError
from lorad.ota.privacy import PrivacyPolicy, PrivacyRecord
from lorad.ota.rollout import (
    Deploy,
    DeviceObs,
    RollBack,
    RolloutPlan,
    RolloutState,
    acted,
    counts,
    decide,
    observe,
    parse_stages,
    select,
    stage_audience,
)
from lorad.ota.window import InstallWindow

POP = {f"d{i:02d}": ("canary",) if i < 3 else ("main",) for i in range(20)}


def _plan(**kw: object) -> RolloutPlan:
    args: dict[str, object] = dict(name="r1", adapter="a", version=3, stages=parse_stages("10%,50%,100%"),
                                   population=POP, abort_threshold=0.25)
    args.update(kw)
    return RolloutPlan(**args)  # type: ignore[arg-type]


def test_selection_is_deterministic_cumulative_and_depends_on_the_rollout() -> None:
    p = _plan()
    s = [select(p, i) for i in range(3)]
    assert [len(x) for x in s] == [2, 10, 20]
    assert set(s[0]) <= set(s[1]) <= set(s[2]) == set(POP)
    assert s == [select(_plan(), i) for i in range(3)]
    assert select(_plan(name="other"), 1) != s[1]
    g = _plan(stages=parse_stages("canary,100%"))
    assert select(g, 0) == ("d00", "d01", "d02")
    with pytest.raises(ValueError, match="grow"):
        parse_stages("50%,10%")
    with pytest.raises(ValueError, match="no device"):
        _plan(stages=parse_stages("nosuchgroup,100%"))


def test_stages_advance_on_healthy_installs_and_halt_at_the_abort_threshold() -> None:
    p = _plan(min_wait_s=5.0)
    st, [d] = decide(p, RolloutState(), {}, now=0.0)
    assert isinstance(d, Deploy) and d.audience == stage_audience(p, 0) and st.deployed == 0
    # a crash before the deploy was confirmed: the same decision again, from the saved state
    saved = RolloutState.from_dict(st.to_dict())
    assert saved == st and decide(p, saved, {}, now=0.5) == (st, [d])
    st = acted(st)
    healthy = {dev: DeviceObs("healthy", 1) for dev in select(p, 0)}
    assert decide(p, st, healthy, now=1.0) == (st, [])  # healthy, but the soak time is not over
    st, [d] = decide(p, st, healthy, now=6.0)
    assert isinstance(d, Deploy) and st.stage == 1 and d.audience == stage_audience(p, 1) and len(select(p, 1)) == 10
    st = acted(st)
    # stage 2: 3 of 10 failed >= 25 %: halt, withdraw, send back those that installed
    obs = dict(healthy)
    new = [x for x in select(p, 1) if x not in healthy]
    obs.update({x: DeviceObs("failed", reason="health_check_failed") for x in new[:3]})
    obs.update({x: DeviceObs("healthy", None) for x in new[3:5]})
    st, [rb] = decide(p, st, obs, now=7.0)
    assert RolloutState.from_dict(st.to_dict()) == st  # a pending rollback survives a crash
    st = acted(st)
    assert st.status == "aborted" and "3 of 10" in st.reason
    assert isinstance(rb, RollBack) and rb.withdraw
    assert rb.devices == {**{x: 1 for x in healthy}, **{x: None for x in new[3:5]}}
    # a late install is sent back too, once; nothing more after that
    obs[new[5]] = DeviceObs("healthy", 2)
    st, [rb] = decide(p, st, obs, now=8.0)
    assert isinstance(rb, RollBack) and rb.devices == {new[5]: 2} and not rb.withdraw
    st = acted(st)
    assert decide(p, st, obs, now=9.0) == (st, [])
    # and the state survives a round trip through its file format
    assert RolloutState.from_dict(st.to_dict()) == st and RolloutPlan.from_dict(p.to_dict()) == p


def test_last_stage_healthy_is_done_and_pause_stops_everything() -> None:
    p = _plan(stages=parse_stages("100%"), success_threshold=0.9)
    st, _ = decide(p, RolloutState(), {}, now=0.0)
    st = acted(st)
    obs = {d: DeviceObs("healthy") for d in list(POP)[:18]}
    assert decide(p, st, obs, now=1.0)[0].status == "done"
    paused = RolloutState(status="paused", deployed=0)
    assert decide(p, paused, {d: DeviceObs("failed") for d in POP}, now=1.0) == (paused, [])


def _through(p: RolloutPlan, obs: dict[str, DeviceObs], *, until: float, step: float = 1.0) -> RolloutState:
    """Decide and act every ``step`` seconds up to ``until`` (the devices' reports fixed)."""
    st, now = RolloutState(), 0.0
    while now <= until and st.status in ("running",):
        st, _ = decide(p, st, obs, now)
        st = acted(st)
        now += step
    return st


def test_a_silent_device_times_out_and_is_left_out_or_counts_as_failed() -> None:
    """Everyone but one device installs; that one never says anything. Without a timeout the
    rollout waits forever at the default 100 % success share; with one, it is left out
    (the rollout completes) or counts as failed (the rollout halts)."""
    base = _plan(stages=parse_stages("50%,100%"), success_threshold=1.0, abort_threshold=0.05)
    silent = select(base, 0)[0]
    obs = {d: DeviceObs("healthy", 1) for d in POP if d != silent}
    assert _through(base, obs, until=10_000).status == "running"  # stalled for good
    st = _through(_plan(stages=base.stages, device_timeout_s=600.0), obs, until=10_000)
    assert st.status == "done" and "1 silent past the device timeout left out" in st.history[-1][1]
    assert "stage 1 healthy (9/9" in " | ".join(m for _, m in st.history)
    st = _through(_plan(stages=base.stages, device_timeout_s=600.0, on_timeout="fail", abort_threshold=0.05),
                  obs, until=10_000)
    assert st.status == "aborted" and silent in st.reason and "1 silent past the device timeout" in st.reason
    # a device's timeout runs from the stage that first targeted it, not the latest one
    p = _plan(stages=base.stages, device_timeout_s=600.0)
    st, _ = decide(p, RolloutState(), {}, now=0.0)
    st = acted(st)
    assert counts(p, st, {}, now=599.0)["timed_out"] == 0
    c = counts(p, st, {}, now=600.0)
    assert (c["timed_out"], c["counted"], c["executed"]) == (10, 0, 0)
    # nobody healthy at all: never "done" on excluded devices alone
    assert decide(p, st, {}, now=5000.0) == (st, [])


def test_the_error_share_counts_only_once_enough_devices_have_reported() -> None:
    p = _plan(stages=parse_stages("100%"), abort_threshold=0.2, min_executed=5)
    st = acted(decide(p, RolloutState(), {}, now=0.0)[0])
    first = list(POP)
    one_failed = {first[0]: DeviceObs("failed", reason="health_check_failed")}
    # 1 failed of 1 reported: 100 %, but fewer than 5 reported
    assert decide(p, st, one_failed, now=1.0) == (st, [])
    four_ok = {**one_failed, **{d: DeviceObs("healthy", 1) for d in first[1:5]}}
    st2, [rb] = decide(p, st, four_ok, now=2.0)  # 1 of 5 reported = 20 %
    assert st2.status == "aborted" and "1 of 5 devices that reported failed" in st2.reason
    assert isinstance(rb, RollBack)
    # without min_executed the share is of the devices targeted: 1 of 20 is 5 %
    q = _plan(stages=parse_stages("100%"), abort_threshold=0.2)
    st = acted(decide(q, RolloutState(), {}, now=0.0)[0])
    assert decide(q, st, four_ok, now=2.0) == (st, [])


def test_an_exponential_ramp_grows_by_its_factor_up_to_everyone() -> None:
    assert [s.percent for s in parse_stages("1%x2")] == [1, 2, 4, 8, 16, 32, 64, 100]
    assert [s.label for s in parse_stages("canary,0.5%x10")] == ["group canary", "0.5%", "5%", "50%", "100%"]
    for bad, why in (("1%x1", "factor must be > 1"), ("0%x2", "start"), ("5%,1%x2", "grow"),
                     ("devices:", "no device")):
        with pytest.raises(ValueError, match=why):
            parse_stages(bad)
    p = _plan(stages=parse_stages("10%x2"))
    assert [len(select(p, i)) for i in range(len(p.stages))] == [2, 4, 8, 16, 20]
    assert stage_audience(p, 4).everyone and stage_audience(p, 0).buckets is not None


def test_named_canaries_are_signed_by_name_and_kept_small() -> None:
    p = _plan(stages=parse_stages("devices:d05+d07,50%,100%"))
    a = stage_audience(p, 0)
    assert a.devices == ("d05", "d07") and a.buckets is None and select(p, 0) == ("d05", "d07")
    assert {"d05", "d07"} <= set(select(p, 1))
    with pytest.raises(ValueError, match="no status on the broker from nosuch"):
        _plan(stages=parse_stages("devices:d01+nosuch"))
    with pytest.raises(ValueError, match="at most 100"):
        parse_stages("devices:" + "+".join(f"x{i}" for i in range(101)))
    only = _plan(population={d: POP[d] for d in list(POP)[:4]}, restricted=True)
    assert stage_audience(only, 2) == Audience(devices=tuple(sorted(list(POP)[:4])))


def _status(**adapter: object) -> dict[str, object]:
    return {"device_id": "d01", "adapters": {"a": {"version": 4, **adapter}}}


@pytest.mark.parametrize("status, state", [
    (_status(fleet_version=3), "healthy"),
    (_status(fleet_version=3, health="ok"), "healthy"),
    (_status(fleet_version=3, health="failed"), "failed"),
    (_status(fleet_version=3, health="checking"), "pending"),
    (_status(fleet_version=3, adapter_sha256="ab" * 32), "healthy"),
    (_status(fleet_version=3, adapter_sha256="cd" * 32), "failed"),
    (_status(fleet_version=2), "pending"),
    (_status(fleet_version=4), "pending"),
    ({"device_id": "d01", "adapters": {"b": {"version": 1, "fleet_version": 3}}}, "pending"),
    ({**_status(fleet_version=3), "last_update": {"adapter": "a", "version": 3, "result": "rejected",
                                                   "reason": "health_check_failed"}}, "failed"),
    ({**_status(fleet_version=2), "refused": {"a": 3}}, "failed"),
    (_status(fleet_version=None, held=3), "failed"),
    (_status(fleet_version=None, held=2), "pending"),
    (None, "pending"),
])
def test_a_device_is_healthy_only_when_it_reports_the_rollouts_target(status: Any, state: str) -> None:
    """Adapter a, fleet version 3, adapter bytes ab..ab: the adapter, the version and the
    health it reports (and the bytes, where it reports them) must all match."""
    assert observe(status, "a", 3, adapter_sha256="ab" * 32).state == state


def test_install_window_ranges_and_next_opening() -> None:
    w = InstallWindow.parse(["Mon-Fri 22:00-06:00", "Sat,Sun 00:00-24:00"])
    tz = datetime.UTC
    tue_noon = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=tz)
    assert not w.is_open(tue_noon) and w.next_open(tue_noon) == tue_noon.replace(hour=22)
    wed_early = datetime.datetime(2026, 12, 2, 5, 59, tzinfo=tz)
    assert w.is_open(wed_early) and w.next_open(wed_early) == wed_early
    assert w.is_open(datetime.datetime(2026, 12, 5, 12, 0, tzinfo=tz))  # Saturday
    for bad in ("25:00-01:00", "01:00-01:00", "Funday 01:00-02:00", "1-2"):
        with pytest.raises(ValueError, match="install window"):
            InstallWindow.parse(bad)
    # An end of 00:00 is the midnight that closes the day: 23:00-00:00 is the last hour.
    late = InstallWindow.parse("23:00-00:00")
    assert late.is_open(tue_noon.replace(hour=23, minute=59)) and not late.is_open(tue_noon.replace(hour=22, minute=59))
    assert late.next_open(tue_noon) == tue_noon.replace(hour=23)


def test_privacy_policy_names_the_precise_reason() -> None:
    rec = PrivacyRecord(epsilon=8.0, delta=1e-5, accountant="rdp", sample_rate=0.01,
                        noise_multiplier=1.1, steps=100, unit="user")
    PrivacyPolicy(max_epsilon=8.0).check("a", 1, rec)
    with pytest.raises(UpdateRejectedError) as e:
        PrivacyPolicy(max_epsilon=3.0).check("a", 1, rec)
    assert e.value.reason == "privacy_budget" and "epsilon=8" in str(e.value) and "max_epsilon=3" in str(e.value)
    PrivacyPolicy(max_epsilon=3.0).check("a", 1, None)
    with pytest.raises(UpdateRejectedError) as e:
        PrivacyPolicy(require_record=True).check("a", 1, None)
    assert e.value.reason == "privacy_record_missing"
    assert PrivacyRecord.from_dict(rec.to_dict()) == rec
    with pytest.raises(ValueError, match="delta"):
        PrivacyRecord.from_dict({**rec.to_dict(), "delta": 2})


_TRAINED: dict[str, Any] = dict(epsilon=2.9, delta=1e-5, accountant="rdp", sample_rate=0.16, noise_multiplier=1.1, steps=188,
                unit="user")


def test_privacy_record_says_what_a_version_was_trained_on_and_round_trips() -> None:
    rec = PrivacyRecord(**_TRAINED, examples=412.37, example="one submitted text: all its token windows, clipped "
                        "as one", base_fingerprint="sha256:0f1e")
    doc = rec.to_dict()
    assert (doc["examples"], doc["example"], doc["base_fingerprint"]) == (412.37, rec.example, "sha256:0f1e")
    assert PrivacyRecord.from_dict(json.loads(json.dumps(doc))) == rec
    signed = rec.to_signed()
    # Canonical JSON has no floats: real numbers are decimal strings that parse back exactly.
    assert signed["examples"] == "412.37" and signed["epsilon"] == "2.9" and signed["steps"] == 188
    assert not any(isinstance(v, float) for v in signed.values())
    assert (signed["example"], signed["base_fingerprint"]) == (rec.example, "sha256:0f1e")
    assert PrivacyRecord.from_dict(signed) == rec
    # A private count estimate of 0 is a count.
    assert PrivacyRecord.from_dict(PrivacyRecord(**_TRAINED, examples=0.0).to_signed()).examples == 0.0


def test_privacy_record_leaves_out_what_it_does_not_know() -> None:
    rec = PrivacyRecord(**_TRAINED)
    assert set(rec.to_dict()) == {"format", "epsilon", "delta", "accountant", "sample_rate", "noise_multiplier",
                                  "steps", "unit"}
    assert set(rec.to_signed()) == set(rec.to_dict())
    assert (rec.examples, rec.example, rec.base_fingerprint) == (None, None, None)
    # An older record, or one that names the fields without values, reads as not known.
    assert PrivacyRecord.from_dict(rec.to_dict()) == rec
    assert PrivacyRecord.from_dict({**rec.to_dict(), "examples": None, "example": None, "base_fingerprint": None}) == rec
    only = PrivacyRecord(**_TRAINED, base_fingerprint="sha256:aa")
    assert "examples" not in only.to_dict() and "example" not in only.to_signed()
    assert PrivacyRecord.from_dict(only.to_signed()) == only


@pytest.mark.parametrize("changes, words", [
    ({"examples": -1}, "examples -1.0 (must be a finite number >= 0)"),
    ({"examples": "-0.5"}, "examples -0.5"),
    ({"examples": math.inf}, "examples must be a finite number"),
    ({"examples": "inf"}, "examples must be a finite number"),
    ({"examples": "nan"}, "examples must be a finite number"),
    ({"examples": "many"}, "examples must be a finite number, got 'many'"),
    ({"examples": True}, "examples must be a finite number"),
    ({"example": 5}, "example and base_fingerprint must be strings"),
    ({"base_fingerprint": ["sha256:aa"]}, "example and base_fingerprint must be strings"),
])
def test_a_malformed_training_field_is_refused_by_name(changes: dict[str, object], words: str) -> None:
    doc = {**PrivacyRecord(**_TRAINED, examples=10.0, example="one text", base_fingerprint="sha256:aa").to_dict(),
           **changes}
    with pytest.raises(ValueError) as e:
        PrivacyRecord.from_dict(doc)
    assert words in str(e.value)


@pytest.mark.parametrize("examples", [-1.0, math.inf, math.nan])
def test_a_record_with_a_negative_or_non_finite_count_cannot_be_made(examples: float) -> None:
    with pytest.raises(ValueError, match="invalid privacy record: examples"):
        PrivacyRecord(**_TRAINED, examples=examples)
