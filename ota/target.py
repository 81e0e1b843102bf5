"""What a signed target records, and turning its payload back into an adapter.

Pure functions over bytes: no I/O. A TUF target file is the *payload* (possibly a delta,
possibly fp16, possibly compressed); its TUF ``length``/``hashes`` cover the payload as
sent, and the ``custom["lorad"]`` part (:class:`TargetSpec`) records what the fleet
signed about it: adapter name and version, the base model fingerprint, who it is for
(:class:`lorad.ota.audience.Audience`: each device decides its own membership with
``Audience.includes``), the chunking with a sha256 per chunk (so each chunk is checked as it arrives), the
encoding, and the sha256 of the *reconstructed* adapter in its canonical form, which is
checked before anything is installed.

The payload container is a safetensors blob: ``lora.<weight>.A``/``.B`` (full tensors or
differences against the delta base), ``probe.in.<name>``/``probe.out.<name>`` (the health
check recorded with the adapter) and string metadata.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors.numpy as st_numpy
import zstandard

from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.adapters.names import is_name

from .audience import Audience
from .errors import UpdateRejectedError
from .privacy import PrivacyRecord

__all__ = [
    "Audience",
    "ProbeSet",
    "TargetSpec",
    "EncodedTarget",
    "encode_adapter",
    "decode_adapter",
    "adapter_digest",
    "encode_target",
    "reconstruct",
    "chunk_digests",
]

_FORMAT = "lorad-ota/1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ENCODINGS = ("full", "delta")
_DTYPES = ("fp32", "fp16")
_COMPRESSIONS = ("none", "zlib", "zstd")
#: Largest chunk the spec may name; the transport keeps chunks below the broker's limit.
MAX_CHUNK_SIZE = 1 << 24


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reject(reason: str, message: str) -> UpdateRejectedError:
    return UpdateRejectedError(reason, message)


@dataclass(frozen=True)
class ProbeSet:
    """Fixed inputs and the outputs the new version must produce on them (within tolerance)."""

    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    atol: float = 1e-4
    rtol: float = 1e-3

    def __post_init__(self) -> None:
        if not self.inputs or not self.outputs:
            raise ValueError("a probe set needs at least one input and one expected output")
        if self.atol < 0 or self.rtol < 0:
            raise ValueError("probe tolerances must be >= 0")

    def mismatches(self, outputs: Mapping[str, np.ndarray]) -> list[str]:
        """Names of expected outputs that are missing or differ beyond the tolerance."""
        bad = []
        for name, want in self.outputs.items():
            got = outputs.get(name)
            if got is None or np.shape(got) != want.shape or not np.allclose(
                    got, want, atol=self.atol, rtol=self.rtol):
                bad.append(name)
        return bad


@dataclass(frozen=True)
class TargetSpec:
    """The lorad part of a signed target (``custom["lorad"]``) plus the TUF length/sha256."""

    adapter: str
    version: int
    base_fingerprint: str
    audience: Audience
    length: int
    sha256: str
    chunk_size: int
    chunks: tuple[str, ...]
    raw_length: int
    adapter_sha256: str
    encoding: str = "full"
    delta_from: int | None = None
    dtype: str = "fp32"
    compression: str = "none"
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: the DP record the adapter was published with (signed with the rest)
    privacy: PrivacyRecord | None = None

    def __post_init__(self) -> None:
        problems = []
        if not is_name(self.adapter):
            problems.append(f"adapter name {self.adapter!r}")
        if self.version < 1:
            problems.append(f"version {self.version}")
        if self.encoding not in _ENCODINGS:
            problems.append(f"encoding {self.encoding!r} (allowed {_ENCODINGS})")
        if self.encoding == "delta" and (self.delta_from is None or not 1 <= self.delta_from < self.version):
            problems.append(f"delta_from {self.delta_from} for version {self.version}")
        if self.encoding == "full" and self.delta_from is not None:
            problems.append("delta_from given for a full encoding")
        if self.dtype not in _DTYPES:
            problems.append(f"dtype {self.dtype!r} (allowed {_DTYPES})")
        if self.compression not in _COMPRESSIONS:
            problems.append(f"compression {self.compression!r} (allowed {_COMPRESSIONS})")
        if not 0 < self.chunk_size <= MAX_CHUNK_SIZE:
            problems.append(f"chunk_size {self.chunk_size}")
        elif len(self.chunks) != max(1, -(-self.length // self.chunk_size)):
            problems.append(f"{len(self.chunks)} chunk digests for {self.length} bytes "
                            f"in chunks of {self.chunk_size}")
        if not all(_HEX64.match(c) for c in (*self.chunks, self.sha256, self.adapter_sha256)):
            problems.append("a digest is not 64 lowercase hex characters")
        if self.length < 0 or self.raw_length < 0:
            problems.append("negative length")
        if problems:
            raise ValueError("invalid target: " + "; ".join(problems))

    # --- (de)serialisation of custom["lorad"] --------------------------------------

    def to_custom(self) -> dict[str, Any]:
        return {"lorad": {
            "adapter": self.adapter, "version": self.version,
            "base_fingerprint": self.base_fingerprint, "audience": self.audience.to_dict(),
            "chunk_size": self.chunk_size, "chunks": list(self.chunks),
            "raw_length": self.raw_length, "adapter_sha256": self.adapter_sha256,
            "encoding": self.encoding, "delta_from": self.delta_from, "dtype": self.dtype,
            "compression": self.compression, "extra": dict(self.extra),
            "privacy": None if self.privacy is None else self.privacy.to_signed(),
        }}

    @classmethod
    def from_custom(cls, custom: Mapping[str, Any], *, length: int, sha256: str) -> TargetSpec:
        """Parse a signed target's custom part; UpdateRejectedError("target_invalid") if bad."""
        try:
            d = custom["lorad"]
            return cls(
                adapter=str(d["adapter"]), version=_int(d["version"]),
                base_fingerprint=str(d["base_fingerprint"]),
                audience=Audience.from_dict(d["audience"]), length=length, sha256=sha256,
                chunk_size=_int(d["chunk_size"]), chunks=tuple(str(c) for c in d["chunks"]),
                raw_length=_int(d["raw_length"]), adapter_sha256=str(d["adapter_sha256"]),
                encoding=str(d["encoding"]),
                delta_from=None if d.get("delta_from") is None else _int(d["delta_from"]),
                dtype=str(d["dtype"]), compression=str(d["compression"]),
                extra=dict(d.get("extra", {})),
                privacy=None if d.get("privacy") is None else PrivacyRecord.from_dict(d["privacy"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _reject("target_invalid", f"signed target description is malformed: {e!r}") from e

    # --- verification (pure) -------------------------------------------------------

    def chunk_length(self, index: int) -> int:
        if not 0 <= index < len(self.chunks):
            raise _reject("chunk_index", f"chunk {index} of {self.adapter} v{self.version}: "
                          f"allowed 0..{len(self.chunks) - 1}")
        return min(self.chunk_size, self.length - index * self.chunk_size)

    def verify_chunk(self, index: int, data: bytes) -> None:
        want = self.chunk_length(index)
        if len(data) != want:
            raise _reject("too_large" if len(data) > want else "chunk_length",
                          f"chunk {index} of {self.adapter} v{self.version} has {len(data)} bytes, "
                          f"signed {want}")
        got = _sha256(data)
        if got != self.chunks[index]:
            raise _reject("chunk_digest", f"chunk {index} of {self.adapter} v{self.version} has "
                          f"sha256 {got}, signed {self.chunks[index]}")

    def verify_payload(self, payload: bytes) -> None:
        if len(payload) != self.length:
            raise _reject("too_large" if len(payload) > self.length else "digest_mismatch",
                          f"payload of {self.adapter} v{self.version} has {len(payload)} bytes, "
                          f"signed {self.length}")
        got = _sha256(payload)
        if got != self.sha256:
            raise _reject("digest_mismatch", f"payload of {self.adapter} v{self.version} has "
                          f"sha256 {got}, signed {self.sha256}")


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected an integer, got {v!r}")
    return v


def chunk_digests(payload: bytes, chunk_size: int) -> list[str]:
    """sha256 of each ``chunk_size`` slice (one empty chunk for an empty payload)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not payload:
        return [_sha256(b"")]
    return [_sha256(payload[i:i + chunk_size]) for i in range(0, len(payload), chunk_size)]


# --- canonical adapter bytes -------------------------------------------------------

def _adapter_meta(adapter: LoraAdapter) -> dict[str, str]:
    return {"format": _FORMAT, "rank": str(adapter.rank), "alpha": repr(float(adapter.alpha)),
            "use_rslora": "1" if adapter.use_rslora else "0",
            "base_fingerprint": adapter.base_fingerprint,
            "extra": json.dumps(dict(adapter.extra), sort_keys=True)}


_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
              np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int8): "I8",
              np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


def _save(tensors: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> bytes:
    """A safetensors blob with a byte-for-byte reproducible layout (sorted names, sorted
    header), so that fleet and device compute the same digest; safetensors' own writer
    orders its header by a hash map."""
    header: dict[str, Any] = {"__metadata__": dict(meta)}
    blobs, offset = [], 0
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        if a.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {k!r} has dtype {a.dtype}; allowed {sorted(map(str, _ST_DTYPES))}")
        b = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[k] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape),
                     "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def _load(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of a safetensors blob; UpdateRejectedError if malformed."""
    try:
        if len(data) < 8:
            raise ValueError("shorter than a safetensors header")
        (hlen,) = struct.unpack("<Q", data[:8])
        if hlen > len(data) - 8:
            raise ValueError(f"header length {hlen} beyond the {len(data)} bytes")
        header = json.loads(data[8:8 + hlen])
        meta = header.get("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("metadata is not a string map")
        tensors = st_numpy.load(data)
    except Exception as e:  # safetensors raises its own error types from Rust
        raise _reject("payload_invalid", f"payload is not a valid container: {e}") from e
    return dict(tensors), dict(meta)


def encode_adapter(adapter: LoraAdapter) -> bytes:
    """Canonical bytes of an adapter (fp32, sorted): what ``adapter_sha256`` covers."""
    tensors: dict[str, np.ndarray] = {}
    for name, w in adapter.weights.items():
        tensors[f"lora.{name}.A"] = np.asarray(w.A, dtype=np.float32)
        tensors[f"lora.{name}.B"] = np.asarray(w.B, dtype=np.float32)
    return _save(tensors, _adapter_meta(adapter))


def adapter_digest(adapter: LoraAdapter) -> str:
    return _sha256(encode_adapter(adapter))


def _weights_from(tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        if not key.startswith("lora."):
            continue
        stem, _, part = key[len("lora."):].rpartition(".")
        if part not in ("A", "B") or not stem:
            raise _reject("payload_invalid", f"unexpected tensor {key!r}")
        pairs.setdefault(stem, {})[part] = arr
    out = {}
    for stem, p in pairs.items():
        if set(p) != {"A", "B"}:
            raise _reject("payload_invalid", f"target {stem!r} lacks its A or B tensor")
        out[stem] = (p["A"], p["B"])
    return out


def _adapter_from(weights: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  meta: Mapping[str, str]) -> LoraAdapter:
    try:
        if meta.get("format") != _FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {_FORMAT!r}")
        return LoraAdapter(
            rank=int(meta["rank"]), alpha=float(meta["alpha"]),
            weights={k: LoraWeights(A=np.asarray(a, np.float32), B=np.asarray(b, np.float32))
                     for k, (a, b) in weights.items()},
            base_fingerprint=meta["base_fingerprint"], use_rslora=meta["use_rslora"] == "1",
            extra=json.loads(meta.get("extra", "{}")))
    except (KeyError, ValueError, TypeError) as e:
        raise _reject("payload_invalid", f"adapter cannot be rebuilt: {e}") from e


def decode_adapter(data: bytes) -> LoraAdapter:
    """Inverse of :func:`encode_adapter`."""
    tensors, meta = _load(data)
    return _adapter_from(_weights_from(tensors), meta)


# --- payload: build (fleet side) and reconstruct (device side) ---------------------

@dataclass(frozen=True)
class EncodedTarget:
    """What the fleet publishes for one adapter version: payload bytes and its spec."""

    payload: bytes
    spec: TargetSpec
    #: canonical bytes of the adapter a device holds after reconstruction (a later delta's base)
    canonical: bytes


def _compress(raw: bytes, compression: str) -> bytes:
    if compression == "zlib":
        return zlib.compress(raw, 6)
    if compression == "zstd":
        return bytes(zstandard.ZstdCompressor(level=6).compress(raw))
    return raw


def _decompress(data: bytes, compression: str, raw_length: int) -> bytes:
    """Decompress with the signed raw length as a hard limit (a bomb stops at the limit)."""
    try:
        if compression == "zlib":
            d = zlib.decompressobj()
            raw = d.decompress(data, raw_length + 1)
            if d.unconsumed_tail or len(raw) > raw_length:
                raise _reject("too_large", f"payload inflates beyond the signed {raw_length} bytes")
            if not d.eof:
                raise ValueError("zlib stream is truncated")
        elif compression == "zstd":
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as r:
                raw = r.read(raw_length + 1)
            if len(raw) > raw_length:
                raise _reject("too_large", f"payload inflates beyond the signed {raw_length} bytes")
        else:
            raw = data
    except (zlib.error, zstandard.ZstdError, ValueError) as e:
        raise _reject("payload_invalid", f"{compression} payload cannot be decompressed: {e}") from e
    if len(raw) != raw_length:
        raise _reject("payload_invalid", f"payload decompresses to {len(raw)} bytes, signed {raw_length}")
    return raw


def _cast(arr: np.ndarray, dtype: str) -> np.ndarray:
    return arr.astype(np.float16) if dtype == "fp16" else arr.astype(np.float32)


def encode_target(adapter: LoraAdapter, *, name: str, version: int, audience: Audience,
                  probes: ProbeSet | None = None, delta_base: LoraAdapter | None = None,
                  delta_from: int | None = None, dtype: str = "fp32",
                  compression: str = "none", chunk_size: int = 32 * 1024,
                  extra: Mapping[str, Any] | None = None,
                  privacy: PrivacyRecord | None = None) -> EncodedTarget:
    """Fleet side: build the payload and the spec a target records for ``adapter``.

    With ``delta_base`` the payload holds per-tensor differences against that adapter,
    which devices hold as fleet version ``delta_from``. ``fp16`` rounds what is sent; the
    signed adapter digest is of what the device will reconstruct, computed here the same way.
    """
    if (delta_base is None) != (delta_from is None):
        raise ValueError("delta_base and delta_from go together")
    tensors: dict[str, np.ndarray] = {}
    recon: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for wname, w in adapter.weights.items():
        a, b = np.asarray(w.A, np.float32), np.asarray(w.B, np.float32)
        if delta_base is not None:
            base_w = delta_base.weights.get(wname)
            if base_w is None or base_w.A.shape != a.shape or base_w.B.shape != b.shape:
                raise ValueError(f"delta base lacks {wname!r} with the same shapes; send a full version")
            da, db = _cast(a - base_w.A, dtype), _cast(b - base_w.B, dtype)
            recon[wname] = (base_w.A + da.astype(np.float32), base_w.B + db.astype(np.float32))
        else:
            da, db = _cast(a, dtype), _cast(b, dtype)
            recon[wname] = (da.astype(np.float32), db.astype(np.float32))
        tensors[f"lora.{wname}.A"], tensors[f"lora.{wname}.B"] = da, db
    if delta_base is not None and set(delta_base.weights) != set(adapter.weights):
        raise ValueError("delta base has other target weights; send a full version")
    meta = _adapter_meta(adapter)
    if probes is not None:
        for k, v in probes.inputs.items():
            tensors[f"probe.in.{k}"] = np.asarray(v)
        for k, v in probes.outputs.items():
            tensors[f"probe.out.{k}"] = np.asarray(v)
        meta["probe_atol"], meta["probe_rtol"] = repr(probes.atol), repr(probes.rtol)
    raw = _save(tensors, meta)
    payload = _compress(raw, compression)
    canonical = encode_adapter(_adapter_from(recon, meta))
    spec = TargetSpec(
        adapter=name, version=version, base_fingerprint=adapter.base_fingerprint,
        audience=audience, length=len(payload), sha256=_sha256(payload), chunk_size=chunk_size,
        chunks=tuple(chunk_digests(payload, chunk_size)), raw_length=len(raw),
        adapter_sha256=_sha256(canonical), encoding="delta" if delta_base is not None else "full",
        delta_from=delta_from, dtype=dtype, compression=compression, extra=dict(extra or {}),
        privacy=privacy)
    return EncodedTarget(payload=payload, spec=spec, canonical=canonical)


def reconstruct(spec: TargetSpec, payload: bytes, *, base_fingerprint: str,
                delta_base: bytes | None = None) -> tuple[LoraAdapter, bytes, ProbeSet | None]:
    """Device side: verify ``payload`` and rebuild the adapter it describes.

    ``base_fingerprint`` is the fingerprint of the model this device serves;
    ``delta_base`` the canonical bytes of the installed version ``spec.delta_from``.
    Returns the adapter, its canonical bytes (keep them: a later delta's base) and the
    probe set. Raises UpdateRejectedError with the precise reason.
    """
    spec.verify_payload(payload)
    if spec.base_fingerprint != base_fingerprint:
        raise _reject("base_model_mismatch", f"{spec.adapter} v{spec.version} is for base model "
                      f"{spec.base_fingerprint}, this device serves {base_fingerprint}")
    tensors, meta = _load(_decompress(payload, spec.compression, spec.raw_length))
    if meta.get("base_fingerprint") != spec.base_fingerprint:
        raise _reject("base_model_mismatch", f"payload names base model {meta.get('base_fingerprint')}, "
                      f"target signed {spec.base_fingerprint}")
    want_dtype = np.float16 if spec.dtype == "fp16" else np.float32
    weights = _weights_from(tensors)
    for k, (a, b) in weights.items():
        if a.dtype != want_dtype or b.dtype != want_dtype:
            raise _reject("payload_invalid", f"tensors of {k!r} are {a.dtype}/{b.dtype}, signed {spec.dtype}")
    if spec.encoding == "delta":
        if delta_base is None:
            raise _reject("delta_base_missing", f"{spec.adapter} v{spec.version} is a delta against "
                          f"v{spec.delta_from}, which is not installed here")
        base = decode_adapter(delta_base)
        if set(base.weights) != set(weights):
            raise _reject("payload_invalid", "delta names other target weights than its base")
        rebuilt = {}
        for k, (da, db) in weights.items():
            bw = base.weights[k]
            if bw.A.shape != da.shape or bw.B.shape != db.shape:
                raise _reject("payload_invalid", f"delta of {k!r} has other shapes than its base")
            rebuilt[k] = (bw.A + da.astype(np.float32), bw.B + db.astype(np.float32))
        weights = rebuilt
    adapter = _adapter_from(weights, meta)
    canonical = encode_adapter(adapter)
    got = _sha256(canonical)
    if got != spec.adapter_sha256:
        raise _reject("adapter_digest", f"reconstructed {spec.adapter} v{spec.version} has sha256 "
                      f"{got}, signed {spec.adapter_sha256}")
    probes = None
    p_in = {k[len("probe.in."):]: v for k, v in tensors.items() if k.startswith("probe.in.")}
    p_out = {k[len("probe.out."):]: v for k, v in tensors.items() if k.startswith("probe.out.")}
    if p_in or p_out:
        try:
            probes = ProbeSet(inputs=p_in, outputs=p_out, atol=float(meta["probe_atol"]),
                              rtol=float(meta["probe_rtol"]))
        except (KeyError, ValueError) as e:
            raise _reject("payload_invalid", f"probe set is malformed: {e}") from e
    return adapter, canonical, probes
