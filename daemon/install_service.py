"""``lorad install-service``: install lorad as a systemd service outside Yocto.

For Raspberry Pi OS, JetPack (Ubuntu) and plain Debian: writes the unit (the same file
meta-lorad installs, with ExecStart pointing at this installation and ``Type=`` chosen
for the local systemd), a sysusers.d entry and the service user (through
``systemd-sysusers``, which also works on an alternate root), the config directory and
the default config (never replacing one that exists), and prints every step. ``--root``
installs into another tree (an image being built, or a test's temporary directory);
``--dry-run`` prints the steps and changes nothing.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

__all__ = ["InstallPlan", "default_prefix", "install_service", "render_unit", "systemd_version", "NOTIFY_RELOAD_SINCE"]

#: systemd learnt Type=notify-reload in version 253.
NOTIFY_RELOAD_SINCE = 253
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,30}$")


@dataclass(frozen=True)
class InstallPlan:
    user: str = "lorad"
    #: Installation prefix of lorad: ExecStart is ``<prefix>/bin/lorad``.
    prefix: Path = field(default_factory=lambda: default_prefix())
    root: Path = Path("/")
    dry_run: bool = False
    #: systemd's version on the target; None: ask ``systemctl --version``.
    systemd: int | None = None


def default_prefix() -> Path:
    """The prefix of the ``lorad`` script of this installation: the virtualenv's, else the
    one on PATH (pip installs scripts in /usr/local/bin for a system Python)."""
    beside = Path(sys.executable).parent / "lorad"  # not resolved: a venv's python is a symlink
    if beside.is_file():
        return beside.parent.parent
    found = shutil.which("lorad")
    return Path(found).parent.parent if found else Path(sys.prefix)


def systemd_version(run: Callable[[list[str]], str] | None = None) -> int | None:
    """The major version of the local systemd (None when there is none)."""
    try:
        out = (run or _stdout)(["systemctl", "--version"])
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.match(r"systemd (\d+)", out)
    return int(m.group(1)) if m else None


def _stdout(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def _template(name: str) -> str:
    return resources.files("lorad.daemon.service").joinpath(name).read_text(encoding="utf-8")


def render_unit(*, user: str, exec_path: Path, systemd: int | None) -> str:
    """meta-lorad's unit, for this user and executable; Type=notify-reload on systemd 253+."""
    text = _template("lorad.service")
    text = text.replace("ExecStart=/usr/bin/lorad ", f"ExecStart={exec_path} ")
    text = re.sub(r"^User=lorad$", f"User={user}", text, flags=re.M)
    text = re.sub(r"^Group=lorad$", f"Group={user}", text, flags=re.M)
    if systemd is not None and systemd >= NOTIFY_RELOAD_SINCE:
        # notify-reload sends SIGHUP itself and waits for RELOADING=1 ... READY=1.
        text = text.replace("Type=notify\nExecReload=/bin/kill -HUP $MAINPID\n", "Type=notify-reload\n")
    return text


def install_service(plan: InstallPlan, *, say: Callable[[str], None] = print) -> int:
    """Carry out (or with ``dry_run`` only print) the installation; returns an exit code."""
    if not _USER_RE.match(plan.user):
        raise ValueError(f"--user {plan.user!r} is not a valid system user name (lower case letters, digits, '_', '-')")
    exec_path = plan.prefix / "bin" / "lorad"
    if not exec_path.is_file():
        raise ValueError(f"--prefix {str(plan.prefix)!r}: there is no {exec_path}; pass the prefix lorad is installed in "
                         "(the virtualenv's directory, e.g. /opt/lorad/.venv)")
    if str(plan.prefix.resolve()).startswith(("/home/", "/root/")):
        say(f"warning: {plan.prefix} is under /home or /root, which the unit hides (ProtectHome=yes); "
            "install lorad under /opt or /usr/local for the service to start")
    version = plan.systemd if plan.systemd is not None else systemd_version()
    root = plan.root
    unit_path = root / "etc/systemd/system/lorad.service"
    sysusers = root / "etc/sysusers.d/lorad.conf"
    config_dir = root / "etc/lorad"
    config = config_dir / "lorad.yaml"
    state_dir = root / "var/lib/lorad"
    act = not plan.dry_run
    prefix = "would " if plan.dry_run else ""

    unit = render_unit(user=plan.user, exec_path=exec_path, systemd=version)
    reload_type = re.search(r"^Type=notify-reload$", unit, re.M) is not None
    kind = "Type=notify-reload" if reload_type else "Type=notify with ExecReload (systemd < 253)"
    say(f"{prefix}write {unit_path} ({kind}, ExecStart={exec_path}, User={plan.user})")
    if act:
        _write(unit_path, unit, 0o644)

    # The video group gives access to /dev/vcio (vcgencmd power readings on a Pi) and to
    # the GPU device nodes on a Jetson.
    entry = (f'u {plan.user} - "lorad daemon" /var/lib/lorad /usr/sbin/nologin\n'
             f"m {plan.user} video\n")
    say(f"{prefix}write {sysusers} and create the system user {plan.user!r} (in group video) with systemd-sysusers")
    if act:
        _write(sysusers, entry, 0o644)
        argv = ["systemd-sysusers"] + ([f"--root={root}"] if root != Path("/") else []) + [str(sysusers)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            say(f"error: {' '.join(argv)} failed: {done.stderr.strip()}")
            return 1
    uid, gid = _ids(root, plan.user) if act else (None, None)

    say(f"{prefix}create {config_dir} (0755) and {state_dir} (0750, owned by {plan.user})")
    if act:
        config_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        if uid is not None and gid is not None and os.geteuid() == 0:
            os.chown(state_dir, uid, gid)
    if config.exists():
        say(f"keep the existing {config}")
    else:
        say(f"{prefix}write the default config {config} (check a change with: lorad check-config /etc/lorad/lorad.yaml)")
        if act:
            _write(config, _template("lorad.yaml"), 0o644)
    if root == Path("/"):
        say("next: systemctl daemon-reload && systemctl enable --now lorad; logs: journalctl -u lorad -f")
    return 0


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(mode)
    os.replace(tmp, path)


def _ids(root: Path, user: str) -> tuple[int | None, int | None]:
    """uid and gid of ``user`` in the target's /etc/passwd (not necessarily this system's)."""
    if root == Path("/"):
        try:
            p = pwd.getpwnam(user)
            return p.pw_uid, p.pw_gid
        except KeyError:
            return None, None
    try:
        for line in (root / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if len(fields) >= 4 and fields[0] == user:
                return int(fields[2]), int(fields[3])
    except (OSError, ValueError):
        pass
    return None, None
