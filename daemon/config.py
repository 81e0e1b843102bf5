"""The daemon's configuration: one YAML file, one typed and frozen :class:`Config`.

Each package owns the section of its part, a frozen pydantic model with defaults, units
and descriptions: ``model:`` and ``cache:`` in :mod:`lorad.adapters.config`, ``trainer:`` in
:mod:`lorad.trainer.config`, ``ota:`` in :mod:`lorad.ota.config`, ``power:`` in :mod:`lorad.daemon.power.config`,
``federated:`` in :mod:`lorad.daemon.federated.config`.
This module owns only what the process itself needs (``server:``, ``metrics:``,
``log_level``, ``state_dir``) and composes the
sections into :class:`Config`. A new section is one model in its package and one field
here; a new key is one field of its section's model (``/work/coord/CONFIG_HOWTO.md``).

Validation happens once, in :func:`build_config`; every :class:`ConfigError` names the key
path (``server.port``), the bad value and what is allowed. Command-line flags are applied
as overrides of dotted keys before validation, so they are checked (and named in errors)
exactly like file values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, WithJsonSchema, field_serializer, model_validator

from lorad.adapters.config import CacheConfig, GenerationConfig, ModelConfig
from lorad.adapters.config_types import (
    ByteSize,
    ConfigError,
    ConfigModel,
    ConfigPath,
    FieldProblem,
    NonEmptyStr,
    StatePath,
    got,
    parse_byte_size,
    show,
    validate_value,
)
from lorad.daemon.demo import DEMO_RANK, DEMO_TARGETS
from lorad.daemon.federated.config import FederatedConfig
from lorad.daemon.paths import ADDR_FILE, TOKEN_FILE, default_state_dir
from lorad.daemon.power.config import PowerConfig
from lorad.ota.config import OtaConfig
from lorad.trainer.config import TrainerConfig

__all__ = [
    "ConfigError",
    "ServerConfig",
    "BatchingConfig",
    "ModelConfig",
    "CacheConfig",
    "PowerConfig",
    "FederatedConfig",
    "MetricsConfig",
    "Config",
    "default_state_dir",
    "parse_byte_size",
    "load_config",
    "build_config",
    "config_schema",
    "TOKEN_FILE",
    "ADDR_FILE",
]


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_SOCKET_MODES = (0o600, 0o660)
_SOCKET_MODE_ALLOWED = 'allowed: "0600" (owner only) or "0660" (owner and group)'


def _socket_mode(raw: object) -> int:
    mode = -1
    if isinstance(raw, int) and not isinstance(raw, bool):
        # YAML 1.1 reads 0600 as octal (384); a plain 600 is meant as octal too.
        mode = raw if raw in _SOCKET_MODES else {600: 0o600, 660: 0o660}.get(raw, -1)
    elif isinstance(raw, str) and re.fullmatch(r"(0o?)?[0-7]{3}", raw):
        mode = int(raw.removeprefix("0o"), 8)
    if mode not in _SOCKET_MODES:
        raise ValueError(f"got {got(raw)}; {_SOCKET_MODE_ALLOWED}")
    return mode


SocketMode = Annotated[int, BeforeValidator(_socket_mode), WithJsonSchema({"enum": ["0600", "0660"]})]


def _log_level(raw: object) -> object:
    return raw.upper() if isinstance(raw, str) else raw


LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_log_level),
                     WithJsonSchema({"enum": [*_LOG_LEVELS, *(x.lower() for x in _LOG_LEVELS)]})]


class BatchingConfig(ConfigModel):
    """Gathering concurrent infer requests, whatever their adapters, into one call (lorad.adapters.micro_batcher)."""

    config_key = "server.batching"

    enabled: bool = Field(True, description="Gather concurrent infer requests into one ONNX Runtime call over "
                                            "banked adapters; false: one call per request.")
    max_wait_us: int = Field(500, ge=0, le=1_000_000, description="Longest a request waits for others to join "
                                                                  "its batch, microseconds (a lone request "
                                                                  "does not wait).")
    inline_us: int = Field(300, ge=0, le=100_000, description="Requests decoded in one turn of the event loop run "
                                                             "there, with no thread hand-off, when the batcher is "
                                                             "idle and recent batches would take at most this long, "
                                                             "microseconds (a small model); 0: always in the "
                                                             "batcher's thread.")
    slots: int = Field(32, ge=1, le=4096, description="Adapter slots in the banks (besides the zero slot of the "
                                                      "base model); fewer when they would not fit "
                                                      "cache.budget_bytes.")


class ServerConfig(ConfigModel):
    """Where and how the HTTP API listens."""

    config_key = "server"

    host: NonEmptyStr = Field("127.0.0.1", description="TCP address to bind (flag --host).")
    port: int = Field(8080, ge=0, le=65535, description="TCP port; 0 picks a free one, written to "
                                                        "<state_dir>/lorad.addr (flag --port).")
    unix_socket: StatePath | None = Field(None, description="Unix socket served in addition to TCP (relative: in the "
                                                            "state directory); its file mode is the authentication.")
    unix_socket_mode: SocketMode = Field(0o600, json_schema_extra={"default": "0600"}, description='File mode of the Unix socket: "0600" (owner only) '
                                                            'or "0660" (owner and group).')
    token_file: StatePath = Field(Path(TOKEN_FILE), description="Bearer token for state-changing endpoints, created "
                                                                "if missing (relative: in the state directory).")
    max_request_bytes: ByteSize = Field(64 * 1024**2, gt=0, description="Largest request body accepted (JSON or "
                                                                        "adapter upload), bytes.")
    worker_threads: int = Field(4, ge=1, le=256, description="Threads that run inference and adapter I/O off the "
                                                             "event loop.")
    max_batch_rows: int = Field(1024, ge=1, le=1 << 20, description="Rows (first dimension) one infer request may "
                                                                    "carry, and rows one batched call runs; larger "
                                                                    "requests are refused with 413 before decoding.")
    max_request_tokens: int = Field(65536, ge=1, description="Tokens (texts × padded length) one infer request of a "
                                    "model that reads token ids may carry; more is a 413 before the model runs.")
    chunk_tokens: int = Field(2048, ge=1, description="Tokens one model call runs at most: a larger request runs as "
                              "consecutive calls, so its memory is one call's whatever its size.")
    chunk_rows: int = Field(256, ge=1, description="Rows one model call of a model without token ids runs at most "
                            "(as chunk_tokens).")
    large_requests: int = Field(1, ge=1, le=64, description="Requests larger than one call that run at a time; others "
                                "wait (smaller requests never do).")
    queue_timeout_s: float = Field(120.0, gt=0, description="How long a large request waits for its turn before a 503.")
    batching: BatchingConfig = Field(default_factory=lambda: BatchingConfig(),
                                     description="Micro-batching of concurrent infer requests.")

    @model_validator(mode="before")
    @classmethod
    def _token_in_state_dir(cls, data: Any) -> Any:
        # The default token path is relative too, so it lands in the state directory.
        if isinstance(data, Mapping) and data.get("token_file") is None:
            data = {**data, "token_file": TOKEN_FILE}
        return data

    @field_serializer("unix_socket_mode")
    def _mode_text(self, mode: int) -> str:
        return f"{mode:04o}"


class MetricsConfig(ConfigModel):
    """What ``/metrics`` exports beyond the fixed families."""

    config_key = "metrics"

    top_adapters: int = Field(10, ge=0, le=1000, description="Adapters (the busiest) that get their own adapter "
                                                             "label on the per-adapter request series; the rest "
                                                             "are counted as _other.")


class Config(ConfigModel):
    """The whole file: the process settings and the sections of the parts."""

    state_dir: ConfigPath = Field(default_factory=lambda: default_state_dir(),
                                  description="State directory: adapters, ledger, examples, token (default "
                                              "$STATE_DIRECTORY under systemd, else the per-user state dir; "
                                              "flag --state-dir).")
    log_level: LogLevel = Field("INFO", description="Log level (any case); flag --log-level.")
    server: ServerConfig = Field(default_factory=lambda: ServerConfig(), description="The HTTP API.")
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(), description="The base model served.")
    cache: CacheConfig = Field(default_factory=lambda: CacheConfig(), description="Adapters kept in memory.")
    generation: GenerationConfig = Field(default_factory=lambda: GenerationConfig(),
                                         description="Text generation (decoder language models).")
    trainer: TrainerConfig = Field(default_factory=lambda: TrainerConfig(), description="On-device DP training.")
    ota: OtaConfig = Field(default_factory=lambda: OtaConfig(), description="Signed adapter updates from the fleet over MQTT.")
    power: PowerConfig = Field(default_factory=lambda: PowerConfig(), description="Power and energy sampling.")
    metrics: MetricsConfig = Field(default_factory=lambda: MetricsConfig(), description="What /metrics exports.")
    federated: FederatedConfig = Field(default_factory=lambda: FederatedConfig(),
                                       description="Federated learning on Flower: this device as a SuperNode.")

    @model_validator(mode="before")
    @classmethod
    def _demo_model_defaults(cls, data: Any) -> Any:
        # Without a model file the embedded demo model is served; its targets and rank
        # are the defaults then (the library's defaults are for any model).
        if not isinstance(data, Mapping):
            return data
        model = data.get("model")
        if model is None:
            model = {}
        if isinstance(model, Mapping) and model.get("path") is None:
            model = {"targets": list(DEMO_TARGETS), "rank": DEMO_RANK, **model}
            data = {**data, "model": model}
        return data

    @model_validator(mode="after")
    def _federated_needs_the_trainer(self) -> Config:
        fed = self.federated
        if not fed.enabled:
            return self
        if not self.trainer.enabled:
            raise FieldProblem("federated.enabled", "got true with trainer.enabled false; a federated round is a "
                               "local DP training run: set trainer.enabled: true, or federated.enabled: false")
        budget = self.trainer.for_adapter(fed.adapter).target_epsilon
        if fed.round_epsilon > budget:
            raise FieldProblem("federated.round_epsilon", f"got {fed.round_epsilon:g}; expected a number > 0 and at "
                               f"most {budget:g}, the whole privacy budget of adapter {fed.adapter!r} (its trainer "
                               "target_epsilon)")
        return self


def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the whole config file, as ``lorad config-schema`` prints it."""
    schema = Config.model_json_schema()
    schema.pop("required", None)  # state_dir has a default from the environment
    _fold_bounds(schema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "lorad configuration", **schema}


_BOUNDS = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum", "le": "maximum"}


def _fold_bounds(node: object) -> None:
    # pydantic cannot turn the bounds of an optional size into JSON Schema words and
    # leaves them as "gt"/"ge" keys (beside anyOf, or in its integer branch); fix them up.
    if isinstance(node, dict):
        stray = {k: node.pop(k) for k in list(node) if k in _BOUNDS and ("anyOf" in node or "type" in node)}
        targets = [b for b in node.get("anyOf", []) if isinstance(b, dict) and b.get("type") == "integer"]
        for target in targets if "anyOf" in node else [node]:
            target.update({_BOUNDS[k]: v for k, v in stray.items()})
        for value in node.values():
            _fold_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _fold_bounds(value)


def build_config(
    data: object,
    *,
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Config:
    """Validate a parsed YAML document (plus dotted-key ``overrides``) into a :class:`Config`.

    Relative ``state_dir``, ``model.path`` and the OTA files are taken from ``base_dir``
    (the config file's directory); relative socket and token paths from the state directory.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("", f"the config must be a mapping of sections, got {show(data)}")
    doc = _apply_overrides(data, overrides or {})
    config_dir = (base_dir or Path.cwd()).absolute()
    context: dict[str, object] = {"config_dir": config_dir}
    raw_state_dir = doc.get("state_dir")
    state_dir: Path = (default_state_dir(environ) if raw_state_dir is None
                       else validate_value(ConfigPath, raw_state_dir, key="state_dir", context=context))
    context["state_dir"] = state_dir.absolute()
    doc["state_dir"] = str(state_dir.absolute())
    config: Config = Config.load(doc, context=context)
    return config


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
                raise ConfigError(".".join(parents[: i + 1]), f"got {show(child)}; expected a mapping of keys to values")
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
