"""The ``ota:`` section, and the runtime settings of the OTA client and its MQTT transport.

:class:`OtaConfig` (with :class:`OtaBrokerConfig` and :class:`OtaLimits`) is what the file
says: validated once by pydantic like every lorad section, off by default; when
``enabled`` the device id, the trusted root and the broker's TLS material are required
and their files must exist. Secrets are not held here (the password is read from
``broker.password_file`` when the daemon starts), so ``lorad check-config --print`` can
print the section. :meth:`OtaConfig.client_config` and :meth:`OtaConfig.mqtt_config` build
the runtime :class:`ClientConfig` / :class:`MqttConfig` from it (plus what only exists at
run time: the root's bytes, the base model's fingerprint, the password). An example::

    ota:
      enabled: true
      device_id: kiosk-17
      groups: [eu-west, lobby]
      trusted_root: /etc/lorad/fleet-root.json     # 1.root.json of `loractl fleet init`
      broker:
        host: mqtt.example.net
        port: 8883
        ca_file: /etc/lorad/mqtt/ca.crt
        cert_file: /etc/lorad/mqtt/device.crt
        key_file: /etc/lorad/mqtt/device.key
        username: kiosk-17
        password_file: /etc/lorad/mqtt/password
      limits: {max_adapter_bytes: 64MiB, max_packet_bytes: 1MiB, fetch_timeout_s: 10, metadata_timeout_s: 120}
      clock_slack_s: 60
      status_interval_s: 60
      install_window: ["Mon-Fri 01:00-05:00", "Sat,Sun 00:00-24:00"]   # device local time
      policy:
        max_epsilon: 8.0               # refuse adapters whose signed DP record says more
        require_privacy_record: false  # refuse adapters without one
        install_when_idle: true        # defer installs while the load per CPU is above 0.5
        install_on_external_power: true
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, WithJsonSchema, model_validator

from lorad.adapters.config_types import Allowed, ByteSize, ConfigModel, ConfigPath, FieldProblem, NameList, NonEmptyStr, got
from lorad.adapters.names import NAME_ALLOWED, NAME_RULE, is_name

from .privacy import PrivacyPolicy
from .window import InstallWindow, TimeRange

__all__ = ["OtaBrokerConfig", "OtaLimits", "OtaPolicy", "OtaConfig", "ClientConfig", "MqttConfig"]

#: MQTT's largest packet: the remaining length is at most 268,435,455 bytes.
_MQTT_MAX_PACKET = 268_435_455


class OtaBrokerConfig(ConfigModel):
    """The fleet's MQTT broker (MQTT v5 over TLS with a client certificate)."""

    config_key = "ota.broker"

    host: NonEmptyStr = Field("localhost", description="Host name or address of the fleet's MQTT broker.")
    port: int = Field(8883, ge=1, le=65535, description="TCP port of the broker (MQTT over TLS).")
    ca_file: ConfigPath | None = Field(None, description="CA certificate(s) the broker's certificate must chain to "
                                                         "(PEM); required when ota.enabled.")
    cert_file: ConfigPath | None = Field(None, description="The device's client certificate (PEM); required "
                                                           "when ota.enabled.")
    key_file: ConfigPath | None = Field(None, description="The device's private key (PEM); required when ota.enabled.")
    username: NonEmptyStr | None = Field(None, description="MQTT user name (required with password_file).")
    password_file: ConfigPath | None = Field(None, description="File holding the MQTT password (read at start, "
                                                               "never printed).")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive interval, seconds.")
    timeout_s: float = Field(10.0, ge=0.1, le=600, description="Seconds one publish/subscribe may wait for the "
                                                               "broker before it counts as failed.")


class OtaLimits(ConfigModel):
    """Bounds on what the device accepts from outside, checked while data streams in."""

    config_key = "ota.limits"

    max_adapter_bytes: Annotated[ByteSize, Allowed("a size of at least 1KiB")] = Field(
        64 * 1024**2, ge=1024, description="Largest adapter payload as sent (compressed, possibly a delta), bytes.")
    max_packet_bytes: Annotated[ByteSize, Allowed("a size from 4KiB to 256MiB (MQTT's limit)")] = Field(
        1024**2, ge=4096, le=_MQTT_MAX_PACKET, description="Largest MQTT packet the device accepts (announced to "
                                                           "the broker); chunks published by the fleet must fit in it.")
    fetch_timeout_s: float = Field(10.0, ge=0.5, le=600, description="Seconds without progress (a chunk) before a "
                                                                     "fetch is abandoned (resumed next cycle).")
    metadata_timeout_s: float = Field(
        120.0, ge=1, le=3600, description="Longest one TUF metadata file may take to arrive in full, seconds, however "
                                          "many chunks the (unsigned) repository index announces: a broker that drips "
                                          "chunks to stall the device is cut off (the cycle fails, retried later).")
    max_metadata_bytes: Annotated[ByteSize, Allowed("a size from 64KiB to 256MiB")] = Field(
        8 * 1024**2, ge=64 * 1024, le=256 * 1024**2,
        description="Most bytes one TUF metadata file fetch may receive, duplicates included; a file announced "
                    "larger is refused before any chunk is fetched (also caps TUF's per-role limits).")
    max_raw_bytes: Annotated[ByteSize, Field(gt=0)] | None = Field(None, description="Largest adapter after decompression, bytes; "
                                                                   "null: 4 x max_adapter_bytes.")

    @model_validator(mode="after")
    def _raw_not_below_payload(self) -> OtaLimits:
        if self.max_raw_bytes is not None and self.max_raw_bytes < self.max_adapter_bytes:
            raise FieldProblem("max_raw_bytes", f"got {self.max_raw_bytes}; expected at least "
                               f"limits.max_adapter_bytes ({self.max_adapter_bytes})")
        return self


_RANGE_ALLOWED = ('"[DAYS ]HH:MM-HH:MM" in device local time, e.g. "Mon-Fri 01:00-05:00" or "22:00-06:00" '
                  '(DAYS like Mon-Fri or Sat,Sun; a range may wrap midnight)')
_WINDOW_ALLOWED = f'expected a list of ranges {_RANGE_ALLOWED}; [] for any time'


def _install_window(value: object) -> tuple[str, ...]:
    """Each range must parse as :class:`lorad.ota.window.TimeRange` (checked here, not at start)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"got {got(value)}; {_WINDOW_ALLOWED}")
    for item in value:
        try:
            TimeRange.parse(item)
        except ValueError as e:  # "install window 'x': why"; say why only if it adds to the form
            why = str(e).split(": ", 1)[-1]
            why = "" if why.startswith("expected") else f" ({why})"
            raise ValueError(f"got {got(item)}{why}; expected a range {_RANGE_ALLOWED}") from None
    return tuple(value)


#: ``ota.install_window``: validated range strings (:meth:`InstallWindow.parse` reads them).
WindowSpecs = Annotated[
    tuple[str, ...], BeforeValidator(_install_window),
    WithJsonSchema({"type": "array", "items": {"type": "string", "minLength": 1}}),
]


class OtaPolicy(ConfigModel):
    """What the device accepts (privacy records) and when it installs (idle, on mains power)."""

    config_key = "ota.policy"

    max_epsilon: float | None = Field(
        None, ge=0, le=1e6, description="Largest ε (of the adapter's signed privacy record) the device installs; "
                                        "adapters over it are refused. null: any ε.")
    require_privacy_record: bool = Field(False, description="Refuse adapters whose signed metadata carries no "
                                                            "privacy record.")
    install_when_idle: bool = Field(False, description="Defer installs while the device is busy (1-minute load "
                                                       "per CPU above idle_max_load_per_cpu); the update waits, "
                                                       "verified.")
    idle_max_load_per_cpu: float = Field(0.5, ge=0, le=1000, description="With install_when_idle: load average "
                                                                         "per CPU above which the device is busy.")
    install_on_external_power: bool = Field(False, description="Defer installs while the device runs on battery.")


class OtaConfig(ConfigModel):
    """The whole ``ota:`` section: how a device reaches the fleet."""

    config_key = "ota"

    enabled: bool = Field(False, description="Pull signed adapter updates from the fleet over MQTT.")
    device_id: Annotated[str, Allowed(NAME_ALLOWED)] = Field(
        "", description=f"This device's name in the fleet ({NAME_ALLOWED}); required when enabled.",
        json_schema_extra={"anyOf": [{"pattern": NAME_RULE}, {"const": ""}]})
    groups: NameList = Field((), description="Fleet groups this device belongs to (targets may address groups).")
    trusted_root: ConfigPath | None = Field(
        None, description="The fleet's initial TUF root metadata (1.root.json of `loractl fleet init`); later "
                          "roots are fetched and verified against it. Required when enabled.")
    broker: OtaBrokerConfig = Field(default_factory=lambda: OtaBrokerConfig(), description="The fleet's MQTT broker.")
    limits: OtaLimits = Field(default_factory=lambda: OtaLimits(), description="Bounds on what the device accepts.")
    clock_slack_s: float = Field(60.0, ge=0, le=3600, description="How far the device clock may run ahead before "
                                                                  "signed metadata counts as expired, seconds.")
    status_interval_s: float = Field(60.0, ge=1, le=86400, description="Seconds between status publications "
                                                                       "(adapters, versions, ε; also after reconnects).")
    command_max_age_s: float = Field(300.0, ge=1, le=86400, description="Oldest fleet command still obeyed, "
                                                                        "seconds since it was signed.")
    install_window: WindowSpecs = Field(
        (), description='When installs may happen, device local time: a list of "[DAYS ]HH:MM-HH:MM" ranges '
                        '(e.g. "Mon-Fri 01:00-05:00"; may wrap midnight). Outside it updates are downloaded and '
                        'verified, then installed when it opens. []: any time.')
    policy: OtaPolicy = Field(default_factory=lambda: OtaPolicy(), description="Which adapters the device accepts "
                                                                               "and when it installs them.")

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> OtaConfig:
        if self.device_id and not is_name(self.device_id):
            raise FieldProblem("device_id", f"got {self.device_id!r}; allowed: {NAME_ALLOWED}")
        if not self.enabled:
            return self
        if not self.device_id:
            raise FieldProblem("device_id", f"got nothing; required when ota.enabled is true ({NAME_ALLOWED})")
        b = self.broker
        files = {"trusted_root": self.trusted_root, "broker.ca_file": b.ca_file, "broker.cert_file": b.cert_file,
                 "broker.key_file": b.key_file, "broker.password_file": b.password_file}
        for key, path in files.items():
            if path is None:
                if key == "broker.password_file":
                    continue
                raise FieldProblem(key, "got nothing; required when ota.enabled is true: an existing file")
            if not path.is_file():
                raise FieldProblem(key, f"got {str(path)!r}; expected an existing, readable file")
        if b.password_file is not None and b.username is None:
            raise FieldProblem("broker.username", "got nothing; required with broker.password_file")
        return self

    @property
    def client_id(self) -> str:
        """The MQTT client id this device asks for (a broker set up by ``loractl fleet broker init``
        gives each device its user name as client id instead, so no device can take another's)."""
        return f"lorad-{self.device_id}"

    def client_config(self, *, state_dir: Path, trusted_root: bytes, base_fingerprint: str) -> ClientConfig:
        """The OTA client's settings: this section plus what exists only at run time."""
        return ClientConfig(
            device_id=self.device_id, groups=self.groups, state_dir=state_dir, trusted_root=trusted_root,
            base_fingerprint=base_fingerprint, clock_slack_s=self.clock_slack_s,
            fetch_timeout_s=self.limits.fetch_timeout_s, max_payload_bytes=self.limits.max_adapter_bytes,
            metadata_timeout_s=self.limits.metadata_timeout_s, max_metadata_bytes=self.limits.max_metadata_bytes,
            max_raw_bytes=self.limits.max_raw_bytes,
            privacy=PrivacyPolicy(max_epsilon=self.policy.max_epsilon,
                                  require_record=self.policy.require_privacy_record),
            install_window=InstallWindow.parse(self.install_window) if self.install_window else None)

    def mqtt_config(self, *, password: str | None, will: tuple[str, bytes] | None) -> MqttConfig:
        """The transport's settings: the broker section plus the password (read at start) and the Last Will."""
        b = self.broker
        if b.ca_file is None or b.cert_file is None or b.key_file is None:
            raise ValueError("ota.broker: ca_file, cert_file and key_file are required to connect")
        return MqttConfig(
            host=b.host, port=b.port, client_id=self.client_id, ca_file=b.ca_file, cert_file=b.cert_file,
            key_file=b.key_file, username=b.username, password=password, keepalive_s=b.keepalive_s,
            timeout_s=b.timeout_s, max_packet_size=self.limits.max_packet_bytes, will=will)


# ---------------------------------------------------------------- runtime settings


@dataclass(frozen=True)
class ClientConfig:
    """Device identity, trust anchor and limits. Times in seconds, sizes in bytes.

    ``max_raw_bytes`` bounds what a payload may decompress to (the signed ``raw_length``);
    None means four times ``max_payload_bytes``. ``fetch_timeout_s`` is the wait for the
    next chunk; ``metadata_timeout_s`` and ``max_metadata_bytes`` bound the whole fetch of
    one metadata file (slow retrieval), whatever the unsigned index announces.
    """

    device_id: str
    groups: tuple[str, ...]
    state_dir: Path
    trusted_root: bytes
    base_fingerprint: str
    clock_slack_s: float = 60.0
    fetch_timeout_s: float = 10.0
    max_payload_bytes: int = 64 << 20
    max_raw_bytes: int | None = None
    metadata_timeout_s: float = 120.0
    max_metadata_bytes: int = 8 << 20
    #: which privacy records the device accepts (``ota.policy``)
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    #: when installs may happen (None: any time); outside it updates wait, verified
    install_window: InstallWindow | None = None

    def __post_init__(self) -> None:
        if not self.device_id:
            raise ValueError("device_id must not be empty")
        if self.clock_slack_s < 0 or self.clock_slack_s > 3600:
            raise ValueError(f"clock_slack_s must be 0..3600 s, got {self.clock_slack_s}")
        if self.fetch_timeout_s <= 0 or self.max_payload_bytes <= 0:
            raise ValueError("fetch_timeout_s and max_payload_bytes must be positive")
        if self.metadata_timeout_s <= 0 or self.max_metadata_bytes <= 0:
            raise ValueError(f"metadata_timeout_s and max_metadata_bytes must be positive, got "
                             f"{self.metadata_timeout_s} and {self.max_metadata_bytes}")
        if self.max_raw_bytes is not None and self.max_raw_bytes <= 0:
            raise ValueError(f"max_raw_bytes must be positive (or None for 4 x max_payload_bytes), "
                             f"got {self.max_raw_bytes}")

    @property
    def raw_limit(self) -> int:
        """Largest decompressed payload accepted, bytes."""
        return self.max_raw_bytes if self.max_raw_bytes is not None else 4 * self.max_payload_bytes



@dataclass(frozen=True)
class MqttConfig:
    """How to reach the broker. TLS with a client certificate is mandatory."""

    host: str
    port: int
    client_id: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    timeout_s: float = 10.0
    #: largest packet this client accepts (announced to the broker in CONNECT)
    max_packet_size: int = 1 << 20
    #: (topic, payload) the broker publishes retained if we vanish without DISCONNECT
    will: tuple[str, bytes] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        if not self.client_id:
            raise ValueError("client_id must not be empty")
        if self.timeout_s <= 0 or self.keepalive_s <= 0:
            raise ValueError("timeout_s and keepalive_s must be positive")
        if self.max_packet_size < 1024:
            raise ValueError(f"max_packet_size must be >= 1024 bytes, got {self.max_packet_size}")
