"""The ServerApp's own decisions (daemon/federated/server_app.py), without a SuperLink:
its settings, which devices a round takes and why the others are refused, the central DP
noise (calibrated to the planned ε, scaled to the updates actually summed, a dropped
device tolerated), and the federated privacy record's round trip through the signed form."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy

from lorad.adapters.privacy_record import PrivacyRecord
from lorad.daemon.federated.server_app import (
    FederationSettings,
    _CentralDP,
    _eligible,
    _Federation,
    _LoraFedAvg,
    central_epsilon,
    central_noise_multiplier,
)


def _settings(**changes: object) -> FederationSettings:
    return FederationSettings.from_run_config({"out-dir": "/tmp/rounds", **changes})


def test_settings_name_each_bad_key_and_what_is_allowed() -> None:
    assert _settings(rounds=3).rounds == 3
    assert _settings(**{"central-epsilon": 3}).central_epsilon == 3.0  # an integer where a float goes
    with pytest.raises(ValueError, match=r"unknown run config keys \['round'\]; allowed: .*'rounds'"):
        _settings(round=2)
    with pytest.raises(ValueError, match="rounds: '2' is not a int"):
        _settings(rounds="2")
    with pytest.raises(ValueError, match=r"min-clients 1 \(secure aggregation needs at least 2"):
        _settings(**{"min-clients": 1})
    with pytest.raises(ValueError, match=r"out-dir \(required"):
        FederationSettings.from_run_config({})
    with pytest.raises(ValueError, match=r"central-delta 1.0 \(in \(0, 1\)\)"):
        _settings(**{"central-delta": 1.0})


def test_the_noise_multiplier_spends_the_planned_epsilon_over_the_rounds() -> None:
    settings = _settings(rounds=5, **{"central-epsilon": 8.0, "fleet-size": 1000})
    z, q = central_noise_multiplier(settings, clients=100)
    assert q == pytest.approx(0.1)
    assert central_epsilon(z, q, 5, settings.central_delta) == pytest.approx(8.0, rel=2e-3)
    assert central_epsilon(z, q, 2, settings.central_delta) < 8.0
    # Every round's clients the whole fleet (fleet-size 0): no amplification by sampling.
    z_all, q_all = central_noise_multiplier(_settings(rounds=5, **{"central-epsilon": 8.0}), clients=100)
    assert q_all == 1.0 and z_all > z
    assert central_noise_multiplier(_settings(**{"central-epsilon": 0.0}), clients=10)[0] == 0.0


class _Proxy(ClientProxy):  # only its cid is read by the strategy
    def get_properties(self, *a: object, **k: object) -> None: raise NotImplementedError  # type: ignore[override]
    def get_parameters(self, *a: object, **k: object) -> None: raise NotImplementedError  # type: ignore[override]
    def fit(self, *a: object, **k: object) -> None: raise NotImplementedError  # type: ignore[override]
    def evaluate(self, *a: object, **k: object) -> None: raise NotImplementedError  # type: ignore[override]
    def reconnect(self, *a: object, **k: object) -> None: raise NotImplementedError  # type: ignore[override]


def _results(mean: np.ndarray, n: int) -> list[tuple[ClientProxy, FitRes]]:
    """What SecAgg+ hands the strategy: every survivor's FitRes carries the same mean."""
    return [(_Proxy(str(i)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters([mean]), 1, {})) for i in range(n)]


def test_central_noise_is_scaled_to_the_updates_summed_and_a_dropout_does_not_void_the_round(
        caplog: pytest.LogCaptureFixture) -> None:
    settings = _settings(**{"min-clients": 2})
    dp = _CentralDP(_LoraFedAvg(settings), noise_multiplier=1.5, clip_norm=0.5, min_results=2)
    mean = np.full(200_000, 0.25, np.float32)
    for n in (2, 4):
        with caplog.at_level(logging.WARNING, logger="lorad.federated.server"):
            params, _ = dp.aggregate_fit(1, _results(mean, n), [RuntimeError("node 7: connection refused")])
        assert params is not None and dp.last is not None and dp.last[1] == n
        [noisy] = parameters_to_ndarrays(params)
        assert np.std(noisy - mean) == pytest.approx(1.5 * 0.5 / n, rel=0.02)
        assert abs(float(np.mean(noisy - mean))) < 0.01
    assert "connection refused" in caplog.text  # the dropped device's reason is logged
    params, _ = dp.aggregate_fit(2, _results(mean, 1), [RuntimeError("gone")])
    assert params is None and dp.last is None  # fewer than min-clients: no aggregate


def test_without_central_noise_the_aggregate_is_the_mean() -> None:
    dp = _CentralDP(_LoraFedAvg(_settings()), noise_multiplier=0.0, clip_norm=1.0, min_results=2)
    mean = np.arange(6, dtype=np.float32)
    params, _ = dp.aggregate_fit(1, _results(mean, 3), [])
    assert params is not None
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], mean, rtol=1e-6)


def test_a_round_takes_only_devices_of_the_federation_and_logs_why_the_others_are_refused(
        caplog: pytest.LogCaptureFixture) -> None:
    fed = _Federation(fingerprint="sha256:base", a_digest="sha256:a", shapes={"lora.w.B": (4, 3)})
    good = {"base_fingerprint": "sha256:base", "a_digest": "sha256:a", "shapes": {"lora.w.B": [4, 3]}, "ready": True}
    facts = {
        "1": good,
        "2": {**good, "base_fingerprint": "sha256:other"},
        "3": {**good, "a_digest": "sha256:b"},
        "4": {**good, "shapes": {"lora.w.B": [2, 3]}},
        "5": {**good, "ready": False, "reasons": ["privacy budget spent (ε 8 of 8)"]},
        "6": "no properties: the device's daemon answered 503",
    }
    with caplog.at_level(logging.WARNING, logger="lorad.federated.server"):
        eligible = _eligible(3, facts, fed, _settings())
    assert set(eligible) == {"1"}
    for node, why in (("2", "wrong base model"), ("3", "is not the federation's"), ("4", "B tensors differ"),
                      ("5", "privacy budget spent"), ("6", "answered 503")):
        assert any(f"device {node} refused" in r.message and why in r.message for r in caplog.records), why


def test_the_federated_privacy_record_survives_the_signed_form() -> None:
    record = PrivacyRecord(epsilon=5.2, delta=1e-5, accountant="rdp", sample_rate=0.1, noise_multiplier=1.1,
                           steps=3, unit="user", clients=40, clip_norm=0.5, local_epsilon=(0.8, 1.0, 1.2))
    assert PrivacyRecord.from_dict(record.to_signed()) == record
    assert PrivacyRecord.from_dict(record.to_dict()) == record
    with pytest.raises(ValueError, match="clients 0"):
        PrivacyRecord(**{**record.__dict__, "clients": 0})
    with pytest.raises(ValueError, match="local_epsilon"):
        PrivacyRecord(**{**record.__dict__, "local_epsilon": (float("nan"),)})
