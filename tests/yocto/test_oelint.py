"""meta-lorad passes oelint-adv for the release it supports: no error, no warning.

oelint-adv (the `test` extra pins the version: its rules change between releases) runs in
the layer's directory, so it reads the layer's .oelint.cfg: the layer's own variable names
(oelint-constants.json) and the few rules switched off, each with its reason written above
it. Its `info` findings (style suggestions such as SECTION or CVE_PRODUCT) are not failures.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYER = REPO / "yocto" / "meta-lorad"
_FINDING = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<severity>error|warning|info):(?P<rule>[^:]+):(?P<message>.*)$")


def _oelint() -> str:
    exe = Path(sys.executable).with_name("oelint-adv")
    found = str(exe) if exe.is_file() else shutil.which("oelint-adv")
    if not found:
        pytest.fail("oelint-adv is not installed (it is in lorad's `test` extra, which .ci/setup installs)")
    return found


def _recipes() -> list[str]:
    files = sorted(str(p.relative_to(LAYER)) for p in [*LAYER.rglob("*.bb"), *LAYER.rglob("*.bbappend")])
    assert len(files) >= 9
    return files


def _run(*extra: str, use_config: bool = True) -> tuple[int, list[re.Match[str]]]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(LAYER)}
    if not use_config:
        env["OELINT_SKIP_CONFIG"] = "1"
    done = subprocess.run([_oelint(), "--quiet", "--release", "scarthgap", *extra, *_recipes()], cwd=LAYER, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    lines = (done.stdout + done.stderr).splitlines()
    findings = [m for m in map(_FINDING.match, lines) if m]
    unparsed = [line for line in lines if not _FINDING.match(line) and line.strip()]
    assert not unparsed, "oelint-adv printed something that is not a finding:\n" + "\n".join(unparsed[:20])
    return done.returncode, findings


def test_no_error_and_no_warning() -> None:
    _, findings = _run()
    bad = [m.group(0) for m in findings if m.group("severity") != "info"]
    assert not bad, "\n".join(bad)
    code, _ = _run("--hide", "info")
    assert code == 0


def test_every_suppressed_rule_is_explained_and_still_needed() -> None:
    text = (LAYER / ".oelint.cfg").read_text(encoding="utf-8").splitlines()
    config = configparser.ConfigParser()
    config.read_string("\n".join(text))
    assert config["oelint"]["release"] == "scarthgap"
    suppressed = [r for r in config["oelint"]["suppress"].split() if r]
    assert suppressed
    for rule in suppressed:
        index = next(i for i, line in enumerate(text) if line.strip() == rule)
        assert text[index - 1].strip().startswith("#"), f".oelint.cfg suppresses {rule} without a reason above it"
    # Each suppression hides real findings (a stale one would hide a future problem for no reason).
    _, findings = _run(use_config=False)
    fired = {m.group("rule") for m in findings}
    for rule in suppressed:
        assert rule in fired, f"{rule} is suppressed but does not fire without the suppression: remove it from .oelint.cfg"


def test_the_lint_catches_what_the_layer_once_had(tmp_path: Path) -> None:
    # The lint is really run with the layer's settings: a DESCRIPTION taken out of a copy of
    # the lorad recipe (one of the errors issue 25 counted) comes back as an error.
    layer = tmp_path / "meta-x"
    shutil.copytree(LAYER, layer)
    recipe = layer / "recipes-lorad" / "lorad" / "lorad_git.bb"
    text = recipe.read_text(encoding="utf-8")
    start = text.index("DESCRIPTION = ")
    end = text.index("HOMEPAGE = ")
    recipe.write_text(text[:start] + text[end:], encoding="utf-8")
    done = subprocess.run([_oelint(), "--quiet", "--release", "scarthgap", "recipes-lorad/lorad/lorad_git.bb"], cwd=layer,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(layer)}, capture_output=True, text=True, timeout=300, check=False)
    assert ":error:oelint.var.mandatoryvar.DESCRIPTION:" in done.stdout + done.stderr
