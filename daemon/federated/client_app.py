"""The Flower ClientApp of a lorad device: a round of the federation is a local DP run.

The SuperNode the daemon runs (daemon/federated/supernode.py) starts this app for each
message of a run; the app asks its daemon (node config ``lorad-url`` and
``lorad-token-file``) through ``/v2/federated`` (daemon/federated/round_api.py) and returns
only the trained B, never an example. In Flower's simulation engine the same app runs with
an in-process :class:`lorad.trainer.federated.FederatedDevice` per simulated user
(:func:`make_client_app`).

Messages, as Flower's legacy client API names them:

- ``get_properties``: the device as the federation checks it (base model, A's digest, B's
  shapes, budget, ready), and A itself when asked (``with_a``: A is public);
- ``fit``: B in the federation's tensor order (sorted names) and the config ``round`` and
  ``a_digest``; the answer is the trained B with weight 1 (every user counts the same:
  the central DP guarantee is per user), the round's ε in the metrics.

Mods, outermost first: ``secaggplus_mod`` (the update leaves masked; the server sees only
the sum) around ``fixedclipping_mod`` (the update B_new − B_round is clipped to the
federation's norm C before masking: the sensitivity of the sum to one user).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.client import Client, NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common import Context, NDArrays, Scalar

from lorad.trainer.errors import TrainerError
from lorad.trainer.federated import RoundDeclined, RoundOutcome, RoundRefused, RoundStart

from . import wire

__all__ = ["Device", "HttpDevice", "make_client_app", "app"]

_log = logging.getLogger(__name__)


class Device(Protocol):
    """What the ClientApp needs of a device (:class:`lorad.trainer.federated.FederatedDevice`
    in process, :class:`HttpDevice` through the daemon)."""

    def info(self) -> dict[str, Any]: ...

    def initial_a(self) -> dict[str, np.ndarray]: ...

    def train_round(self, start: RoundStart) -> RoundOutcome: ...


class HttpDevice:
    """The daemon's ``/v2/federated`` routes, with its API token."""

    def __init__(self, url: str, token: str, *, round_timeout_s: float = 6 * 3600) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._round_timeout_s = round_timeout_s

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> HttpDevice:
        try:
            url, token_file = str(node_config["lorad-url"]), Path(str(node_config["lorad-token-file"]))
        except KeyError as e:
            raise RuntimeError(f"the SuperNode's node config lacks {e.args[0]!r}: this ClientApp runs on a SuperNode "
                               "started by lorad (federated: in lorad.yaml)") from None
        return cls(url, token_file.read_text(encoding="utf-8").strip())

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self._token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                doc: dict[str, Any] = json.loads(response.read())
                return doc
        except urllib.error.HTTPError as e:
            try:
                message = str(json.loads(e.read()).get("error", e.reason))
            except ValueError:
                message = str(e.reason)
            if e.code == 422:
                raise RoundRefused(message) from None
            if e.code in (409, 503):
                raise RoundDeclined([message]) from None
            raise TrainerError(f"the device's daemon answered {e.code}: {message}") from None
        except (urllib.error.URLError, OSError) as e:
            raise TrainerError(f"cannot reach the device's daemon at {self.url}: {e}") from None

    def info(self) -> dict[str, Any]:
        return self._call("GET", "/v2/federated", timeout=60)

    def initial_a(self) -> dict[str, np.ndarray]:
        return wire.from_text(self._call("GET", "/v2/federated?with_a=1", timeout=600)["a"], what="the device's A")

    def train_round(self, start: RoundStart) -> RoundOutcome:
        doc = self._call("POST", "/v2/federated/round", {"round": start.round, "a_digest": start.a_digest,
                                                         "b": wire.to_text(start.b)}, timeout=self._round_timeout_s)
        return RoundOutcome(int(doc["round"]), int(doc["run_id"]), wire.from_text(doc["b"], what="the trained B"),
                            int(doc["steps"]), float(doc["epsilon_before"]), float(doc["epsilon_after"]))


def properties(info: Mapping[str, Any]) -> dict[str, Scalar]:
    """The device's info as Flower scalars (nested values as JSON text)."""
    return {key: (value if isinstance(value, bool | int | float | str | bytes) else json.dumps(value))
            for key, value in info.items()}


class _LoradClient(NumPyClient):
    def __init__(self, device: Device) -> None:
        self.device = device

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        props = properties(self.device.info())
        if config.get("with_a"):
            props["a"] = wire.to_bytes(self.device.initial_a())
        return props

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        names = sorted(self.device.info()["shapes"])
        start = RoundStart(int(config["round"]), wire.named(parameters, names, what="the federation's B"),
                           str(config["a_digest"]))
        outcome = self.device.train_round(start)
        _log.info("federated round %d: run %d, %d steps, ε %.4g → %.4g", outcome.round, outcome.run_id,
                  outcome.steps, outcome.epsilon_before, outcome.epsilon_after)
        return wire.ordered(outcome.b, names), 1, {"epsilon_round": outcome.epsilon_after - outcome.epsilon_before,
                                                   "epsilon_spent": outcome.epsilon_after}


def make_client_app(device_for: Callable[[Context], Device], *, outer_mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp with ``device_for(context)`` as each message's device; ``outer_mods``
    run outside secure aggregation (they see what leaves the device: a benchmark's meter)."""

    def client_fn(context: Context) -> Client:
        return _LoradClient(device_for(context)).to_client()

    return ClientApp(client_fn=client_fn, mods=[*outer_mods, secaggplus_mod, fixedclipping_mod])


#: The deployed app (the FAB's ``clientapp``): the daemon named in the SuperNode's node config.
app = make_client_app(lambda context: HttpDevice.from_node_config(context.node_config))
