"""The daemon's configuration: one YAML file into typed, frozen dataclasses.

Validated once, when built; every :class:`ConfigError` names the key path
(``server.port``), the bad value and what is allowed. Each section is its own dataclass
with its own parse function, listed in :data:`SECTIONS`; a new section (``trainer:``,
``ota:``) is one dataclass, one parse function, one field of :class:`Config` and one entry
in :data:`SECTIONS`. Command-line flags are applied as overrides of dotted keys before
validation, so they are checked (and named in errors) exactly like file values.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import platformdirs
import yaml

from daemon.batching import BatchingSettings
from daemon.demo import DEMO_RANK, DEMO_TARGETS
from daemon.ota_config import OtaConfig, parse_ota
from daemon.trainer_config import trainer_section
from trainer.config import TrainerConfig

__all__ = [
    "ConfigError",
    "SectionReader",
    "ParseContext",
    "ServerConfig",
    "ModelConfig",
    "CacheConfig",
    "Config",
    "SECTIONS",
    "default_state_dir",
    "parse_byte_size",
    "load_config",
    "build_config",
    "TOKEN_FILE",
    "ADDR_FILE",
]

#: Default name of the API token file in the state directory.
TOKEN_FILE = "api-token"
#: Written to the state directory by a serving daemon: where loractl and tests find it.
ADDR_FILE = "lorad.addr"

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_SIZE_ALLOWED = 'an integer number of bytes or a string like "64MiB", "500kB", "1GB" (units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)'
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_DEVICES = ("cpu", "cuda")
_SOCKET_MODES = (0o600, 0o660)


class ConfigError(ValueError):
    """The configuration (file or flags) is invalid; the message names key, value and what is allowed."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def parse_byte_size(value: object, *, key: str = "") -> int:
    """``64MiB`` / ``500kB`` / ``1048576`` → bytes; ConfigError naming ``key`` otherwise."""
    if isinstance(value, bool):
        raise ConfigError(key, f"got {value!r}; expected {_SIZE_ALLOWED}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(key, f"got {value}; a size must not be negative: expected {_SIZE_ALLOWED}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            n = float(m.group(1)) * _UNITS[m.group(2).lower()]
            if math.isfinite(n):
                return int(n)
    raise ConfigError(key, f"got {value!r}; expected {_SIZE_ALLOWED}")


class SectionReader:
    """Typed access to one mapping of the config; remembers which keys were read.

    :meth:`finish` rejects every key that no getter asked for, naming the allowed keys.
    """

    def __init__(self, data: object, prefix: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(prefix, f"got {_show(data)}; expected a mapping of keys to values")
        for k in data:
            if not isinstance(k, str):
                raise ConfigError(prefix, f"key {k!r} is not a string")
        self._data: Mapping[str, object] = data
        self._prefix = prefix
        self._known: list[str] = []

    def key(self, name: str) -> str:
        """The full dotted path of ``name`` in this section (for error messages)."""
        return f"{self._prefix}.{name}" if self._prefix else name

    def raw(self, name: str) -> object:
        """The value as found (``None`` when absent); marks the key as known."""
        self._known.append(name)
        return self._data.get(name)

    def has(self, name: str) -> bool:
        return self._data.get(name) is not None

    def string(self, name: str, default: str, *, choices: Sequence[str] = ()) -> str:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(self.key(name), f"got {_show(value)}; expected a non-empty string")
        if choices and value not in choices:
            raise ConfigError(self.key(name), f"got {value!r}; allowed: {', '.join(choices)}")
        return value

    def integer(self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self.raw(name)
        if value is None:
            return default
        allowed = _range_text(minimum, maximum)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), f"got {_show(value)}; expected an integer {allowed}".rstrip())
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ConfigError(self.key(name), f"got {value}; expected an integer {allowed}".rstrip())
        return value

    def number(self, name: str, default: float, *, minimum: float | None = None, maximum: float | None = None) -> float:
        value = self.raw(name)
        if value is None:
            return default
        allowed = _range_text(minimum, maximum)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(self.key(name), f"got {_show(value)}; expected a number {allowed}".rstrip())
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ConfigError(self.key(name), f"got {value}; expected a number {allowed}".rstrip())
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), f"got {_show(value)}; expected true or false")
        return value

    def path(self, name: str, default: Path | None, *, base: Path | None = None) -> Path | None:
        """A filesystem path; ``~`` is expanded, relative paths are taken from ``base``."""
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(self.key(name), f"got {_show(value)}; expected a path (a non-empty string)")
        p = Path(value).expanduser()
        if not p.is_absolute() and base is not None:
            p = base / p
        return p

    def byte_size(self, name: str, default: int) -> int:
        value = self.raw(name)
        if value is None:
            return default
        return parse_byte_size(value, key=self.key(name))

    def string_list(self, name: str, default: Sequence[str]) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return tuple(default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(self.key(name), f"got {_show(value)}; expected a non-empty list of strings")
        return tuple(value)

    def section(self, name: str) -> SectionReader:
        return SectionReader(self.raw(name), self.key(name))

    def finish(self) -> None:
        unknown = sorted(k for k in self._data if k not in self._known)
        if unknown:
            allowed = ", ".join(sorted(self._known))
            where = f" in section {self._prefix!r}" if self._prefix else ""
            raise ConfigError(self.key(unknown[0]), f"unknown key{where}; allowed keys: {allowed}")


def _show(value: object) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing"


def _range_text(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"from {minimum} to {maximum}"
    if minimum is not None:
        return f">= {minimum}"
    if maximum is not None:
        return f"<= {maximum}"
    return ""


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class ParseContext:
    """What a section's parse function may need besides its own keys."""

    #: The resolved state directory; relative runtime paths (sockets, tokens) live here.
    state_dir: Path
    #: Directory of the config file (the working directory without one); relative input
    #: paths (models) are taken from here.
    config_dir: Path


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the HTTP API listens."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: Optional Unix socket served in addition to TCP; its file mode is the authentication.
    unix_socket: Path | None = None
    unix_socket_mode: int = 0o600
    #: Bearer token for state-changing endpoints (default ``<state_dir>/api-token``).
    token_file: Path = Path("api-token")
    #: Largest request body accepted (JSON or adapter upload), bytes.
    max_request_bytes: int = 64 * 1024**2
    #: Threads that run inference and adapter I/O off the event loop.
    worker_threads: int = 4
    #: Rows (first dimension) one infer request may carry, and rows one batched call runs.
    #: Bounds a request's memory: larger bodies are refused with 413 before decoding.
    max_batch_rows: int = 1024
    #: Gathering concurrent infer requests into one call (``server.batching``).
    batching: BatchingSettings = field(default_factory=BatchingSettings)


@dataclass(frozen=True)
class ModelConfig:
    """The one base model served."""

    name: str = "demo"
    #: ``None`` = the embedded demo model shipped in ``daemon/demo/``.
    path: Path | None = None
    #: Glob patterns over ONNX weight (initializer) names that get a LoRA slot
    #: (default for the demo model: its builder's targets).
    targets: tuple[str, ...] = ("*",)
    #: Slot rank: adapters of smaller rank are zero-padded to it.
    rank: int = 8
    device: str = "cpu"
    #: ONNX Runtime intra-op threads; 0 = let ORT decide.
    intra_op_threads: int = 0
    #: PEFT module name → ONNX weight name, for weights whose names do not follow the
    #: module tree (default: module ``m`` is weight ``m.weight``).
    weight_names: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class CacheConfig:
    """In-memory adapter cache."""

    budget_bytes: int = 64 * 1024**2


@dataclass(frozen=True)
class Config:
    state_dir: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    log_level: str = "INFO"


_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _parse_server(r: SectionReader, ctx: ParseContext) -> ServerConfig:
    d = ServerConfig()
    mode = _socket_mode(r)
    return ServerConfig(
        host=r.string("host", d.host),
        port=r.integer("port", d.port, minimum=0, maximum=65535),
        unix_socket=r.path("unix_socket", None, base=ctx.state_dir),
        unix_socket_mode=mode,
        token_file=r.path("token_file", None, base=ctx.state_dir) or ctx.state_dir / TOKEN_FILE,
        max_request_bytes=_positive_size(r, "max_request_bytes", d.max_request_bytes),
        worker_threads=r.integer("worker_threads", d.worker_threads, minimum=1, maximum=256),
        max_batch_rows=r.integer("max_batch_rows", d.max_batch_rows, minimum=1, maximum=1 << 20),
        batching=_parse_batching(r.section("batching")),
    )


def _parse_batching(r: SectionReader) -> BatchingSettings:
    d = BatchingSettings()
    settings = BatchingSettings(
        enabled=r.boolean("enabled", d.enabled),
        max_wait_us=r.integer("max_wait_us", d.max_wait_us, minimum=0, maximum=1_000_000),
        slots=r.integer("slots", d.slots, minimum=1, maximum=4096),
    )
    r.finish()
    return settings


def _socket_mode(r: SectionReader) -> int:
    raw = r.raw("unix_socket_mode")
    if raw is None:
        return ServerConfig().unix_socket_mode
    mode = -1
    if isinstance(raw, int) and not isinstance(raw, bool):
        # YAML 1.1 reads 0600 as octal (384); a plain 600 is meant as octal too.
        mode = raw if raw in _SOCKET_MODES else {600: 0o600, 660: 0o660}.get(raw, -1)
    elif isinstance(raw, str) and re.fullmatch(r"(0o?)?[0-7]{3}", raw):
        mode = int(raw.removeprefix("0o"), 8)
    if mode not in _SOCKET_MODES:
        raise ConfigError(r.key("unix_socket_mode"), f"got {raw!r}; allowed: \"0600\" (owner only) or \"0660\" (owner and group)")
    return mode


def _parse_model(r: SectionReader, ctx: ParseContext) -> ModelConfig:
    d = ModelConfig()
    name = r.string("name", d.name)
    if not _MODEL_NAME_RE.match(name):
        raise ConfigError(r.key("name"), f"got {name!r}; allowed: letters, digits, '.', '_', '-' (1-64, not starting with a symbol)")
    path = r.path("path", None, base=ctx.config_dir)
    if path is not None and not path.is_file():
        raise ConfigError(r.key("path"), f"got {str(path)!r}; expected an existing ONNX file")
    return ModelConfig(
        name=name,
        path=path,
        targets=r.string_list("targets", DEMO_TARGETS if path is None else d.targets),
        rank=r.integer("rank", DEMO_RANK if path is None else d.rank, minimum=1, maximum=1024),
        device=r.string("device", d.device, choices=_DEVICES),
        intra_op_threads=r.integer("intra_op_threads", d.intra_op_threads, minimum=0, maximum=1024),
        weight_names=_string_mapping(r, "weight_names"),
    )


def _string_mapping(r: SectionReader, name: str) -> Mapping[str, str]:
    value = r.raw(name)
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) and k and v
                                                 for k, v in value.items()):
        raise ConfigError(r.key(name), f"got {_show(value)}; expected a mapping of PEFT module names to ONNX weight names")
    return MappingProxyType(dict(value))


def _parse_cache(r: SectionReader, ctx: ParseContext) -> CacheConfig:
    return CacheConfig(budget_bytes=_positive_size(r, "budget_bytes", CacheConfig().budget_bytes))


def _positive_size(r: SectionReader, name: str, default: int) -> int:
    n = r.byte_size(name, default)
    if n <= 0:
        raise ConfigError(r.key(name), f"got {n}; expected a positive size ({_SIZE_ALLOWED})")
    return n


#: Section key → parse function ``(reader, context) -> dataclass``; the key is also
#: the :class:`Config` field name. A parse function reads its keys through the reader
#: (which rejects the keys it did not read) and returns its frozen dataclass.
SECTIONS: dict[str, Callable[[SectionReader, ParseContext], Any]] = {
    "server": _parse_server,
    "model": _parse_model,
    "cache": _parse_cache,
    "trainer": trainer_section,
    "ota": parse_ota,
}


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$STATE_DIRECTORY`` under systemd (its first entry), else the per-user state dir."""
    env = os.environ if environ is None else environ
    sd = env.get("STATE_DIRECTORY", "")
    if sd:
        return Path(sd.split(":")[0])
    return Path(platformdirs.user_state_dir("lorad", appauthor=False))


def build_config(
    data: object,
    *,
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Config:
    """Validate a parsed YAML document (plus dotted-key ``overrides``) into a :class:`Config`.

    Relative ``state_dir`` and ``model.path`` are taken from ``base_dir`` (the config file's
    directory); relative socket and token paths from the state directory.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("", f"the config must be a mapping of sections, got {_show(data)}")
    doc = _apply_overrides(data, overrides or {})
    top = SectionReader(doc, "")
    config_dir = (base_dir or Path.cwd()).absolute()
    state_dir = top.path("state_dir", None, base=config_dir) or default_state_dir(environ)
    ctx = ParseContext(state_dir=state_dir.absolute(), config_dir=config_dir)
    log_level = top.string("log_level", "INFO", choices=_LOG_LEVELS + tuple(x.lower() for x in _LOG_LEVELS)).upper()
    sections: dict[str, Any] = {}
    for key, parse in SECTIONS.items():
        reader = top.section(key)
        sections[key] = parse(reader, ctx)
        reader.finish()
    top.finish()
    return Config(state_dir=ctx.state_dir, log_level=log_level, **sections)


def _apply_overrides(data: Mapping[str, object], overrides: Mapping[str, object]) -> dict[str, object]:
    doc: dict[str, object] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = doc
        for i, p in enumerate(parents):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(parents[: i + 1]), f"got {_show(child)}; expected a mapping of keys to values")
            node = child
        node[leaf] = value
    return doc


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a number, as YAML 1.2 does.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-5``); privacy settings such
    as δ are naturally written ``1e-5`` and would otherwise arrive as strings.
    """


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_config(
    path: Path | None,
    *,
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read and validate the YAML file at ``path`` (``None``: defaults only), then ``overrides``."""
    data: object = {}
    base_dir = None
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError("", f"cannot read config file {str(path)!r}: {e.strerror or e}") from e
        try:
            data = yaml.load(text, Loader=_ConfigLoader)
        except yaml.YAMLError as e:
            raise ConfigError("", f"config file {str(path)!r} is not valid YAML: {e}") from e
        base_dir = path.absolute().parent
    return build_config(data, overrides=overrides, environ=environ, base_dir=base_dir)
