"""The example store: round trips, validation, bounds, Poisson sampling, stable split."""

from __future__ import annotations

import math
import os
import sqlite3
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from lorad.trainer.errors import BadTrainingDataError, StoreFullError
from lorad.trainer.example_store import ExampleStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _store(tmp_path: Path, clock: Clock | None = None, **bounds: float) -> ExampleStore:
    kwargs: dict[str, float] = dict(max_examples_per_adapter=1000, max_bytes=10_000_000,
                                    retention_days=30)
    kwargs.update(bounds)
    return ExampleStore(tmp_path / "examples.db", clock=clock or Clock(), **kwargs)  # type: ignore[arg-type]


def _inputs(i: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.arange(8, dtype=np.int64) + i,
            "attention_mask": np.ones((1, 8), dtype=np.float32)}


def test_round_trip(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        big_endian = np.array([1.5, -2.0], dtype=">f8")
        a = store.add("alice", {**_inputs(0), "x": big_endian}, 3)
        b = store.add("alice", _inputs(1), np.array([0.25, 0.75], dtype=np.float32))
        (eb, ea) = store.load([b, a])
    assert (ea.id, eb.id, ea.adapter) == (a, b, "alice")
    np.testing.assert_array_equal(ea.inputs["input_ids"], np.arange(8))
    assert ea.inputs["attention_mask"].shape == (1, 8)
    assert ea.inputs["x"].dtype == np.float64 and ea.inputs["x"].tolist() == [1.5, -2.0]
    assert ea.label.shape == () and int(ea.label) == 3
    assert eb.label.dtype == np.float32 and eb.label.tolist() == [0.25, 0.75]
    ea.inputs["input_ids"][0] = 99  # loaded arrays are the caller's to modify


def test_persists_across_reopen_and_is_private(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        store.add("alice", _inputs(0), 1)
    assert stat.S_IMODE(os.stat(tmp_path / "examples.db").st_mode) == 0o600
    with _store(tmp_path) as store:
        assert store.count("alice") == 1
        with sqlite3.connect(tmp_path / "examples.db") as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_count_since(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        ids = [store.add("alice", _inputs(i), i) for i in range(5)]
        store.add("bob", _inputs(0), 0)
        assert store.count("alice") == 5 and store.count("bob") == 1
        assert store.count("alice", since_id=ids[2]) == 2
        assert store.count("carol") == 0
        assert store.adapters() == ["alice", "bob"]
    with _store(tmp_path) as reopened:  # a restart still knows who has examples
        assert reopened.adapters() == ["alice", "bob"]


@pytest.mark.parametrize(
    ("inputs", "label", "words"),
    [
        ({}, 1, "non-empty mapping"),
        ({"x": [1, 2]}, 1, "must be a numpy array"),
        ({"bad name!": np.zeros(2)}, 1, "input name must match"),
        ({"x": np.array(["a"])}, 1, "dtype <U1; allowed"),
        ({"x": np.array([1.0, math.nan])}, 1, "input 'x' contains NaN"),
        ({"x": np.zeros(2)}, np.array([math.inf]), "label contains NaN or infinity"),
        ({"x": np.zeros(2)}, np.array([object()]), "label has dtype object"),
    ],
)
def test_bad_examples_are_refused(tmp_path: Path, inputs: dict, label: object, words: str) -> None:
    with _store(tmp_path) as store:
        with pytest.raises(BadTrainingDataError, match=words.replace("(", r"\(")):
            store.add("alice", inputs, label)  # type: ignore[arg-type]
        assert store.count("alice") == 0


def test_bad_adapter_name(tmp_path: Path) -> None:
    with _store(tmp_path) as store, pytest.raises(ValueError, match="adapter name"):
        store.add("../x", _inputs(0), 1)
    # The registry's rule, matched in full ("$" alone would let a trailing newline through).
    with _store(tmp_path) as store, pytest.raises(ValueError, match="adapter name"):
        store.add("alice\n", _inputs(0), 1)


def test_constructor_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes must be an integer >= 1, got 0"):
        _store(tmp_path, max_bytes=0)
    with pytest.raises(ValueError, match="retention_days"):
        _store(tmp_path, retention_days=-1)


def test_a_full_adapter_refuses_and_keeps_what_it_has(tmp_path: Path) -> None:
    # An eviction would make adding one example also remove another: the accountant's
    # add-or-remove-one relation would not hold.
    with _store(tmp_path, max_examples_per_adapter=3) as store:
        ids = [store.add("alice", _inputs(i), i) for i in range(3)]
        with pytest.raises(StoreFullError, match=r"'alice' has 3 examples.*max_examples_per_adapter.*never evicted"):
            store.add("alice", _inputs(3), 3)
        store.add("bob", _inputs(0), 0)
        assert store.ids("alice") == ids
        assert store.count("bob") == 1


def test_a_full_store_never_evicts_another_adapters_examples(tmp_path: Path) -> None:
    per_example = 8 * 8 + 4 * 8 + 8  # int64[8] + float32[1,8] + int64 label
    with _store(tmp_path, max_bytes=3 * per_example) as store:
        a = store.add("alice", _inputs(0), 0)
        b = store.add("bob", _inputs(0), 0)
        c = store.add("alice", _inputs(1), 1)
        with pytest.raises(StoreFullError, match=r"past trainer.store.max_bytes=.*never evicted"):
            store.add("bob", _inputs(1), 1)
        assert store.ids("alice") == [a, c] and store.ids("bob") == [b]
        with pytest.raises(BadTrainingDataError, match="larger than the store's max_bytes"):
            store.add("alice", {"x": np.zeros(1000)}, 0)


def test_expired_examples_make_room(tmp_path: Path) -> None:
    clock = Clock()
    with _store(tmp_path, clock, max_examples_per_adapter=1, retention_days=1) as store:
        store.add("alice", _secret_example(), 1)
        with pytest.raises(StoreFullError):
            store.add("alice", _inputs(0), 0)
        clock.now += 2 * 86400
        store.add("alice", _inputs(0), 0)  # the secret one expired: gone, and erased
        assert store.count("alice") == 1
        assert _SECRET not in _on_disk(tmp_path)


def test_age_limit(tmp_path: Path) -> None:
    clock = Clock()
    with _store(tmp_path, clock, retention_days=2) as store:
        old = store.add("alice", _inputs(0), 0)
        clock.now += 86400
        new = store.add("alice", _inputs(1), 1)
        clock.now += 1.5 * 86400
        assert store.enforce_retention() == 1
        assert store.ids("alice") == [new]
        with pytest.raises(LookupError, match=str(old)):
            store.load([old, new])
        assert [e.id for e in store.load([old, new], skip_missing=True)] == [new]


def test_delete_adapter(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        for i in range(3):
            store.add("alice", _inputs(i), i)
        store.add("bob", _inputs(0), 0)
        assert store.delete_adapter("alice") == 3
        assert store.count("alice") == 0 and store.count("bob") == 1
        with sqlite3.connect(tmp_path / "examples.db") as raw:  # tensors went with them
            assert raw.execute("SELECT COUNT(*) FROM tensors").fetchone()[0] == 3


_SECRET = b"lorad-secret-example:7f3a9c1e5b"


def _secret_example() -> dict[str, np.ndarray]:
    return {"input_ids": np.frombuffer(_SECRET * 3, dtype=np.uint8).copy()}


def _on_disk(tmp_path: Path) -> bytes:
    """The database file and its write-ahead log, as a forensic reader would see them."""
    files = [tmp_path / "examples.db", tmp_path / "examples.db-wal"]
    return b"".join(f.read_bytes() for f in files if f.exists())


def test_deleted_examples_are_erased_from_the_files(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        store.add("bob", _inputs(0), 0)
        store.add("alice", _secret_example(), 1)
        store.add("bob", _inputs(1), 1)
        assert _SECRET in _on_disk(tmp_path)
        assert store.delete_adapter("alice") == 1
        assert _SECRET not in _on_disk(tmp_path)  # not in the log either, while still open
        assert store.count("bob") == 2
    assert _SECRET not in _on_disk(tmp_path)


def test_poisson_sampling(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        ids = [store.add("alice", _inputs(i), i) for i in range(400)]
        rng = np.random.default_rng(0)
        sizes = [len(store.sample_poisson("alice", 0.1, rng)) for _ in range(200)]
        # Binomial(400, 0.1): mean 40, sd 6; the batch size varies, as Poisson sampling does.
        assert abs(np.mean(sizes) - 40) < 6 * 6 / math.sqrt(200)
        assert len(set(sizes)) > 5
        subset = ids[:50]
        assert set(store.sample_poisson("alice", 1.0, rng, among=subset)) == set(subset)
        with pytest.raises(ValueError, match=r"q \(sampling rate\) must be in \(0, 1\]"):
            store.sample_poisson("alice", 0.0, rng)


def test_split_is_deterministic_and_stable(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        for i in range(300):
            store.add("alice", _inputs(i), i)
        train, holdout = store.split("alice", 0.2, seed=7)
        assert sorted(train + holdout) == store.ids("alice") and not set(train) & set(holdout)
        assert 30 <= len(holdout) <= 90
        assert store.split("alice", 0.2, seed=7) == (train, holdout)
        assert store.split("alice", 0.2, seed=8) != (train, holdout)
        new = store.add("alice", _inputs(0), 0)
        train2, holdout2 = store.split("alice", 0.2, seed=7)
        assert set(train2) - {new} == set(train) and set(holdout2) - {new} == set(holdout)
        assert store.split("alice", 0.0, seed=7)[1] == []


def test_corrupt_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "examples.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(BadTrainingDataError, match="not a valid database"):
        _store(tmp_path)


def test_corrupt_row_is_an_error(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        eid = store.add("alice", _inputs(0), 0)
        with sqlite3.connect(tmp_path / "examples.db") as raw:
            raw.execute("UPDATE tensors SET shape = '[3]' WHERE name = 'input_ids'")
        with pytest.raises(BadTrainingDataError, match=f"example {eid}, tensor 'input_ids'"):
            store.load([eid])


def test_threads(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    with _store(tmp_path) as store:
        def work(i: int) -> None:
            try:
                for j in range(20):
                    store.add(f"a{i}", _inputs(j), j)
                    store.load(store.sample_poisson(f"a{i}", 0.5, np.random.default_rng(j)))
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors
        assert [store.count(f"a{i}") for i in range(4)] == [20] * 4


def test_closed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.close()
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.count("alice")
