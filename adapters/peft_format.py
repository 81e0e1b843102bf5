"""Adapter files that interoperate with Hugging Face PEFT.

An adapter is two files: ``adapter_model.safetensors`` (``<prefix><module>.lora_A.weight``
``[r, in]`` and ``<prefix><module>.lora_B.weight`` ``[out, r]``, torch orientation) and
``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``,
``fan_in_fan_out``). Which ONNX weight a PEFT module is, and which module name a weight is
written under, the caller says (the served model's :class:`lorad.adapters.module_paths.ModulePaths`);
without it, module ``m`` is weight ``m.weight``.

lorad records the base-model fingerprint in the safetensors header metadata
(``lorad.base_fingerprint``), which PEFT carries along and ignores.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _load_safetensors
from safetensors.numpy import save as _save_safetensors

from .bounded_json import JsonInputError, loads_bounded
from .errors import InvalidAdapterError
from .fsutil import atomic_write_bytes, fsync_dir
from .lora import LoraAdapter, LoraWeights

__all__ = [
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "FINGERPRINT_KEY",
    "DEFAULT_PREFIX",
    "MAX_HEADER_BYTES",
    "load_peft",
    "dump_peft",
    "save_peft",
    "read_peft_dir",
    "without_base_record",
]

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
FINGERPRINT_KEY = "lorad.base_fingerprint"
DEFAULT_PREFIX = "base_model.model."
_SUPPORTED_DTYPES = (np.float16, np.float32, np.float64)
_UNSUPPORTED_CONFIG = ("rank_pattern", "alpha_pattern", "use_dora", "layers_to_transform")


def _module_of(weight: str) -> str:
    return weight[: -len(".weight")] if weight.endswith(".weight") else weight


def _weight_of(module: str) -> str:
    return f"{module}.weight"


def _parse_config(raw: bytes) -> dict[str, Any]:
    try:
        config = loads_bounded(raw, what=CONFIG_FILE)
    except JsonInputError as e:  # invalid, not UTF-8, nested past MAX_JSON_DEPTH, unreadable number
        raise InvalidAdapterError(str(e)) from None
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{CONFIG_FILE} must hold a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InvalidAdapterError(f"{CONFIG_FILE}: peft_type {peft_type!r} is not supported; allowed: 'LORA'")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise InvalidAdapterError(f"{CONFIG_FILE}: 'r' must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise InvalidAdapterError(f"{CONFIG_FILE}: 'lora_alpha' must be a finite number > 0, got {alpha!r}")
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):
            raise InvalidAdapterError(f"{CONFIG_FILE}: {key!r} must be true or false, got {config[key]!r}")
    for key in _UNSUPPORTED_CONFIG:
        if config.get(key):
            raise InvalidAdapterError(f"{CONFIG_FILE}: {key!r} is not supported by lorad (got {config[key]!r})")
    return config


#: Bytes a safetensors header may take: a LoRA adapter of thousands of tensors needs a few
#: hundred KiB (about 150 bytes a tensor); the format's own reader allows 100 MB.
MAX_HEADER_BYTES = 8 << 20
#: safetensors dtype → bytes per element, for the dtypes an adapter may hold.
_DTYPE_BYTES = {"F16": 2, "F32": 4, "F64": 8}
#: The numpy names of safetensors dtypes, for messages.
_DTYPE_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "F16": "float16",
                "BF16": "bfloat16", "U32": "uint32", "I32": "int32", "F32": "float32", "U64": "uint64", "I64": "int64",
                "F64": "float64", "F8_E4M3": "float8_e4m3", "F8_E5M2": "float8_e5m2"}


def _read_header(raw: bytes) -> dict[str, str]:
    """Check a safetensors file's layout and return its ``__metadata__`` (the numpy loader drops it).

    Before any tensor is read: the header length is within :data:`MAX_HEADER_BYTES` and
    the file; the header is a JSON object (nested at most MAX_JSON_DEPTH) whose metadata
    maps strings to strings; every tensor has a float dtype, a shape of non-negative
    integers and ``data_offsets`` inside the data; the dtype and shape agree with the
    byte length; and the tensors cover the data exactly, without overlaps or gaps (as
    the format requires). Every refusal names the tensor.
    """
    if len(raw) < 8:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} is truncated: {len(raw)} bytes, a header needs at least 8")
    (size,) = struct.unpack("<Q", raw[:8])
    if size > MAX_HEADER_BYTES:
        raise InvalidAdapterError(
            f"{WEIGHTS_FILE} declares a header of {size} bytes; lorad reads headers of at most {MAX_HEADER_BYTES} bytes")
    if size > len(raw) - 8:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} is truncated: header of {size} bytes, file has {len(raw) - 8}")
    try:
        header = loads_bounded(raw[8 : 8 + size], what=f"{WEIGHTS_FILE} header")
    except JsonInputError as e:
        raise InvalidAdapterError(str(e)) from None
    if not isinstance(header, dict):
        raise InvalidAdapterError(f"{WEIGHTS_FILE} header must be a JSON object, got {type(header).__name__}")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InvalidAdapterError(f"{WEIGHTS_FILE}: '__metadata__' must map names to strings")
    data_bytes = len(raw) - 8 - size
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        spans.append(_tensor_span(key, info, data_bytes))
    spans.sort()
    end, last = 0, None
    for begin, stop, key in spans:
        if begin < end:
            raise InvalidAdapterError(
                f"{WEIGHTS_FILE}: tensor {key!r} (bytes {begin}..{stop}) overlaps tensor {last!r} (which ends at {end})")
        if begin > end:
            after = f"after tensor {last!r}" if last is not None else "at the start of the data"
            raise InvalidAdapterError(
                f"{WEIGHTS_FILE}: bytes {end}..{begin} {after} belong to no tensor (tensor {key!r} starts at {begin});"
                " safetensors data holds its tensors without gaps")
        end, last = stop, key
    if end != data_bytes:
        raise InvalidAdapterError(
            f"{WEIGHTS_FILE}: {data_bytes - end} bytes after the last tensor"
            f"{f' {last!r}' if last is not None else ''} belong to no tensor; safetensors data holds its tensors without gaps")
    return {str(k): v for k, v in meta.items()}


def _tensor_span(key: str, info: object, data_bytes: int) -> tuple[int, int, str]:
    """(begin, end, key) of one header entry, checked against the data's length."""
    if not isinstance(info, dict):
        raise InvalidAdapterError(f"{WEIGHTS_FILE}: tensor {key!r} must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        shown = _DTYPE_NAMES.get(dtype, repr(dtype)) if isinstance(dtype, str) else repr(dtype)
        raise InvalidAdapterError(f"{WEIGHTS_FILE}: tensor {key!r} has dtype {shown}; allowed: float16, float32, float64")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidAdapterError(f"{WEIGHTS_FILE}: tensor {key!r} has shape {shape!r}; a shape is a list of integers >= 0")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise InvalidAdapterError(
            f"{WEIGHTS_FILE}: tensor {key!r} has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_bytes:
        raise InvalidAdapterError(
            f"{WEIGHTS_FILE} is truncated or corrupt: tensor {key!r} ends at byte {end} of the data, which has {data_bytes} bytes")
    need = math.prod(shape) * _DTYPE_BYTES[dtype]
    if need != end - begin:
        raise InvalidAdapterError(
            f"{WEIGHTS_FILE}: tensor {key!r} of dtype {dtype} and shape {shape} needs {need} bytes,"
            f" its data_offsets give {end - begin}")
    return begin, end, key


def load_peft(
    files: Mapping[str, bytes],
    *,
    prefix: str = DEFAULT_PREFIX,
    weight_of: Callable[[str], str | None] | None = None,
) -> LoraAdapter:
    """Parse PEFT adapter files (by file name) into a :class:`LoraAdapter`.

    ``weight_of`` gives the ONNX weight of a PEFT module name, or None when the model has
    no such module (default: ``module + ".weight"``). Shapes against the base model are
    checked by the engine, which knows the model. ``fan_in_fan_out`` needs no conversion:
    PEFT stores ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]`` whatever the layout of
    the base weight, and the graph tells lorad that layout.
    """
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if f not in files]
    if missing:
        raise InvalidAdapterError(f"adapter is missing {', '.join(missing)}; a PEFT adapter has {WEIGHTS_FILE} and {CONFIG_FILE}")
    config = _parse_config(files[CONFIG_FILE])
    raw = files[WEIGHTS_FILE]
    metadata = _read_header(raw)
    try:
        tensors = _load_safetensors(raw)
    except (SafetensorError, ValueError, TypeError) as e:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} is corrupt or truncated: {e}") from e

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        if not key.startswith(prefix):
            raise InvalidAdapterError(f"{WEIGHTS_FILE}: tensor {key!r} does not start with {prefix!r}")
        module, dot, kind = key[len(prefix) :].rpartition(".lora_")
        if not dot or kind not in ("A.weight", "B.weight"):
            raise InvalidAdapterError(
                f"{WEIGHTS_FILE}: tensor {key!r} is not a LoRA matrix; allowed names end in .lora_A.weight or .lora_B.weight"
            )
        if array.dtype not in _SUPPORTED_DTYPES:
            raise InvalidAdapterError(f"{WEIGHTS_FILE}: tensor {key!r} has dtype {array.dtype}; allowed: float16, float32, float64")
        if array.ndim != 2:
            raise InvalidAdapterError(f"{WEIGHTS_FILE}: tensor {key!r} must be 2-D, has shape {list(array.shape)}")
        if not np.all(np.isfinite(array)):
            raise InvalidAdapterError(f"{WEIGHTS_FILE}: tensor {key!r} contains NaN or infinity")
        pairs.setdefault(module, {})[kind[0]] = array

    rank = int(config["r"])
    resolve = weight_of or _weight_of
    weights: dict[str, LoraWeights] = {}
    modules_of: dict[str, str] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            lacking = "lora_B" if "A" in pair else "lora_A"
            raise InvalidAdapterError(f"{WEIGHTS_FILE}: module {module!r} has no {lacking}.weight")
        a_t, b_t = pair["A"], pair["B"]
        if a_t.shape[0] != rank or b_t.shape[1] != rank:
            raise InvalidAdapterError(
                f"{WEIGHTS_FILE}: module {module!r} has lora_A {list(a_t.shape)} and lora_B {list(b_t.shape)}, "
                f"expected [r, in] and [out, r] with r={rank} from {CONFIG_FILE}"
            )
        weight = resolve(module)
        if weight is None:
            raise InvalidAdapterError(
                f"{WEIGHTS_FILE}: module {module!r} is not a MatMul/Gemm module of the base model "
                "(`lorad inspect-model` lists its modules; model.weight_names maps others)"
            )
        if weight in modules_of:
            raise InvalidAdapterError(
                f"{WEIGHTS_FILE}: modules {modules_of[weight]!r} and {module!r} both name the model's weight {weight!r}"
            )
        modules_of[weight] = module
        with np.errstate(over="ignore"):
            a, b = np.ascontiguousarray(a_t.T, dtype=np.float32), np.ascontiguousarray(b_t.T, dtype=np.float32)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise InvalidAdapterError(f"{WEIGHTS_FILE}: module {module!r} has values beyond float32's range")
        weights[weight] = LoraWeights(A=a, B=b)
    if not weights:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} holds no LoRA tensors")
    extra = {k: v for k, v in metadata.items() if k != FINGERPRINT_KEY}
    return LoraAdapter(
        rank=rank,
        alpha=float(config.get("lora_alpha", rank)),
        use_rslora=bool(config.get("use_rslora", False)),
        weights=weights,
        base_fingerprint=metadata.get(FINGERPRINT_KEY, ""),
        extra=extra,
    )


def dump_peft(
    adapter: LoraAdapter,
    *,
    prefix: str = DEFAULT_PREFIX,
    base_model: str | None = None,
    module_of: Callable[[str], str] | None = None,
) -> dict[str, bytes]:
    """Serialise to PEFT's two files (by file name).

    ``module_of`` names the PEFT module of an ONNX weight (default: the weight name
    without ``.weight``); lorad passes the served model's recovered module paths, so that
    the files load under the same config and in ``peft.PeftModel.from_pretrained``.
    """
    name_of = module_of or _module_of
    tensors: dict[str, np.ndarray] = {}
    modules = []
    for weight, w in sorted(adapter.weights.items(), key=lambda item: name_of(item[0])):
        module = name_of(weight)
        modules.append(module)
        tensors[f"{prefix}{module}.lora_A.weight"] = np.ascontiguousarray(w.A.T, dtype=np.float32)
        tensors[f"{prefix}{module}.lora_B.weight"] = np.ascontiguousarray(w.B.T, dtype=np.float32)
    metadata = {"format": "pt", **adapter.extra}
    if adapter.base_fingerprint:
        metadata[FINGERPRINT_KEY] = adapter.base_fingerprint
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "use_rslora": adapter.use_rslora,
        "target_modules": modules,
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
    }
    return {
        WEIGHTS_FILE: _save_safetensors(tensors, metadata=metadata),
        CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    }


def save_peft(
    adapter: LoraAdapter,
    directory: str | Path,
    *,
    prefix: str = DEFAULT_PREFIX,
    module_of: Callable[[str], str] | None = None,
) -> None:
    """Write the adapter's PEFT files into ``directory`` (created if needed), atomically per file."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for name, data in dump_peft(adapter, prefix=prefix, module_of=module_of).items():
        atomic_write_bytes(path / name, data)
    fsync_dir(path)


def read_peft_dir(directory: str | Path, *, max_bytes: int = 256 << 20) -> dict[str, bytes]:
    """Read the two PEFT files of a local adapter directory, refusing oversized files."""
    path = Path(directory)
    files = {}
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        file = path / name
        try:
            size = file.stat().st_size
            if size > max_bytes:
                raise InvalidAdapterError(f"{file} is {size} bytes; the limit is {max_bytes}")
            files[name] = file.read_bytes()
        except FileNotFoundError as e:
            raise InvalidAdapterError(f"{file} does not exist; a PEFT adapter directory has {WEIGHTS_FILE} and {CONFIG_FILE}") from e
    return files


def without_base_record(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """The PEFT files with lorad's base-model record (:data:`FINGERPRINT_KEY`) taken out of
    the weights file's metadata, the tensors unchanged: an adapter as plain PEFT output,
    which any base whose modules it fits accepts. The files as given when there is none."""
    raw = files[WEIGHTS_FILE]
    metadata = _read_header(raw)
    if FINGERPRINT_KEY not in metadata:
        return dict(files)
    kept = {k: v for k, v in metadata.items() if k != FINGERPRINT_KEY}
    return {**files, WEIGHTS_FILE: _save_safetensors(_load_safetensors(raw), metadata=kept or None)}
