"""An explicit ``power.source`` this machine cannot honour stops a real ``lorad serve`` (and
``lorad check-config``) with exit 2 and a configuration error naming the key, why the
source is not there and what the machine has: never a silent ``none``."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.integration.lorad_process import run_lorad


def _config(tmp_path: Path, source: str) -> Path:
    (tmp_path / "sys").mkdir()  # a machine with no power sensor lorad can read
    cfg = tmp_path / "lorad.yaml"
    cfg.write_text(yaml.safe_dump({"power": {"source": source, "sys_root": str(tmp_path / "sys")}}))
    return cfg


def test_serve_with_a_power_source_the_machine_lacks_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "rapl")
    want = (f"power.source: got 'rapl', which this machine does not have (no readable RAPL powercap zone under "
            f"{tmp_path}/sys/class/powercap); this machine has no power source lorad can read")
    done = run_lorad("serve", "--config", str(cfg), "--port", "0", "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "invalid configuration" in done.stderr and want in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    checked = run_lorad("check-config", str(cfg))
    assert checked.returncode == 2 and want in checked.stderr, checked.stdout + checked.stderr


def test_serve_with_auto_on_the_same_machine_starts_without_power_series(tmp_path: Path) -> None:
    """``auto`` (the default) on that machine is fine: no power series, said once."""
    checked = run_lorad("check-config", str(_config(tmp_path, "auto")))
    assert checked.returncode == 0, checked.stdout + checked.stderr
