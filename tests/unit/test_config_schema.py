"""The published JSON Schema: every key described, the README generated from it, the CLI commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorad.daemon.cli import main
from lorad.daemon.config import build_config, config_schema
from lorad.daemon.config_doc import BEGIN, END, README, reference, render_readme


def _properties(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    defs = config_schema()["$defs"]
    for name, prop in node.get("properties", {}).items():
        key = f"{path}.{name}" if path else name
        yield key, prop
        ref = prop.get("$ref") or (prop.get("additionalProperties") or {}).get("$ref")
        if ref:
            yield from _properties(defs[ref.rsplit("/", 1)[-1]], key + (".NAME" if "$ref" not in prop else ""))


def test_every_key_has_a_description() -> None:
    keys = dict(_properties(config_schema()))
    missing = sorted(k for k, p in keys.items() if not p.get("description"))
    assert not missing, f"config keys without a schema description (Field(description=...)): {missing}"
    # The walk reaches every section, so a key added anywhere is checked.
    for key in ("server.port", "model.targets", "cache.budget_bytes", "trainer.store.max_bytes",
                "trainer.adapters.NAME.clip_norm", "ota.limits.max_raw_bytes", "ota.broker.host", "log_level"):
        assert key in keys


def test_readme_reference_matches_the_schema() -> None:
    text = README.read_text(encoding="utf-8")
    assert BEGIN in text and END in text
    assert render_readme(text) == text, "README.md is out of date: run .venv/bin/python -m lorad.daemon.config_doc"
    block = reference()
    for key, _ in _properties(config_schema()):
        if not key.startswith("trainer.adapters.NAME."):
            assert f"`{key}`" in block


def test_readme_check_fails_on_a_stale_block(tmp_path: Path) -> None:
    from lorad.daemon.config_doc import main as doc_main

    stale = tmp_path / "README.md"
    stale.write_text(f"intro\n{BEGIN}\n| `server.prot` | old |\n{END}\nrest\n")
    assert doc_main(["--check", "--readme", str(stale)]) == 1
    assert doc_main(["--readme", str(stale)]) == 0
    assert doc_main(["--check", "--readme", str(stale)]) == 0
    assert "`server.port`" in stale.read_text() and stale.read_text().endswith(f"{END}\nrest\n")


def test_config_schema_command_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"].endswith("2020-12/schema")
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"state_dir", "log_level", "server", "model", "cache", "generation", "trainer",
                                         "ota", "power", "metrics", "federated"}
    limits = schema["$defs"]["OtaLimits"]["properties"]
    assert {"type": "null"} in limits["max_raw_bytes"]["anyOf"]


def test_check_config_print_is_yaml_that_loads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "lorad.yaml"
    f.write_text("server: {port: 9000, unix_socket_mode: '0660'}\ncache: {budget_bytes: 1TB}\n"
                 "trainer:\n  store: {max_bytes: 1TB}\n  policy: {time_window: '22:30-06:00'}\n"
                 "  adapters: {alice: {target_epsilon: 2}}\n"
                 "ota: {limits: {max_raw_bytes: null}}\n")
    assert main(["check-config", "--print", str(f), "--state-dir", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    doc = yaml.safe_load(printed)
    assert doc["server"]["port"] == 9000 and doc["server"]["unix_socket_mode"] == "0660"
    assert doc["cache"]["budget_bytes"] == 10**12 and doc["trainer"]["store"]["max_bytes"] == 10**12
    assert doc["trainer"]["policy"]["time_window"] == "22:30-06:00"
    assert doc["ota"]["limits"]["max_raw_bytes"] is None
    # The printed configuration is itself a valid file that means the same.
    again = build_config(doc, environ={}, base_dir=tmp_path)
    first = build_config(yaml.safe_load(f.read_text()), overrides={"state_dir": str(tmp_path / "s")},
                         environ={}, base_dir=tmp_path)
    assert again == first


def test_check_config_opens_the_model_and_matches_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "lorad.yaml"
    f.write_text("model:\n  targets: ['fc1*', 'encoder.*.q_proj']\n")
    assert main(["check-config", str(f), "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorad: invalid configuration: model.targets:")
    assert "'encoder.*.q_proj'" in err and "matches no MatMul/Gemm weight" in err
    assert "modules that can be targets:" in err and "fc1" in err
    f.write_text("model:\n  path: broken.onnx\n")
    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    assert main(["check-config", str(f), "--state-dir", str(tmp_path)]) == 2
    assert "model.path:" in capsys.readouterr().err
