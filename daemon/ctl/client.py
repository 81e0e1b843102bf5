"""A small blocking HTTP client of the lorad API (stdlib only), over TCP or a Unix socket."""

from __future__ import annotations

import http.client
import json
import socket
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

__all__ = ["Client", "ApiError", "ConnectError", "UsageError", "multipart_body", "quoted"]


class ApiError(Exception):
    """The server answered with an error status; ``message`` is its ``error`` text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class ConnectError(Exception):
    """The daemon could not be reached."""


class UsageError(Exception):
    """The command line or local files are wrong (exit code 2)."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def multipart_body(files: Mapping[str, bytes]) -> tuple[bytes, str]:
    """``multipart/form-data`` body carrying ``files`` by name; returns (body, content type)."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, data in files.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        parts.append(data)
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Client:
    """Talks to one daemon. ``token`` is read lazily: only state-changing calls over TCP need it."""

    def __init__(
        self,
        *,
        url: str | None = None,
        unix_socket: Path | None = None,
        token: Callable[[], str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        if (url is None) == (unix_socket is None):
            raise ValueError("give exactly one of url and unix_socket")
        self._unix = str(unix_socket) if unix_socket is not None else None
        self._url = urlsplit(url) if url is not None else None
        if self._url is not None and (self._url.scheme not in ("http", "https") or not self._url.hostname):
            raise UsageError(f"bad --url {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        self._token = token
        self._timeout = timeout

    @property
    def where(self) -> str:
        return f"unix:{self._unix}" if self._unix else (self._url.geturl() if self._url else "?")

    def _connection(self) -> http.client.HTTPConnection:
        if self._unix is not None:
            return _UnixHTTPConnection(self._unix, self._timeout)
        assert self._url is not None
        cls = http.client.HTTPSConnection if self._url.scheme == "https" else http.client.HTTPConnection
        return cls(self._url.hostname or "localhost", self._url.port, timeout=self._timeout)

    def call(
        self,
        method: str,
        path: str,
        *,
        json_body: object = None,
        body: bytes | None = None,
        content_type: str | None = None,
        auth: bool | Literal["optional"] = False,
    ) -> object:
        """One request; the decoded JSON answer, or :class:`ApiError`/:class:`ConnectError`."""
        if json_body is not None:
            body = json.dumps(json_body).encode()
            content_type = "application/json"
        _, data = self._send(method, path, body=body, content_type=content_type, auth=auth, accept="application/json")
        text = data.decode("utf-8", "replace")
        try:
            doc: object = json.loads(text) if text else None
        except ValueError:
            doc = text
        return doc

    def events(self, path: str, *, json_body: object) -> Iterator[dict[str, Any]]:
        """POST ``json_body`` and yield each server-sent event's JSON as it arrives."""
        conn = self._connection()
        prefix = self._url.path.rstrip("/") if self._url is not None else ""
        try:
            try:
                conn.request("POST", prefix + path, body=json.dumps(json_body).encode(),
                             headers={"Accept": "text/event-stream", "Content-Type": "application/json"})
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                raise ConnectError(f"cannot talk to lorad at {self.where}: {e}") from e
            if response.status >= 400:
                text = response.read().decode("utf-8", "replace")
                try:
                    doc = json.loads(text)
                except ValueError:
                    doc = None
                raise ApiError(response.status, str(doc.get("error") if isinstance(doc, dict) else text or response.reason))
            while True:
                try:
                    line = response.readline()
                except (OSError, http.client.HTTPException) as e:
                    raise ConnectError(f"the stream from lorad at {self.where} broke: {e}") from e
                if not line:
                    return
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    if isinstance(event, dict):
                        yield event
        finally:
            conn.close()

    def fetch(self, path: str, *, accept: str, auth: bool = False) -> tuple[dict[str, str], bytes]:
        """A GET whose answer is not JSON: (response headers, body)."""
        return self._send("GET", path, body=None, content_type=None, auth=auth, accept=accept)

    def _send(
        self, method: str, path: str, *, body: bytes | None, content_type: str | None, auth: bool | Literal["optional"],
        accept: str
    ) -> tuple[dict[str, str], bytes]:
        headers = {"Accept": accept}
        if content_type:
            headers["Content-Type"] = content_type
        if auth and self._unix is None and self._token is not None:
            try:
                headers["Authorization"] = f"Bearer {self._token()}"
            except Exception:
                # A read answered in full with the token and in part without: go without.
                if auth != "optional":
                    raise
        prefix = self._url.path.rstrip("/") if self._url is not None else ""
        conn = self._connection()
        try:
            try:
                conn.request(method, prefix + path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as e:
                raise ConnectError(f"cannot talk to lorad at {self.where}: {e}") from e
        finally:
            conn.close()
        if response.status >= 400:
            text = data.decode("utf-8", "replace")
            try:
                doc: object = json.loads(text) if text else None
            except ValueError:
                doc = text
            message = doc.get("error") if isinstance(doc, dict) else None
            raise ApiError(response.status, str(message if message is not None else text or response.reason))
        return {k.lower(): v for k, v in response.getheaders()}, data


def quoted(name: str) -> str:
    """A path segment, escaped."""
    return quote(name, safe="")
