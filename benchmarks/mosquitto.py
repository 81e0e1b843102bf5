"""A real Mosquitto on two free loopback ports (the devices' listener and the fleet tool's),
set up by ``loractl fleet broker init`` (:mod:`lorad.ota.broker_setup`: mutual TLS with
generated certificates, a password file per listener, ACLs for exactly lorad's topics and a
``max_packet_size``), started and stopped here.

Used by ``benchmarks/ota.py`` and by the ``broker`` fixture of ``tests/ota/conftest.py``.
"""

from __future__ import annotations

import contextlib
import io
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lorad.ota.broker_setup import FLEET_USER, BrokerLayout, load_broker
from lorad.ota.transport import MqttConfig, MqttTransport

__all__ = ["MOSQUITTO", "DEVICES", "FLEET_USER", "Broker", "create_broker", "available"]

MOSQUITTO = Path("/usr/sbin/mosquitto")
#: device -> groups, as the ACL file grants them
DEVICES: Mapping[str, tuple[str, ...]] = {"dev1": ("east",), "dev2": ("west",), "dev3": ("east", "lab")}


def available() -> bool:
    return MOSQUITTO.exists()


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all held open while they are picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


@dataclass
class Broker:
    """A running Mosquitto and the credentials of every user it knows."""

    dir: Path
    #: the devices' listener (the fleet user connects to ``layout.port_of(FLEET_USER)``)
    port: int
    ca: Path
    passwords: dict[str, str]
    max_packet: int
    layout: BrokerLayout
    devices: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEVICES))
    proc: subprocess.Popen[bytes] | None = None
    transports: list[MqttTransport] = field(default_factory=list)

    def start(self) -> None:
        log = open(self.dir / "mosquitto.log", "ab")  # noqa: SIM115 - the broker child writes it while it runs
        self.proc = subprocess.Popen([str(MOSQUITTO), "-c", str(self.dir / "mosquitto.conf")],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        waiting = {self.port, self.layout.port_of(self.layout.fleet_user)}  # devices' and fleet's listeners
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("mosquitto exited: " + (self.dir / "mosquitto.log").read_text()[-2000:])
            for port in sorted(waiting):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    waiting.discard(port)
                except OSError:
                    pass
            if not waiting:
                return
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not open its ports {sorted(waiting)} within 10 s")

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
        return MqttConfig(host="127.0.0.1", port=self.layout.port_of(user),
                          client_id=client_id or f"{user}-{uuid.uuid4().hex[:8]}",
                          ca_file=self.ca, cert_file=self.layout.cert(user),
                          key_file=self.layout.key(user), username=user,
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
        return self.layout.password_file(user)

    def cert(self, user: str) -> Path:
        return self.layout.cert(user)

    def key(self, user: str) -> Path:
        return self.layout.key(user)

    def fleet_args(self) -> list[str]:
        """``--broker ... --password-file ...`` for ``loractl fleet`` as the fleet user."""
        return self.layout.fleet_args()

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


def create_broker(d: Path, *, max_packet: int, devices: Mapping[str, tuple[str, ...]] = DEVICES) -> Broker:
    """``loractl fleet broker init d`` for ``devices`` on a free port, then start Mosquitto."""
    if not available():
        raise RuntimeError(f"mosquitto is not installed ({MOSQUITTO}; .ci/setup installs the Debian package)")
    from lorad.ota.cli import main  # the operator's command, as the README walks through it

    port, fleet_port = _free_ports(2)
    argv = ["fleet", "broker", "init", str(d), "--port", str(port), "--fleet-port", str(fleet_port),
            "--max-packet", str(max_packet),
            "--days", "2", "--quiet"]
    for dev, groups in devices.items():
        argv += ["--device", f"{dev}={','.join(groups)}" if groups else dev]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"loractl fleet broker init {d} failed: {out.getvalue()[-2000:]}")
    layout = load_broker(d)
    b = Broker(dir=d, port=port, ca=layout.ca, max_packet=max_packet, layout=layout,
               passwords={u: layout.password(u) for u in (layout.fleet_user, *layout.devices)},
               devices=dict(layout.devices))
    b.start()
    return b
