"""examples/keyboard/make_data.py: the committed per-user texts are what the script writes, and have the shape the benchmark needs."""

from __future__ import annotations

import filecmp
import importlib.util
import itertools
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "keyboard"
DATA = EXAMPLE / "data"
SCRIPT = EXAMPLE / "make_data.py"


def _load_script() -> ModuleType:
    # examples/ is not a package: load the script by path, as the benchmark does.
    spec = importlib.util.spec_from_file_location("keyboard_make_data", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_data = _load_script()
USERS = sorted(make_data.USERS)


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_script_reproduces_committed_data(tmp_path: Path) -> None:
    out = tmp_path / "data"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, capture_output=True, timeout=120)
    assert _files(out) == _files(DATA)
    _, mismatch, errors = filecmp.cmpfiles(DATA, out, _files(DATA), shallow=False)
    assert (mismatch, errors) == ([], [])


def test_another_seed_gives_other_texts(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--seed", "1"], check=True, capture_output=True,
                   timeout=120)
    assert (tmp_path / "users" / "alice" / "train.jsonl").read_bytes() != (DATA / "users" / "alice" / "train.jsonl").read_bytes()


@pytest.mark.parametrize("user", USERS)
def test_every_user_has_held_out_texts_of_phone_length(user: str) -> None:
    folder = DATA / "users" / user
    train, test = _rows(folder / "train.jsonl"), _rows(folder / "test.jsonl")
    assert (len(train), len(test)) == (make_data.TRAIN_TEXTS, make_data.TEST_TEXTS)
    assert all(r.keys() == {"text", "user"} and r["user"] == user for r in train + test)
    train_texts, test_texts = [r["text"] for r in train], [r["text"] for r in test]
    assert len(set(train_texts)) == len(train_texts) and len(set(test_texts)) == len(test_texts)
    assert not set(test_texts) & set(train_texts)
    assert all(make_data.MIN_WORDS <= len(t.split()) <= make_data.MAX_WORDS for t in train_texts + test_texts)
    assert (folder / "train.txt").read_text(encoding="utf-8").splitlines() == train_texts


def _followers(user: str, nickname: str) -> Counter[str]:
    """The words typed after ``nickname`` (or ``nickname's``) in ``user``'s training texts."""
    after: Counter[str] = Counter()
    for row in _rows(DATA / "users" / user / "train.jsonl"):
        words = [w.rstrip(".,!?;:") for w in row["text"].split()]
        after.update(b for a, b in itertools.pairwise(words) if a in (nickname, f"{nickname}'s"))
    return after


@pytest.mark.parametrize("nickname", ["Sam", "Jo"])
def test_a_nickname_is_followed_by_other_words_for_each_user(nickname: str) -> None:
    followers = {user: _followers(user, nickname) for user in USERS}
    using = [user for user in USERS if followers[user]]
    assert len(using) >= 2
    # Each user's context after the name is their own: what one user types next, the others never do.
    for i, a in enumerate(using):
        for b in using[i + 1:]:
            assert not set(followers[a]) & set(followers[b]), (nickname, a, b)


def test_next_word_cases() -> None:
    assert make_data.next_word_cases("On call again tonight, ping me on #incident-bridge.") == [
        ("On call again ", "tonight"),
        ("On call again tonight, ", "ping"),
        ("On call again tonight, ping ", "me"),
        ("On call again tonight, ping me ", "on"),
        ("On call again tonight, ping me on ", "#incident-bridge"),
    ]
    # Targets stripped of trailing punctuation only; a word that is only punctuation is skipped;
    # the prefix keeps the whitespace exactly as typed.
    assert make_data.next_word_cases("Sam's recital is  at 7:30. ! Maple Hall?!") == [
        ("Sam's recital is  ", "at"),
        ("Sam's recital is  at ", "7:30"),
        ("Sam's recital is  at 7:30. ! ", "Maple"),
        ("Sam's recital is  at 7:30. ! Maple ", "Hall"),
    ]
    assert make_data.next_word_cases("only three words") == []
