"""Bearer-token authentication of state-changing endpoints.

The token lives in a file created at first start with mode 0600 (written atomically);
``loractl`` reads the same file. Comparison is in constant time. On the Unix socket the
socket file's permissions are the authentication, so requests arriving there pass.
"""

from __future__ import annotations

import hmac
import secrets
import stat
from pathlib import Path

from lorad.adapters.fsutil import atomic_write_bytes

__all__ = ["AuthError", "ensure_token", "read_token", "check_bearer"]

_MIN_TOKEN_CHARS = 16


class AuthError(RuntimeError):
    """The token file is missing, unreadable, too open or empty."""


def ensure_token(path: Path) -> str:
    """Return the token in ``path``, creating the file (mode 0600) with a fresh one if absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = secrets.token_urlsafe(32)
        atomic_write_bytes(path, (token + "\n").encode("ascii"), mode=0o600)
        return token
    return read_token(path, check_mode=True)


def read_token(path: Path, *, check_mode: bool = False) -> str:
    """The token stored in ``path``.

    With ``check_mode`` (the daemon), a file readable or writable by group or others is
    refused: anyone who can read it can change the daemon's adapters.
    """
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as e:
        raise AuthError(f"cannot read the API token file {str(path)!r}: {e.strerror or e}") from e
    if check_mode and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuthError(
            f"API token file {str(path)!r} has mode {stat.S_IMODE(st.st_mode):04o}; "
            f"it must be accessible by its owner only (chmod 600 {path})"
        )
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    if len(token) < _MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise AuthError(
            f"API token file {str(path)!r} does not hold a token (one line of at least "
            f"{_MIN_TOKEN_CHARS} printable ASCII characters); delete it to have a new one made"
        )
    return token


def check_bearer(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header value carries ``token`` (constant-time compare)."""
    if not authorization:
        return False
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode("utf-8", "surrogateescape"), token.encode("ascii"))

