"""``loractl fleet federate``'s refusals, before anything is submitted to a SuperLink: bad
federation settings are usage errors naming the option and what is allowed (exit 2), an
``--out`` that holds another federation's rounds is refused (exit 1), and nothing is
signed in the repository either way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorad.ota.cli import main as fleet_main
from tests.integration.lorad_process import run_loractl

pytestmark = pytest.mark.federated


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    assert fleet_main(["fleet", "init", str(repo), "--threshold", "targets=1"]) == 0
    return repo


def _snapshot(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


def _federate(repo: Path, out: Path, *extra: str) -> tuple[int, dict[str, object]]:
    done = run_loractl("--json", "fleet", "federate", str(repo), "--name", "fleet", "--all", "--no-push",
                       "--base-fingerprint", "sha256:" + "0" * 64, "--superlink", "127.0.0.1:9",
                       "--insecure-superlink", "--out", str(out), *extra)
    return done.returncode, json.loads(done.stdout)


@pytest.mark.parametrize(("option", "message"), [
    (["--min-clients", "1"], "min-clients 1 (secure aggregation needs at least 2)"),
    (["--rounds", "0"], "rounds 0 (at least 1)"),
    (["--central-delta", "1.5"], "central-delta 1.5 (in (0, 1))"),
    (["--clip-norm", "0"], "clip-norm 0.0 (> 0)"),
    (["--fraction", "2"], "fraction 2.0 (in (0, 1])"),
])
def test_bad_settings_are_usage_errors_naming_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         option: list[str], message: str) -> None:
    repo = _repo(tmp_path)
    capsys.readouterr()
    before = _snapshot(repo)
    code, doc = _federate(repo, tmp_path / "rounds", *option)
    assert code == 2 and message in str(doc["error"]), doc
    assert _snapshot(repo) == before
    assert not (tmp_path / "rounds").exists()


def test_an_out_directory_with_another_federations_rounds_is_refused(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    repo = _repo(tmp_path)
    capsys.readouterr()
    (tmp_path / "rounds" / "round-0001").mkdir(parents=True)
    code, doc = _federate(repo, tmp_path / "rounds")
    assert code == 1 and "already holds rounds of another federation" in str(doc["error"]), doc
