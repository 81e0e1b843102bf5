"""The registry's listing index on real files: listing says what ``get`` says, reads nothing
that did not change, finds damage done behind its back with stats alone, and survives an
index file that is missing, damaged, torn or stale."""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorad.adapters import registry as registry_module
from lorad.adapters import registry_index
from lorad.adapters.errors import AdapterDamagedError, AdapterNotFoundError
from lorad.adapters.registry import META_FILE, AdapterRegistry, IndexedAdapter
from lorad.adapters.registry_index import INDEX_FILE, JOURNAL_FILE, scalar_meta

WEIGHTS = "adapter_model.safetensors"
#: A short "racy" window for these tests, and a pause that outlasts it.
RACY_NS = 30_000_000
AGE_S = 0.06


def files_of(i: int) -> dict[str, bytes]:
    return {WEIGHTS: f"weights-{i}".encode() * 10, "adapter_config.json": b"{}"}


def listed(reg: AdapterRegistry) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for name, found in reg.listing().items():
        if isinstance(found, AdapterDamagedError):
            out[name] = ("damaged", found.version, found.sound_versions)
        else:
            assert isinstance(found, IndexedAdapter)
            out[name] = ("ready", found.version, dict(found.meta), found.created)
    return out


def expected(reg: AdapterRegistry) -> dict[str, tuple[object, ...]]:
    """What ``get`` says of every stored adapter (call it after :func:`listed`: a ``get``
    that finds damage makes the next listing check that adapter)."""
    out: dict[str, tuple[object, ...]] = {}
    for name in reg.names():
        try:
            stored = reg.get(name)
        except AdapterDamagedError as e:
            out[name] = ("damaged", e.version, e.sound_versions)
        else:
            out[name] = ("ready", stored.version, scalar_meta(stored.meta), stored.created)
    return out


@pytest.fixture()
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Every pointer, lorad.json and index file the registry reads, by path relative to
    its adapter directory (``a/current``, ``a/2/lorad.json``)."""
    seen: Counter[str] = Counter()
    real = registry_module._read_stamped

    def counting(path: Path, limit: int = registry_module._MAX_SMALL_FILE) -> tuple[bytes, registry_index.Stamp]:
        seen["/".join(path.parts[-3:] if path.name == META_FILE else path.parts[-2:])] += 1
        return real(path, limit)

    monkeypatch.setattr(registry_module, "_read_stamped", counting)
    yield seen


@pytest.fixture()
def short_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_index, "RACY_NS", RACY_NS)


def aged(reg: AdapterRegistry) -> AdapterRegistry:
    """Let every stamp outlast the racy window, and have listing take them again."""
    time.sleep(AGE_S)
    reg.listing()
    return reg


@pytest.mark.usefixtures("short_racy_window")
def test_listing_reads_only_what_changed(tmp_path: Path, reads: Counter[str]) -> None:
    reg = AdapterRegistry(tmp_path)
    for name in "abc":
        reg.put(name, files_of(1), meta={"rank": 4, "targets": ["q", "v"], "source": "upload"})
    created = {n: reg.get(n).created for n in "abc"}
    aged(reg)
    reads.clear()
    assert listed(reg) == {n: ("ready", 1, {"rank": 4, "source": "upload"}, created[n]) for n in "abc"}
    assert reads == Counter(), "nothing changed: listing reads no file"

    reg.put("b", files_of(2), meta={"rank": 8})
    aged(reg)
    reads.clear()
    assert listed(reg)["b"][:3] == ("ready", 2, {"rank": 8})
    assert reads == Counter()
    assert reg.indexed("b").version == 2 and reads == Counter()
    with pytest.raises(AdapterNotFoundError):
        reg.indexed("nope")


@pytest.mark.usefixtures("short_racy_window")
def test_a_young_entry_is_checked_again(tmp_path: Path, reads: Counter[str]) -> None:
    """Just written, a file's stamp could survive a same-size rewrite in the same clock
    tick: listing reads it again until it is older than the racy window."""
    reg = AdapterRegistry(tmp_path)
    reg.put("a", files_of(1))
    reads.clear()
    reg.listing()
    assert reads == Counter({"a/current": 1, "a/1/lorad.json": 1})
    time.sleep(AGE_S)
    reg.listing()
    reads.clear()
    reg.listing()
    assert reads == Counter()


def _pointer_same_size(adir: Path) -> None:
    (adir / "current").write_bytes(b"x\n")


def _pointer_empty(adir: Path) -> None:
    (adir / "current").write_bytes(b"")


def _pointer_to_other_version(adir: Path) -> None:
    (adir / "current").write_bytes(b"1\n")  # same size: a rollback done behind our back


def _pointer_dangling(adir: Path) -> None:
    (adir / "current").write_bytes(b"7\n")


def _pointer_symlink(adir: Path) -> None:
    (adir / "current").unlink()
    (adir / "current").symlink_to("/etc/passwd")


def _record_truncated(adir: Path) -> None:
    record = adir / "2" / META_FILE
    record.write_bytes(record.read_bytes()[:25])


def _record_same_size(adir: Path) -> None:
    record = adir / "2" / META_FILE
    data = record.read_bytes()
    record.write_bytes(data.replace(b'"version": 2', b'"version": 3'))


def _record_missing(adir: Path) -> None:
    (adir / "2" / META_FILE).unlink()


def _version_removed(adir: Path) -> None:
    shutil.rmtree(adir / "2")


BEHIND_THE_BACK = {f.__name__.lstrip("_"): f for f in (
    _pointer_same_size, _pointer_empty, _pointer_to_other_version, _pointer_dangling, _pointer_symlink,
    _record_truncated, _record_same_size, _record_missing, _version_removed)}


@pytest.mark.usefixtures("short_racy_window")
@pytest.mark.parametrize("damage", BEHIND_THE_BACK)
def test_damage_behind_the_back_is_listed_without_a_read(tmp_path: Path, damage: str, reads: Counter[str]) -> None:
    reg = AdapterRegistry(tmp_path)
    reg.put("k", files_of(1))
    reg.put("k", files_of(2))
    reg.put("other", files_of(3))
    aged(reg)
    BEHIND_THE_BACK[damage](tmp_path / "k")
    reads.clear()
    now = listed(reg)
    assert not any(p.startswith("other/") for p in reads), "the others are not read"
    assert now == expected(reg)
    if damage == "pointer_to_other_version":
        assert now["k"][:2] == ("ready", 1)
    else:
        assert now["k"][0] == "damaged"
    assert now["other"][:2] == ("ready", 1)
    reg.set_current("k", 1)  # the repair
    assert listed(reg)["k"][:2] == ("ready", 1)


@pytest.mark.usefixtures("short_racy_window")
@pytest.mark.parametrize("damage", ["truncated", "missing", "flipped-bit"])
def test_damage_to_an_adapter_file_is_listed_once_a_read_finds_it(tmp_path: Path, damage: str) -> None:
    """Listing stats the pointer and lorad.json only; the read path (every load) checks the
    files, and what it finds is listed from then on."""
    reg = AdapterRegistry(tmp_path)
    reg.put("a", files_of(1))
    aged(reg)
    weights = tmp_path / "a" / "1" / WEIGHTS
    if damage == "truncated":
        weights.write_bytes(b"w")
    elif damage == "missing":
        weights.unlink()
    else:
        data = bytearray(weights.read_bytes())
        data[0] ^= 1
        weights.write_bytes(bytes(data))
    with pytest.raises(AdapterDamagedError):
        reg.read_file("a", None, WEIGHTS)
    assert listed(reg)["a"][0] == "damaged"
    reg.put("a", files_of(2))
    assert listed(reg)["a"][:2] == ("ready", 2)


@pytest.mark.usefixtures("short_racy_window")
@pytest.mark.parametrize("damage", ["truncated", "missing", "a-directory"])
def test_a_start_checks_the_files_too(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    """Damage done while the daemon was down is found at start, files included, logged and
    listed without a read."""
    AdapterRegistry(tmp_path).put("a", files_of(1))
    AdapterRegistry(tmp_path).put("b", files_of(2))
    time.sleep(AGE_S)
    AdapterRegistry(tmp_path)  # indexes both, now old enough to be trusted
    weights = tmp_path / "a" / "1" / WEIGHTS
    if damage == "truncated":
        weights.write_bytes(b"w")
    else:
        weights.unlink()
        if damage == "a-directory":
            weights.mkdir()
    with caplog.at_level(logging.WARNING, logger="lorad.adapters.registry"):
        reg = AdapterRegistry(tmp_path)
    assert "adapter 'a' (version 1) is damaged on disk" in caplog.text and "'b'" not in caplog.text
    assert listed(reg)["a"] == ("damaged", 1, ())
    assert listed(reg)["b"][:2] == ("ready", 1)


def _stored(tmp_path: Path) -> AdapterRegistry:
    reg = AdapterRegistry(tmp_path, keep_versions=2)
    for i, name in enumerate(["a", "b", "c", "a", "b"]):
        reg.put(name, files_of(i), meta={"i": i})
    return reg


@pytest.mark.usefixtures("short_racy_window")
def test_reopen_trusts_a_sound_index(tmp_path: Path, reads: Counter[str]) -> None:
    aged(_stored(tmp_path))
    AdapterRegistry(tmp_path)  # the entries were young when written: checked, then written back
    time.sleep(AGE_S)
    reads.clear()
    reg = AdapterRegistry(tmp_path)
    assert {Path(p).name for p in reads} == {INDEX_FILE, JOURNAL_FILE}, "a start reads the index, not every adapter"
    assert listed(reg) == expected(reg)


@pytest.mark.usefixtures("short_racy_window")
@pytest.mark.parametrize("spoil", ["missing", "garbage", "edited", "edited-journal", "torn-journal", "foreign-journal", "symlink"])
def test_a_missing_or_damaged_index_is_rebuilt(tmp_path: Path, spoil: str, caplog: pytest.LogCaptureFixture) -> None:
    aged(_stored(tmp_path))
    index, journal = tmp_path / INDEX_FILE, tmp_path / JOURNAL_FILE
    assert index.is_file() and journal.is_file()
    if spoil == "missing":
        index.unlink()
    elif spoil == "garbage":
        index.write_bytes(b"\x00garbage")
    elif spoil == "edited":
        index.write_bytes(index.read_bytes().replace(b'"format":1', b'"format":2'))
    elif spoil == "edited-journal":
        header, first, rest = journal.read_bytes().split(b"\n", 2)
        assert first.endswith(b'["a",null]')
        journal.write_bytes(b"\n".join([header, first.replace(b'"a"', b'"c"'), rest]))
    elif spoil == "torn-journal":
        journal.write_bytes(journal.read_bytes()[:-20])
    elif spoil == "foreign-journal":
        journal.write_bytes(b"base " + b"0" * 64 + b"\n" + journal.read_bytes().split(b"\n", 1)[1])
    else:
        index.unlink()
        index.symlink_to(tmp_path / "a" / "current")
    with caplog.at_level(logging.WARNING, logger="lorad.adapters.registry"):
        reg = AdapterRegistry(tmp_path)
    assert ("listing index" in caplog.text) == (spoil in ("garbage", "edited", "symlink"))
    assert listed(reg) == expected(reg)
    assert index.is_file() and not index.is_symlink() and not journal.exists()  # written anew
    reg.put("d", files_of(9))
    assert AdapterRegistry(tmp_path).listing().keys() == {"a", "b", "c", "d"}


@pytest.mark.usefixtures("short_racy_window")
def test_a_stale_index_lists_what_is_on_disk(tmp_path: Path) -> None:
    """As if the daemon died after each change but before its index was written."""
    aged(_stored(tmp_path))
    AdapterRegistry(tmp_path)
    time.sleep(AGE_S)
    index, journal = tmp_path / INDEX_FILE, tmp_path / JOURNAL_FILE
    old_index = index.read_bytes()
    reg = AdapterRegistry(tmp_path, keep_versions=2)
    reg.set_current("a", 1)  # a rollback
    reg.put("b", files_of(7))  # a new version
    reg.delete("c")
    reg.put("c", files_of(8))  # deleted and created again: a new adapter of an old name
    reg.put("d", files_of(9))  # a new adapter
    time.sleep(AGE_S)
    index.write_bytes(old_index)
    journal.unlink(missing_ok=True)
    reg = AdapterRegistry(tmp_path, keep_versions=2)
    assert {n: v[:2] for n, v in listed(reg).items()} == {
        "a": ("ready", 1), "b": ("ready", 3), "c": ("ready", 2), "d": ("ready", 1)}
    assert listed(reg) == expected(reg)


def test_the_journal_is_compacted(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path, keep_versions=1)
    for i in range(3 * registry_module._MIN_COMPACT):
        reg.put("abc"[i % 3], files_of(i), meta={"i": i})
    lines = (tmp_path / JOURNAL_FILE).read_bytes().count(b"\n")
    assert 1 <= lines <= registry_module._MIN_COMPACT + 1  # header + at most one snapshot's worth
    reg = AdapterRegistry(tmp_path, keep_versions=1)
    assert listed(reg) == expected(reg)
    assert {n: v[2] for n, v in listed(reg).items()} == {"a": {"i": 189}, "b": {"i": 190}, "c": {"i": 191}}


OPS = st.lists(st.tuples(
    st.sampled_from(["put", "rollback", "delete", "damage-pointer", "damage-record", "truncate-and-read", "reopen"]),
    st.sampled_from("ab"), st.integers(0, 3)), min_size=1, max_size=14)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_listing_agrees_with_get(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
                                 ops: list[tuple[str, str, int]]) -> None:
    """Random changes, damage and restarts: after each, listing says what ``get`` says.

    Every stamp is trusted at once (no racy window), so listing leans on the stamps alone;
    the damage done here always changes a size, which no clock tick can hide."""
    monkeypatch.setattr(registry_index, "RACY_NS", 0)
    root = tmp_path_factory.mktemp("reg")
    reg = AdapterRegistry(root, keep_versions=2)
    k = 0
    for op, name, n in ops:
        adir = root / name
        versions = reg.versions(name)
        if op == "put":
            k += 1
            reg.put(name, files_of(k), meta={"k": k})
        elif op == "rollback" and versions:
            try:
                reg.set_current(name, versions[n % len(versions)])
            except AdapterDamagedError:
                pass
        elif op == "delete" and versions:
            reg.delete(name)
        elif op == "damage-pointer" and versions:
            (adir / "current").write_bytes(b"garbage" * (n + 1))
        elif op == "damage-record" and versions:
            record = adir / str(versions[n % len(versions)]) / META_FILE
            record.write_bytes(record.read_bytes()[: 10 * n + 5])
        elif op == "truncate-and-read" and versions:
            v = versions[n % len(versions)]
            (adir / str(v) / WEIGHTS).write_bytes(b"w" * n)
            with pytest.raises(AdapterDamagedError):
                reg.read_file(name, v, WEIGHTS)
        elif op == "reopen":
            reg = AdapterRegistry(root, keep_versions=2)
        assert listed(reg) == expected(reg), (op, name, n)
