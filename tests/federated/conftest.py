"""Fixtures of the federated suite: TLS material per session, a real SuperLink per module.

A failed test's report carries the SuperLink's log (a section "SuperLink log").
"""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests.federated.flower import SuperLink, TlsFiles, make_tls


@pytest.fixture(scope="session")
def flower_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA and a certificate for 127.0.0.1 and localhost."""
    return make_tls(tmp_path_factory.mktemp("flower-tls"))


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory, flower_tls: TlsFiles) -> Iterator[SuperLink]:
    """A SuperLink with TLS on a free loopback port, for the tests of one module."""
    with SuperLink(tmp_path_factory.mktemp("superlink"), tls=flower_tls) as link:
        yield link


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    link = getattr(item, "funcargs", {}).get("superlink")
    if report.failed and isinstance(link, SuperLink):
        report.sections.append(("SuperLink log", link.logs()))
    return report
