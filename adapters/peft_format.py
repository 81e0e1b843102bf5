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

from .errors import InvalidAdapterError
from .fsutil import atomic_write_bytes, fsync_dir
from .lora import LoraAdapter, LoraWeights

__all__ = [
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "FINGERPRINT_KEY",
    "DEFAULT_PREFIX",
    "load_peft",
    "dump_peft",
    "save_peft",
    "read_peft_dir",
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
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapterError(f"{CONFIG_FILE} is not valid JSON: {e}") from e
    except RecursionError:
        raise InvalidAdapterError(f"{CONFIG_FILE} is nested too deeply to be an adapter config") from None
    except ValueError as e:  # an integer literal beyond Python's digit limit
        raise InvalidAdapterError(f"{CONFIG_FILE} holds a number lorad cannot read: {e}") from None
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


def _header_metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (the numpy loader drops it)."""
    if len(raw) < 8:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} is truncated: {len(raw)} bytes, a header needs at least 8")
    (size,) = struct.unpack("<Q", raw[:8])
    if size > len(raw) - 8:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} is truncated: header of {size} bytes, file has {len(raw) - 8}")
    try:
        header = json.loads(raw[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} has a corrupt header: {e}") from e
    except RecursionError:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} has a header nested too deeply to be a safetensors header") from None
    except ValueError as e:  # an integer literal beyond Python's digit limit
        raise InvalidAdapterError(f"{WEIGHTS_FILE} has a corrupt header: {e}") from None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


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
    metadata = _header_metadata(raw)
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
