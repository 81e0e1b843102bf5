"""daemon.config: defaults, units, overrides, and errors that name key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorad.daemon.cli import build_parser, config_from_args
from lorad.daemon.config import (
    ConfigError,
    build_config,
    default_state_dir,
    load_config,
    parse_byte_size,
)
from lorad.daemon.demo import DEMO_RANK, DEMO_TARGETS


def _cfg(doc: object, **kw: object) -> object:
    return build_config(doc, environ={}, base_dir=Path("/cfg"), **kw)  # type: ignore[arg-type]


def test_defaults(tmp_path: Path) -> None:
    cfg = build_config({"state_dir": str(tmp_path)}, environ={})
    assert cfg.state_dir == tmp_path
    assert (cfg.server.host, cfg.server.port, cfg.server.unix_socket) == ("127.0.0.1", 8080, None)
    assert cfg.server.token_file == tmp_path / "api-token"
    assert cfg.model.name == "demo" and cfg.model.path is None
    assert cfg.model.targets == DEMO_TARGETS and cfg.model.rank == DEMO_RANK
    assert cfg.model.device == "cpu"
    assert cfg.cache.budget_bytes == 64 * 1024**2
    assert cfg.log_level == "INFO"


def test_state_dir_from_systemd_environment() -> None:
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/lorad:/var/lib/other"}) == Path("/var/lib/lorad")
    cfg = build_config(None, environ={"STATE_DIRECTORY": "/var/lib/lorad"})
    assert cfg.state_dir == Path("/var/lib/lorad")
    assert cfg.server.token_file == Path("/var/lib/lorad/api-token")


def test_state_dir_default_is_per_user_without_systemd() -> None:
    assert "lorad" in str(default_state_dir({}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [(1024, 1024), ("64MiB", 64 * 1024**2), ("500kB", 500_000), ("1GB", 10**9), ("1.5 KiB", 1536), ("7", 7), ("12B", 12)],
)
def test_byte_sizes(text: object, expected: int) -> None:
    assert parse_byte_size(text) == expected


@pytest.mark.parametrize("bad", ["64 parsecs", "-3MiB", "", True, 1.5, [1], -1])
def test_bad_byte_size_names_key_and_allowed_forms(bad: object) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg({"cache": {"budget_bytes": bad}})
    msg = str(e.value)
    assert msg.startswith("cache.budget_bytes:") and repr(bad) in msg and "MiB" in msg
    assert e.value.key == "cache.budget_bytes"


def test_power_and_metrics_sections() -> None:
    c = build_config({"power": {"source": "rapl", "sample_interval_s": 0.5, "sys_root": "fixture", "limit_watts": 12},
                      "metrics": {"top_adapters": 3}, "trainer": {"policy": {"max_power_watts": 10}}},
                     environ={}, base_dir=Path("/cfg"))
    assert (c.power.source, c.power.sample_interval_s, c.power.sys_root, c.power.limit_watts) == \
        ("rapl", 0.5, Path("/cfg/fixture"), 12.0)
    assert c.metrics.top_adapters == 3 and c.trainer.policy.max_power_watts == 10.0
    d = build_config({"power": {"limit_watts": None}}, environ={}, base_dir=Path("/cfg"))
    assert (d.power.source, d.power.sys_root, d.power.limit_watts, d.metrics.top_adapters) == ("auto", Path("/sys"), None, 10)


def test_zero_budget_refused() -> None:
    with pytest.raises(ConfigError, match=r"cache\.budget_bytes: got 0; expected a positive size"):
        _cfg({"cache": {"budget_bytes": 0}})


@pytest.mark.parametrize(
    ("doc", "key", "fragment"),
    [
        ({"server": {"port": 70000}}, "server.port", "got 70000; expected an integer from 0 to 65535"),
        ({"server": {"port": "80"}}, "server.port", "got str '80'"),
        ({"server": {"host": ""}}, "server.host", "non-empty string"),
        ({"server": {"unix_socket_mode": "0777"}}, "server.unix_socket_mode", '"0600"'),
        ({"server": {"worker_threads": 0}}, "server.worker_threads", "from 1 to 256"),
        ({"model": {"device": "tpu"}}, "model.device", "got 'tpu'; allowed: cpu, cuda"),
        ({"model": {"rank": 0}}, "model.rank", "got 0"),
        ({"model": {"targets": []}}, "model.targets", "non-empty list of strings"),
        ({"model": {"name": "../etc"}}, "model.name", "got '../etc'"),
        ({"model": {"path": "/nonexistent/model.onnx"}}, "model.path", "existing ONNX file"),
        ({"model": {"tokenizer": "/nonexistent/tokenizer.json"}}, "model.tokenizer", "expected an existing file: a tokenizer.json"),
        ({"model": {"max_text_tokens": 2}}, "model.max_text_tokens", "got 2; expected an integer from 3"),
        ({"model": {"labels": [1, 2]}}, "model.labels", "non-empty list of strings"),
        ({"log_level": "LOUD"}, "log_level", "allowed: DEBUG"),
        ({"server": [1, 2]}, "server", "expected a mapping"),
        ({"power": {"source": "solar"}}, "power.source", "allowed: auto, none, jetson-ina3221-hwmon"),
        ({"power": {"sample_interval_s": 0}}, "power.sample_interval_s", "from 0.05 to 3600"),
        ({"power": {"limit_watts": -1}}, "power.limit_watts", "got -1"),
        ({"metrics": {"top_adapters": 5000}}, "metrics.top_adapters", "from 0 to 1000"),
        ({"trainer": {"policy": {"min_battery_percent": 120}}}, "trainer.policy.min_battery_percent",
         "got 120; expected a number from 0 to 100"),
        ({"server": {"max_batch_rows": 0}}, "server.max_batch_rows", "got 0; expected an integer from 1"),
        ({"server": {"batching": {"max_wait_us": -1}}}, "server.batching.max_wait_us", "from 0 to 1000000"),
        ({"server": {"batching": {"enabled": "yes"}}}, "server.batching.enabled", "true or false"),
        ({"server": {"batching": {"wait": 1}}}, "server.batching.wait", "allowed keys: enabled, inline_us, max_wait_us, slots"),
    ],
)
def test_bad_values_name_key_value_and_allowed(doc: dict[str, object], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(doc)
    assert e.value.key == key
    assert str(e.value).startswith(f"{key}: ")
    assert fragment in str(e.value)


def test_unknown_top_level_key_lists_allowed() -> None:
    with pytest.raises(ConfigError) as e:
        _cfg({"sever": {"port": 1}})
    assert e.value.key == "sever"
    for allowed in ("server", "model", "cache", "state_dir", "log_level"):
        assert allowed in str(e.value)


def test_unknown_section_key_lists_allowed() -> None:
    with pytest.raises(ConfigError) as e:
        _cfg({"server": {"prot": 1}})
    msg = str(e.value)
    assert e.value.key == "server.prot"
    assert "unknown key in section 'server'" in msg
    assert "host" in msg and "port" in msg and "max_request_bytes" in msg


def test_socket_mode_spellings() -> None:
    for spelling in ("0660", "660", 0o660, 660, "0o660"):
        assert _cfg({"server": {"unix_socket_mode": spelling}}).server.unix_socket_mode == 0o660  # type: ignore[attr-defined]


def test_relative_paths(tmp_path: Path) -> None:
    cfg = build_config(
        {"state_dir": "state", "server": {"unix_socket": "lorad.sock", "token_file": "secret/token"}},
        environ={},
        base_dir=tmp_path,
    )
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.server.unix_socket == tmp_path / "state" / "lorad.sock"
    assert cfg.server.token_file == tmp_path / "state" / "secret" / "token"


def test_own_model_keeps_generic_targets(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    cfg = build_config({"model": {"path": str(model), "name": "mine"}}, environ={})
    assert cfg.model.path == model and cfg.model.targets == ("*",) and cfg.model.rank == 8


def test_file_and_flags_override(tmp_path: Path) -> None:
    f = tmp_path / "lorad.yaml"
    f.write_text("server:\n  host: 0.0.0.0\n  port: 9000\ncache:\n  budget_bytes: 16MiB\nlog_level: debug\n")
    args = build_parser().parse_args(["serve", "--config", str(f), "--port", "0", "--state-dir", str(tmp_path / "s")])
    cfg = config_from_args(args)
    assert cfg.server.host == "0.0.0.0"  # from the file
    assert cfg.server.port == 0  # the flag wins
    assert cfg.state_dir == tmp_path / "s"
    assert cfg.cache.budget_bytes == 16 * 1024**2
    assert cfg.log_level == "DEBUG"


def test_bad_flag_is_named_like_a_key(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--port", "99999", "--state-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match=r"^server\.port: got 99999"):
        config_from_args(args)


def test_invalid_yaml_and_non_mapping(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f, environ={})
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(f, environ={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text("")
    assert load_config(f, overrides={"state_dir": str(tmp_path)}, environ={}).server.port == 8080


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = build_config({"state_dir": str(tmp_path)}, environ={})
    with pytest.raises(AttributeError):
        cfg.server.port = 1  # type: ignore[misc]


def test_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    path = tmp_path / "lorad.yaml"
    path.write_text(f"state_dir: {tmp_path}\ntrainer:\n  defaults:\n    delta: 1e-5\n    learning_rate: 2E-3\n")
    config = load_config(path)
    assert config.trainer.defaults.delta == 1e-5
    assert config.trainer.defaults.learning_rate == 2e-3


def test_weight_names_map_peft_modules_to_onnx_weights(tmp_path: Path) -> None:
    cfg = build_config({"state_dir": str(tmp_path), "model": {"weight_names": {"encoder.fc": "onnx::MatMul_7"}}}, environ={})
    assert dict(cfg.model.weight_names) == {"encoder.fc": "onnx::MatMul_7"}
    with pytest.raises(ConfigError) as e:
        build_config({"state_dir": str(tmp_path), "model": {"weight_names": ["encoder.fc"]}}, environ={})
    assert e.value.key == "model.weight_names" and "mapping of PEFT module names" in str(e.value)
