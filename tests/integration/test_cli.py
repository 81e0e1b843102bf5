"""``lorad`` and ``loractl`` as users run them: real processes, real daemon, --json output."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from lorad.adapters.peft_format import read_peft_dir
from lorad.daemon.demo import demo_adapter_dirs
from tests.integration.lorad_process import (
    DemoMath,
    RunningDaemon,
    digit_probe,
    loractl_command,
    lorad_command,
    run_loractl,
    run_lorad,
    start_daemon,
)


def ctl(daemon: RunningDaemon, *args: str) -> tuple[int, object, str]:
    """Run loractl against ``daemon`` (found through its state dir) with --json."""
    p = run_loractl("--state-dir", str(daemon.state_dir), "--json", *args)
    out = json.loads(p.stdout) if p.stdout.strip() else None
    return p.returncode, out, p.stderr


def test_help() -> None:
    for run in (run_lorad, run_loractl):
        p = run("--help")
        assert p.returncode == 0 and "usage:" in p.stdout
    assert "--port" in run_lorad("serve", "--help").stdout
    assert "exit codes" in run_loractl("--help").stdout


def test_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("server:\n  port: 9000\ncache:\n  budget_bytes: 8MiB\n")
    p = run_lorad("check-config", str(good), "--state-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["server"]["port"] == 9000 and doc["cache"]["budget_bytes"] == 8 * 1024**2

    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  port: 9000\n  listen_backlog: 5\n")
    p = run_lorad("check-config", str(bad))
    assert p.returncode == 2
    assert "server.listen_backlog" in p.stderr and "allowed keys" in p.stderr


@pytest.mark.parametrize(
    ("text", "key"),
    [("cahce:\n  budget_bytes: 1MiB\n", "cahce"), ("model:\n  device: gpu\n", "model.device"), ("cache:\n  budget_bytes: lots\n", "cache.budget_bytes")],
)
def test_serve_refuses_bad_config_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    cfg = tmp_path / "lorad.yaml"
    cfg.write_text(text)
    p = run_lorad("serve", "--config", str(cfg), "--port", "0", "--state-dir", str(tmp_path / "s"))
    assert p.returncode == 2
    assert key in p.stderr
    assert not (tmp_path / "s" / "lorad.addr").exists()


def test_serve_refuses_bad_flag(tmp_path: Path) -> None:
    p = run_lorad("serve", "--port", "70000", "--state-dir", str(tmp_path))
    assert p.returncode == 2 and "server.port" in p.stderr


def test_loractl_adapters(daemon: RunningDaemon, tmp_path: Path, demo_math: DemoMath) -> None:
    code, out, _ = ctl(daemon, "adapters", "list")
    assert code == 0 and isinstance(out, list)
    names = {a["name"] for a in out}
    assert set(demo_adapter_dirs()) <= names
    name = sorted(demo_adapter_dirs())[0]

    code, out, _ = ctl(daemon, "adapters", "inspect", name)
    assert code == 0 and out["name"] == name and out["targets"]  # type: ignore[index]

    code, out, err = ctl(daemon, "adapters", "pin", name)
    assert code == 0 and out["pinned"] is True and out["cached"] is True, err  # type: ignore[index]
    code, out, _ = ctl(daemon, "adapters", "unpin", name)
    assert code == 0 and out["pinned"] is False  # type: ignore[index]
    code, out, _ = ctl(daemon, "adapters", "evict", name)
    assert code == 0 and out["cached"] is False  # type: ignore[index]
    code, out, _ = ctl(daemon, "adapters", "load", name)
    assert code == 0 and out["cached"] is True  # type: ignore[index]

    # upload from a PEFT directory, then roll back
    d = tmp_path / "peft"
    d.mkdir()
    for fname, data in demo_math.marker_adapter(digit_probe(), 4, 1.5).items():
        (d / fname).write_bytes(data)
    code, out, err = ctl(daemon, "adapters", "upload", "cli-made", str(d))
    assert code == 0, err
    v1 = out["version"]  # type: ignore[index]
    code, out, _ = ctl(daemon, "adapters", "upload", "cli-made", str(d))
    assert out["version"] == v1 + 1  # type: ignore[index]
    code, out, _ = ctl(daemon, "adapters", "rollback", "cli-made", str(v1))
    assert code == 0 and out["version"] == v1  # type: ignore[index]
    code, out, _ = ctl(daemon, "adapters", "delete", "cli-made")
    assert code == 0


def test_loractl_options_after_the_command(daemon: RunningDaemon) -> None:
    p = run_loractl("adapters", "list", "--state-dir", str(daemon.state_dir), "--json")
    assert p.returncode == 0 and isinstance(json.loads(p.stdout), list)


def test_loractl_human_output(daemon: RunningDaemon) -> None:
    p = run_loractl("--state-dir", str(daemon.state_dir), "adapters", "list")
    assert p.returncode == 0
    header = p.stdout.splitlines()[0].split()
    assert header == ["NAME", "VERSION", "RANK", "BYTES", "CACHED", "PINNED", "STATE"]
    p = run_loractl("--state-dir", str(daemon.state_dir), "health")
    assert p.returncode == 0 and "ready yes" in p.stdout


def test_loractl_infer(daemon: RunningDaemon, tmp_path: Path) -> None:
    x = digit_probe()
    name = sorted(demo_adapter_dirs())[0]
    code, base, _ = ctl(daemon, "infer", "--input", f"pixels={json.dumps(x[0].tolist())}")
    assert code == 0 and base["parameters"]["adapter"] is None  # type: ignore[index]
    code, adapted, _ = ctl(daemon, "infer", "--adapter", name, "--input", f"pixels={json.dumps(x.tolist())}", "--output", "logits")
    assert code == 0 and adapted["parameters"]["adapter"] == name  # type: ignore[index]
    assert [o["name"] for o in adapted["outputs"]] == ["logits"]  # type: ignore[index]
    b = {o["name"]: o["data"] for o in base["outputs"]}["logits"]  # type: ignore[index]
    assert not np.allclose(b, adapted["outputs"][0]["data"])  # type: ignore[index]

    req = tmp_path / "req.json"
    req.write_text(json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": x.ravel().tolist()}]}))
    code, out, _ = ctl(daemon, "infer", "--data", str(req))
    assert code == 0 and {o["name"]: o["data"] for o in out["outputs"]}["logits"] == b  # type: ignore[index]


def test_loractl_exit_codes(daemon: RunningDaemon, tmp_path: Path) -> None:
    # with --json every error is one JSON object on stdout (nothing on stderr) and the exit code
    code, out, err = ctl(daemon, "adapters", "inspect", "ghost")
    assert code == 1 and not err and "'ghost'" in out["error"]  # type: ignore[index]
    assert out["status"] == 404 and out["exit_code"] == 1  # type: ignore[index]
    code, out, err = ctl(daemon, "infer", "--input", "pixels=[1,2]")
    assert code == 1 and "does not match" in out["error"]  # type: ignore[index]
    code, out, err = ctl(daemon, "infer", "--input", "nope=[1]")
    assert code == 2 and "nope" in out["error"] and out["status"] is None  # type: ignore[index]
    p = run_loractl("adapters", "frobnicate")
    assert p.returncode == 2
    p = run_loractl("--url", "http://127.0.0.1:1", "--json", "adapters", "list")
    assert p.returncode == 3 and "cannot talk to lorad" in json.loads(p.stdout)["error"] and not p.stderr
    # without --json the same error is a line on stderr
    p = run_loractl("--url", "http://127.0.0.1:1", "adapters", "list")
    assert p.returncode == 3 and p.stderr.startswith("loractl: cannot talk to lorad") and not p.stdout
    # a state change without a readable token file is a usage error, not a server refusal
    p = run_loractl("--url", daemon.url, "--token-file", str(tmp_path / "none"), "adapters", "load", "x")
    assert p.returncode == 2 and "token" in p.stderr
    # a wrong token: the server says no
    wrong = tmp_path / "wrong-token"
    wrong.write_text("w" * 40)
    p = run_loractl("--url", daemon.url, "--token-file", str(wrong), "adapters", "load", sorted(demo_adapter_dirs())[0])
    assert p.returncode == 1 and "401" in p.stderr


def test_unix_socket_small_limits_and_full_cache(tmp_path: Path) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="lorad-"))  # short: AF_UNIX paths are limited
    sock = sock_dir / "api.sock"
    cfg = tmp_path / "lorad.yaml"
    # each demo adapter takes 18752 bytes at slot rank 8: one fits the cache, two do not
    cfg.write_text("server:\n  max_request_bytes: 4KiB\ncache:\n  budget_bytes: 20KiB\n")
    d = start_daemon(tmp_path / "state", "--config", str(cfg), "--unix-socket", str(sock))
    try:
        assert d.unix_socket == str(sock)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        name = sorted(demo_adapter_dirs())[0]
        # over the socket the file mode authenticates: no token needed
        p = run_loractl("--unix-socket", str(sock), "--token-file", str(tmp_path / "none"), "--json", "adapters", "pin", name)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["pinned"] is True
        # TCP on at the same time, and still needs the token
        assert d.action(name, "unpin", token=None).status == 401
        # the cache is full of a pinned adapter: another one is refused with 503, not served torn
        other = sorted(demo_adapter_dirs())[1]
        r = d.action(other, "load")
        assert r.status == 503 and r.json()["error"]
        assert d.infer(np.zeros((1, 64), np.float32), other).status == 503
        assert d.action(name, "unpin").status == 200
        assert d.action(other, "load").json()["cached"] is True
        assert d.adapters()[name]["cached"] is False  # evicted, LRU
        # bodies above server.max_request_bytes are refused while streaming in
        r = d.infer(np.zeros((20, 64), np.float32))
        assert r.status == 413 and "4096" in r.json()["error"]
        files = read_peft_dir(demo_adapter_dirs()[name])
        r = d.upload("big", files)
        assert r.status == 413
    finally:
        assert d.stop() == 0, d.logs()
    assert not sock.exists()
    os.rmdir(sock_dir)


def test_restart_keeps_adapters_token_and_deletions(tmp_path: Path, demo_math: DemoMath) -> None:
    state = tmp_path / "state"
    d = start_daemon(state)
    try:
        demo = sorted(demo_adapter_dirs())
        assert d.request("DELETE", f"/v2/models/demo/adapters/{demo[0]}").status == 200
        r = d.upload("mine", demo_math.marker_adapter(digit_probe(), 5, 2.0))
        assert r.status == 201
        before = d.adapters()
        token = d.token
    finally:
        assert d.stop() == 0, d.logs()
    d = start_daemon(state)
    try:
        assert d.token == token
        after = d.adapters()
        assert demo[0] not in after  # a deleted demo adapter is not reinstalled
        assert {n: a["version"] for n, a in after.items()} == {n: a["version"] for n, a in before.items()}
        r = d.infer(digit_probe(), "mine")
        assert r.status == 200 and r.json()["parameters"]["adapter_version"] == before["mine"]["version"]
    finally:
        assert d.stop() == 0, d.logs()


@pytest.mark.parametrize(
    ("model_bytes", "targets", "fragment"),
    [(b"not an onnx file", None, "model.path"), (None, ["nothing.matches.*"], "model.targets")],
)
def test_serve_refuses_a_model_it_cannot_serve(tmp_path: Path, model_bytes: bytes | None, targets: list[str] | None, fragment: str) -> None:
    from lorad.daemon.demo import demo_model_path

    model = tmp_path / "model.onnx"
    model.write_bytes(model_bytes if model_bytes is not None else demo_model_path().read_bytes())
    cfg = tmp_path / "lorad.yaml"
    cfg.write_text(json.dumps({"model": {"name": "mine", "path": "model.onnx", **({"targets": targets} if targets else {})}}))
    p = run_lorad("serve", "--config", str(cfg), "--port", "0", "--state-dir", str(tmp_path / "s"))
    assert p.returncode == 1
    assert fragment in p.stderr
    assert not (tmp_path / "s" / "lorad.addr").exists()


@pytest.mark.parametrize("argv", [["lorad", "config-schema"], ["lorad", "--help"], ["loractl", "--help"],
                                  ["loractl", "fleet", "--help"]])
def test_a_closed_pipe_ends_the_command_quietly(argv: list[str]) -> None:
    """``lorad config-schema | head -1``: the reader is gone before the command writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, as after `head` exits
    command = lorad_command() if argv[0] == "lorad" else loractl_command()
    try:
        p = subprocess.run([*command, *argv[1:]], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert p.stderr == "", p.stderr  # no BrokenPipeError traceback, no "Exception ignored"
    # argparse's --help swallows the write error itself and exits 0; a command's output exits 141
    assert p.returncode == (0 if "--help" in argv else 141)


def test_human_output_is_rounded_and_labelled() -> None:
    from lorad.daemon.ctl.output import number
    from lorad.daemon.ctl.training import _render_audit, _render_privacy, _render_status

    assert number(5.990402655023825) == "5.99" and number(None) == "-" and number(3) == "3"
    running = _render_status({"state": "running", "run_id": 4, "adapter": "alice", "phase": "training",
                              "steps_done": 0, "planned_steps": 31, "epsilon": None, "epsilon_steps": None})
    assert "None" not in running and "no ε accounted by this run yet" in running
    done = _render_status({"state": "finished", "run_id": 4, "adapter": "alice", "status": "accepted",
                           "steps_done": 31, "planned_steps": 31, "version": 2, "reason": None,
                           "epsilon_spent": 5.990402655023825})
    assert "ε spent by this run 5.99 " in done and "None" not in done and "loractl privacy alice" in done
    ledger = _render_privacy({"adapter": "alice", "epsilon_spent": 5.990402655023825, "budget_epsilon": 8.0,
                              "budget_left": 2.009597344976175, "delta": 1e-5, "accountant": "rdp", "runs": []})
    assert "ε spent over all runs 5.99 of budget 8 (left 2.01)" in ledger
    result = {"adapter": "alice", "epsilon_estimate": 2.71828, "epsilon_estimate_lower": 2.2,
              "epsilon_lower_bound": 0.2634, "confidence": 0.95, "epsilon_accounted": 3.95237,
              "delta": 1e-5, "correct": 40, "guesses": 50, "canaries": 512, "inserted": 250,
              "configuration": "alice", "q": 0.25, "sigma": 1.1, "clip_norm": 0.1, "steps": 31,
              "noise_multiplier_applied": 1.1, "clip_norm_applied": 0.1, "consistent": True}
    audit = _render_audit(result)
    assert "accounted ε of one run at this configuration 3.95" in audit and "not the ledger's total" in audit
    assert "estimated ε 2.72 (lower confidence bound 2.2 at 0.95)" in audit and "fault" not in audit
    broken = _render_audit({**result, "epsilon_estimate": None, "epsilon_estimate_lower": None,
                            "noise_multiplier_applied": 0.0, "consistent": False})
    assert "estimated ε unbounded" in broken and "applied σ 0 " in broken and "INCONSISTENT" in broken
    assert "None" not in broken
