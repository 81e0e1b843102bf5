"""The Flower ServerApp of a lorad fleet: FedAvg of LoRA B, SecAgg+, user-level central DP.

Run by the SuperLink (``loractl fleet federate`` submits it: daemon/ctl/federate.py). Each
round:

1. **Check the devices.** Every registered SuperNode is asked for its properties
   (client_app.py): base model fingerprint, A's digest, B's shapes, budget, whether it may
   train now. The federation's base model and A are the configured fingerprint's (else the
   majority's) and, in the first round, A is fetched from one device and checked against
   its digest. A device with another base model, A, rank or shape, or one that is busy or
   out of budget, is refused for the round with the reason logged; fewer eligible devices
   than ``min-clients`` ends the federation.
2. **Train, masked.** The eligible devices train one local DP round each from the
   federation's B; their updates B_i − B are clipped to the user-level norm C on the device
   (``fixedclipping_mod``) and summed under SecAgg+ (``SecAggPlusWorkflow``), so this
   server sees only the sum. A device that drops out after the key exchange is recovered by
   SecAgg+'s threshold; its failure is logged with its reason.
3. **Central DP.** Gaussian noise of std z·C/n is added to the mean of the n updates
   (lorad's secure noise source), z calibrated so that the planned rounds spend exactly
   ``central-epsilon`` at ``central-delta`` (user-level: a user's whole data set changes
   one update by at most C). The accountant composes the rounds (RDP, with sampling rate
   q = clients per round / ``fleet-size``). ``central-epsilon = 0`` means no central noise.
4. **Publish.** The aggregate adapter (the federation's A, the new B) is written to
   ``out-dir/round-<k>/`` as PEFT files with its privacy record (the round, clients, central
   ε/δ, and each client's local ε for the round, from a second property check), for
   ``loractl fleet federate`` to sign and publish through the OTA path.

Exactness: with A shared and frozen, mean_i(A·B_i) = A·mean_i(B_i), so FedAvg of B is
FedAvg of the adapters (FFA-LoRA); every user weighs the same (weight 1), as the user-level
guarantee needs.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.common import (
    ConfigRecord,
    Context,
    FitIns,
    FitRes,
    GetPropertiesIns,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.criterion import Criterion
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from lorad.adapters.fsutil import atomic_write_bytes
from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.adapters.peft_format import save_peft
from lorad.adapters.privacy_record import PRIVACY_FILE, PrivacyRecord
from lorad.trainer.federated import a_digest, check_update

from . import wire

__all__ = ["FederationSettings", "app", "make_server_app", "central_noise_multiplier", "ROUND_FILE"]

_log = logging.getLogger("lorad.federated.server")

#: What each published round's directory holds besides the PEFT files and the privacy record.
ROUND_FILE = "federation.json"
#: Devices asked for their properties at once (each question waits on the SuperLink).
_PROBES_AT_ONCE = 64


@dataclass(frozen=True)
class FederationSettings:
    """The run config (``[tool.flwr.app.config]`` of the app, ``--run-config`` of ``flwr run``)."""

    rounds: int = 2
    adapter: str = "fleet"
    min_clients: int = 2
    fraction: float = 1.0
    fleet_size: int = 0
    central_epsilon: float = 8.0
    central_delta: float = 1e-5
    clip_norm: float = 1.0
    secagg_shares: float = 1.0
    secagg_threshold: float = 0.6
    out_dir: str = ""
    base_fingerprint: str = ""
    round_timeout_s: float = 3600.0

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> FederationSettings:
        known = {f.replace("_", "-"): f for f in cls.__dataclass_fields__}
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ValueError(f"unknown run config keys {unknown}; allowed: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, name in known.items():
            if key in config:
                default = getattr(cls, name)
                value = config[key]
                if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)
                if type(value) is not type(default):
                    raise ValueError(f"run config {key}: {value!r} is not a {type(default).__name__}")
                values[name] = value
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        problems = []
        if self.rounds < 1:
            problems.append(f"rounds {self.rounds} (at least 1)")
        if self.min_clients < 2:
            problems.append(f"min-clients {self.min_clients} (secure aggregation needs at least 2)")
        if not 0 < self.fraction <= 1:
            problems.append(f"fraction {self.fraction} (in (0, 1])")
        if self.fleet_size < 0:
            problems.append(f"fleet-size {self.fleet_size} (0: the clients of a round are the whole fleet)")
        if not self.central_epsilon >= 0 or not math.isfinite(self.central_epsilon):
            problems.append(f"central-epsilon {self.central_epsilon} (>= 0; 0: no central noise)")
        if not 0 < self.central_delta < 1:
            problems.append(f"central-delta {self.central_delta} (in (0, 1))")
        if not self.clip_norm > 0:
            problems.append(f"clip-norm {self.clip_norm} (> 0)")
        if not self.out_dir:
            problems.append("out-dir (required: where each round's adapter is written)")
        if not self.round_timeout_s > 0:
            problems.append(f"round-timeout-s {self.round_timeout_s} (> 0)")
        if problems:
            raise ValueError("bad federation settings: " + "; ".join(problems))


def central_noise_multiplier(settings: FederationSettings, clients: int) -> tuple[float, float]:
    """(z, q): the noise multiplier that spends ``central-epsilon`` over the planned rounds at
    sampling rate q = clients / fleet-size (0.0 when central-epsilon is 0)."""
    from lorad.trainer.accountant import calibrate_sigma

    q = min(1.0, clients / settings.fleet_size) if settings.fleet_size else 1.0
    if settings.central_epsilon == 0:
        return 0.0, q
    z = calibrate_sigma(target_epsilon=settings.central_epsilon, delta=settings.central_delta, q=q,
                        steps=settings.rounds, accountant="rdp", prior=[], tolerance=settings.central_epsilon / 1000)
    return z, q


def central_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    """The user-level ε of ``rounds`` rounds at noise multiplier z (> 0) and sampling rate q."""
    from lorad.trainer.accountant import RunCharge, epsilon

    return epsilon(runs=[RunCharge(q=q, sigma=z, steps=rounds)], delta=delta, accountant="rdp")


class _Among(Criterion):
    def __init__(self, node_ids: set[str]) -> None:
        self.node_ids = node_ids

    def select(self, client: ClientProxy) -> bool:
        return client.cid in self.node_ids


class _LoraFedAvg(FedAvg):
    """FedAvg over the eligible devices of the round, with the round's config."""

    def __init__(self, settings: FederationSettings) -> None:
        super().__init__(fraction_fit=settings.fraction, fraction_evaluate=0.0, min_fit_clients=settings.min_clients,
                         min_evaluate_clients=0, min_available_clients=settings.min_clients, accept_failures=True)
        self.eligible: set[str] = set()
        self.fit_config: dict[str, Scalar] = {}

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        available = len(self.eligible)
        size = max(int(available * self.fraction_fit), self.min_fit_clients)
        clients = client_manager.sample(num_clients=min(size, available), min_num_clients=self.min_fit_clients,
                                        criterion=_Among(self.eligible))
        return [(c, FitIns(parameters, dict(self.fit_config))) for c in clients]


class _CentralDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping wrapper (it sends C; the devices clip), with the
    noise scaled to the updates actually summed and drawn from lorad's secure source, and
    a dropped device tolerated (logged) instead of voiding the round."""

    def __init__(self, strategy: _LoraFedAvg, *, noise_multiplier: float, clip_norm: float, min_results: int) -> None:
        super().__init__(strategy, noise_multiplier=noise_multiplier, clipping_norm=clip_norm,
                         num_sampled_clients=min_results)
        self.min_results = min_results
        self.last: tuple[Parameters, int] | None = None

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> tuple[Parameters | None,
                                                                                            dict[str, Scalar]]:
        for failure in failures:
            _log.warning("round %d: a device's update was not received: %s", server_round,
                         failure if isinstance(failure, BaseException) else "no result")
        self.last = None
        if len(results) < self.min_results:
            _log.error("round %d: %d updates summed, fewer than min-clients %d: no aggregate", server_round,
                       len(results), self.min_results)
            return None, {}
        aggregated, metrics = self.strategy.aggregate_fit(server_round, results, [])
        if aggregated is None:
            return None, {}
        arrays = parameters_to_ndarrays(aggregated)
        if self.noise_multiplier:
            from lorad.trainer.noise import SecureNoise

            std = self.noise_multiplier * self.clipping_norm / len(results)
            noise = SecureNoise()
            arrays = [(a + noise.gaussian64(a.size, std).reshape(a.shape)).astype(np.float32) for a in arrays]
            _log.info("round %d: central DP noise std %.4g on the mean of %d updates", server_round, std, len(results))
        params = ndarrays_to_parameters(arrays)
        self.last = (params, len(results))
        return params, metrics


@dataclass
class _Federation:
    """What the rounds establish: the base model, A and B's tensor names, and the device facts."""

    fingerprint: str = ""
    a_digest: str = ""
    a: dict[str, np.ndarray] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    rank: int = 0
    alpha: float = 0.0
    use_rslora: bool = False


def _probe(proxies: Mapping[str, ClientProxy], config: dict[str, Scalar], timeout: float,
           round_: int) -> dict[str, dict[str, Any] | str]:
    """Each device's properties (decoded), or the reason there are none."""

    def ask(proxy: ClientProxy) -> dict[str, Any] | str:
        try:
            res = proxy.get_properties(GetPropertiesIns(dict(config)), timeout=timeout, group_id=round_)
        except Exception as e:  # no answer, an error answer: the device is left out, with the reason
            return f"no properties: {e}"
        if res.status.code.value != 0:
            return f"properties refused: {res.status.message}"
        out: dict[str, Any] = {}
        for key, value in res.properties.items():
            if key in ("shapes", "reasons", "targets") and isinstance(value, str):
                out[key] = json.loads(value)
            else:
                out[key] = value
        return out

    with ThreadPoolExecutor(max(1, min(len(proxies), _PROBES_AT_ONCE))) as pool:
        return dict(zip(proxies, pool.map(ask, proxies.values()), strict=True))


def _eligible(round_: int, facts: Mapping[str, dict[str, Any] | str], fed: _Federation,
              settings: FederationSettings) -> dict[str, dict[str, Any]]:
    """The devices that may take part this round; every other one is logged with its reason."""
    ok: dict[str, dict[str, Any]] = {}
    for node, info in sorted(facts.items()):
        if isinstance(info, str):
            reason = info
        elif info.get("base_fingerprint") != fed.fingerprint:
            reason = (f"wrong base model: {info.get('base_fingerprint')!r}, the federation's is {fed.fingerprint!r}")
        elif info.get("a_digest") != fed.a_digest:
            reason = f"its LoRA A {str(info.get('a_digest'))[:19]}… is not the federation's {fed.a_digest[:19]}…"
        elif {k: tuple(v) for k, v in info["shapes"].items()} != fed.shapes:
            reason = "its B tensors differ from the federation's (names or shapes)"
        elif not info.get("ready"):
            reason = "not ready: " + "; ".join(info.get("reasons") or ["(no reason given)"])
        else:
            ok[node] = info
            continue
        _log.warning("round %d: device %s refused: %s", round_, node, reason)
    return ok


def _establish(round_: int, facts: Mapping[str, dict[str, Any] | str], settings: FederationSettings,
               proxies: Mapping[str, ClientProxy]) -> _Federation:
    """The federation's base model (configured, else the majority's), A (fetched from one device
    with it, checked against the digest the devices agree on) and B's shapes."""
    answered = {n: i for n, i in facts.items() if isinstance(i, dict)}
    if not answered:
        raise RuntimeError(f"round {round_}: no device answered: {dict(facts)}")
    fingerprint = settings.base_fingerprint or Counter(i["base_fingerprint"] for i in answered.values()).most_common(1)[0][0]
    same = {n: i for n, i in answered.items() if i["base_fingerprint"] == fingerprint}
    if not same:
        raise RuntimeError(f"round {round_}: no device has the base model {fingerprint}")
    digest = Counter(i["a_digest"] for i in same.values()).most_common(1)[0][0]
    node = next(n for n, i in sorted(same.items()) if i["a_digest"] == digest)
    reply = _probe({node: proxies[node]}, {"with_a": True}, settings.round_timeout_s, round_)[node]
    if isinstance(reply, str) or not isinstance(reply.get("a"), bytes):
        raise RuntimeError(f"round {round_}: device {node} did not send A: {reply if isinstance(reply, str) else ''}")
    a = wire.from_bytes(reply["a"], what=f"device {node}'s A")
    if a_digest(a) != digest:
        raise RuntimeError(f"round {round_}: device {node}'s A does not match the digest it reported")
    info = same[node]
    return _Federation(fingerprint=fingerprint, a_digest=digest, a=a,
                       shapes={k: tuple(v) for k, v in info["shapes"].items()}, rank=int(info["rank"]),
                       alpha=float(info["alpha"]), use_rslora=bool(info["use_rslora"]))


def _adapter(fed: _Federation, b: Mapping[str, np.ndarray], round_: int) -> LoraAdapter:
    weights = {}
    for a_name, a in fed.a.items():
        weight = a_name.removeprefix("lora.").removesuffix(".A")
        weights[weight] = LoraWeights(a, np.asarray(b[f"lora.{weight}.B"], np.float32))
    return LoraAdapter(rank=fed.rank, alpha=fed.alpha, weights=weights, base_fingerprint=fed.fingerprint,
                       use_rslora=fed.use_rslora, extra={"lorad_federated_round": str(round_)})


def _publish_round(out: Path, round_: int, adapter: LoraAdapter, record: PrivacyRecord | None,
                   summary: dict[str, Any]) -> Path:
    """``out/round-<k>/``: PEFT files, the privacy record, the round's summary; the directory
    appears whole (written under a temporary name, then renamed)."""
    final = out / f"round-{round_:04d}"
    tmp = out / f".round-{round_:04d}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_peft(adapter, tmp)
    if record is not None:
        atomic_write_bytes(tmp / PRIVACY_FILE, (json.dumps(record.to_dict(), indent=1) + "\n").encode())
    atomic_write_bytes(tmp / ROUND_FILE, (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
    tmp.rename(final)
    return final


def run_federation(grid: Grid, context: Context, defaults: Mapping[str, Any] | None = None) -> None:
    """The ServerApp's main (see the module docstring); ``defaults`` under the run config."""
    settings = FederationSettings.from_run_config({**(defaults or {}), **context.run_config})
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    strategy = _LoraFedAvg(settings)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=settings.rounds),
                           strategy=strategy)
    thread, stop, registered = start_update_client_manager_thread(grid, legacy.client_manager)
    try:
        registered.wait()
        if not legacy.client_manager.wait_for(settings.min_clients, timeout=int(settings.round_timeout_s)):
            raise RuntimeError(f"fewer than min-clients {settings.min_clients} devices registered within "
                               f"{settings.round_timeout_s:g} s")
        _rounds(grid, legacy, strategy, settings, out)
    finally:
        stop.set()
        thread.join()


@dataclass
class _Rounds:
    """What the first round establishes for the rest: the federation, its noise and accountant."""

    fed: _Federation
    dp: _CentralDP
    z: float
    q: float
    cfg: ConfigRecord


def _begin(legacy: LegacyContext, strategy: _LoraFedAvg, settings: FederationSettings,
           facts: Mapping[str, dict[str, Any] | str], proxies: Mapping[str, ClientProxy]) -> _Rounds:
    """Establish the federation (base model, A, shapes) and its central noise; B starts at zero."""
    fed = _establish(1, facts, settings, proxies)
    zeros = [np.zeros(fed.shapes[name], np.float32) for name in sorted(fed.shapes)]
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(zeros), True)
    z, q = central_noise_multiplier(settings, max(settings.min_clients, int(len(facts) * settings.fraction)))
    dp = _CentralDP(strategy, noise_multiplier=z, clip_norm=settings.clip_norm, min_results=settings.min_clients)
    legacy.strategy = dp
    cfg = ConfigRecord()
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = cfg
    _log.info("federation: base model %s, %d B tensors, %s, clip norm %.4g", fed.fingerprint, len(fed.shapes),
              f"central DP z={z:.4g} (q={q:.3g}, {settings.rounds} rounds, ε {settings.central_epsilon:g} at "
              f"δ {settings.central_delta:g})" if z else "no central noise (central-epsilon 0)", settings.clip_norm)
    return _Rounds(fed, dp, z, q, cfg)


def _rounds(grid: Grid, legacy: LegacyContext, strategy: _LoraFedAvg, settings: FederationSettings, out: Path) -> None:
    run: _Rounds | None = None
    secagg = SecAggPlusWorkflow(num_shares=settings.secagg_shares, reconstruction_threshold=settings.secagg_threshold,
                                timeout=settings.round_timeout_s)
    for round_ in range(1, settings.rounds + 1):
        began = time.monotonic()
        proxies = dict(legacy.client_manager.all())
        facts = _probe(proxies, {}, settings.round_timeout_s, round_)
        run = run or _begin(legacy, strategy, settings, facts, proxies)
        fed = run.fed
        eligible = _eligible(round_, facts, fed, settings)
        if len(eligible) < settings.min_clients:
            raise RuntimeError(f"round {round_}: {len(eligible)} eligible devices, fewer than min-clients "
                               f"{settings.min_clients}; the federation stops")
        strategy.eligible = set(eligible)
        strategy.fit_config = {"round": round_, "a_digest": fed.a_digest}
        run.cfg[Key.CURRENT_ROUND] = round_
        secagg(grid, legacy)
        if run.dp.last is None:
            raise RuntimeError(f"round {round_}: no aggregate (see the log above); the federation stops")
        params, summed = run.dp.last
        b = wire.named(parameters_to_ndarrays(params), sorted(fed.shapes), what="the aggregate")
        check_update(b, fed.shapes, what=f"round {round_}'s aggregate")
        # Each device's local ε for the round, from its ledger (asked again: SecAgg+ carries no metrics).
        after = _probe({n: proxies[n] for n in eligible}, {}, settings.round_timeout_s, round_)
        local = {n: float(i["epsilon_spent"]) - float(eligible[n]["epsilon_spent"])
                 for n, i in after.items() if isinstance(i, dict)}
        local = {n: e for n, e in local.items() if e > 0}  # devices that trained this round
        # Without central noise (central-epsilon 0) there is no user-level guarantee to state.
        spent = central_epsilon(run.z, run.q, round_, settings.central_delta) if run.z else None
        record = None if spent is None else PrivacyRecord(
            epsilon=spent, delta=settings.central_delta, accountant="rdp", sample_rate=run.q,
            noise_multiplier=run.z, steps=round_, unit="user",
            example="one device's whole local data: its update, clipped", base_fingerprint=fed.fingerprint,
            clients=summed, clip_norm=settings.clip_norm, local_epsilon=tuple(sorted(round(e, 6) for e in local.values())))
        summary = {"round": round_, "rounds": settings.rounds, "clients": summed, "eligible": sorted(eligible),
                   "central_epsilon": spent, "central_delta": settings.central_delta,
                   "noise_multiplier": run.z, "sample_rate": run.q, "clip_norm": settings.clip_norm,
                   "local_epsilon": {n: round(e, 6) for n, e in sorted(local.items())},
                   "adapter": settings.adapter, "round_s": time.monotonic() - began}
        where = _publish_round(out, round_, _adapter(fed, b, round_), record, summary)
        _log.info("round %d: %d updates aggregated; central ε %s; written to %s", round_, summed,
                  "none (no central noise)" if spent is None else f"{spent:.4g}", where)


def make_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """The ServerApp; ``defaults``: run config values (keys as in the app's pyproject) under
    what the run brings (Flower's simulation engine runs it without a run config)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, context, defaults)

    return server


#: The deployed app (the FAB's ``serverapp``).
app = make_server_app()
