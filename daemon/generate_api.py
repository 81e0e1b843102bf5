"""The generate extension of a decoder model: ``/generate`` and ``/generate_stream``.

KServe's and Triton's generate extension: ``POST /v2/models/{model}/generate`` with
``{"text_input": ..., "parameters": {...}}`` answers ``{"model_name", "model_version",
"text_output", ...}``; ``/generate_stream`` answers the same as server-sent events, one
``data:`` event per piece of text and a last one with ``finish_reason``. ``parameters.mode``
``"suggest"`` answers the k most likely next words of a prefix instead (predictive text).

Requests run in :class:`lorad.adapters.generation.Generator`; the adapter (or composition) is
leased for the whole generation, so a hot swap never changes a generation midway. A stream
whose client leaves is cancelled at the next token and frees its slot and KV cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from lorad.adapters.bounded_json import loads_bounded
from lorad.adapters.composition import AdapterWeight
from lorad.adapters.decoder import ChatTemplateError
from lorad.adapters.generation import Generation, Generator, SamplingParams
from lorad.adapters.service import AdapterService
from lorad.daemon.oip import OIPError, decode_adapter_parameters

__all__ = ["GenerateRequest", "decode_generate_request", "add_generate_routes", "MAX_STOP_STRINGS"]

#: Stop strings one request may give, and their longest length.
MAX_STOP_STRINGS, MAX_STOP_CHARS = 8, 256
#: Longest text_input accepted before tokenizing (the token limit is generation.max_context).
MAX_PROMPT_CHARS = 1 << 20
_MODES = ("generate", "suggest")
_PARAMETERS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "adapter", "adapters", "chat", "system",
               "mode", "k")


@dataclass(frozen=True)
class GenerateRequest:
    text: str
    params: SamplingParams
    adapter: str | list[AdapterWeight] | None
    chat: bool
    system: str | None
    mode: str
    k: int


def _number(params: Mapping[str, Any], key: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = params.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        bound = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
        raise OIPError(f"parameters.{key} must be a number {bound}, got {json.dumps(value)}")
    return float(value)


def _integer(params: Mapping[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = params.get(key, default)
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise OIPError(f"parameters.{key} must be an integer from {low} to {high}, got {json.dumps(value)}")
    return value


def decode_generate_request(body: bytes, *, default_max_tokens: int, max_context: int) -> GenerateRequest:
    """The request, or :class:`OIPError` (a 400) naming the field that is wrong and what is allowed."""
    doc = loads_bounded(body)
    if not isinstance(doc, Mapping):
        raise OIPError('the request body must be a JSON object like {"text_input": "...", "parameters": {"max_tokens": 16}}')
    unknown = set(doc) - {"text_input", "parameters", "id"}
    if unknown:
        raise OIPError(f"unknown field(s) {', '.join(sorted(map(repr, unknown)))}; allowed: text_input, parameters, id")
    text = doc.get("text_input")
    if not isinstance(text, str) or not text:
        raise OIPError(f"text_input must be a non-empty string, got {json.dumps(text)[:40]}")
    if len(text) > MAX_PROMPT_CHARS:
        raise OIPError(f"text_input has {len(text)} characters; at most {MAX_PROMPT_CHARS}")
    params = doc.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise OIPError("parameters must be an object")
    unknown = set(params) - set(_PARAMETERS)
    if unknown:
        raise OIPError(f"unknown parameter(s) {', '.join(sorted(map(repr, unknown)))}; allowed: {', '.join(_PARAMETERS)}")
    stop = params.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise OIPError(f"parameters.stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings of "
                       f"at most {MAX_STOP_CHARS} characters")
    mode = params.get("mode", "generate")
    if mode not in _MODES:
        raise OIPError(f"parameters.mode must be one of {', '.join(_MODES)}, got {json.dumps(mode)}")
    chat = params.get("chat", False)
    if not isinstance(chat, bool):
        raise OIPError(f"parameters.chat must be true or false, got {json.dumps(chat)}")
    system = params.get("system")
    if system is not None and (not isinstance(system, str) or not chat):
        raise OIPError("parameters.system must be a string, and is used with parameters.chat true")
    adapter, composition = decode_adapter_parameters({k: params[k] for k in ("adapter", "adapters") if k in params})
    sampling = SamplingParams(
        max_tokens=int(_integer(params, "max_tokens", default_max_tokens, 1, max_context) or default_max_tokens),
        temperature=_number(params, "temperature", 0.0, 0.0, 100.0),
        top_p=_number(params, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=int(_integer(params, "top_k", 0, 0, 1 << 20) or 0),
        seed=_integer(params, "seed", None, 0, (1 << 63) - 1),
        stop=tuple(stop),
    )
    return GenerateRequest(
        text=text, params=sampling,
        adapter=[AdapterWeight(n, w) for n, w in composition] if composition else adapter,
        chat=chat, system=system, mode=mode, k=int(_integer(params, "k", 3, 1, 20) or 3),
    )


class _Handlers:
    def __init__(self, service: AdapterService, generator: Generator | None, executor: Executor, *,
                 default_max_tokens: int, model_version: str) -> None:
        self.service = service
        self.generator = generator
        self.executor = executor
        self.default_max_tokens = default_max_tokens
        self.model_version = model_version

    def _check(self, request: web.Request) -> Generator:
        name = request.match_info["model"]
        if name != self.service.model_name:
            raise web.HTTPNotFound(text=f"model {name!r} not found; this daemon serves model {self.service.model_name!r}")
        if self.generator is None:
            raise web.HTTPNotFound(text=f"model {name!r} does not generate text: /generate needs a decoder language model "
                                        "(lorad import-model gguf); use /infer")
        return self.generator

    async def _parse(self, request: web.Request, generator: Generator) -> GenerateRequest:
        body = await request.read()
        req = decode_generate_request(body, default_max_tokens=self.default_max_tokens, max_context=generator.max_context)
        request["adapter_kind"] = "base" if req.adapter is None else "adapter"
        request["adapter"] = (req.adapter if isinstance(req.adapter, str) or req.adapter is None
                              else "+".join(t.name for t in req.adapter))
        return req

    def _prompt(self, generator: Generator, req: GenerateRequest) -> list[int]:
        text = req.text
        if req.chat:
            messages = ([{"role": "system", "content": req.system}] if req.system else []) + [{"role": "user", "content": text}]
            try:
                text = generator.spec.render_chat(messages)
            except ChatTemplateError as e:
                raise OIPError(str(e)) from e
        return list(generator.tokenizer.encode(text, add_special_tokens=False).ids)

    def _start(self, generator: Generator, req: GenerateRequest, sink: Any) -> Generation:
        prompt = self._prompt(generator, req)
        if not prompt:
            raise OIPError("text_input is empty after tokenizing; give at least one token of text")
        lease = contextlib.ExitStack()
        try:
            serving = lease.enter_context(self.service.serving(req.adapter))
            return generator.submit(prompt, req.params, serving.prepared, sink, lease)
        except BaseException:
            lease.close()
            raise

    def _suggest(self, generator: Generator, req: GenerateRequest) -> dict[str, Any]:
        if req.chat:
            raise OIPError("parameters.mode suggest completes the text as written; it does not take parameters.chat")
        with self.service.serving(req.adapter) as serving:
            found = generator.suggest(req.text, serving.prepared, k=req.k)
        return {"suggestions": [{"word": s.word, "completion": s.completion, "probability": s.probability} for s in found]}

    def _head(self) -> dict[str, Any]:
        return {"model_name": self.service.model_name, "model_version": self.model_version}

    async def _events(self, request: web.Request, generator: Generator, req: GenerateRequest,
                      ) -> tuple[Generation, asyncio.Queue[tuple[str, Any]]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def sink(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

        gen = await loop.run_in_executor(self.executor, self._start, generator, req, sink)
        return gen, queue

    async def generate(self, request: web.Request) -> web.Response:
        generator = self._check(request)
        req = await self._parse(request, generator)
        if req.mode == "suggest":
            doc = await asyncio.get_running_loop().run_in_executor(self.executor, self._suggest, generator, req)
            return web.json_response({**self._head(), **doc})
        gen, queue = await self._events(request, generator, req)
        parts: list[str] = []
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "text":
                    parts.append(payload)
                elif kind == "error":
                    raise payload
                else:
                    return web.json_response({**self._head(), "text_output": "".join(parts), **_done(payload)})
        finally:
            gen.cancel()  # a no-op once done; frees the slot when the client left or the handler failed

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        generator = self._check(request)
        req = await self._parse(request, generator)
        if req.mode == "suggest":
            raise OIPError("parameters.mode suggest is answered by /generate, not /generate_stream")
        gen, queue = await self._events(request, generator, req)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            while True:
                kind, payload = await queue.get()
                if kind == "text":
                    await response.write(_sse({**self._head(), "text_output": payload}))
                elif kind == "error":
                    await response.write(_sse({"error": f"generation failed: {type(payload).__name__}: {payload}"}))
                    break
                else:
                    await response.write(_sse({**self._head(), "text_output": "", **_done(payload)}))
                    break
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            gen.cancel()  # the client left: free the slot and the KV cache at the next token
            raise
        finally:
            gen.cancel()
        return response


def _done(info: Mapping[str, Any]) -> dict[str, Any]:
    return {"finish_reason": info["finish_reason"],
            "usage": {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"]}}


def _sse(doc: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(doc, ensure_ascii=False).encode() + b"\n\n"


def add_generate_routes(app: web.Application, service: AdapterService, generator: Generator | None, executor: Executor, *,
                        default_max_tokens: int, model_version: str) -> None:
    """Register ``/generate`` and ``/generate_stream`` (a 404 naming why for a model that does not generate)."""
    h = _Handlers(service, generator, executor, default_max_tokens=default_max_tokens, model_version=model_version)
    m = "/v2/models/{model}"
    app.router.add_post(m + "/generate", h.generate)
    app.router.add_post(m + "/generate_stream", h.generate_stream)
