"""The federated benchmark's simulated users: one FederatedDevice per user, in any process.

Flower's simulation engine runs the ClientApp in Ray actor processes, and any actor may
take any user's message; :class:`DeviceFactory` (pickled with the ClientApp) builds the
device of ``context.node_config["partition-id"]`` the first time a process meets that
user and keeps it for the process: a :class:`TrainerService` per user under its own state
directory (its own example store and privacy ledger), all of them sharing the process's
one engine and AdapterService (MiniLM is loaded once per process) and one artifact cache
(the training graphs are the same for every user). The benchmark runs one actor (the
machine has 2 cores), so a user's ledger is only ever open in one process; the local-only
mode uses the same factory in the benchmark's own process.

:class:`ByteMeter` is a Flower mod, placed outermost in the benchmark's ClientApp
(:func:`metered_client_app`): it adds up the bytes of every message's content that reaches
a user's ClientApp and of every reply (array data, bytes and string values of config
records, 8 bytes per number), per user and per round (the message's group id, which the
ServerApp sets to the round), and appends one JSON line per message to a file of its
process.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

if TYPE_CHECKING:
    from lorad.adapters.service import AdapterService
    from lorad.trainer.federated import FederatedDevice, RoundOutcome, RoundStart

__all__ = ["DeviceFactory", "ByteMeter", "metered_client_app", "content_bytes", "read_meter", "read_rounds"]

#: This process's engine and adapter service, and its devices by (state root, partition id).
_SERVICES: dict[tuple[str, tuple[str, ...], int, int], AdapterService] = {}
_DEVICES: dict[tuple[str, int], FederatedDevice] = {}


@dataclass(frozen=True)
class DeviceFactory:
    """Everything a process needs to make a simulated user's device (picklable)."""

    model: str
    targets: tuple[str, ...]
    rank: int
    max_text_tokens: int
    #: ``trainer:`` section of the users' TrainerService (parse_trainer_section's input).
    trainer: Mapping[str, Any]
    #: One state directory per user under this root.
    state_root: str
    #: The training artifacts' cache, shared by every user (and every mode).
    artifacts: str
    #: Each user's training texts: (text, label) pairs, by partition id.
    examples: Sequence[Sequence[tuple[str, str]]]
    adapter: str
    round_epsilon: float
    min_examples: int
    max_round_s: float = 3600.0

    def service(self) -> AdapterService:
        """This process's AdapterService of the base model (made once)."""
        key = (self.model, self.targets, self.rank, self.max_text_tokens)
        if key not in _SERVICES:
            from lorad.adapters.engine import InferenceEngine
            from lorad.adapters.registry import AdapterRegistry
            from lorad.adapters.service import AdapterService
            from lorad.adapters.text_input import TextFrontEnd

            engine = InferenceEngine(Path(self.model), targets=list(self.targets), rank=self.rank)
            text = TextFrontEnd.from_model(engine.base_model, max_tokens=self.max_text_tokens)
            registry = AdapterRegistry(Path(self.state_root) / f"registry-{os.getpid()}")
            _SERVICES[key] = AdapterService(engine, registry, cache_budget_bytes=64 << 20, text=text)
        return _SERVICES[key]

    def device(self, user: int) -> FederatedDevice:
        """User ``user``'s FederatedDevice in this process (made, with its examples, once)."""
        key = (self.state_root, user)
        if key not in _DEVICES:
            from lorad.trainer.config import parse_trainer_section
            from lorad.trainer.federated import FederatedDevice
            from lorad.trainer.service import TrainerService

            shared = Path(self.artifacts)
            shared.mkdir(parents=True, exist_ok=True)
            state = Path(self.state_root) / f"user-{user:02d}"
            (state / "trainer").mkdir(parents=True, exist_ok=True)
            link = state / "trainer" / "artifacts"
            if not link.is_symlink():
                link.symlink_to(shared, target_is_directory=True)
            trainer = TrainerService(parse_trainer_section(dict(self.trainer)), adapters=self.service(),
                                     state_dir=state, federated=[self.adapter])
            if trainer.examples_count(self.adapter) == 0:
                for text, label in self.examples[user]:
                    trainer.add_text_example(self.adapter, text, label)
            trainer.start()
            _DEVICES[key] = FederatedDevice(trainer, adapter=self.adapter, round_epsilon=self.round_epsilon,
                                            min_examples=self.min_examples, max_round_s=self.max_round_s)
        return _DEVICES[key]

    def recorded(self, user: int) -> _Recorded:
        """User ``user``'s device, its rounds written down (:func:`read_rounds`)."""
        return _Recorded(self.device(user), user, self.state_root)

    def __call__(self, context: Context) -> _Recorded:
        return self.recorded(int(context.node_config["partition-id"]))

    def close(self) -> None:
        """Close this process's devices of this factory (their schedulers, ledgers, stores)."""
        for key in [k for k in _DEVICES if k[0] == self.state_root]:
            _DEVICES.pop(key).trainer.close()


class _Recorded:
    """A device whose rounds are written down: the update's L2 norm (before the federation's
    clipping) and the round's training seconds, one JSON line per round."""

    def __init__(self, device: FederatedDevice, user: int, root: str) -> None:
        self.device = device
        self.user = user
        self.path = Path(root) / f"rounds-{os.getpid()}.jsonl"

    def info(self) -> dict[str, Any]:
        return self.device.info()

    def initial_a(self) -> dict[str, np.ndarray]:
        return self.device.initial_a()

    def train_round(self, start: RoundStart) -> RoundOutcome:
        began = time.monotonic()
        outcome = self.device.train_round(start)
        norm = float(np.sqrt(sum(float(np.sum((outcome.b[n] - start.b[n]) ** 2)) for n in outcome.b)))
        line = {"round": start.round, "user": self.user,
                "update_norm": norm, "train_s": time.monotonic() - began,
                "epsilon_round": outcome.epsilon_after - outcome.epsilon_before}
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")
        return outcome


def read_rounds(root: Path) -> list[dict[str, Any]]:
    """Every round the devices under ``root`` trained (:class:`_Recorded`)."""
    return _read_lines(root.glob("rounds-*.jsonl"))


def _read_lines(paths: Iterable[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(paths):
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows


def _value_bytes(value: object) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, bool):
        return 1
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 8  # int, float


def content_bytes(message: Message) -> int:
    """Bytes of a message's content: array data, config and metric values."""
    if not message.has_content():
        return 0
    content = message.content
    total = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    total += sum(_value_bytes(v) for record in content.config_records.values() for v in record.values())
    total += sum(_value_bytes(v) for record in content.metric_records.values() for v in record.values())
    return total


@dataclass(frozen=True)
class ByteMeter:
    """A Flower mod: bytes in and out of the ClientApp, one JSON line per message."""

    directory: str

    def __call__(self, message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        received = content_bytes(message)
        began = time.monotonic()
        reply = call_next(message, context)
        line = {"user": int(context.node_config.get("partition-id", -1)), "node": message.metadata.dst_node_id,
                "round": message.metadata.group_id, "type": message.metadata.message_type,
                "in": received, "out": content_bytes(reply), "s": time.monotonic() - began}
        with open(Path(self.directory) / f"meter-{os.getpid()}.jsonl", "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")
        return reply


def metered_client_app(factory: DeviceFactory, meter_dir: Path) -> ClientApp:
    """lorad's ClientApp (daemon/federated/client_app.py) for the simulated users, metered."""
    from lorad.daemon.federated.client_app import make_client_app

    # Outermost: the meter sees what the secure aggregation mod sends.
    return make_client_app(factory, outer_mods=[ByteMeter(str(meter_dir))])


def read_meter(directory: Path) -> list[dict[str, Any]]:
    """Every message the meters in ``directory`` saw."""
    return _read_lines(directory.glob("meter-*.jsonl"))
