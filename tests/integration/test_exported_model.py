"""A real daemon serving a torch export, with an unchanged PEFT adapter, exported back out."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from lorad.adapters.peft_format import read_peft_dir
from tests.integration.lorad_process import RunningDaemon, run_loractl, start_daemon

DATA = Path(__file__).resolve().parents[1] / "data" / "exported"
REF = np.load(DATA / "reference.npz")


def _infer(d: RunningDaemon, adapter: str | None) -> np.ndarray:
    inputs = [{"name": n, "datatype": "INT64", "shape": list(REF[f"encoder.{n}"].shape),
               "data": REF[f"encoder.{n}"].ravel().tolist()} for n in ("input_ids", "attention_mask")]
    doc: dict[str, object] = {"inputs": inputs}
    if adapter is not None:
        doc["parameters"] = {"adapter": adapter}
    r = d.request("POST", "/v2/models/demo/infer", json_body=doc)
    assert r.status == 200, r.body
    [out] = [o for o in r.json()["outputs"] if o["name"] == "logits"]
    return np.array(out["data"], np.float32).reshape(out["shape"])


def test_serve_upload_export_and_restart(tmp_path: Path) -> None:
    config = tmp_path / "lorad.yaml"
    # no weight_names: the TorchScript export's MatMul weights are anonymous (onnx::MatMul_N)
    config.write_text(f"model:\n  path: {DATA / 'encoder_torchscript_17.onnx'}\n"
                      "  targets: [q_proj, v_proj, up, head]\n  rank: 8\n")
    files = read_peft_dir(DATA / "peft_encoder_head")
    state = tmp_path / "state"
    d = start_daemon(state, "--config", str(config))
    try:
        assert d.upload("alice", files).status == 201
        np.testing.assert_allclose(_infer(d, "alice"), REF["encoder.peft_encoder_head"], atol=1e-4)

        path = "/v2/models/demo/adapters/alice/files"
        assert d.request("GET", path, token=None).status == 401
        r = d.request("GET", path + "?version=1")
        assert r.status == 200 and r.headers["Content-Type"] == "application/x-tar"
        assert r.headers["X-Lorad-Adapter-Version"] == "1"
        with tarfile.open(fileobj=io.BytesIO(r.body)) as tar:
            assert {m.name: tar.extractfile(m).read() for m in tar} == files  # type: ignore[union-attr]
        assert d.request("GET", path + "?version=7").status == 404
        assert d.request("GET", path + "?version=x").status == 400

        out = tmp_path / "exported"
        p = run_loractl("--state-dir", str(state), "--json", "adapters", "export", "alice", str(out))
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["version"] == 1
        assert read_peft_dir(out) == files
        p = run_loractl("--state-dir", str(state), "adapters", "export", "nobody", str(tmp_path / "x"))
        assert p.returncode == 1 and "not found" in p.stderr
    finally:
        assert d.stop() == 0, d.logs()

    d = start_daemon(state, "--config", str(config))
    try:  # what was stored reads back under the same config
        np.testing.assert_allclose(_infer(d, "alice"), REF["encoder.peft_encoder_head"], atol=1e-4)
        np.testing.assert_allclose(_infer(d, None), REF["encoder.base"], atol=1e-4)
    finally:
        assert d.stop() == 0, d.logs()
