"""Device updates against the in-memory broker and a signing fleet: the happy paths and
every attack of the issue that does not need a real broker. In each refusal nothing new is
installed, the previous version keeps serving and the device reports the precise reason.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, TargetFile

from lorad.adapters.errors import AdapterStorageError, CacheFullError, InvalidAdapterError
from lorad.ota.client import ClientConfig, OtaClient
from lorad.ota.files import chunk_topic
from lorad.ota.keys import find_signers
from lorad.ota.metrics import OtaMetrics
from lorad.ota.repository import RepoSettings, meta_name
from lorad.ota.status import DeviceStatus, status_topic
from lorad.ota.target import Audience
from tests.ota.simulator import FleetSim, SimBroker

EAST = Audience(groups=("east",))


class Env:
    def __init__(self, tmp: Path, kit: SimpleNamespace, settings: RepoSettings | None = None) -> None:
        self.kit = kit
        self.tmp = tmp
        self.clock = kit.Clock()
        self.broker = SimBroker(clock=self.clock.now)
        self.fleet = FleetSim.create(tmp / "fleet", self.broker.connect(), settings=settings,
                                     clock=self.clock.dt)
        self.sink = kit.MemorySink()
        self.device = self.new_device()

    def new_device(self, device_id: str = "dev1", groups: tuple[str, ...] = ("east",),
                   fingerprint: str | None = None, on_result: Any = None, **kw: Any) -> OtaClient:
        cfg = ClientConfig(device_id=device_id, groups=groups, state_dir=self.tmp / device_id,
                           trusted_root=self.fleet.repo.root_bytes(1),
                           base_fingerprint=fingerprint or self.kit.FINGERPRINT,
                           fetch_timeout_s=kw.pop("fetch_timeout_s", 0.5), **kw)
        return OtaClient(cfg, self.broker.connect(), self.sink, clock=self.clock.now, on_result=on_result)

    def publish(self, seed: int, audience: Audience = EAST, **kw: Any) -> Any:
        adapter = self.kit.make_adapter(seed, fingerprint=kw.pop("fingerprint", self.kit.FINGERPRINT))
        kw.setdefault("probes", self.kit.probes_for(adapter))
        spec = self.fleet.repo.publish_adapter("kws", adapter, audience=audience, **kw)
        self.fleet.push()
        return adapter, spec

    def one(self, client: OtaClient | None = None) -> Any:
        results = (client or self.device).update()
        assert len(results) == 1, results
        return results[0]

    def payload_name(self, spec: Any) -> str:
        return f"targets/adapters/kws/{spec.audience.label}/{spec.sha256}.{spec.version}.lorad"


@pytest.fixture
def env(tmp_path: Path, kit: SimpleNamespace) -> Env:
    return Env(tmp_path, kit)


def assert_refused(env: Env, r: Any, reason: str, serving: Any) -> None:
    assert r.result in ("rejected", "skipped"), r
    assert r.reason == reason, r
    assert env.sink.serving("kws") is serving
    status = DeviceStatus.decode(env.broker.retained(status_topic("dev1")) or b"{}")
    assert status.last_update is not None and status.last_update["reason"] == reason


def install_v1(env: Env) -> Any:
    _a1, _ = env.publish(1)
    r = env.one()
    assert r.result == "installed" and env.sink.serving("kws") is not None
    return env.sink.serving("kws")


# --- happy paths --------------------------------------------------------------------

def test_full_install_health_check_commit_and_status(env: Env) -> None:
    a1, spec = env.publish(1)
    r = env.one()
    assert (r.result, r.adapter, r.version) == ("installed", "kws", 1)
    served = env.sink.serving("kws")
    for k, w in a1.weights.items():
        np.testing.assert_array_equal(served.weights[k].A, w.A)
    assert env.sink.installs[-1][2]["adapter_sha256"] == spec.adapter_sha256
    status = DeviceStatus.decode(env.broker.retained(status_topic("dev1")) or b"")
    assert status.adapters == {"kws": {"version": 1, "fleet_version": 1}}
    assert status.last_update is not None and status.last_update["result"] == "installed"
    assert env.one().result == "up_to_date"
    assert len(env.sink.installs) == 1


@pytest.mark.parametrize("dtype,compression", [("fp32", "zlib"), ("fp16", "zstd"), ("fp16", "none")])
def test_delta_update_reconstructs_exactly_what_was_signed(env: Env, dtype: str, compression: str) -> None:
    install_v1(env)
    a2 = env.kit.make_adapter(2)
    spec = env.fleet.repo.publish_adapter("kws", a2, audience=EAST, delta_from=1, dtype=dtype,
                                          compression=compression)
    env.fleet.push()
    assert spec.encoding == "delta"
    r = env.one()
    assert r.result == "installed", r
    served = env.sink.serving("kws")
    tol = 1e-2 if dtype == "fp16" else 1e-6
    for k, w in a2.weights.items():
        np.testing.assert_allclose(served.weights[k].A, w.A, atol=tol)


def test_group_rollback_is_a_higher_version_with_the_older_adapter(env: Env) -> None:
    v1 = install_v1(env)
    env.publish(2)
    assert env.one().result == "installed"
    spec = env.fleet.repo.rollback("kws", to_version=1, audience=EAST, probes=env.kit.probes_for(v1))
    env.fleet.push()
    assert spec.version == 3
    r = env.one()
    assert (r.result, r.version) == ("installed", 3)
    for k, w in v1.weights.items():
        np.testing.assert_array_equal(env.sink.serving("kws").weights[k].B, w.B)


def test_root_and_targets_key_rotation_is_followed(env: Env) -> None:
    install_v1(env)
    root = env.fleet.repo.load("root").signed
    env.fleet.repo.rotate_key("root", root.roles["root"].keyids[0])
    env.fleet.repo.rotate_key("targets", root.roles["targets"].keyids[0])
    env.publish(2)
    r = env.one()
    assert (r.result, r.version) == ("installed", 2), r
    assert env.device.trusted_root().version == 3


def test_resume_after_restart_fetches_only_missing_chunks(env: Env) -> None:
    install_v1(env)
    _, spec = env.publish(3, chunk_size=256)
    name = env.payload_name(spec)
    n = len(spec.chunks)
    assert n >= 4
    held = {i: env.broker.retained(chunk_topic(name, i)) for i in range(n // 2, n)}
    for i in held:  # the second half is not on the broker yet: the transfer stalls
        env.fleet.transport.publish(chunk_topic(name, i), b"", retain=True)
    r = env.one()
    assert (r.result, r.reason) == ("failed", None) and "chunks still missing" in r.message
    # the daemon restarts: a new client on the same state dir; the rest arrives
    for i, data in held.items():
        env.fleet.transport.publish(chunk_topic(name, i), data or b"", retain=True)
    restarted = env.new_device()
    r = env.one(restarted)
    assert (r.result, r.version) == ("installed", 2), r
    assert restarted.reader.fetch_count[name] == n - n // 2


# --- refusals -----------------------------------------------------------------------

def test_tampered_payload_chunk(env: Env) -> None:
    v1 = install_v1(env)
    _, spec = env.publish(2, chunk_size=256)
    name = env.payload_name(spec)
    n = len(spec.chunks)
    tampered = n // 2  # chunks before it are verified and stored before it arrives
    assert tampered >= 1
    topic = chunk_topic(name, tampered)
    good = env.broker.retained(topic) or b""
    env.fleet.transport.publish(topic, bytes([good[0] ^ 1]) + good[1:], retain=True)
    assert_refused(env, env.one(), "chunk_digest", v1)
    assert env.device.reader.fetch_count[name] == tampered + 1
    # the fleet republishes the chunk: the next cycle installs without refetching the rest
    env.fleet.transport.publish(topic, good, retain=True)
    assert env.one().result == "installed"
    # every chunk arrived once, the tampered one twice: the stored ones were not fetched again
    assert env.device.reader.fetch_count[name] == n + 1


def _forge(md_bytes: bytes, signer: CryptoSigner, *, bump: int = 1, pad: int = 0) -> bytes:
    md = Metadata.from_bytes(md_bytes)
    md.signed.version += bump
    if pad:
        md.signed.unrecognized_fields["x-pad"] = "x" * pad
    md.sign(signer)
    return md.to_bytes()


def test_wrong_key(env: Env) -> None:
    v1 = install_v1(env)
    ts = env.fleet.files()[meta_name("timestamp")]
    env.fleet.serve({meta_name("timestamp"): _forge(ts, CryptoSigner.generate_ed25519())})
    assert_refused(env, env.one(), "signature", v1)


def test_too_few_signatures_for_the_root_threshold(env: Env) -> None:
    v1 = install_v1(env)
    repo = env.fleet.repo
    root = repo.load("root")
    assert root.signed.roles["root"].threshold == 2
    one_key = find_signers(repo.key_dirs, root.signed.roles["root"].keyids[:1])
    attacker_root = _forge(repo.root_bytes(), next(iter(one_key.values())))
    env.fleet.serve({meta_name("root", 2): attacker_root})
    r = env.one()
    assert_refused(env, r, "signature", v1)
    assert "1/2" in r.message


def test_older_timestamp_is_a_rollback(env: Env) -> None:
    v1 = install_v1(env)
    old = env.fleet.files()
    env.publish(2)
    env.fleet.repo.refresh_timestamp()
    env.fleet.push()
    env.device.update()  # now trusts the newer timestamp (and installed v2)
    serving = env.sink.serving("kws")
    assert serving is not v1
    env.fleet.serve({meta_name("timestamp"): old[meta_name("timestamp")]})
    assert_refused(env, env.one(), "rollback", serving)


def test_expired_metadata(env: Env) -> None:
    v1 = install_v1(env)
    env.publish(2)
    env.clock.advance(2 * 86400)  # timestamp lives one day
    assert_refused(env, env.one(), "expired", v1)


def test_frozen_timestamp_is_refused_once_expired(env: Env) -> None:
    """Freeze: the attacker keeps replaying the last timestamp so the device never sees v2."""
    v1 = install_v1(env)
    frozen = env.fleet.files()
    env.publish(2)
    env.fleet.serve({meta_name("timestamp"): frozen[meta_name("timestamp")]})
    r = env.one()
    assert r.result == "up_to_date" and env.sink.serving("kws") is v1  # bounded by expiry...
    env.clock.advance(86400 + 120)
    assert_refused(env, env.one(), "expired", v1)                      # ...then refused


def test_device_clock_going_backwards_does_not_revive_expired_metadata(env: Env) -> None:
    v1 = install_v1(env)
    env.clock.advance(2 * 86400)
    assert_refused(env, env.one(), "expired", v1)
    env.clock.advance(-2 * 86400)  # the device clock is reset (no RTC battery, bad NTP)
    assert_refused(env, env.one(), "expired", v1)
    assert env.device.state.time_floor >= env.clock.now() + 2 * 86400 - 61


def test_targets_from_another_snapshot_mix_and_match(env: Env) -> None:
    v1 = install_v1(env)
    old_targets = env.fleet.files()[meta_name("targets", 2)]
    _, _spec = env.publish(2)
    tv = env.fleet.repo.load("targets").signed.version
    env.fleet.serve({meta_name("targets", tv): old_targets})
    assert_refused(env, env.one(), "mix_and_match", v1)


def test_endless_data_metadata_and_payload(env: Env) -> None:
    v1 = install_v1(env)
    ts = env.fleet.files()[meta_name("timestamp")]
    ts_signers = find_signers(env.fleet.repo.key_dirs, env.fleet.repo.load("root").signed.roles["timestamp"].keyids)
    env.fleet.serve({meta_name("timestamp"): _forge(ts, next(iter(ts_signers.values())), pad=20000)})
    assert_refused(env, env.one(), "too_large", v1)
    env.fleet.repo.refresh_timestamp()
    _, spec = env.publish(2)
    topic = chunk_topic(env.payload_name(spec), len(spec.chunks) - 1)
    last = env.broker.retained(topic) or b""
    env.fleet.transport.publish(topic, last + b"\0" * 100, retain=True)
    assert_refused(env, env.one(), "too_large", v1)


def test_truncated_and_reordered_chunks(env: Env) -> None:
    v1 = install_v1(env)
    _, spec = env.publish(2, chunk_size=256)
    name = env.payload_name(spec)
    assert len(spec.chunks) >= 3
    c0, c1 = env.broker.retained(chunk_topic(name, 0)) or b"", env.broker.retained(chunk_topic(name, 1)) or b""
    env.fleet.transport.publish(chunk_topic(name, 0), c0[:-10], retain=True)
    assert_refused(env, env.one(), "chunk_length", v1)
    env.fleet.transport.publish(chunk_topic(name, 0), c1, retain=True)
    env.fleet.transport.publish(chunk_topic(name, 1), c0, retain=True)
    assert_refused(env, env.one(), "chunk_digest", v1)


def test_adapter_for_another_base_model_is_not_even_downloaded(env: Env) -> None:
    v1 = install_v1(env)
    _, spec = env.publish(2, fingerprint="sha256:" + "cd" * 32)
    assert_refused(env, env.one(), "base_model_mismatch", v1)
    assert env.payload_name(spec) not in env.device.reader.fetch_count


def test_device_outside_the_target_group(env: Env) -> None:
    env.publish(1, Audience(groups=("west",)))
    r = env.one()
    assert (r.result, r.reason) == ("skipped", "not_addressed")
    assert env.sink.serving("kws") is None and env.sink.installs == []


def test_failed_health_check_rolls_back_and_is_not_retried(env: Env) -> None:
    v1 = install_v1(env)
    env.publish(2, probes=env.kit.probes_for(env.kit.make_adapter(99)))  # wrong expectations
    r = env.one()
    assert_refused(env, r, "health_check_failed", v1)
    assert "rolled back to local version 1" in r.message
    assert env.sink.current["kws"] == 1
    assert env.one().result == "skipped" and len(env.sink.installs) == 2


def test_revoked_targets_key_is_no_longer_accepted(env: Env) -> None:
    v1 = install_v1(env)
    repo = env.fleet.repo
    old_kid = repo.load("root").signed.roles["targets"].keyids[0]
    stolen = find_signers(repo.key_dirs, [old_kid])[old_kid]
    repo.rotate_key("targets", old_kid)
    env.fleet.push()
    assert env.one().result == "up_to_date"
    # the thief signs targets (and, holding the online keys, snapshot and timestamp)
    files = env.fleet.files()
    tv = repo.load("targets").signed.version
    forged_targets = _forge(files[meta_name("targets", tv)], stolen)
    snap = Metadata.from_bytes(files[meta_name("snapshot", repo.load("snapshot").signed.version)])
    snap.signed.meta["targets.json"] = MetaFile(version=tv + 1, length=len(forged_targets),
                                                hashes={"sha256": hashlib.sha256(forged_targets).hexdigest()})
    snap.signed.version += 1
    online = find_signers(repo.key_dirs, [*repo.load("root").signed.roles["snapshot"].keyids,
                                          *repo.load("root").signed.roles["timestamp"].keyids])
    rootmd = repo.load("root").signed
    snap.sign(online[rootmd.roles["snapshot"].keyids[0]])
    snap_bytes = snap.to_bytes()
    ts = Metadata.from_bytes(files[meta_name("timestamp")])
    ts.signed.version += 1
    ts.signed.snapshot_meta = MetaFile(version=snap.signed.version, length=len(snap_bytes),
                                       hashes={"sha256": hashlib.sha256(snap_bytes).hexdigest()})
    ts.sign(online[rootmd.roles["timestamp"].keyids[0]])
    env.fleet.serve({meta_name("targets", tv + 1): forged_targets,
                     meta_name("snapshot", snap.signed.version): snap_bytes,
                     meta_name("timestamp"): ts.to_bytes()})
    assert_refused(env, env.one(), "signature", v1)


def test_interrupted_install_is_rolled_back_on_restart(env: Env) -> None:
    install_v1(env)
    env.publish(2)
    # simulate a kill right after the service installed v2, before the commit
    env.device.state.begin("kws", 2, 1)
    env.sink.install("kws", env.kit.make_adapter(2))
    restarted = env.new_device()
    r = restarted.recover()
    assert r is not None and r.result == "recovered" and env.sink.current["kws"] == 1
    assert env.one(restarted).result == "installed"
    assert json.loads((env.tmp / "dev1" / "state.json").read_bytes())["pending"] is None


# --- what the service served before an install ---------------------------------------

def test_hand_uploaded_adapter_survives_a_failed_ota_health_check(env: Env) -> None:
    """OTA never installed ``kws`` here, but a user did: a failed OTA install must go back
    to the user's version, not delete the name (and with it every stored version)."""
    hand = env.kit.make_adapter(50)
    env.sink.install("kws", hand, meta={"source": "upload"})
    env.publish(1, probes=env.kit.probes_for(env.kit.make_adapter(99)))  # wrong expectations
    r = env.one()
    assert_refused(env, r, "health_check_failed", hand)
    assert "rolled back to local version 1" in r.message
    assert env.sink.current["kws"] == 1 and env.sink.versions["kws"][0] is hand


def test_failed_health_check_rolls_back_to_what_the_service_served_not_to_the_last_ota_version(
        env: Env) -> None:
    install_v1(env)
    hand = env.kit.make_adapter(50)
    env.sink.install("kws", hand, meta={"source": "upload"})  # local version 2, after OTA's 1
    env.publish(2, probes=env.kit.probes_for(env.kit.make_adapter(99)))
    r = env.one()
    assert_refused(env, r, "health_check_failed", hand)
    assert "rolled back to local version 2" in r.message and env.sink.current["kws"] == 2


# --- a malformed signed target ---------------------------------------------------------

def _sign_malformed_target(env: Env, path: str) -> None:
    """The (trusted) fleet signs a target whose lorad description lacks most fields."""
    repo = env.fleet.repo
    md = repo._bump("targets")
    md.signed.targets[path] = TargetFile(length=1, hashes={"sha256": "00" * 32}, path=path,
                                         unrecognized_fields={"custom": {"lorad": {"adapter": "bad"}}})
    dirname, _, base = path.rpartition("/")
    (repo.dir / "targets" / dirname).mkdir(parents=True, exist_ok=True)
    (repo.dir / "targets" / dirname / f"{'00' * 32}.{base}").write_bytes(b"x")
    repo._write_signed(md, "targets")
    repo._snapshot_and_timestamp()


def test_a_malformed_target_is_refused_alone_and_the_others_install(env: Env) -> None:
    registry = CollectorRegistry()
    metrics = OtaMetrics(registry)
    env.device = env.new_device(on_result=metrics.on_result)
    a1 = env.kit.make_adapter(1)
    env.fleet.repo.publish_adapter("kws", a1, audience=EAST, probes=env.kit.probes_for(a1))
    bad = "adapters/zz-bad/all/1.lorad"  # sorts after kws: its result is the last one reported
    _sign_malformed_target(env, bad)
    env.fleet.push()  # the fleet side leaves the malformed target out of its offers, too
    results = env.device.update()
    by_reason = {r.reason: r for r in results}
    assert [r.result for r in results] == ["installed", "rejected"], results
    assert bad in by_reason["target_invalid"].message
    assert env.sink.serving("kws") is not None
    assert_refused(env, by_reason["target_invalid"], "target_invalid", env.sink.serving("kws"))
    assert registry.get_sample_value("lorad_ota_updates_total",
                                     {"result": "rejected", "reason": "target_invalid"}) == 1
    # the next cycle: kws is up to date, the bad target is refused again, nothing raises
    assert [(r.result, r.reason) for r in env.device.update()] == [("up_to_date", None),
                                                                   ("rejected", "target_invalid")]


# --- local faults are retried, bad data is not -------------------------------------------

@pytest.mark.parametrize("fault", [AdapterStorageError("registry write failed"),
                                   CacheFullError("cache is full of pinned adapters"),
                                   OSError(28, "No space left on device")])
def test_a_local_fault_during_install_is_retried_next_cycle(env: Env, fault: Exception) -> None:
    v1 = install_v1(env)
    _, spec = env.publish(2)
    env.sink.fail_install = fault
    r = env.one()
    assert (r.result, r.reason) == ("failed", None), r
    assert type(fault).__name__ in r.message
    assert env.sink.serving("kws") is v1 and env.device.state.refused("kws") == 0
    assert env.device.state.pending is None
    fetched = env.device.reader.fetch_count[env.payload_name(spec)]
    env.sink.fail_install = None
    r = env.one()
    assert (r.result, r.version) == ("installed", 2), r
    assert env.device.reader.fetch_count[env.payload_name(spec)] == fetched  # the stage was kept


def test_a_version_stored_before_a_local_fault_is_not_served(env: Env) -> None:
    """The service may store the new version and then fail (cache full): undone."""
    v1 = install_v1(env)
    env.publish(2)
    sink = env.sink
    real_install = sink.install

    def store_then_fail(name: str, adapter: Any, *, meta: Any = None) -> Any:
        real_install(name, adapter, meta=meta)
        raise CacheFullError("stored, but the cache is full")
    sink.install = store_then_fail  # type: ignore[method-assign]
    r = env.one()
    assert r.result == "failed" and env.sink.serving("kws") is v1 and env.sink.current["kws"] == 1


def test_an_adapter_the_service_finds_invalid_is_refused_for_good(env: Env) -> None:
    v1 = install_v1(env)
    env.publish(2)
    env.sink.fail_install = InvalidAdapterError("adapter rank 64 exceeds the slot rank 8")
    assert_refused(env, env.one(), "install_failed", v1)
    assert env.device.state.refused("kws") == 2
    env.sink.fail_install = None
    assert env.one().result == "skipped"


def test_a_damaged_local_delta_base_is_not_blamed_on_the_fleet(env: Env) -> None:
    v1 = install_v1(env)
    base = env.tmp / "dev1" / "installed" / "kws" / "1.bin"
    data = base.read_bytes()
    base.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one weight bit flipped on disk
    env.fleet.repo.publish_adapter("kws", env.kit.make_adapter(2), audience=EAST, delta_from=1,
                                   full_fallback=False)
    env.fleet.push()
    r = env.one()
    assert_refused(env, r, "delta_base_missing", v1)
    assert "damaged" in r.message and env.device.state.refused("kws") == 0
    # a full version from the fleet then installs
    a3 = env.kit.make_adapter(3)
    env.fleet.repo.publish_adapter("kws", a3, audience=EAST, probes=env.kit.probes_for(a3))
    env.fleet.push()
    assert (env.one().result, env.sink.current["kws"]) == ("installed", 2)


def test_a_device_without_the_delta_base_takes_the_full_payload_signed_with_it(env: Env) -> None:
    install_v1(env)
    fresh = env.new_device("dev3", groups=("east",))
    a2 = env.kit.make_adapter(2)
    spec = env.fleet.repo.publish_adapter("kws", a2, audience=EAST, delta_from=1, probes=env.kit.probes_for(a2))
    env.fleet.push()
    assert spec.encoding == "delta" and sorted(p.rsplit("/", 1)[1] for p in env.fleet.repo.targets()) == \
        ["2.full.lorad", "2.lorad"]
    assert env.one().result == "installed"  # dev1 holds v1: the delta
    assert [n for n in env.device.reader.fetch_count if n.startswith("targets/")][-1].endswith(".2.lorad")
    [r] = fresh.update()  # dev3 has nothing: the full payload of the same version
    assert (r.result, r.version) == ("installed", 2), r
    assert [n for n in fresh.reader.fetch_count if n.startswith("targets/")] == \
        [n for n in fresh.reader.fetch_count if n.endswith(".2.full.lorad")]


# --- limits --------------------------------------------------------------------------

def test_decompressed_size_above_the_device_limit_is_refused_before_download(env: Env) -> None:
    v1 = install_v1(env)
    a2 = env.kit.make_adapter(2)
    spec = env.fleet.repo.publish_adapter("kws", a2, audience=EAST, compression="zlib",
                                          probes=env.kit.probes_for(a2))
    env.fleet.push()
    env.device = env.new_device(max_raw_bytes=spec.raw_length - 1)
    r = env.one()
    assert_refused(env, r, "too_large", v1)
    assert "max_raw_bytes" in r.message and str(spec.raw_length) in r.message
    assert env.payload_name(spec) not in env.device.reader.fetch_count


def test_decompressed_size_limit_defaults_to_four_payload_limits(tmp_path: Path) -> None:
    cfg = ClientConfig(device_id="d", groups=(), state_dir=tmp_path, trusted_root=b"",
                       base_fingerprint="f", max_payload_bytes=1000)
    assert cfg.raw_limit == 4000
    with pytest.raises(ValueError, match="max_raw_bytes"):
        ClientConfig(device_id="d", groups=(), state_dir=tmp_path, trusted_root=b"",
                     base_fingerprint="f", max_raw_bytes=0)


def test_interrupted_install_left_by_a_failed_undo_is_undone_by_the_next_cycle(env: Env) -> None:
    install_v1(env)
    env.publish(2)
    env.device.state.begin("kws", 2, 1)  # a previous cycle could not undo its install
    env.sink.install("kws", env.kit.make_adapter(2))
    results = env.device.update()
    assert [(r.result, r.version) for r in results] == [("recovered", 2), ("installed", 2)], results
    assert env.sink.current["kws"] == 3  # v2 undone (back to 1), then installed and checked anew
