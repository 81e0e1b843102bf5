"""Building blocks of lorad's configuration: one base model, shared value types, one error.

Every package describes its own config section as a frozen pydantic model derived from
:class:`ConfigModel` (unknown keys refused, no coercion of ``"80"`` into 80, no NaN) and
uses the types here for what all sections share: byte sizes, names, paths. The one
translation from pydantic's :class:`~pydantic.ValidationError` to lorad's
:class:`ConfigError` is :func:`config_error`: the message names the key path
(``trainer.store.max_bytes``), the bad value and what is allowed, which it reads from the
field's type and constraints, or from an :class:`Allowed` note on the field.

Rules that involve several fields raise :class:`FieldProblem` from a validator; its
``field`` is added to the key path, so the message names the key the user must change.
"""

from __future__ import annotations

import collections.abc
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import annotated_types
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    GetJsonSchemaHandler,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonSchemaValue

from lorad.adapters.names import NAME_ALLOWED, NAME_RULE, is_name

__all__ = [
    "ConfigError",
    "FieldProblem",
    "Allowed",
    "ConfigModel",
    "config_error",
    "validate_value",
    "ByteSize",
    "SIZE_ALLOWED",
    "parse_byte_size",
    "format_byte_size",
    "Name",
    "NameList",
    "NonEmptyStr",
    "StrTuple",
    "ConfigPath",
    "StatePath",
    "show",
    "got",
]

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([bB]|[kKmMgGtT][iI]?[bB])?\s*$"
#: What a byte size may be written as, for messages and the README.
SIZE_ALLOWED = ('an integer number of bytes or a string like "64MiB", "500kB", "1GB" '
                "(units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)")


class ConfigError(ValueError):
    """The configuration (file, flags or arguments) is invalid.

    ``key`` is the dotted path of the bad value (``""`` for the whole file), ``detail``
    what was wrong with it and what is allowed; ``str()`` is ``"key: detail"``.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}" if key else message)


class FieldProblem(ValueError):
    """Raised by a model validator for a rule over several fields.

    ``field`` (dotted, relative to the model) is appended to the key path of the error;
    ``message`` is the whole detail ("got ...; ...").
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(message)


class Allowed:
    """Field metadata: what is allowed, in words, when the type alone does not say it well."""

    def __init__(self, text: str) -> None:
        self.text = text


class _SizeMarker:
    """Field metadata: an integer number of bytes (messages speak of sizes).

    In the JSON Schema a size is the integer (with the field's bounds) or a string with a unit.
    """

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        as_int = handler(core_schema)
        return {"anyOf": [as_int, {"type": "string", "pattern": _SIZE_PATTERN}]}


class _PathMarker:
    """Field metadata: a filesystem path."""


def show(value: object) -> str:
    """How a bad value is shown in a message: its type and repr, or "nothing" for null."""
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


def got(value: object) -> str:
    """A bad value as written (its repr), or "nothing" for null."""
    return "nothing" if value is None else repr(value)


# ---------------------------------------------------------------- value types


def parse_byte_size(value: object, *, key: str = "") -> int:
    """``64MiB`` / ``500kB`` / ``1048576`` → bytes; :class:`ConfigError` naming ``key`` otherwise."""
    try:
        return _byte_size(value)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None


def _byte_size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"got {got(value)}; expected {SIZE_ALLOWED}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"got {value}; a size must not be negative: expected {SIZE_ALLOWED}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            n = float(m.group(1)) * _UNITS[m.group(2).lower()]
            if math.isfinite(n):
                return int(n)
    raise ValueError(f"got {got(value)}; expected {SIZE_ALLOWED}")


def format_byte_size(n: int) -> str:
    """The shortest exact spelling: 65536 → "64KiB", 1000 → "1kB", 1023 → "1023"."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024),
                       ("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("kB", 1000)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


#: A number of bytes: an int, or a string with a unit ("64MiB", "500kB", "1GB", "1TB").
#: Add ``Field(gt=0)`` / ``Field(ge=..., le=...)`` for bounds; messages speak in sizes.
ByteSize = Annotated[
    int,
    BeforeValidator(_byte_size),
    _SizeMarker(),
]


def _name(value: object) -> str:
    if not is_name(value):
        raise ValueError(f"got {got(value)}; allowed: {NAME_ALLOWED}")
    assert isinstance(value, str)
    return value


#: An adapter, model, device or group name (:mod:`lorad.adapters.names`).
Name = Annotated[str, BeforeValidator(_name), WithJsonSchema({"type": "string", "pattern": NAME_RULE})]


def _name_list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"got {show(value)}; expected a list of names ({NAME_ALLOWED})")
    return tuple(_name(v) for v in value)


#: A list of names (may be empty); one string is a list of one.
NameList = Annotated[
    tuple[str, ...], BeforeValidator(_name_list),
    WithJsonSchema({"type": "array", "items": {"type": "string", "pattern": NAME_RULE}}),
]


def _str_tuple(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"got {show(value)}; expected a non-empty list of strings")
    return tuple(value)


#: A non-empty list of non-empty strings; one string is a list of one.
StrTuple = Annotated[
    tuple[str, ...], BeforeValidator(_str_tuple),
    WithJsonSchema({"anyOf": [{"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                              {"type": "string", "minLength": 1}]}),
]

#: A string that is not empty.
NonEmptyStr = Annotated[str, annotated_types.MinLen(1)]


def _path_from(context_key: str) -> Any:
    def parse(value: object, info: ValidationInfo) -> Path:
        if isinstance(value, Path):
            path = value
        elif isinstance(value, str) and value:
            path = Path(value)
        else:
            raise ValueError(f"got {show(value)}; expected a path (a non-empty string)")
        path = path.expanduser()
        base = (info.context or {}).get(context_key)
        if base is not None and not path.is_absolute():
            path = Path(base) / path
        return path

    return parse


#: An input file path; relative paths are taken from the config file's directory
#: (validation context ``config_dir``), ``~`` is expanded.
ConfigPath = Annotated[Path, BeforeValidator(_path_from("config_dir")), _PathMarker(),
                       WithJsonSchema({"type": "string", "minLength": 1})]
#: A runtime path (socket, token); relative paths are taken from the state directory
#: (validation context ``state_dir``).
StatePath = Annotated[Path, BeforeValidator(_path_from("state_dir")), _PathMarker(),
                      WithJsonSchema({"type": "string", "minLength": 1})]


# ---------------------------------------------------------------- the base model


class ConfigModel(BaseModel):
    """Base of every config section: frozen, strict, unknown keys refused.

    ``config_key`` is where the section sits in the file (``"trainer"``), used to name
    keys in errors when the model is built directly from keyword arguments. A section
    left out or given as null (``server:`` with everything commented out) means its defaults.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False,
                              validate_default=False)

    config_key: ClassVar[str] = ""

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise config_error(e, type(self), self.config_key) from None

    # Marks this __init__ as the base one (as pydantic's RootModel does), so that
    # validation of nested sections builds them directly instead of calling it.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: configuration does not change after start")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: configuration does not change after start")

    @classmethod
    def load(cls, data: object, *, key: str | None = None, context: Mapping[str, object] | None = None) -> Any:
        """Validate ``data`` (a parsed YAML mapping; None = all defaults) into this model.

        ``key`` names where the data sits (default :attr:`config_key`); ``context`` gives
        ``config_dir`` and ``state_dir`` for relative paths.
        """
        prefix = cls.config_key if key is None else key
        try:
            return cls.model_validate({} if data is None else data, context=dict(context or {}))
        except ValidationError as e:
            raise config_error(e, cls, prefix) from None

    @model_validator(mode="before")
    @classmethod
    def _absent_sections_are_defaults(cls, data: Any) -> Any:
        # An absent or null section is validated as {} (not taken from a default instance),
        # so its validators see the validation context (relative paths, derived defaults).
        if isinstance(data, Mapping):
            empty = [k for k, f in cls.model_fields.items() if _is_section(f.annotation) and data.get(k) is None]
            if empty:
                data = {**data, **{k: {} for k in empty}}
        return data


def _is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, ConfigModel)


def validate_value(type_: Any, value: object, *, key: str, context: Mapping[str, object] | None = None) -> Any:
    """Validate one value of ``type_`` (e.g. :data:`ConfigPath`), errors named ``key``."""
    try:
        return TypeAdapter(type_).validate_python(value, context=dict(context or {}), strict=True)
    except ValidationError as e:
        raise config_error(e, None, key, annotation=type_) from None


# ---------------------------------------------------------------- the one translation


def config_error(exc: ValidationError, model: type[BaseModel] | None, prefix: str = "", *,
                 annotation: Any = None) -> ConfigError:
    """pydantic's first error → :class:`ConfigError` naming key path, bad value and what is allowed."""
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"] if p != "[key]"]
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    parts = [prefix] if prefix else []
    if kind in ("value_error", "assertion_error") and isinstance(ctx.get("error"), FieldProblem):
        problem: FieldProblem = ctx["error"]
        return ConfigError(".".join([*parts, *loc, problem.field]), problem.message)
    key = ".".join([*parts, *loc])
    if kind == "extra_forbidden":
        at = _unwrap(_walk(model, loc[:-1])[1]) if model is not None else None
        container = at if isinstance(at, type) and issubclass(at, BaseModel) else None
        section = ".".join([*parts, *loc[:-1]])
        where = f" in section {section!r}" if section else ""
        allowed = ", ".join(sorted(container.model_fields)) if container is not None else "(none)"
        return ConfigError(key, f"unknown key{where}; allowed keys: {allowed}")
    if kind in ("value_error", "assertion_error"):
        return ConfigError(key, str(ctx.get("error", err["msg"])))
    ann, meta = _walk(model, loc)[1:] if model is not None else (annotation, _metadata(None, annotation))
    if kind == "literal_error":
        return ConfigError(key, f"got {got(value)}; allowed: {', '.join(str(a) for a in _literal_values(ann))}")
    allowed = _allowed_text(ann, meta)
    if kind == "missing":
        return ConfigError(key, f"got nothing; required: {allowed}")
    shown = repr(value) if kind in _RANGE_ERRORS or kind == "finite_number" else show(value)
    if isinstance(value, int) and any(isinstance(m, _SizeMarker) for m in meta) and format_byte_size(value) != str(value):
        shown = f"{value} ({format_byte_size(value)})"
    return ConfigError(key, f"got {shown}; expected {allowed}")


_MAPPINGS = (dict, collections.abc.Mapping)
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal",
                 "too_short", "too_long", "string_too_short", "string_too_long"}


def _walk(model: type[BaseModel] | None, loc: list[str]) -> tuple[type[BaseModel] | None, Any, list[Any]]:
    """(innermost model containing the last key, the annotation at ``loc``, its metadata)."""
    container: type[BaseModel] | None = model
    ann: Any = model
    meta: list[Any] = []
    for part in loc:
        ann = _unwrap(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            container = ann
            info: FieldInfo | None = ann.model_fields.get(part)
            if info is None:
                return container, None, []
            ann, meta = info.annotation, _metadata(info, info.annotation)
        elif typing.get_origin(ann) in _MAPPINGS:
            ann = typing.get_args(ann)[1]
            meta = _metadata(None, ann)
        else:
            break
    return container, ann, meta


def _unwrap(ann: Any) -> Any:
    """Strip ``Annotated`` and ``X | None`` down to the type that is checked."""
    while True:
        if typing.get_origin(ann) is Annotated:
            ann = typing.get_args(ann)[0]
        elif typing.get_origin(ann) in (Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return ann
            ann = args[0]
        else:
            return ann


def _metadata(info: FieldInfo | None, ann: Any) -> list[Any]:
    meta = list(info.metadata) if info is not None else []
    while True:
        if typing.get_origin(ann) is Annotated:
            for m in ann.__metadata__:
                meta.extend(m.metadata if isinstance(m, FieldInfo) else [m])
            ann = typing.get_args(ann)[0]
        elif typing.get_origin(ann) in (Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return meta
            ann = args[0]
        else:
            return meta


def _literal_values(ann: Any) -> tuple[Any, ...]:
    ann = _unwrap(ann)
    return typing.get_args(ann) if typing.get_origin(ann) is Literal else ()


def _allowed_text(ann: Any, meta: list[Any]) -> str:
    """What a field of type ``ann`` with constraints ``meta`` accepts, in words."""
    for m in meta:
        if isinstance(m, Allowed):
            return m.text
    base = _unwrap(ann)
    bounds = {type(m).__name__.lower(): getattr(m, type(m).__name__.lower())
              for m in meta if isinstance(m, (annotated_types.Gt, annotated_types.Ge, annotated_types.Lt, annotated_types.Le))}
    if any(isinstance(m, _SizeMarker) for m in meta):
        if bounds == {"gt": 0}:
            return f"a positive size ({SIZE_ALLOWED})"
        text = _range_text(bounds, format_byte_size)
        return f"a size {text} ({SIZE_ALLOWED})" if text else SIZE_ALLOWED
    if any(isinstance(m, _PathMarker) for m in meta):
        return "a path (a non-empty string)"
    if base is bool:
        return "true or false"
    if base is int:
        return f"an integer {_range_text(bounds, _number)}".rstrip()
    if base is float:
        return f"a number {_range_text(bounds, _number)}".rstrip()
    if base is str:
        return "a non-empty string"
    if typing.get_origin(base) is Literal:
        return "one of: " + ", ".join(str(a) for a in typing.get_args(base))
    if isinstance(base, type) and issubclass(base, BaseModel):
        return "a mapping of keys to values"
    if typing.get_origin(base) in _MAPPINGS:
        return "a mapping of keys to values"
    if typing.get_origin(base) in (tuple, list):
        return "a list"
    return getattr(base, "__name__", str(base))


def _number(x: Any) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x) if isinstance(x, int) else repr(x)


def _range_text(bounds: dict[str, Any], fmt: Any) -> str:
    if "ge" in bounds and "le" in bounds:
        return f"from {fmt(bounds['ge'])} to {fmt(bounds['le'])}"
    words = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return " and ".join(f"{words[k]} {fmt(bounds[k])}" for k in ("gt", "ge", "lt", "le") if k in bounds)
