"""Every section of the config file: unknown key, wrong type, out of range, null where a value
is required, and sizes in every unit; each error names the full key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorad.daemon.cli import build_parser, config_from_args
from lorad.daemon.config import Config, ConfigError, build_config


def _nest(key: str, value: object) -> dict[str, Any]:
    doc: Any = value
    for part in reversed(key.split(".")):
        doc = {part: doc}
    return dict(doc)


def _cfg(doc: dict[str, Any]) -> Config:
    return build_config(doc, environ={}, base_dir=Path("/cfg"))


def _error(doc: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        _cfg(doc)
    return e.value


# section key path, one of its keys (listed in the unknown-key message)
SECTIONS = [
    ("", "log_level"),
    ("server", "port"),
    ("server.batching", "max_wait_us"),
    ("model", "targets"),
    ("cache", "budget_bytes"),
    ("trainer", "niceness"),
    ("trainer.store", "max_bytes"),
    ("trainer.policy", "time_window"),
    ("trainer.defaults", "clip_norm"),
    ("trainer.adapters.alice", "clip_norm"),
    ("ota", "device_id"),
    ("ota.broker", "keepalive_s"),
    ("ota.limits", "max_raw_bytes"),
    ("ota.policy", "max_epsilon"),
    ("power", "sample_interval_s"),
    ("metrics", "top_adapters"),
]


@pytest.mark.parametrize(("section", "known"), SECTIONS)
def test_unknown_key_is_named_with_the_allowed_keys(section: str, known: str) -> None:
    key = f"{section}.colour" if section else "colour"
    e = _error(_nest(key, 1))
    assert e.key == key
    assert str(e).startswith(f"{key}: unknown key")
    assert known in str(e) and "allowed keys:" in str(e)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("log_level", 3, "got 3; allowed: DEBUG"),
        ("server.worker_threads", "4", "got str '4'; expected an integer from 1 to 256"),
        ("server.host", 127001, "got int 127001; expected a non-empty string"),
        ("server.max_batch_rows", 2.5, "got float 2.5; expected an integer from 1 to 1048576"),
        ("server.batching.slots", "32", "got str '32'; expected an integer from 1 to 4096"),
        ("model.rank", 2.5, "got float 2.5; expected an integer from 1 to 1024"),
        ("model.targets", 7, "got int 7; expected a non-empty list of strings"),
        ("cache.budget_bytes", [1], "got [1]; expected an integer number of bytes"),
        ("trainer.isolate", "yes", "got str 'yes'; expected true or false"),
        ("trainer.store.retention_days", "7d", "got str '7d'; expected a number >= 0.001"),
        ("trainer.policy.time_window", 5, 'got 5; expected "HH:MM-HH:MM"'),
        ("trainer.defaults.learning_rate", True, "got bool True; expected a number > 0"),
        ("trainer.adapters.alice.steps", "many", "got str 'many'; expected an integer >= 1"),
        ("ota.enabled", "on", "got str 'on'; expected true or false"),
        ("ota.broker.port", "8883", "got str '8883'; expected an integer from 1 to 65535"),
        ("ota.limits.fetch_timeout_s", "10s", "got str '10s'; expected a number from 0.5 to 600"),
        ("ota.trusted_root", 5, "got int 5; expected a path"),
        ("ota.install_window", "01:00-05:00", 'got \'01:00-05:00\'; expected a list of ranges "[DAYS ]HH:MM-HH:MM"'),
        ("ota.policy.require_privacy_record", "yes", "got str 'yes'; expected true or false"),
        ("ota.policy.max_epsilon", "8", "got str '8'; expected a number from 0 to 1000000"),
        ("power.source", 1, "got 1; allowed: auto, none, jetson-ina3221-hwmon, jetson-ina3221-iio, rpi5-pmic, rapl"),
        ("power.sample_interval_s", "1s", "got str '1s'; expected a number from 0.05 to 3600"),
        ("power.sys_root", 5, "got int 5; expected a path"),
        ("power.limit_watts", True, "got bool True; expected a number >= 0"),
        ("metrics.top_adapters", 2.5, "got float 2.5; expected an integer from 0 to 1000"),
        ("trainer.policy.max_power_watts", "10W", "got str '10W'; expected a number >= 0"),
        ("trainer.policy.min_battery_percent", "50%", "got str '50%'; expected a number from 0 to 100"),
    ],
)
def test_wrong_type(key: str, value: object, fragment: str) -> None:
    e = _error(_nest(key, value))
    assert e.key == key and str(e).startswith(f"{key}: ")
    assert fragment in str(e)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("server.port", -1, "got -1; expected an integer from 0 to 65535"),
        ("server.max_batch_rows", 1 << 21, "got 2097152; expected an integer from 1 to 1048576"),
        ("server.batching.max_wait_us", 2_000_000, "got 2000000; expected an integer from 0 to 1000000"),
        ("server.batching.slots", 0, "got 0; expected an integer from 1 to 4096"),
        ("model.intra_op_threads", 5000, "got 5000; expected an integer from 0 to 1024"),
        ("cache.budget_bytes", "0MiB", "got 0; expected a positive size"),
        ("trainer.check_interval_s", 0.01, "got 0.01; expected a number >= 0.1"),
        ("trainer.store.max_examples_per_adapter", 0, "got 0; expected an integer >= 1"),
        ("trainer.policy.max_temperature_c", 250, "got 250; expected a number from 0 to 200"),
        ("trainer.defaults.sampling_rate", 1.5, "got 1.5; expected a number > 0 and <= 1"),
        ("trainer.adapters.alice.target_epsilon", 0, "got 0; expected a number > 0"),
        ("trainer.adapters.alice.delta", float("inf"), "got inf; expected a number > 0 and < 1"),
        ("ota.clock_slack_s", 7200, "got 7200; expected a number from 0 to 3600"),
        ("ota.broker.keepalive_s", 1, "got 1; expected an integer from 5 to 3600"),
        ("ota.limits.max_adapter_bytes", "1000B", "got 1000 (1kB); expected a size of at least 1KiB"),
        ("ota.limits.max_packet_bytes", "1GiB", "got 1073741824 (1GiB); expected a size from 4KiB to 256MiB"),
        ("ota.install_window", ["Mon-Fri 01:00-05:00", "Fri 25:00-26:00"],
         'got \'Fri 25:00-26:00\' (hours 00..24, minutes 00..59); expected a range "[DAYS ]HH:MM-HH:MM"'),
        ("ota.install_window", ["Someday 01:00-02:00"], "(day 'someday': expected names from Mon, Tue"),
        ("ota.policy.max_epsilon", -1, "got -1; expected a number from 0 to 1000000"),
        ("ota.policy.idle_max_load_per_cpu", -0.5, "got -0.5; expected a number from 0 to 1000"),
        ("power.sample_interval_s", 0.01, "got 0.01; expected a number from 0.05 to 3600"),
        ("power.limit_watts", -1, "got -1; expected a number >= 0"),
        ("metrics.top_adapters", -1, "got -1; expected an integer from 0 to 1000"),
        ("trainer.policy.max_power_watts", -0.5, "got -0.5; expected a number >= 0"),
        ("trainer.policy.min_battery_percent", 101, "got 101; expected a number from 0 to 100"),
    ],
)
def test_out_of_range(key: str, value: object, fragment: str) -> None:
    e = _error(_nest(key, value))
    assert e.key == key and str(e).startswith(f"{key}: ")
    assert fragment in str(e)


@pytest.mark.parametrize(
    "key",
    ["log_level", "server.port", "server.max_batch_rows", "server.batching.enabled", "model.rank",
     "cache.budget_bytes", "trainer.enabled", "trainer.store.max_bytes",
     "trainer.policy.min_new_examples", "trainer.defaults.clip_norm", "trainer.adapters.alice.rank",
     "ota.groups", "ota.broker.host", "ota.limits.max_adapter_bytes", "power.source", "power.sample_interval_s",
     "power.sys_root", "metrics.top_adapters"],
)
def test_null_where_a_value_is_required(key: str) -> None:
    e = _error(_nest(key, None))
    assert e.key == key
    assert str(e).startswith(f"{key}: got nothing; ")
    assert "expected" in str(e) or "allowed" in str(e)


def test_null_where_null_means_derive_it() -> None:
    cfg = _cfg({"ota": {"limits": {"max_raw_bytes": None}}, "model": {"path": None},
                "trainer": {"defaults": {"delta": None}, "policy": {"time_window": None, "max_power_watts": None,
                                                                   "min_battery_percent": None}},
                "server": None, "power": {"limit_watts": None}})
    assert cfg.ota.limits.max_raw_bytes is None and cfg.trainer.defaults.delta is None
    assert cfg.power.limit_watts is None and cfg.trainer.policy.max_power_watts is None
    assert cfg.trainer.policy.min_battery_percent is None
    assert cfg.server.port == 8080  # a null section is its defaults


def test_ota_device_id_required_when_enabled_names_the_key(tmp_path: Path) -> None:
    e = _error({"ota": {"enabled": True, "device_id": None}})
    assert e.key == "ota.device_id"


SIZE_KEYS = ["server.max_request_bytes", "cache.budget_bytes", "trainer.store.max_bytes",
             "trainer.store.max_example_bytes", "ota.limits.max_adapter_bytes", "ota.limits.max_packet_bytes",
             "ota.limits.max_raw_bytes"]
# One spelling per unit, each within every size key's bounds (4KiB .. 256MiB).
SPELLINGS = [("65536B", 65536), ("64kB", 64_000), ("1MB", 10**6), ("0.1GB", 10**8), ("0.0001TB", 10**8),
             ("64KiB", 65536), ("1MiB", 1024**2), ("0.125GiB", 1024**3 // 8), ("0.0001TiB", int(1e-4 * 1024**4)),
             (70000, 70000), ("5000 b", 5000)]


@pytest.mark.parametrize("key", SIZE_KEYS)
@pytest.mark.parametrize(("text", "expected"), SPELLINGS)
def test_a_size_in_each_unit(key: str, text: object, expected: int) -> None:
    doc = _nest(key, text)
    if key == "ota.limits.max_raw_bytes":
        doc["ota"]["limits"]["max_adapter_bytes"] = "4KiB"
    section, _, name = key.rpartition(".")
    node: Any = _cfg(doc)
    for part in section.split("."):
        node = getattr(node, part)
    assert getattr(node, name) == expected


def test_sizes_agree_between_sections() -> None:
    # Once cache.budget_bytes took "1TB" and trainer.store.max_bytes refused it.
    cfg = _cfg({"cache": {"budget_bytes": "1TB"}, "trainer": {"store": {"max_bytes": "1TB"}}})
    assert cfg.cache.budget_bytes == cfg.trainer.store.max_bytes == 10**12
    for key in ("cache.budget_bytes", "trainer.store.max_bytes"):
        assert "MiB" in str(_error(_nest(key, "1 parsec")))


def test_flags_are_validated_and_named_like_file_values(tmp_path: Path) -> None:
    for argv, key, fragment in ((["--host", ""], "server.host", "got ''; expected a non-empty string"),
                                (["--port", "-5"], "server.port", "got -5; expected an integer from 0 to 65535")):
        args = build_parser().parse_args(["serve", "--state-dir", str(tmp_path), *argv])
        with pytest.raises(ConfigError) as e:
            config_from_args(args)
        assert e.value.key == key and str(e.value) == f"{key}: {fragment}"


def test_models_built_in_code_are_validated_the_same_way() -> None:
    from lorad.daemon.config import BatchingConfig
    from lorad.ota.config import OtaLimits
    from lorad.trainer.config import StoreConfig

    with pytest.raises(ConfigError, match=r"^trainer\.store\.max_bytes: got 0; expected a positive size"):
        StoreConfig(max_bytes=0)
    assert StoreConfig(max_bytes="2GiB").max_bytes == 2 * 1024**3
    with pytest.raises(ConfigError, match=r"^ota\.limits\.max_raw_bytes: got 2048; expected at least"):
        OtaLimits(max_adapter_bytes=4096, max_raw_bytes=2048)
    with pytest.raises(ConfigError, match=r"^server\.batching\.slots: got 0; expected an integer from 1 to 4096"):
        BatchingConfig(slots=0)
