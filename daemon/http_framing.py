"""HTTP framing errors and body limits, answered as the API answers everything else.

aiohttp answers what its HTTP parser refuses (a bad request line, a header with control
characters or over 8 KiB, a malformed chunked body...) before any route or middleware
sees the request, with a plain-text page; and it sends ``100 Continue`` to every
``Expect: 100-continue`` request, so a client announcing a 2 GB body is invited to send
it before the handler refuses it. This module closes both gaps at the layer where they
arise:

- :class:`ApiRunner` is the :class:`aiohttp.web.AppRunner` of the daemon; its
  connections answer parser errors with the API's ``{"error": ...}`` JSON (400, naming
  what the parser found) and close the connection, as aiohttp does.
- :func:`expect_within` is a route's ``expect_handler``: ``100 Continue`` only for a body
  the route will read; a Content-Length over the route's limit gets 413 (and an
  expectation other than ``100-continue`` 417) at once, without ``100 Continue``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

__all__ = ["ApiRunner", "expect_within", "ExpectHandler"]

_log = logging.getLogger(__name__)

ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def _error(status: int, message: str) -> web.Response:
    return web.Response(body=json.dumps({"error": message}).encode(), status=status, content_type="application/json")


class _JsonErrorProtocol(RequestHandler):
    """aiohttp's connection handler, answering its own errors as JSON."""

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status >= 500:
            # aiohttp logs the exception and raises ConnectionError when a response was already started.
            super().handle_error(request, status, exc, message)
            text = "internal error; the daemon log has the details"
        else:
            detail = exc.message if isinstance(exc, HttpProcessingError) and exc.message else (message or "")
            text = f"malformed HTTP request: {detail}" if detail else "malformed HTTP request"
            # A client's mistake: one line in the log, not aiohttp's traceback.
            _log.info("refused a malformed HTTP request from %s: %s", request.remote, detail.replace("\n", " "))
            if request.writer.output_size > 0:
                raise ConnectionError("a response was already sent; cannot send the error")
        response = _error(status, text)
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorProtocol(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """An AppRunner whose connections answer HTTP parser errors as ``{"error": ...}`` JSON."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The server aiohttp built for the app (handler, request factory, settings), with the
        # one difference of the connection handler class it makes.
        server.__class__ = _JsonErrorServer
        return server


def expect_within(limit: int, *, what: str = "request body", setting: str = "server.max_request_bytes") -> ExpectHandler:
    """An ``expect_handler`` for a route that reads at most ``limit`` body bytes."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.version != HttpVersion11:  # HTTP/1.0 has no 100 Continue
            return None
        expectation = request.headers.get("Expect", "")
        if expectation.lower() != "100-continue":
            response = _error(417, f"Expect: {expectation!r} is not supported; lorad understands Expect: 100-continue")
        elif request.content_length is not None and request.content_length > limit:
            response = _error(413, f"{what} of {request.content_length} bytes exceeds the limit of {limit} bytes"
                                   f" ({setting}); not sending 100 Continue")
        else:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the 100 is not part of the response proper
            return None
        response.force_close()  # the body was never invited: no next request on this connection
        return response

    return expect
