"""Signed metadata that stays small at any fleet size (issue 25, part 1).

A rollout stage is signed as groups, a few named canaries and a range of hash buckets that
each device checks against its own id; devices running lorad's real client (python-tuf
verification, the in-memory broker of tests/ota/simulator.py) install exactly the devices
the fleet counts. Finished rollouts leave nothing behind in ``targets.json``; the fleet
refuses to sign metadata over the client's limit and says what makes it large; and the
repository simulation of ``benchmarks/fleet_metadata.py`` stays within its claim.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from tuf.ngclient import UpdaterConfig

from benchmarks.fleet_metadata import CLAIM_BYTES, simulate
from lorad.ota.audience import BUCKETS, Audience, bucket
from lorad.ota.client import ClientConfig, OtaClient
from lorad.ota.repository import CLIENT_MAX_BYTES, FleetRepository, MetadataTooLargeError
from lorad.ota.rollout import RolloutPlan, parse_stages, select, stage_audience
from lorad.ota.rollout_cli import start_rollout
from tests.ota.simulator import FleetSim, SimBroker


def _population(n: int) -> dict[str, tuple[str, ...]]:
    return {f"dev{i:06d}": ("canary",) if i % 97 == 0 else (f"site-{i % 7}",) for i in range(n)}


def test_the_fleet_tool_knows_the_clients_limits() -> None:
    c = UpdaterConfig()
    assert {"root": c.root_max_length, "timestamp": c.timestamp_max_length,
                                "snapshot": c.snapshot_max_length, "targets": c.targets_max_length} == CLIENT_MAX_BYTES


def test_a_stage_is_signed_in_a_few_bytes_and_each_device_finds_itself_as_the_fleet_counts() -> None:
    small, large = _population(2_000), _population(100_000)
    spec = "devices:dev000001+dev000002,canary,5%x5"
    assert [s.label for s in parse_stages(spec)] == ["devices dev000001+dev000002", "group canary", "5%", "25%",
                                                     "100%"]
    for population in (small, large):
        plan = RolloutPlan(name="spring", adapter="kws", version=2, stages=parse_stages(spec), population=population)
        sizes = []
        for i in range(len(plan.stages)):
            audience = stage_audience(plan, i)
            signed = json.dumps(audience.to_dict(), separators=(",", ":"))
            sizes.append(len(signed))
            assert Audience.from_dict(json.loads(signed)) == audience
            # what every device decides from its own id is what the fleet counts
            members = {d for d, g in population.items() if audience.includes(d, g)}
            assert members == set(select(plan, i)), i
        assert max(sizes) < 200, sizes
        counts = [len(select(plan, i)) for i in range(len(plan.stages))]
        n = len(population)
        assert counts[2] >= 0.05 * n and counts[3] >= 0.25 * n and counts[4] == n
        assert all(a <= b for a, b in itertools.pairwise(counts))
    # the bucket bound of a share is the same fraction of buckets at any size, about
    assert abs(RolloutPlan(name="spring", adapter="kws", version=2, stages=parse_stages("5%"),
                           population=large).bucket_bound(5) - 0.05 * BUCKETS) < 0.005 * BUCKETS
    # another rollout picks other devices
    other = RolloutPlan(name="autumn", adapter="kws", version=2, stages=parse_stages("5%"), population=small)
    this = RolloutPlan(name="spring", adapter="kws", version=2, stages=parse_stages("5%"), population=small)
    assert set(select(other, 0)) != set(select(this, 0))
    assert bucket("dev000001", "spring") == bucket("dev000001", "spring") != bucket("dev000001", "autumn")


def test_what_devices_read_before_buckets_reads_back_and_they_refuse_a_bucket_audience() -> None:
    old = {"all": False, "devices": ["dev1"], "groups": ["east"]}
    assert Audience.from_dict(old) == Audience(devices=("dev1",), groups=("east",))
    assert Audience.from_dict(old).to_dict() == old  # signed as before: no new keys
    bucketed = Audience(buckets=(0, 500), salt="spring").to_dict()
    # a device that predates buckets sees neither everyone, devices nor groups: malformed
    assert not bucketed["all"] and not bucketed["devices"] and not bucketed["groups"]
    for bad in ({"buckets": [5, 5], "salt": "s"}, {"buckets": [0, BUCKETS + 1], "salt": "s"},
                {"buckets": [0, 10]}, {"buckets": "0-10", "salt": "s"}, {"groups": "east"}):
        with pytest.raises(ValueError):
            Audience.from_dict(bad)


def test_devices_install_a_bucket_stage_by_their_own_id_with_real_verification(
        tmp_path: Path, kit: SimpleNamespace) -> None:
    broker = SimBroker()
    fleet = FleetSim.create(tmp_path / "fleet", broker.connect())
    names = [f"kiosk-{i:02d}" for i in range(24)]
    plan = RolloutPlan(name="spring", adapter="kws", version=1, stages=parse_stages("25%,100%"),
                       population={n: ("shop",) for n in names}, label="r-spring")
    a = kit.make_adapter(3)
    plan, spec = start_rollout(fleet.repo, plan, a, probes=kit.probes_for(a))
    fleet.push()
    assert spec.audience.buckets is not None and not spec.audience.devices
    sinks = {n: kit.MemorySink() for n in names}
    results = {}
    for n in names:
        device = OtaClient(ClientConfig(device_id=n, groups=("shop",), state_dir=tmp_path / n,
                                        trusted_root=fleet.repo.root_bytes(1), base_fingerprint=kit.FINGERPRINT),
                           broker.connect(), sinks[n])
        [results[n]] = device.update()
    installed = {n for n, r in results.items() if r.result == "installed"}
    assert installed == set(select(plan, 0)) and len(installed) == 6
    assert {results[n].reason for n in names if n not in installed} == {"not_addressed"}
    assert all(sinks[n].current == {"kws": 1} for n in installed)


def test_finished_rollouts_leave_nothing_behind_in_targets_json(tmp_path: Path, kit: SimpleNamespace) -> None:
    out = simulate(5_000, 24, adapters=3, directory=tmp_path)
    sizes = out["targets_json_bytes_by_rollout"]
    # one target per adapter once its rollouts are done, whatever the number of rollouts
    assert out["targets"] == 3 and out["halted"] == 2
    assert max(sizes[6:]) - min(sizes[6:]) < 100, sizes
    assert out["targets_json_max_bytes"] <= CLAIM_BYTES and out["within_claim"]
    # a later full publish for everyone replaces what an earlier group got, too
    repo = FleetRepository(tmp_path / "fleet")
    repo.publish_adapter("a0", kit.make_adapter(1), audience=Audience(groups=("site-01",)))
    repo.publish_adapter("a0", kit.make_adapter(2), audience=Audience(everyone=True))
    assert sorted(s.version for s in repo.targets().values() if s.adapter == "a0") == [repo.latest_version("a0")]


def test_metadata_over_the_clients_limit_is_refused_naming_what_makes_it_large(
        tmp_path: Path, kit: SimpleNamespace) -> None:
    """The operator's case: a stage signed as an explicit list of 100,000 devices, four
    times over. The fleet refuses the fourth and writes nothing."""
    repo = FleetRepository.init(tmp_path / "fleet")
    listed = Audience(devices=tuple(f"device-{i:06d}" for i in range(100_000)))  # 16 bytes each
    for r in range(3):
        repo.publish_adapter(f"a{r}", kit.make_adapter(r), audience=listed)
    before = {p.name: p.read_bytes() for p in (repo.dir / "metadata").iterdir()}
    with pytest.raises(MetadataTooLargeError) as e:
        repo.publish_adapter("a3", kit.make_adapter(3), audience=listed)
    msg = str(e.value)
    assert "targets.json would be" in msg and "over the 5,000,000 bytes a device accepts" in msg
    assert "100,000 listed devices" in msg and "adapters/a" in msg and "groups or percentages" in msg
    assert e.value.size > e.value.limit == 5_000_000
    assert {p.name: p.read_bytes() for p in (repo.dir / "metadata").iterdir()} == before
