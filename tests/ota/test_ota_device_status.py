"""A device's status tells the truth after every command and every cycle: the real
AdapterService on the demo model, the real Mosquitto carrying the repository and the
statuses (``mqtt`` is the conftest fixture; annotations are not evaluated).

- After a signed rollback (a halted rollout's undo) the device reports the local version it
  serves and the fleet version that is, and its next cycle is ``up_to_date``, not
  ``skipped older_version``; after ``remove`` it reports nothing served and the version it
  was turned away from is not installed again; a newer one is.
- A first cycle before the fleet published anything is ``idle``; once a repository was
  seen, a broker that lost it is a failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.mosquitto import Broker
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService
from lorad.daemon.demo import DEMO_RANK, DEMO_TARGETS, demo_model_path
from lorad.ota.client import ClientConfig, OtaClient
from lorad.ota.repository import FleetRepository
from lorad.ota.status import FleetView, will_for
from lorad.ota.target import Audience
from tests.ota.demo_kit import demo_adapter, demo_probes
from tests.ota.simulator import FleetSim

EAST = Audience(groups=("east",))


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    return InferenceEngine(demo_model_path(), targets=DEMO_TARGETS, rank=DEMO_RANK)


def _client(mqtt: Broker, tmp_path: Path, root: bytes, service: AdapterService, **limits: Any) -> OtaClient:
    cfg = ClientConfig(device_id="dev1", groups=("east",), state_dir=tmp_path / "dev1", trusted_root=root,
                       base_fingerprint=service.engine.fingerprint, **limits)
    return OtaClient(cfg, mqtt.connect("dev1", will=will_for("dev1")), service)


def _adapters(view: FleetView, want: dict[str, Any]) -> bool:
    """dev1's status names exactly the adapters of ``want``, with (at least) those fields."""
    st = view.status.get("dev1")
    return st is not None and set(st.adapters) == set(want) and all(
        {k: st.adapters[n].get(k) for k in fields} == fields for n, fields in want.items())


def test_status_after_a_signed_rollback_and_remove_is_what_the_service_serves(
        mqtt: Broker, tmp_path: Path, engine: InferenceEngine) -> None:
    fleet_t = mqtt.connect("fleet")
    fleet = FleetSim.create(tmp_path / "fleet", fleet_t)
    view = FleetView(mqtt.connect("fleet"))
    service = AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=8 << 20)
    client = _client(mqtt, tmp_path, fleet.repo.root_bytes(1), service)
    ex = client.attach_commands(service)

    a1, a2, a3 = (demo_adapter(engine, s) for s in (1, 2, 3))
    fleet.repo.publish_adapter("digits", a1, audience=EAST, probes=demo_probes(engine, a1))
    fleet.push()
    assert [(r.result, r.version) for r in client.update()] == [("installed", 1)]
    # a staged rollout's target (its own label) carries v2 to the same device
    fleet.repo.publish_adapter("digits", a2, audience=EAST, probes=demo_probes(engine, a2), label="spring")
    fleet.push()
    assert [(r.result, r.version) for r in client.update()] == [("installed", 2)]
    assert view.wait_for(lambda v: _adapters(v, {"digits": {"version": 2, "fleet_version": 2, "previous_local": 1}}),
                         10)

    # the rollout halts: its target is withdrawn and the device is sent back to local version 1
    fleet.repo.retarget("spring", "digits", None)
    fleet.push()
    done = ex.handle(fleet.repo.command("dev1", "rollback", adapter="digits", version=1))
    assert done["result"] == "done", done
    assert service.info("digits").version == 1
    # the status says what is served, and which fleet version that is
    assert view.wait_for(lambda v: _adapters(v, {"digits": {"version": 1, "fleet_version": 1}}), 10), \
        view.status.get("dev1")
    assert dict(view.status["dev1"].adapters["digits"]) == {"version": 1, "fleet_version": 1, "held": 2,
                                                            "pinned": False}
    # the next cycle finds v1 signed, which is what the device serves: nothing to do
    [r] = client.update()
    assert (r.result, r.reason, r.version) == ("up_to_date", None, 1), r
    assert "digits serves local version 1 (fleet version 1)" in done["message"], done

    # pin: the status says so
    assert ex.handle(fleet.repo.command("dev1", "pin", adapter="digits"))["result"] == "done"
    assert view.wait_for(lambda v: _adapters(v, {"digits": {"version": 1, "fleet_version": 1, "pinned": True}}), 10)

    # a newer version is the fleet's again
    fleet.repo.publish_adapter("digits", a3, audience=EAST, probes=demo_probes(engine, a3))
    fleet.push()
    [r] = client.update()
    assert (r.result, r.version) == ("installed", 3), r

    # remove: nothing served, nothing claimed, and v3 (still signed) is not installed again
    done = ex.handle(fleet.repo.command("dev1", "remove", adapter="digits"))
    assert done["result"] == "done" and "digits is not served" in done["message"], done
    assert view.wait_for(lambda v: _adapters(v, {}), 10), view.status.get("dev1")
    [r] = client.update()
    assert (r.result, r.version) == ("up_to_date", 3), r
    assert "held by the operator's choice" in r.message
    assert [i.name for i in service.list_adapters()] == []
    assert client.device_status().adapters == {}


def test_a_rollback_to_a_version_the_fleet_did_not_send_is_reported_as_such(
        mqtt: Broker, tmp_path: Path, engine: InferenceEngine) -> None:
    """A hand-uploaded version, then OTA's: rolled back to the upload, the device reports
    that local version with no fleet version, and does not take the fleet's v1 again."""
    fleet = FleetSim.create(tmp_path / "fleet", mqtt.connect("fleet"))
    service = AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=8 << 20)
    hand = service.install("digits", demo_adapter(engine, 5), meta={"source": "upload"})
    client = _client(mqtt, tmp_path, fleet.repo.root_bytes(1), service)
    ex = client.attach_commands(service)
    a1 = demo_adapter(engine, 1)
    fleet.repo.publish_adapter("digits", a1, audience=EAST, probes=demo_probes(engine, a1))
    fleet.push()
    [r] = client.update()
    assert r.result == "installed"
    assert client.device_status().adapters["digits"]["previous_local"] == hand.version
    done = ex.handle(fleet.repo.command("dev1", "rollback", adapter="digits", version=hand.version))
    served = client.device_status().adapters["digits"]
    assert (served["version"], served["fleet_version"]) == (hand.version, None), served
    assert dict(served) == {"version": hand.version, "fleet_version": None, "held": 1, "pinned": False}
    [r] = client.update()
    assert (r.result, r.reason) == ("up_to_date", None), r
    assert service.info("digits").version == hand.version
    assert "(not a fleet version)" in done["message"], done


def test_the_first_cycle_before_anything_is_published_is_idle(
        mqtt: Broker, tmp_path: Path, engine: InferenceEngine) -> None:
    service = AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=8 << 20)
    # the root the device trusts exists, but nothing reached the broker yet
    repo = FleetRepository.init(tmp_path / "fleet")
    view = FleetView(mqtt.connect("fleet"))
    client = _client(mqtt, tmp_path, repo.root_bytes(1), service, fetch_timeout_s=1.0)
    [r] = client.update()
    assert (r.result, r.reason) == ("idle", None), r
    assert "nothing published yet" in r.message
    assert view.wait_for(lambda v: (getattr(v.status.get("dev1"), "last_update", None) or {}).get("result") == "idle",
                         10)
    # once the fleet has published, the cycle reads it
    FleetSim(repo, mqtt.connect("fleet")).push()
    [r] = client.update()
    assert (r.result, r.message) == ("up_to_date", "no targets signed"), r
    # a broker that lost the repository this device has seen is a failure, not idle
    mqtt.clear_retained()
    [r] = client.update()
    assert r.result == "failed", r
