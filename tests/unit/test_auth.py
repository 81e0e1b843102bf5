"""daemon.auth: the token file (created 0600, atomically) and the constant-time bearer check."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lorad.daemon.auth import AuthError, check_bearer, ensure_token, read_token


def test_token_file_created_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "api-token"
    token = ensure_token(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == token and len(token) >= 32
    assert not [p for p in path.parent.iterdir() if p.name != "api-token"]  # no temp file left


def test_token_is_stable_across_starts(tmp_path: Path) -> None:
    path = tmp_path / "api-token"
    assert ensure_token(path) == ensure_token(path) == read_token(path)


def test_tokens_differ_between_installs(tmp_path: Path) -> None:
    assert ensure_token(tmp_path / "a") != ensure_token(tmp_path / "b")


def test_daemon_refuses_a_token_file_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "api-token"
    ensure_token(path)
    os.chmod(path, 0o644)
    with pytest.raises(AuthError, match=r"mode 0644.*chmod 600"):
        ensure_token(path)
    read_token(path)  # loractl only reads it


@pytest.mark.parametrize("content", [b"", b"short", b"has space inside the token value", b"\xff" * 40])
def test_bad_token_file_content(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "api-token"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(AuthError, match="does not hold a token"):
        ensure_token(path)


def test_missing_token_file_for_reader(tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="cannot read the API token file"):
        read_token(tmp_path / "nope")


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Bearer s3cr3t-token-value-123", True),
        ("bearer s3cr3t-token-value-123", True),
        ("Bearer s3cr3t-token-value-12", False),
        ("Bearer s3cr3t-token-value-1234", False),
        ("Basic s3cr3t-token-value-123", False),
        ("s3cr3t-token-value-123", False),
        ("Bearer ", False),
        ("", False),
        (None, False),
        ("Bearer s3cr3t-token-value-123\u00e9", False),
    ],
)
def test_check_bearer(header: str | None, ok: bool) -> None:
    assert check_bearer(header, "s3cr3t-token-value-123") is ok
