"""The device side of OTA inside the daemon: transport, client, commands, status, metrics.

:func:`start_ota` is called by :class:`lorad.daemon.app.Daemon` once the adapter service
exists. It registers each teardown on the daemon's exit stack right after the setup it
undoes, so they run in reverse: the status thread stops, the OTA worker finishes its
cycle, the device says ``offline`` (the broker's Last Will says it for an unclean exit),
the connection closes.

No silent fallback: a broker that cannot be reached is logged once per outage and shown
as ``lorad_ota_connected 0`` in ``/metrics``; the daemon keeps serving, paho keeps
reconnecting, and the client subscribes (and catches up on retained offers) as soon as
the broker answers. Bad local material (trusted root, TLS files, password file) stops
the start with a message naming the config key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass

from lorad.adapters.service import AdapterService
from lorad.daemon.config import Config
from lorad.daemon.metrics import DaemonMetrics
from lorad.daemon.preflight import ota_transport, read_ota_material
from lorad.ota.client import OtaClient, UpdateResult
from lorad.ota.config import ClientConfig, OtaConfig, OtaPolicy
from lorad.ota.errors import TransportError
from lorad.ota.metrics import OtaMetrics
from lorad.ota.transport import MqttTransport
from lorad.trainer.errors import PrivacyBudgetExceededError
from lorad.trainer.policy import SystemProbe
from lorad.trainer.scheduler import TrainingConflictError
from lorad.trainer.service import TrainingUnavailableError

__all__ = ["OtaRuntime", "start_ota", "install_gate"]

_log = logging.getLogger(__name__)
#: How long the start waits for the first connection before serving without it.
_FIRST_CONNECT_WAIT_S = 3.0
_TICK_S = 0.5


@dataclass(frozen=True)
class OtaRuntime:
    """What :func:`start_ota` started (tests and the integrator's wiring read it)."""

    client: OtaClient
    transport: MqttTransport
    metrics: OtaMetrics


async def start_ota(
    cfg: Config,
    service: AdapterService,
    stack: contextlib.AsyncExitStack,
    executor: Executor,
    metrics: DaemonMetrics,
    *,
    epsilon: Callable[[str], float | None] | None = None,
    train_now: Callable[[str], object] | None = None,
) -> OtaRuntime | None:
    """Start OTA if ``ota.enabled``; None otherwise.

    ``epsilon(adapter)`` is the ε spent on an adapter (None if it was never trained here),
    reported in the device status; ``train_now(adapter)`` runs when the fleet sends a
    signed ``train_now`` command. Without them the status has no ε and the command fails
    with "this device has no trainer".
    """
    ota: OtaConfig = cfg.ota
    if not ota.enabled:
        return None
    loop = asyncio.get_running_loop()
    transport, client_cfg = await loop.run_in_executor(
        executor, _build_transport, cfg, service.engine.fingerprint)
    stack.callback(transport.close)
    ota_metrics = OtaMetrics(metrics.registry)
    where = f"mqtts://{ota.broker.host}:{ota.broker.port}"

    def on_result(r: UpdateResult) -> None:
        ota_metrics.on_result(r)
        if r.result == "installed":
            # Extra fields become journald fields (LORAD_ADAPTER=...) under systemd.
            _log.info("OTA: installed adapter %r version %s from %s", r.adapter, r.version, where,
                      extra={"LORAD_ADAPTER": r.adapter, "LORAD_VERSION": r.version, "LORAD_SOURCE": where})

    client = OtaClient(client_cfg, transport, service,
                       epsilon=None if epsilon is None else _epsilon_of(service, epsilon),
                       on_result=on_result, on_command=ota_metrics.on_command,
                       install_gate=install_gate(ota.policy, SystemProbe()))
    ota_metrics.watch(connected=lambda: transport.connected, fetched_bytes=lambda: client.reader.bytes_received,
                      refusals=lambda: transport.refusals)
    stack.callback(_say_offline, client, transport)
    recovered = await loop.run_in_executor(executor, client.recover)
    if recovered is not None:
        _log.warning("OTA: %s", recovered.message)
    client.attach_commands(service, train_now=None if train_now is None else _train_now_of(train_now),
                           max_age_s=ota.command_max_age_s)
    stack.callback(client.close)
    supervisor = _Supervisor(client, transport, ota)
    connected = await loop.run_in_executor(executor, supervisor.first_start)
    supervisor.start()
    stack.callback(supervisor.stop)
    if connected:
        _log.info("OTA: device %r (groups %s) connected to %s", ota.device_id, list(ota.groups), where)
    return OtaRuntime(client=client, transport=transport, metrics=ota_metrics)


def _build_transport(cfg: Config, base_fingerprint: str) -> tuple[MqttTransport, ClientConfig]:
    ota = cfg.ota
    material = read_ota_material(ota)
    transport = ota_transport(ota, material)
    client_cfg = ota.client_config(state_dir=cfg.state_dir / "ota", trusted_root=material.trusted_root,
                                   base_fingerprint=base_fingerprint)
    transport.start()
    return transport, client_cfg


def install_gate(policy: OtaPolicy, probe: SystemProbe) -> Callable[[], str | None] | None:
    """Why an install must wait now (busy, on battery), from the trainer's probes; None
    when the policy asks for neither. (ota does not import trainer: it gets this.)"""
    if not policy.install_when_idle and not policy.install_on_external_power:
        return None

    def why() -> str | None:
        if policy.install_on_external_power and not probe.on_external_power():
            return "on battery (ota.policy.install_on_external_power)"
        load = probe.load_per_cpu() if policy.install_when_idle else None
        if load is not None and load > policy.idle_max_load_per_cpu:
            return (f"busy: load {load:.2f} per CPU above {policy.idle_max_load_per_cpu:g} "
                    f"(ota.policy.install_when_idle)")
        return None
    return why


def _epsilon_of(service: AdapterService, epsilon: Callable[[str], float | None]) -> Callable[[], Mapping[str, float]]:
    def spent() -> dict[str, float]:
        out = {}
        for info in service.list_adapters():
            e = epsilon(info.name)
            if e is not None:
                out[info.name] = float(e)
        return out
    return spent


def _train_now_of(train_now: Callable[[str], object]) -> Callable[[str | None], None]:
    """The fleet's ``train_now``. What goes back to the broker is the privacy boundary's
    public side: a refusal computed from public state (budget spent per the public ledger,
    a run already in progress, no training on this device) is said as it is; any other
    reason may come from the stored examples, so the fleet hears only that the device
    refused, and the device's log has the details."""
    def run(adapter: str | None) -> None:
        if adapter is None:
            raise ValueError("train_now needs an adapter name on this device")
        try:
            train_now(adapter)
        except (PrivacyBudgetExceededError, TrainingConflictError, TrainingUnavailableError):
            raise
        except Exception as e:
            _log.warning("OTA: train_now of adapter %r refused: %s", adapter, e)
            raise TrainNowRefusedError(
                f"the device did not start a run of {adapter!r}; the reason is private to the device "
                "(loractl train ADAPTER --status on the device, or its log)") from None
    return run


class TrainNowRefusedError(RuntimeError):
    """A fleet ``train_now`` refused for a reason that stays on the device."""


def _say_offline(client: OtaClient, transport: MqttTransport) -> None:
    if not transport.connected:
        return  # the broker already holds "offline" (Last Will) or never heard of us
    try:
        client.status.offline()
    except TransportError as e:
        _log.warning("OTA: offline status not published: %s", e)


class _Supervisor:
    """Starts the client once the broker answers; republishes status periodically and
    after every reconnect; logs each loss of the broker once."""

    def __init__(self, client: OtaClient, transport: MqttTransport, cfg: OtaConfig) -> None:
        self._client = client
        self._t = transport
        self._cfg = cfg
        self._where = f"mqtts://{cfg.broker.host}:{cfg.broker.port}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._was_connected = False
        self._next_status = 0.0

    def first_start(self) -> bool:
        """Wait briefly for the first connection and start the client; False if not reached."""
        if self._t.wait_connected(min(_FIRST_CONNECT_WAIT_S, self._cfg.broker.timeout_s)):
            self._was_connected = True
            self._try_start()
        if not self._started:
            self._log_down()
        return self._started

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lorad-ota-status", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _log_down(self) -> None:
        _log.warning("OTA: not connected to the fleet broker %s (%s); serving continues, reconnecting "
                     "in the background", self._where, self._t.last_error or "no answer yet")

    def _try_start(self) -> None:
        try:
            self._client.start()
        except TransportError as e:
            _log.info("OTA: start postponed: %s", e)
            return
        self._started = True
        self._next_status = time.monotonic() + self._cfg.status_interval_s

    def _run(self) -> None:
        while not self._stop.wait(_TICK_S):
            up = self._t.connected
            if up != self._was_connected:
                self._was_connected = up
                if not up:
                    self._log_down()
                    continue
                _log.info("OTA: connected to %s", self._where)
                self._next_status = 0.0  # say online again: the Will may have said offline
            if not up:
                continue
            if not self._started:
                self._try_start()
            elif time.monotonic() >= self._next_status:
                self._next_status = time.monotonic() + self._cfg.status_interval_s
                self._client.publish_online()  # a refusal is logged once and counted
                self._client.publish_status()
