"""``loractl fleet ...`` (through ``lorad.ota.cli.main``) against the real broker and a device."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.mosquitto import Broker
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService
from lorad.daemon.demo import DEMO_RANK, DEMO_TARGETS, demo_adapter_dirs, demo_model_path
from lorad.ota.cli import main
from lorad.ota.client import ClientConfig, OtaClient
from lorad.ota.repository import FleetRepository
from lorad.ota.target import ProbeSet, reconstruct


def _broker(mqtt: Broker) -> list[str]:
    return mqtt.fleet_args()


def test_fleet_cli_init_publish_rotate_and_status(mqtt: Broker, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    repo_dir = tmp_path / "fleet"
    assert main(["fleet", "init", str(repo_dir), "--threshold", "targets=1"]) == 0
    assert oct((repo_dir / "keys").stat().st_mode & 0o777) == "0o700"
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in (repo_dir / "keys").glob("*.key"))
    assert main(["fleet", "init", str(repo_dir)]) == 1  # refuses to overwrite a root of trust
    capsys.readouterr()

    engine = InferenceEngine(demo_model_path(), targets=DEMO_TARGETS, rank=DEMO_RANK)
    service = AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=8 << 20)
    device = OtaClient(ClientConfig(device_id="dev1", groups=("east",), state_dir=tmp_path / "dev1",
                                    trusted_root=(repo_dir / "metadata" / "1.root.json").read_bytes(),
                                    base_fingerprint=engine.fingerprint), mqtt.connect("dev1"), service)

    device.publish_status()  # the fleet knows group east from the device's status
    adapter_dir = demo_adapter_dirs()["invert"]
    rc = main(["--json", "fleet", "publish", str(repo_dir), "--name", "invert", "--adapter", str(adapter_dir),
               "--group", "east", "--base-model", str(demo_model_path()), "--targets", *DEMO_TARGETS,
               "--rank", str(DEMO_RANK), *_broker(mqtt)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["version"] == 1 and out["pushed"] is True
    [r] = device.update()
    assert r.result == "installed", r

    root = FleetRepository(repo_dir).load("root").signed
    rc = main(["--json", "fleet", "rotate", str(repo_dir), "root", root.roles["root"].keyids[0], *_broker(mqtt)])
    assert rc == 0 and json.loads(capsys.readouterr().out)["root_version"] == 2
    [r] = device.update()
    assert r.result == "up_to_date" and device.trusted_root().version == 2

    device.publish_status()
    assert main(["--json", "fleet", "status", *_broker(mqtt)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["devices"]["dev1"]["adapters"]["invert"]["fleet_version"] == 1

    # a wrong broker password is a connection failure (exit 3), not a crash
    bad = _broker(mqtt)
    (tmp_path / "bad").write_text("nope")
    bad[bad.index("--password-file") + 1] = str(tmp_path / "bad")
    assert main(["fleet", "push", str(repo_dir), *bad]) == 3


@pytest.mark.parametrize("flags,atol,rtol", [([], ProbeSet.atol, ProbeSet.rtol),
                                             (["--probe-atol", "1e-6", "--probe-rtol", "0.25"], 1e-6, 0.25)])
def test_publish_records_the_probe_tolerances_asked_for(tmp_path: Path, flags: list[str], atol: float,
                                                        rtol: float, capsys: pytest.CaptureFixture[str]) -> None:
    repo_dir = tmp_path / "fleet"
    assert main(["fleet", "init", str(repo_dir)]) == 0
    rc = main(["--json", "fleet", "publish", str(repo_dir), "--name", "invert", "--no-push",
               "--adapter", str(demo_adapter_dirs()["invert"]), "--group", "east",
               "--base-model", str(demo_model_path()), "--targets", *DEMO_TARGETS, "--rank", str(DEMO_RANK),
               "--allow-empty-audience", *flags])
    assert rc == 0, capsys.readouterr().err
    [(path, spec)] = FleetRepository(repo_dir).targets().items()
    dirname, _, base = path.rpartition("/")
    payload = (repo_dir / "targets" / dirname / f"{spec.sha256}.{base}").read_bytes()
    _, _, probes = reconstruct(spec, payload, base_fingerprint=spec.base_fingerprint)
    assert probes is not None and (probes.atol, probes.rtol) == (atol, rtol)


EXPORTED = Path(__file__).resolve().parents[1] / "data" / "exported"


def test_publish_with_the_device_config_uses_its_model_section(mqtt: Broker, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An exported model with anonymous weights, over the fleet, installed, survives a restart."""
    from lorad.daemon.ctl import main as loractl
    from lorad.daemon.ctl.fleet import model_section

    config = tmp_path / "lorad.yaml"
    # the device's other sections name device files the fleet machine does not have
    config.write_text(f"model: {{path: {EXPORTED / 'encoder_torchscript_17.onnx'}, targets: [q_proj, v_proj, up]}}\n"
                      "ota: {enabled: true, device_id: d1, trusted_root: /nonexistent/root.json}\n")
    repo_dir = tmp_path / "fleet"
    assert loractl(["fleet", "init", str(repo_dir)]) == 0
    section = model_section(config)

    def device_service() -> AdapterService:
        engine = InferenceEngine(section.path, targets=section.targets, rank=section.rank)
        return AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=8 << 20)

    service = device_service()
    device = OtaClient(ClientConfig(device_id="dev1", groups=("east",), state_dir=tmp_path / "dev1",
                                    trusted_root=(repo_dir / "metadata" / "1.root.json").read_bytes(),
                                    base_fingerprint=service.engine.fingerprint), mqtt.connect("dev1"), service)
    device.publish_status()  # the fleet records group east from it: the --no-push ones below know it
    rc = loractl(["--json", "fleet", "publish", str(repo_dir), "--name", "kws", "--group", "east",
                  "--adapter", str(EXPORTED / "peft_encoder_qvu"), "--config", str(config), *_broker(mqtt)])
    assert rc == 0, capsys.readouterr().err
    [(_, spec)] = FleetRepository(repo_dir).targets().items()
    assert spec.base_fingerprint == service.engine.fingerprint  # the same mapping as the device
    [r] = device.update()
    assert r.result == "installed", r
    ref = np.load(EXPORTED / "reference.npz")
    probe = {n: ref[f"encoder.{n}"] for n in ("input_ids", "attention_mask")}
    np.testing.assert_allclose(service.infer(probe, "kws").outputs["logits"], ref["encoder.peft_encoder_qvu"], atol=1e-4)
    # the installed files use PEFT names, so the device reads them back after a restart
    restarted = device_service()
    np.testing.assert_allclose(restarted.infer(probe, "kws").outputs["logits"], ref["encoder.peft_encoder_qvu"],
                               atol=1e-4)
    capsys.readouterr()

    bad = tmp_path / "bad.yaml"
    for text, exit_code, message in [
        ("model: {rank: 0}\n", 2, "model.rank: got 0"),
        (f"model: {{path: {EXPORTED / 'encoder_torchscript_17.onnx'}, targets: [c_attn]}}\n", 2, "'c_attn' matches no"),
        (f"model: {{path: {EXPORTED / 'encoder_torchscript_17.onnx'}, targets: [q_proj]}}\n", 1, "'layers.0.attn.v_proj'"),
        ("model: [\n", 2, "not valid YAML"),
    ]:
        bad.write_text(text)
        rc = loractl(["fleet", "publish", str(repo_dir), "--name", "kws2", "--no-push", "--group", "east",
                      "--adapter", str(EXPORTED / "peft_encoder_qvu"), "--config", str(bad)])
        err = capsys.readouterr().err
        assert rc == exit_code and message in err and "Traceback" not in err, (text, rc, err)
