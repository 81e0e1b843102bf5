"""OTA into the real AdapterService on the embedded demo model: the service's install is
the only way in, the health check runs real inference, a failed check rolls back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lorad.adapters.engine import InferenceEngine
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService
from lorad.daemon.demo import DEMO_RANK, DEMO_TARGETS, demo_model_path
from lorad.ota.client import ClientConfig, OtaClient
from lorad.ota.target import Audience
from tests.ota.demo_kit import demo_adapter as _adapter
from tests.ota.demo_kit import demo_logits
from tests.ota.demo_kit import demo_probes as _probes
from tests.ota.simulator import FleetSim, SimBroker


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    return InferenceEngine(demo_model_path(), targets=DEMO_TARGETS, rank=DEMO_RANK)


def test_install_health_check_and_rollback_through_the_adapter_service(
        tmp_path: Path, engine: InferenceEngine) -> None:
    service = AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=8 << 20)
    broker = SimBroker()
    fleet = FleetSim.create(tmp_path / "fleet", broker.connect())
    client = OtaClient(ClientConfig(device_id="dev1", groups=("east",), state_dir=tmp_path / "ota",
                                    trusted_root=fleet.repo.root_bytes(1),
                                    base_fingerprint=engine.fingerprint), broker.connect(), service)
    east = Audience(groups=("east",))
    a1 = _adapter(engine, 1)
    fleet.repo.publish_adapter("digits", a1, audience=east, probes=_probes(engine, a1), compression="zstd")
    fleet.push()
    [r] = client.update()
    assert r.result == "installed", r
    x = np.random.default_rng(3).random((2, 64), dtype=np.float32)
    want = engine.run({"pixels": x}, engine.prepare(a1, name="x", version=1))["logits"]
    res = service.infer({"pixels": x}, adapter="digits")
    np.testing.assert_allclose(res.outputs["logits"], want, atol=1e-5)
    v1_local = res.version

    # v2 arrives as an fp16 delta, but its recorded probes are those of another adapter
    a2 = _adapter(engine, 2)
    fleet.repo.publish_adapter("digits", a2, audience=east, delta_from=1, dtype="fp16",
                               probes=_probes(engine, _adapter(engine, 3)))
    fleet.push()
    [r] = client.update()
    assert (r.result, r.reason) == ("rejected", "health_check_failed"), r
    res = service.infer({"pixels": x}, adapter="digits")
    assert res.version == v1_local
    np.testing.assert_allclose(res.outputs["logits"], want, atol=1e-5)

    # v3: a good delta against v1 is installed and served
    fleet.repo.publish_adapter("digits", a2, audience=east, delta_from=1, probes=_probes(engine, a2))
    fleet.push()
    [r] = client.update()
    assert (r.result, r.version) == ("installed", 3), r
    got = service.infer({"pixels": x}, adapter="digits").outputs["logits"]
    np.testing.assert_allclose(got, engine.run({"pixels": x}, engine.prepare(a2, name="x", version=1))["logits"],
                               rtol=1e-5, atol=1e-4)  # base + (new - base) rounds in fp32


def test_first_install_that_fails_its_health_check_is_removed(tmp_path: Path, engine: InferenceEngine) -> None:
    service = AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=8 << 20)
    broker = SimBroker()
    fleet = FleetSim.create(tmp_path / "fleet", broker.connect())
    client = OtaClient(ClientConfig(device_id="dev1", groups=(), state_dir=tmp_path / "ota",
                                    trusted_root=fleet.repo.root_bytes(1),
                                    base_fingerprint=engine.fingerprint), broker.connect(), service)
    a1 = _adapter(engine, 1)
    fleet.repo.publish_adapter("digits", a1, audience=Audience(devices=("dev1",)),
                               probes=_probes(engine, _adapter(engine, 9)))
    fleet.push()
    [r] = client.update()
    assert r.reason == "health_check_failed"
    assert [i.name for i in service.list_adapters()] == []


def test_hand_uploaded_adapter_survives_a_failed_ota_install(tmp_path: Path, engine: InferenceEngine) -> None:
    """A user's version of a name OTA never installed: a failed OTA install of that name
    goes back to it, and every stored version stays."""
    service = AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=8 << 20)
    hand = _adapter(engine, 5)
    info = service.install("digits", hand, meta={"source": "upload"})
    broker = SimBroker()
    fleet = FleetSim.create(tmp_path / "fleet", broker.connect())
    client = OtaClient(ClientConfig(device_id="dev1", groups=(), state_dir=tmp_path / "ota",
                                    trusted_root=fleet.repo.root_bytes(1),
                                    base_fingerprint=engine.fingerprint), broker.connect(), service)
    fleet.repo.publish_adapter("digits", _adapter(engine, 1), audience=Audience(devices=("dev1",)),
                               probes=_probes(engine, _adapter(engine, 9)))
    fleet.push()
    [r] = client.update()
    assert (r.result, r.reason) == ("rejected", "health_check_failed"), r
    x = np.random.default_rng(3).random((2, 64), dtype=np.float32)
    res = service.infer({"pixels": x}, adapter="digits")
    assert res.version == info.version
    np.testing.assert_allclose(res.outputs["logits"], demo_logits(engine, hand, x), atol=1e-5)
    assert service.registry.get("digits", info.version).version == info.version  # still stored
