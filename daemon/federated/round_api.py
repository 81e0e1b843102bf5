"""The daemon's federated routes: what this device's ClientApp asks of it (all need the token).

- ``GET /v2/federated``: the device as the federation checks it (trainer/federated.py
  :meth:`FederatedDevice.info`): adapter, base model fingerprint, A's digest, B's tensor
  names and shapes, LoRA rank/alpha, ε spent and budget, and whether it may train now
  (``ready`` with ``reasons``). ``?with_a=1`` adds ``"a"``: the frozen A tensors (public:
  a function of the base model and the seed), a base64 safetensors file.
- ``POST /v2/federated/round``: ``{"round": k, "a_digest": "sha256:…", "b": base64
  safetensors of the federation's B}``. Trains one round (blocking; the scheduler's run) and
  answers ``{"round", "run_id", "steps", "epsilon_before", "epsilon_after", "b"}``.
  422: the round does not fit this device (base model, A, shapes, non-finite values) or
  too few examples by the private count; 409: the device declines now (its policy, its
  budget) or another run of the adapter is in progress; 503: training unavailable; 504:
  the round took longer than ``federated.max_round_s``. Nothing is charged on 422 (except
  the charged private count, which the message says), 409 or 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from lorad.adapters.bounded_json import JsonInputError, loads_bounded
from lorad.daemon.http_api import HttpError, json_response, read_body
from lorad.trainer.errors import PrivacyBudgetExceededError, TrainerError
from lorad.trainer.federated import FederatedDevice, RoundDeclined, RoundRefused, RoundStart
from lorad.trainer.scheduler import TrainingConflictError
from lorad.trainer.service import TrainerService, TrainingUnavailableError

from . import wire
from .config import FederatedConfig

__all__ = ["add_federated_routes", "device_of"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def device_of(trainer: TrainerService, config: FederatedConfig) -> FederatedDevice:
    return FederatedDevice(trainer, adapter=config.adapter, round_epsilon=config.round_epsilon,
                           min_examples=config.min_examples, max_round_s=config.max_round_s)


def add_federated_routes(app: web.Application, trainer: TrainerService, config: FederatedConfig,
                         require_auth: Callable[[Handler], Handler]) -> FederatedDevice:
    device = device_of(trainer, config)
    h = _Handlers(device)
    app.router.add_get("/v2/federated", require_auth(h.info))
    app.router.add_post("/v2/federated/round", require_auth(h.round))
    return device


class _Handlers:
    def __init__(self, device: FederatedDevice) -> None:
        self.device = device
        # One round at a time: a second ClientApp call waits instead of failing on the
        # scheduler's reservation (Flower may retry a message).
        self._lock = asyncio.Lock()

    async def _run(self, fn: Callable[[], Any]) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        except RoundRefused as e:
            raise HttpError(422, str(e)) from e
        except (RoundDeclined, PrivacyBudgetExceededError, TrainingConflictError) as e:
            raise HttpError(409, str(e)) from e
        except TrainingUnavailableError as e:
            raise HttpError(503, f"training is not available on this device: {e}") from e
        except ValueError as e:  # too few examples by the private count (the count was charged)
            raise HttpError(422, str(e)) from e
        except TrainerError as e:
            status = 504 if "max_round_s" in str(e) else 500
            raise HttpError(status, str(e)) from e

    async def info(self, request: web.Request) -> web.Response:
        doc = await self._run(self.device.info)
        if request.query.get("with_a") in ("1", "true"):
            doc["a"] = wire.to_text(await self._run(self.device.initial_a))
        return json_response(doc)

    async def round(self, request: web.Request) -> web.Response:
        shapes = (await self._run(self.device.info))["shapes"]
        # base64 of float32 B plus the safetensors header, with room to spare.
        limit = 2 * sum(4 * a * b for a, b in shapes.values()) + 64 * len(shapes) + 65536
        body = await read_body(request, limit, what="round request", setting="the federated adapter's B size")
        try:
            doc = loads_bounded(body, what="round request")
        except JsonInputError as e:
            raise HttpError(400, str(e)) from None
        allowed = {"round", "a_digest", "b"}
        if not isinstance(doc, dict) or set(doc) != allowed:
            raise HttpError(400, 'a round request is a JSON object {"round": k >= 1, "a_digest": "sha256:…", '
                                 '"b": base64 safetensors of the federation\'s B} with nothing else')
        if not isinstance(doc["round"], int) or isinstance(doc["round"], bool) or doc["round"] < 1:
            raise HttpError(400, f"round must be an integer >= 1, got {doc['round']!r}")
        if not isinstance(doc["a_digest"], str):
            raise HttpError(400, "a_digest must be a string (sha256:…)")
        try:
            b = wire.from_text(doc["b"], what="b")
        except ValueError as e:
            raise HttpError(400, str(e)) from None
        start = RoundStart(doc["round"], b, doc["a_digest"])
        async with self._lock:
            outcome = await self._run(lambda: self.device.train_round(start))
        return json_response({"round": outcome.round, "run_id": outcome.run_id, "steps": outcome.steps,
                              "epsilon_before": outcome.epsilon_before, "epsilon_after": outcome.epsilon_after,
                              "b": wire.to_text(outcome.b)})
