"""``loractl fleet`` for operators (issue 25, part 6): every mistake is an exit code other
than 0 and a message that says what to do, ``--json`` errors are JSON, a closed pipe is
quiet, and the commands that sign or read metadata start fast, checking their broker
arguments before anything slow. Against the real Mosquitto where a broker is involved."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.mosquitto import Broker
from lorad.daemon.demo import demo_adapter_dirs, demo_model_path
from lorad.ota.cli import main
from lorad.ota.repository import FleetRepository
from lorad.ota.status import DeviceStatus, StatusReporter

REPO_ROOT = Path(__file__).resolve().parents[2]
FINGERPRINT = "sha256:" + "0" * 64


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _publish(repo: Path, *extra: str) -> list[str]:
    return ["fleet", "publish", str(repo), "--name", "invert", "--adapter", str(demo_adapter_dirs()["invert"]),
            "--base-fingerprint", FINGERPRINT, *extra]


def _loractl() -> list[str]:
    exe = Path(sys.executable).parent / "loractl"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lorad.daemon.ctl"]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return rc, out, err


# --- keys --------------------------------------------------------------------------------

def test_a_missing_or_wrong_key_dir_is_an_error_that_says_what_to_do(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    offline, other = tmp_path / "media", tmp_path / "other"
    assert main(["fleet", "init", str(tmp_path / "fleet"), "--key-dir", str(offline)]) == 0
    assert main(["fleet", "init", str(tmp_path / "elsewhere"), "--key-dir", str(other)]) == 0
    repo = tmp_path / "fleet"
    capsys.readouterr()
    before = _tree(repo)
    # the keys are on the offline media and not named: refused, naming the role and --key-dir
    rc, _, err = _run(_publish(repo, "--all", "--no-push"), capsys)
    assert rc == 1 and "role targets needs 1 of its private keys" in err and "--key-dir" in err, err
    for key_dir, words in ((tmp_path / "nope", "no such directory"),
                           (other, "holds no private key of the repository")):
        rc, _, err = _run(_publish(repo, "--all", "--no-push", "--key-dir", str(key_dir)), capsys)
        assert rc == 2 and words in err, err
    rc, out, _ = _run(["--json", *_publish(repo, "--all", "--no-push", "--key-dir", str(tmp_path / "nope"))], capsys)
    doc = json.loads(out)
    assert rc == 2 and doc["exit_code"] == 2 and "no such directory" in doc["error"]
    assert _tree(repo) == before
    assert _run(_publish(repo, "--all", "--no-push", "--key-dir", str(offline)), capsys)[0] == 0
    # keys in REPO/keys and a --key-dir of another repository: not silently passed over
    assert main(["fleet", "init", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    rc, _, err = _run(_publish(tmp_path / "plain", "--all", "--no-push", "--key-dir", str(other)), capsys)
    assert rc == 2 and "holds no private key" in err
    rc, _, err = _run(["fleet", "init", str(tmp_path / "two"), "--key-dir", str(offline), "--key-dir", str(other)],
                      capsys)
    assert rc == 2 and "--key-dir given 2 times" in err and not (tmp_path / "two").exists()


# --- audiences ---------------------------------------------------------------------------

def test_a_group_or_device_no_known_device_is_in_is_refused_unless_allowed(
        mqtt: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "fleet"
    assert main(["fleet", "init", str(repo)]) == 0
    capsys.readouterr()
    ok = mqtt.fleet_args()
    StatusReporter(mqtt.connect("dev1"), "dev1").publish(DeviceStatus(device_id="dev1", groups=("east",)))
    before = _tree(repo)
    rc, _, err = _run(_publish(repo, "--group", "eats", *ok), capsys)  # a typo
    assert rc == 1 and "unknown group eats" in err and "their groups: east" in err
    assert "--allow-empty-audience" in err and _tree(repo) == before
    rc, _, err = _run(_publish(repo, "--device", "dev9", *ok), capsys)
    assert rc == 1 and "unknown device dev9" in err and _tree(repo) == before
    # --no-push knows only the repository's record: empty so far
    rc, _, err = _run(_publish(repo, "--group", "east", "--no-push"), capsys)
    assert rc == 1 and "unknown group east" in err and "members.json" in err
    rc, out, _ = _run(["--json", *_publish(repo, "--group", "east", *ok)], capsys)
    assert rc == 0 and json.loads(out)["version"] == 1
    assert FleetRepository(repo).known_members() == {"dev1": ("east",)}
    assert _run(_publish(repo, "--group", "east", "--no-push"), capsys)[0] == 0  # from the record now
    assert _run(_publish(repo, "--group", "eats", "--no-push", "--allow-empty-audience"), capsys)[0] == 0
    rc, _, err = _run(_publish(repo, "--no-push", *[f"--device=d{i}" for i in range(101)]), capsys)
    assert rc == 2 and "at most 100 devices" in err


# --- rollouts ----------------------------------------------------------------------------

def test_rollout_run_exits_0_only_when_done_and_status_reads_as_json_and_prometheus(
        mqtt: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Three devices report a status but never install (nothing runs their update): the
    rollout is still running when --max-time passes (exit 5), then paused (exit 5)."""
    repo = tmp_path / "fleet"
    assert main(["fleet", "init", str(repo)]) == 0
    for d in ("dev1", "dev2", "dev3"):
        StatusReporter(mqtt.connect(d), d).publish(DeviceStatus(device_id=d, groups=mqtt.devices[d]))
    ok = mqtt.fleet_args()
    assert main(["fleet", "rollout", "create", str(repo), "r1", "--name", "invert", "--adapter",
                 str(demo_adapter_dirs()["invert"]), "--base-fingerprint", FINGERPRINT, "--stages", "50%,100%",
                 "--device-timeout", "none", *ok]) == 0
    capsys.readouterr()
    rc, out, _ = _run(["--json", "fleet", "rollout", "run", str(repo), "r1", "--max-time", "0.5", *ok], capsys)
    doc = json.loads(out)
    assert rc == 5 and doc["exit_code"] == 5 and "still running at stage 1/2" in doc["error"]
    assert "run it again" in doc["error"] and doc["rollout"]["status"] == "running"
    assert doc["rollout"]["pending"] == doc["rollout"]["targeted"] == 2
    assert _run(["fleet", "rollout", "pause", str(repo), "r1"], capsys)[0] == 0
    rc, _, err = _run(["fleet", "rollout", "run", str(repo), "r1", *ok], capsys)
    assert rc == 5 and "is paused" in err and "fleet rollout resume" in err

    # status: JSON, the last counts without a broker, live ones with it, and Prometheus' format
    rc, out, _ = _run(["--json", "fleet", "rollout", "status", str(repo), "r1"], capsys)
    saved = json.loads(out)
    assert rc == 0 and saved["status"] == "paused" and saved["pending"] == 2 and saved["counted_at"] > 0
    rc, out, _ = _run(["fleet", "rollout", "status", str(repo), "r1", "--prometheus", *ok], capsys)
    assert rc == 0
    samples = {(s.name, s.labels.get("state") or s.labels.get("status")): s.value
               for f in text_string_to_metric_families(out) for s in f.samples}
    assert samples[("lorad_rollout_stage", None)] == 1 and samples[("lorad_rollout_stages", None)] == 2
    assert samples[("lorad_rollout_status", "paused")] == 1 and samples[("lorad_rollout_status", "running")] == 0
    assert samples[("lorad_rollout_devices", "pending")] == 2 and samples[("lorad_rollout_devices", "healthy")] == 0
    assert samples[("lorad_rollout_targeted_devices", None)] == 2
    rc, out, _ = _run(["--json", "fleet", "rollout", "status", str(repo)], capsys)  # every rollout
    assert rc == 0 and [r["rollout"] for r in json.loads(out)["rollouts"]] == ["r1"]
    rc, out, _ = _run(["--json", "fleet", "rollout", "status", str(repo), "r1", "--prometheus"], capsys)
    assert rc == 2 and "choose one output format" in json.loads(out)["error"]


# --- JSON, pipes, start-up ---------------------------------------------------------------

def _sh(command: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


def test_json_errors_are_json_and_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    py = sys.executable
    for argv in ([py, "-m", "lorad.ota.cli", "--json", "fleet", "publish", str(tmp_path)],
                 [*_loractl(), "fleet", "publish", str(tmp_path), "--json"],
                 [py, "-m", "lorad.ota.cli", "--json", "fleet", "nosuch"],
                 [py, "-m", "lorad.ota.cli", "--json", "fleet", "keys", str(tmp_path), "--bogus"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
        doc = json.loads(done.stdout)
        assert done.returncode == 2 and doc["exit_code"] == 2 and done.stderr == "", (argv, done)
        assert "--help" in doc["error"]
    # `| head`: the reader goes away after one line; the command ends at once, quietly
    for cmd in (_loractl(), [py, "-m", "lorad.ota.cli"]):
        out = tmp_path / f"broker-{len(cmd)}"
        done = _sh(" ".join(cmd) + f" fleet broker init {out} --devices 400 | head -n 1")
        assert done.returncode == 141 and done.stdout.startswith("broker configuration") and done.stderr == "", done


def test_a_closed_pipe_ends_a_watch_at_once(mqtt: Broker) -> None:
    StatusReporter(mqtt.connect("dev1"), "dev1").publish(DeviceStatus(device_id="dev1", groups=("east",)))
    start = time.monotonic()
    done = _sh(" ".join([*_loractl(), "fleet", "status", "--watch", "60", *mqtt.fleet_args()]) + " | head -n 1")
    assert done.returncode == 141 and json.loads(done.stdout)["device_id"] == "dev1" and done.stderr == "", done
    assert time.monotonic() - start < 30


_MODULES = """
import json, sys
from lorad.daemon.ctl import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "modules": sorted(sys.modules)}))
"""
_HEAVY = ("numpy", "onnx", "onnxruntime", "paho", "pydantic", "safetensors", "zstandard", "lorad.adapters.engine")


def _modules(*argv: str) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_MODULES), *argv], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    heavy = sorted(m for m in doc["modules"] if any(m == h or m.startswith(h + ".") for h in _HEAVY))
    return int(doc["rc"]), heavy


def test_metadata_commands_start_fast_and_check_the_broker_before_loading_a_model(tmp_path: Path) -> None:
    repo = tmp_path / "fleet"
    assert main(["fleet", "init", str(repo)]) == 0
    assert _modules("fleet", "keys", str(repo)) == (0, [])
    assert _modules("fleet", "expiry", str(repo), "timestamp", "3600", "--no-push") == (0, [])
    assert _modules("fleet", "rollout", "status", str(repo)) == (0, [])
    # a bad broker address is a usage error before the base model is opened
    rc, heavy = _modules(*_publish(repo, "--all", "--base-model", str(demo_model_path()), "--broker", "nohost"))
    assert rc == 2 and "onnxruntime" not in heavy and "lorad.adapters.engine" not in heavy, heavy
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    took = []
    for _ in range(3):
        start = time.perf_counter()
        done = subprocess.run([*_loractl(), "fleet", "keys", str(repo)], capture_output=True, text=True, timeout=60,
                              env=env, cwd=tmp_path)
        took.append(time.perf_counter() - start)
        assert done.returncode == 0 and "root version 1" in done.stdout
    assert min(took) < 1.0, took

