"""lorad.adapters.memory.one_arena: ONNX Runtime calls made from a thread other than the
main one (the batcher's runner, the worker pool) reuse the pages of earlier calls instead
of faulting in fresh ones, as they do in a thread's own glibc arena."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = r"""
import resource, sys, threading
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from lorad.adapters.memory import one_arena

if sys.argv[1] == "one":
    assert one_arena()
rng = np.random.default_rng(0)
weights = [numpy_helper.from_array(rng.random((384, 1536), np.float32), "w1"),
           numpy_helper.from_array(rng.random((1536, 384), np.float32), "w2")]
graph = helper.make_graph(
    [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
     helper.make_node("MatMul", ["r", "w2"], ["y"])],
    "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 384])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=weights)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.enable_cpu_mem_arena = False  # as lorad's engine opens its sessions
session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
x = rng.random((2048, 384), np.float32)  # 12 MB intermediates, as a large batch makes
faults = []

def calls():
    for i in range(12):
        session.run(None, {"x": x})
        if i in (1, 11):
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt)

thread = threading.Thread(target=calls)
thread.start()
thread.join()
print(faults[1] - faults[0])
"""


def _faults(mode: str) -> int:
    """Page faults of the thread's last 10 calls, in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def test_a_threads_onnx_runtime_calls_fault_in_fewer_pages_with_one_arena() -> None:
    own_arena, one = _faults("own"), _faults("one")
    # 10 calls with 12 MB intermediates: in the thread's own arena every page comes back
    # fresh each call (about 3,000 faults a call); in the main arena part of them are
    # reused (glibc 2.36: 29,958 against 24,576; MiniLM's banked call: 10,915 against 0).
    assert one < own_arena, (one, own_arena)
