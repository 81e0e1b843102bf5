"""OTA benchmark: signed adapter updates over a real local Mosquitto into a real AdapterService.

The benchmark starts its own broker (:mod:`benchmarks.mosquitto`: mutual TLS, passwords,
ACLs) and puts a counting TCP proxy between it and the device, so ``bytes_on_wire`` is
what crossed the device's socket (TLS records and all MQTT traffic: offer, index,
TUF metadata, payload chunks) and the proxy can cut the connection mid-transfer.
Fleet side: :class:`lorad.ota.repository.FleetRepository` (what ``loractl fleet publish``
runs). Device side: :class:`lorad.ota.client.OtaClient` reacting to offers, installing into an
:class:`lorad.adapters.service.AdapterService` on the reference encoder
(:func:`benchmarks.reference_encoder.build_reference_encoder`, LoRA slots on
REFERENCE_TARGETS).

- ``ota_e2e_ms``: from signing a ~1 MB adapter (rank 24, fp32, zstd) through push,
  offer, TUF refresh, chunk fetch, verification, install, health check to the first
  inference that answers with the new version (median over versions);
- ``verify_ms_per_mb``: signature checks of timestamp/snapshot/targets plus every
  digest (chunks, payload, reconstructed adapter) per MB of payload;
- ``bytes_on_wire`` / ``wire_ratio_vs_base_model``: a realistic update of a rank-8
  adapter, a new version trained in frozen-A mode (A unchanged, B differs) sent as a
  delta against the installed version in fp16 with zstd, with its health-check probe set;
- ``resume_refetch_ratio``: the connection is cut when half of a transfer's chunks are
  stored; bytes received after the reconnect / payload bytes;
- ``bytes_on_wire_per_device``: what one device's socket carried for that rank-8 delta
  (the full payload is signed too, as the fallback, but only the delta is fetched);
- ``rollout_100_devices_s``: ``create_rollout`` and ``RolloutDriver`` (what ``loractl
  fleet rollout create/run`` run) taking 100 simulated devices (their own TLS connection
  and OtaClient each, an in-memory adapter sink) on one broker through stages
  5%,25%,100% with a minimum wait per stage; the goal is at most twice the sum of the
  stages' minimum waits (the tool, not the gates, is never the limit).

    .venv/bin/python -m benchmarks.ota [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load import LoadWatch
from benchmarks.mosquitto import Broker, create_broker
from benchmarks.reference_encoder import REFERENCE_TARGETS, build_reference_encoder
from benchmarks.timing import median_seconds
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService
from lorad.ota.client import ClientConfig, OtaClient
from lorad.ota.files import RepoIndex
from lorad.ota.repository import FleetRepository
from lorad.ota.status import will_for
from lorad.ota.target import Audience, ProbeSet, TargetSpec, reconstruct
from lorad.ota.transport import MqttTransport

SLOT_RANK = 24  # 12 targets x (in + out) x 24 x 4 bytes = 1.03 MB: the "1 MB adapter"
WIRE_RANK = 8
CHUNK = 64 * 1024
RESUME_CHUNK = 16 * 1024
MAX_PACKET = 256 * 1024
EAST = Audience(groups=("east",))
_WAIT_S = 60.0


class _Proxy:
    """TCP relay on loopback that counts bytes towards the client and can cut every link.

    A cut ends the broker's side at once (it publishes the Last Will) and closes the
    client's side after what was already relayed, as a link that dies leaves the bytes
    the device had received: the device reads them, sees the end and reconnects.
    """

    def __init__(self, upstream_port: int) -> None:
        self._up = upstream_port
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._srv.getsockname()[1])
        self._lock = threading.Lock()
        self._links: list[tuple[socket.socket, socket.socket]] = []
        self.down_bytes = 0
        self.connections = 0
        self._cut_at: int | None = None
        self.cut_done = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._up))
            for s in (client, upstream):  # relay at once, as the endpoints themselves do
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._links.append((client, upstream))
                self.connections += 1
            threading.Thread(target=self._up_pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._down_pump, args=(upstream, client), daemon=True).start()

    def _up_pump(self, client: socket.socket, upstream: socket.socket) -> None:
        forward = True
        try:
            while data := client.recv(1 << 16):
                if forward:
                    try:
                        upstream.sendall(data)
                    except OSError:
                        forward = False  # cut: drain what the device still sends
        except OSError:
            pass
        client.close()
        upstream.close()

    def _down_pump(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while data := upstream.recv(1 << 16):
                cut = False
                with self._lock:
                    if self._cut_at is not None and self.down_bytes + len(data) >= self._cut_at:
                        data, cut, self._cut_at = data[:self._cut_at - self.down_bytes], True, None
                    self.down_bytes += len(data)
                client.sendall(data)
                if cut:
                    self.cut()
                    self.cut_done.set()
                    return
        except OSError:
            pass
        _shutdown(client, socket.SHUT_WR)

    def cut_after(self, nbytes: int) -> None:
        """Cut every link once ``nbytes`` more bytes have gone towards the client."""
        with self._lock:
            self._cut_at = self.down_bytes + nbytes
        self.cut_done.clear()

    def cut(self) -> None:
        with self._lock:
            links, self._links = self._links, []
        for client, upstream in links:
            _shutdown(upstream, socket.SHUT_RDWR)
            _shutdown(client, socket.SHUT_WR)

    def close(self) -> None:
        self._srv.close()
        self.cut()


def _shutdown(s: socket.socket, how: int) -> None:
    try:
        s.shutdown(how)
    except OSError:
        pass


def _adapter(engine: InferenceEngine, rank: int, rng: np.random.Generator,
             a: dict[str, np.ndarray] | None = None) -> LoraAdapter:
    return LoraAdapter(rank=rank, alpha=2.0 * rank, base_fingerprint=engine.fingerprint, weights={
        t.weight: LoraWeights(
            A=a[t.weight] if a is not None else (rng.normal(size=(t.in_features, rank)) * 0.05).astype(np.float32),
            B=(rng.normal(size=(rank, t.out_features)) * 0.05).astype(np.float32))
        for t in engine.targets})


def _fp16_exact(adapter: LoraAdapter) -> LoraAdapter:
    return dataclasses.replace(adapter, weights={
        k: LoraWeights(A=w.A.astype(np.float16).astype(np.float32), B=w.B.astype(np.float16).astype(np.float32))
        for k, w in adapter.weights.items()})


def _probes(engine: InferenceEngine, adapter: LoraAdapter, x: np.ndarray) -> ProbeSet:
    out = engine.run({"x": x}, engine.prepare(adapter, name="probe", version=1))
    return ProbeSet(inputs={"x": x}, outputs={"logits": out["logits"]}, atol=1e-3, rtol=1e-3)


class _Bench:
    def __init__(self, tmp: Path, broker: Broker) -> None:
        model = build_reference_encoder()
        self.base_model_bytes = len(model.SerializeToString())
        self.engine = InferenceEngine(model, targets=REFERENCE_TARGETS, rank=SLOT_RANK)
        self.service = AdapterService(self.engine, AdapterRegistry(tmp / "adapters"), cache_budget_bytes=256 << 20)
        self.rng = np.random.default_rng(0)
        self.x = self.rng.random((1, 16, 384), dtype=np.float32)
        self.fleet_t = broker.connect("fleet", timeout_s=20)
        self.repo = FleetRepository.init(tmp / "fleet")
        self.index: RepoIndex = self.repo.push(self.fleet_t)
        self.proxy = _Proxy(broker.port)
        cfg = dataclasses.replace(broker.config("dev1", timeout_s=20, will=will_for("dev1")), port=self.proxy.port)
        self.device_t = MqttTransport(cfg)
        self.device_t.connect()
        self.ota_dir = tmp / "ota"
        self.client = OtaClient(ClientConfig(device_id="dev1", groups=("east",), state_dir=self.ota_dir,
                                             trusted_root=self.repo.root_bytes(1),
                                             base_fingerprint=self.engine.fingerprint, fetch_timeout_s=20),
                                self.device_t, self.service)
        self.client.start()
        self.big: TargetSpec | None = None

    def close(self) -> None:
        self.client.close()
        self.device_t.close()
        self.proxy.close()

    def publish(self, name: str, adapter: LoraAdapter, **kw: Any) -> TargetSpec:
        spec = self.repo.publish_adapter(name, adapter, audience=EAST, **kw)
        self.index = self.repo.push(self.fleet_t, current=self.index)
        return spec

    def wait_served(self, name: str, version: int) -> int:
        """Wait until fleet ``version`` of ``name`` is installed; returns the local version served."""
        deadline = time.monotonic() + _WAIT_S
        while True:
            inst = self.client.state.installed(name)
            if inst is not None and inst.fleet_version == version:
                break
            bad = [r for r in self.client.last_results if r.adapter == name and r.version == version
                   and r.result in ("rejected", "skipped")]
            if bad or time.monotonic() > deadline:
                raise RuntimeError(f"{name} v{version} not installed: {bad or self.client.last_results}")
            time.sleep(0.001)
        served = self.service.infer({"x": self.x}, adapter=name)
        if served.version != inst.local_version:
            raise RuntimeError(f"{name}: serving version {served.version}, installed {inst.local_version}")
        return inst.local_version

    # --- the measurements ---------------------------------------------------------

    def e2e(self, reps: int) -> dict[str, Any]:
        samples = []
        spec = None
        for _ in range(reps):
            adapter = _adapter(self.engine, SLOT_RANK, self.rng)
            probes = _probes(self.engine, adapter, self.x)  # fleet-side preparation, not timed
            t0 = time.perf_counter()
            spec = self.publish("big", adapter, probes=probes, compression="zstd", chunk_size=CHUNK)
            self.wait_served("big", spec.version)
            samples.append((time.perf_counter() - t0) * 1e3)
        assert spec is not None
        self.big = spec
        return {"ota_e2e_ms": round(statistics.median(samples), 1),
                "ota_e2e_samples_ms": [round(s, 1) for s in samples],
                "e2e_adapter_bytes": _adapter(self.engine, SLOT_RANK, self.rng).nbytes,
                "e2e_payload_bytes": spec.length, "e2e_encoding": "full fp32 zstd, with probe set"}

    def verify(self, spec: TargetSpec | None, *, reps: int) -> dict[str, Any]:
        assert spec is not None, "run e2e first"
        path = next(p for p, s in self.repo.targets().items() if s.sha256 == spec.sha256)
        dirname, _, base = path.rpartition("/")
        payload = (self.repo.dir / "targets" / dirname / f"{spec.sha256}.{base}").read_bytes()
        chunks = [payload[i:i + spec.chunk_size] for i in range(0, len(payload), spec.chunk_size)]
        _, canonical, _ = reconstruct(spec, payload, base_fingerprint=self.engine.fingerprint)
        root = self.repo.load("root").signed
        signed = {role: self.repo.load(role) for role in ("timestamp", "snapshot", "targets")}
        def verify() -> None:
            for role, md in signed.items():
                root.verify_delegate(role, md.signed_bytes, md.signatures)
            for i, c in enumerate(chunks):
                spec.verify_chunk(i, c)
            spec.verify_payload(payload)
            if hashlib.sha256(canonical).hexdigest() != spec.adapter_sha256:
                raise RuntimeError("adapter digest differs")

        ms = median_seconds(verify, reps, warmup=1) * 1e3
        return {"verify_ms_per_mb": round(ms / (len(payload) / 1e6), 3), "verify_ms": round(ms, 3),
                "verify_payload_bytes": len(payload),
                "verify_covers": "ed25519 signatures of timestamp, snapshot, targets; sha256 of every "
                                 "chunk, of the payload and of the reconstructed adapter"}

    def wire(self) -> dict[str, Any]:
        # A frozen-A run trains B on top of v1 as devices hold it (fp16-rounded when sent as fp16)
        v1 = _fp16_exact(_adapter(self.engine, WIRE_RANK, self.rng))
        spec1 = self.publish("wire", v1, probes=_probes(self.engine, v1, self.x), dtype="fp16",
                             compression="zstd", chunk_size=CHUNK)
        self.wait_served("wire", spec1.version)
        time.sleep(0.3)  # let the status publish and its acknowledgement settle
        frozen_a = {k: w.A for k, w in v1.weights.items()}
        out: dict[str, Any] = {"base_model_bytes": self.base_model_bytes}
        version = spec1.version
        for with_probes in (False, True):
            new = _fp16_exact(_adapter(self.engine, WIRE_RANK, self.rng, a=frozen_a))
            probes = _probes(self.engine, new, self.x) if with_probes else None
            before = self.proxy.down_bytes
            spec = self.publish("wire", new, probes=probes, delta_from=version, dtype="fp16",
                                compression="zstd", chunk_size=CHUNK)
            self.wait_served("wire", spec.version)
            wire = self.proxy.down_bytes - before
            version = spec.version
            time.sleep(0.3)
            if not with_probes:
                out.update({
                    "bytes_on_wire": wire, "wire_ratio_vs_base_model": round(wire / self.base_model_bytes, 5),
                    "wire_payload_bytes": spec.length,
                    "wire_encoding": f"delta against the installed version (frozen A, new B), fp16, zstd; "
                                     f"rank {WIRE_RANK} on {len(self.engine.targets)} targets; no probe set",
                    "wire_full_fp32_adapter_bytes": new.nbytes})
            else:
                assert probes is not None
                out.update({
                    "bytes_on_wire_with_probes": wire,
                    "wire_ratio_with_probes": round(wire / self.base_model_bytes, 5),
                    "wire_probe_bytes": sum(a.nbytes for a in (*probes.inputs.values(), *probes.outputs.values())),
                    "wire_probe_set": "1 example: x [1, 16, 384] fp32 and its logits"})
        return out

    def resume(self) -> dict[str, Any]:
        adapter = _adapter(self.engine, SLOT_RANK, self.rng)
        spec = self.repo.publish_adapter("resume", adapter, audience=EAST, compression="none",
                                         chunk_size=RESUME_CHUNK)
        conns = self.proxy.connections
        # half of the payload's bytes (counting the metadata before it) cross the wire, then the link drops
        self.proxy.cut_after(spec.length // 2)
        self.index = self.repo.push(self.fleet_t, current=self.index)
        if not self.proxy.cut_done.wait(_WAIT_S):
            raise RuntimeError("the transfer never reached half of its bytes")
        cut_at = self.proxy.down_bytes
        self.wait_served("resume", spec.version)
        again = self.proxy.down_bytes - cut_at
        if self.proxy.connections <= conns:
            raise RuntimeError("the device did not reconnect after the cut")
        return {"resume_refetch_ratio": round(again / spec.length, 4),
                "resume_payload_bytes": spec.length, "resume_bytes_after_reconnect": again,
                "resume_chunks": len(spec.chunks), "resume_chunk_bytes": spec.chunk_size}


class _CountingSink:
    """The adapter service as a simulated device needs it: versions per name, no model."""

    def __init__(self) -> None:
        self.current: dict[str, int] = {}
        self.count: dict[str, int] = {}

    def install(self, name: str, adapter: LoraAdapter, *, meta: Any = None) -> Any:
        self.count[name] = self.count.get(name, 0) + 1
        self.current[name] = self.count[name]
        return dataclasses.make_dataclass("Info", ["name", "version"])(name, self.current[name])

    def rollback(self, name: str, version: int) -> Any:
        self.current[name] = version
        return self.info(name)

    def delete(self, name: str) -> None:
        self.current.pop(name, None)

    def info(self, name: str) -> Any:
        from lorad.adapters.errors import AdapterNotFoundError
        if name not in self.current:
            raise AdapterNotFoundError(name)
        return dataclasses.make_dataclass("Info", ["name", "version"])(name, self.current[name])

    def run(self, inputs: Any, adapter: str | None = None) -> Any:
        raise RuntimeError("no model on a simulated device")


def rollout_bench(tmp: Path, *, devices: int, min_wait_s: float) -> dict[str, Any]:
    from lorad.ota.cli import FleetSession, fleet_view
    from lorad.ota.rollout import parse_stages
    from lorad.ota.rollout_cli import RolloutDriver, RolloutStore, create_rollout

    names = [f"sim{i:03d}" for i in range(devices)]
    broker = create_broker(tmp / "rollout-broker", max_packet=MAX_PACKET, devices={n: ("shop",) for n in names})
    clients: list[OtaClient] = []
    try:
        repo = FleetRepository.init(tmp / "rollout-fleet")
        fingerprint = "sha256:" + "5" * 64
        for n in names:
            c = OtaClient(ClientConfig(device_id=n, groups=("shop",), state_dir=tmp / "sim" / n,
                                       trusted_root=repo.root_bytes(1), base_fingerprint=fingerprint),
                          broker.connect(n, will=will_for(n)), _CountingSink())
            c.start()
            clients.append(c)
        session = FleetSession(broker.connect("fleet"))
        view = fleet_view(session.transport, 30.0)
        if not view.wait_for(lambda v: len(v.status) >= devices, _WAIT_S):
            raise RuntimeError(f"only {len(view.status)} of {devices} simulated devices reported")
        rng = np.random.default_rng(7)
        adapter = LoraAdapter(rank=WIRE_RANK, alpha=16.0, base_fingerprint=fingerprint, weights={
            f"layer{i}.q": LoraWeights(A=rng.standard_normal((64, WIRE_RANK)).astype(np.float32),
                                       B=rng.standard_normal((WIRE_RANK, 64)).astype(np.float32))
            for i in range(4)})
        stages = parse_stages("5%,25%,100%")
        t0 = time.perf_counter()
        store = RolloutStore(repo.dir, "bench")
        create_rollout(repo, store, session, view, adapter_name="shelf", adapter=adapter, stages=stages,
                       min_wait_s=min_wait_s)
        result = RolloutDriver(repo, store, session, view).run(max_s=600)
        took = time.perf_counter() - t0
        if result["status"] != "done" or result["healthy"] != devices:
            raise RuntimeError(f"rollout did not complete: {result}")
        waits = min_wait_s * len(stages)
        session.close()
        return {"rollout_100_devices_s": round(took, 3), "rollout_devices": devices,
                "rollout_stages": "5%,25%,100%", "rollout_min_wait_s_per_stage": min_wait_s,
                "rollout_sum_min_waits_s": waits, "rollout_vs_min_waits": round(took / waits, 3)}
    finally:
        for c in clients:
            c.close()
        broker.close()


def run(quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lorad-ota-bench-") as d:
        tmp = Path(d)
        broker = create_broker(tmp / "mosquitto", max_packet=MAX_PACKET)
        try:
            bench = _Bench(tmp, broker)
            try:
                out: dict[str, Any] = {"benchmark": "ota", "quick": quick}
                out.update(bench.e2e(2 if quick else 5))
                out.update(bench.wire())
                out.update(bench.resume())
                time.sleep(0.5)  # the device idle again: verification measured alone
                out.update(bench.verify(bench.big, reps=5 if quick else 30))
            finally:
                bench.close()
        finally:
            broker.close()
        out["bytes_on_wire_per_device"] = out["bytes_on_wire"]
        out.update(rollout_bench(tmp, devices=100, min_wait_s=2.0))
    goals = {"ota_e2e_ms": 1000, "verify_ms_per_mb": 5, "wire_ratio_vs_base_model": 0.01,
             "resume_refetch_ratio": 0.55, "rollout_vs_min_waits": 2.0}
    out["goals_met"] = {k: out[k] <= v for k, v in goals.items()}
    out["setup"] = {"broker": f"mosquitto, mutual TLS, max_packet_size {MAX_PACKET}",
                    "chunk_bytes": CHUNK, "resume_chunk_bytes": RESUME_CHUNK,
                    "model": "reference encoder", "slot_rank": SLOT_RANK,
                    "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="benchmarks.ota", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="fewer repetitions (CI smoke run)")
    args = p.parse_args(argv)
    load = LoadWatch()
    print(json.dumps(load.seal(run(args.quick)), sort_keys=True))


if __name__ == "__main__":
    main()
