"""The device side of OTA: TUF refresh over the broker, choose, verify, stage, install,
health-check, commit or roll back, and say why.

python-tuf's ngclient does the metadata workflow (root rotation, timestamp, snapshot,
targets, with thresholds, expiry, rollback and mix-and-match checks); its transport is
:class:`BrokerFetcher`, which reads retained files from the broker. Target payloads do
not go through ngclient's download (it writes in place and buffers the whole file):
they are fetched chunk by chunk into a :class:`lorad.ota.installer.ChunkStage`, each chunk
checked against the signed per-chunk digest as it arrives. Every refusal ends as an
:class:`UpdateResult` with a reason code from :data:`lorad.ota.errors.REASONS`, kept in the
device state and published in its status.

The status says what the adapter service serves, read from it each time: after a signed
rollback, a removal or a local change the device reports the local version served and
the fleet version it was installed as, and the fleet version it was turned away from is
held: neither it nor an older one is installed again (a newer one is).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from securesystemslib.signer import SSlibKey
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, Targets
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from lorad.adapters.errors import AdapterNotFoundError, InvalidAdapterError
from lorad.adapters.fsutil import atomic_write_bytes

from .commands import Command, CommandExecutor, CommandSink, command_topic
from .config import ClientConfig
from .errors import OtaError, TransportError, UpdateRejectedError
from .files import INDEX_TOPIC, NotOnBroker, RepoReader
from .installer import AdapterSink, ChunkStage, Installed, OtaState
from .repository import COMMAND_KEYS_FIELD, offer_topic
from .status import DeviceStatus, StatusReporter
from .target import ProbeSet, TargetSpec, reconstruct
from .transport import Handler, Transport

__all__ = ["ClientConfig", "UpdateResult", "BrokerFetcher", "OtaClient"]

_log = logging.getLogger(__name__)
_URL = "lorad:/"
# ngclient's words when a file is not the version its parent role names ("Expected targets v3, got v2.")
_NAMED_VERSION = re.compile(r"^Expected \S+ v\d+, got v\d+")
#: Reasons that depend only on signed content: retrying the same version cannot help.
_FINAL_REASONS = frozenset({"base_model_mismatch", "payload_invalid", "adapter_digest",
                            "target_invalid", "install_failed", "health_check_failed"})


@dataclass(frozen=True)
class UpdateResult:
    """Outcome of one adapter (or of the metadata refresh when ``adapter`` is None).

    ``result``: installed | up_to_date | skipped | deferred (verified, waits for the
    install window or policy) | rejected | failed (channel) | recovered | idle (the
    broker holds no repository yet: nothing was ever published).
    """

    result: str
    adapter: str | None = None
    version: int | None = None
    reason: str | None = None
    message: str = ""
    at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BrokerFetcher(FetcherInterface):
    """ngclient transport: ``lorad:/<name>`` is repository file ``<name>`` on the broker."""

    def __init__(self, reader: RepoReader, limits: UpdaterConfig) -> None:
        self._reader = reader
        self._limits = limits
        #: repository file names in the order ngclient asked for them
        self.requested: list[str] = []

    def _limit(self, name: str) -> int:
        role = name.rsplit("/", 1)[-1].removesuffix(".json").rsplit(".", 1)[-1]
        return {"root": self._limits.root_max_length, "timestamp": self._limits.timestamp_max_length,
                "snapshot": self._limits.snapshot_max_length}.get(role, self._limits.targets_max_length)

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(_URL):
            raise tuf_exc.DownloadHTTPError(f"{url} is not a repository file", 404)
        name = url[len(_URL):]
        self.requested.append(name)
        try:
            data = self._reader.fetch(name, max_length=self._limit(name))
        except NotOnBroker:
            raise tuf_exc.DownloadHTTPError(f"{name} is not on the broker", 404) from None
        return iter([data])


class _NothingPublished(Exception):
    """The broker acknowledged the subscription to the repository index and holds none,
    and this device never saw a repository: the fleet has published nothing yet."""


class _IndexWatch(Transport):
    """The transport as the repository reader uses it, noting whether the broker has
    acknowledged the subscription to the index (so an index that then does not come is
    one the broker does not hold, not a channel that failed)."""

    def __init__(self, inner: Transport) -> None:
        self._inner = inner
        self.index_subscribed = False

    @property
    def max_payload(self) -> int:
        return self._inner.max_payload

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                expiry_s: int | None = None) -> None:
        self._inner.publish(topic, payload, retain=retain, expiry_s=expiry_s)

    def subscribe(self, topics: Sequence[str], handler: Handler) -> None:
        if INDEX_TOPIC in topics:
            self.index_subscribed = False
        self._inner.subscribe(topics, handler)
        if INDEX_TOPIC in topics:
            self.index_subscribed = True

    def unsubscribe(self, topics: Sequence[str]) -> None:
        if INDEX_TOPIC in topics:
            self.index_subscribed = False
        self._inner.unsubscribe(topics)

    def close(self) -> None:
        self._inner.close()


def _classify(exc: BaseException) -> OtaError:
    """The precise reason behind an exception out of ngclient."""
    seen: BaseException | None = exc
    while seen is not None:  # our own errors travel wrapped in DownloadError
        if isinstance(seen, OtaError):
            return seen
        seen = seen.__cause__ or seen.__context__
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, tuf_exc.DownloadLengthMismatchError):
        return UpdateRejectedError("too_large", msg)
    if isinstance(exc, tuf_exc.DownloadError):
        return TransportError(f"metadata download failed: {msg}")
    if isinstance(exc, tuf_exc.UnsignedMetadataError):
        return UpdateRejectedError("signature", msg)
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        return UpdateRejectedError("expired", msg)
    if isinstance(exc, tuf_exc.BadVersionNumberError):
        # A file that does not match the version its parent role names is mix-and-match;
        # a version below the trusted one is a rollback.
        if msg.startswith("Expected snapshot version") or _NAMED_VERSION.match(msg):
            return UpdateRejectedError("mix_and_match", msg)
        return UpdateRejectedError("rollback", msg)
    if isinstance(exc, tuf_exc.LengthOrHashMismatchError):
        return UpdateRejectedError("mix_and_match", f"metadata does not match the length/hash its "
                                   f"parent role signed: {msg}")
    if isinstance(exc, tuf_exc.RepositoryError):
        return UpdateRejectedError("metadata_invalid", msg)
    raise exc


class OtaClient:
    """One device's updater. ``update()`` runs one cycle; ``start()`` reacts to offers."""

    def __init__(self, config: ClientConfig, transport: Transport, sink: AdapterSink, *,
                 clock: Callable[[], float] = time.time,
                 epsilon: Callable[[], Mapping[str, float]] | None = None,
                 on_result: Callable[[UpdateResult], None] | None = None,
                 on_command: Callable[[Mapping[str, Any]], None] | None = None,
                 install_gate: Callable[[], str | None] | None = None) -> None:
        """``install_gate``: why an install must wait now (e.g. "on battery"), or None;
        the daemon builds it from the trainer's policy probes."""
        self.config = config
        self._gate = install_gate
        #: when a deferred install is retried (clock seconds), None if nothing waits
        self.retry_at: float | None = None
        self._t = transport
        self._sink = sink
        self._clock = clock
        self._epsilon = epsilon
        #: observers (metrics): every update result and every command result
        self._result_observer = on_result
        self._command_observer = on_command
        self._dir = Path(config.state_dir)
        self._meta_dir = self._dir / "metadata"
        self._meta_dir.mkdir(parents=True, exist_ok=True)
        self.state = OtaState(self._dir)
        self._index_watch = _IndexWatch(transport)
        self.reader = RepoReader(self._index_watch, timeout_s=config.fetch_timeout_s,
                                 max_file_bytes=config.max_payload_bytes,
                                 meta_timeout_s=config.metadata_timeout_s,
                                 max_meta_bytes=config.max_metadata_bytes)
        self.status = StatusReporter(transport, config.device_id)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._offered = False
        self._inbox: queue.Queue[bytes] = queue.Queue()
        self.last_results: list[UpdateResult] = []
        self.commands: CommandExecutor | None = None
        #: what could not be published (status, online flag) -> why, as last logged
        self._unsaid: dict[str, str] = {}

    def attach_commands(self, sink: CommandSink, *,
                        train_now: Callable[[str | None], None] | None = None,
                        max_age_s: float = 300.0) -> CommandExecutor:
        """Obey fleet commands signed by a command key of the trusted root (from ``start``)."""
        self.commands = CommandExecutor(
            device_id=self.config.device_id, sink=sink, keys=self.command_keys,
            last_seq=lambda: self.state.command_seq, save_seq=self.state.set_command_seq,
            train_now=train_now, on_result=self._command_done, clock=self._clock,
            max_age_s=max_age_s, after=self._after_command)
        return self.commands

    def _after_command(self, cmd: Command) -> str:
        """Record what the command left served (the status is built from it); say it."""
        name = cmd.adapter or ""
        with self._lock:
            if self.state.pending is not None:
                return ""  # an install was interrupted: the next cycle undoes it first
            now = self._follow(name)
            served = self._serving_version(name)
            held = self.state.held(name)
        if served is None:
            what = f"{name} is not served"
        else:
            what = f"{name} serves local version {served}" + (
                f" (fleet version {now.fleet_version})" if now is not None else " (not a fleet version)")
        if held:
            what += f"; fleet versions up to v{held} are held (not installed again)"
        return what

    def _command_done(self, result: Mapping[str, Any]) -> None:
        if self._command_observer is not None:
            self._command_observer(result)
        self.publish_status()

    def _follow(self, name: str) -> Installed | None:
        """Bring the record of ``name`` in line with what the service serves now."""
        try:
            served = self._serving_version(name)
        except Exception as e:  # a damaged registry entry: the record stays as it is
            _log.warning("cannot tell which version of %r is served: %s", name, e)
            return self.state.installed(name)
        return self.state.follow(name, served)

    # --- trust ----------------------------------------------------------------------

    @property
    def _trusted_root_path(self) -> Path:
        return self._dir / "trusted_root.json"

    def trusted_root(self) -> Root:
        p = self._trusted_root_path
        data = p.read_bytes() if p.exists() else self.config.trusted_root
        root: Root = Metadata[Root].from_bytes(data).signed
        return root

    def command_keys(self) -> dict[str, SSlibKey]:
        """Fleet command keys named by the trusted root (rotated with it)."""
        raw = self.trusted_root().unrecognized_fields.get(COMMAND_KEYS_FIELD, {})
        return {kid: SSlibKey.from_dict(kid, dict(d)) for kid, d in raw.items()}

    def _refresh(self) -> Updater:
        limits = UpdaterConfig()
        fetcher = BrokerFetcher(self.reader, limits)
        p = self._trusted_root_path
        bootstrap = p.read_bytes() if p.exists() else self.config.trusted_root
        try:
            updater = Updater(str(self._meta_dir), _URL + "meta/", None, _URL + "targets/",
                              fetcher, limits, bootstrap=bootstrap)
        except (tuf_exc.RepositoryError, ValueError) as e:
            raise UpdateRejectedError("metadata_invalid", f"trusted root is unusable: {e}") from e
        # Expiry is judged against the device clock minus a bounded slack, and never against
        # a time earlier than one already used: a clock reset cannot revive expired metadata.
        # ngclient has no public way to set its reference time, so this sets the private
        # attribute; pyproject pins tuf below 8 and the expiry tests in tests/ota fail
        # loudly if a release changes it.
        now = max(self._clock() - self.config.clock_slack_s, self.state.time_floor)
        self.state.set_time_floor(now)
        updater._trusted_set.reference_time = datetime.datetime.fromtimestamp(now, datetime.UTC)
        try:
            self.reader.index(fresh=True)
        except TransportError as e:
            # the broker answered the subscription and holds no index: unless this device
            # saw a repository before (then the broker lost it: a failure), none was published
            if self._index_watch.index_subscribed and not (self._meta_dir / "timestamp.json").exists():
                raise _NothingPublished(str(e)) from e
            raise
        try:
            updater.refresh()
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
            raise _classify(e) from e
        atomic_write_bytes(self._trusted_root_path, (self._meta_dir / "root.json").read_bytes())
        return updater

    # --- one cycle ------------------------------------------------------------------

    def update(self) -> list[UpdateResult]:
        """Refresh metadata and bring every adapter addressed to this device up to date."""
        with self._lock:
            self.retry_at = None
            # an install whose undo failed last cycle (the service erred) is undone first
            undone = self._undo_pending()
            if self.state.pending is None:
                for name in sorted(self.state.known()):  # what operators changed meanwhile
                    self._follow(name)
            results = ([undone] if undone is not None else []) + self._update()
            self.last_results = results
            for r in results:
                if r.result != "up_to_date":
                    self.state.set_last_result(r.to_dict())
                self._observe(r)
            self.publish_status()
            return results

    def _result(self, result: str, spec: TargetSpec | None = None, err: OtaError | None = None,
                message: str = "") -> UpdateResult:
        reason = getattr(err, "reason", None)
        return UpdateResult(result=result, adapter=spec.adapter if spec else None,
                            version=spec.version if spec else None, reason=reason,
                            message=message or (str(err) if err else ""), at=self._clock())

    def _update(self) -> list[UpdateResult]:
        try:
            updater = self._refresh()
        except UpdateRejectedError as e:
            _log.warning("update refused: %s", e)
            return [self._result("rejected", err=e)]
        except _NothingPublished as e:
            return [self._result("idle", message=f"nothing published yet: the broker holds no repository ({e})")]
        except TransportError as e:
            return [self._result("failed", err=e)]
        chosen, others, invalid = self._addressed(updater)
        # a malformed target is refused on its own; the others are still applied
        refused = {path: self._result("rejected", err=e, message=f"target {path}: {e}")
                   for path, e in invalid.items()}
        if not chosen and not refused:
            if others:
                err = UpdateRejectedError("not_addressed", f"{others} target(s) signed, none for "
                                          f"device {self.config.device_id} or groups {list(self.config.groups)}")
                return [self._result("skipped", err=err)]
            return [self._result("up_to_date", message="no targets signed")]
        applied = {path: self._apply(path, spec) for path, spec in chosen.items()}
        return [r for _, r in sorted({**refused, **applied}.items())]

    def _addressed(self, updater: Updater) -> tuple[dict[str, TargetSpec], int, dict[str, UpdateRejectedError]]:
        """Highest signed version per adapter addressed to us, how many were not, and the
        targets whose signed description is malformed (by path)."""
        listed: Targets = Metadata[Targets].from_bytes((self._meta_dir / "targets.json").read_bytes()).signed
        best: dict[str, list[tuple[str, TargetSpec]]] = {}
        others = 0
        invalid: dict[str, UpdateRejectedError] = {}
        for path in listed.targets:
            tf = updater.get_targetinfo(path)  # the verified entry, not the file just read
            if tf is None or not isinstance(tf.custom, Mapping) or "lorad" not in tf.custom:
                continue
            try:
                spec = TargetSpec.from_custom(tf.custom, length=tf.length, sha256=tf.hashes.get("sha256", ""))
            except UpdateRejectedError as e:
                _log.warning("signed target %s refused: %s", path, e)
                invalid[path] = e
                continue
            if not spec.audience.includes(self.config.device_id, self.config.groups):
                others += 1
                continue
            cur = best.get(spec.adapter)
            if cur is None or spec.version > cur[0][1].version:
                best[spec.adapter] = [(path, spec)]
            elif spec.version == cur[0][1].version:
                cur.append((path, spec))
        return dict(self._pick(c) for c in best.values()), others, invalid

    def _pick(self, candidates: list[tuple[str, TargetSpec]]) -> tuple[str, TargetSpec]:
        """Of the payloads signed for one version, the delta if its base is here, else the full one."""
        name = candidates[0][1].adapter
        inst = self.state.installed(name)
        for path, spec in candidates:
            if spec.encoding == "delta" and inst is not None and inst.fleet_version == spec.delta_from:
                base = self.state.canonical(name, spec.delta_from)
                if base is not None and hashlib.sha256(base).hexdigest() == inst.adapter_sha256:
                    return path, spec
        full = [c for c in candidates if c[1].encoding == "full"]
        return min(full or candidates)

    def _apply(self, path: str, spec: TargetSpec) -> UpdateResult:
        name = spec.adapter
        inst = self.state.installed(name)
        if inst is not None and spec.version <= inst.fleet_version:
            if spec.version < inst.fleet_version:
                return self._result("skipped", spec, UpdateRejectedError(
                    "older_version", f"{name} v{spec.version} offered, v{inst.fleet_version} installed"))
            return self._result("up_to_date", spec)
        held = self.state.held(name)
        if spec.version <= held:
            # the operator turned this device away from v{held}: what it serves is their choice
            serving = (f"local version {inst.local_version} (fleet v{inst.fleet_version})" if inst is not None
                       else "no fleet version")
            return self._result("up_to_date", spec, message=f"{name} v{spec.version} not installed: v{held} and "
                                f"older are held by the operator's choice, {name} serves {serving}; "
                                f"a version above v{held} will be installed")
        if spec.version <= self.state.refused(name):
            return self._result("skipped", spec, message=f"{name} v{spec.version} was refused before")
        dirname, _, base = path.rpartition("/")
        stage = ChunkStage(self._dir / "staging" / spec.sha256, spec)
        try:
            if spec.base_fingerprint != self.config.base_fingerprint:
                raise UpdateRejectedError("base_model_mismatch", f"{name} v{spec.version} is for base "
                                          f"model {spec.base_fingerprint}, this device serves "
                                          f"{self.config.base_fingerprint}")
            if spec.length > self.config.max_payload_bytes:
                raise UpdateRejectedError("too_large", f"{name} v{spec.version} has {spec.length} "
                                          f"bytes, at most {self.config.max_payload_bytes} allowed "
                                          f"(max_payload_bytes)")
            if spec.raw_length > self.config.raw_limit:
                raise UpdateRejectedError("too_large", f"{name} v{spec.version} decompresses to "
                                          f"{spec.raw_length} bytes, at most {self.config.raw_limit} "
                                          f"allowed (max_raw_bytes)")
            self.config.privacy.check(name, spec.version, spec.privacy)
            delta_base = None
            if spec.encoding == "delta":
                if inst is None or inst.fleet_version != spec.delta_from:
                    raise UpdateRejectedError("delta_base_missing", f"{name} v{spec.version} is a delta "
                                              f"against v{spec.delta_from}; installed: "
                                              f"{inst.fleet_version if inst else 'none'}")
                delta_base = self.state.canonical(name, spec.delta_from)
                if delta_base is None or hashlib.sha256(delta_base).hexdigest() != inst.adapter_sha256:
                    # a lost or damaged local copy: not the fleet's fault, a full version will do
                    raise UpdateRejectedError("delta_base_missing", f"{name} v{spec.version} is a delta "
                                              f"against v{spec.delta_from}, whose stored copy here is "
                                              f"{'missing' if delta_base is None else 'damaged'}")
            self.reader.fetch_chunks(f"targets/{dirname}/{spec.sha256}.{base}", stage.missing(),
                                     stage.put, max_chunk=spec.chunk_size)
            adapter, canonical, probes = reconstruct(
                spec, stage.assemble(), base_fingerprint=self.config.base_fingerprint,
                delta_base=delta_base)
        except UpdateRejectedError as e:
            _log.warning("%s v%d refused: %s", name, spec.version, e)
            if e.reason in _FINAL_REASONS:
                self.state.refuse(name, spec.version)
            if e.reason not in ("chunk_digest", "chunk_length", "too_large"):
                stage.discard()
            return self._result("rejected", spec, e)
        except TransportError as e:
            return self._result("failed", spec, e)  # the stage keeps what arrived
        deferred = self._deferral()
        if deferred is not None:
            until, why = deferred
            # the verified chunks stay staged: the install later fetches nothing again
            self.retry_at = until if self.retry_at is None else min(self.retry_at, until)
            when = datetime.datetime.fromtimestamp(until).astimezone().isoformat(timespec="minutes")
            return self._result("deferred", spec, message=f"{name} v{spec.version} downloaded and "
                                f"verified; deferred until {when} ({why})")
        return self._install(spec, adapter, canonical, probes, stage)

    def _deferral(self) -> tuple[float, str] | None:
        """(when to try again, why) if an install must wait now, else None."""
        now = self._clock()
        w = self.config.install_window
        if w is not None:
            local = datetime.datetime.fromtimestamp(now).astimezone()
            opens = w.next_open(local)
            if opens > local:
                return opens.timestamp(), "outside ota.install_window"
        if self._gate is not None:
            why = self._gate()
            if why:
                return now + 60.0, why
        return None

    def _install(self, spec: TargetSpec, adapter: Any, canonical: bytes, probes: ProbeSet | None,
                 stage: ChunkStage) -> UpdateResult:
        name = spec.adapter
        # What the service serves now, whoever put it there (an upload, the trainer, an
        # earlier OTA install): a failed install goes back to exactly that.
        previous = self._serving_version(name)
        self.state.begin(name, spec.version, previous)
        try:
            info = self._sink.install(name, adapter, meta={
                "ota_version": spec.version, "adapter_sha256": spec.adapter_sha256})
        except InvalidAdapterError as e:  # the service refuses this adapter: final
            self.state.refuse(name, spec.version)
            stage.discard()
            return self._result("rejected", spec, UpdateRejectedError(
                "install_failed", f"{name} v{spec.version}: {type(e).__name__}: {e}"))
        except Exception as e:  # a local fault (storage, cache full, disk): retried next cycle
            # the service may have stored the version before failing (cache full): undo that
            self._restore(name, previous)
            self.state.clear_pending()
            return self._result("failed", spec, message=f"{name} v{spec.version} not installed, "
                                f"retried next cycle: {type(e).__name__}: {e}")
        problem = self._health_check(name, info.version, probes)
        if problem is not None:
            back = self._restore(name, previous)
            self.state.refuse(name, spec.version)
            stage.discard()
            return self._result("rejected", spec, UpdateRejectedError(
                "health_check_failed", f"{name} v{spec.version}: {problem}; {back}"))
        self.state.commit(name, Installed(spec.version, info.version, spec.adapter_sha256,
                                          None if spec.privacy is None else spec.privacy.epsilon, previous),
                          canonical)
        stage.discard()
        return self._result("installed", spec, message=f"{name} v{spec.version} serving as local "
                            f"version {info.version}")

    def _serving_version(self, name: str) -> int | None:
        try:
            return self._sink.info(name).version
        except AdapterNotFoundError:
            return None

    def _restore(self, name: str, previous: int | None) -> str:
        """Serve ``previous`` (the local version before an install) again; says what it did."""
        current = self._serving_version(name)
        if previous is None:
            if current is not None:
                self._sink.delete(name)  # it was not served before: it must not be now
            return "removed (no previous version)"
        if current != previous:
            self._sink.rollback(name, previous)
        return f"rolled back to local version {previous}"

    def _health_check(self, name: str, local_version: int, probes: ProbeSet | None) -> str | None:
        """None if the swapped-in version answers its probe set as recorded, else why not."""
        if probes is None:
            return None
        try:
            res = self._sink.run(probes.inputs, adapter=name)
        except Exception as e:  # any failure to serve the probes fails the check
            return f"probe inference failed: {type(e).__name__}: {e}"
        if res.version != local_version:
            return f"probes answered by version {res.version}, installed {local_version}"
        bad = probes.mismatches(res.outputs)
        if bad:
            return f"probe outputs {bad} differ from the recorded ones"
        return None

    # --- restart recovery -----------------------------------------------------------

    def recover(self) -> UpdateResult | None:
        """Undo an install a crash interrupted (call once at start, before ``update``)."""
        with self._lock:
            r = self._undo_pending()
            if r is not None:
                self.state.set_last_result(r.to_dict())
                self._observe(r)
            return r

    def _undo_pending(self) -> UpdateResult | None:
        pending = self.state.pending
        if pending is None:
            return None
        name, previous = pending["adapter"], pending["previous_local"]
        self._restore(name, previous)
        self.state.clear_pending()
        return UpdateResult("recovered", name, pending["fleet_version"], None,
                            f"install of {name} v{pending['fleet_version']} was interrupted; "
                            f"serving local version {previous}", self._clock())

    def _observe(self, r: UpdateResult) -> None:
        if self._result_observer is not None:
            self._result_observer(r)

    # --- status and offers ----------------------------------------------------------

    def _served(self) -> dict[str, dict[str, Any]]:
        """Every adapter OTA knows of that the service serves now, as the service says:
        the local version, the fleet version it was installed as (None: not from the
        fleet), and the fleet version held by an operator's choice."""
        out: dict[str, dict[str, Any]] = {}
        for name in sorted(self.state.known()):
            try:
                info = self._sink.info(name)
            except AdapterNotFoundError:
                continue  # not served: nothing to report
            except Exception as e:  # damaged on disk: reported by the service itself
                _log.warning("status: cannot read %r from the adapter service: %s", name, e)
                continue
            inst = self.state.installed(name)
            rec = inst if inst is not None and inst.local_version == info.version else \
                self.state.installed_as(name, info.version)
            entry: dict[str, Any] = {"version": info.version, "fleet_version": None if rec is None else rec.fleet_version}
            if rec is not None and rec.epsilon is not None:
                entry["privacy_epsilon"] = rec.epsilon
            if rec is not None and rec.previous_local is not None:
                entry["previous_local"] = rec.previous_local
            held = self.state.held(name)
            if held:
                entry["held"] = held
            pinned = getattr(info, "pinned", None)
            if isinstance(pinned, bool):
                entry["pinned"] = pinned
            out[name] = entry
        return out

    def device_status(self) -> DeviceStatus:
        return DeviceStatus(
            device_id=self.config.device_id, groups=self.config.groups,
            adapters=self._served(),
            last_update=self.state.last_result,
            epsilon=dict(self._epsilon()) if self._epsilon is not None else {},
            last_command=self.commands.last_result if self.commands is not None else None,
            at=self._clock(), refused=self.state.all_refused())

    def publish_status(self) -> bool:
        """Publish the status (retained); False if it could not be, which is logged."""
        return self._say("status", lambda: self.status.publish(self.device_status()))

    def publish_online(self) -> bool:
        """Publish the online flag (retained); False if it could not be, which is logged."""
        return self._say("online flag", self.status.online)

    def _say(self, what: str, publish: Callable[[], None]) -> bool:
        # Each reason is logged once until a publish succeeds again: a broker whose ACL
        # refuses this device's topics (counted in lorad_ota_broker_refusals_total) is
        # said once, not at every status interval. The next cycle publishes again.
        try:
            publish()
        except TransportError as e:
            if self._unsaid.get(what) != str(e):
                self._unsaid[what] = str(e)
                _log.warning("OTA: %s not published: %s", what, e)
            return False
        if self._unsaid.pop(what, None) is not None:
            _log.info("OTA: %s published again", what)
        return True

    def start(self) -> None:
        """Announce ourselves, then run a cycle now and whenever an offer arrives.

        Raises TransportError when the subscriptions cannot be made (call again later); a
        refused online flag is logged and counted, and does not stop the updates."""
        self.publish_online()
        self.publish_status()  # known to the fleet (what it serves) before its first cycle ends
        topics = [offer_topic("all"), offer_topic("device", self.config.device_id),
                  *(offer_topic("group", g) for g in self.config.groups)]
        self._t.subscribe(topics, self._on_offer)
        if self.commands is not None:
            self._t.subscribe([command_topic(self.config.device_id)], self._on_command)
        self._offered = True
        self._wake.set()
        self._worker = threading.Thread(target=self._run, name="lorad-ota", daemon=True)
        self._worker.start()

    # Messages arrive on the transport's delivery thread, which must not block (a publish
    # from there would wait for an acknowledgement only that thread can read): hand over.
    def _on_offer(self, topic: str, payload: bytes) -> None:
        self._offered = True
        self._wake.set()

    def _on_command(self, topic: str, payload: bytes) -> None:
        self._inbox.put(payload)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(0.5):
                if self.retry_at is None or self._clock() < self.retry_at:
                    continue
                self._offered = True  # a deferred install's window opened
            self._wake.clear()
            while self.commands is not None and not self._inbox.empty():
                try:
                    self.commands.handle(self._inbox.get_nowait())
                except Exception:  # keep the worker alive
                    _log.exception("command handling failed")
            if self._offered:
                self._offered = False
                try:
                    self.update()
                except Exception:  # keep the worker alive; the next offer retries
                    _log.exception("OTA cycle failed")

    def close(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=30)
            self._worker = None
