"""Fixtures every suite may use: a real Mosquitto (:mod:`benchmarks.mosquitto`: mutual TLS
with generated certificates, a password file, ACLs and a ``max_packet_size``), one per
test session on a free loopback port; ``broker.restart()`` stops and starts it on the
same port. A real Flower SuperLink with TLS (:mod:`benchmarks.flower`), one per test
module that asks for ``superlink``; a failed test's report carries its log.
"""

from __future__ import annotations

import shutil
from collections.abc import Generator, Iterator

import pytest

from benchmarks.flower import SuperLink, TlsFiles, make_tls
from benchmarks.mosquitto import Broker, available, create_broker

MAX_PACKET = 16 * 1024  # small on purpose: payloads must be chunked to pass


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if not available():
        pytest.fail("mosquitto is not installed (.ci/setup installs the Debian package)")
    d = tmp_path_factory.mktemp("mosquitto")
    b = create_broker(d, max_packet=MAX_PACKET)
    try:
        yield b
    finally:
        b.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mqtt(broker: Broker) -> Iterator[Broker]:
    """The session broker, emptied of retained messages, with this test's clients closed after."""
    broker.clear_retained()
    start = len(broker.transports)
    yield broker
    for t in broker.transports[start:]:
        t.close()
    del broker.transports[start:]


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
