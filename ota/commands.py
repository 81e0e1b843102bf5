"""Fleet → device commands (load, pin, unpin, evict, train-now, rollback, remove), signed and fresh.

A command is canonical JSON signed with an Ed25519 fleet command key (``cryptography``);
the keys a device trusts are named by its trusted TUF root (:data:`lorad.ota.repository.
COMMAND_KEYS_FIELD`), so they rotate and are revoked with the root. A device obeys a
command only if the signature is valid, it is addressed to this device, it was issued
within ``max_age_s`` (and not in the future beyond a slack), and its sequence number is
above every one seen before; the sequence number is persisted *before* the command runs,
so neither a replay nor a crash in the middle lets a command run twice. The nonce makes
two commands with equal fields distinct signatures. Verification is pure.

Every command is logged on the device with its outcome (done, failed or rejected, and
why), and its result says what the adapter serves afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import SSlibKey

from . import wire
from .errors import CommandRejectedError, TransportError
from .transport import TOPIC_ROOT

__all__ = ["ACTIONS", "Command", "command_topic", "sign_command", "verify_command", "key_id",
           "CommandSink", "CommandExecutor"]

_log = logging.getLogger(__name__)
ACTIONS = ("load", "pin", "unpin", "evict", "train_now", "rollback", "remove")
_MAX_COMMAND_BYTES = 8 * 1024


def command_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/device/{device_id}/cmd"


def key_id(public: Ed25519PublicKey) -> str:
    """The TUF key id of a command key (as listed in the root)."""
    return str(SSlibKey.from_crypto(public).keyid)


@dataclass(frozen=True)
class Command:
    device: str
    action: str
    seq: int
    nonce: str
    issued_at: float
    adapter: str | None = None
    #: for rollback: the local registry version to serve again (as the device's status shows)
    version: int | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action {self.action!r} not allowed; allowed: {ACTIONS}")
        if self.action != "train_now" and not self.adapter:
            raise ValueError(f"action {self.action!r} needs an adapter name")
        if self.action == "rollback" and (self.version is None or self.version < 1):
            raise ValueError("rollback needs the version to return to (>= 1)")
        if self.seq < 1 or len(self.nonce) < 16:
            raise ValueError("seq must be >= 1 and nonce at least 16 hex characters")

    def canonical(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def new(cls, device: str, action: str, *, seq: int, adapter: str | None = None,
            version: int | None = None, now: float | None = None) -> Command:
        return cls(device=device, action=action, seq=seq, nonce=os.urandom(16).hex(),
                   issued_at=time.time() if now is None else now, adapter=adapter, version=version)


def sign_command(cmd: Command, key: Ed25519PrivateKey) -> bytes:
    return json.dumps({"command": asdict(cmd), "keyid": key_id(key.public_key()),
                       "sig": key.sign(cmd.canonical()).hex()}, sort_keys=True).encode()


def _reject(reason: str, message: str) -> CommandRejectedError:
    return CommandRejectedError(reason, message)


def verify_command(raw: bytes, *, keys: Mapping[str, SSlibKey], device_id: str, now: float,
                   last_seq: int, max_age_s: float = 300.0, future_slack_s: float = 60.0) -> Command:
    """The command in ``raw`` if it may be obeyed, else CommandRejectedError with the reason."""
    if len(raw) > _MAX_COMMAND_BYTES:
        raise _reject("command_invalid", f"command of {len(raw)} bytes exceeds {_MAX_COMMAND_BYTES}")
    try:
        env = wire.loads(raw, what="command", max_bytes=_MAX_COMMAND_BYTES)
        body, kid, sig = env["command"], str(env["keyid"]), bytes.fromhex(env["sig"])
        cmd = Command(**body)
    except (ValueError, KeyError, TypeError) as e:
        raise _reject("command_invalid", f"malformed command: {e!r}") from e
    key = keys.get(kid)
    if key is None or key.keytype != "ed25519":
        raise _reject("command_signature", f"key {kid[:16]} is not a trusted fleet command key")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(key.keyval["public"])).verify(sig, cmd.canonical())
    except (InvalidSignature, ValueError) as e:
        raise _reject("command_signature", f"signature by {kid[:16]} does not verify") from e
    if cmd.device != device_id:
        raise _reject("command_target", f"command for {cmd.device!r}, this is {device_id!r}")
    if cmd.seq <= last_seq:
        raise _reject("command_replay", f"sequence {cmd.seq} <= last obeyed {last_seq}")
    age = now - cmd.issued_at
    if age > max_age_s or age < -future_slack_s:
        raise _reject("command_stale", f"issued {age:.0f} s ago; allowed -{future_slack_s:.0f}..{max_age_s:.0f} s")
    return cmd


class CommandSink(Protocol):
    """What commands need of ``lorad.adapters.service.AdapterService``."""

    def load(self, name: str) -> object: ...
    def pin(self, name: str) -> object: ...
    def unpin(self, name: str) -> object: ...
    def evict(self, name: str) -> object: ...
    def delete(self, name: str) -> None: ...
    def rollback(self, name: str, version: int) -> object: ...


def _served(name: str, done: str, info: object) -> str:
    """``"kws pinned; serving local version 3"`` from what the service answered."""
    version = getattr(info, "version", None)
    return f"{name} {done}" + (f"; serving local version {version}" if isinstance(version, int) else "")


class CommandExecutor:
    """Verifies and runs the commands arriving on this device's command topic.

    ``handle`` blocks (the service, the status publish): call it from a worker thread,
    never from the transport's delivery thread.
    """

    def __init__(self, *, device_id: str, sink: CommandSink,
                 keys: Callable[[], Mapping[str, SSlibKey]], last_seq: Callable[[], int],
                 save_seq: Callable[[int], None], train_now: Callable[[str | None], None] | None = None,
                 on_result: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.time, max_age_s: float = 300.0,
                 after: Callable[[Command], str] | None = None) -> None:
        """``after(cmd)`` runs once a command on an adapter has run (or failed): the OTA
        client records what the adapter serves now and says it, in the result's message."""
        self._after = after
        self._device = device_id
        self._sink = sink
        self._keys = keys
        self._last_seq = last_seq
        self._save_seq = save_seq
        self._train_now = train_now
        self._on_result = on_result
        self._clock = clock
        self._max_age = max_age_s
        self.last_result: dict[str, Any] | None = None

    def handle(self, raw: bytes) -> dict[str, Any]:
        """Verify and run one command; returns (and reports) what happened."""
        result: dict[str, Any]
        try:
            cmd = verify_command(raw, keys=self._keys(), device_id=self._device, now=self._clock(),
                                 last_seq=self._last_seq(), max_age_s=self._max_age)
        except CommandRejectedError as e:
            if e.reason == "command_replay" and self._is_last(raw):
                return self.last_result or {}  # the retained copy of what we already ran
            result = {"result": "rejected", "reason": e.reason, "message": e.message, "at": self._clock()}
            return self._report(result)
        self._save_seq(cmd.seq)
        result = {"result": "done", "action": cmd.action, "adapter": cmd.adapter, "seq": cmd.seq,
                  "reason": None, "message": "", "at": self._clock()}
        try:
            result["message"] = self._run(cmd)
        except Exception as e:  # the service said no (unknown adapter, cache full, ...)
            result.update(result="failed", message=f"{type(e).__name__}: {e}")
        if self._after is not None and cmd.adapter:
            try:
                now = self._after(cmd)
            except Exception:  # the command ran: its result is reported all the same
                _log.exception("recording what %r serves after command %d failed", cmd.adapter, cmd.seq)
                now = ""
            if now:
                result["message"] = "; ".join(m for m in (result["message"], now) if m)
        return self._report(result)

    def _is_last(self, raw: bytes) -> bool:
        try:
            return int(wire.loads(raw, what="command", max_bytes=_MAX_COMMAND_BYTES)["command"]["seq"]) == self._last_seq()
        except (ValueError, KeyError, TypeError):
            return False

    def _run(self, cmd: Command) -> str:
        """Carry out ``cmd``; what it did, in words."""
        name = cmd.adapter or ""
        if cmd.action == "load":
            return _served(name, "loaded", self._sink.load(name))
        if cmd.action == "pin":
            return _served(name, "pinned", self._sink.pin(name))
        if cmd.action == "unpin":
            return _served(name, "unpinned", self._sink.unpin(name))
        if cmd.action == "evict":
            return _served(name, "evicted", self._sink.evict(name))
        if cmd.action == "remove":  # a rollout's undo where no version was served before
            self._sink.delete(name)
            return f"{name} removed"
        if cmd.action == "rollback":
            assert cmd.version is not None  # checked by Command
            return _served(name, "rolled back", self._sink.rollback(name, cmd.version))
        if self._train_now is None:
            raise RuntimeError("this device has no trainer")
        self._train_now(cmd.adapter)
        return f"training run of {name} started" if name else "training run started"

    def _report(self, result: dict[str, Any]) -> dict[str, Any]:
        what = " ".join(str(x) for x in (f"seq {result['seq']}" if result.get("seq") else None,
                                         result.get("action"), result.get("adapter")) if x)
        outcome = result["result"] + (f" ({result['reason']})" if result.get("reason") else "")
        line = f"OTA command{' ' + what if what else ''}: {outcome}" + (f": {result['message']}" if result.get("message") else "")
        if result["result"] == "done":
            _log.info("%s", line)
        else:
            _log.warning("%s", line)
        self.last_result = result
        if self._on_result is not None:
            try:
                self._on_result(result)
            except TransportError as e:
                _log.warning("command result not reported: %s", e)
        return result
