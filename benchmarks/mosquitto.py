"""A real Mosquitto on a free loopback port, as a fleet's broker would be set up: mutual
TLS with generated certificates (one CA, a server certificate, one client certificate
per user), a password file, ACLs (a device reads only its own, its groups' and the
repository's topics and writes only its own status) and a ``max_packet_size``.

Used by ``benchmarks/ota.py`` and by the ``broker`` fixture of ``tests/ota/conftest.py``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ota.transport import MqttConfig, MqttTransport

__all__ = ["MOSQUITTO", "MOSQUITTO_PASSWD", "DEVICES", "FLEET_USER", "Broker", "create_broker", "available"]

MOSQUITTO = Path("/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = Path("/usr/bin/mosquitto_passwd")
#: device -> groups, as the ACL file grants them
DEVICES: Mapping[str, tuple[str, ...]] = {"dev1": ("east",), "dev2": ("west",), "dev3": ("east", "lab")}
FLEET_USER = "fleet"


def available() -> bool:
    return MOSQUITTO.exists() and MOSQUITTO_PASSWD.exists()


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer_key: ec.EllipticCurvePrivateKey,
          issuer: x509.Name | None, *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
    return b.sign(issuer_key, hashes.SHA256())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """A running Mosquitto and the credentials of every user it knows."""

    dir: Path
    port: int
    ca: Path
    passwords: dict[str, str]
    max_packet: int
    devices: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEVICES))
    proc: subprocess.Popen[bytes] | None = None
    transports: list[MqttTransport] = field(default_factory=list)

    def start(self) -> None:
        log = open(self.dir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([str(MOSQUITTO), "-c", str(self.dir / "mosquitto.conf")],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("mosquitto exited: " + (self.dir / "mosquitto.log").read_text()[-2000:])
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not open its port within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # clean stop: retained messages are saved
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, *, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def config(self, user: str, *, client_id: str | None = None, timeout_s: float = 5.0,
               will: tuple[str, bytes] | None = None, password: str | None = None,
               max_packet_size: int = 1 << 20) -> MqttConfig:
        return MqttConfig(host="127.0.0.1", port=self.port,
                          client_id=client_id or f"{user}-{uuid.uuid4().hex[:8]}",
                          ca_file=self.ca, cert_file=self.dir / f"{user}.crt",
                          key_file=self.dir / f"{user}.key", username=user,
                          password=self.passwords[user] if password is None else password,
                          timeout_s=timeout_s, will=will, max_packet_size=max_packet_size)

    def connect(self, user: str, *, client_id: str | None = None, timeout_s: float = 5.0,
                will: tuple[str, bytes] | None = None, password: str | None = None) -> MqttTransport:
        t = MqttTransport(self.config(user, client_id=client_id, timeout_s=timeout_s, will=will,
                                      password=password))
        t.connect()
        self.transports.append(t)
        return t

    def password_file(self, user: str) -> Path:
        """A file holding ``user``'s password (what configs and ``--password-file`` name)."""
        p = self.dir / f"{user}.password"
        if not p.exists():
            p.touch(mode=0o600)
            p.write_text(self.passwords[user])
        return p

    def clear_retained(self) -> None:
        """Forget every retained message (start from an empty repository)."""
        self.stop()
        for p in self.dir.glob("*.db"):
            p.unlink()
        self.start()

    def close(self) -> None:
        """Close every transport opened through :meth:`connect`, then stop the broker."""
        for t in self.transports:
            t.close()
        self.transports.clear()
        self.stop()


def _acl(devices: Mapping[str, tuple[str, ...]]) -> str:
    lines = [f"user {FLEET_USER}", "topic readwrite lorad/v1/#", ""]
    for dev, groups in devices.items():
        lines.append(f"user {dev}")
        lines += [f"topic read lorad/v1/group/{g}/#" for g in groups]
        lines.append("")
    lines += [
        "pattern read lorad/v1/repo/#",
        "pattern read lorad/v1/all/#",
        "pattern read lorad/v1/device/%u/cmd",
        "pattern read lorad/v1/device/%u/offer",
        "pattern readwrite lorad/v1/device/%u/status",
        "pattern readwrite lorad/v1/device/%u/online",
    ]
    return "\n".join(lines) + "\n"


def create_broker(d: Path, *, max_packet: int, devices: Mapping[str, tuple[str, ...]] = DEVICES) -> Broker:
    """Generate the CA, certificates, passwords and ACLs in ``d`` and start Mosquitto."""
    if not available():
        raise RuntimeError(f"mosquitto is not installed ({MOSQUITTO}; .ci/setup installs the Debian package)")
    d.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _cert("lorad-test-ca", ca_key, ca_key, None, ca=True)
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    srv_key = _key()
    _write_key(d / "server.key", srv_key)
    (d / "server.crt").write_bytes(
        _cert("localhost", srv_key, ca_key, ca.subject, server=True).public_bytes(serialization.Encoding.PEM))
    users = [FLEET_USER, *devices]
    passwords = {u: uuid.uuid4().hex for u in users}
    for u in users:
        k = _key()
        _write_key(d / f"{u}.key", k)
        (d / f"{u}.crt").write_bytes(_cert(u, k, ca_key, ca.subject).public_bytes(serialization.Encoding.PEM))
    pw = d / "passwd"
    pw.touch(mode=0o600)
    for u in users:
        subprocess.run([str(MOSQUITTO_PASSWD), "-b", str(pw), u, passwords[u]], check=True,
                       capture_output=True, timeout=30)
    (d / "acl").write_text(_acl(devices))
    port = _free_port()
    (d / "mosquitto.conf").write_text(f"""\
user {os.environ.get("USER") or "root"}
per_listener_settings false
allow_anonymous false
password_file {pw}
acl_file {d / "acl"}
max_packet_size {max_packet}
persistence true
persistence_location {d}/
autosave_interval 1
log_dest file {d / "mosquitto.log"}
log_type error
log_type warning
listener {port} 127.0.0.1
cafile {d / "ca.crt"}
certfile {d / "server.crt"}
keyfile {d / "server.key"}
require_certificate true
tls_version tlsv1.2
set_tcp_nodelay true
""")
    b = Broker(dir=d, port=port, ca=d / "ca.crt", passwords=passwords, max_packet=max_packet,
               devices=dict(devices))
    b.start()
    return b
