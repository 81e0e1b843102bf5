"""Start-up loads only what the configured features need (issue 23, item 4).

Each check runs in a fresh Python process and reads its ``sys.modules``: a real daemon
started (model opened, sites bound, ready) and stopped, or the command lines' parsers built
as ``--help`` builds them. Module names, not timings: what is not imported costs nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# What a run of the trainer needs (graphs, backends, the stepper process, the gate) and ε's
# library (scipy): none of it is needed to serve and collect examples on a fresh device.
_RUN_MACHINERY = ("lorad.trainer.model_setup", "lorad.trainer.lm_examples", "lorad.trainer.portable_graph",
                  "lorad.trainer.stepper_process", "lorad.trainer.validation", "dp_accounting", "scipy")
_TRAINER = ("lorad.trainer.service", "lorad.trainer.run", "lorad.trainer.scheduler", "lorad.daemon.training_api")
_OTA = ("lorad.daemon.ota_wiring", "lorad.ota.client", "lorad.ota.transport", "lorad.ota.repository", "paho", "tuf",
        "securesystemslib")

_DAEMON = """
import asyncio, json, sys
from pathlib import Path
from lorad.daemon.app import Daemon
from lorad.daemon.config import build_config

async def main() -> None:
    daemon = Daemon(build_config(json.loads(sys.argv[1])))
    await daemon.start()
    try:
        assert daemon.is_ready()
        print(json.dumps(sorted(sys.modules)))
    finally:
        await daemon.stop()

asyncio.run(main())
"""


def _modules(code: str, *args: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (or their submodules) are in ``modules``."""
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def _daemon_modules(tmp_path: Path, **sections: object) -> set[str]:
    doc = {"state_dir": str(tmp_path / "state"), "server": {"host": "127.0.0.1", "port": 0}, **sections}
    return _modules(_DAEMON, json.dumps(doc))


@pytest.mark.timeout(300)
def test_a_daemon_without_training_or_ota_loads_neither(tmp_path: Path) -> None:
    modules = _daemon_modules(tmp_path, trainer={"enabled": False})
    assert "lorad.daemon.http_api" in modules  # it did serve
    assert _loaded(modules, _TRAINER + _RUN_MACHINERY + _OTA) == []


@pytest.mark.timeout(300)
def test_a_daemon_with_training_loads_the_trainer_but_not_a_run(tmp_path: Path) -> None:
    modules = _daemon_modules(tmp_path)  # trainer.enabled is the default
    assert "lorad.trainer.service" in modules
    assert _loaded(modules, _RUN_MACHINERY + _OTA) == []


def test_loractl_builds_every_command_without_numpy_onnx_or_the_config_model() -> None:
    modules = _modules("""
        import json, sys
        from lorad.daemon.ctl import build_parser
        build_parser().format_help()
        print(json.dumps(sorted(sys.modules)))
    """)
    heavy = ("numpy", "onnx", "onnxruntime", "pydantic", "yaml", "lorad.daemon.config", "lorad.ota.target",
             "cryptography", "tqdm", *_OTA)
    assert _loaded(modules, heavy) == []


def test_lorad_cli_starts_without_onnx() -> None:
    modules = _modules("""
        import json, sys
        from lorad.daemon.cli import build_parser
        build_parser().format_help()
        print(json.dumps(sorted(sys.modules)))
    """)
    serving = ("onnx", "onnxruntime", "lorad.daemon.app", "lorad.daemon.ctl.fleet", "aiohttp")
    assert _loaded(modules, (*serving, *_TRAINER, *_RUN_MACHINERY, *_OTA)) == []


def test_fleet_probe_tolerance_defaults_are_the_probe_sets() -> None:
    from lorad.ota.cli_support import PROBE_ATOL, PROBE_RTOL
    from lorad.ota.target import ProbeSet

    assert (ProbeSet.atol, ProbeSet.rtol) == (PROBE_ATOL, PROBE_RTOL)
