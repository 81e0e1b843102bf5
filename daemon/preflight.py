"""What ``lorad serve`` must be able to do before it serves, as one function per part.

:func:`open_engine` loads the base model and its LoRA targets, :func:`read_ota_material`
reads the files OTA needs at start. The daemon calls them while starting;
``lorad check-config`` calls :func:`check_startable`, which runs the same code, so a file
that passes it does not fail at ``serve`` for its settings (a target glob that matches no
weight, a model file ONNX Runtime cannot load, a trusted root that is not one).

Each failure is a :class:`StartupError` whose ``key`` is the config key to change.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorad.adapters.decoder import DecoderSpec
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.generation import Generator
from lorad.adapters.memory import trim_now
from lorad.adapters.text_input import TextFrontEnd, TextSetupError
from lorad.daemon.config import Config
from lorad.daemon.demo import demo_model_path
from lorad.ota.config import OtaConfig

if TYPE_CHECKING:  # tuf, paho and cryptography load only when OTA is on (read_ota_material, ota_transport)
    from lorad.ota.transport import MqttTransport

__all__ = ["StartupError", "OtaMaterial", "model_file", "open_engine", "text_front_end", "decoder_spec", "open_generator",
           "read_ota_material", "check_training",
           "check_startable"]


class StartupError(RuntimeError):
    """The daemon cannot serve with this configuration; ``key`` names the setting."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.detail = message
        super().__init__(f"{key} {message}")


def model_file(cfg: Config) -> Path:
    """The ONNX file served: ``model.path``, or the embedded demo model."""
    return cfg.model.path if cfg.model.path is not None else demo_model_path()


def open_engine(cfg: Config) -> InferenceEngine:
    """The inference engine of ``model:``: the model loaded, its targets matched, a session open."""
    path = model_file(cfg)
    try:
        return InferenceEngine(
            path,
            targets=cfg.model.targets,
            rank=cfg.model.rank,
            weight_names=cfg.model.weight_names,
            device=cfg.model.device,
            intra_op_threads=cfg.model.intra_op_threads,
            quantized_compute=cfg.model.quantized_compute,
            merged_bytes=cfg.cache.merged_bytes,
        )
    except ValueError as e:  # the graph surgery: targets or weight_names that match nothing
        raise StartupError("model.targets", f"{list(cfg.model.targets)} do not fit model {str(path)!r}: {e}") from e
    except Exception as e:  # onnx/protobuf/ORT raise their own untyped errors for a bad file
        raise StartupError("model.path", f"{str(path)!r} cannot be served: {type(e).__name__}: {e}") from e


def text_front_end(cfg: Config, engine: InferenceEngine) -> TextFrontEnd | None:
    """The tokenizing step of a text model (``model.tokenizer`` etc. override what it declares); None otherwise.
    A decoder language model has none: its text goes through /generate, its /infer takes token tensors."""
    m = cfg.model
    if decoder_spec(cfg, engine) is not None:
        return None
    try:
        return TextFrontEnd.from_model(engine.base_model, tokenizer=m.tokenizer, labels=m.labels,
                                       max_tokens=m.max_text_tokens)
    except TextSetupError as e:
        raise StartupError(e.key, f"{e.detail} (the text input of model {str(model_file(cfg))!r})") from e


def decoder_spec(cfg: Config, engine: InferenceEngine) -> DecoderSpec | None:
    """What the daemon generates text with, for a decoder language model; None for other models."""
    try:
        return DecoderSpec.from_model(engine.base_model)
    except (ValueError, KeyError) as e:
        raise StartupError("model.path", f"{str(model_file(cfg))!r} declares a decoder but not all of it: {e}") from e


def open_generator(cfg: Config, engine: InferenceEngine) -> Generator | None:
    """The generation loop of a decoder model (``generation:``), or None for other models."""
    spec = decoder_spec(cfg, engine)
    if spec is None:
        return None
    from tokenizers import Tokenizer

    g = cfg.generation
    return Generator(engine, spec, Tokenizer.from_str(spec.tokenizer_json), slots=g.max_concurrent,
                     max_rows=g.max_concurrent, kv_cache_bytes=g.kv_cache_bytes,
                     max_context=min(g.max_context, spec.max_positions), prefill_chunk=g.prefill_chunk_tokens,
                     intra_op_threads=cfg.model.intra_op_threads, on_idle=trim_now)


@dataclass(frozen=True)
class OtaMaterial:
    """What OTA reads from disk at start: the trusted root's bytes and the broker password."""

    trusted_root: bytes
    password: str | None


def read_ota_material(ota: OtaConfig) -> OtaMaterial:
    """Read and check the trusted root and the password file named by an enabled ``ota:``."""
    from tuf.api.metadata import Metadata, Root

    if ota.trusted_root is None:
        raise StartupError("ota.trusted_root", "is required when ota.enabled is true")
    try:
        root = ota.trusted_root.read_bytes()
        Metadata[Root].from_bytes(root)
    except Exception as e:  # OSError, or tuf/json errors for a file that is not a root
        raise StartupError("ota.trusted_root", f"{str(ota.trusted_root)!r} is not a readable TUF root "
                           f"metadata file: {type(e).__name__}: {e}") from e
    password = None
    b = ota.broker
    if b.password_file is not None:
        try:
            password = b.password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeError) as e:
            raise StartupError("ota.broker.password_file", f"{str(b.password_file)!r} cannot be read: {e}") from e
    return OtaMaterial(trusted_root=root, password=password)


def ota_transport(ota: OtaConfig, material: OtaMaterial) -> MqttTransport:
    """The device's MQTT transport (TLS material loaded, not yet connected)."""
    from lorad.ota.errors import TransportError
    from lorad.ota.status import will_for
    from lorad.ota.transport import MqttTransport

    try:
        return MqttTransport(ota.mqtt_config(password=material.password, will=will_for(ota.device_id)))
    except TransportError as e:
        raise StartupError("ota.broker.ca_file", f"(with cert_file, key_file) cannot be used: {e}") from e


def check_training(cfg: Config, engine: InferenceEngine, text: TextFrontEnd | None) -> None:
    """What a training run checks before it charges anything (trainer/model_setup.py), for
    the defaults and every adapter of ``trainer.adapters``: the same code, run now."""
    from lorad.adapters.registry import AdapterRegistry
    from lorad.adapters.service import AdapterService
    from lorad.trainer.backends import TrainingUnavailableError, resolve_backend
    from lorad.trainer.model_setup import TrainingSetupError, preflight

    try:
        backend = resolve_backend(cfg.trainer.backend)
    except TrainingUnavailableError:
        return  # the daemon serves and says so; nothing to train with here
    with tempfile.TemporaryDirectory(prefix="lorad-check-") as tmp:
        service = AdapterService(engine, AdapterRegistry(Path(tmp) / "adapters"),
                                 cache_budget_bytes=cfg.cache.budget_bytes, model_name=cfg.model.name, text=text)
        for name, settings in [("", cfg.trainer.defaults), *cfg.trainer.adapters.items()]:
            try:
                preflight(service, settings, cache_dir=Path(tmp) / "artifacts", backend=backend)
            except TrainingSetupError as e:
                where = f"trainer.adapters.{name}." if name else "trainer.defaults."
                key = e.key.replace("trainer.", where, 1)
                raise StartupError(key, f"{e.detail} (a training run would be refused before it is charged)") from e


def check_startable(cfg: Config) -> None:
    """Everything :func:`open_engine`, :func:`text_front_end`, the OTA start and a training
    run before its charge would refuse, without serving."""
    from lorad.daemon.power import detect_source

    detect_source(cfg.power.source, sys_root=cfg.power.sys_root)  # ConfigError: a named source the machine lacks
    engine = open_engine(cfg)
    text = text_front_end(cfg, engine)
    spec = decoder_spec(cfg, engine)
    if spec is not None:
        if cfg.generation.kv_cache_bytes < 2 * spec.kv_bytes_per_token:
            raise StartupError("generation.kv_cache_bytes", f"{cfg.generation.kv_cache_bytes} bytes hold no generation: "
                               f"this model needs {spec.kv_bytes_per_token} bytes per token")
        # A decoder's engine session opens lazily: the generation session is where ONNX
        # Runtime loads the model, so opening it is what checks that it can.
        try:
            generator = open_generator(cfg, engine)
        except Exception as e:  # ORT's own errors for a graph it cannot load
            raise StartupError("model.path", f"{str(model_file(cfg))!r} cannot be served: {type(e).__name__}: {e}") from e
        if generator is not None:
            generator.close()
    if cfg.trainer.enabled:
        check_training(cfg, engine, text)
    if cfg.ota.enabled:
        ota_transport(cfg.ota, read_ota_material(cfg.ota)).close()
