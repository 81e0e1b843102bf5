"""HTTP routes of the trainer and the serving-rate probe.

Wiring (in :mod:`lorad.daemon.app`) is a few lines: :class:`lorad.daemon.config.Config` holds the
``trainer`` section (:class:`lorad.trainer.config.TrainerConfig`); build a
:class:`lorad.trainer.service.TrainerService`, call :func:`add_training_routes` on the app and
:func:`lorad.trainer.metrics.register_trainer_metrics` on the metrics registry.

Routes (``A`` = ``/v2/models/{model}/adapters/{adapter}``), as the rest of the API:
JSON in and out, ``{"error": ...}`` on failure, state changes need the bearer token,
blocking work runs on the worker pool.

- ``POST A/examples`` (auth) one labelled example: ``{"inputs": [OIP tensors], "label": L}``,
  or for a model that carries a tokenizer ``{"text": "...", "label": "label name" or class
  number}`` (tokenized by the serving tokenizer), or for a language model ``{"text": "..."}``
  alone (the text is the example: trainer/lm_examples.py); optional ``"user"``; body
  size-limited while it streams in. 201 ``{"id", "adapter", "examples"}``.
- ``GET A/examples`` (auth) the adapter's exact example count (private: the ledger shows
  only the noisy estimate the runs were planned from).
- ``POST A/train`` (auth) start a manual run; 202 ``{"run_id", ...}``. 409 when the privacy
  budget would be exceeded or a run is already queued or running; 503 without training APIs.
- ``GET A/train`` the queued/running run, else the last result: with the token its
  progress, ε so far, reason and back-off; without, only its state, id, status and version.
- ``POST A/train/cancel`` (auth).
- ``GET A/privacy`` ε spent, δ, budget and every run's (q, σ, C, steps, examples, accountant):
  open, like the rest of the read-only API, so anyone can recompute ε; with the token also
  each run's times and energy.
- ``POST A/privacy/audit`` (auth) the one-run canary audit (trainer/audit.py): body ``{}``
  or ``{"canaries": m}`` (default 1000, at most the adapter's trainable parameters: 422);
  ``{"noise_multiplier": 0}`` (the noise actually added; σ still accounted) only with
  ``trainer.testing``. 200 ``{"epsilon_estimate", "epsilon_estimate_lower",
  "epsilon_lower_bound", "epsilon_accounted", "consistent", "method", ...}``.
- ``GET /v2/models/{model}/privacy`` the same for every adapter in the ledger.
- ``GET /v2/trainer``: with the token the scheduler's whole state (queue, progress, why each
  adapter is blocked or backing off, last results); without, whether it runs, is paused,
  and which run is in progress. ``POST /v2/trainer/pause`` (auth), ``POST /v2/trainer/resume`` (auth).

Open routes answer only what the privacy boundary allows (README, "The privacy
boundary"): what the accounted mechanisms released, the public configuration, and
nothing else that stored examples decide.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from lorad.adapters.bounded_json import JsonInputError, loads_bounded
from lorad.adapters.fsutil import disk_full
from lorad.daemon import oip
from lorad.daemon.http_api import HttpError, json_response, read_body
from lorad.daemon.http_framing import expect_within
from lorad.trainer.errors import BadTrainingDataError, PrivacyBudgetExceededError, StoreFullError, TrainingFailedError
from lorad.trainer.scheduler import TrainingConflictError
from lorad.trainer.service import TrainerService, TrainingUnavailableError

__all__ = ["add_training_routes", "add_disabled_training_routes", "TrainingDisabled"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_AUDIT_BODY_BYTES = 4096


def add_training_routes(
    app: web.Application,
    trainer: TrainerService,
    require_auth: Callable[[Handler], Handler],
    authenticated: Callable[[web.Request], bool],
    *,
    executor: Executor | None = None,
) -> None:
    """Add the trainer's routes to the API app (see the module docstring);
    ``authenticated(request)`` says whether an open route may answer in full."""
    h = _Handlers(trainer, executor, authenticated)
    m = "/v2/models/{model}"
    a = m + "/adapters/{adapter}"
    app.router.add_post(a + "/examples", require_auth(h.add_example), expect_handler=expect_within(
        h.limit, what="example", setting="trainer.store.max_example_bytes"))
    # The exact count is private (q, steps, σ are planned from a noisy estimate of it).
    app.router.add_get(a + "/examples", require_auth(h.count_examples))
    app.router.add_delete(a + "/examples", require_auth(h.delete_examples))
    app.router.add_post(a + "/train", require_auth(h.train))
    app.router.add_get(a + "/train", h.progress)
    app.router.add_post(a + "/train/cancel", require_auth(h.cancel))
    app.router.add_get(a + "/privacy", h.privacy)
    app.router.add_post(a + "/privacy/audit", require_auth(h.audit),
                        expect_handler=expect_within(_AUDIT_BODY_BYTES, what="audit request", setting="fixed"))
    app.router.add_get(m + "/privacy", h.privacy_all)
    app.router.add_get("/v2/trainer", h.status)
    app.router.add_post("/v2/trainer/pause", require_auth(h.pause))
    app.router.add_post("/v2/trainer/resume", require_auth(h.resume))


@dataclass(frozen=True)
class TrainingDisabled:
    """Why the trainer could not start (its state is damaged or the disk is full): the
    daemon serves without it. ``kind`` is public (disk_full, ledger_damaged,
    examples_damaged, state_unreadable); ``detail``
    names files, for the token's holders."""

    kind: str
    detail: str

    def message(self, trusted: bool) -> str:
        head = f"training is disabled on this device ({self.kind}); serving goes on"
        return f"{head}: {self.detail}" if trusted else f"{head}; the daemon's log says why and how to recover"


def add_disabled_training_routes(
    app: web.Application, disabled: TrainingDisabled, require_auth: Callable[[Handler], Handler],
    authenticated: Callable[[web.Request], bool],
) -> None:
    """The trainer's routes when it could not start: each answers 503 saying why (the
    clients and loractl get an answer, not a 404)."""

    async def refuse(request: web.Request) -> web.Response:
        raise HttpError(503, disabled.message(authenticated(request)))

    m = "/v2/models/{model}"
    a = m + "/adapters/{adapter}"
    for method, path, auth in (("POST", a + "/examples", True), ("GET", a + "/examples", True),
                               ("DELETE", a + "/examples", True), ("POST", a + "/train", True),
                               ("GET", a + "/train", False), ("POST", a + "/train/cancel", True),
                               ("GET", a + "/privacy", False), ("POST", a + "/privacy/audit", True),
                               ("GET", m + "/privacy", False), ("GET", "/v2/trainer", False),
                               ("POST", "/v2/trainer/pause", True), ("POST", "/v2/trainer/resume", True)):
        app.router.add_route(method, path, require_auth(refuse) if auth else refuse)


class _Handlers:
    def __init__(self, trainer: TrainerService, executor: Executor | None,
                 authenticated: Callable[[web.Request], bool]) -> None:
        self.trainer = trainer
        self.executor = executor
        self.authenticated = authenticated
        self.limit = trainer.config.store.max_example_bytes

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        except PrivacyBudgetExceededError as e:
            raise HttpError(409, str(e)) from e
        except TrainingConflictError as e:
            raise HttpError(409, str(e)) from e
        except TrainingUnavailableError as e:
            raise HttpError(503, f"training is not available on this device: {e}") from e
        except StoreFullError as e:
            raise HttpError(507, str(e)) from e
        except BadTrainingDataError as e:
            raise HttpError(422, str(e)) from e
        except TrainingFailedError as e:
            if disk_full(e):  # the middleware answers 507 for it
                raise
            raise HttpError(500, str(e)) from e

    def _adapter(self, request: web.Request) -> str:
        model = request.match_info["model"]
        served = self.trainer.adapters.model_name
        if model != served:
            raise HttpError(404, f"model {model!r} not found; this daemon serves model {served!r}")
        return request.match_info.get("adapter", "")

    async def add_example(self, request: web.Request) -> web.Response:
        adapter = self._adapter(request)
        body = await read_body(request, self.limit, what="example", setting="trainer.store.max_example_bytes")
        inputs, label, user = await self._run(self._decode_example, body)
        if isinstance(inputs, str):
            text = inputs
            example_id = await self._run(lambda: self.trainer.add_text_example(adapter, text, label, user=user))
        else:
            example_id = await self._run(lambda: self.trainer.add_example(adapter, inputs, label, user=user))
        count = await self._run(self.trainer.examples_count, adapter)
        return json_response({"id": example_id, "adapter": adapter, "examples": count}, 201)

    def _decode_example(self, body: bytes) -> tuple[dict[str, np.ndarray] | str, Any, str | None]:
        """(model tensors, label array, user), or for a text example (text, label name or number, user)."""
        try:
            doc = loads_bounded(body, what="request body")
        except JsonInputError as e:  # also "[[[[..." within max_example_bytes: refused before parsing
            raise HttpError(400, str(e)) from None
        if self.trainer.language_model:
            if not isinstance(doc, Mapping) or set(doc) - {"text", "user"} or "text" not in doc:
                raise HttpError(400, 'an example of a language model is a JSON object {"text": "...", "user": optional '
                                'user id} with nothing else (no label: the model learns to continue the text)')
            form, required = "text", {"text"}
        else:
            text_model = self.trainer.takes_text
            form = "text" if text_model and isinstance(doc, Mapping) and "text" in doc else "inputs"
            required = {form, "label"}
            if not isinstance(doc, Mapping) or set(doc) - {form, "label", "user"} or not required <= set(doc):
                text_form = ('{"text": "...", "label": label name or class number, "user": optional user id}, or '
                             if text_model else "")
                raise HttpError(
                    400, f'an example is a JSON object {text_form}{{"inputs": [Open Inference Protocol input tensors], '
                    '"label": ..., "user": optional user id} with nothing else; the label is a class number or a '
                    'nested list of numbers')
        user = doc.get("user")
        if user is not None and not isinstance(user, str):
            raise HttpError(400, f"'user' must be a string (1 to 128 printable characters), got {user!r}")
        if form == "text":
            if not isinstance(doc["text"], str):
                raise HttpError(400, f"'text' must be a string, got {type(doc['text']).__name__}")
            label = doc.get("label")
            if "label" in required and (isinstance(label, bool) or not isinstance(label, (str, int))):
                raise HttpError(400, f"'label' must be a label name or a class number, got {label!r}")
            return doc["text"], label, user
        service = self.trainer.adapters
        request = oip.decode_infer_request({"inputs": doc["inputs"]}, service.model_inputs, service.model_outputs)
        label = doc["label"]
        if isinstance(label, bool) or not isinstance(label, (int, float, list)):
            raise HttpError(400, f"'label' must be a number or a nested list of numbers, got {label!r}")
        try:
            array = np.asarray(label)
        except ValueError:  # numpy: "inhomogeneous shape"
            raise HttpError(400, "'label' is a ragged nested list; it must be a number or a nested list of numbers "
                            "shaped like one row of the model output") from None
        if array.dtype.kind not in "iuf":
            raise HttpError(400, "'label' must be a number or a (non-ragged) nested list of numbers")
        return request.inputs, array, user

    async def count_examples(self, request: web.Request) -> web.Response:
        adapter = self._adapter(request)
        return json_response({"adapter": adapter, "examples": await self._run(self.trainer.examples_count, adapter)})

    async def delete_examples(self, request: web.Request) -> web.Response:
        adapter = self._adapter(request)
        deleted = await self._run(self.trainer.delete_examples, adapter)
        return json_response({"adapter": adapter, "deleted": deleted, "examples": 0})

    async def train(self, request: web.Request) -> web.Response:
        adapter = self._adapter(request)
        run_id = await self._run(self.trainer.trigger, adapter)
        status = await self._run(self.trainer.run_status, adapter)
        return json_response({**status, "run_id": run_id, "adapter": adapter}, 202)

    async def progress(self, request: web.Request) -> web.Response:
        adapter = self._adapter(request)
        private = self.authenticated(request)
        return json_response(await self._run(lambda: self.trainer.run_status(adapter, private=private)))

    async def cancel(self, request: web.Request) -> web.Response:
        adapter = self._adapter(request)
        cancelled = await self._run(self.trainer.cancel, adapter)
        if not cancelled:
            raise HttpError(409, f"adapter {adapter!r} has no queued or running training run to cancel")
        return json_response({"adapter": adapter, "cancelled": True})

    async def privacy(self, request: web.Request) -> web.Response:
        adapter = self._adapter(request)
        private = self.authenticated(request)
        return json_response(await self._run(lambda: self.trainer.privacy_state(adapter, private=private)))

    async def audit(self, request: web.Request) -> web.Response:
        adapter = self._adapter(request)
        body = await read_body(request, _AUDIT_BODY_BYTES, what="audit request", setting="fixed")
        try:
            doc = loads_bounded(body, what="request body") if body.strip() else {}
        except JsonInputError as e:  # invalid, or nested past MAX_JSON_DEPTH (1,000 deep was a RecursionError)
            raise HttpError(400, str(e)) from None
        allowed = {"canaries", "noise_multiplier"}
        if not isinstance(doc, dict) or set(doc) - allowed:
            raise HttpError(400, 'an audit request is a JSON object with optional "canaries" (an integer from 8 to '
                            '100000) and, in test mode only, "noise_multiplier"')
        canaries = doc.get("canaries", 1000)
        if isinstance(canaries, bool) or not isinstance(canaries, int) or not 8 <= canaries <= 100_000:
            raise HttpError(400, f'"canaries" must be an integer from 8 to 100000, got {canaries!r}')
        sigma = doc.get("noise_multiplier")
        if sigma is not None:
            if not self.trainer.config.testing:
                raise HttpError(403, '"noise_multiplier" replaces the noise added (σ still accounted) and exists '
                                "only to test the audit; it needs trainer.testing: true")
            if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma < 1e6:
                raise HttpError(400, f'"noise_multiplier" must be a number >= 0, got {sigma!r}')
            sigma = float(sigma)
        try:
            result = await self._run(lambda: self.trainer.audit(adapter, canaries=canaries, noise_multiplier=sigma))
        except ValueError as e:
            raise HttpError(422, str(e)) from e
        return json_response(result)

    async def privacy_all(self, request: web.Request) -> web.Response:
        self._adapter(request)
        private = self.authenticated(request)
        return json_response(await self._run(lambda: self.trainer.privacy_states(private=private)))

    async def status(self, request: web.Request) -> web.Response:
        private = self.authenticated(request)
        return json_response(await self._run(lambda: self.trainer.status(private=private)))

    async def pause(self, request: web.Request) -> web.Response:
        await self._run(self.trainer.pause)
        return json_response(await self._run(self.trainer.status))

    async def resume(self, request: web.Request) -> web.Response:
        await self._run(self.trainer.resume)
        return json_response(await self._run(self.trainer.status))
