"""``loractl examples add --file`` against the daemon's real HTTP app (port 0): every line
is checked before the first is sent, and a refusal says how many were stored."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from lorad.daemon import ctl, http_api
from lorad.daemon.metrics import DaemonMetrics
from lorad.daemon.training_api import add_training_routes
from lorad.trainer.config import parse_trainer_section
from lorad.trainer.service import TrainerService
from tests.unit.trainer_helpers import inputs, make_service

TOKEN = "k" * 32


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[list[str], TrainerService]]:
    """(loractl connection arguments, the trainer behind the server)."""
    service = make_service(tmp_path)
    config = parse_trainer_section({"testing": True, "noise": "seeded", "schedule": False, "isolate": False})
    trainer = TrainerService(config, adapters=service, state_dir=tmp_path, proc_root=tmp_path, sys_root=tmp_path)
    executor = ThreadPoolExecutor(2)
    app = http_api.make_app(http_api.ApiSettings(
        service=service, metrics=DaemonMetrics(CollectorRegistry()), token=TOKEN, executor=executor,
        max_request_bytes=1 << 20, ready=lambda: True))
    add_training_routes(app, trainer, http_api.protected, http_api.authenticated, executor=executor)
    trainer.start()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    host, port = runner.addresses[0][:2]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    (tmp_path / "token").write_text(TOKEN)
    try:
        yield ["--url", f"http://{host}:{port}", "--token-file", str(tmp_path / "token")], trainer
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        trainer.close()
        executor.shutdown()


def _line(x: object, label: object) -> str:
    return json.dumps({"inputs": {"x": x}, "label": label})


def _good_lines(n: int) -> list[str]:
    return [_line(row.tolist(), 1) for row in inputs(n, seed=3)]


@pytest.mark.parametrize("bad, words", [
    ("{not json", "line 4: not valid JSON"),
    (json.dumps({"inputs": {"x": [1.0]}}), "line 4: expected"),
    (_line([[1.0, 2.0], [3.0]], 1), "line 4: input 'x' must be a nested list of numbers"),
    (_line([["a"]], 1), "line 4: input 'x' must be a nested list of numbers"),
    (_line([1.0, 2.0, 3.0], 1), "line 4: input 'x' has shape [3]"),
    (json.dumps({"inputs": {"y": [1.0]}, "label": 1}), "line 4: the model has no input 'y'"),
])
def test_a_bad_line_stores_nothing_and_is_named(daemon: tuple[list[str], TrainerService], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str], bad: str, words: str) -> None:
    common, trainer = daemon
    good = _good_lines(3)
    # Line 3 is blank (skipped, still counted), so the bad example is on line 4.
    (tmp_path / "ex.jsonl").write_text("\n".join([good[0], good[1], "", bad, good[2]]) + "\n")
    assert ctl.main(["examples", "add", "bob", "--file", str(tmp_path / "ex.jsonl"), *common]) == ctl.EXIT_USAGE
    assert words in capsys.readouterr().err
    assert trainer.examples_count("bob") == 0


def test_a_refused_line_says_how_many_were_stored(daemon: tuple[list[str], TrainerService], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    common, trainer = daemon
    good = _good_lines(3)
    # Only the server knows the label's shape: this line passes loractl's checks.
    refused = _line(inputs(1, seed=5)[0].tolist(), [[1, 2], [3, 4]])
    (tmp_path / "ex.jsonl").write_text("\n".join([good[0], good[1], refused, good[2]]) + "\n")
    code = ctl.main(["examples", "add", "bob", "--file", str(tmp_path / "ex.jsonl"), *common])
    assert code == ctl.EXIT_REFUSED
    err = capsys.readouterr().err
    assert "added 2 of 4; line 3 refused: " in err and "label" in err
    assert trainer.examples_count("bob") == 2

    assert ctl.main(["examples", "add", "bob", "--json", "--file", str(tmp_path / "ex.jsonl"), *common]) == 1
    assert json.loads(capsys.readouterr().out)["error"].startswith("added 2 of 4; line 3 refused: ")


def test_all_lines_stored(daemon: tuple[list[str], TrainerService], tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    common, trainer = daemon
    (tmp_path / "ex.jsonl").write_text("\n".join(_good_lines(3)) + "\n")
    assert ctl.main(["examples", "add", "bob", "--file", str(tmp_path / "ex.jsonl"), *common]) == 0
    assert "added 3 example(s) to bob; it now has 3" in capsys.readouterr().out
    assert trainer.examples_count("bob") == 3
