import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from lorad.adapters.composition import AdapterWeight
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.errors import AdapterDamagedError, AdapterNotFoundError, BaseModelMismatchError, InvalidAdapterError
from lorad.adapters.peft_format import WEIGHTS_FILE, dump_peft
from lorad.adapters.registry import META_FILE, AdapterRegistry
from lorad.adapters.service import AdapterService, DamagedAdapterInfo
from tests.unit.lora_models import random_adapter, tiny_model, tiny_reference

X = np.random.default_rng(7).normal(size=(2, 3, 6)).astype(np.float32)


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[AdapterService, dict[str, np.ndarray]]:
    model, weights = tiny_model()
    engine = InferenceEngine(model, targets=["fc*"], rank=4)
    return AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=1 << 20), weights


def test_upload_serves_and_reports_name_and_version(setup: tuple[AdapterService, dict[str, np.ndarray]]) -> None:
    service, w = setup
    adapter = random_adapter(service.engine.targets, service.engine.fingerprint, rank=2)
    info = service.upload("alice", dump_peft(adapter))
    assert (info.name, info.version, info.rank, info.cached, info.pinned) == ("alice", 1, 2, False, False)
    result = service.infer({"x": X}, "alice")
    assert (result.adapter, result.version) == ("alice", 1)
    np.testing.assert_allclose(result.outputs["y"], tiny_reference(w, X, adapter), rtol=1e-5, atol=1e-5)
    assert service.info("alice").cached


def test_new_version_is_visible_to_the_next_request_without_reloading_the_model(setup: tuple[AdapterService, dict[str, np.ndarray]]) -> None:
    service, w = setup
    session = service.engine.session
    v1 = random_adapter(service.engine.targets, service.engine.fingerprint, rank=2, seed=1)
    v2 = random_adapter(service.engine.targets, service.engine.fingerprint, rank=3, seed=2)
    service.upload("a", dump_peft(v1))
    service.load("a")
    with service.cache.lease("a") as held:
        service.upload("a", dump_peft(v2))
        assert held.version == 1  # a running request keeps its version
    result = service.infer({"x": X}, "a")
    assert result.version == 2
    np.testing.assert_allclose(result.outputs["y"], tiny_reference(w, X, v2), rtol=1e-5, atol=1e-5)
    assert service.engine.session is session


@pytest.mark.parametrize("damage", ["truncate", "other_model", "wrong_shape"])
def test_bad_upload_is_refused_and_previous_version_keeps_serving(
    setup: tuple[AdapterService, dict[str, np.ndarray]], damage: str
) -> None:
    service, w = setup
    good = random_adapter(service.engine.targets, service.engine.fingerprint, rank=2)
    service.upload("a", dump_peft(good))
    if damage == "truncate":
        files = dump_peft(good)
        files[WEIGHTS_FILE] = files[WEIGHTS_FILE][:-40]
        error: type[Exception] = InvalidAdapterError
    elif damage == "other_model":
        other, _ = tiny_model(seed=3)
        other_engine = InferenceEngine(other, targets=["fc*"], rank=4)
        files = dump_peft(random_adapter(other_engine.targets, other_engine.fingerprint, rank=2))
        error = BaseModelMismatchError
    else:
        files = dump_peft(random_adapter([t.__class__(t.weight, t.in_features + 1, t.out_features, t.op) for t in service.engine.targets],
                                         service.engine.fingerprint, rank=2))
        error = InvalidAdapterError
    with pytest.raises(error):
        service.upload("a", files)
    result = service.infer({"x": X}, "a")
    assert result.version == 1 and service.registry.versions("a") == [1]
    np.testing.assert_allclose(result.outputs["y"], tiny_reference(w, X, good), rtol=1e-5, atol=1e-5)


def test_unknown_adapter_is_not_found(setup: tuple[AdapterService, dict[str, np.ndarray]]) -> None:
    service, _ = setup
    with pytest.raises(AdapterNotFoundError, match="adapter 'ghost' not found"):
        service.infer({"x": X}, "ghost")
    for action in (service.load, service.pin, service.unpin, service.evict, service.info):
        with pytest.raises(AdapterNotFoundError):
            action("ghost")


def test_pin_evict_and_rollback(setup: tuple[AdapterService, dict[str, np.ndarray]]) -> None:
    service, w = setup
    targets, fp = service.engine.targets, service.engine.fingerprint
    v1, v2 = random_adapter(targets, fp, rank=2, seed=1), random_adapter(targets, fp, rank=2, seed=2)
    service.upload("a", dump_peft(v1))
    service.install("a", v2, meta={"source": "trainer"})
    assert service.pin("a").pinned
    with pytest.raises(ValueError, match="unpin"):
        service.evict("a")
    service.unpin("a")
    assert not service.evict("a").cached
    assert service.rollback("a", 1).version == 1
    np.testing.assert_allclose(service.infer({"x": X}, "a").outputs["y"], tiny_reference(w, X, v1), rtol=1e-5, atol=1e-5)
    assert service.inspect("a")["versions"] == [1, 2]


def test_requests_see_exactly_one_version_while_versions_change(setup: tuple[AdapterService, dict[str, np.ndarray]]) -> None:
    service, w = setup
    targets, fp = service.engine.targets, service.engine.fingerprint
    versions = {v: random_adapter(targets, fp, rank=2, seed=v) for v in range(1, 9)}
    service.upload("a", dump_peft(versions[1]))
    errors: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        try:
            while not stop.is_set():
                result = service.infer({"x": X}, "a")
                assert result.version is not None
                np.testing.assert_allclose(result.outputs["y"], tiny_reference(w, X, versions[result.version]), rtol=1e-4, atol=1e-4)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for v in range(2, 9):
        service.upload("a", dump_peft(versions[v]))
        service.evict("a") if v % 3 == 0 else service.load("a")
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors[0]
    assert service.infer({"x": X}, "a").version == 8


def test_weight_names_map_peft_module_names_to_onnx_weights(tmp_path: Path) -> None:
    model, w = tiny_model()
    engine = InferenceEngine(model, targets=["fc*"], rank=4,
                             weight_names={"encoder.first": "fc1.weight", "encoder.second": "fc2.weight"})
    service = AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=1 << 20)
    adapter = random_adapter(engine.targets, engine.fingerprint, rank=2)
    renamed = type(adapter)(rank=2, alpha=adapter.alpha, base_fingerprint=adapter.base_fingerprint,
                            weights={"encoder.first.weight": adapter.weights["fc1.weight"],
                                     "encoder.second.weight": adapter.weights["fc2.weight"]})
    service.upload("exported", dump_peft(renamed))  # PEFT modules encoder.first, encoder.second
    np.testing.assert_allclose(service.infer({"x": X}, "exported").outputs["y"], tiny_reference(w, X, adapter),
                               rtol=1e-5, atol=1e-5)
    # what lorad writes itself uses the same PEFT names, so it reads back under the same config
    service.install("trained", adapter)
    exported = load_safetensors(service.export("trained")[1][WEIGHTS_FILE])
    assert sorted(exported) == [f"base_model.model.encoder.{m}.lora_{x}.weight" for m in ("first", "second") for x in "AB"]
    np.testing.assert_array_equal(exported["base_model.model.encoder.first.lora_A.weight"], adapter.weights["fc1.weight"].A.T)


@pytest.mark.parametrize("change", ["upload", "rollback"])
def test_change_during_a_cache_miss_marks_the_load_stale(tmp_path: Path, change: str) -> None:
    """A miss loading version N while version N+1 becomes current must not cache N.

    The interleaving is forced by the service's load hook: the miss stops after it chose
    its version, the change happens, then the miss goes on.
    """
    model, w = tiny_model()
    engine = InferenceEngine(model, targets=["fc*"], rank=4)
    chosen, proceed = threading.Event(), threading.Event()
    loads: list[int] = []

    def hook(name: str, version: int) -> None:
        loads.append(version)
        if len(loads) == 1:
            chosen.set()
            assert proceed.wait(timeout=30)

    service = AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=1 << 20, load_hook=hook)
    targets, fp = engine.targets, engine.fingerprint
    v1, v2 = (random_adapter(targets, fp, rank=2, seed=s) for s in (1, 2))
    if change == "upload":
        service.upload("a", dump_peft(v1))
        old, new, new_adapter = 1, 2, v2
    else:
        service.upload("a", dump_peft(v2))
        service.upload("a", dump_peft(v1))
        old, new, new_adapter = 2, 1, v2
    results: list[int | None] = []
    miss = threading.Thread(target=lambda: results.append(service.infer({"x": X}, "a").version))
    miss.start()
    assert chosen.wait(timeout=30)
    assert not service.cache.contains("a")  # the miss is in flight, nothing cached yet
    if change == "upload":
        service.upload("a", dump_peft(v2))
    else:
        service.rollback("a", 1)
    proceed.set()
    miss.join(timeout=30)
    assert loads == [old, new]  # the stale load was dropped and the miss loaded again
    assert results == [new]
    result = service.infer({"x": X}, "a")
    assert result.version == new and service.info("a").cached
    np.testing.assert_allclose(result.outputs["y"], tiny_reference(w, X, new_adapter), rtol=1e-5, atol=1e-5)


def test_a_damaged_adapter_is_listed_never_served_and_repaired(
        setup: tuple[AdapterService, dict[str, np.ndarray]]) -> None:
    service, w = setup
    targets, fp = service.engine.targets, service.engine.fingerprint
    v1, v2, good = (random_adapter(targets, fp, rank=2, seed=s) for s in (1, 2, 3))
    service.upload("keep", dump_peft(v1))
    service.upload("keep", dump_peft(v2))
    service.upload("other", dump_peft(good))
    service.pin("keep")  # a copy in memory from before the damage
    pointer = service.registry.root / "keep" / "current"
    pointer.write_bytes(b"garbage")

    listed = {i.name: i for i in service.list_adapters()}
    damaged = listed["keep"]
    assert isinstance(damaged, DamagedAdapterInfo)
    assert (damaged.state, damaged.version, damaged.versions) == ("damaged", None, (1, 2))
    assert "not a version number" in damaged.reason
    assert (listed["other"].state, listed["other"].version) == ("ready", 1)
    assert service.inspect("keep")["state"] == "damaged"
    # Never served, not even the copy cached before the damage was found.
    with pytest.raises(AdapterDamagedError, match="roll back to a sound stored version"):
        service.infer({"x": X}, "keep")
    with pytest.raises(AdapterDamagedError):
        service.infer({"x": X}, [AdapterWeight("keep", 1.0), AdapterWeight("other", 1.0)])
    np.testing.assert_allclose(service.infer({"x": X}, "other").outputs["y"], tiny_reference(w, X, good),
                               rtol=1e-5, atol=1e-5)

    assert service.rollback("keep", 1).version == 1  # repair 1: a rollback
    np.testing.assert_allclose(service.infer({"x": X}, "keep").outputs["y"], tiny_reference(w, X, v1),
                               rtol=1e-5, atol=1e-5)
    (service.registry.root / "keep" / "1" / META_FILE).write_bytes(b"{")
    assert service.list_adapters()[0].state == "damaged"
    with pytest.raises(AdapterDamagedError, match="version 1"):
        service.rollback("keep", 1)
    assert service.upload("keep", dump_peft(v2)).version == 3  # repair 2: a new version
    assert [i.state for i in service.list_adapters()] == ["ready", "ready"]
    pointer.write_text("99\n")
    service.delete("keep")  # repair 3: gone
    assert [i.name for i in service.list_adapters()] == ["other"]


def test_a_file_that_hashes_wrong_is_found_on_load_and_listed(
        setup: tuple[AdapterService, dict[str, np.ndarray]]) -> None:
    service, _ = setup
    service.upload("a", dump_peft(random_adapter(service.engine.targets, service.engine.fingerprint, rank=2)))
    weights = service.registry.root / "a" / "1" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # same size: only the sha256 tells
    weights.write_bytes(bytes(data))
    assert service.list_adapters()[0].state == "ready"  # listing hashes nothing
    with pytest.raises(AdapterDamagedError, match="sha256"):
        service.infer({"x": X}, "a")
    assert service.list_adapters()[0].state == "damaged"
