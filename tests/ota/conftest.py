"""A real Mosquitto for the ota tests: mutual TLS with generated certificates, a password
file, ACLs (a device reads only its own, its groups' and the repository's topics and
writes only its own status) and a ``max_packet_size``. One broker per test session on a
free loopback port; ``broker.restart()`` stops and starts it on the same port.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Mapping

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from adapters.lora import LoraAdapter, LoraWeights
from ota.target import ProbeSet
from ota.transport import MqttConfig, MqttTransport

MOSQUITTO = Path("/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = Path("/usr/bin/mosquitto_passwd")
MAX_PACKET = 16 * 1024  # small on purpose: payloads must be chunked to pass
#: device -> groups, as the ACL file grants them
DEVICES = {"dev1": ("east",), "dev2": ("west",), "dev3": ("east", "lab")}
FLEET_USER = "fleet"


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
    max_packet: int = MAX_PACKET
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
               will: tuple[str, bytes] | None = None, password: str | None = None) -> MqttConfig:
        return MqttConfig(host="127.0.0.1", port=self.port,
                          client_id=client_id or f"{user}-{uuid.uuid4().hex[:8]}",
                          ca_file=self.ca, cert_file=self.dir / f"{user}.crt",
                          key_file=self.dir / f"{user}.key", username=user,
                          password=self.passwords[user] if password is None else password,
                          timeout_s=timeout_s, will=will)

    def connect(self, user: str, **kw: object) -> MqttTransport:
        t = MqttTransport(self.config(user, **kw))  # type: ignore[arg-type]
        t.connect()
        self.transports.append(t)
        return t

    def clear_retained(self) -> None:
        """Forget every retained message (a test starts from an empty repository)."""
        self.stop()
        for p in self.dir.glob("*.db"):
            p.unlink()
        self.start()


def _acl(devices: dict[str, tuple[str, ...]]) -> str:
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


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if not MOSQUITTO.exists() or not MOSQUITTO_PASSWD.exists():
        pytest.fail("mosquitto is not installed (.ci/setup installs the Debian package)")
    d = tmp_path_factory.mktemp("mosquitto")
    ca_key = _key()
    ca = _cert("lorad-test-ca", ca_key, ca_key, None, ca=True)
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    srv_key = _key()
    _write_key(d / "server.key", srv_key)
    (d / "server.crt").write_bytes(
        _cert("localhost", srv_key, ca_key, ca.subject, server=True).public_bytes(serialization.Encoding.PEM))
    users = [FLEET_USER, *DEVICES]
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
    (d / "acl").write_text(_acl(DEVICES))
    port = _free_port()
    (d / "mosquitto.conf").write_text(f"""\
user {os.environ.get("USER") or "root"}
per_listener_settings false
allow_anonymous false
password_file {pw}
acl_file {d / "acl"}
max_packet_size {MAX_PACKET}
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
""")
    b = Broker(dir=d, port=port, ca=d / "ca.crt", passwords=passwords)
    b.start()
    try:
        yield b
    finally:
        for t in b.transports:
            t.close()
        b.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mqtt(broker: Broker) -> Iterator[Broker]:
    """The session broker, emptied of retained messages, with this test's clients closed after."""
    broker.clear_retained()
    start = len(broker.transports)
    yield broker
    for t in broker.transports[start:]:
        t.close()
    del broker.transports[start:]


# --- in-memory adapter service and test adapters ----------------------------------------


FINGERPRINT = "sha256:" + "ab" * 32
DIM = 8


def make_adapter(seed: int, *, fingerprint: str = FINGERPRINT, rank: int = 2) -> LoraAdapter:
    rng = np.random.default_rng(seed)
    return LoraAdapter(rank=rank, alpha=4.0, base_fingerprint=fingerprint, weights={
        w: LoraWeights(A=rng.standard_normal((DIM, rank)).astype(np.float32),
                       B=rng.standard_normal((rank, DIM)).astype(np.float32))
        for w in ("layers.0.q.weight", "layers.0.v.weight")})


def reference_outputs(adapter: LoraAdapter | None, x: np.ndarray) -> dict[str, np.ndarray]:
    """What the memory sink 'serves': x·Σ scale·A·B (a stand-in for the base model + LoRA)."""
    y = np.zeros((x.shape[0], DIM), np.float32)
    if adapter is not None:
        for w in adapter.weights.values():
            y += adapter.scale * (x @ w.A) @ w.B
    return {"y": y}


def probes_for(adapter: LoraAdapter) -> ProbeSet:
    x = np.linspace(-1, 1, 2 * DIM, dtype=np.float32).reshape(2, DIM)
    return ProbeSet(inputs={"x": x}, outputs=reference_outputs(adapter, x), atol=1e-3, rtol=1e-3)


class MemorySink:
    """AdapterService stand-in: versioned adapters per name, install/rollback/infer."""

    def __init__(self) -> None:
        self.versions: dict[str, list[LoraAdapter]] = {}
        self.current: dict[str, int] = {}
        self.installs: list[tuple[str, int, Mapping[str, object]]] = []
        self.fail_install = False
        self.corrupt_serving = False

    def install(self, name: str, adapter: LoraAdapter, *, meta: Mapping[str, object] = {}) -> Any:
        if self.fail_install:
            raise ValueError("simulated refusal")
        self.versions.setdefault(name, []).append(adapter)
        self.current[name] = len(self.versions[name])
        self.installs.append((name, self.current[name], dict(meta)))
        return SimpleNamespace(name=name, version=self.current[name])

    def rollback(self, name: str, version: int) -> Any:
        assert 1 <= version <= len(self.versions[name])
        self.current[name] = version
        return SimpleNamespace(name=name, version=version)

    def delete(self, name: str) -> None:
        self.current.pop(name, None)

    def serving(self, name: str) -> LoraAdapter | None:
        v = self.current.get(name)
        return None if v is None else self.versions[name][v - 1]

    def infer(self, inputs: Mapping[str, np.ndarray], adapter: str | None = None) -> Any:
        a = self.serving(adapter) if adapter else None
        out = reference_outputs(a, inputs["x"])
        if self.corrupt_serving:
            out = {k: v + 1.0 for k, v in out.items()}
        return SimpleNamespace(outputs=out, adapter=adapter,
                               version=self.current.get(adapter) if adapter else None)

    def list_adapters(self) -> list[Any]:
        return [SimpleNamespace(name=n, version=v) for n, v in self.current.items()]


class Clock:
    """A settable clock for both sides: ``now()`` for devices, ``dt()`` for the fleet."""

    def __init__(self) -> None:
        self.t = float(int(datetime.datetime.now(datetime.timezone.utc).timestamp()))

    def now(self) -> float:
        return self.t

    def dt(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.t, datetime.timezone.utc)

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def kit() -> SimpleNamespace:
    """Helpers shared by the ota tests (test modules cannot import conftest)."""
    return SimpleNamespace(make_adapter=make_adapter, probes_for=probes_for, MemorySink=MemorySink,
                           Clock=Clock, FINGERPRINT=FINGERPRINT, reference_outputs=reference_outputs)
