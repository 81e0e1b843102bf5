"""lorad install-service into a temporary root: the unit, the user (real systemd-sysusers),
the directories and the default config; the unit passes systemd-analyze verify and security."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorad.daemon.install_service import (
    NOTIFY_RELOAD_SINCE,
    InstallPlan,
    hidden_paths,
    install_service,
    render_unit,
    systemd_version,
)

REPO = Path(__file__).resolve().parents[2]
YOCTO = REPO / "yocto/meta-lorad/recipes-lorad/lorad/files"
#: `systemd-analyze security` rates today's unit 1.7; this is the ceiling the tests hold.
MAX_EXPOSURE = 2.0


def _lorad() -> list[str]:
    exe = Path(sys.executable).parent / "lorad"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lorad.daemon.cli"]


#: Trees the unit's sandbox hides (PrivateTmp=yes, ProtectHome=yes).
_HIDDEN = ("/tmp", "/var/tmp", "/home", "/root", "/run/user")


def _visible_base() -> Path:
    """A writable directory outside every tree the unit hides (the checkout's ignored build/
    where it is not under /home, else /dev/shm): where a test installs a prefix the service
    could run."""
    for base in (REPO / "build", Path("/dev/shm")):
        real = os.path.realpath(base)
        if any(real == top or real.startswith(top + "/") for top in _HIDDEN):
            continue
        try:
            base.mkdir(exist_ok=True)
        except OSError:
            continue
        if os.access(base, os.W_OK):
            return base
    pytest.fail("no writable directory outside /tmp, /home and /root for a test prefix")


def _prefix(parent: Path, *, python: str | None = None) -> Path:
    """An installation prefix: ``bin/lorad`` (a script), and with ``python`` a virtualenv
    whose ``bin/python`` links to it (need not exist) and whose pyvenv.cfg names its home."""
    prefix = parent / "prefix"
    (prefix / "bin").mkdir(parents=True)
    shebang = "#!/bin/sh"
    if python is not None:
        (prefix / "bin" / "python").symlink_to(python)
        (prefix / "pyvenv.cfg").write_text(f"home = {Path(python).parent}\nversion = 3.11.7\n")
        shebang = f"#!{prefix}/bin/python"
    exe = prefix / "bin" / "lorad"
    exe.write_text(f"{shebang}\nexit 0\n")
    exe.chmod(0o755)
    return prefix


@pytest.fixture
def visible() -> Iterator[Path]:
    """A fresh directory the unit's sandbox leaves visible."""
    d = Path(tempfile.mkdtemp(prefix="lorad-install-test-", dir=_visible_base()))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_the_packaged_unit_and_config_are_meta_lorads() -> None:
    for name in ("lorad.service", "lorad.yaml"):
        assert (REPO / "daemon/service" / name).read_bytes() == (YOCTO / name).read_bytes(), name


def test_install_into_a_temporary_root(tmp_path: Path, visible: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    prefix = _prefix(visible)
    done = subprocess.run([*_lorad(), "install-service", "--root", str(root), "--user", "lorad-t", "--prefix", str(prefix)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    unit = root / "etc/systemd/system/lorad.service"
    for what in (str(unit), "systemd-sysusers", str(root / "etc/lorad/lorad.yaml"), str(root / "var/lib/lorad")):
        assert what in out, what
    text = unit.read_text()
    assert f"ExecStart={prefix}/bin/lorad serve --config /etc/lorad/lorad.yaml" in text
    assert re.search(r"^User=lorad-t$", text, re.M) and re.search(r"^Group=lorad-t$", text, re.M)
    passwd = (root / "etc/passwd").read_text()
    entry = next(line for line in passwd.splitlines() if line.startswith("lorad-t:"))
    assert entry.endswith(":/var/lib/lorad:/usr/sbin/nologin")
    assert re.search(r"^video:[^:]*:\d+:.*lorad-t", (root / "etc/group").read_text(), re.M)
    uid, gid = int(entry.split(":")[2]), int(entry.split(":")[3])
    st = (root / "var/lib/lorad").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (uid, gid, 0o750)
    assert (root / "etc/lorad/lorad.yaml").read_bytes() == (YOCTO / "lorad.yaml").read_bytes()

    # again: an edited config is kept, the user is not created twice
    (root / "etc/lorad/lorad.yaml").write_text("log_level: DEBUG\n")
    again = subprocess.run([*_lorad(), "install-service", "--root", str(root), "--user", "lorad-t", "--prefix", str(prefix)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    assert "keep the existing" in again.stdout
    assert (root / "etc/lorad/lorad.yaml").read_text() == "log_level: DEBUG\n"
    assert (root / "etc/passwd").read_text().count("lorad-t:") == 1

    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                              capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for lorad\.service: (\d+\.\d+)", security.stdout)
    assert m is not None, security.stdout + security.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, security.stdout


def test_dry_run_changes_nothing(tmp_path: Path, visible: Path) -> None:
    lines: list[str] = []
    plan = InstallPlan(prefix=_prefix(visible), root=tmp_path, dry_run=True, systemd=252)
    assert install_service(plan, say=lines.append) == 0
    assert list(tmp_path.iterdir()) == []
    assert all(line.startswith("would ") for line in lines), lines
    assert any("Type=notify with ExecReload" in line for line in lines)


def test_notify_reload_where_systemd_is_new_enough() -> None:
    new = render_unit(user="lorad", exec_path=Path("/opt/lorad/bin/lorad"), systemd=NOTIFY_RELOAD_SINCE)
    old = render_unit(user="lorad", exec_path=Path("/opt/lorad/bin/lorad"), systemd=NOTIFY_RELOAD_SINCE - 1)
    assert "Type=notify-reload\n" in new and "ExecReload=" not in new
    assert "Type=notify\nExecReload=/bin/kill -HUP $MAINPID\n" in old
    assert systemd_version(lambda argv: "systemd 255 (255.4-1ubuntu8)\n+PAM +AUDIT\n") == 255
    assert systemd_version() == int(subprocess.run(["systemctl", "--version"], capture_output=True, text=True,
                                                   check=True).stdout.split()[1])


@pytest.mark.parametrize("user, prefix, message", [
    ("Root!", sys.prefix, "not a valid system user name"),
    ("lorad", "/nonexistent", "there is no /nonexistent/bin/lorad"),
])
def test_bad_arguments_are_named(tmp_path: Path, user: str, prefix: str, message: str) -> None:
    done = subprocess.run([*_lorad(), "install-service", "--root", str(tmp_path), "--user", user, "--prefix", prefix],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_version_flags() -> None:
    from lorad.daemon.version import lorad_version

    for cmd in (_lorad(), [str(Path(sys.executable).parent / "loractl")]):
        done = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0 and lorad_version() in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("python, top, setting", [
    ("/root/.pyenv/versions/3.11.7/bin/python3.11", "/root", "ProtectHome=yes"),  # pyenv as root
    ("/home/pi/.pyenv/versions/3.11.7/bin/python3.11", "/home", "ProtectHome=yes"),
])
def test_a_venv_whose_python_resolves_into_a_hidden_tree_is_refused(
        tmp_path: Path, visible: Path, python: str, top: str, setting: str) -> None:
    """The prefix itself is visible, but the virtualenv's python links into /root or /home:
    the unit would fail with exit 127; refused before anything is written, naming both."""
    prefix = _prefix(visible, python=python)
    done = subprocess.run([*_lorad(), "install-service", "--root", str(tmp_path), "--prefix", str(prefix)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    err = done.stderr
    assert f"its Python, {prefix}/bin/python (it resolves to {python}), is under {top}, which the unit hides from " \
           f"the service ({setting})" in err, err
    assert f"the base installation of its virtualenv (pyvenv.cfg home), {Path(python).parent}, is under {top}" in err
    assert "exit 127" in err and "/usr/bin/python3 -m venv" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_prefix_under_tmp_is_refused_naming_private_tmp(tmp_path: Path) -> None:
    """/tmp is the service's own empty one (PrivateTmp=yes)."""
    parent = Path(tempfile.mkdtemp(prefix="lorad-install-test-", dir="/tmp"))
    root = tmp_path / "root"
    root.mkdir()
    try:
        prefix = _prefix(parent)
        done = subprocess.run([*_lorad(), "install-service", "--root", str(root), "--prefix", str(prefix)],
                              capture_output=True, text=True, timeout=120, check=False)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"lorad, {prefix}/bin/lorad, is under /tmp, which the unit hides from the service (PrivateTmp=yes)" \
        in done.stderr, done.stderr
    assert list(root.iterdir()) == []


def test_hidden_paths_follow_the_units_settings(visible: Path) -> None:
    prefix = _prefix(visible, python="/root/.pyenv/versions/3.11.7/bin/python3.11")
    unit = render_unit(user="lorad", exec_path=prefix / "bin/lorad", systemd=NOTIFY_RELOAD_SINCE)
    assert len(hidden_paths(unit, prefix)) == 2  # the python and the venv's home
    # a unit that only makes /home read-only leaves it visible: nothing to refuse
    assert hidden_paths(unit.replace("ProtectHome=yes", "ProtectHome=read-only"), prefix) == []
    assert hidden_paths(unit, _prefix(visible / "plain")) == []
