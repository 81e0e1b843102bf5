"""AdapterRegistry on real files in tmp_path."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest

from lorad.adapters.errors import AdapterDamagedError, AdapterNotFoundError, AdapterStorageError
from lorad.adapters.registry import META_FILE, AdapterRegistry

FILES = {"adapter_model.safetensors": b"\x00weights\xff" * 100, "adapter_config.json": b"{}"}


def files_of(i: int) -> dict[str, bytes]:
    return {"adapter_model.safetensors": f"weights-{i}".encode() * 10, "adapter_config.json": b"{}"}


def test_round_trip(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    v = reg.put("user-1", FILES, meta={"rank": 4, "source": "upload"})
    assert v == 1
    stored = reg.get("user-1")
    assert (stored.name, stored.version) == ("user-1", 1)
    assert stored.path == tmp_path / "user-1" / "1"
    assert dict(stored.meta) == {"rank": 4, "source": "upload"}
    assert stored.files == tuple(sorted(FILES))
    assert stored.created > 0
    for name, data in FILES.items():
        assert reg.read_file("user-1", 1, name) == data
        assert reg.read_file("user-1", None, name) == data
    assert reg.current_version("user-1") == 1
    assert reg.versions("user-1") == [1]
    assert reg.names() == ["user-1"]
    # a second registry object on the same root sees the same state
    assert AdapterRegistry(tmp_path).get("user-1", 1) == stored


def test_versions_are_monotonic_and_never_reused(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path, keep_versions=1)
    assert [reg.put("a", files_of(i)) for i in range(5)] == [1, 2, 3, 4, 5]
    reg.delete("a")
    assert reg.names() == []
    assert reg.current_version("a") is None
    # reopening (a daemon restart) must not forget the high-water mark either
    reg = AdapterRegistry(tmp_path, keep_versions=1)
    assert reg.put("a", files_of(9)) == 6
    assert reg.read_file("a", 6, "adapter_model.safetensors") == files_of(9)["adapter_model.safetensors"]


def test_pruning_keeps_current_and_previous(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path, keep_versions=1)
    reg.put("a", files_of(1))
    reg.put("a", files_of(2))
    reg.put("a", files_of(3))
    assert reg.versions("a") == [2, 3]  # newest + the one it replaced, despite keep_versions=1

    reg = AdapterRegistry(tmp_path, keep_versions=3)
    for i in range(4, 8):
        reg.put("a", files_of(i))
    assert reg.versions("a") == [5, 6, 7]
    reg.set_current("a", 5)  # rollback
    assert reg.get("a").version == 5
    reg.put("a", files_of(8))
    # 5 was current before the put: it is kept as the rollback target, with the newest 3
    assert reg.versions("a") == [5, 6, 7, 8]
    assert reg.current_version("a") == 8
    reg.set_current("a", 5)
    assert reg.read_file("a", None, "adapter_model.safetensors") == files_of(5)["adapter_model.safetensors"]


def test_set_current_errors(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    reg.put("a", FILES)
    with pytest.raises(AdapterNotFoundError) as ei:
        reg.set_current("a", 7)
    assert (ei.value.name, ei.value.version) == ("a", 7)
    with pytest.raises(ValueError, match="versions are integers >= 1"):
        reg.set_current("a", 0)


@pytest.mark.parametrize(
    "bad", ["", ".hidden", "-x", "a/b", "..", "a b", "x" * 65, "ä", "a\n", "_x"]
)
def test_bad_names(tmp_path: Path, bad: str) -> None:
    reg = AdapterRegistry(tmp_path)
    with pytest.raises(ValueError) as ei:
        reg.put(bad, FILES)
    assert repr(bad) in str(ei.value) and "[A-Za-z0-9]" in str(ei.value)
    with pytest.raises(ValueError):
        reg.get(bad)
    assert reg.names() == []


def test_good_names(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    for name in ["a", "A.b_c-1", "9" * 64]:
        reg.put(name, FILES)
    assert reg.names() == sorted(["a", "A.b_c-1", "9" * 64])


@pytest.mark.parametrize("bad", ["../x", "a/b", ".env", "a..b", META_FILE, "", "x y"])
def test_bad_file_names(tmp_path: Path, bad: str) -> None:
    reg = AdapterRegistry(tmp_path)
    with pytest.raises(ValueError, match="bad adapter file name"):
        reg.put("a", {bad: b"x"})
    assert reg.versions("a") == []


def test_size_limit_on_put_and_read(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path, max_file_bytes=100)
    with pytest.raises(ValueError, match="101 bytes, the limit is 100"):
        reg.put("a", {"w.bin": b"x" * 101})
    reg.put("a", {"w.bin": b"x" * 100})
    (tmp_path / "a" / "1" / "w.bin").write_bytes(b"x" * 5000)  # grown on disk behind our back
    with pytest.raises(AdapterDamagedError, match=r"has 5000 bytes, lorad\.json records 100"):
        reg.read_file("a", 1, "w.bin")


def test_empty_files_and_bad_meta(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    with pytest.raises(ValueError, match="at least one file"):
        reg.put("a", {})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        reg.put("a", FILES, meta={"x": object()})
    assert reg.put("a", FILES) == 1  # refused puts burn no version number


def test_missing(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    with pytest.raises(AdapterNotFoundError) as ei:
        reg.get("nope")
    assert (ei.value.name, ei.value.version) == ("nope", None)
    assert reg.current_version("nope") is None
    assert reg.versions("nope") == []
    with pytest.raises(AdapterNotFoundError):
        reg.delete("nope")
    reg.put("a", FILES)
    with pytest.raises(AdapterNotFoundError) as ei:
        reg.get("a", 2)
    assert ei.value.version == 2
    with pytest.raises(ValueError, match=r"has no file 'other.bin'"):
        reg.read_file("a", 1, "other.bin")


@pytest.mark.parametrize("garbage", [b"", b"banana", b"-1\n", b"0", b"1.5", b"\xff\xfe"])
def test_corrupt_pointer(tmp_path: Path, garbage: bytes) -> None:
    reg = AdapterRegistry(tmp_path)
    reg.put("a", FILES)
    (tmp_path / "a" / "current").write_bytes(garbage)
    with pytest.raises(AdapterDamagedError, match=r"is corrupt.*not a version number") as ei:
        reg.get("a")
    assert (ei.value.name, ei.value.version, ei.value.sound_versions) == ("a", None, (1,))
    with pytest.raises(AdapterDamagedError):
        reg.current_version("a")
    assert reg.names() == ["a"]  # listed, as damaged
    reg.set_current("a", 1)  # the operator's repair
    assert reg.get("a").version == 1
    (tmp_path / "a" / "current").write_bytes(garbage)
    assert reg.put("a", FILES) == 2  # a new version repairs it too
    assert reg.get("a").version == 2


def test_pointer_to_missing_version(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    reg.put("a", FILES)
    (tmp_path / "a" / "current").write_text("42\n")
    with pytest.raises(AdapterDamagedError, match=r"names version 42 but .* is missing") as ei:
        reg.get("a")
    assert (ei.value.version, ei.value.sound_versions) == (42, (1,))
    with pytest.raises(AdapterDamagedError):
        reg.current_version("a")


def test_pointer_through_a_symbolic_link_is_damage(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    reg = AdapterRegistry(root)
    reg.put("a", FILES)
    pointer = root / "a" / "current"
    pointer.unlink()
    pointer.symlink_to("/etc/passwd")
    with pytest.raises(AdapterDamagedError, match="is a symbolic link") as ei:
        reg.get("a")
    assert "/bin/" not in str(ei.value) and "passwd" not in str(ei.value)  # never read, let alone quoted
    reg.set_current("a", 1)
    assert not pointer.is_symlink() and reg.get("a").version == 1
    version_dir = root / "a" / "1"
    version_dir.rename(tmp_path / "elsewhere")
    version_dir.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(AdapterDamagedError, match="is a symbolic link"):
        reg.get("a")
    reg.delete("a")  # removes the link, never what it points to
    assert reg.names() == [] and (tmp_path / "elsewhere" / META_FILE).is_file()


def test_missing_pointer_and_empty_directory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reg = AdapterRegistry(tmp_path)
    reg.put("a", FILES)
    (tmp_path / "a" / "current").unlink()
    with pytest.raises(AdapterDamagedError, match=r"current is missing; stored versions: \[1\]"):
        reg.get("a")
    (tmp_path / "empty").mkdir()  # what an older lorad left when killed creating an adapter
    with caplog.at_level(logging.WARNING, logger="lorad.adapters.registry"):
        reg = AdapterRegistry(tmp_path)
    assert not (tmp_path / "empty").exists()
    assert reg.names() == ["a"]
    assert "adapter 'a' is damaged on disk" in caplog.text and "empty adapter directory" in caplog.text


@pytest.mark.parametrize("damage", ["record-empty", "record-missing", "record-garbage", "version-deleted",
                                    "weights-truncated", "weights-missing"])
def test_one_damaged_adapter_leaves_the_others_alone(tmp_path: Path, damage: str) -> None:
    reg = AdapterRegistry(tmp_path)
    for i in (1, 2):
        reg.put("keep", files_of(i))
    reg.put("other", FILES)
    v2 = tmp_path / "keep" / "2"
    if damage == "record-empty":
        (v2 / META_FILE).write_bytes(b"")
    elif damage == "record-missing":
        (v2 / META_FILE).unlink()
    elif damage == "record-garbage":
        (v2 / META_FILE).write_bytes((v2 / META_FILE).read_bytes()[:40])
    elif damage == "version-deleted":
        for f in v2.iterdir():
            f.unlink()
        v2.rmdir()
    elif damage == "weights-truncated":
        (v2 / "adapter_model.safetensors").write_bytes(b"weights")
    else:
        (v2 / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterDamagedError) as ei:
        reg.get("keep")
    assert (ei.value.version, ei.value.sound_versions) == (2, (1,))
    assert "roll back to a sound stored version (1)" in str(ei.value)
    with pytest.raises(AdapterDamagedError):
        reg.read_file("keep", None, "adapter_config.json")
    assert reg.names() == ["keep", "other"]
    assert reg.read_file("other", None, "adapter_model.safetensors") == FILES["adapter_model.safetensors"]
    if damage != "version-deleted":
        with pytest.raises(AdapterDamagedError, match="version 2"):
            reg.set_current("keep", 2)  # a rollback never goes to a damaged version
    reg.set_current("keep", 1)
    assert reg.read_file("keep", None, "adapter_model.safetensors") == files_of(1)["adapter_model.safetensors"]


def test_corrupt_record(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    reg.put("a", FILES)
    record_path = tmp_path / "a" / "1" / META_FILE
    record = json.loads(record_path.read_text())
    record["version"] = 3
    record_path.write_text(json.dumps(record))
    with pytest.raises(AdapterStorageError, match="describes 'a' version 3"):
        reg.get("a")
    record_path.write_text("{not json")
    with pytest.raises(AdapterStorageError, match="is corrupt"):
        reg.get("a", 1)
    record_path.unlink()
    with pytest.raises(AdapterStorageError, match=r"lorad.json is missing"):
        reg.get("a")


def test_sha256_mismatch_detected(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    reg.put("a", FILES)
    path = tmp_path / "a" / "1" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01  # one flipped bit, same size
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterDamagedError, match=r"sha256 .* does not match"):
        reg.read_file("a", 1, "adapter_model.safetensors")
    # Remembered: the version is damaged (and listed so) until that file changes.
    with pytest.raises(AdapterDamagedError, match=r"sha256 .* does not match"):
        reg.get("a")
    with pytest.raises(AdapterDamagedError):
        reg.read_file("a", 1, "adapter_config.json")
    data[5] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(1, 1))  # a changed file whatever the clock's resolution
    assert reg.get("a").version == 1
    assert reg.read_file("a", 1, "adapter_model.safetensors") == FILES["adapter_model.safetensors"]


def test_os_errors_become_storage_errors(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    reg.put("a", FILES)
    path = tmp_path / "a" / "1" / "adapter_config.json"
    path.unlink()
    path.mkdir()  # not a file: the version is damaged
    with pytest.raises(AdapterDamagedError, match="is not a regular file"):
        reg.read_file("a", 1, "adapter_config.json")
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(AdapterStorageError, match="cannot open adapter registry") as ei:
        AdapterRegistry(blocker / "root")
    assert isinstance(ei.value.__cause__, OSError)


def test_delete(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    reg.put("a", FILES)
    reg.put("b", FILES)
    reg.delete("a")
    assert reg.names() == ["b"]
    assert not (tmp_path / "a").exists()
    assert list((tmp_path / ".trash").iterdir()) == []
    with pytest.raises(AdapterNotFoundError):
        reg.get("a")


def test_open_cleans_leftovers(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    reg.put("a", FILES)
    (tmp_path / ".staging" / "a.2.dead").mkdir()
    (tmp_path / ".staging" / "a.2.dead" / "half").write_bytes(b"x")
    (tmp_path / ".trash" / "1.dead").mkdir()
    (tmp_path / "a" / ".current.abc.tmp").write_bytes(b"2")
    (tmp_path / ".hwm" / ".a.abc.tmp").write_bytes(b"2")
    reg = AdapterRegistry(tmp_path)
    assert list((tmp_path / ".staging").iterdir()) == []
    assert list((tmp_path / ".trash").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["1", "current"]
    assert [p.name for p in (tmp_path / ".hwm").iterdir()] == ["a"]
    assert reg.get("a").version == 1


def test_concurrent_puts_and_reads(tmp_path: Path) -> None:
    """Writers race readers: every read sees one complete version, numbers stay unique."""
    reg = AdapterRegistry(tmp_path, keep_versions=2)
    reg.put("a", files_of(0), meta={"i": 0})
    written: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(w: int) -> None:
        try:
            for i in range(15):
                k = 1000 * (w + 1) + i
                written.append(reg.put("a", files_of(k), meta={"i": k}))
        except BaseException as e:  # collected for the main thread
            errors.append(e)

    def reader() -> None:
        try:
            while not stop.is_set():
                stored = reg.get("a")
                k = stored.meta["i"]
                try:
                    data = reg.read_file("a", stored.version, "adapter_model.safetensors")
                except AdapterNotFoundError:
                    continue  # pruned between get and read_file: allowed, never torn
                assert data == files_of(int(str(k)))["adapter_model.safetensors"]
        except BaseException as e:  # reported below
            errors.append(e)

    writers = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(timeout=60)
    stop.set()
    for t in readers:
        t.join(timeout=60)
    assert errors == []
    assert sorted(written) == list(range(2, 47))
    assert reg.current_version("a") == 46  # puts are serialised: the last one is the newest
    assert reg.versions("a") == [45, 46]
    assert list((tmp_path / ".staging").iterdir()) == []
