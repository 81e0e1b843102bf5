"""``loractl examples add`` against the daemon's real HTTP app (port 0): every line of a
--file is checked before the first is sent, and a refusal says how many were stored; a
language model's texts come from --text alone or from a --file of plain text or JSON lines,
each line's own user kept."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from lorad.adapters.bert_builder import TOKENIZER_KEY
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.llama_builder import build_llama
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService
from lorad.daemon import ctl, http_api
from lorad.daemon.ctl.client import UsageError
from lorad.daemon.ctl.training import _read_lines
from lorad.daemon.metrics import DaemonMetrics
from lorad.daemon.training_api import add_training_routes
from lorad.trainer.config import parse_trainer_section
from lorad.trainer.lm_examples import TOKENS
from lorad.trainer.service import TrainerService
from tests.unit.test_llama_builder import CFG, _tiny
from tests.unit.trainer_helpers import inputs, make_service

TOKEN = "k" * 32


@contextmanager
def _serve(tmp_path: Path, service: AdapterService, trainer_section: dict[str, Any]
           ) -> Iterator[tuple[list[str], TrainerService]]:
    """(loractl connection arguments, the trainer behind the server) of ``service``'s app."""
    config = parse_trainer_section({"testing": True, "noise": "seeded", "schedule": False, "isolate": False,
                                    **trainer_section})
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


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[list[str], TrainerService]]:
    """The tiny encoder (tensor examples with labels)."""
    with _serve(tmp_path, make_service(tmp_path), {}) as served:
        yield served


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


# -- a language model's texts ----------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(CFG.vocab_size)]


@pytest.fixture
def lm_daemon(tmp_path: Path) -> Iterator[tuple[list[str], TrainerService]]:
    """The tiny LLaMA decoder with a one-word-per-token tokenizer (w0 … w49, w0 for unknown words)."""
    import tokenizers  # here, not at the top: the ort-training venv (which deselects this) lacks it
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    weights, _ = _tiny(1)
    model = build_llama(CFG, weights, metadata={TOKENIZER_KEY: tok.to_str()}, llm_info={"eos_token_id": 49})
    engine = InferenceEngine(model, targets=["q_proj", "v_proj"], rank=2, intra_op_threads=1, allow_spinning=False)
    service = AdapterService(engine, AdapterRegistry(tmp_path / "adapters"), cache_budget_bytes=1 << 24)
    with _serve(tmp_path, service, {}) as served:
        assert served[1].language_model
        yield served


def _stored(trainer: TrainerService, adapter: str) -> list[tuple[str, str | None]]:
    """(text, user) of the adapter's examples in the order they were added."""
    ids = trainer.store.ids(adapter)
    db = sqlite3.connect(f"file:{trainer.store.path}?mode=ro", uri=True)
    try:
        users = dict(db.execute("SELECT example_id, user FROM example_users").fetchall())
    finally:
        db.close()
    out = []
    for ex in trainer.store.load(ids):
        assert set(ex.inputs) == {TOKENS} and ex.label.size == 0  # a text alone: no label stored
        out.append((" ".join(WORDS[int(t)] for t in ex.inputs[TOKENS]), users.get(ex.id)))
    return out


def test_a_plain_text_file_is_one_example_per_non_blank_line(lm_daemon: tuple[list[str], TrainerService],
                                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common, trainer = lm_daemon
    # The first non-blank line decides: not '{', so every line is text, a later '{' included.
    (tmp_path / "texts.txt").write_text("\n  \nw1 w2 w3\n\nw4 w5\n{w6} w7\n")
    assert ctl.main(["examples", "add", "bob", "--user", "carol", "--file", str(tmp_path / "texts.txt"), *common]) == 0
    assert "added 3 example(s) to bob; it now has 3" in capsys.readouterr().out
    assert _stored(trainer, "bob") == [("w1 w2 w3", "carol"), ("w4 w5", "carol"), ("w0 w7", "carol")]


def test_jsonl_lines_keep_their_own_user_and_need_no_label(lm_daemon: tuple[list[str], TrainerService],
                                                           tmp_path: Path) -> None:
    common, trainer = lm_daemon
    lines = [{"text": "w1 w2", "user": "alice"}, {"text": "w3 w4 w5"}, {"text": "w6 w7", "user": "erin"}]
    (tmp_path / "texts.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert ctl.main(["examples", "add", "bob", "--user", "dave", "--file", str(tmp_path / "texts.jsonl"), *common]) == 0
    assert _stored(trainer, "bob") == [("w1 w2", "alice"), ("w3 w4 w5", "dave"), ("w6 w7", "erin")]
    # Without --user, a line without one is nobody's.
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": "w8 w9"}) + "\n")
    assert ctl.main(["examples", "add", "eve", "--file", str(tmp_path / "more.jsonl"), *common]) == 0
    assert _stored(trainer, "eve") == [("w8 w9", None)]


def test_text_without_label_sends_the_text_alone(lm_daemon: tuple[list[str], TrainerService],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    common, trainer = lm_daemon
    assert ctl.main(["examples", "add", "bob", "--text", "w8 w9 w10", *common]) == 0
    assert _stored(trainer, "bob") == [("w8 w9 w10", None)]
    # A label would make it a classifier's example: refused before anything is sent.
    assert ctl.main(["examples", "add", "bob", "--text", "w1 w2", "--label", "3", *common]) == ctl.EXIT_USAGE
    assert "this model takes no labelled text" in capsys.readouterr().err
    assert trainer.examples_count("bob") == 1


def test_a_labelled_text_line_for_a_language_model_stores_nothing(lm_daemon: tuple[list[str], TrainerService],
                                                                  tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    common, trainer = lm_daemon
    lines = [{"text": "w1 w2"}, {"text": "w3 w4", "label": "greeting"}]
    (tmp_path / "texts.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert ctl.main(["examples", "add", "bob", "--file", str(tmp_path / "texts.jsonl"), *common]) == ctl.EXIT_USAGE
    assert "line 2: this model takes no labelled text" in capsys.readouterr().err
    assert trainer.examples_count("bob") == 0


def test_read_lines_tells_plain_text_from_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("\n\n  hello there  \n\n{not json}\nbye\n")
    assert _read_lines(path) == [("line 3", {"text": "  hello there  "}), ("line 5", {"text": "{not json}"}),
                                 ("line 6", {"text": "bye"})]
    path.write_text("\n" + "\n".join(json.dumps(d) for d in (
        {"text": "a b", "user": "u1", "extra": 1}, {"text": "c d", "label": "x"},
        {"inputs": {"x": [1.0]}, "label": 2, "user": "u2"})) + "\n")
    assert _read_lines(path) == [("line 2", {"text": "a b", "user": "u1"}), ("line 3", {"text": "c d", "label": "x"}),
                                 ("line 4", {"inputs": {"x": [1.0]}, "label": 2, "user": "u2"})]


@pytest.mark.parametrize("content, words", [
    ("", "no examples in it"),
    ("\n   \n", "no examples in it"),
    ('{"text": "a b", "user": 7}\n', "line 1: 'user' must be a string, got 7"),
    ('{"text": "a b"}\n{"inputs": {"x": [1.0]}}\n', "line 2: expected"),
    ('{"text": 5}\n', "line 1: expected"),
    ('{"text": "a b"}\nplain words\n', "line 2: not valid JSON"),
])
def test_read_lines_names_the_first_bad_line(tmp_path: Path, content: str, words: str) -> None:
    (tmp_path / "f").write_text(content)
    with pytest.raises(UsageError) as e:
        _read_lines(tmp_path / "f")
    assert words in str(e.value)
