"""The fleet's TUF repository: root of trust, signed adapter targets, key rotation.

State lives in one directory (metadata, payloads, the canonical bytes of every published
adapter version for later deltas); private keys live in key directories, so the offline
roles (root, targets) can be kept on removable media and named only when needed.
:meth:`FleetRepository.push` publishes what devices need as retained chunked messages
(:mod:`lorad.ota.files`) plus expiring offers to the audiences of new targets.

Targets name their audience in ``custom["lorad"]`` (:class:`lorad.ota.target.TargetSpec`,
:class:`lorad.ota.audience.Audience`); a newer target for the same adapter and audience
replaces the older one, and a target for everyone removes every lower version of its
adapter (no device would take those any more), so what a finished rollout signed does not
stay behind. Versions of an adapter only grow: rolling a group back publishes a *higher*
version whose payload is an older adapter, so a device never has to accept a lower version.

Nothing is signed that devices would refuse: every metadata file is checked against the
size python-tuf's client accepts (:data:`CLIENT_MAX_BYTES`) and refused with the entries
that make it large (:class:`MetadataTooLargeError`); a role whose threshold of private keys
is not in the key directories is refused naming the keys and the directories searched
(:class:`SigningKeysMissingError`).

The repository also keeps a record of the devices and groups the fleet has seen
(``members.json``: from the devices' retained statuses, whenever a command read them), so a
publish to a group no device has reported can be refused (:meth:`FleetRepository.record_members`).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Key, SSlibKey
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import TOP_LEVEL_ROLE_NAMES, Metadata, MetaFile, Role, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from lorad.adapters.fsutil import atomic_write_bytes

from .audience import Audience
from .errors import UpdateRejectedError
from .keys import ed25519_private_key, find_signers, generate_key, key_files, save_key

if TYPE_CHECKING:
    # The adapter payloads (numpy, safetensors, zstandard), the broker's client (paho) and
    # the command signing (numpy through the bounded JSON reader) load where they are used:
    # ``fleet init``, ``fleet keys`` and ``--no-push`` sign and read metadata only.
    from lorad.adapters.lora import LoraAdapter

    from .files import FileEntry, RepoIndex
    from .privacy import PrivacyRecord
    from .target import ProbeSet, TargetSpec
    from .transport import Transport

__all__ = ["COMMAND_KEYS_FIELD", "CLIENT_MAX_BYTES", "RepoSettings", "FleetRepository", "MetadataTooLargeError",
           "SigningKeysMissingError", "offer_topic", "meta_name"]

_log = logging.getLogger(__name__)

#: Root's extra field naming the fleet command keys (signed by root, rotated with it).
COMMAND_KEYS_FIELD = "x-lorad-command-keys"
_DAY = 86400
#: The largest metadata file per role a device accepts: python-tuf's ``UpdaterConfig``
#: defaults, which lorad's client uses (tests/ota/test_fleet_metadata.py keeps them equal;
#: not imported here, ``tuf.ngclient`` loads the client's HTTP stack).
CLIENT_MAX_BYTES: Mapping[str, int] = {"root": 512_000, "timestamp": 16_384, "snapshot": 2_000_000,
                                       "targets": 5_000_000}
#: How many of the largest targets a MetadataTooLargeError names.
_NAMED_TARGETS = 3


class MetadataTooLargeError(RuntimeError):
    """Signed metadata would be larger than devices accept; nothing was written."""

    def __init__(self, role: str, size: int, limit: int, largest: list[tuple[str, int, str]]) -> None:
        self.role, self.size, self.limit, self.largest = role, size, limit, largest
        named = "; ".join(f"{p}: {n:,} bytes ({why})" for p, n, why in largest)
        super().__init__(
            f"{role}.json would be {size:,} bytes, over the {limit:,} bytes a device accepts (python-tuf's "
            f"{role}_max_length): every device would refuse every update, so nothing was signed."
            + (f" Largest entries: {named}." if named else "")
            + (" Sign audiences as groups or percentages (a rollout's hash buckets) instead of device lists, "
               "and withdraw targets no device needs." if role == "targets" else ""))


class SigningKeysMissingError(LookupError):
    """A role's threshold of private keys is not in the key directories."""


def offer_topic(audience_kind: str, name: str | None = None) -> str:
    """``lorad/v1/all/offer``, ``lorad/v1/group/<g>/offer`` or ``lorad/v1/device/<d>/offer``."""
    from .transport import TOPIC_ROOT

    if audience_kind == "all":
        return f"{TOPIC_ROOT}/all/offer"
    if audience_kind not in ("group", "device") or not name:
        raise ValueError(f"audience kind {audience_kind!r} needs a name")
    return f"{TOPIC_ROOT}/{audience_kind}/{name}/offer"


def meta_name(role: str, version: int | None = None) -> str:
    """Repository file name of a metadata file (consistent snapshots: versioned names)."""
    return f"meta/{role}.json" if version is None else f"meta/{version}.{role}.json"


@dataclass(frozen=True)
class RepoSettings:
    """Thresholds, key counts and expiry periods (seconds) per role."""

    thresholds: Mapping[str, int]
    key_counts: Mapping[str, int]
    expiry_s: Mapping[str, int]
    offer_expiry_s: int = _DAY

    @classmethod
    def default(cls) -> RepoSettings:
        return cls(thresholds={"root": 2, "targets": 1, "snapshot": 1, "timestamp": 1},
                   key_counts={"root": 3, "targets": 2, "snapshot": 1, "timestamp": 1},
                   expiry_s={"root": 365 * _DAY, "targets": 90 * _DAY, "snapshot": 7 * _DAY,
                             "timestamp": _DAY})

    def __post_init__(self) -> None:
        for role in TOP_LEVEL_ROLE_NAMES:
            t, n, e = self.thresholds.get(role, 0), self.key_counts.get(role, 0), self.expiry_s.get(role, 0)
            if not 1 <= t <= n:
                raise ValueError(f"role {role}: threshold {t} must be 1..{n} (its key count)")
            if e <= 0:
                raise ValueError(f"role {role}: expiry must be positive seconds, got {e}")
        if self.offer_expiry_s <= 0:
            raise ValueError("offer_expiry_s must be positive")

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": dict(self.thresholds), "key_counts": dict(self.key_counts),
                "expiry_s": dict(self.expiry_s), "offer_expiry_s": self.offer_expiry_s}


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


class FleetRepository:
    """A TUF repository on disk, signing with the keys found in ``key_dirs``."""

    def __init__(self, directory: Path, *, key_dirs: Iterable[Path] | None = None,
                 clock: Any = _now) -> None:
        self.dir = Path(directory)
        self.key_dirs = [Path(d) for d in key_dirs] if key_dirs is not None else [self.dir / "keys"]
        self._clock = clock
        state = self.dir / "fleet.json"
        if not state.exists():
            raise FileNotFoundError(f"{self.dir} is not a fleet repository (run init first)")
        self._state: dict[str, Any] = json.loads(state.read_bytes())

    # --- creation -------------------------------------------------------------------

    @classmethod
    def init(cls, directory: Path, *, settings: RepoSettings | None = None,
             key_dir: Path | None = None, clock: Any = _now) -> FleetRepository:
        """Create keys for every role and the first version of all metadata."""
        settings = settings or RepoSettings.default()
        directory = Path(directory)
        if (directory / "fleet.json").exists():
            raise FileExistsError(f"{directory} already holds a fleet repository")
        key_dir = key_dir or directory / "keys"
        for sub in ("metadata", "targets", "canonical"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        command = generate_key()
        save_key(key_dir, "command", command)
        root = Root(expires=clock() + datetime.timedelta(seconds=settings.expiry_s["root"]),
                    consistent_snapshot=True)
        root.unrecognized_fields[COMMAND_KEYS_FIELD] = {
            command.public_key.keyid: command.public_key.to_dict()}
        for role in TOP_LEVEL_ROLE_NAMES:
            root.roles[role].threshold = settings.thresholds[role]
            for _ in range(settings.key_counts[role]):
                s = generate_key()
                save_key(key_dir, role, s)
                root.add_key(s.public_key, role)
        atomic_write_bytes(directory / "fleet.json", json.dumps(
            {"settings": settings.to_dict(), "command_seq": 0, "published": {}}).encode())
        repo = cls(directory, key_dirs=[key_dir], clock=clock)
        repo._write_signed(Metadata(root), "root")
        targets = Targets(expires=repo._expiry("targets"))
        repo._write_signed(Metadata(targets), "targets")
        repo._snapshot_and_timestamp()
        return repo

    # --- reading --------------------------------------------------------------------

    @property
    def settings(self) -> RepoSettings:
        s = self._state["settings"]
        return RepoSettings(thresholds=s["thresholds"], key_counts=s["key_counts"],
                            expiry_s=s["expiry_s"], offer_expiry_s=s["offer_expiry_s"])

    def load(self, role: str) -> Metadata[Any]:
        return Metadata.from_bytes((self.dir / "metadata" / f"{role}.json").read_bytes())

    def root_bytes(self, version: int | None = None) -> bytes:
        """The root a device starts from (its config's trusted root) or a given version."""
        if version is None:
            return (self.dir / "metadata" / "root.json").read_bytes()
        return (self.dir / "metadata" / f"{version}.root.json").read_bytes()

    def targets(self) -> dict[str, TargetSpec]:
        """Current targets by path, as their signed spec. A malformed one (metadata edited
        by hand) is left out with a warning, so the others are still pushed and offered."""
        from .target import TargetSpec

        t: Targets = self.load("targets").signed
        specs: dict[str, TargetSpec] = {}
        for p, tf in t.targets.items():
            try:
                specs[p] = TargetSpec.from_custom(tf.custom, length=tf.length, sha256=tf.hashes.get("sha256", ""))
            except UpdateRejectedError as e:
                _log.warning("target %s left out: %s", p, e)
        return specs

    def latest_version(self, adapter: str) -> int:
        return int(self._state["published"].get(adapter, 0))

    def command_keys(self) -> dict[str, Key]:
        return self._command_keys(self.load("root").signed)

    def resolve_keyid(self, role: str, prefix: str) -> str:
        """The full id of ``role``'s key starting with ``prefix`` (as key file names show it)."""
        root: Root = self.load("root").signed
        if role == "command":
            ids = sorted(self._command_keys(root))
        elif role in TOP_LEVEL_ROLE_NAMES:
            ids = sorted(root.roles[role].keyids)
        else:
            raise ValueError(f"role must be one of {sorted(TOP_LEVEL_ROLE_NAMES)} or 'command'")
        p = prefix.strip().lower()
        hits = [k for k in ids if p and k.startswith(p)]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise LookupError(f"no key of role {role} starts with {prefix!r}; its keys: "
                              f"{', '.join(k[:8] for k in ids)}")
        raise LookupError(f"key id prefix {prefix!r} is ambiguous for role {role}: "
                          f"{', '.join(hits)}; give more characters")

    def keys_in(self, directory: Path) -> list[str]:
        """Ids of this repository's keys (every role's, the command keys) whose private key
        file is in ``directory`` (by file name; loading checks it when it signs)."""
        root: Root = self.load("root").signed
        ids = set(self._command_keys(root)).union(*(root.roles[r].keyids for r in TOP_LEVEL_ROLE_NAMES))
        short = [s for s in key_files(Path(directory)) if len(s) == 8]
        return sorted(k for k in ids if any(k.startswith(s) for s in short))

    @property
    def published(self) -> dict[str, int]:
        """Adapter name -> latest version signed here."""
        return {str(k): int(v) for k, v in self._state["published"].items()}

    # --- signing --------------------------------------------------------------------

    def _expiry(self, role: str) -> datetime.datetime:
        return self._clock() + datetime.timedelta(seconds=int(self._state["settings"]["expiry_s"][role]))

    def _signers(self, role: str, roots: Iterable[Root]) -> list[CryptoSigner]:
        keyids: set[str] = set()
        for r in roots:
            keyids.update(r.roles[role].keyids)
        found = find_signers(self.key_dirs, keyids)
        return list(found.values())

    def _where(self) -> str:
        return ", ".join(str(d) for d in self.key_dirs)

    def check_signing_keys(self, roles: Iterable[str]) -> None:
        """SigningKeysMissingError naming every role of ``roles`` (top-level roles or
        ``command``) whose threshold of private keys is not in the key directories: what a
        command checks before it reaches the broker or loads a model."""
        root: Root = self.load("root").signed
        problems = []
        for role in dict.fromkeys(roles):
            if role == "command":
                ids, threshold = set(self._command_keys(root)), 1
            else:
                ids, threshold = set(root.roles[role].keyids), root.roles[role].threshold
            found = find_signers(self.key_dirs, ids)
            if len(found) < threshold:
                problems.append(f"role {role} needs {threshold} of its private keys "
                                f"({', '.join(k[:8] for k in sorted(ids))}), {len(found)} found")
        if problems:
            raise SigningKeysMissingError(
                f"cannot sign: {'; '.join(problems)} in {self._where()}. Name the directory that holds them "
                "(the offline media of root and targets) with --key-dir")

    def _sign(self, md: Metadata[Any], role: str, roots: Iterable[Root]) -> None:
        roots = list(roots)
        md.signatures.clear()
        for s in self._signers(role, roots):
            md.sign(s, append=True)
        for r in roots:  # refuse to write metadata that no device would accept
            try:
                r.verify_delegate(role, md.signed_bytes, md.signatures)
            except UnsignedMetadataError as e:
                threshold = r.roles[role].threshold
                raise SigningKeysMissingError(
                    f"cannot sign {role} (root version {r.version} requires {threshold} signature(s) of "
                    f"{', '.join(k[:8] for k in sorted(r.roles[role].keyids))}): {len(md.signatures)} private "
                    f"key(s) found in {self._where()}. Name the directory that holds them (the offline media "
                    "of root and targets) with --key-dir") from e

    def _write_signed(self, md: Metadata[Any], role: str, *, extra_roots: Iterable[Root] = ()) -> None:
        roots = [md.signed] if role == "root" else [self.load("root").signed]
        self._sign(md, role, [*roots, *extra_roots])
        data = md.to_bytes(JSONSerializer(compact=True))
        limit = CLIENT_MAX_BYTES.get(role)
        if limit is not None and len(data) > limit:
            raise MetadataTooLargeError(role, len(data), limit, _largest_targets(md.signed) if role == "targets" else [])
        mdir = self.dir / "metadata"
        if role != "timestamp":
            atomic_write_bytes(mdir / f"{md.signed.version}.{role}.json", data)
        atomic_write_bytes(mdir / f"{role}.json", data)

    def _bump(self, role: str) -> Metadata[Any]:
        md = self.load(role)
        md.signed.version += 1
        md.signed.expires = self._expiry(role)
        return md

    def _snapshot_and_timestamp(self) -> None:
        targets_bytes = (self.dir / "metadata" / "targets.json").read_bytes()
        tversion = Metadata.from_bytes(targets_bytes).signed.version
        snap_path = self.dir / "metadata" / "snapshot.json"
        snap = self._bump("snapshot") if snap_path.exists() else Metadata(Snapshot(expires=self._expiry("snapshot")))
        snap.signed.meta["targets.json"] = MetaFile(
            version=tversion, length=len(targets_bytes),
            hashes={"sha256": hashlib.sha256(targets_bytes).hexdigest()})
        self._write_signed(snap, "snapshot")
        self.refresh_timestamp()

    def refresh_timestamp(self) -> None:
        """New timestamp over the current snapshot (the online role re-signs periodically)."""
        snap_bytes = (self.dir / "metadata" / "snapshot.json").read_bytes()
        sversion = Metadata.from_bytes(snap_bytes).signed.version
        ts_path = self.dir / "metadata" / "timestamp.json"
        ts = self._bump("timestamp") if ts_path.exists() else Metadata(Timestamp(expires=self._expiry("timestamp")))
        ts.signed.snapshot_meta = MetaFile(version=sversion, length=len(snap_bytes),
                                           hashes={"sha256": hashlib.sha256(snap_bytes).hexdigest()})
        self._write_signed(ts, "timestamp")

    def _save_state(self) -> None:
        atomic_write_bytes(self.dir / "fleet.json", json.dumps(self._state).encode())

    # --- publishing adapters --------------------------------------------------------

    def publish_adapter(self, name: str, adapter: LoraAdapter, *, audience: Audience,
                        probes: ProbeSet | None = None, delta_from: int | None = None,
                        dtype: str = "fp32", compression: str = "none",
                        chunk_size: int = 8 * 1024, privacy: PrivacyRecord | None = None,
                        full_fallback: bool = True, label: str | None = None) -> TargetSpec:
        """Sign a new version of ``name`` for ``audience``; returns its spec.

        A delta (``delta_from``) is signed together with the full payload of the same
        version (unless ``full_fallback`` is False), so a device lacking the delta's base
        takes the full one. ``label`` replaces the audience's label in the target path
        (a rollout keeps one target whose audience grows stage by stage).
        """
        from .target import decode_adapter, encode_target

        version = self.latest_version(name) + 1
        base = None
        if delta_from is not None:
            base = decode_adapter(self._canonical(name, delta_from))
        enc = encode_target(adapter, name=name, version=version, audience=audience, probes=probes,
                            delta_base=base, delta_from=delta_from, dtype=dtype,
                            compression=compression, chunk_size=chunk_size, privacy=privacy)
        full = None
        if base is not None and full_fallback:
            full = encode_target(adapter, name=name, version=version, audience=audience, probes=probes,
                                 dtype=dtype, compression=compression, chunk_size=chunk_size, privacy=privacy)
        # The counter is on disk before anything is signed: a crash after signing can
        # skip a version number, never sign two different adapters under one.
        self._state["published"][name] = version
        self._save_state()
        atomic_write_bytes(self._canonical_path(name, version), enc.canonical)
        self._add_target(enc.spec, enc.payload, label=label,
                         also=None if full is None else (full.spec, full.payload))
        return enc.spec

    def rollback(self, name: str, *, to_version: int, audience: Audience,
                 probes: ProbeSet | None = None, chunk_size: int = 8 * 1024) -> TargetSpec:
        """Publish a higher version of ``name`` whose adapter is that of ``to_version``."""
        from .target import decode_adapter

        adapter = decode_adapter(self._canonical(name, to_version))
        return self.publish_adapter(name, adapter, audience=audience, probes=probes,
                                    chunk_size=chunk_size)

    def _canonical_path(self, name: str, version: int) -> Path:
        p = self.dir / "canonical" / name
        p.mkdir(parents=True, exist_ok=True)
        return p / f"{version}.bin"

    def _canonical(self, name: str, version: int) -> bytes:
        p = self._canonical_path(name, version)
        if not p.exists():
            raise ValueError(f"version {version} of {name!r} was never published here")
        return p.read_bytes()

    def _add_target(self, spec: TargetSpec, payload: bytes, *, label: str | None = None,
                    also: tuple[TargetSpec, bytes] | None = None) -> None:
        prefix = f"adapters/{spec.adapter}/{label or spec.audience.label}/"
        md = self._bump("targets")
        t: Targets = md.signed
        for old in [p for p in t.targets if p.startswith(prefix)]:
            del t.targets[old]
        _prune(t, spec.adapter, spec.version if spec.audience.everyone else 0)
        entries = [(f"{prefix}{spec.version}.lorad", spec, payload)]
        if also is not None:
            entries.append((f"{prefix}{spec.version}.full.lorad", *also))
        for path, sp, data in entries:
            t.targets[path] = TargetFile(length=len(data), hashes={"sha256": sp.sha256},
                                         path=path, unrecognized_fields={"custom": sp.to_custom()})
            dirname, _, base = path.rpartition("/")
            dest = self.dir / "targets" / dirname / f"{sp.sha256}.{base}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dest, data)
        self._write_signed(md, "targets")
        self._snapshot_and_timestamp()

    def retarget(self, prefix_label: str, adapter: str, audience: Audience | None) -> None:
        """Give the targets under ``adapters/<adapter>/<prefix_label>/`` a new audience
        (None: withdraw them); re-signs targets, snapshot and timestamp."""
        from .target import TargetSpec

        prefix = f"adapters/{adapter}/{prefix_label}/"
        md = self._bump("targets")
        t: Targets = md.signed
        paths = [p for p in t.targets if p.startswith(prefix)]
        if not paths:
            raise LookupError(f"no signed target under {prefix}")
        for p in paths:
            if audience is None:
                del t.targets[p]
                continue
            tf = t.targets[p]
            spec = TargetSpec.from_custom(tf.custom, length=tf.length, sha256=tf.hashes["sha256"])
            spec = dataclasses.replace(spec, audience=audience)
            tf.unrecognized_fields["custom"] = spec.to_custom()
        if audience is not None and audience.everyone:
            _prune(t, adapter, 0)
        self._write_signed(md, "targets")
        self._snapshot_and_timestamp()

    def set_expiry(self, role: str, seconds: int) -> None:
        """Expiry period of ``role`` from now on; re-signs that role (and what depends on it)."""
        if role not in TOP_LEVEL_ROLE_NAMES or seconds <= 0:
            raise ValueError(f"role must be one of {sorted(TOP_LEVEL_ROLE_NAMES)} and seconds > 0")
        self._state["settings"]["expiry_s"][role] = seconds
        self._save_state()
        if role == "root":
            self._new_root(lambda r: None)
        elif role == "targets":
            self._write_signed(self._bump("targets"), "targets")
            self._snapshot_and_timestamp()
        elif role == "snapshot":
            self._snapshot_and_timestamp()
        else:
            self.refresh_timestamp()

    # --- keys -----------------------------------------------------------------------

    @staticmethod
    def _command_keys(root: Root) -> dict[str, Key]:
        raw = root.unrecognized_fields.get(COMMAND_KEYS_FIELD, {})
        return {kid: SSlibKey.from_dict(kid, dict(d)) for kid, d in raw.items()}

    def _new_root(self, change: Any) -> None:
        """Next root version, signed by the old root's threshold and by the new one's."""
        old = self.load("root")
        new = Metadata[Root].from_bytes(old.to_bytes())
        change(new.signed)
        new.signed.version += 1
        new.signed.expires = self._expiry("root")
        self._write_signed(new, "root", extra_roots=[old.signed])
        # roles whose keys changed must be signed again by the new keys
        self._write_signed(self._bump("targets"), "targets")
        self._snapshot_and_timestamp()

    def rotate_key(self, role: str, old_keyid: str, *, key_dir: Path | None = None) -> str:
        """Replace key ``old_keyid`` of ``role`` by a new key; returns the new key id."""
        if role not in TOP_LEVEL_ROLE_NAMES and role != "command":
            raise ValueError(f"role must be one of {sorted(TOP_LEVEL_ROLE_NAMES)} or 'command'")
        new = generate_key()
        save_key(key_dir or self.key_dirs[0], role, new)
        if key_dir is not None and key_dir not in self.key_dirs:
            self.key_dirs.append(key_dir)

        def change(root: Root) -> None:
            if role == "command":
                keys = root.unrecognized_fields[COMMAND_KEYS_FIELD]
                if old_keyid not in keys:
                    raise ValueError(f"{old_keyid} is not a command key")
                del keys[old_keyid]
                keys[new.public_key.keyid] = new.public_key.to_dict()
                return
            if old_keyid not in root.roles[role].keyids:
                raise ValueError(f"{old_keyid} is not a key of role {role}")
            root.revoke_key(old_keyid, role)
            root.add_key(new.public_key, role)

        self._new_root(change)
        return str(new.public_key.keyid)

    def revoke_key(self, role: str, keyid: str) -> None:
        """Remove ``keyid`` from ``role`` (the role must keep at least its threshold of keys)."""
        def change(root: Root) -> None:
            r: Role = root.roles[role]
            if keyid not in r.keyids:
                raise ValueError(f"{keyid} is not a key of role {role}")
            if len(r.keyids) - 1 < r.threshold:
                raise ValueError(f"role {role} would keep {len(r.keyids) - 1} keys, below its "
                                 f"threshold {r.threshold}; rotate instead")
            root.revoke_key(keyid, role)
        self._new_root(change)

    def next_command_seq(self) -> int:
        self._state["command_seq"] = int(self._state["command_seq"]) + 1
        self._save_state()
        return int(self._state["command_seq"])

    def command_key(self) -> Ed25519PrivateKey:
        """The private key of a command key the current root trusts."""
        from .commands import key_id

        trusted = self.command_keys()
        for d in self.key_dirs:
            for p in sorted(d.glob("command.*.key")):
                k = ed25519_private_key(p)
                if key_id(k.public_key()) in trusted:
                    return k
        raise RuntimeError(f"no private key of a trusted command key in {self.key_dirs}")

    def command(self, device: str, action: str, *, adapter: str | None = None,
                version: int | None = None) -> bytes:
        """A signed command for ``device`` with the next sequence number."""
        from .commands import Command, sign_command

        cmd = Command.new(device, action, seq=self.next_command_seq(), adapter=adapter, version=version)
        return sign_command(cmd, self.command_key())

    def send_command(self, transport: Transport, device: str, action: str, *,
                     adapter: str | None = None, version: int | None = None,
                     expiry_s: int = 300) -> bytes:
        """Sign and publish (retained until it goes stale, for devices briefly offline)."""
        from .commands import command_topic

        data = self.command(device, action, adapter=adapter, version=version)
        transport.publish(command_topic(device), data, retain=True, expiry_s=expiry_s)
        return data

    # --- the broker -----------------------------------------------------------------

    def repo_files(self) -> dict[str, bytes]:
        """Everything a device may fetch, by repository file name."""
        m = self.dir / "metadata"
        files: dict[str, bytes] = {}
        for p in m.glob("*.root.json"):
            files[f"meta/{p.name}"] = p.read_bytes()
        files[meta_name("timestamp")] = (m / "timestamp.json").read_bytes()
        for role in ("snapshot", "targets"):
            data = (m / f"{role}.json").read_bytes()
            files[meta_name(role, Metadata.from_bytes(data).signed.version)] = data
        t: Targets = self.load("targets").signed
        for path, tf in t.targets.items():
            dirname, _, base = path.rpartition("/")
            name = f"{dirname}/{tf.hashes['sha256']}.{base}"
            files[f"targets/{name}"] = (self.dir / "targets" / name).read_bytes()
        return files

    def push(self, transport: Transport, *, current: RepoIndex | None = None,
             offer: bool = True) -> RepoIndex:
        """Publish new files and the index; offers to the audiences of current targets.

        ``current`` is the index now on the broker (files already there are not sent
        again). Files no longer needed (older snapshots/targets than the previous ones,
        replaced payloads) are dropped from the index and their retained chunks cleared.
        """
        from .files import RepoIndex, publish_files

        files = self.repo_files()
        old = dict(current.files) if current is not None else {}
        keep_prev: set[str] = set()
        for kind in (".snapshot.json", ".targets.json"):
            # the previous version stays fetchable for devices in the middle of a refresh
            older = [n for n in old if n.startswith("meta/") and n.endswith(kind)]
            if older:
                keep_prev.add(max(older, key=lambda n: int(n.split("/")[1].split(".")[0])))
        new = {n: d for n, d in files.items() if n not in old or n == meta_name("timestamp")}
        specs = self.targets()
        sizes: dict[str, int] = {}
        for n in new:
            sizes[n] = 8 * 1024
        for path, spec in specs.items():
            dirname, _, base = path.rpartition("/")
            n = f"targets/{dirname}/{spec.sha256}.{base}"
            if n in new:
                sizes[n] = spec.chunk_size
        keep = {n: e for n, e in old.items() if n in files or n in keep_prev}
        entries = publish_files(transport, new, index=keep, chunk_size=sizes)
        for n, e in old.items():
            if n not in entries:
                self._clear(transport, n, e)
        if offer:
            self._offer(transport, specs)
        return RepoIndex(entries)

    @staticmethod
    def _clear(transport: Transport, name: str, entry: FileEntry) -> None:
        from .files import chunk_topic

        for i in range(entry.chunks):
            transport.publish(chunk_topic(name, i), b"", retain=True)

    def _offer(self, transport: Transport, specs: Mapping[str, TargetSpec]) -> None:
        ts_version = self.load("timestamp").signed.version
        by_topic: dict[str, list[dict[str, Any]]] = {}
        for path, s in specs.items():
            # a bucket range is decided by each device: every device is told
            everyone = s.audience.everyone or s.audience.buckets is not None
            topics = ([offer_topic("all")] if everyone else []) + \
                     [offer_topic("group", g) for g in s.audience.groups] + \
                     [offer_topic("device", d) for d in s.audience.devices]
            for tp in topics:
                by_topic.setdefault(tp, []).append({"adapter": s.adapter, "version": s.version, "target": path})
        for tp, items in by_topic.items():
            transport.publish(tp, json.dumps({"timestamp_version": ts_version, "targets": items}).encode(),
                              retain=True, expiry_s=int(self._state["settings"]["offer_expiry_s"]))


    # --- who the fleet is -----------------------------------------------------------

    def known_members(self) -> dict[str, tuple[str, ...]]:
        """Device -> groups, of every device whose status a command of this repository read."""
        path = self.dir / "members.json"
        if not path.is_file():
            return {}
        try:
            doc = json.loads(path.read_bytes())
            return {str(d): tuple(str(g) for g in gs) for d, gs in doc["devices"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RuntimeError(f"{path} is unreadable ({e!r}); delete it, the next command that reaches "
                               "the broker records the fleet again") from e

    def record_members(self, devices: Mapping[str, Iterable[str]]) -> None:
        """Add what the devices' statuses say (device -> its groups) to ``members.json``."""
        known = self.known_members()
        merged = {**known, **{d: tuple(sorted(gs)) for d, gs in devices.items()}}
        if merged != known:
            atomic_write_bytes(self.dir / "members.json", json.dumps(
                {"updated_at": self._clock().isoformat(), "devices": {d: list(g) for d, g in sorted(merged.items())}},
                separators=(",", ":")).encode())

    def unknown_members(self, audience: Audience, devices: Mapping[str, Iterable[str]] | None = None) -> list[str]:
        """The groups and devices ``audience`` names that no known device is or is in
        (``devices``: what is known; default :meth:`known_members`)."""
        known = self.known_members() if devices is None else devices
        groups = {g for gs in known.values() for g in gs}
        return ([f"group {g}" for g in audience.groups if g not in groups] +
                [f"device {d}" for d in audience.devices if d not in known])


def _custom(tf: TargetFile) -> Mapping[str, Any] | None:
    custom = tf.unrecognized_fields.get("custom")
    lorad = custom.get("lorad") if isinstance(custom, Mapping) else None
    return lorad if isinstance(lorad, Mapping) else None


def _prune(t: Targets, adapter: str, everyone_version: int) -> None:
    """Drop the targets of ``adapter`` below the highest version of it signed for everyone
    (``everyone_version`` included): a device takes the highest version addressed to it, so
    no device takes those any more."""
    floor = everyone_version
    for tf in t.targets.values():
        c = _custom(tf)
        if c is not None and c.get("adapter") == adapter and isinstance(c.get("audience"), Mapping) \
                and c["audience"].get("all") is True and isinstance(c.get("version"), int):
            floor = max(floor, c["version"])
    for path in [p for p, tf in t.targets.items()
                 if (c := _custom(tf)) is not None and c.get("adapter") == adapter
                 and isinstance(c.get("version"), int) and c["version"] < floor]:
        del t.targets[path]


def _largest_targets(t: Targets) -> list[tuple[str, int, str]]:
    """The targets taking most bytes, with what makes each large."""
    sizes = []
    for path, tf in t.targets.items():
        n = len(json.dumps(tf.to_dict(), separators=(",", ":")))
        c = _custom(tf) or {}
        try:
            who = Audience.from_dict(c["audience"]).describe()
        except (KeyError, TypeError, ValueError, AttributeError):
            who = "audience unreadable"
        chunks = c.get("chunks")
        sizes.append((path, n, f"audience: {who}" + (f"; {len(chunks)} chunk digests"
                                                       if isinstance(chunks, list) else "")))
    return sorted(sizes, key=lambda x: -x[1])[:_NAMED_TARGETS]
