"""The HTTP API over real HTTP against a real daemon subprocess (one per module)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from lorad.adapters.engine import InferenceEngine
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService
from lorad.daemon.demo import DEMO_RANK, DEMO_TARGETS, demo_adapter_dirs, demo_model_path
from lorad.daemon.federated.config import FederatedConfig
from lorad.daemon.federated.round_api import add_federated_routes
from lorad.daemon.generate_api import add_generate_routes
from lorad.daemon.http_api import ApiSettings, authenticated, make_app, protected
from lorad.daemon.metrics import DaemonMetrics
from lorad.daemon.training_api import add_training_routes
from lorad.trainer.config import parse_trainer_section
from lorad.trainer.service import TrainerService
from tests.integration.lorad_process import MODEL, DemoMath, RunningDaemon, digit_probe, logits_of, outputs_differ

DEMO_ADAPTERS = sorted(demo_adapter_dirs())


def _pixels(n: int = 1) -> np.ndarray:
    return np.random.default_rng(7).random((n, 64), dtype=np.float32)


# ---------------------------------------------------------------- health and metadata


def test_health(daemon: RunningDaemon) -> None:
    assert daemon.request("GET", "/v2/health/live").json() == {"live": True}
    assert daemon.request("GET", "/v2/health/ready").json() == {"ready": True}
    r = daemon.request("GET", f"/v2/models/{MODEL}/ready")
    assert r.status == 200 and r.json()["ready"] is True


def test_server_and_model_metadata(daemon: RunningDaemon) -> None:
    server = daemon.request("GET", "/v2").json()
    assert server["name"] == "lorad" and "lorad_adapters" in server["extensions"]
    meta = daemon.request("GET", f"/v2/models/{MODEL}").json()
    assert meta["name"] == MODEL and meta["platform"] == "onnxruntime_onnx" and len(meta["versions"]) == 1
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"logits": [-1, 10], "probabilities": [-1, 10]}


def test_unknown_model_is_404_naming_it_and_the_served_one(daemon: RunningDaemon) -> None:
    for method, path in [("GET", "/v2/models/resnet"), ("POST", "/v2/models/resnet/infer"), ("GET", "/v2/models/resnet/adapters")]:
        r = daemon.request(method, path, json_body={} if method == "POST" else None)
        assert r.status == 404
        assert "'resnet'" in r.json()["error"] and f"'{MODEL}'" in r.json()["error"]


def test_unknown_route_and_method_are_json_errors(daemon: RunningDaemon) -> None:
    r = daemon.request("GET", "/v3/nothing")
    assert r.status == 404 and "openapi" in r.json()["error"]
    r = daemon.request("DELETE", "/v2/health/live")
    assert r.status == 405 and "DELETE" in r.json()["error"]


def test_openapi_document_is_served(daemon: RunningDaemon) -> None:
    doc = daemon.request("GET", "/v2/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert "/v2/models/{model}/adapters/{adapter}/pin" in doc["paths"]


def test_openapi_documents_every_route(tmp_path: Path) -> None:
    """The shipped document and the router agree, route by route and method by method,
    with every optional part wired in as the daemon does (the trainer's routes too)."""
    engine = InferenceEngine(demo_model_path(), targets=DEMO_TARGETS, rank=DEMO_RANK)
    service = AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=1 << 20)
    app = make_app(ApiSettings(
        service=service, metrics=DaemonMetrics(CollectorRegistry()), token="x" * 20,
        executor=None,  # type: ignore[arg-type]  # no request is served here
        max_request_bytes=1024, ready=lambda: True,
    ))
    add_generate_routes(app, service, None, None,  # type: ignore[arg-type]  # no request is served here
                        default_max_tokens=1, model_version="x")
    trainer = TrainerService(parse_trainer_section({"enabled": True}), adapters=service, state_dir=tmp_path,
                             federated=["fleet"])
    try:
        add_training_routes(app, trainer, protected, authenticated)
        add_federated_routes(app, trainer, FederatedConfig(adapter="fleet"), protected)
    finally:
        trainer.close()  # never started: only its routes are looked at
    routes = {(r.resource.canonical, r.method.lower()) for r in app.router.routes() if isinstance(r.resource, web.Resource) and r.method != "HEAD"}
    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "daemon" / "openapi.yaml").read_text())
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops if m != "parameters"}
    assert routes == documented


# ---------------------------------------------------------------- inference


def test_infer_base_vs_demo_adapters(daemon: RunningDaemon) -> None:
    x = _pixels(3)
    base = daemon.infer(x)
    assert base.status == 200, base.body
    doc = base.json()
    assert doc["model_name"] == MODEL
    assert doc["parameters"] == {"adapter": None, "adapter_version": None}
    assert {o["name"] for o in doc["outputs"]} == {"logits", "probabilities"}
    assert len(DEMO_ADAPTERS) >= 2
    for name in DEMO_ADAPTERS:
        r = daemon.infer(x, name)
        assert r.status == 200, r.body
        assert r.json()["parameters"]["adapter"] == name
        assert r.json()["parameters"]["adapter_version"] >= 1
        assert outputs_differ(logits_of(r).ravel(), logits_of(base).ravel()), name
    # the base model is unchanged by adapters having been used
    np.testing.assert_array_equal(logits_of(daemon.infer(x)), logits_of(base))


def test_infer_echoes_id_and_selects_outputs(daemon: RunningDaemon) -> None:
    r = daemon.infer(_pixels(), id="req-42", outputs=[{"name": "probabilities"}])
    doc = r.json()
    assert doc["id"] == "req-42"
    assert [o["name"] for o in doc["outputs"]] == ["probabilities"]
    assert doc["outputs"][0]["shape"] == [1, 10]
    assert abs(sum(doc["outputs"][0]["data"]) - 1) < 1e-5


def test_nested_data_accepted(daemon: RunningDaemon) -> None:
    x = _pixels(2)
    doc = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 64], "data": x.tolist()}]}
    r = daemon.request("POST", f"/v2/models/{MODEL}/infer", json_body=doc)
    np.testing.assert_array_equal(logits_of(r), logits_of(daemon.infer(x)))


def test_unknown_adapter_is_404_naming_it(daemon: RunningDaemon) -> None:
    r = daemon.infer(_pixels(), "no-such-adapter")
    assert r.status == 404 and "'no-such-adapter'" in r.json()["error"]
    r = daemon.request("GET", f"/v2/models/{MODEL}/adapters/no-such-adapter")
    assert r.status == 404 and "'no-such-adapter'" in r.json()["error"]


def _tensor(**kw: object) -> dict[str, object]:
    return {"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64, **kw}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"inputs": [_tensor(name="image")]}, "unknown input 'image'; the model's inputs are: pixels"),
        ({"inputs": [_tensor(datatype="INT64", data=[1] * 64)]}, "datatype 'INT64' is not allowed; the model expects 'FP32'"),
        ({"inputs": [_tensor(shape=[1, 63], data=[0.5] * 63)]}, "shape [1, 63] does not match the model's shape [N, 64]"),
        ({"inputs": [_tensor(shape=[64])]}, "shape [64] does not match"),
        ({"inputs": [_tensor(data=[0.5] * 60)]}, "data has 60 elements but shape [1, 64] needs 64"),
        ({"inputs": [_tensor(data=["a"] * 64)]}, "FP32 data must be numbers"),
        ({"inputs": []}, "'inputs' must be a non-empty array"),
        ({"inputs": [_tensor()], "outputs": [{"name": "scores"}]}, "unknown output 'scores'"),
        ({"inputs": [_tensor()], "parameters": {"adapter": 5}}, "'parameters.adapter' must be an adapter name"),
    ],
)
def test_malformed_tensors_are_400_saying_which(daemon: RunningDaemon, body: object, fragment: str) -> None:
    r = daemon.request("POST", f"/v2/models/{MODEL}/infer", json_body=body)
    assert r.status == 400, r.body
    assert fragment in r.json()["error"]


def test_invalid_json_is_400(daemon: RunningDaemon) -> None:
    r = daemon.request("POST", f"/v2/models/{MODEL}/infer", body=b"{nope", content_type="application/json")
    assert r.status == 400 and "not valid JSON" in r.json()["error"]


# ---------------------------------------------------------------- adapter management


def test_list_adapters_fields(daemon: RunningDaemon) -> None:
    listing = daemon.adapters()
    assert set(DEMO_ADAPTERS) <= set(listing)
    for a in listing.values():
        assert set(a) == {"name", "version", "rank", "bytes", "cached", "pinned", "state"}
        assert a["state"] == "ready"
        assert a["rank"] >= 1 and a["bytes"] > 0


def test_load_pin_unpin_evict(daemon: RunningDaemon) -> None:
    name = DEMO_ADAPTERS[0]
    r = daemon.action(name, "evict")
    assert r.status == 200 and r.json()["cached"] is False
    r = daemon.action(name, "load")
    assert r.status == 200 and r.json()["cached"] is True
    r = daemon.action(name, "pin")
    assert r.json()["pinned"] is True and daemon.adapters()[name]["pinned"] is True
    r = daemon.action(name, "unpin")
    assert r.json()["pinned"] is False
    r = daemon.action(name, "evict")
    assert r.json()["cached"] is False and daemon.adapters()[name]["cached"] is False
    for action in ("load", "pin", "unpin", "evict"):
        r = daemon.action("ghost", action)
        assert r.status == 404 and "'ghost'" in r.json()["error"], action


def test_inspect(daemon: RunningDaemon) -> None:
    doc = daemon.request("GET", f"/v2/models/{MODEL}/adapters/{DEMO_ADAPTERS[0]}").json()
    assert doc["name"] == DEMO_ADAPTERS[0] and doc["versions"] and doc["targets"]
    assert doc["base_fingerprint"].startswith("sha256:")


def test_upload_new_version_is_hot_swapped(daemon: RunningDaemon, demo_math: DemoMath) -> None:
    probe = digit_probe()
    base = logits_of(daemon.infer(probe))
    r = daemon.upload("marker", demo_math.marker_adapter(probe, 3, 2.0))
    assert r.status == 201, r.body
    v1 = r.json()["version"]
    assert daemon.action("marker", "load").json()["cached"] is True
    out = daemon.infer(probe, "marker")
    assert out.json()["parameters"] == {"adapter": "marker", "adapter_version": v1}
    np.testing.assert_allclose(logits_of(out) - base, np.eye(10)[3][None] * 2.0, atol=1e-4)

    r = daemon.upload("marker", demo_math.marker_adapter(probe, 3, 5.0))
    v2 = r.json()["version"]
    assert v2 > v1 and r.json()["cached"] is True  # swapped into the cache, no reload
    out = daemon.infer(probe, "marker")
    assert out.json()["parameters"]["adapter_version"] == v2
    np.testing.assert_allclose(logits_of(out) - base, np.eye(10)[3][None] * 5.0, atol=1e-4)

    r = daemon.request("POST", f"/v2/models/{MODEL}/adapters/marker/rollback", json_body={"version": v1})
    assert r.status == 200 and r.json()["version"] == v1
    out = daemon.infer(probe, "marker")
    assert out.json()["parameters"]["adapter_version"] == v1
    np.testing.assert_allclose(logits_of(out) - base, np.eye(10)[3][None] * 2.0, atol=1e-4)
    r = daemon.request("POST", f"/v2/models/{MODEL}/adapters/marker/rollback", json_body={"version": "1"})
    assert r.status == 400 and "version" in r.json()["error"]


def _bad_uploads(demo_math: DemoMath) -> dict[str, tuple[dict[str, bytes], int, str]]:
    probe = digit_probe()
    good = demo_math.marker_adapter(probe, 1, 1.0)
    weights, config = good["adapter_model.safetensors"], good["adapter_config.json"]
    wrong_shape = demo_math.marker_adapter(probe, 1, 1.0)
    # a rank-1 pair on head.weight declared for fc1.weight: [64, 128] needs A with 64 rows
    wrong_shape["adapter_model.safetensors"] = weights.replace(b"head.lora_", b"fc1a.lora_")
    other = demo_math.marker_adapter(probe, 1, 1.0, fingerprint="sha256:" + "0" * 64)
    return {
        "corrupt": ({"adapter_model.safetensors": b"\x00garbage" * 20, "adapter_config.json": config}, 422, "adapter_model.safetensors"),
        "truncated": ({"adapter_model.safetensors": weights[: len(weights) // 2], "adapter_config.json": config}, 422, "adapter_model.safetensors"),
        "bad-config": ({"adapter_model.safetensors": weights, "adapter_config.json": b"{not json"}, 422, "adapter_config.json"),
        "wrong-shape": (wrong_shape, 422, "fc1a"),
        "other-base": (other, 422, "base model"),
        "missing-file": ({"adapter_model.safetensors": weights}, 400, "adapter_config.json"),
        "extra-file": ({**good, "evil.py": b"x"}, 400, "'evil.py'"),
    }


def test_bad_uploads_are_refused_and_previous_version_keeps_serving(daemon: RunningDaemon, demo_math: DemoMath) -> None:
    probe = digit_probe()
    r = daemon.upload("keeper", demo_math.marker_adapter(probe, 6, 3.0))
    assert r.status == 201, r.body
    version = r.json()["version"]
    before = logits_of(daemon.infer(probe, "keeper"))
    for case, (files, status, fragment) in _bad_uploads(demo_math).items():
        r = daemon.upload("keeper", files)
        assert r.status == status, (case, r.body)
        assert fragment in r.json()["error"], (case, r.json())
        assert daemon.adapters()["keeper"]["version"] == version, case
        after = daemon.infer(probe, "keeper")
        assert after.json()["parameters"]["adapter_version"] == version
        np.testing.assert_array_equal(logits_of(after), before)
    r = daemon.upload("new-bad", _bad_uploads(demo_math)["corrupt"][0])
    assert r.status == 422 and "new-bad" not in daemon.adapters()


def test_upload_needs_multipart(daemon: RunningDaemon) -> None:
    r = daemon.request("PUT", f"/v2/models/{MODEL}/adapters/x", json_body={"a": 1})
    assert r.status == 415 and "multipart/form-data" in r.json()["error"]


def test_bad_adapter_name_is_400(daemon: RunningDaemon, demo_math: DemoMath) -> None:
    r = daemon.upload(".hidden", demo_math.marker_adapter(digit_probe(), 1, 1.0))
    assert r.status == 400 and ".hidden" in r.json()["error"]


def test_delete(daemon: RunningDaemon, demo_math: DemoMath) -> None:
    assert daemon.upload("doomed", demo_math.marker_adapter(digit_probe(), 2, 1.0)).status == 201
    r = daemon.request("DELETE", f"/v2/models/{MODEL}/adapters/doomed")
    assert r.status == 200 and "doomed" not in daemon.adapters()
    assert daemon.infer(digit_probe(), "doomed").status == 404
    assert daemon.request("DELETE", f"/v2/models/{MODEL}/adapters/doomed").status == 404


def test_metrics_after_traffic(daemon: RunningDaemon) -> None:
    daemon.infer(_pixels(), DEMO_ADAPTERS[0])
    daemon.infer(_pixels(), "no-such-adapter")
    text = daemon.request("GET", "/metrics").body.decode()
    for name in (
        "lorad_request_duration_seconds_bucket",
        "lorad_request_errors_total",
        "lorad_adapter_cache_hits_total",
        "lorad_adapter_cache_misses_total",
        "lorad_adapter_cache_evictions_total",
        "lorad_adapter_cache_bytes",
        "lorad_adapter_cache_budget_bytes",
        "lorad_adapter_swaps_total",
        'lorad_backend_info{active="cpu",requested="cpu"} 1.0',
        "lorad_ready 1.0",
    ):
        assert name in text, name
    assert 'endpoint="/v2/models/{model}/infer"' in text and 'adapter_kind="adapter"' in text
    assert 'code="404"' in text


def test_addr_file(daemon: RunningDaemon) -> None:
    doc = json.loads((daemon.state_dir / "lorad.addr").read_text())
    assert doc["url"] == daemon.url and doc["model"] == MODEL
