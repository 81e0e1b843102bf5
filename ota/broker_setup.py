"""``loractl fleet broker init``: everything a Mosquitto needs to carry lorad's topics.

One directory holds a CA, a server certificate, a client certificate and a password per
user (the fleet tool and every device), a password file in ``mosquitto_passwd``'s format,
an ACL file granting exactly lorad's topics and a ``mosquitto.conf`` that runs as
``mosquitto -c DIR/mosquitto.conf``. Certificates and keys come from ``cryptography``.

Two listeners: devices connect to ``port``, the fleet tool to ``fleet_port``. On the device
listener Mosquitto takes each client's user name as its client id
(``use_username_as_clientid``), so a device holding its own credentials cannot connect
under another device's client id and have the broker disconnect that device (MQTT's
session takeover); its own id, whatever it asks for, is its user name. The fleet
listener admits only the fleet user, whose connections keep their own client ids (the
tool may run several at once: ``fleet rollout run`` beside ``fleet status``). Each
listener has its own password file, so a device's credentials are refused on the fleet
listener and the fleet's on the device listener.

ACLs (``lorad/v1/`` omitted), by user name (not client id): the fleet user reads and
writes everything under it; a device reads ``repo/#``, ``all/offer``, ``group/<g>/offer``
for its groups and ``device/<self>/{offer,cmd}``, and writes only
``device/<self>/{status,online}`` (online carries its Last Will).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import pwd
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lorad.adapters.fsutil import atomic_write_bytes

from .transport import TOPIC_ROOT

__all__ = ["FLEET_USER", "BrokerLayout", "init_broker", "load_broker", "acl_text", "password_line",
           "device_ota_section"]

FLEET_USER = "fleet"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# mosquitto_passwd's current format: $7$ = PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt
_PBKDF2_ITERATIONS = 101


def password_line(user: str, password: str, *, salt: bytes | None = None) -> str:
    """One line of a Mosquitto password file, as ``mosquitto_passwd -b`` writes it."""
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS)
    return (f"{user}:$7${_PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def acl_text(devices: Mapping[str, Sequence[str]], *, fleet_user: str = FLEET_USER) -> str:
    """Mosquitto ACL file for ``devices`` (name -> groups)."""
    r = TOPIC_ROOT
    lines = [f"# lorad fleet ACLs: {len(devices)} devices", f"user {fleet_user}", f"topic readwrite {r}/#", ""]
    for dev, groups in sorted(devices.items()):
        lines += [f"user {dev}",
                  f"topic read {r}/repo/#",
                  f"topic read {r}/all/offer",
                  *(f"topic read {r}/group/{g}/offer" for g in groups),
                  f"topic read {r}/device/{dev}/offer",
                  f"topic read {r}/device/{dev}/cmd",
                  f"topic write {r}/device/{dev}/status",
                  f"topic write {r}/device/{dev}/online",
                  ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class BrokerLayout:
    """What ``init_broker`` wrote; read back by :func:`load_broker`."""

    dir: Path
    host: str
    #: the devices' listener
    port: int
    devices: Mapping[str, tuple[str, ...]]
    fleet_user: str = FLEET_USER
    #: names in the server certificate; the first is what clients connect to
    server_names: tuple[str, ...] = ()
    #: the fleet tool's listener; 0 in a layout written before it had its own (one listener)
    fleet_port: int = 0

    @property
    def connect_host(self) -> str:
        """Where clients reach the broker (the listen address, unless it is a wildcard)."""
        if self.host in ("0.0.0.0", "::") and self.server_names:
            return self.server_names[0]
        return self.host

    @property
    def conf(self) -> Path:
        return self.dir / "mosquitto.conf"

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def cert(self, user: str) -> Path:
        return self.dir / "clients" / f"{user}.crt"

    def key(self, user: str) -> Path:
        return self.dir / "clients" / f"{user}.key"

    def password_file(self, user: str) -> Path:
        return self.dir / "clients" / f"{user}.password"

    def password(self, user: str) -> str:
        return self.password_file(user).read_text().strip()

    def port_of(self, user: str) -> int:
        """The port ``user`` connects to: the fleet listener for the fleet user, else the devices'."""
        return (self.fleet_port or self.port) if user == self.fleet_user else self.port

    def fleet_args(self) -> list[str]:
        """The ``--broker ... --password-file`` arguments of ``loractl fleet``."""
        u = self.fleet_user
        return ["--broker", f"{self.connect_host}:{self.port_of(u)}", "--ca", str(self.ca), "--cert", str(self.cert(u)),
                "--key", str(self.key(u)), "--username", u, "--password-file", str(self.password_file(u))]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer_key: ec.EllipticCurvePrivateKey,
          issuer: x509.Name | None, *, days: int, ca: bool = False,
          server_names: Sequence[str] = ()) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
    elif server_names:
        sans: list[x509.GeneralName] = []
        for n in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _conf(layout: BrokerLayout, *, max_packet: int, run_as: str) -> str:
    d = layout.dir.resolve()
    tls = (f"cafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\n"
           "require_certificate true\ntls_version tlsv1.2\n")
    return f"""\
# Mosquitto for a lorad fleet (loractl fleet broker init). Run: mosquitto -c {d}/mosquitto.conf
user {run_as}
per_listener_settings true
max_packet_size {max_packet}
persistence true
persistence_location {d}/
autosave_interval 1
log_dest file {d}/mosquitto.log
log_type error
log_type warning
set_tcp_nodelay true

# devices: the client id is the user name, so no device can take over another's session
listener {layout.port} {layout.host}
allow_anonymous false
use_username_as_clientid true
password_file {d}/passwd
acl_file {d}/acl
{tls}
# the fleet tool (the fleet user only; its connections keep their own client ids)
listener {layout.fleet_port} {layout.host}
allow_anonymous false
password_file {d}/fleet.passwd
acl_file {d}/acl
{tls}"""


def init_broker(directory: Path, devices: Mapping[str, Sequence[str]], *, host: str = "127.0.0.1",
                port: int = 8883, fleet_port: int | None = None, server_names: Sequence[str] = (),
                max_packet: int = 1 << 20, days: int = 365, fleet_user: str = FLEET_USER) -> BrokerLayout:
    """Write the broker directory for ``devices`` (name -> groups). Refuses to overwrite one.

    Devices connect to ``port``, the fleet tool to ``fleet_port`` (default ``port + 1``)."""
    directory = Path(directory)
    if (directory / "mosquitto.conf").exists():
        raise FileExistsError(f"{directory} already holds a broker configuration")
    if not devices:
        raise ValueError("no devices: give --devices N or --device NAME")
    for n in (fleet_user, *devices, *(g for gs in devices.values() for g in gs)):
        if not _NAME_RE.match(n):
            raise ValueError(f"name {n!r} must match {_NAME_RE.pattern}")
    if fleet_user in devices:
        raise ValueError(f"a device may not be called {fleet_user!r} (the fleet tool's user)")
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1..65535, got {port}")
    fleet_port = port + 1 if fleet_port is None else fleet_port
    if not 0 < fleet_port < 65536 or fleet_port == port:
        raise ValueError(f"fleet port must be 1..65535 and differ from the devices' port {port}, got {fleet_port}"
                         f"{' (give --fleet-port)' if fleet_port == 65536 else ''}")
    if not 4096 <= max_packet <= 268_435_455:
        raise ValueError(f"max packet size must be 4096..268435455 bytes, got {max_packet}")
    if days < 1:
        raise ValueError(f"certificate validity must be at least 1 day, got {days}")
    names = list(dict.fromkeys([*server_names, "localhost", "127.0.0.1",
                                *([host] if host not in ("0.0.0.0", "::") else [])]))
    layout = BrokerLayout(dir=directory, host=host, port=port, devices={d: tuple(g) for d, g in devices.items()},
                          fleet_user=fleet_user, server_names=tuple(names), fleet_port=fleet_port)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "clients").mkdir(mode=0o700, exist_ok=True)
    ca_key = _key()
    ca_pem = _cert("lorad-fleet-ca", ca_key, ca_key, None, days=days, ca=True)
    ca_name = x509.load_pem_x509_certificate(ca_pem).subject
    atomic_write_bytes(directory / "ca.key", _key_pem(ca_key), mode=0o600)
    atomic_write_bytes(layout.ca, ca_pem)
    srv_key = _key()
    atomic_write_bytes(directory / "server.key", _key_pem(srv_key), mode=0o600)
    atomic_write_bytes(directory / "server.crt",
                       _cert(names[0], srv_key, ca_key, ca_name, days=days, server_names=names))
    lines: dict[str, str] = {}
    for user in (fleet_user, *sorted(devices)):
        k = _key()
        atomic_write_bytes(layout.key(user), _key_pem(k), mode=0o600)
        atomic_write_bytes(layout.cert(user), _cert(user, k, ca_key, ca_name, days=days))
        password = secrets.token_hex(16)
        atomic_write_bytes(layout.password_file(user), password.encode() + b"\n", mode=0o600)
        lines[user] = password_line(user, password)
    # one password file per listener: a device's credentials do not open the fleet's, nor the reverse
    atomic_write_bytes(directory / "passwd", "".join(f"{lines[d]}\n" for d in sorted(devices)).encode(), mode=0o600)
    atomic_write_bytes(directory / "fleet.passwd", f"{lines[fleet_user]}\n".encode(), mode=0o600)
    atomic_write_bytes(directory / "acl", acl_text(layout.devices, fleet_user=fleet_user).encode())
    # mosquitto started as root drops to this user, which must be able to read the keys
    run_as = pwd.getpwuid(os.getuid()).pw_name
    atomic_write_bytes(layout.conf, _conf(layout, max_packet=max_packet, run_as=run_as).encode())
    atomic_write_bytes(directory / "broker.json", json.dumps(
        {"host": host, "port": port, "fleet_port": fleet_port, "fleet_user": fleet_user, "server_names": names,
         "devices": {d: list(g) for d, g in sorted(layout.devices.items())}}, indent=1).encode())
    return layout


def load_broker(directory: Path) -> BrokerLayout:
    """The layout :func:`init_broker` wrote in ``directory``."""
    p = Path(directory) / "broker.json"
    if not p.is_file():
        raise FileNotFoundError(f"{directory} holds no broker configuration (run `loractl fleet broker init`)")
    d = json.loads(p.read_bytes())
    return BrokerLayout(dir=Path(directory), host=str(d["host"]), port=int(d["port"]),
                        devices={k: tuple(v) for k, v in d["devices"].items()},
                        fleet_user=str(d.get("fleet_user", FLEET_USER)),
                        server_names=tuple(d.get("server_names", ())), fleet_port=int(d.get("fleet_port", 0)))


def device_ota_section(layout: BrokerLayout, device: str, *, trusted_root: str = "/etc/lorad/fleet-root.json",
                       etc: str = "/etc/lorad/mqtt") -> dict[str, Any]:
    """The ``ota:`` config section of ``device`` (files named where they are copied to)."""
    return {"ota": {
        "enabled": True, "device_id": device, "groups": list(layout.devices[device]),
        "trusted_root": trusted_root,
        "broker": {"host": layout.connect_host, "port": layout.port, "ca_file": f"{etc}/ca.crt",
                   "cert_file": f"{etc}/{device}.crt", "key_file": f"{etc}/{device}.key",
                   "username": device, "password_file": f"{etc}/{device}.password"}}}
