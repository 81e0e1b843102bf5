"""schemathesis over the shipped OpenAPI document against a real daemon: requests generated
from daemon/openapi.yaml, valid and invalid, get no 5xx, and every answer is one the
document describes (status code, content type, body schema).

The budget is bounded (:data:`MAX_EXAMPLES` per operation and generation mode, derandomized so
that CI sees the same requests each run, no shrinking phase): the file takes 15-30 s on 2 cores.
Every operation is generated with valid data, and with invalid data where it has a parameter
or a body to get wrong; the bearer token is sent, so protected routes are exercised too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis  # a test dependency (pyproject.toml [test]), installed by .ci/setup
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from benchmarks.flower import SuperLink
from tests.integration.lorad_process import MODEL, RunningDaemon, start_daemon

REPO = Path(__file__).resolve().parents[2]
OPENAPI = REPO / "daemon" / "openapi.yaml"
#: Generated requests per operation and generation mode (valid / invalid data).
MAX_EXAMPLES = 10
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

SCHEMA = schemathesis.openapi.from_path(OPENAPI)


def _cases() -> list[tuple[schemathesis.APIOperation, schemathesis.GenerationMode]]:
    """Every operation with valid data, and with invalid data where it has something to get
    wrong besides the model name (which is fixed to the served one)."""
    out = []
    for result in SCHEMA.get_all_operations():
        operation = result.ok()
        out.append((operation, schemathesis.GenerationMode.POSITIVE))
        if len(operation.body) or any(p.name != "model" for p in operation.iter_parameters()):
            out.append((operation, schemathesis.GenerationMode.NEGATIVE))
    return out


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, superlink: SuperLink) -> Iterator[RunningDaemon]:
    root = tmp_path_factory.mktemp("lorad-schemathesis")
    config = root / "lorad.yaml"
    # The scheduler stays off so that generated examples start no training run in the
    # background; the device is a member of a real federation, so /v2/federated is served.
    config.write_text(json.dumps({"server": {"max_batch_rows": 16}, "trainer": {"schedule": False},
                                  "federated": superlink.federated_section()}))
    d = start_daemon(root / "state", "--config", str(config))
    yield d
    assert d.stop() == 0, d.logs()
    assert "Traceback" not in d.logs(), d.logs()


@pytest.mark.parametrize(("operation", "mode"), [pytest.param(op, mode, id=f"{op.label} {mode.value}") for op, mode in _cases()])
def test_generated_requests_get_documented_answers_and_no_5xx(
    operation: schemathesis.APIOperation, mode: schemathesis.GenerationMode, daemon: RunningDaemon
) -> None:
    # The served model in every path: another name is a 404 the document describes, but it
    # would spend the budget on the first line of every handler.
    strategy = operation.as_strategy(mode, path_parameters={"model": MODEL}) if "model" in operation.path \
        else operation.as_strategy(mode)
    headers = {"Authorization": f"Bearer {daemon.token}"}

    @given(case=strategy)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def generated(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=daemon.url, headers=headers, checks=CHECKS, timeout=30)

    generated()
