"""The HTTP API: Open Inference Protocol (KServe v2 REST) plus the adapter-management extension.

Handlers are thin: they check the model name and authentication, hand the blocking work
(ORT, disk, large bodies) to the worker thread pool and map errors to statuses. Every
error answers ``{"error": "..."}`` as OIP does. ``/v2/openapi.json`` serves
``daemon/openapi.yaml``, the one description of all routes.

An infer request crosses threads at most once: with the micro-batcher, a small body is
decoded (JSON or the binary tensor extension, daemon/oip.py), posted to the batcher's
window and its answer encoded in the event loop; at the end of the loop's turn the window
hands its requests over together, and they run there in the loop when the model is fast
(``server.batching.inline_us``), else in the batcher's thread, which hands finished
batches back once per batch (:class:`_Completions`). Without the batcher, decoding, the model and
encoding are one trip to the worker pool. A large body, an adapter that must be loaded
from disk or a composition to build go to the worker pool before they are queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import logging
import math
import re
import socket
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, TypeVar

import numpy as np
import yaml
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from lorad.adapters.bounded_json import JsonInputError, loads_bounded
from lorad.adapters.composition import AdapterWeight
from lorad.adapters.errors import (
    AdapterDamagedError,
    AdapterNotFoundError,
    AdapterStorageError,
    CacheFullError,
    InvalidAdapterError,
    OverloadedError,
    RequestTooLargeError,
)
from lorad.adapters.fsutil import disk_full
from lorad.adapters.memory import LARGE_BODY_BYTES, trim_after_large_request
from lorad.adapters.micro_batcher import PostWindow
from lorad.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from lorad.adapters.service import AdapterService, Arrival, InferResult
from lorad.daemon import auth, oip
from lorad.daemon.http_framing import expect_within
from lorad.daemon.metrics import CONTENT_TYPE, DaemonMetrics
from lorad.daemon.version import lorad_version

__all__ = [
    "ApiSettings", "make_app", "protected", "authenticated", "HttpError", "DISK_FULL_MESSAGE", "json_response", "read_body",
    "PEFT_FILES", "SERVER_NAME", "SERVER_VERSION", "EXTENSION", "infer_body_limit", "JSON_BYTES_PER_NUMBER",
]

_log = logging.getLogger(__name__)


SERVER_NAME = "lorad"
SERVER_VERSION = lorad_version()
#: Name of the adapter-management extension in the server metadata.
EXTENSION = "lorad_adapters"
#: The files an adapter upload may carry (Hugging Face PEFT layout).
PEFT_FILES = (WEIGHTS_FILE, CONFIG_FILE)
_ACTIONS = ("load", "pin", "unpin", "evict", "rollback")
_CHUNK = 1 << 16
#: Bodies of the actions (``{"version": N}`` at most).
_SMALL_BODY_BYTES = 4096

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_T = TypeVar("_T")


class HttpError(Exception):
    """An error answer with its HTTP status (and headers); rendered as ``{"error": ...}``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class ApiSettings:
    """What the handlers need besides the request; built once by :mod:`lorad.daemon.app`."""

    service: AdapterService
    metrics: DaemonMetrics
    token: str
    #: Runs ORT (without the batcher), large infer bodies and disk I/O off the event loop.
    executor: Executor
    max_request_bytes: int
    ready: Callable[[], bool]
    #: Rows (first dimension) one infer request may carry; bounds its memory.
    max_batch_rows: int = 1024
    #: Requests larger than one model call (adapters/request_cost.py) that run at a time,
    #: and how long another waits for its turn before a 503.
    large_requests: int = 1
    queue_timeout_s: float = 120.0
    #: Why training could not start (an object with ``kind`` and ``detail``), else None.
    training_disabled: Callable[[], Any] = lambda: None

    @property
    def model_version(self) -> str:
        """The base model's version as OIP reports it: from its fingerprint, so another
        base model is another version."""
        return self.service.engine.fingerprint.split(":", 1)[-1][:12]


_SETTINGS = web.AppKey("settings", ApiSettings)
#: ``lorad_request_duration_seconds`` children by (endpoint, adapter kind): one dict lookup
#: per request instead of prometheus_client's labels() (a lock and a key built each time).
_DURATIONS = web.AppKey("durations", dict)


def make_app(settings: ApiSettings) -> web.Application:
    """The aiohttp application with every route of the API."""
    app = web.Application(middlewares=[_errors_and_metrics], client_max_size=settings.max_request_bytes)
    app[_SETTINGS] = settings
    app[_DURATIONS] = {}
    h = _Handlers(settings)
    m = "/v2/models/{model}"
    a = m + "/adapters/{adapter}"
    app.router.add_get("/v2/health/live", h.live)
    app.router.add_get("/v2/health/ready", h.ready)
    app.router.add_get("/v2", h.server_metadata)
    app.router.add_get("/v2/openapi.json", h.openapi)
    app.router.add_get(m, h.model_metadata)
    app.router.add_get(m + "/ready", h.model_ready)
    limit, setting = h._infer_limit
    app.router.add_post(m + "/infer", h.infer, expect_handler=expect_within(limit, what="infer request", setting=setting))
    app.router.add_get(m + "/adapters", h.list_adapters)
    app.router.add_get(a, h.inspect)
    app.router.add_put(a, protected(h.upload), expect_handler=expect_within(settings.max_request_bytes, what="upload"))
    app.router.add_delete(a, protected(h.delete))
    app.router.add_get(a + "/files", protected(h.export))
    for action in _ACTIONS:
        app.router.add_post(f"{a}/{action}", protected(functools.partial(h.action, action)),
                            expect_handler=expect_within(_SMALL_BODY_BYTES, setting="fixed"))
    app.router.add_get("/metrics", h.metrics)
    return app


# ---------------------------------------------------------------- middleware


def json_response(data: object, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(data, default=str).encode(), status=status, content_type="application/json", headers=headers
    )


#: The answer to a write the full disk refused (nothing was half-written: every write is
#: a temp file renamed into place, and the temp file is removed).
DISK_FULL_MESSAGE = ("the device's disk is full: nothing was stored or changed; free space on the filesystem of the "
                     "state directory (lorad_state_free_bytes) and retry. Serving goes on")


def _error_status(e: BaseException, *, trusted: bool) -> tuple[int, str, Mapping[str, str] | None]:
    """Status, message and headers of an error answer.

    Storage errors name files on disk; only a caller that authenticated (token or the
    Unix socket) sees them, everyone else is told to read the daemon log.
    """
    if isinstance(e, HttpError):
        if e.status >= 500:
            _log.error("%s", e)
        return e.status, str(e), e.headers
    if disk_full(e):  # any write site: the registry, the trainer's files, its artifacts
        _log.error("a write failed, the disk is full: %s", e)
        return 507, DISK_FULL_MESSAGE, None
    if isinstance(e, oip.OIPError):
        return e.status, str(e), None
    if isinstance(e, HttpProcessingError):  # the body's framing (chunked encoding, length) broke while it was read
        return 400, f"malformed HTTP request body: {e.message}", None
    if isinstance(e, ConnectionResetError):  # the client went away mid-body: its doing, and nobody reads the answer
        _log.info("request body not read: %s", e)
        return 400, "the connection was lost before the request body was read", None
    if isinstance(e, AdapterNotFoundError):
        return 404, str(e), None
    if isinstance(e, InvalidAdapterError):  # includes BaseModelMismatchError
        return 422, str(e), None
    if isinstance(e, CacheFullError | OverloadedError):
        return 503, str(e), None
    if isinstance(e, RequestTooLargeError):
        return 413, str(e), None
    if isinstance(e, ValueError):
        return 400, str(e), None
    if isinstance(e, oip.NonFiniteOutputError):
        _log.error("%s", e)
        return e.status, str(e), None
    if isinstance(e, AdapterDamagedError):  # that adapter only; its reason names state paths
        _log.warning("%s", e)
        return 409, e.describe(with_reason=trusted), None
    if isinstance(e, AdapterStorageError):
        _log.error("adapter storage failed: %s", e)
        return 500, str(e) if trusted else "adapter storage failed; the daemon log has the details", None
    _log.exception("internal error", exc_info=e)
    return 500, f"internal error: {type(e).__name__}", None


@web.middleware
async def _errors_and_metrics(request: web.Request, handler: _Handler) -> web.StreamResponse:
    settings = request.app[_SETTINGS]
    start = time.perf_counter()
    route = request.match_info.route.resource
    endpoint = route.canonical if route is not None else "unmatched"
    try:
        response = await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        reason = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        if e.status == 404:
            reason = f"no route {request.method} {request.path}; the API is described at /v2/openapi.json"
        elif e.status == 405:
            reason = f"method {request.method} is not allowed on {request.path}"
        elif e.status == 413:
            reason = f"request body exceeds the limit of {settings.max_request_bytes} bytes"
        response = json_response({"error": reason}, e.status, {k: v for k, v in e.headers.items() if k == "Allow"})
    except Exception as e:  # every failure becomes one JSON error; unknown ones are logged
        status, message, headers = _error_status(e, trusted=authenticated(request))
        response = json_response({"error": message}, status, headers)
    kind = request.get("adapter_kind", "none")
    seconds = time.perf_counter() - start
    durations = request.app[_DURATIONS]
    child = durations.get((endpoint, kind))
    if child is None:
        child = durations[endpoint, kind] = settings.metrics.request_seconds.labels(endpoint=endpoint, adapter_kind=kind)
    child.observe(seconds)
    if kind != "none":  # an inference request that got as far as naming its adapter
        settings.metrics.observe_inference(adapter=request.get("adapter"), kind=kind, seconds=seconds,
                                           ok=response.status < 400)
    if response.status >= 400:
        settings.metrics.request_errors.labels(endpoint=endpoint, code=str(response.status)).inc()
    return response


def protected(handler: _Handler) -> _Handler:
    """Require the bearer token on TCP; the Unix socket's file mode already authenticated."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        if not _via_unix_socket(request):
            token = request.app[_SETTINGS].token
            if not auth.check_bearer(request.headers.get("Authorization"), token):
                raise HttpError(
                    401,
                    "this endpoint changes state or reads private data and needs 'Authorization: Bearer <token>' "
                    "with the token from the daemon's token file",
                    {"WWW-Authenticate": 'Bearer realm="lorad"'},
                )
        return await handler(request)

    return wrapper


def authenticated(request: web.Request) -> bool:
    """The caller came over the Unix socket or sent the right bearer token."""
    if _via_unix_socket(request):
        return True
    return auth.check_bearer(request.headers.get("Authorization"), request.app[_SETTINGS].token)


def _via_unix_socket(request: web.Request) -> bool:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


# ---------------------------------------------------------------- handlers


@dataclass(frozen=True)
class _Prepared:
    """A decoded request and the model's tensors, not yet submitted."""

    request: oip.InferRequest
    adapter: str | list[AdapterWeight] | None
    tensors: dict[str, np.ndarray]


@dataclass(frozen=True)
class _Large:
    """A decoded request that takes more than one model call."""

    request: oip.InferRequest
    adapter: str | list[AdapterWeight] | None
    tensors: dict[str, np.ndarray]


@dataclass(frozen=True)
class _Submitted:
    """A decoded request in the batcher's queue."""

    request: oip.InferRequest
    future: Future[InferResult] | asyncio.Future[InferResult]  # the latter when posted from the event loop


#: A response body and its JSON header's length (None: the body is JSON alone).
_Answer = tuple[bytes, int | None]
#: Infer bodies up to this size are decoded and answered in the event loop when the batcher
#: runs the model: tens of microseconds, less than a thread hand-off costs. Larger ones go to
#: a worker thread, so that no request holds the loop for long (16 KiB of JSON numbers: about
#: 0.3 ms).
_INLINE_BODY_BYTES = 16 * 1024
#: The same for a text model, whose strings are tokenized there too (4 KiB: about 1,000 tokens).
_INLINE_TEXT_BYTES = 4 * 1024
#: Responses of up to this many output elements are encoded in the event loop.
_INLINE_OUTPUT_ELEMENTS = 4096


def _small(result: InferResult) -> bool:
    return sum(a.size for a in result.outputs.values()) <= _INLINE_OUTPUT_ELEMENTS


class _Completions:
    """Answers finished in another thread (the batcher's) handed to the event loop one batch
    at a time: the first of a batch wakes the loop, the others join it, where
    :func:`asyncio.wrap_future` wakes the loop once per future. An answer given in the
    loop's own thread (a batch run inline, :class:`~lorad.adapters.micro_batcher.PostWindow`)
    is set at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()  # made in the loop that serves
        self._lock = threading.Lock()
        self._finished: list[tuple[asyncio.Future[Any], Any, BaseException | None, bool]] = []

    def wait(self, future: Future[_T]) -> asyncio.Future[_T]:
        """An asyncio future of ``future``'s outcome (cancelling it does not cancel ``future``)."""
        waiter: asyncio.Future[_T] = self._loop.create_future()

        def done(f: Future[_T]) -> None:
            if f.cancelled():
                self._put(waiter, None, None, cancelled=True)
            else:
                error = f.exception()
                self._put(waiter, None if error is not None else f.result(), error)

        future.add_done_callback(done)
        return waiter

    def deliver(self, waiter: asyncio.Future[Any]) -> Callable[[Any, BaseException | None], None]:
        """A batcher ``deliver`` callback that settles ``waiter``, from whichever thread."""
        return functools.partial(self._put, waiter)

    def _put(self, waiter: asyncio.Future[Any], result: Any, error: BaseException | None, *,
             cancelled: bool = False) -> None:
        if threading.get_ident() == self._loop_thread:
            _settle(waiter, result, error, cancelled)
            return
        with self._lock:
            self._finished.append((waiter, result, error, cancelled))
            first = len(self._finished) == 1
        if first:
            try:
                self._loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: the daemon stops, nobody waits
                pass

    def _deliver(self) -> None:  # in the event loop
        with self._lock:
            finished, self._finished = self._finished, []
        for waiter, result, error, cancelled in finished:
            _settle(waiter, result, error, cancelled)


def _settle(waiter: asyncio.Future[Any], result: Any, error: BaseException | None, cancelled: bool) -> None:
    if waiter.done():  # cancelled: the client went away; the request's leases end with the batch
        return
    if cancelled:
        waiter.cancel()
    elif error is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(result)


class _Handlers:
    def __init__(self, settings: ApiSettings) -> None:
        self.s = settings
        self.service = settings.service
        self._openapi: bytes | None = None
        self._infer_limit = infer_body_limit(settings.service.engine.inputs, settings.max_batch_rows,
                                             settings.max_request_bytes)
        self._large: asyncio.Semaphore | None = None  # made in the event loop that serves
        self._done: _Completions | None = None  # likewise
        self._window: PostWindow | None = None  # likewise
        self._model_version = settings.model_version
        self._inline_bytes = _INLINE_TEXT_BYTES if settings.service.text is not None else _INLINE_BODY_BYTES

    def _completions(self) -> _Completions:
        if self._done is None:
            self._done = _Completions(asyncio.get_running_loop())
        return self._done

    def _posting(self) -> PostWindow | None:
        """The batcher's window for the event loop, flushed at the end of each turn of it."""
        if self._window is None and self.service.batcher is not None:
            self._window = self.service.batcher.window(asyncio.get_running_loop().call_soon)
        return self._window

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.s.executor, fn, *args)

    def _model(self, request: web.Request) -> None:
        name = request.match_info["model"]
        if name != self.service.model_name:
            raise HttpError(404, f"model {name!r} not found; this daemon serves model {self.service.model_name!r}")

    # -- health and metadata

    async def live(self, request: web.Request) -> web.Response:
        return json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ok = self.s.ready()
        doc: dict[str, Any] = {"ready": ok}
        disabled = self.s.training_disabled()
        if disabled is not None:  # serving is ready; training is not (why: with the token)
            doc["training"] = {"disabled": disabled.kind,
                               **({"detail": disabled.detail} if authenticated(request) else {})}
        return json_response(doc, 200 if ok else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": [EXTENSION]})

    async def model_metadata(self, request: web.Request) -> web.Response:
        self._model(request)
        service = self.service
        labels = {"parameters": {"labels": list(service.text.labels)}} if service.text and service.text.labels else {}
        return json_response({
            "name": service.model_name,
            "versions": [self.s.model_version],
            "platform": "onnxruntime_onnx",
            "inputs": [oip.tensor_metadata(t) for t in service.inputs],
            "outputs": [oip.tensor_metadata(t) for t in service.outputs],
            **labels,
        })

    async def model_ready(self, request: web.Request) -> web.Response:
        self._model(request)
        ok = self.s.ready()
        return json_response({"name": self.service.model_name, "ready": ok}, 200 if ok else 503)

    async def openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            text = resources.files("lorad.daemon").joinpath("openapi.yaml").read_text(encoding="utf-8")
            self._openapi = json.dumps(yaml.safe_load(text)).encode()
        return web.Response(body=self._openapi, content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.s.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    # -- inference

    async def infer(self, request: web.Request) -> web.Response:
        """Decode, submit, answer: in the event loop for a small body when the batcher runs
        the model (its thread is the one hand-off, and there is none when the batch runs in
        the loop, ``server.batching.inline_us``), in one worker trip otherwise."""
        self._model(request)
        limit, setting = self._infer_limit
        body = await read_body(request, limit, what="infer request", setting=setting)
        header = request.headers.get(oip.HEADER_LENGTH)
        # (adapter kind, adapter name), filled once decoded, so errors after that are labelled
        kind: list[tuple[str, str | None]] = []
        # A request decoded in a worker thread is announced first, so that a batch being
        # gathered waits for it; one decoded here is posted in the same step, to the loop's
        # window, and needs no announcement.
        inline = self.service.batcher is not None and len(body) <= self._inline_bytes
        arrival = Arrival(None) if inline else self.service.announce()
        large = False
        try:
            if inline:
                done, pending = None, self._infer_inline(body, header, kind)
                if isinstance(pending, _Prepared):  # an adapter to load from disk, or a composition to build
                    arrival = self.service.announce()
                    done, pending = await self._run(self._submit, pending, kind, arrival)
            else:
                done, pending = await self._run(self._infer, body, header, kind, arrival)
            if isinstance(pending, _Large):  # more than one model call: wait for its turn, then in chunks
                large = True
                arrival.close()
                async with self._turn():
                    done = await self._run(self._run_large, pending, kind)
            elif isinstance(pending, _Submitted):  # in the batcher's next batch: wait without holding a worker
                future = pending.future
                if isinstance(future, asyncio.Future):  # posted from the loop
                    result = await future
                else:
                    result = future.result() if future.done() else await self._completions().wait(future)
                if _small(result):
                    done = self._encode(pending.request, result, kind)
                else:
                    done = await self._run(self._encode, pending.request, result, kind)
        finally:
            arrival.close()
            if kind:
                request["adapter_kind"], request["adapter"] = kind[0]
            if large or len(body) >= LARGE_BODY_BYTES:
                await self._run(trim_after_large_request, LARGE_BODY_BYTES if large else len(body))
        assert done is not None
        payload, json_length = done
        if json_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload, content_type="application/octet-stream",
                            headers={oip.HEADER_LENGTH: str(json_length)})

    def _decode(
        self, body: bytes, header: str | None, kind: list[tuple[str, str | None]]
    ) -> tuple[oip.InferRequest, str | list[AdapterWeight] | None]:
        req = oip.decode_infer_request(body, self.service.inputs, self.service.outputs, max_rows=self.s.max_batch_rows,
                                       json_length=oip.header_length(header, len(body)))
        if req.composition:
            kind.append(("adapter", "+".join(n for n, _ in req.composition)))
            return req, [AdapterWeight(n, w) for n, w in req.composition]
        kind.append(("base" if req.adapter is None else "adapter", req.adapter))
        return req, req.adapter

    def _prepare(self, body: bytes, header: str | None, kind: list[tuple[str, str | None]]) -> _Prepared:
        """Decode the body and make the model's tensors (a text model tokenizes here); 413
        for a request over its limit."""
        req, adapter = self._decode(body, header, kind)
        tensors = self.service.encode(req.inputs)
        self.service.cost.check(tensors)
        return _Prepared(req, adapter, tensors)

    def _infer_inline(
        self, body: bytes, header: str | None, kind: list[tuple[str, str | None]]
    ) -> _Submitted | _Large | _Prepared:
        """:meth:`_infer` in the event loop, for a small body with the batcher: nothing here
        blocks (the batcher's submit queues). A request that needs disk or real work
        before it is queued (an adapter not in the cache, a composition) comes back
        decoded, for :meth:`_submit` in a worker thread."""
        prepared = self._prepare(body, header, kind)
        if self.service.cost.is_chunked(prepared.tensors):
            return _Large(prepared.request, prepared.adapter, prepared.tensors)
        adapter = prepared.adapter
        # A cached adapter is leased without I/O. (Evicted between this check and the lease,
        # it would load in the loop: a window of microseconds, and only under cache churn.)
        if adapter is not None and not (isinstance(adapter, str) and self.service.cache.contains(adapter)):
            return prepared
        waiter: asyncio.Future[InferResult] = asyncio.get_running_loop().create_future()
        self.service.post(prepared.tensors, adapter, self._completions().deliver(waiter), window=self._posting())
        return _Submitted(prepared.request, waiter)

    def _infer(
        self, body: bytes, header: str | None, kind: list[tuple[str, str | None]], arrival: Arrival
    ) -> tuple[_Answer | None, _Submitted | _Large | None]:
        """Decode, encode the model's tensors and submit, in one trip to the worker pool;
        the response too when the answer is already there (no batcher, or a batch of one
        that ran at once): (response, None), else (None, submitted). A request over one
        model call is checked against its limit (413) and handed back to wait for its
        turn: (None, _Large)."""
        prepared = self._prepare(body, header, kind)
        if self.service.cost.is_chunked(prepared.tensors):
            return None, _Large(prepared.request, prepared.adapter, prepared.tensors)
        return self._submit(prepared, kind, arrival)

    def _submit(
        self, prepared: _Prepared, kind: list[tuple[str, str | None]], arrival: Arrival
    ) -> tuple[_Answer | None, _Submitted | None]:
        future = self.service.submit(prepared.tensors, prepared.adapter, arrival=arrival)
        if future.done():
            return self._encode(prepared.request, future.result(), kind), None
        return None, _Submitted(prepared.request, future)

    def _run_large(self, large: _Large, kind: list[tuple[str, str | None]]) -> _Answer:
        return self._encode(large.request, self.service.run(large.tensors, large.adapter), kind)

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """One of ``large_requests`` turns, or a 503 after ``queue_timeout_s``: waiting holds
        no worker thread, so small requests go on meanwhile."""
        if self._large is None:
            self._large = asyncio.Semaphore(self.s.large_requests)
        try:
            await asyncio.wait_for(self._large.acquire(), self.s.queue_timeout_s)
        except TimeoutError:
            raise OverloadedError(
                f"{self.s.large_requests} large request(s) already running and none finished within "
                f"{self.s.queue_timeout_s:g} s (server.large_requests, server.queue_timeout_s); retry later, or "
                "send smaller requests (they do not wait)") from None
        try:
            yield
        finally:
            self._large.release()

    def _encode(self, req: oip.InferRequest, result: InferResult, kind: list[tuple[str, str | None]]) -> _Answer:
        """The response body, and its JSON header's length when binary outputs follow it."""
        result = self.service.decode(result)
        try:
            return oip.infer_response_body(
                model_name=self.service.model_name,
                model_version=self._model_version,
                request_id=req.id,
                outputs=result.outputs,
                wanted=req.outputs,
                adapter=result.adapter,
                adapter_version=result.version,
                composition=[asdict(u) for u in result.composition] if result.composition else (),
                binary=req.binary_outputs,
            )
        except oip.NonFiniteOutputError:
            self.s.metrics.model_output_errors.labels(adapter_kind=kind[0][0]).inc()
            raise

    # -- adapters

    async def list_adapters(self, request: web.Request) -> web.Response:
        self._model(request)
        infos = await self._run(self.service.list_adapters)
        return json_response([_shown(asdict(i), request) for i in infos])

    async def inspect(self, request: web.Request) -> web.Response:
        self._model(request)
        return json_response(_shown(await self._run(self.service.inspect, request.match_info["adapter"]), request))

    async def upload(self, request: web.Request) -> web.Response:
        self._model(request)
        name = request.match_info["adapter"]
        files = await _read_upload(request, self.s.max_request_bytes)
        info = await self._run(self.service.upload, name, files)
        return json_response(asdict(info), 201)

    async def export(self, request: web.Request) -> web.Response:
        """A stored version as PEFT files in an uncompressed tar (see openapi.yaml)."""
        self._model(request)
        name = request.match_info["adapter"]
        version, files = await self._run(self.service.export, name, _version_query(request))
        return web.Response(body=tar_of(files), content_type="application/x-tar", headers={
            "Content-Disposition": f'attachment; filename="{name}-v{version}.tar"',
            "X-Lorad-Adapter-Version": str(version),
        })

    async def delete(self, request: web.Request) -> web.Response:
        self._model(request)
        name = request.match_info["adapter"]
        await self._run(self.service.delete, name)  # AdapterNotFoundError: 404 naming it
        return json_response({"name": name, "deleted": True})

    async def action(self, action: str, request: web.Request) -> web.Response:
        self._model(request)
        name = request.match_info["adapter"]
        if action == "rollback":
            body = await read_body(request, _SMALL_BODY_BYTES, setting="fixed")
            version = _rollback_version(body)
            info = await self._run(self.service.rollback, name, version)
        else:
            info = await self._run(getattr(self.service, action), name)
        return json_response(asdict(info))


#: A version number in a query: ASCII digits only (``str.isdigit`` accepts "١" and "²").
_VERSION_PARAM = re.compile(r"[0-9]{1,18}")


def _shown(doc: dict[str, Any], request: web.Request) -> dict[str, Any]:
    """An adapter as the caller may see it: a damaged one's reason names state paths."""
    if "reason" in doc and not authenticated(request):
        del doc["reason"]
    return doc


def _version_query(request: web.Request) -> int | None:
    raw = request.query.get("version")
    if raw is None:
        return None
    if not _VERSION_PARAM.fullmatch(raw) or int(raw) < 1:
        raise HttpError(400, f"query parameter version={raw!r}: expected a version number (ASCII digits, an integer >= 1)")
    return int(raw)


def tar_of(files: Mapping[str, bytes]) -> bytes:
    """An uncompressed POSIX tar holding ``files`` (name -> bytes) as regular files, mode 0644."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for filename, data in sorted(files.items()):
            info = tarfile.TarInfo(filename)
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


#: Bytes one JSON number may take in an infer body, separators and indentation included:
#: ``-1.2345678901234567e-05, `` is 25; the rest is room for pretty-printed bodies.
JSON_BYTES_PER_NUMBER = 48
_JSON_ENVELOPE_BYTES = 64 * 1024


def infer_body_limit(inputs: Sequence[oip.TensorSpecLike], max_rows: int, max_request_bytes: int) -> tuple[int, str]:
    """The largest infer body worth reading, and the setting that explains it.

    A body is parsed whole into Python numbers (about 60 bytes each) before it becomes
    tensors, so its size, not only its rows, is what bounds a request's memory: the bound
    is ``max_rows`` rows of every input at :data:`JSON_BYTES_PER_NUMBER` per number, checked
    against Content-Length and while the body streams in, before any decoding.
    """
    per_row = 0
    for spec in inputs:
        inner = list(spec.shape[1:])
        if any(d < 0 for d in inner):  # a dynamic inner dimension: rows do not bound the size
            return max_request_bytes, "server.max_request_bytes"
        per_row += math.prod(inner)
    by_rows = max_rows * per_row * JSON_BYTES_PER_NUMBER + _JSON_ENVELOPE_BYTES
    if by_rows >= max_request_bytes:
        return max_request_bytes, "server.max_request_bytes"
    return by_rows, (f"server.max_batch_rows = {max_rows} rows of {per_row} numbers,"
                     f" at most {JSON_BYTES_PER_NUMBER} bytes each")


def _rollback_version(body: bytes) -> int:
    form = 'rollback needs a JSON body {"version": N} with the version number (an integer >= 1)'
    try:
        doc = loads_bounded(body or b"null", what="request body")
    except JsonInputError as e:  # also "[[[[..." within the size limit: refused before parsing
        raise HttpError(400, f"{e}; {form}") from None
    version = doc.get("version") if isinstance(doc, dict) else None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise HttpError(400, form)
    return version


async def read_body(request: web.Request, limit: int, *, what: str = "request body",
                    setting: str = "server.max_request_bytes") -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise oip.RequestTooLargeError(
            f"{what} of {request.content_length} bytes exceeds the limit of {limit} bytes ({setting})")
    chunks: list[bytes] = []
    total = 0
    while chunk := await request.content.read(_CHUNK):
        total += len(chunk)
        if total > limit:
            raise oip.RequestTooLargeError(f"{what} exceeds the limit of {limit} bytes ({setting})")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_upload(request: web.Request, limit: int) -> dict[str, bytes]:
    """The PEFT files of a multipart/form-data upload, size-limited while streaming in."""
    if not request.content_type.startswith("multipart/"):
        raise HttpError(
            415,
            f"upload needs Content-Type multipart/form-data with the files {', '.join(PEFT_FILES)}; got {request.content_type!r}",
        )
    if request.content_length is not None and request.content_length > limit:
        raise oip.RequestTooLargeError(f"upload of {request.content_length} bytes exceeds the limit of {limit} bytes")
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as e:
        raise HttpError(400, f"malformed multipart body: {e}") from None
    files: dict[str, bytes] = {}
    total = 0
    while True:
        try:
            part = await reader.next()
        except (ValueError, AssertionError) as e:
            raise HttpError(400, f"malformed multipart body: {e}") from None
        except HttpProcessingError as e:  # a part header with control characters or over 8 KB
            raise HttpError(400, f"malformed multipart body: part header: {e.message}") from None
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise HttpError(400, "nested multipart bodies are not accepted")
        fname = (part.filename or part.name or "").rsplit("/", 1)[-1]
        if fname not in PEFT_FILES:
            raise HttpError(400, f"unexpected upload file {fname!r}; allowed: {', '.join(PEFT_FILES)}")
        if fname in files:
            raise HttpError(400, f"file {fname!r} is uploaded twice")
        chunks: list[bytes] = []
        while True:
            chunk = await part.read_chunk(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise oip.RequestTooLargeError(f"upload exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        files[fname] = b"".join(chunks)
    missing = [f for f in PEFT_FILES if f not in files]
    if missing:
        raise HttpError(400, f"upload is missing {', '.join(missing)}; an adapter upload carries {', '.join(PEFT_FILES)}")
    return files
