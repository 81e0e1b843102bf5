"""``lorad install-service``: install lorad as a systemd service outside Yocto.

For Raspberry Pi OS, JetPack (Ubuntu) and plain Debian: writes the unit (the same file
meta-lorad installs, with ExecStart pointing at this installation and ``Type=`` chosen
for the local systemd), a sysusers.d entry and the service user (through
``systemd-sysusers``, which also works on an alternate root), the config directory and
the default config (never replacing one that exists), and prints every step. ``--root``
installs into another tree (an image being built, or a test's temporary directory);
``--dry-run`` prints the steps and changes nothing.

The unit's sandbox hides ``/tmp`` and ``/var/tmp`` (``PrivateTmp=yes``) and ``/home``,
``/root`` and ``/run/user`` (``ProtectHome=yes``) from the service: a prefix there, or a
virtualenv whose Python (or its base installation, such as pyenv's under ``/root``)
resolves there, could never start (exit 127). Such a prefix is refused before anything is
written, naming the path and the setting that hides it (:func:`hidden_paths`).
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

__all__ = ["InstallPlan", "default_prefix", "install_service", "render_unit", "systemd_version", "hidden_paths",
           "NOTIFY_RELOAD_SINCE"]

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


#: What each sandbox setting hides from the service, when the unit sets it to one of the values.
_HIDING: tuple[tuple[str, frozenset[str], tuple[str, ...]], ...] = (
    ("PrivateTmp", frozenset({"yes", "true", "on", "1"}), ("/tmp", "/var/tmp")),
    ("ProtectHome", frozenset({"yes", "true", "on", "1", "tmpfs"}), ("/home", "/root", "/run/user")),
)


def _unit_settings(unit: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in unit.splitlines())
            if not k.lstrip().startswith(("#", ";", "[")) and v}


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def _link_chain(path: Path) -> list[Path]:
    """``path`` and every path its symbolic links lead to (each hop absolute, in order)."""
    chain = [Path(os.path.abspath(path))]
    for _ in range(40):  # the kernel's own limit on nested links
        cur = chain[-1]
        # a link in a parent directory counts too: resolve the parent, then read this name
        parent = Path(os.path.realpath(cur.parent))
        if parent != cur.parent:
            chain.append(parent / cur.name)
            cur = chain[-1]
        if not cur.is_symlink():
            break
        chain.append(Path(os.path.abspath(cur.parent / os.readlink(cur))))
    return chain


def _interpreter(script: Path) -> Path | None:
    """The interpreter of a ``#!`` script (``/usr/bin/env`` lookups are left to PATH), or None."""
    try:
        with open(script, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].decode(errors="replace").split()
    if not parts or parts[0].endswith("/env"):
        return None
    return Path(parts[0])


def _venv_home(prefix: Path) -> Path | None:
    """The base installation a virtualenv's Python loads its standard library from."""
    try:
        for line in (prefix / "pyvenv.cfg").read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                return Path(value.strip())
    except OSError:
        pass
    return None


def hidden_paths(unit: str, prefix: Path) -> list[str]:
    """Why the service of ``unit`` could not run lorad from ``prefix``: for every path it
    needs (``bin/lorad``, the Python it runs with, that Python's base installation) that
    resolves under a tree the unit's sandbox hides, one sentence naming path and setting."""
    settings = _unit_settings(unit)
    exe = prefix / "bin" / "lorad"
    needed: list[tuple[str, Path]] = [("lorad", exe)]
    python = _interpreter(exe)
    if python is not None:
        needed.append(("its Python", python))
    home = _venv_home(prefix)
    if home is not None:
        needed.append(("the base installation of its virtualenv (pyvenv.cfg home)", home))
    problems: list[str] = []
    for what, path in needed:
        chain = _link_chain(path)
        for setting, values, tops in _HIDING:
            if settings.get(setting, "").lower() not in values:
                continue
            hit = next(((hop, top) for hop in chain for top in tops if _under(str(hop), top)), None)
            if hit is None:
                continue
            hop, top = hit
            via = "" if hop == chain[0] else f" (it resolves to {hop})"
            problems.append(f"{what}, {chain[0]}{via}, is under {top}, which the unit hides from the service "
                            f"({setting}={settings[setting]})")
            break
    return problems


def install_service(plan: InstallPlan, *, say: Callable[[str], None] = print) -> int:
    """Carry out (or with ``dry_run`` only print) the installation; returns an exit code."""
    if not _USER_RE.match(plan.user):
        raise ValueError(f"--user {plan.user!r} is not a valid system user name (lower case letters, digits, '_', '-')")
    exec_path = plan.prefix / "bin" / "lorad"
    if not exec_path.is_file():
        raise ValueError(f"--prefix {str(plan.prefix)!r}: there is no {exec_path}; pass the prefix lorad is installed in "
                         "(the virtualenv's directory, e.g. /opt/lorad/.venv)")
    version = plan.systemd if plan.systemd is not None else systemd_version()
    unit = render_unit(user=plan.user, exec_path=exec_path, systemd=version)
    hidden = hidden_paths(unit, plan.prefix)
    if hidden:
        raise ValueError(f"--prefix {str(plan.prefix)!r}: the service could not start lorad from there (exit 127): "
                         + "; ".join(hidden) + ". Install lorad in a virtualenv under /opt or /usr/local, made "
                         "with a Python outside /home, /root and /tmp (e.g. /usr/bin/python3 -m venv "
                         "/opt/lorad/.venv)")
    root = plan.root
    unit_path = root / "etc/systemd/system/lorad.service"
    sysusers = root / "etc/sysusers.d/lorad.conf"
    config_dir = root / "etc/lorad"
    config = config_dir / "lorad.yaml"
    state_dir = root / "var/lib/lorad"
    act = not plan.dry_run
    prefix = "would " if plan.dry_run else ""

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
