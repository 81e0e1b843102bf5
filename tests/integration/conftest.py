"""One real daemon per test module (fast), each with its own state directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.lorad_process import DemoMath, RunningDaemon, start_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    d = start_daemon(tmp_path_factory.mktemp("lorad") / "state")
    yield d
    code = d.stop()
    assert code == 0, f"lorad exited with {code} on SIGTERM:\n{d.logs()}"


@pytest.fixture(scope="session")
def demo_math() -> DemoMath:
    return DemoMath()
