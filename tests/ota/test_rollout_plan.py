"""The rollout state machine, the install window and the privacy policy: pure, no broker."""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

import pytest

from lorad.ota.errors import UpdateRejectedError
from lorad.ota.privacy import PrivacyPolicy, PrivacyRecord
from lorad.ota.rollout import Deploy, DeviceObs, RollBack, RolloutPlan, RolloutState, acted, decide, parse_stages, select
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
    assert isinstance(d, Deploy) and d.devices == select(p, 0) and st.deployed == 0
    # a crash before the deploy was confirmed: the same decision again, from the saved state
    saved = RolloutState.from_dict(st.to_dict())
    assert saved == st and decide(p, saved, {}, now=0.5) == (st, [d])
    st = acted(st)
    healthy = {dev: DeviceObs("healthy", 1) for dev in select(p, 0)}
    assert decide(p, st, healthy, now=1.0) == (st, [])  # healthy, but the soak time is not over
    st, [d] = decide(p, st, healthy, now=6.0)
    assert isinstance(d, Deploy) and st.stage == 1 and len(d.devices) == 10
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
