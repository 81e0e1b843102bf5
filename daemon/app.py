"""Wiring and lifecycle of the daemon process.

:meth:`Daemon.start` builds the parts from the config in dependency order and registers
each part's cleanup right after its setup, so :meth:`Daemon.stop` tears them down in
reverse order (collecting, not losing, errors) and is safe to call twice. The engine is
ready and every socket bound before systemd hears READY=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from lorad.adapters.engine import DEVICES
from lorad.adapters.errors import AdapterDamagedError, AdapterError
from lorad.adapters.fsutil import atomic_write_bytes, disk_full, free_bytes
from lorad.adapters.memory import one_arena, trim_now
from lorad.adapters.micro_batcher import make_batcher
from lorad.adapters.peft_format import read_peft_dir
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.request_cost import RequestLimits
from lorad.adapters.service import AdapterService
from lorad.daemon import auth
from lorad.daemon.config import ADDR_FILE, Config
from lorad.daemon.demo import demo_adapter_dirs
from lorad.daemon.generate_api import add_generate_routes
from lorad.daemon.http_api import ApiSettings, authenticated, make_app, protected
from lorad.daemon.http_framing import ApiRunner
from lorad.daemon.metrics import DaemonMetrics
from lorad.daemon.power import NoSource, PowerSampler, detect_source
from lorad.daemon.preflight import StartupError, model_file, open_engine, open_generator, text_front_end
from lorad.daemon.systemd import SystemdNotifier
from lorad.daemon.version import lorad_version
from lorad.trainer.errors import TrainerError

if TYPE_CHECKING:  # imported where used: only a daemon with the trainer on loads them
    from lorad.daemon.federated.supernode import SuperNodeProcess
    from lorad.daemon.training_api import TrainingDisabled
    from lorad.trainer.service import TrainerService

__all__ = ["Daemon", "BoundAddresses", "StartupError", "run"]

_log = logging.getLogger(__name__)

_SHUTDOWN_TIMEOUT_S = 10.0
#: Present once the demo adapters were installed, so that deleting one is not undone at the next start.
_DEMO_MARKER = "demo-adapters-installed"


@dataclass(frozen=True)
class BoundAddresses:
    url: str | None
    unix_socket: str | None

    def describe(self) -> str:
        return " and ".join(x for x in (self.url, f"unix:{self.unix_socket}" if self.unix_socket else None) if x)


class Daemon:
    """The lorad process: engine, registry, cache, service, HTTP sites, systemd."""

    def __init__(
        self,
        config: Config,
        *,
        metrics_registry: CollectorRegistry | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self._metrics_registry = metrics_registry if metrics_registry is not None else CollectorRegistry()
        self._notifier = SystemdNotifier(environ)
        self._stack = contextlib.AsyncExitStack()
        self._ready = False
        self.service: AdapterService | None = None
        self.addresses: BoundAddresses | None = None
        self._trainer: TrainerService | None = None
        #: Why the trainer is not running although enabled (None: it runs, or is off).
        self.training_disabled: TrainingDisabled | None = None
        self._metrics: DaemonMetrics | None = None
        #: The Flower SuperNode child (``federated:``), once started.
        self.supernode: SuperNodeProcess | None = None

    def is_ready(self) -> bool:
        return self._ready

    async def start(self) -> BoundAddresses:
        """Set up everything; on failure, what was set up is torn down before raising."""
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> BoundAddresses:
        cfg = self.config
        loop = asyncio.get_running_loop()
        _make_state_dir(cfg.state_dir)
        token = auth.ensure_token(cfg.server.token_file)
        supernode_exe = None
        if cfg.federated.enabled:  # Flower must be installed: say so before the model loads, not after
            from lorad.daemon.federated.supernode import find_supernode

            supernode_exe = find_supernode()
        self._notifier.status("loading the base model")

        executor = ThreadPoolExecutor(cfg.server.worker_threads, thread_name_prefix="lorad-worker")
        self._stack.callback(executor.shutdown, wait=True, cancel_futures=True)

        model_path = model_file(cfg)
        _log.info("loading model %r from %s (targets %s, slot rank %d, device %s)",
                  cfg.model.name, model_path, ", ".join(cfg.model.targets), cfg.model.rank, cfg.model.device)
        engine = await loop.run_in_executor(executor, open_engine, cfg)
        metrics = DaemonMetrics(self._metrics_registry, top_adapters=cfg.metrics.top_adapters)
        metrics.set_backend(engine.requested_device, engine.active_device)
        metrics.set_build_info(version=lorad_version(), ort_version=_ort_version(), backend=engine.active_device,
                               provider=DEVICES[engine.active_device])
        self._metrics = metrics
        power = self._start_power(metrics)

        # A decoder language model batches in its generation loop (one decode step for every
        # running generation); its /infer of token tensors runs one call per request.
        generator = await loop.run_in_executor(executor, open_generator, cfg, engine)
        if generator is not None:
            self._stack.callback(generator.close)
            metrics.watch_generator(generator.stats)
        batcher = None
        if cfg.server.batching.enabled and generator is None:
            batcher = await loop.run_in_executor(executor, functools.partial(
                make_batcher, engine, slots=cfg.server.batching.slots, max_wait_us=cfg.server.batching.max_wait_us,
                max_rows=cfg.server.max_batch_rows, cache_budget_bytes=cfg.cache.budget_bytes,
                inline_us=cfg.server.batching.inline_us))
            self._stack.callback(batcher.close)
            metrics.watch_batcher(batcher.counts)
        registry = AdapterRegistry(cfg.state_dir / "adapters")
        # Every caller (HTTP, the validation gate, OTA health checks, the audit) infers
        # through this service, and so through the batcher.
        service = AdapterService(
            engine,
            registry,
            cache_budget_bytes=cfg.cache.budget_bytes,
            model_name=cfg.model.name,
            on_cache_event=metrics.on_cache_event,
            text=text_front_end(cfg, engine),
            batcher=batcher,
            limits=RequestLimits(max_request_tokens=cfg.server.max_request_tokens, chunk_tokens=cfg.server.chunk_tokens,
                                 chunk_rows=cfg.server.chunk_rows),
        )
        metrics.watch_cache(lambda: service.cache.stats)
        self.service = service
        if cfg.model.path is None:
            await loop.run_in_executor(executor, _install_demo_adapters, service, cfg.state_dir / _DEMO_MARKER)
        trainer = await self._start_trainer(service, metrics, executor, power) if cfg.trainer.enabled else None
        self._trainer = trainer
        metrics.watch_state(cfg.state_dir, training_disabled=lambda: self.training_disabled)
        if cfg.ota.enabled:  # paho, tuf and cryptography load only for OTA
            from lorad.daemon.ota_wiring import start_ota

            await start_ota(
                cfg, service, self._stack, executor, metrics,
                epsilon=_epsilon_of(trainer) if trainer is not None else None,
                train_now=trainer.trigger if trainer is not None else None,
            )

        app = make_app(ApiSettings(
            service=service,
            metrics=metrics,
            token=token,
            executor=executor,
            max_request_bytes=cfg.server.max_request_bytes,
            ready=self.is_ready,
            max_batch_rows=cfg.server.max_batch_rows,
            large_requests=cfg.server.large_requests,
            queue_timeout_s=cfg.server.queue_timeout_s,
            training_disabled=lambda: self.training_disabled,
        ))
        add_generate_routes(app, service, generator, executor, default_max_tokens=cfg.generation.default_max_tokens,
                            model_version=engine.fingerprint.split(":", 1)[-1][:12])
        if trainer is not None:
            from lorad.daemon.training_api import add_training_routes

            add_training_routes(app, trainer, protected, authenticated, executor=executor)
        elif self.training_disabled is not None:
            from lorad.daemon.training_api import add_disabled_training_routes

            add_disabled_training_routes(app, self.training_disabled, protected, authenticated)
        if cfg.federated.enabled and trainer is not None:  # routes go in before runner.setup() freezes the app
            from lorad.daemon.federated.round_api import add_federated_routes

            add_federated_routes(app, trainer, cfg.federated, protected)
        # ApiRunner: HTTP parser errors answer the API's JSON error too (daemon/http_framing.py).
        runner = ApiRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)

        tcp = web.TCPSite(runner, cfg.server.host, cfg.server.port)
        await tcp.start()
        url = _url_of(runner.addresses[0])
        unix_path = None
        if cfg.server.unix_socket is not None:
            unix_path = str(cfg.server.unix_socket)
            await _start_unix_site(runner, cfg.server.unix_socket, cfg.server.unix_socket_mode)
            self._stack.callback(_unlink, cfg.server.unix_socket)

        # Before anyone hears of the address: the model's start-up copies are freed by now.
        await loop.run_in_executor(executor, trim_now)
        self.addresses = BoundAddresses(url=url, unix_socket=unix_path)
        addr_file = cfg.state_dir / ADDR_FILE
        addr_doc = {"url": url, "unix_socket": unix_path, "pid": os.getpid(), "model": cfg.model.name}
        try:
            atomic_write_bytes(addr_file, (json.dumps(addr_doc) + "\n").encode(), mode=0o644)
        except OSError as e:  # a full disk: serve anyway (loractl then needs --url)
            _log.error("could not write %s (%s); loractl needs --url %s", addr_file, e, url)
        self._stack.callback(_unlink, addr_file)
        if cfg.federated.enabled:  # the SuperNode hands the daemon's URL to its ClientApps
            self._start_supernode(metrics, trainer, url, supernode_exe)

        self._ready = True
        metrics.ready.set(1)
        self._stack.callback(self._not_ready, metrics)
        status = f"serving model {cfg.model.name!r} at {self.addresses.describe()} on {engine.active_device}"
        if engine.active_device != engine.requested_device:
            status += f" ({engine.requested_device} requested but not available)"
        self._notifier.ready(status)
        self._stack.callback(self._notifier.stopping)
        if trainer is not None and trainer.ledger.adapters():
            self._warm_accounting()
        self._notifier.start_watchdog(self.is_ready)
        self._stack.push_async_callback(self._notifier.stop_watchdog)
        _log.info("%s", status)
        _log.info("state directory %s; API token file %s; listening at %s", cfg.state_dir, cfg.server.token_file,
                  self.addresses.describe())
        return self.addresses

    def _start_power(self, metrics: DaemonMetrics) -> PowerSampler | None:
        """Sample the device's power source, or say once (log and metrics) why there is none."""
        cfg = self.config.power
        found = detect_source(cfg.source, sys_root=cfg.sys_root)
        if isinstance(found, NoSource):
            _log.info("power: no power source (%s); no power or energy series", found.reason)
            metrics.watch_power(found)
            return None
        sampler = PowerSampler(found, interval_s=cfg.sample_interval_s, training_active=self._training_active,
                               inference_busy_s=metrics.inference_busy_seconds)
        sampler.start()
        self._stack.callback(sampler.close)
        metrics.watch_power(sampler, limit_watts=cfg.limit_watts)
        _log.info("power: sampling %s every %g s", found.name, cfg.sample_interval_s)
        return sampler

    def _start_supernode(self, metrics: DaemonMetrics, trainer: TrainerService | None, url: str,
                         executable: Path | None) -> None:
        """Join the federation: the Flower SuperNode child, stopped on the exit stack. A trainer
        that could not start (:attr:`training_disabled`) keeps the device out, said once in
        the log and as ``lorad_federated_supernode_up 0``."""
        from lorad.daemon.federated.supernode import SuperNodeProcess

        cfg = self.config
        fed = cfg.federated
        if trainer is None:
            why = self.training_disabled.detail if self.training_disabled is not None else "the trainer is off"
            _log.error("federated: not joining the federation at %s: training is disabled (%s)", fed.superlink, why)
            metrics.watch_federated(up=lambda: False, restarts=lambda: 0)
            return
        if fed.insecure:
            _log.warning("federated: connecting to the SuperLink %s over plain HTTP (federated.insecure: true): "
                         "unencrypted, for tests and labs only", fed.superlink)
        supernode = SuperNodeProcess(fed, daemon_url=url, token_file=cfg.server.token_file,
                                     flwr_home=cfg.state_dir / "flower", executable=executable)
        supernode.start()
        self._stack.callback(supernode.stop)
        self.supernode = supernode
        metrics.watch_federated(up=lambda: supernode.running, restarts=lambda: supernode.restarts)

    def _warm_accounting(self) -> None:
        """Import dp_accounting (about 1 s of CPU) in the background once serving: ε of the
        runs already charged is asked for by /metrics, the privacy report and the OTA status,
        and a serving thread should not pay that import. A fresh ledger needs none."""
        from lorad.trainer.accountant import load_library

        warm = threading.Thread(target=load_library, name="lorad-warm-accounting", daemon=True)
        warm.start()
        self._stack.callback(warm.join)

    def _training_active(self) -> bool:
        trainer = self._trainer
        return trainer is not None and trainer.scheduler.status()["current"] is not None

    async def _start_trainer(self, service: AdapterService, metrics: DaemonMetrics, executor: ThreadPoolExecutor,
                             power: PowerSampler | None) -> TrainerService | None:
        """The trainer, or None (and :attr:`training_disabled` says why) when its state is
        damaged or the disk is full: fail safe, not closed. Serving never depends on the
        trainer's files; a damaged ledger must stop training (an empty one would
        under-count ε), not inference."""
        from lorad.daemon.training_api import TrainingDisabled
        from lorad.trainer.metrics import register_trainer_metrics
        from lorad.trainer.policy import RateMeter
        from lorad.trainer.service import TrainerService

        cfg = self.config
        free = free_bytes(cfg.state_dir)
        if free < _TRAINING_MIN_FREE_BYTES:
            self.training_disabled = TrainingDisabled("disk_full", (
                f"the filesystem of {cfg.state_dir} has {free} bytes free (training needs at least "
                f"{_TRAINING_MIN_FREE_BYTES} for examples, checkpoints and results); free space and restart the daemon"))
            _log.error("training is disabled, serving goes on: %s", self.training_disabled.detail,
                       extra={"LORAD_TRAINING_DISABLED": "disk_full"})
            return None
        try:
            trainer = await asyncio.get_running_loop().run_in_executor(executor, lambda: TrainerService(
                cfg.trainer, adapters=service, state_dir=cfg.state_dir,
                request_rate=RateMeter(metrics.inference_requests),
                power_watts=power.total_watts if power is not None else lambda: None,
                energy_joules=power.training_joules if power is not None else None,
                sys_root=cfg.power.sys_root,
                # The federation's adapter trains in its rounds only (no local or resumed runs).
                federated=(cfg.federated.adapter,) if cfg.federated.enabled else (),
            ))
        except (TrainerError, OSError, RuntimeError) as e:
            self.training_disabled = TrainingDisabled(_disabled_kind(e), str(e))
            _log.error("training is disabled, serving goes on: %s", e,
                       extra={"LORAD_TRAINING_DISABLED": self.training_disabled.kind})
            return None
        self._stack.callback(trainer.close)
        register_trainer_metrics(self._metrics_registry, trainer)
        trainer.start()
        return trainer

    def _not_ready(self, metrics: DaemonMetrics) -> None:
        self._ready = False
        metrics.ready.set(0)

    async def stop(self) -> None:
        """Tear down in reverse order of setup; a second call does nothing."""
        await self._stack.aclose()

    async def reload(self, load: Callable[[], Config]) -> bool:
        """SIGHUP: re-read the config and the adapters while requests keep being served.

        systemd hears ``RELOADING=1`` (with ``MONOTONIC_USEC``) first and ``READY=1`` when
        done, also when the new config is invalid: then the running config stays and the
        log names the bad key. Applied at once: ``log_level``, and adapters whose stored
        version changed on disk (dropped from the cache, so the next request loads the
        new version; requests holding the old one finish with it). Other changed
        sections are named in the log as taking effect at the next restart.
        """
        self._notifier.reloading()
        ok = False
        try:
            new = await asyncio.get_running_loop().run_in_executor(None, load)
        except ValueError as e:  # ConfigError: the message names the key
            _log.error("reload: the new configuration is invalid, keeping the running one: %s", e)
            status = "reload failed: invalid configuration (the running one stays)"
        else:
            logging.getLogger().setLevel(new.log_level)
            pending = [name for name in type(new).model_fields
                       if name != "log_level" and getattr(new, name) != getattr(self.config, name)]
            if pending:
                _log.warning("reload: changes to %s take effect at the next restart", ", ".join(pending))
            refreshed = (await asyncio.get_running_loop().run_in_executor(None, _refresh_adapters, self.service)
                         if self.service is not None else [])
            _log.info("reload: log level %s; adapters refreshed from disk: %s", new.log_level,
                      ", ".join(refreshed) if refreshed else "none changed")
            ok = True
            status = f"serving model {self.config.model.name!r} at {self.addresses.describe() if self.addresses else '?'} (reloaded)"
        if self._metrics is not None:
            self._metrics.reloads.labels(result="ok" if ok else "failed").inc()
        self._notifier.ready(status)
        return ok


async def run(config: Config, *, announce: bool = True, reload_config: Callable[[], Config] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully; SIGHUP reloads (``reload_config``)."""
    one_arena()  # before the worker, batcher and ONNX Runtime threads start
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hup = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    daemon = Daemon(config)
    try:
        addresses = await daemon.start()
        if announce:
            print(f"lorad: serving model {config.model.name!r} at {addresses.describe()}", flush=True)
        while not stop.is_set():
            stopping = asyncio.ensure_future(stop.wait())
            hupped = asyncio.ensure_future(hup.wait())
            await asyncio.wait({stopping, hupped}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            hupped.cancel()
            if hup.is_set() and not stop.is_set():
                hup.clear()
                await daemon.reload(reload_config or (lambda: config))
        _log.info("signal received: stopping")
    finally:
        await daemon.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def _refresh_adapters(service: AdapterService) -> list[str]:
    """Drop cached adapters whose stored version is no longer the current one (changed
    or deleted by another process); pinned ones are pinned again at the new version."""
    changed = []
    for entry in service.cache.entries():
        try:
            current = service.registry.current_version(entry.name)
        except AdapterDamagedError as e:  # dropped, not served again until repaired
            _log.warning("reload: %s", e)
            current = None
        if current == entry.version:
            continue
        service.cache.discard(entry.name)
        changed.append(entry.name)
        if entry.pinned and current is not None:
            try:
                service.pin(entry.name)
            except (AdapterError, ValueError) as e:
                _log.warning("reload: adapter %r could not be pinned again: %s", entry.name, e)
    return changed


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


#: Below this much free space at start the trainer stays off (it would only fail its writes).
_TRAINING_MIN_FREE_BYTES = 16 << 20


def _disabled_kind(e: BaseException) -> str:
    """The public name of why the trainer could not start (its message names files)."""
    if disk_full(e) or "filesystem is full" in str(e):
        return "disk_full"
    text = str(e)
    if text.startswith("example store") or text.startswith("cannot open example store"):
        return "examples_damaged"
    if text.startswith("privacy ledger") or "privacy ledger" in text.split(";")[0]:
        return "ledger_damaged"
    return "state_unreadable"


def _epsilon_of(trainer: TrainerService) -> Callable[[str], float | None]:
    """ε spent per adapter for the OTA status; None for an adapter never trained here."""

    def epsilon(adapter: str) -> float | None:
        state = trainer.privacy_state(adapter)
        trained = state.get("runs") or state.get("ledger_missing_runs")  # a lost ledger still reports ε
        return float(state["epsilon_spent"]) if trained else None

    return epsilon


def _make_state_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def _install_demo_adapters(service: AdapterService, marker: Path) -> None:
    """Give a fresh state directory the demo adapters, once; never replace a stored version."""
    if marker.exists():
        return
    for name, directory in demo_adapter_dirs().items():
        if service.registry.current_version(name) is not None:
            continue
        try:
            info = service.upload(name, read_peft_dir(directory), meta={"source": "demo"})
        except (AdapterError, ValueError) as e:
            _log.warning("demo adapter %r not installed: %s", name, e)
            continue
        _log.info("installed demo adapter %r as version %d", name, info.version)
    atomic_write_bytes(marker, b"", mode=0o644)


def _url_of(sockname: object) -> str:
    if not isinstance(sockname, tuple):
        raise RuntimeError(f"unexpected TCP socket address {sockname!r}")
    host, port = str(sockname[0]), int(sockname[1])
    # A wildcard bind is reachable on loopback, which is what local clients need.
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def _start_unix_site(runner: web.AppRunner, path: Path, mode: int) -> None:
    _remove_stale_socket(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The socket file is created by bind(); a tight umask keeps it private until chmod.
    old = os.umask(0o177)
    try:
        await web.UnixSite(runner, str(path)).start()
    finally:
        os.umask(old)
    os.chmod(path, mode)


def _remove_stale_socket(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"server.unix_socket {str(path)!r} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left over from a crash
        return
    finally:
        probe.close()
    raise RuntimeError(f"server.unix_socket {str(path)!r} is in use by another process")


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
