"""Fixtures every suite may use: a real Mosquitto (:mod:`benchmarks.mosquitto`: mutual TLS
with generated certificates, a password file, ACLs and a ``max_packet_size``), one per
test session on a free loopback port; ``broker.restart()`` stops and starts it on the
same port.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

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
