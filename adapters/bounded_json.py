"""JSON from outside, decoded with a bound on how deeply it nests.

Python's ``json`` parser recurses once per nested array or object, so ``[[[[...`` a
thousand deep within any size limit raises ``RecursionError`` (or worse, on a small
thread stack) before any code sees the document. :func:`loads_bounded` measures the
nesting on the raw bytes first (strings skipped, in C-speed passes) and refuses a
document deeper than :data:`MAX_JSON_DEPTH` with a :class:`JsonInputError` naming the
limit; only then does it parse, with orjson (several times faster than ``json``) and,
for what orjson refuses or would read differently (``NaN`` literals, UTF-16, lone
surrogates, integers beyond 64 bits), with ``json``, so that what is accepted and every
error message are ``json``'s. Every part of lorad that reads JSON sent to it (infer
and example bodies, the audit and rollback bodies, ``adapter_config.json`` and the
safetensors header of an upload) decodes through here, so no ``RecursionError`` escapes.

Pure: bytes in, a parsed document or a :class:`JsonInputError` (a ``ValueError``) out.
"""

from __future__ import annotations

import json
import re

import numpy as np
import orjson

__all__ = ["MAX_JSON_DEPTH", "JsonInputError", "loads_bounded", "nesting_exceeds"]

#: Arrays and objects nested deeper than this are refused. An infer body needs the
#: tensor's rank plus 3 (body, inputs, tensor, data); 64 leaves room for any real document.
MAX_JSON_DEPTH = 64

#: A JSON string literal (escapes included); its brackets are not structure.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
#: Every byte except the four brackets, deleted to leave the document's skeleton.
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN = np.frombuffer(b"[{", np.uint8)
#: Digits → "0", what continues a number's digits ("." and the exponent's "e") → ".", every
#: other byte → " ": an integer of 20 digits or more (which orjson would read as a float where
#: ``json`` keeps it exact) shows as a space and 20 zeros.
_DIGIT_RUNS = bytes(
    ord("0") if chr(b).isdigit() and b < 128 else ord(".") if b in b".eE" else ord(" ") for b in range(256)
)
_LONG_INTEGER = b" " + b"0" * 20
#: Brackets measured per numpy pass: bounds the temporary memory (8 bytes each).
_CHUNK = 1 << 20


class JsonInputError(ValueError):
    """JSON sent to lorad is invalid, not UTF-8, too deeply nested, or holds an unreadable number."""


def loads_bounded(raw: bytes | str, *, what: str = "request body", max_depth: int = MAX_JSON_DEPTH) -> object:
    """Parse ``raw`` as JSON, refusing documents nested more than ``max_depth`` deep.

    ``what`` names the document in error messages (``"request body"``,
    ``"adapter_config.json"``). Byte input is decoded as :func:`json.loads` does
    (UTF-8, or UTF-16/32 recognised by their zero bytes); invalid bytes are named by
    position.
    """
    if isinstance(raw, bytes) and not _has_long_integer(raw) and not nesting_exceeds(raw, max_depth):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # json names the error (or accepts NaN literals, UTF-16, lone surrogates)
    if isinstance(raw, str):
        text = raw
        data = raw.encode("utf-8", "surrogatepass")
    else:
        encoding = json.detect_encoding(raw)
        try:
            text = raw.decode(encoding, "surrogatepass")
        except UnicodeDecodeError as e:
            raise JsonInputError(
                f"{what} is not valid UTF-8 ({e.reason} at byte {e.start}); JSON text must be UTF-8") from None
        # In UTF-8 the bytes of brackets and quotes never occur inside another character,
        # so the raw bytes can be measured as they are; other encodings are re-encoded.
        data = bytes(raw) if encoding.startswith("utf-8") else text.encode("utf-8", "surrogatepass")
    if nesting_exceeds(data, max_depth):
        raise JsonInputError(
            f"{what} is nested too deeply: arrays and objects may nest at most {max_depth} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JsonInputError(f"{what} is not valid JSON: {e}") from None
    except RecursionError:  # not reachable within max_depth; kept so that none can escape
        raise JsonInputError(
            f"{what} is nested too deeply: arrays and objects may nest at most {max_depth} levels") from None
    except ValueError as e:  # an integer literal longer than Python's digit limit
        raise JsonInputError(f"{what} holds a number lorad cannot read: {e}") from None


def _has_long_integer(data: bytes) -> bool:
    return _LONG_INTEGER in (b" " + data).translate(_DIGIT_RUNS)


def nesting_exceeds(data: bytes, max_depth: int) -> bool:
    """Whether UTF-8 JSON ``data`` opens more than ``max_depth`` arrays/objects at once.

    Brackets inside string literals do not count. Unbalanced input is measured as far as
    it goes (the parser names its syntax error afterwards).
    """
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return False
    skeleton = np.frombuffer(_STRING.sub(b"", data).translate(None, _NOT_BRACKETS), np.uint8)
    depth = 0
    for start in range(0, skeleton.size, _CHUNK):
        chunk = skeleton[start : start + _CHUNK]
        steps = np.where(np.isin(chunk, _OPEN), 1, -1)
        running = np.cumsum(steps) + depth
        if int(running.max()) > max_depth:
            return True
        depth = int(running[-1])
    return False
