"""Authentication over real HTTP: every state-changing endpoint refuses a missing or wrong
token with 401 and changes nothing; reads and inference stay open."""

from __future__ import annotations

import hashlib
import os
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorad.daemon.ctl.client import multipart_body
from lorad.daemon.demo import demo_adapter_dirs
from tests.integration.lorad_process import MODEL, DemoMath, RunningDaemon, digit_probe, start_daemon

BAD_TOKENS = {
    "none": None,
    "empty": "",
    "wrong": "x" * 43,
    "prefix": "PREFIX",  # replaced by a prefix of the real token
    "basic": "BASIC",  # the real token under another scheme
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    d = start_daemon(tmp_path_factory.mktemp("lorad-sec") / "state")
    yield d
    assert d.stop() == 0, d.logs()


def _snapshot(d: RunningDaemon) -> tuple[object, dict[str, str]]:
    """What an attacker could change: the listing and every file under the registry."""
    files = {}
    for p in sorted((d.state_dir / "adapters").rglob("*")):
        if p.is_file():
            files[str(p.relative_to(d.state_dir))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return d.adapters(), files


def _send(d: RunningDaemon, method: str, path: str, token: str | None, kind: str, body: bytes | None, ctype: str | None) -> int:
    headers = {"Content-Type": ctype} if ctype else {}
    if kind == "basic":
        headers["Authorization"] = f"Basic {d.token}"
    elif kind == "prefix":
        headers["Authorization"] = f"Bearer {d.token[:-1]}"
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(d.url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        with e:
            assert e.headers.get("WWW-Authenticate", "").startswith("Bearer"), (method, path)
            assert b'"error"' in e.read()
            return int(e.code)


def test_state_changing_endpoints_need_the_token(daemon: RunningDaemon) -> None:
    name = sorted(demo_adapter_dirs())[0]
    upload_body, upload_type = multipart_body(DemoMath().marker_adapter(digit_probe(), 0, 9.0))
    base = f"/v2/models/{MODEL}/adapters"
    calls = [
        ("PUT", f"{base}/{name}", upload_body, upload_type),
        ("PUT", f"{base}/intruder", upload_body, upload_type),
        ("DELETE", f"{base}/{name}", None, None),
        ("POST", f"{base}/{name}/load", None, None),
        ("POST", f"{base}/{name}/pin", None, None),
        ("POST", f"{base}/{name}/unpin", None, None),
        ("POST", f"{base}/{name}/evict", None, None),
        ("POST", f"{base}/{name}/rollback", b'{"version": 1}', "application/json"),
    ]
    before = _snapshot(daemon)
    for kind, token in BAD_TOKENS.items():
        for method, path, body, ctype in calls:
            status = _send(daemon, method, path, token, kind, body, ctype)
            assert status == 401, (kind, method, path, status)
    assert _snapshot(daemon) == before
    # and the right token works (so the 401s were about the token)
    assert daemon.action(name, "load").status == 200


def test_reads_and_inference_stay_open(daemon: RunningDaemon) -> None:
    name = sorted(demo_adapter_dirs())[0]
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready",
                 f"/v2/models/{MODEL}/adapters", f"/v2/models/{MODEL}/adapters/{name}", "/metrics", "/v2/openapi.json"):
        assert daemon.request("GET", path, token=None).status == 200, path
    assert daemon.infer(digit_probe(), name).status == 200


def test_token_file_is_private(daemon: RunningDaemon) -> None:
    token_file = daemon.state_dir / "api-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(daemon.state_dir.stat().st_mode) & 0o077 == 0
    assert daemon.token not in daemon.logs()


def test_daemon_refuses_a_readable_token_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    token = state / "api-token"
    token.write_text("t" * 40 + "\n")
    os.chmod(token, 0o644)
    with pytest.raises(RuntimeError, match="chmod 600"):
        start_daemon(state)
