"""``ota.install_window`` and ``ota.policy.*``: parsed, validated, and turned into the
device's privacy policy, window and install gate (the trainer's probes on fixture trees)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorad.daemon.config import ConfigError, build_config
from lorad.daemon.ota_wiring import install_gate
from lorad.ota.config import OtaPolicy
from lorad.trainer.policy import SystemProbe


def test_policy_and_window_keys_parse_and_bad_ones_are_named() -> None:
    cfg = build_config({"ota": {"install_window": ["Mon-Fri 01:00-05:00"],
                                "policy": {"max_epsilon": 4, "require_privacy_record": True,
                                           "install_on_external_power": True}}}, environ={})
    assert cfg.ota.install_window == ("Mon-Fri 01:00-05:00",)
    assert cfg.ota.policy == OtaPolicy(max_epsilon=4.0, require_privacy_record=True, install_on_external_power=True)
    assert build_config({}, environ={}).ota.policy.max_epsilon is None
    with pytest.raises(ConfigError, match=r"ota.install_window.*HH:MM"):
        build_config({"ota": {"install_window": ["tonight"]}}, environ={})
    with pytest.raises(ConfigError, match=r"ota.policy.max_epsilon"):
        build_config({"ota": {"policy": {"max_epsilon": -1}}}, environ={})
    with pytest.raises(ConfigError, match=r"ota.policy"):
        build_config({"ota": {"policy": {"max_eps": 1}}}, environ={})


def test_install_gate_uses_the_trainers_probes(tmp_path: Path) -> None:
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    proc.mkdir()
    (proc / "loadavg").write_text("9.0 9.0 9.0 1/100 1\n")
    ac = sys_ / "class" / "power_supply" / "AC"
    ac.mkdir(parents=True)
    (ac / "type").write_text("Mains\n")
    (ac / "online").write_text("0\n")
    bat = sys_ / "class" / "power_supply" / "BAT0"
    bat.mkdir()
    (bat / "type").write_text("Battery\n")
    probe = SystemProbe(proc_root=proc, sys_root=sys_, cpu_count=2)
    assert install_gate(OtaPolicy(), probe) is None
    gate = install_gate(OtaPolicy(install_on_external_power=True, install_when_idle=True), probe)
    assert gate is not None and "on battery" in (gate() or "")
    (ac / "online").write_text("1\n")
    assert "load 4.50 per CPU" in (gate() or "")
    (proc / "loadavg").write_text("0.1 0.1 0.1 1/100 1\n")
    assert gate() is None


def test_client_config_carries_the_policy_and_the_window(tmp_path: Path) -> None:
    from lorad.ota.config import OtaConfig
    from lorad.ota.privacy import PrivacyPolicy
    from lorad.ota.window import InstallWindow

    ota = OtaConfig.load({"device_id": "d1", "install_window": ["Sat,Sun 00:00-24:00"], "policy": {"max_epsilon": 2.5,
                                                                                 "require_privacy_record": True}})
    cfg = ota.client_config(state_dir=tmp_path, trusted_root=b"{}", base_fingerprint="sha256:" + "0" * 64)
    assert cfg.privacy == PrivacyPolicy(max_epsilon=2.5, require_record=True)
    assert cfg.install_window == InstallWindow.parse(["Sat,Sun 00:00-24:00"])
    plain = OtaConfig(device_id="d1").client_config(state_dir=tmp_path, trusted_root=b"{}", base_fingerprint="sha256:" + "0" * 64)
    assert plain.privacy == PrivacyPolicy() and plain.install_window is None
