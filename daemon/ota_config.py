"""The ``ota:`` section of the daemon's config: how a device reaches the fleet.

One frozen dataclass and its parse function, registered in :data:`daemon.config.SECTIONS`.
Off by default; when ``enabled`` the device id, the trusted root and the broker's TLS
material are required and their files must exist. Secrets are not held here (the
password is read from ``broker.password_file`` when the daemon starts), so
``lorad check-config`` can print the section. An example::

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
      limits: {max_adapter_bytes: 64MiB, max_packet_bytes: 1MiB, fetch_timeout_s: 10}
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

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # daemon.config imports this module to register the section
    from daemon.config import ParseContext, SectionReader

__all__ = ["OtaBrokerConfig", "OtaLimits", "OtaPolicy", "OtaConfig", "parse_ota"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NAME_ALLOWED = "letters, digits, '.', '_', '-' (1-64, not starting with a symbol)"


@dataclass(frozen=True)
class OtaBrokerConfig:
    """The fleet's MQTT broker (MQTT v5 over TLS with a client certificate)."""

    host: str = "localhost"
    port: int = 8883
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    keepalive_s: int = 30
    #: Seconds one publish/subscribe may wait for the broker before it counts as failed.
    timeout_s: float = 10.0


@dataclass(frozen=True)
class OtaLimits:
    """Bounds on what the device accepts from outside, checked while data streams in."""

    #: Largest adapter payload (as sent: compressed, possibly a delta), bytes.
    max_adapter_bytes: int = 64 * 1024**2
    #: Largest MQTT packet the device accepts (announced to the broker), bytes; chunks
    #: published by the fleet must fit in it.
    max_packet_bytes: int = 1024**2
    #: Seconds without progress (a chunk) before a fetch is abandoned (resumed next cycle).
    fetch_timeout_s: float = 10.0
    #: Largest adapter after decompression, bytes; None: 4 × max_adapter_bytes.
    max_raw_bytes: int | None = None


@dataclass(frozen=True)
class OtaPolicy:
    """What the device accepts and when it installs."""

    #: Largest ε (of the adapter's signed privacy record) accepted; None: any.
    max_epsilon: float | None = None
    #: Refuse adapters that carry no privacy record.
    require_privacy_record: bool = False
    #: Defer installs while the device is busy (load per CPU above ``idle_max_load_per_cpu``).
    install_when_idle: bool = False
    idle_max_load_per_cpu: float = 0.5
    #: Defer installs while on battery.
    install_on_external_power: bool = False


@dataclass(frozen=True)
class OtaConfig:
    enabled: bool = False
    device_id: str = ""
    groups: tuple[str, ...] = ()
    #: The fleet's initial root metadata; later roots are fetched and verified against it.
    trusted_root: Path | None = None
    broker: OtaBrokerConfig = field(default_factory=OtaBrokerConfig)
    limits: OtaLimits = field(default_factory=OtaLimits)
    #: How far the device clock may run ahead before signed metadata counts as expired, s.
    clock_slack_s: float = 60.0
    #: Seconds between status publications (adapters, versions, ε; also after reconnects).
    status_interval_s: float = 60.0
    #: Oldest fleet command still obeyed, seconds since it was signed.
    command_max_age_s: float = 300.0
    #: When installs may happen, device local time ("[DAYS ]HH:MM-HH:MM" ranges); empty: any time.
    install_window: tuple[str, ...] = ()
    policy: OtaPolicy = field(default_factory=OtaPolicy)


def parse_ota(r: SectionReader, ctx: ParseContext) -> OtaConfig:
    from daemon.config import ConfigError  # at call time: daemon.config imports this module

    d = OtaConfig()
    enabled = r.boolean("enabled", d.enabled)
    device_id = r.string("device_id", d.device_id)
    groups = () if r.raw("groups") == [] else r.string_list("groups", d.groups)
    for key, names in (("device_id", (device_id,) if device_id else ()), ("groups", groups)):
        for n in names:
            if not _NAME_RE.match(n):
                raise ConfigError(r.key(key), f"got {n!r}; allowed: {_NAME_ALLOWED}")
    root = r.path("trusted_root", None, base=ctx.config_dir)
    window = () if r.raw("install_window") == [] else r.string_list("install_window", d.install_window)
    if window:
        from ota.window import InstallWindow
        try:
            InstallWindow.parse(window)
        except ValueError as e:
            raise ConfigError(r.key("install_window"), f"{e}") from None
    policy = _parse_policy(r.section("policy"))
    broker = _parse_broker(r.section("broker"), ctx)
    limits = _parse_limits(r.section("limits"))
    cfg = OtaConfig(
        enabled=enabled,
        device_id=device_id,
        groups=groups,
        trusted_root=root,
        broker=broker,
        limits=limits,
        clock_slack_s=r.number("clock_slack_s", d.clock_slack_s, minimum=0, maximum=3600),
        status_interval_s=r.number("status_interval_s", d.status_interval_s, minimum=1, maximum=86400),
        command_max_age_s=r.number("command_max_age_s", d.command_max_age_s, minimum=1, maximum=86400),
        install_window=window,
        policy=policy,
    )
    if enabled:
        if not device_id:
            raise ConfigError(r.key("device_id"), f"got nothing; required when ota.enabled is true ({_NAME_ALLOWED})")
        files = {"trusted_root": root, "broker.ca_file": broker.ca_file, "broker.cert_file": broker.cert_file,
                 "broker.key_file": broker.key_file, "broker.password_file": broker.password_file}
        for key, path in files.items():
            if path is None:
                if key == "broker.password_file":
                    continue
                raise ConfigError(r.key(key), "got nothing; required when ota.enabled is true: an existing file")
            if not path.is_file():
                raise ConfigError(r.key(key), f"got {str(path)!r}; expected an existing, readable file")
        if broker.password_file is not None and broker.username is None:
            raise ConfigError(r.key("broker.username"), "got nothing; required with broker.password_file")
    return cfg


def _parse_policy(r: SectionReader) -> OtaPolicy:
    d = OtaPolicy()
    cfg = OtaPolicy(
        max_epsilon=r.number("max_epsilon", 0.0, minimum=0, maximum=1e6) if r.has("max_epsilon") else None,
        require_privacy_record=r.boolean("require_privacy_record", d.require_privacy_record),
        install_when_idle=r.boolean("install_when_idle", d.install_when_idle),
        idle_max_load_per_cpu=r.number("idle_max_load_per_cpu", d.idle_max_load_per_cpu, minimum=0, maximum=1000),
        install_on_external_power=r.boolean("install_on_external_power", d.install_on_external_power),
    )
    r.finish()
    return cfg


def _parse_broker(r: SectionReader, ctx: ParseContext) -> OtaBrokerConfig:
    d = OtaBrokerConfig()
    cfg = OtaBrokerConfig(
        host=r.string("host", d.host),
        port=r.integer("port", d.port, minimum=1, maximum=65535),
        ca_file=r.path("ca_file", None, base=ctx.config_dir),
        cert_file=r.path("cert_file", None, base=ctx.config_dir),
        key_file=r.path("key_file", None, base=ctx.config_dir),
        username=r.string("username", "") or None,
        password_file=r.path("password_file", None, base=ctx.config_dir),
        keepalive_s=r.integer("keepalive_s", d.keepalive_s, minimum=5, maximum=3600),
        timeout_s=r.number("timeout_s", d.timeout_s, minimum=0.1, maximum=600),
    )
    r.finish()
    return cfg


def _parse_limits(r: SectionReader) -> OtaLimits:
    from daemon.config import ConfigError

    d = OtaLimits()
    max_adapter = r.byte_size("max_adapter_bytes", d.max_adapter_bytes)
    max_packet = r.byte_size("max_packet_bytes", d.max_packet_bytes)
    if max_adapter < 1024:
        raise ConfigError(r.key("max_adapter_bytes"), f"got {max_adapter}; expected a size of at least 1KiB")
    if not 4096 <= max_packet <= 268_435_455:
        raise ConfigError(r.key("max_packet_bytes"),
                          f"got {max_packet}; expected a size from 4KiB to 256MiB (MQTT's limit)")
    max_raw = r.byte_size("max_raw_bytes", 4 * max_adapter) if r.has("max_raw_bytes") else None
    if max_raw is not None and max_raw < max_adapter:
        raise ConfigError(r.key("max_raw_bytes"),
                          f"got {max_raw}; expected at least limits.max_adapter_bytes ({max_adapter})")
    cfg = OtaLimits(max_adapter_bytes=max_adapter, max_packet_bytes=max_packet,
                    fetch_timeout_s=r.number("fetch_timeout_s", d.fetch_timeout_s, minimum=0.5, maximum=600),
                    max_raw_bytes=max_raw)
    r.finish()
    return cfg
