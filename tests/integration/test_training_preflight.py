"""Nothing is charged for a run that cannot succeed: what can be checked without private
data is checked before the ledger is charged, by the daemon and by ``lorad check-config``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from tests.integration.lorad_process import run_lorad, start_daemon
from tests.model_matrix import EXPORTED

BERT = EXPORTED / "bert_optimum_17.onnx"  # an Optimum export whose position table has 32 entries


def _config(tmp_path: Path, **defaults: object) -> Path:
    doc = {"model": {"name": "bert", "path": str(BERT), "targets": ["query", "value", "classifier"], "rank": 8},
           "trainer": {"enabled": True, "schedule": False,
                       "defaults": {"min_train_examples": 8, "min_holdout_examples": 4, "gate_noise_multiplier": 1.0,
                                    "steps": 2, "epochs": None, "batch_size": 4, **defaults}}}
    path = tmp_path / "lorad.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_check_config_names_what_a_run_would_fail_for(tmp_path: Path) -> None:
    p = run_lorad("check-config", str(_config(tmp_path)))  # the default pad_length 128 > 32 positions
    assert p.returncode == 2
    assert "trainer.defaults.pad_length" in p.stderr and "cannot score a batch of shape" in p.stderr
    p = run_lorad("check-config", str(_config(tmp_path, output="pooled")))
    assert p.returncode == 2 and "trainer.defaults.output" in p.stderr and "its outputs: logits" in p.stderr
    p = run_lorad("check-config", str(_config(tmp_path, pad_length=16)))
    assert p.returncode == 0, p.stderr


def test_a_run_that_cannot_succeed_is_refused_before_the_charge(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "state", "--config", str(_config(tmp_path)))
    try:
        rng = np.random.default_rng(0)
        base = "/v2/models/bert/adapters/alice"
        for _ in range(20):
            ids = rng.integers(1, 64, size=(1, 8))
            body = {"inputs": [{"name": n, "datatype": "INT64", "shape": [1, 8], "data": v.ravel().tolist()}
                               for n, v in (("input_ids", ids), ("attention_mask", np.ones_like(ids)),
                                            ("token_type_ids", np.zeros_like(ids)))],
                    "label": int(rng.integers(3))}
            assert d.request("POST", f"{base}/examples", json_body=body).status == 201
        for _ in range(3):  # a retry is refused again, and charges nothing either
            r = d.request("POST", f"{base}/train")
            assert r.status == 422 and "trainer.pad_length" in r.json()["error"], r.body
        privacy = d.request("GET", f"{base}/privacy").json()
        assert privacy["runs"] == [] and privacy["epsilon_spent"] == 0
    finally:
        assert d.stop() == 0, d.logs()


def test_an_example_the_model_cannot_take_is_refused_at_ingestion(tmp_path: Path) -> None:
    """A token id outside the vocabulary or a mask value other than 0/1 would fail a run
    (or make its loss NaN) after the charge: refused when stored, naming the field."""
    d = start_daemon(tmp_path / "state", "--config", str(_config(tmp_path, pad_length=8)))
    try:
        def body(ids: list[int], mask: list[int], types: list[int]) -> dict[str, object]:
            return {"inputs": [{"name": n, "datatype": "INT64", "shape": [1, 8], "data": v}
                               for n, v in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", types))],
                    "label": 1}

        path = "/v2/models/bert/adapters/alice/examples"
        ok = [5] * 8
        cases = {
            "a token id beyond the vocabulary": (body([5] * 7 + [1000], [1] * 8, [0] * 8),
                                                 "input 'input_ids' holds 1000; allowed: 0..63"),
            "a negative token id": (body([-3] + [5] * 7, [1] * 8, [0] * 8), "input 'input_ids' holds -3"),
            "a mask of -1": (body(ok, [1, -1] + [0] * 6, [0] * 8), "input 'attention_mask' holds -1; allowed: 0..1"),
            "a token type beyond the table": (body(ok, [1] * 8, [2] * 8), "input 'token_type_ids' holds 2; allowed: 0..1"),
        }
        for what, (doc, message) in cases.items():
            r = d.request("POST", path, json_body=doc)
            assert r.status == 422 and message in r.json()["error"], (what, r.body)
        assert d.request("POST", path, json_body=body(ok, [1] * 8, [0] * 8)).status == 201
        assert d.request("GET", path).json()["examples"] == 1  # the refused ones were not stored
    finally:
        assert d.stop() == 0, d.logs()
