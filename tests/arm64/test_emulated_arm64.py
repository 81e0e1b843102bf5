"""The aarch64 job: lorad installed with ``pip install .`` in an emulated arm64 Debian 12.

``.ci/setup`` builds the chroot once (qemu-user through binfmt_misc, debootstrap from
Debian's archive) and later runs reuse it; it also downloads, on the host, the aarch64
wheels the job needs (``.ci/arm64/wheels``). ``.ci/arm64/job`` installs this checkout
into a venv inside the chroot from those wheels alone, without network, and runs
``probe.py`` there against the installed ``lorad``. The same probe runs on the host, and
the two architectures must agree to 1e-4.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("probe.py")

pytestmark = [pytest.mark.arm64, pytest.mark.timeout(3600)]


def _last_json(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"the probe printed no JSON object:\n{stdout}"
    doc: dict[str, Any] = json.loads(lines[-1])
    return doc


# Run in the chroot: no name resolves and no address outside the machine (151.101.0.223 is
# one of pypi.org's) is reachable.
_NETWORK_CHECK = """
import json, socket
out = {}
try:
    socket.getaddrinfo("pypi.org", 443)
    out["dns"] = "resolved"
except OSError as e:
    out["dns"] = type(e).__name__
try:
    socket.create_connection(("151.101.0.223", 443), timeout=10).close()
    out["connect"] = "connected"
except OSError as e:
    out["connect"] = e.errno
print(json.dumps(out))
"""


def test_arm64_chroot_has_no_network() -> None:
    """The job installs from the host's wheelhouse only: the chroot cannot reach PyPI."""
    run = subprocess.run(
        [str(REPO / ".ci/arm64/chroot"), "run", "/usr/bin/python3", "-c", _NETWORK_CHECK],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    out = _last_json(run.stdout)
    assert out["dns"] != "resolved", out
    assert out["connect"] == errno.ENETUNREACH, out


def test_arm64_install_serves_and_trains_like_x86_64() -> None:
    arm = subprocess.run(
        [str(REPO / ".ci/arm64/chroot"), "run", "/src/.ci/arm64/job"],
        capture_output=True, text=True, timeout=3300,
    )
    assert arm.returncode == 0, f"the arm64 job failed ({arm.returncode}):\n{arm.stdout}\n{arm.stderr[-20000:]}"
    host = subprocess.run([sys.executable, str(PROBE)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert host.returncode == 0, host.stderr
    a, h = _last_json(arm.stdout), _last_json(host.stdout)

    assert a["machine"] == "aarch64"
    assert a["exit_code"] == 0 and h["exit_code"] == 0
    assert a["run"]["status"] == h["run"]["status"] == "accepted", (a["run"], h["run"])
    assert set(a["logits"]) == set(h["logits"]) == {"base", "mirror", "plus-one", "invert", "plus-one-dp"}
    for name in h["logits"]:
        np.testing.assert_allclose(a["logits"][name], h["logits"][name], atol=1e-4, err_msg=name)
    # Each adapter changes the answer, so the comparison covers five distinct computations.
    for name in ("mirror", "plus-one", "invert", "plus-one-dp"):
        assert not np.allclose(h["logits"][name], h["logits"]["base"], atol=1e-2), name
    # The demo quantised to int8 and int4, fp32 compute: served, and a DP run trained through
    # the quantised weights, alike on both machines.
    assert set(a["quantised"]) == set(h["quantised"]) == {"int8", "int4"}
    for q, hq in h["quantised"].items():
        aq = a["quantised"][q]
        assert aq["exit_code"] == hq["exit_code"] == 0
        assert aq["run"]["status"] == hq["run"]["status"] == "accepted", (q, aq["run"], hq["run"])
        for name in ("base", "plus-one-dp"):
            np.testing.assert_allclose(aq["logits"][name], hq["logits"][name], atol=1e-4, err_msg=f"{q} {name}")
        assert not np.allclose(hq["logits"]["plus-one-dp"], hq["logits"]["base"], atol=1e-2), q
        assert not np.allclose(hq["logits"]["base"], h["logits"]["base"], atol=1e-3), q  # quantised: another base
        # int8 compute (the default): activation codes may differ by one between the two
        # CPUs (0.019 of logits up to 14 measured), the answer does not.
        a8, h8 = np.asarray(a["quantised_int8_compute"][q]), np.asarray(h["quantised_int8_compute"][q])
        np.testing.assert_allclose(a8, h8, atol=0.05, err_msg=f"{q} int8 compute")
        assert (a8.reshape(4, -1).argmax(1) == h8.reshape(4, -1).argmax(1)).all(), q


@pytest.mark.smollm2
def test_arm64_imports_smollm2_and_generates_the_same_greedy_tokens_as_x86_64() -> None:
    """``lorad import-model gguf`` and greedy generation, with and without a PEFT adapter, on
    both machines (fp32 compute, see probe_llm.py): the same texts token for token."""
    arm = subprocess.run(
        [str(REPO / ".ci/arm64/chroot"), "run", "/src/.ci/arm64/job", "tests/arm64/probe_llm.py"],
        capture_output=True, text=True, timeout=3300,
    )
    assert arm.returncode == 0, f"the arm64 LLM job failed ({arm.returncode}):\n{arm.stdout}\n{arm.stderr[-20000:]}"
    host = subprocess.run([sys.executable, str(PROBE.with_name("probe_llm.py"))], capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    assert host.returncode == 0, host.stderr
    a, h = _last_json(arm.stdout), _last_json(host.stdout)
    assert (a["machine"], a["exit_code"], h["exit_code"]) == ("aarch64", 0, 0)
    assert a["texts"] == h["texts"]
    changed = [p for p in ("The capital of France is", "def fibonacci(n):") if h["texts"][f"peft: {p}"] != h["texts"][f"base: {p}"]]
    assert changed  # the adapter changes a text: the comparison covers the LoRA path
