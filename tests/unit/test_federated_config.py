"""The ``federated:`` section: defaults, valid sections, and errors that name key, value and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorad.adapters.config_types import ConfigError
from lorad.adapters.names import NAME_ALLOWED
from lorad.daemon.cli import main
from lorad.daemon.config import Config, build_config, config_schema
from lorad.daemon.federated.config import SUPERLINK_ALLOWED, FederatedConfig, parse_superlink


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A config directory with a CA bundle and a SuperNode key (contents are not read by the config)."""
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "supernode.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    return tmp_path


def _cfg(section: object, base: Path, **other: object) -> Config:
    return build_config({"federated": section, **other}, environ={"STATE_DIRECTORY": str(base / "state")}, base_dir=base)


def _error(section: object, base: Path, **other: object) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        _cfg(section, base, **other)
    return e.value


def test_off_by_default(tmp_path: Path) -> None:
    fed = build_config({}, environ={"STATE_DIRECTORY": str(tmp_path)}).federated
    assert fed == FederatedConfig()
    assert (fed.enabled, fed.superlink, fed.root_certificates, fed.insecure, fed.auth_key) == (False, None, None, False, None)
    assert (fed.adapter, fed.round_epsilon, fed.min_examples, fed.supernode_port, fed.max_round_s) == \
        ("fleet", 1.0, 20, 0, 3600.0)
    assert _cfg(None, tmp_path).federated == fed  # "federated:" with everything commented out


def test_a_tls_section_with_relative_files(files: Path) -> None:
    fed = _cfg({"enabled": True, "superlink": "superlink.example.net:9092", "root_certificates": "ca.crt",
                "auth_key": "supernode.key", "adapter": "kiosk.v2", "round_epsilon": 0.5, "min_examples": 50,
                "supernode_port": 9094, "max_round_s": 600}, files).federated
    assert fed.root_certificates == files / "ca.crt" and fed.auth_key == files / "supernode.key"
    assert (fed.superlink, fed.adapter, fed.round_epsilon, fed.min_examples, fed.supernode_port, fed.max_round_s) == \
        ("superlink.example.net:9092", "kiosk.v2", 0.5, 50, 9094, 600)
    with pytest.raises(AttributeError, match="frozen"):
        fed.enabled = False  # type: ignore[misc]


@pytest.mark.parametrize(("address", "host", "port"), [
    ("127.0.0.1:9092", "127.0.0.1", 9092),
    ("[::1]:1", "::1", 1),
    ("[2001:db8::5]:65535", "2001:db8::5", 65535),
    ("superlink:443", "superlink", 443),
    ("a-1.fleet.example.net:9092", "a-1.fleet.example.net", 9092),
])
def test_superlink_addresses(address: str, host: str, port: int, tmp_path: Path) -> None:
    assert parse_superlink(address) == (host, port)
    assert _cfg({"enabled": True, "superlink": address, "insecure": True}, tmp_path).federated.superlink == address


@pytest.mark.parametrize("address", [
    "https://superlink:9092", "superlink", "superlink:", ":9092", "superlink:0", "superlink:65536", "superlink:99999x",
    "::1:9092", "[::1]", "[not-v6]:9092", "[10.0.0.1]:9092", "999.1.1.1:9092", "super link:9092", "-bad.host:9092",
    "superlink:9092/path", "", 9092, ["superlink:9092"],
])
def test_bad_superlink_names_key_value_and_form(address: object, tmp_path: Path) -> None:
    e = _error({"superlink": address}, tmp_path)  # checked also while disabled
    assert e.key == "federated.superlink"
    assert str(e) == f"federated.superlink: got {address!r}; expected {SUPERLINK_ALLOWED}"
    assert "port from 1 to 65535" in str(e) and "IPv6 address in brackets" in str(e)


def test_enabled_needs_the_superlink(tmp_path: Path) -> None:
    e = _error({"enabled": True, "insecure": True}, tmp_path)
    assert e.key == "federated.superlink"
    assert "got nothing; required when federated.enabled is true" in str(e) and '"HOST:PORT"' in str(e)


def test_enabled_needs_exactly_one_of_root_certificates_and_insecure(files: Path) -> None:
    neither = _error({"enabled": True, "superlink": "h:1"}, files)
    both = _error({"enabled": True, "superlink": "h:1", "insecure": True, "root_certificates": "ca.crt"}, files)
    assert neither.key == "federated.root_certificates" and both.key == "federated.insecure"
    for e in (neither, both):
        assert "exactly one of federated.root_certificates" in str(e) and "federated.insecure: true" in str(e)
    assert str(neither).startswith("federated.root_certificates: got nothing")
    assert str(both).startswith("federated.insecure: got true together with federated.root_certificates "
                                f"{str(files / 'ca.crt')!r}")
    # Only the enabled section must be complete: a disabled one may be half written.
    assert not _cfg({"insecure": True, "root_certificates": "ca.crt"}, files).federated.enabled


@pytest.mark.parametrize("key", ["root_certificates", "auth_key"])
def test_files_must_exist_when_enabled(key: str, files: Path) -> None:
    section = {"enabled": True, "superlink": "h:1", "root_certificates": "ca.crt", key: "missing.pem"}
    e = _error(section, files)
    assert e.key == f"federated.{key}"
    assert str(e) == f"federated.{key}: got {str(files / 'missing.pem')!r}; expected an existing, readable file"
    assert not _cfg({**section, "enabled": False}, files).federated.enabled  # as ota: checked when enabled


@pytest.mark.parametrize(("section", "key", "fragment"), [
    ({"adapter": "../etc"}, "federated.adapter", f"got '../etc'; allowed: {NAME_ALLOWED}"),
    ({"adapter": ""}, "federated.adapter", f"got ''; allowed: {NAME_ALLOWED}"),
    ({"round_epsilon": 0}, "federated.round_epsilon", "got 0; expected a number > 0"),
    ({"round_epsilon": -1.5}, "federated.round_epsilon", "got -1.5; expected a number > 0"),
    ({"round_epsilon": float("nan")}, "federated.round_epsilon", "expected a number > 0"),
    ({"min_examples": 0}, "federated.min_examples", "got 0; expected an integer >= 1"),
    ({"min_examples": 2.5}, "federated.min_examples", "got float 2.5; expected an integer >= 1"),
    ({"supernode_port": 70000}, "federated.supernode_port", "got 70000; expected an integer from 0 to 65535"),
    ({"supernode_port": -1}, "federated.supernode_port", "got -1; expected an integer from 0 to 65535"),
    ({"max_round_s": 0}, "federated.max_round_s", "got 0; expected a number > 0"),
    ({"enabled": "yes"}, "federated.enabled", "got str 'yes'; expected true or false"),
    ({"insecure": 1}, "federated.insecure", "got int 1; expected true or false"),
    ({"root_certificates": ""}, "federated.root_certificates", "expected a path (a non-empty string)"),
    ({"superlnk": "h:1"}, "federated.superlnk",
     "unknown key in section 'federated'; allowed keys: adapter, auth_key, enabled, insecure, max_round_s, "
     "min_examples, root_certificates, round_epsilon, superlink, supernode_port"),
    ([1], "federated", "expected a mapping"),
])
def test_bad_values_name_key_value_and_allowed(section: object, key: str, fragment: str, tmp_path: Path) -> None:
    e = _error(section, tmp_path)
    assert e.key == key
    assert str(e).startswith(f"{key}: ")
    assert fragment in str(e)


def test_the_section_built_directly_names_its_keys() -> None:
    with pytest.raises(ConfigError) as e:
        FederatedConfig(enabled=True, insecure=True)
    assert e.value.key == "federated.superlink"


def test_federated_needs_the_trainer(tmp_path: Path) -> None:
    e = _error({"enabled": True, "superlink": "h:1", "insecure": True}, tmp_path, trainer={"enabled": False})
    assert e.key == "federated.enabled"
    assert "trainer.enabled" in str(e) and "federated.enabled: false" in str(e)
    assert not _cfg({"superlink": "h:1"}, tmp_path, trainer={"enabled": False}).federated.enabled


def test_a_round_cannot_spend_more_than_the_adapters_budget(tmp_path: Path) -> None:
    section = {"enabled": True, "superlink": "h:1", "insecure": True, "round_epsilon": 3}
    e = _error(section, tmp_path, trainer={"adapters": {"fleet": {"target_epsilon": 2}}})
    assert e.key == "federated.round_epsilon"
    assert str(e) == ("federated.round_epsilon: got 3; expected a number > 0 and at most 2, the whole privacy budget "
                      "of adapter 'fleet' (its trainer target_epsilon)")
    e = _error({**section, "round_epsilon": 9}, tmp_path)  # trainer.defaults: target_epsilon 8
    assert "at most 8" in str(e)
    assert _cfg({**section, "round_epsilon": 8}, tmp_path).federated.round_epsilon == 8


def test_the_schema_and_check_config_show_the_section(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schema = config_schema()
    assert "federated" in schema["properties"]
    fed = schema["$defs"]["FederatedConfig"]
    assert fed["additionalProperties"] is False
    assert set(fed["properties"]) == set(FederatedConfig.model_fields)
    assert all(prop.get("description") for prop in fed["properties"].values())
    conf = files / "lorad.yaml"
    conf.write_text("federated:\n  enabled: true\n  superlink: '[::1]:9092'\n  root_certificates: ca.crt\n")
    assert main(["check-config", str(conf), "--state-dir", str(files / "state")]) == 0
    printed = json.loads(capsys.readouterr().out)["federated"]
    assert printed == {"enabled": True, "superlink": "[::1]:9092", "root_certificates": str(files / "ca.crt"),
                       "insecure": False, "auth_key": None, "adapter": "fleet", "round_epsilon": 1.0,
                       "min_examples": 20, "supernode_port": 0, "max_round_s": 3600.0}
    conf.write_text("federated: {enabled: true, superlink: 'h:1', insecure: true}\ntrainer: {enabled: false}\n")
    assert main(["check-config", str(conf), "--state-dir", str(files / "state")]) == 2
    assert "lorad: invalid configuration: federated.enabled: got true with trainer.enabled false" in capsys.readouterr().err
