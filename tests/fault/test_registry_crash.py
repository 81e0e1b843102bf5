"""Crash the registry's write protocol at every step and check what a restart finds.

A child process runs ``put`` (or ``delete``) with ``lorad.adapters.registry._crash_points`` set
to SIGKILL itself right after step k; the parent then reopens the registry as a daemon
restart would. SIGKILL models a process crash (the page cache survives); the fsyncs in the
protocol are what extends the same guarantee to a power cut.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lorad.adapters import registry_index
from lorad.adapters.errors import AdapterNotFoundError
from lorad.adapters.registry import AdapterRegistry, IndexedAdapter

REPO = Path(__file__).resolve().parents[2]


def files_of(i: int) -> dict[str, bytes]:
    return {
        "adapter_model.safetensors": bytes([i]) * 4096 + f"v{i}".encode(),
        "adapter_config.json": f'{{"r": {i}}}'.encode(),
    }


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from lorad.adapters import registry

    root, action, name, point, nth, i = sys.argv[1:7]
    seen = 0

    def crash(step: str) -> None:
        global seen
        if step == point:
            seen += 1
            if seen == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)

    registry._crash_points = crash
    reg = registry.AdapterRegistry(Path(root), keep_versions=2)
    if action == "rollback":
        reg.set_current(name, int(i))
    elif action == "put":
        k = int(i)
        reg.put(name, {
            "adapter_model.safetensors": bytes([k]) * 4096 + f"v{k}".encode(),
            "adapter_config.json": f'{{"r": {k}}}'.encode(),
        }, meta={"i": k})
    else:
        reg.delete(name)
    """
)


def run_child(root: Path, action: str, name: str, point: str, nth: int, i: int = 0) -> int:
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), action, name, point, str(nth), str(i)],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.decode()
    return proc.returncode


def assert_clean(root: Path) -> None:
    assert list((root / ".staging").iterdir()) == []
    assert list((root / ".trash").iterdir()) == []
    assert list(root.rglob(".*.tmp")) == []


@pytest.fixture()
def trusting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The restarted registry trusts every stamp of the index at once (no racy window), so
    what it lists after a crash rests on the stamps alone, not on the entries being young."""
    monkeypatch.setattr(registry_index, "RACY_NS", 0)


def assert_listed(reg: AdapterRegistry) -> None:
    """The listing index says what ``get`` says, adapter by adapter."""
    listing = reg.listing()
    assert list(listing) == reg.names()
    for name, found in listing.items():
        assert isinstance(found, IndexedAdapter), found
        stored = reg.get(name)
        assert (found.version, dict(found.meta), found.created) == (stored.version, dict(stored.meta), stored.created)


def restarted(root: Path) -> None:
    """A restart before the crash: the index file then holds an entry for every adapter,
    which the crash leaves stale."""
    reg = AdapterRegistry(root, keep_versions=2)
    assert reg.listing().keys() == set(reg.names())
    assert (root / ".index.log").is_file() or (root / ".index.json").is_file()


def assert_readable(reg: AdapterRegistry, name: str, version: int) -> None:
    stored = reg.get(name, version)
    expected = files_of(int(str(stored.meta["i"])))
    assert {f: reg.read_file(name, version, f) for f in stored.files} == expected


# (step, nth time it is reached, whether the new version is current afterwards)
PUT_STEPS = [
    ("hwm", 1, False),
    ("file", 1, False),
    ("file", 2, False),
    ("staged", 1, False),
    ("renamed", 1, False),
    ("current", 1, True),
    ("trashed", 1, True),  # pruning v2 was interrupted
    ("pruned", 1, True),  # the listing index not yet updated
    ("indexed", 1, True),
]


@pytest.mark.usefixtures("trusting")
@pytest.mark.parametrize(("point", "nth", "new_is_current"), PUT_STEPS)
def test_put_killed_at_each_step(tmp_path: Path, point: str, nth: int, new_is_current: bool) -> None:
    reg = AdapterRegistry(tmp_path, keep_versions=2)
    for i in (1, 2, 3):
        reg.put("a", files_of(i), meta={"i": i})
    assert reg.versions("a") == [2, 3]
    restarted(tmp_path)

    assert run_child(tmp_path, "put", "a", point, nth, i=4) == -signal.SIGKILL

    reg = AdapterRegistry(tmp_path, keep_versions=2)
    assert_clean(tmp_path)
    assert_listed(reg)
    current = reg.current_version("a")
    assert current == (4 if new_is_current else 3)
    assert reg.get("a").meta["i"] == current
    for v in reg.versions("a"):  # whatever is listed is complete, byte for byte
        assert_readable(reg, "a", v)
    assert 3 in reg.versions("a")  # the previous version is always kept for rollback
    assert reg.put("a", files_of(9), meta={"i": 9}) == 5  # 4 was handed out: never reused
    assert_readable(reg, "a", 5)
    assert_clean(tmp_path)
    assert_listed(reg)
    assert_listed(AdapterRegistry(tmp_path, keep_versions=2))


@pytest.mark.usefixtures("trusting")
@pytest.mark.parametrize(("point", "nth"), [("hwm", 1), ("file", 1), ("file", 2), ("staged", 1)])
def test_first_put_killed_leaves_no_adapter(tmp_path: Path, point: str, nth: int) -> None:
    AdapterRegistry(tmp_path)
    assert run_child(tmp_path, "put", "fresh", point, nth, i=1) == -signal.SIGKILL

    assert not (tmp_path / "fresh").exists()  # not even an empty directory
    reg = AdapterRegistry(tmp_path)
    assert_clean(tmp_path)
    assert reg.names() == [] and reg.listing() == {}
    assert reg.current_version("fresh") is None
    with pytest.raises(AdapterNotFoundError):
        reg.get("fresh")
    assert reg.put("fresh", files_of(2), meta={"i": 2}) == 2
    assert_readable(reg, "fresh", 2)


@pytest.mark.usefixtures("trusting")
@pytest.mark.parametrize("point", ["renamed", "current", "pruned"])
def test_first_put_killed_after_its_rename_is_complete(tmp_path: Path, point: str) -> None:
    """A new adapter appears by one rename, with its first version and its pointer."""
    AdapterRegistry(tmp_path)
    assert run_child(tmp_path, "put", "fresh", point, 1, i=1) == -signal.SIGKILL

    reg = AdapterRegistry(tmp_path)
    assert_clean(tmp_path)
    assert reg.names() == ["fresh"]
    assert_listed(reg)
    assert reg.current_version("fresh") == 1
    assert_readable(reg, "fresh", 1)


@pytest.mark.usefixtures("trusting")
def test_delete_killed_midway(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    reg.put("a", files_of(1), meta={"i": 1})
    reg.put("b", files_of(2), meta={"i": 2})
    restarted(tmp_path)

    assert run_child(tmp_path, "delete", "a", "trashed", 1) == -signal.SIGKILL

    reg = AdapterRegistry(tmp_path)
    assert_clean(tmp_path)
    assert reg.names() == ["b"]
    assert_listed(reg)
    assert_readable(reg, "b", 1)
    assert reg.put("a", files_of(3), meta={"i": 3}) == 2
    assert_listed(reg)


@pytest.mark.usefixtures("trusting")
def test_rollback_killed_before_the_index_is_updated(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path, keep_versions=2)
    for i in (1, 2, 3):
        reg.put("a", files_of(i), meta={"i": i})
    restarted(tmp_path)
    assert run_child(tmp_path, "rollback", "a", "current", 1, i=2) == -signal.SIGKILL

    reg = AdapterRegistry(tmp_path, keep_versions=2)
    assert reg.current_version("a") == 2
    assert_listed(reg)
    assert_readable(reg, "a", 2)


def test_child_without_crash_completes(tmp_path: Path) -> None:
    """The harness itself: with a step that is never reached, the put just succeeds."""
    assert run_child(tmp_path, "put", "a", "no-such-step", 1, i=7) == 0
    reg = AdapterRegistry(tmp_path)
    assert reg.current_version("a") == 1
    assert_readable(reg, "a", 1)
