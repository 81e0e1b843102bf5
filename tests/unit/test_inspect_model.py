import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lorad.daemon.cli import main

DATA = Path(__file__).resolve().parents[1] / "data" / "exported"


def test_lists_every_weight_with_its_module_path_and_the_targets_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect-model", str(DATA / "encoder_dynamo_20.onnx"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["module"]: r for r in report["weights"]}
    assert len(rows) == 13 and report["unrecovered"] == []
    q = rows["layers.0.attn.q_proj"]
    assert (q["weight"], q["source"], q["shape"], q["layout"], q["target"]) == ("val_5", "name_scope", [32, 32], "[in, out]", "q_proj")
    assert (rows["head"]["op"], rows["head"]["layout"]) == ("Gemm", "[out, in]")
    assert report["config"] == "targets: [q_proj, k_proj, v_proj, out_proj, up, down, head]"

    assert main(["inspect-model", str(DATA / "encoder_torchscript_17.onnx")]) == 0
    table = capsys.readouterr().out
    assert "onnx::MatMul_226  layers.0.attn.q_proj    node_name" in table
    assert "model.targets: [q_proj, k_proj, v_proj, out_proj, up, down, head]" in table


def test_unrecoverable_path_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "w0")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w0"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    path = tmp_path / "anon.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert main(["inspect-model", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\nw0 +\(not recovered\) +- +MatMul", out) and "map it with model.weight_names" in out
    assert "1 weights have no module path" in out


def test_a_file_that_is_not_onnx_is_an_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.onnx").write_bytes(b"not a model")
    assert main(["inspect-model", str(tmp_path / "x.onnx")]) == 2
    assert "is not an ONNX model" in capsys.readouterr().err
    assert main(["inspect-model", str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
