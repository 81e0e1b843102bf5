"""Memory bounded per request, through a real daemon: a request of a token model over
``server.max_request_tokens`` is a 413 before the model runs; one over a call's worth
(``server.chunk_tokens``) runs in chunks and answers what one call would."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from tests.integration.lorad_process import start_daemon

EXPORTED = Path(__file__).resolve().parents[1] / "data" / "exported"


def _body(rows: int, length: int, seed: int = 0) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 64, size=(rows, length))
    tensors = {"input_ids": ids, "attention_mask": np.ones((rows, length), int),
               "token_type_ids": np.zeros((rows, length), int)}
    return {"inputs": [{"name": k, "datatype": "INT64", "shape": [rows, length], "data": v.ravel().tolist()}
                       for k, v in tensors.items()]}


def test_token_limits_and_chunks_through_the_daemon(tmp_path: Path) -> None:
    targets = json.loads((EXPORTED / "peft_bert" / "adapter_config.json").read_text())["target_modules"]
    config = tmp_path / "lorad.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "bert", "path": str(EXPORTED / "bert_optimum_17.onnx"), "targets": sorted(targets),
                  "rank": 8},
        "server": {"max_request_tokens": 256, "chunk_tokens": 32},
        "trainer": {"enabled": False},
    }))
    d = start_daemon(tmp_path / "state", "--config", str(config))
    try:
        r = d.request("POST", "/v2/models/bert/infer", json_body=_body(40, 8))
        assert r.status == 413, r.body
        assert "320 tokens" in r.json()["error"] and "server.max_request_tokens" in r.json()["error"]

        big = _body(20, 8)  # 160 tokens: five calls of 4 rows
        whole = d.request("POST", "/v2/models/bert/infer", json_body=big)
        assert whole.status == 200, whole.body
        parts = []
        for start in range(0, 20, 4):  # each a single call
            part = {"inputs": [{**t, "shape": [4, 8], "data": t["data"][start * 8:(start + 4) * 8]}  # type: ignore[index]
                               for t in big["inputs"]]}  # type: ignore[attr-defined]
            r = d.request("POST", "/v2/models/bert/infer", json_body=part)
            assert r.status == 200, r.body
            parts.append(np.asarray(r.json()["outputs"][0]["data"]).reshape(4, -1))
        np.testing.assert_allclose(np.asarray(whole.json()["outputs"][0]["data"]).reshape(20, -1),
                                   np.concatenate(parts), rtol=1e-5, atol=1e-5)
    finally:
        d.stop()
