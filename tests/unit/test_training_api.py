"""The trainer's HTTP routes inside the daemon's app (real server on port 0) and loractl's
train / privacy / examples commands against it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from lorad.daemon import ctl, http_api
from lorad.daemon.config import ConfigError, build_config
from lorad.daemon.ctl.client import ApiError, Client
from lorad.daemon.metrics import DaemonMetrics
from lorad.daemon.training_api import add_training_routes
from lorad.trainer.config import TrainerConfig, parse_trainer_section
from lorad.trainer.metrics import register_trainer_metrics
from lorad.trainer.run import TrainingRun
from lorad.trainer.service import LEDGER_FILE, TrainerService
from tests.integration.lorad_process import wait_until
from tests.unit.trainer_helpers import fill_store, inputs, labelled_by, make_service, teacher

TOKEN = "t" * 32


class _Server:
    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            host, port = self.runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _config() -> TrainerConfig:
    return parse_trainer_section({
        "testing": True, "noise": "seeded", "schedule": False, "isolate": False, "store": {"max_example_bytes": 20_000},
        "defaults": {"rank": 4, "alpha": 8, "noise_multiplier": 1.0, "batch_size": 8, "steps": 10,
                     "epochs": None, "target_epsilon": 100, "validation_margin": -100, "learning_rate": 0.01,
                     "min_train_examples": 1, "min_holdout_examples": 1, "gate_noise_multiplier": 1.0,
                     "budget_fraction": 1.0},
        "adapters": {"tiny-budget": {"target_epsilon": 0.01}},
    })


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, TrainerService, CollectorRegistry]]:
    with _stack(tmp_path) as served:
        yield served


@contextmanager
def _stack(tmp_path: Path) -> Iterator[tuple[str, TrainerService, CollectorRegistry]]:
    service = make_service(tmp_path)
    trainer = TrainerService(_config(), adapters=service, state_dir=tmp_path, proc_root=tmp_path, sys_root=tmp_path)
    registry = CollectorRegistry()
    metrics = DaemonMetrics(registry)
    register_trainer_metrics(registry, trainer)
    executor = ThreadPoolExecutor(2)
    app = http_api.make_app(http_api.ApiSettings(service=service, metrics=metrics, token=TOKEN, executor=executor,
                                                 max_request_bytes=1 << 20, ready=lambda: True))
    add_training_routes(app, trainer, http_api.protected, http_api.authenticated, executor=executor)
    trainer.start()
    server = _Server(app)
    (tmp_path / "token").write_text(TOKEN)
    try:
        yield server.url, trainer, registry
    finally:
        server.close()
        trainer.close()
        executor.shutdown()


def _client(url: str, token: bool = True) -> Client:
    return Client(url=url, token=(lambda: TOKEN) if token else None, timeout=10)


def _example(x: Any, label: int) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, *x.shape], "data": x.ravel().tolist()}],
            "label": label}


def _fill(url: str, trainer: TrainerService, adapter: str, n: int) -> None:
    x = inputs(n, seed=4)
    labels = labelled_by(trainer.adapters, teacher(trainer.adapters), x)
    c = _client(url)
    for row, label in zip(x, labels, strict=True):
        c.call("POST", f"/v2/models/demo/adapters/{adapter}/examples", json_body=_example(row, int(label)), auth=True)


def test_examples_need_auth_and_are_checked(stack: tuple[str, TrainerService, CollectorRegistry]) -> None:
    url, _trainer, _ = stack
    path = "/v2/models/demo/adapters/alice/examples"
    x = inputs(1, seed=1)[0]
    with pytest.raises(ApiError) as e:
        _client(url, token=False).call("POST", path, json_body=_example(x, 1), auth=True)
    assert e.value.status == 401
    doc = _client(url).call("POST", path, json_body=_example(x, 1), auth=True)
    assert doc == {"id": 1, "adapter": "alice", "examples": 1}
    for body, status, words in [
        (_example(x, 9), 422, "not a class"),
        ({**_example(x, 1), "extra": 1}, 400, "nothing else"),
        ({"inputs": [], "label": 1}, 400, "inputs"),
        ({**_example(x, 1), "label": "cat"}, 400, "label"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4, 32], "data": [0.0] * 256}], "label": 1},
         422, "one example"),
    ]:
        with pytest.raises(ApiError) as e:
            _client(url).call("POST", path, json_body=body, auth=True)
        assert e.value.status == status and words in e.value.message, e.value.message
    with pytest.raises(ApiError) as e:
        _client(url).call("POST", path, body=b"[" * 30_000, content_type="application/json", auth=True)
    assert e.value.status == 413 and "max_example_bytes" in e.value.message
    with pytest.raises(ApiError) as e:
        _client(url).call("POST", "/v2/models/other/adapters/alice/examples", json_body=_example(x, 1), auth=True)
    assert e.value.status == 404
    assert _client(url).call("GET", path, auth=True) == {"adapter": "alice", "examples": 1}
    # The exact count is private: runs are planned from a noisy estimate of it.
    with pytest.raises(ApiError) as e:
        _client(url, token=False).call("GET", path, auth=True)
    assert e.value.status == 401
    assert "examples" not in _client(url, token=False).call("GET", path.replace("examples", "train"))


def test_train_progress_privacy_and_metrics(stack: tuple[str, TrainerService, CollectorRegistry],
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url, trainer, registry = stack
    _fill(url, trainer, "alice", 40)
    common = ["--url", url, "--token-file", str(tmp_path / "token")]
    assert ctl.main(["train", "alice", "--poll", "0.05", *common]) == 0
    out = capsys.readouterr().out
    assert "accepted" in out and "serving version 1" in out

    assert ctl.main(["privacy", "alice", "--json", *common]) == 0
    state = json.loads(capsys.readouterr().out)
    (run,) = state["runs"]
    assert {"q", "sigma", "clip_norm", "steps_charged", "examples", "accountant", "delta", "started_at",
            "ended_at"} <= set(run)
    assert run["sigma"] == 1.0 and run["steps_charged"] == 10 and state["epsilon_spent"] > 0
    assert ctl.main(["privacy", *common]) == 0
    assert "alice: ε spent" in capsys.readouterr().out

    progress = _client(url).call("GET", "/v2/models/demo/adapters/alice/train")
    assert progress["state"] == "finished" and progress["status"] == "accepted"

    value = registry.get_sample_value
    assert value("lorad_privacy_epsilon_spent", {"adapter": "alice"}) == pytest.approx(state["epsilon_spent"])
    assert value("lorad_training_runs_total", {"result": "accepted"}) == 1
    assert value("lorad_training_runs_total", {"result": "failed"}) == 0
    assert value("lorad_training_steps_total") == 10
    assert value("lorad_training_examples_stored", {"adapter": "alice"}) is None  # the exact count is private
    assert value("lorad_training_available") == 1


def test_budget_refusal_and_cancel_conflicts(stack: tuple[str, TrainerService, CollectorRegistry]) -> None:
    url, trainer, _ = stack
    _fill(url, trainer, "tiny-budget", 20)
    with pytest.raises(ApiError) as e:
        _client(url).call("POST", "/v2/models/demo/adapters/tiny-budget/train", auth=True)
    assert e.value.status == 409 and "privacy budget" in e.value.message
    with pytest.raises(ApiError) as e:
        _client(url).call("POST", "/v2/models/demo/adapters/tiny-budget/train/cancel", auth=True)
    assert e.value.status == 409
    status = _client(url).call("POST", "/v2/trainer/pause", auth=True)
    assert status["paused"] is True
    assert _client(url).call("POST", "/v2/trainer/resume", auth=True)["paused"] is False


def test_examples_add_command(stack: tuple[str, TrainerService, CollectorRegistry], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    url, trainer, _ = stack
    common = ["--url", url, "--token-file", str(tmp_path / "token")]
    x = inputs(2, seed=3)
    lines = [json.dumps({"inputs": {"x": row.tolist()}, "label": 1}) for row in x]
    (tmp_path / "ex.jsonl").write_text("\n".join(lines) + "\n")
    assert ctl.main(["examples", "add", "bob", "--file", str(tmp_path / "ex.jsonl"), *common]) == 0
    assert ctl.main(["examples", "add", "bob", "--input", f"x={json.dumps(x[0].tolist())}", "--label", "2",
                     *common]) == 0
    assert "it now has 3" in capsys.readouterr().out
    assert ctl.main(["examples", "count", "bob", *common]) == 0
    assert "bob: 3 examples" in capsys.readouterr().out
    assert ctl.main(["examples", "add", "bob", "--input", "x=[1]", *common]) == 2
    assert ctl.main(["examples", "delete", "bob", *common]) == 0
    assert "bob: deleted 3 examples" in capsys.readouterr().out
    assert trainer.examples_count("bob") == 0


def test_deleting_examples_needs_auth_and_waits_for_a_running_run(
        stack: tuple[str, TrainerService, CollectorRegistry]) -> None:
    url, trainer, _ = stack
    _fill(url, trainer, "alice", 30)
    path = "/v2/models/demo/adapters/alice/examples"
    with pytest.raises(ApiError) as e:
        _client(url, token=False).call("DELETE", path, auth=True)
    assert e.value.status == 401 and trainer.examples_count("alice") == 30
    trainer.scheduler.pause()  # the run stays queued or running between steps
    _client(url).call("POST", "/v2/models/demo/adapters/alice/train", auth=True)
    with pytest.raises(ApiError) as e:
        _client(url).call("DELETE", path, auth=True)
    assert e.value.status == 409 and "cancel it" in e.value.message
    _client(url).call("POST", "/v2/models/demo/adapters/alice/train/cancel", auth=True)
    trainer.scheduler.resume()
    deadline = time.monotonic() + 30
    while (trainer.scheduler.adapter_status("alice") or {}).get("state") != "finished" and time.monotonic() < deadline:
        time.sleep(0.05)
    spent = trainer.privacy_state("alice")["epsilon_spent"]
    assert _client(url).call("DELETE", path, auth=True) == {"adapter": "alice", "deleted": 30, "examples": 0}
    assert trainer.privacy_state("alice")["epsilon_spent"] == spent  # deleting data does not refund ε


def test_config_section_and_request_counter(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        build_config({"trainer": {"noise": "seeded"}}, base_dir=tmp_path, environ={})
    assert e.value.key == "trainer.noise" and "secure" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config({"trainer": {"nonsense": 1}}, base_dir=tmp_path, environ={})
    assert e.value.key == "trainer.nonsense"
    registry = CollectorRegistry()
    metrics = DaemonMetrics(registry)
    count = metrics.inference_requests
    metrics.request_seconds.labels(endpoint="/v2/models/{model}/infer", adapter_kind="base").observe(0.01)
    metrics.request_seconds.labels(endpoint="/v2/models/{model}/infer", adapter_kind="adapter").observe(0.01)
    metrics.request_seconds.labels(endpoint="/metrics", adapter_kind="none").observe(0.01)
    assert count() == 2.0


def test_privacy_audit_over_http_and_loractl(stack: tuple[str, TrainerService, CollectorRegistry],
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url, trainer, _ = stack
    path = "/v2/models/demo/adapters/alice/privacy/audit"
    with pytest.raises(ApiError) as e:
        _client(url, token=False).call("POST", path, json_body={}, auth=True)
    assert e.value.status == 401
    for body, words in [({"canaries": 3}, "from 8"), ({"sigma": 1}, "optional"), ([], "optional")]:
        with pytest.raises(ApiError) as e:
            _client(url).call("POST", path, json_body=body, auth=True)
        assert e.value.status == 400 and words in e.value.message, e.value.message
    with pytest.raises(ApiError) as e:
        _client(url).call("POST", path, json_body={"canaries": 16}, auth=True)
    assert e.value.status == 422 and "no training examples" in e.value.message
    _fill(url, trainer, "alice", 30)
    with pytest.raises(ApiError) as e:  # the directions are orthogonal: at most one per parameter
        _client(url).call("POST", path, json_body={"canaries": 100_000}, auth=True)
    assert e.value.status == 422 and "at most" in e.value.message, e.value.message
    # The noise removed, σ still accounted: a violation.
    doc = _client(url).call("POST", path, json_body={"canaries": 64, "noise_multiplier": 0}, auth=True)
    assert isinstance(doc, dict) and doc["noise_multiplier_applied"] == 0.0 and doc["sigma"] == 1.0
    assert doc["epsilon_accounted"] > 0 and doc["consistent"] is False
    assert doc["canaries"] == 64 and doc["guesses"] == 16 and 0 <= doc["correct"] <= 16
    assert "Andrew et al." in doc["method"] and {"epsilon_estimate", "epsilon_estimate_lower"} <= set(doc)
    code = ctl.main(["privacy", "audit", "alice", "--canaries", "32", "--url", url,
                     "--token-file", str(tmp_path / "token")])
    out = capsys.readouterr().out
    assert "estimated ε" in out and "rigorous lower bound" in out and "accounted ε" in out
    assert code == (0 if "consistent:" in out else 1)
    assert trainer.ledger.state("alice").runs == []  # the audit charges nothing


# ---------------------------------------------------------------- the privacy boundary

#: Metric families of the requests themselves (traffic, not stored data: they move when
#: anyone calls the API, whatever is stored) and of the process.
_TRAFFIC = ("lorad_request_", "process_", "python_")


def _open_gets(url: str, adapter: str) -> dict[str, Any]:
    """Every GET route of the shipped OpenAPI document that needs no token, answered
    without one (the trainer's and the serving API's alike)."""
    import yaml

    doc = yaml.safe_load((Path(http_api.__file__).parent / "openapi.yaml").read_text())
    client = _client(url, token=False)
    answers: dict[str, Any] = {}
    for path, ops in doc["paths"].items():
        get = ops.get("get")
        if get is None or get.get("security") or path in ("/metrics", "/v2/openapi.json"):
            continue
        concrete = path.replace("{model}", "demo").replace("{adapter}", adapter)
        try:
            answers[path] = client.call("GET", concrete)
        except ApiError as e:
            answers[path] = (e.status, e.message)
    return answers


def _families(registry: CollectorRegistry) -> dict[str, list[tuple[str, tuple[tuple[str, str], ...], float]]]:
    return {m.name: sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in m.samples)
            for m in registry.collect() if not m.name.startswith(_TRAFFIC)}


def test_open_routes_and_metrics_do_not_depend_on_stored_examples(
        stack: tuple[str, TrainerService, CollectorRegistry]) -> None:
    # The auditor's probes: threshold probing on open routes, presence by metric series.
    # Two neighbouring stores (erin with 0, then with 130 examples; alice with 40 more):
    # every open route and every metric family answers the same.
    url, trainer, registry = stack
    before = (_open_gets(url, "erin"), _open_gets(url, "alice"), _families(registry))
    _fill(url, trainer, "erin", 130)
    _fill(url, trainer, "alice", 40)
    after = (_open_gets(url, "erin"), _open_gets(url, "alice"), _families(registry))
    assert before == after
    assert not any("erin" in str(label) for family in after[2].values() for _, label, _ in family)


def test_run_details_are_behind_the_token(stack: tuple[str, TrainerService, CollectorRegistry]) -> None:
    url, trainer, _ = stack
    _fill(url, trainer, "alice", 40)
    _client(url).call("POST", "/v2/models/demo/adapters/alice/train", auth=True)
    wait_until(lambda: _client(url).call("GET", "/v2/models/demo/adapters/alice/train", auth=True)["state"]
               == "finished", 120, "the run")
    anonymous, owner = _client(url, token=False), _client(url)
    path = "/v2/models/demo/adapters/alice/train"
    public = anonymous.call("GET", path)
    assert set(public) == {"state", "adapter", "run_id", "status", "version", "available"}
    full = owner.call("GET", path, auth=True)
    assert {"steps_done", "planned_steps", "reason", "epsilon_spent"} <= set(full)
    status = anonymous.call("GET", "/v2/trainer")
    assert set(status) == {"available", "unavailable_reason", "backend", "running", "paused", "automatic", "current"}
    assert {"blocked", "backoff", "last", "queued"} <= set(owner.call("GET", "/v2/trainer", auth=True))
    privacy = anonymous.call("GET", "/v2/models/demo/adapters/alice/privacy")
    assert privacy["runs"] and not {"started_at", "ended_at", "energy_joules"} & set(privacy["runs"][0])
    assert "energy_joules" not in privacy
    assert {"started_at", "ended_at"} <= set(owner.call("GET", "/v2/models/demo/adapters/alice/privacy",
                                                         auth=True)["runs"][0])
    # What the public report keeps is enough to recompute ε.
    from lorad.trainer.accountant import epsilon
    from lorad.trainer.ledger import run_charges

    assert epsilon(runs=[c for r in privacy["runs"] for c in run_charges(r)], delta=privacy["delta"],
                   accountant=privacy["accountant"]) == pytest.approx(privacy["epsilon_spent"])


def test_the_fleet_hears_no_private_reason() -> None:
    from lorad.daemon.ota_wiring import TrainNowRefusedError, _train_now_of

    def refuse(adapter: str) -> None:
        raise ValueError("too few examples: 99 of 100")

    with pytest.raises(TrainNowRefusedError) as e:
        _train_now_of(refuse)("alice")
    assert "99" not in str(e.value) and "private to the device" in str(e.value)


def test_a_lost_ledger_never_reports_less_than_the_stored_versions(tmp_path: Path) -> None:
    """The ledger file deleted after a run: the privacy API and the metrics still report at
    least the ε the version that run installed records, and say the ledger lacks the run."""
    service = make_service(tmp_path)
    first = TrainerService(_config(), adapters=service, state_dir=tmp_path, proc_root=tmp_path, sys_root=tmp_path)
    try:
        x = inputs(40, seed=4)
        fill_store(first.store, "alice", x, labelled_by(service, teacher(service), x))
        run = TrainingRun(first.env, "alice", first.config.for_adapter("alice"))
        run.begin()
        assert run.execute().status == "accepted"
        spent = first.privacy_state("alice")["epsilon_spent"]
        assert spent > 0 and service.registry.get("alice").meta["epsilon_spent"] == spent
    finally:
        first.close()
    (tmp_path / "trainer" / LEDGER_FILE).unlink()

    with _stack(tmp_path) as (url, _, registry):
        for token in (True, False):
            state = _client(url, token).call("GET", "/v2/models/demo/adapters/alice/privacy")
            assert state["runs"] == [] and state["epsilon_spent"] == pytest.approx(spent)
            (missing,) = state["ledger_missing_runs"]
            assert (missing["version"], missing["run_id"], missing["epsilon_spent"]) == (1, run.run_id, spent)
            assert state["delta"] == missing["delta"] and state["delta"] is not None
            assert f"it lacks run {run.run_id} (version 1)" in state["ledger_warning"]
        assert [s["adapter"] for s in _client(url).call("GET", "/v2/models/demo/privacy")] == ["alice"]
        value = registry.get_sample_value
        assert value("lorad_privacy_epsilon_spent", {"adapter": "alice"}) == pytest.approx(spent)
        assert value("lorad_privacy_epsilon_remaining", {"adapter": "alice"}) == pytest.approx(100 - spent)
        assert value("lorad_privacy_ledger_missing_runs", {"adapter": "alice"}) == 1
        with pytest.raises(ApiError) as e:  # and no new run starts
            _client(url).call("POST", "/v2/models/demo/adapters/alice/train", auth=True)
        assert e.value.status == 422 and "does not record" in e.value.message
