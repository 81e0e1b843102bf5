"""Device-side persistence of OTA: the adapter service seam, staged chunks, install state.

- :class:`AdapterSink` is what ota needs of ``lorad.adapters.service.AdapterService`` (its
  ``install`` is the only way an adapter gets in, so serving never sees half of one).
- :class:`ChunkStage` keeps verified chunks of one payload on disk, so a disconnect or a
  restart costs only the chunks not yet stored. A chunk is written only after its signed
  digest matched, and checked again when a restart finds it.
- :class:`OtaState` records, per adapter, the fleet version installed, the local registry
  version serving it, the canonical bytes (a later delta's base), versions refused for
  good, and the journal of an install in progress, so that a kill at any write is
  recovered from on the next start. Every write is atomic (temp, fsync, rename, fsync dir).
  It also remembers which local version each fleet version was installed as, so that
  when an operator makes the service serve another version (a signed rollback, a removal,
  an upload) :meth:`OtaState.follow` records the truth: the version served, the fleet
  version it is, and that the version turned away from is held (not installed again).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lorad.adapters.fsutil import atomic_write_bytes, fsync_dir
from lorad.adapters.lora import LoraAdapter

from .errors import UpdateRejectedError
from .target import TargetSpec

__all__ = ["AdapterSink", "InstalledInfo", "InferOutcome", "ChunkStage", "OtaState", "Installed"]


class InstalledInfo(Protocol):
    """The part of ``lorad.adapters.service.AdapterInfo`` ota reads."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...


class InferOutcome(Protocol):
    """The part of ``lorad.adapters.service.InferResult`` ota reads."""

    @property
    def outputs(self) -> dict[str, np.ndarray]: ...
    @property
    def version(self) -> int | None: ...


class AdapterSink(Protocol):
    """What ota needs of the adapter service (``lorad.adapters.service.AdapterService``)."""

    def install(self, name: str, adapter: LoraAdapter, *,
                meta: Mapping[str, object] = ...) -> InstalledInfo: ...
    def rollback(self, name: str, version: int) -> InstalledInfo: ...
    def delete(self, name: str) -> None: ...
    def run(self, tensors: Mapping[str, np.ndarray], adapter: str | None = None) -> InferOutcome:
        """The model's own tensors in (a health probe records them so): the one inference path."""
        ...
    def info(self, name: str) -> InstalledInfo:
        """The version served now; ``lorad.adapters.errors.AdapterNotFoundError`` if there is none."""
        ...


class ChunkStage:
    """Verified chunks of one payload under ``directory`` (named by the payload digest)."""

    def __init__(self, directory: Path, spec: TargetSpec) -> None:
        self.dir = directory
        self.spec = spec
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        return self.dir / f"{index:06d}.chunk"

    def present(self) -> set[int]:
        """Indexes of stored chunks that still match their signed digest (others are deleted)."""
        have = set()
        for i in range(len(self.spec.chunks)):
            p = self._path(i)
            if not p.exists():
                continue
            try:
                self.spec.verify_chunk(i, p.read_bytes())
                have.add(i)
            except (UpdateRejectedError, OSError):  # a torn or foreign file: fetch it again
                p.unlink()
        return have

    def missing(self) -> list[int]:
        have = self.present()
        return [i for i in range(len(self.spec.chunks)) if i not in have]

    def put(self, index: int, data: bytes) -> None:
        """Verify chunk ``index`` against its signed digest, then store it durably."""
        self.spec.verify_chunk(index, data)
        atomic_write_bytes(self._path(index), data)

    def assemble(self) -> bytes:
        return b"".join(self._path(i).read_bytes() for i in range(len(self.spec.chunks)))

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass(frozen=True)
class Installed:
    fleet_version: int
    local_version: int
    adapter_sha256: str
    #: ε of the signed privacy record the version came with (None: no record)
    epsilon: float | None = None
    #: local version served right before this install (a rollout's undo; None: nothing)
    previous_local: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Installed:
        return cls(d["fleet_version"], d["local_version"], d["adapter_sha256"], d.get("epsilon"),
                   d.get("previous_local"))


    def to_dict(self) -> dict[str, Any]:
        return {"fleet_version": self.fleet_version, "local_version": self.local_version,
                "adapter_sha256": self.adapter_sha256, "epsilon": self.epsilon,
                "previous_local": self.previous_local}


#: Local versions remembered per adapter (the fleet versions they were installed as).
_HISTORY = 32


class OtaState:
    """``state.json`` plus ``installed/<name>/<fleet_version>.bin`` under ``directory``."""

    _VERSION = 1

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._path = directory / "state.json"
        self._data: dict[str, Any] = self._load()

    def _load(self) -> dict[str, Any]:
        empty: dict[str, Any] = {"format": self._VERSION, "adapters": {}, "refused": {},
                                 "pending": None, "time_floor": 0.0, "command_seq": 0,
                                 "last_result": None, "history": {}, "held": {}}
        if not self._path.exists():
            return empty
        try:
            data = json.loads(self._path.read_bytes())
            if data.get("format") != self._VERSION or not isinstance(data.get("adapters"), dict):
                raise ValueError(f"unknown format {data.get('format')!r}")
        except ValueError as e:
            raise RuntimeError(f"OTA state {self._path} is unreadable ({e}); move it away to "
                               "start from the adapter registry as it is") from e
        return {**empty, **data}

    def _save(self) -> None:
        atomic_write_bytes(self._path, json.dumps(self._data, sort_keys=True).encode())

    # --- reading --------------------------------------------------------------------

    def installed(self, name: str) -> Installed | None:
        d = self._data["adapters"].get(name)
        return None if d is None else Installed.from_dict(d)

    def all_installed(self) -> dict[str, Installed]:
        return {n: Installed.from_dict(d) for n, d in self._data["adapters"].items()}

    def all_refused(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self._data["refused"].items()}

    def refused(self, name: str) -> int:
        """Highest fleet version of ``name`` refused for good (0 if none)."""
        return int(self._data["refused"].get(name, 0))

    def held(self, name: str) -> int:
        """Highest fleet version of ``name`` an operator turned away from (0 if none):
        neither it nor an older one is installed again; a newer one is."""
        return int(self._data["held"].get(name, 0))

    def all_held(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self._data["held"].items()}

    def known(self) -> set[str]:
        """Every adapter OTA installed, holds or remembers a version of."""
        return set(self._data["adapters"]) | set(self._data["held"]) | set(self._data["history"])

    def installed_as(self, name: str, local_version: int) -> Installed | None:
        """The fleet version (and its record) that local version ``local_version`` of
        ``name`` was installed as; None if OTA did not install it."""
        d = self._data["history"].get(name, {}).get(str(local_version))
        return None if d is None else Installed.from_dict(d)

    def canonical(self, name: str, fleet_version: int) -> bytes | None:
        p = self.dir / "installed" / name / f"{fleet_version}.bin"
        return p.read_bytes() if p.exists() else None

    @property
    def pending(self) -> dict[str, Any] | None:
        p = self._data["pending"]
        return None if p is None else dict(p)

    @property
    def time_floor(self) -> float:
        return float(self._data["time_floor"])

    @property
    def command_seq(self) -> int:
        return int(self._data["command_seq"])

    @property
    def last_result(self) -> dict[str, Any] | None:
        r = self._data["last_result"]
        return None if r is None else dict(r)

    # --- writing (each call is one atomic write) ------------------------------------

    def begin(self, name: str, fleet_version: int, previous_local: int | None) -> None:
        self._data["pending"] = {"adapter": name, "fleet_version": fleet_version,
                                 "previous_local": previous_local}
        self._save()

    def commit(self, name: str, installed: Installed, canonical: bytes) -> None:
        d = self.dir / "installed" / name
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(d / f"{installed.fleet_version}.bin", canonical)
        old = self.installed(name)
        self._data["adapters"][name] = installed.to_dict()
        history = self._data["history"].setdefault(name, {})
        history[str(installed.local_version)] = installed.to_dict()
        for stale in sorted(history, key=int)[:-_HISTORY]:
            del history[stale]
        self._data["held"].pop(name, None)  # a newer version than any held one: the fleet's again
        self._data["pending"] = None
        self._save()
        if old is not None and old.fleet_version != installed.fleet_version:
            # the one before the new version stays: it is the base of deltas against it
            for p in d.glob("*.bin"):
                if p.stem not in (str(installed.fleet_version), str(old.fleet_version)):
                    p.unlink()
            fsync_dir(d)

    def follow(self, name: str, served: int | None) -> Installed | None:
        """Record that the service serves local version ``served`` of ``name`` (None:
        nothing), whoever made it so; returns the record of what is served now (None when
        it is not a fleet version).

        When that is not the version OTA installed, the operator chose otherwise: the fleet
        version installed is held (:meth:`held`). A local version OTA installed earlier is
        recorded again as the fleet version it was installed as. An adapter served no more
        has no stored version left, so what was remembered of its versions goes too.
        """
        inst = self.installed(name)
        if inst is not None and inst.local_version == served:
            return inst
        now = None if served is None else self.installed_as(name, served)
        if inst is None and now is None and (served is not None or name not in self._data["history"]):
            return None  # nothing OTA knows of was or is served: nothing to record
        if inst is not None:
            self._data["held"][name] = max(self.held(name), inst.fleet_version)
        if now is None:
            self._data["adapters"].pop(name, None)
        else:
            self._data["adapters"][name] = now.to_dict()
        if served is None:
            self._data["history"].pop(name, None)
        self._save()
        return now

    def refuse(self, name: str, fleet_version: int) -> None:
        self._data["refused"][name] = max(self.refused(name), fleet_version)
        self._data["pending"] = None
        self._save()

    def clear_pending(self) -> None:
        self._data["pending"] = None
        self._save()

    def set_time_floor(self, t: float) -> None:
        if t > self.time_floor:
            self._data["time_floor"] = t
            self._save()

    def set_command_seq(self, seq: int) -> None:
        if seq <= self.command_seq:
            raise ValueError(f"command sequence must grow: {seq} <= {self.command_seq}")
        self._data["command_seq"] = seq
        self._save()

    def set_last_result(self, result: Mapping[str, Any]) -> None:
        self._data["last_result"] = dict(result)
        self._save()

