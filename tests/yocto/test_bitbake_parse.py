"""meta-lorad parsed by real bitbake against openembedded-core of the release it supports.

The layer names one release, scarthgap, and these tests parse it there: bitbake 2.8 and
openembedded-core's `meta` from a poky checkout of that release (`LORAD_POKY_DIR`, by
default /var/cache/lorad/poky-scarthgap: a folder with poky's `bitbake/` and `meta/`), in a
fresh build directory, with `BB_NO_NETWORK = "1"` and, where the machine allows it, in a
network namespace of its own, so that a parse that wanted the network fails. The layers
meta-lorad depends on (meta-oe, meta-python) come from a meta-openembedded checkout of the
same release (`LORAD_META_OE_DIR`, by default /var/cache/lorad/meta-openembedded-scarthgap)
or, where there is none, as stand-ins that only declare the two layer collections (their
recipes would be masked anyway: what is parsed is meta-lorad's recipes, against the real
classes and configuration of openembedded-core).

`bitbake -p` must parse every recipe and variant without an error or any warning but
"no recipes in the masked layers". Then tests/yocto/bitbake_probe.py looks at each parsed
recipe through tinfoil: no variable a recipe's own files use is undefined there (that is
how a variable of a later release, such as styhead's `${UNPACKDIR}`, shows: bitbake leaves
it unexpanded and says nothing at parse time), and bitbake's fetcher, given the recipe's
SRC_URI, resolves every git revision without the network and finds a sha256 for every file
it downloads.

Neither Debian 12 nor the package registries these machines reach ship bitbake 2.8 or
openembedded-core, so when no poky checkout is there the tests are skipped, saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYER = REPO / "yocto" / "meta-lorad"
PROBE = Path(__file__).with_name("bitbake_probe.py")
SERIES = "scarthgap"

POKY = Path(os.environ.get("LORAD_POKY_DIR", "/var/cache/lorad/poky-scarthgap"))
META_OE = Path(os.environ.get("LORAD_META_OE_DIR", "/var/cache/lorad/meta-openembedded-scarthgap"))

#: Variables that only meta-tegra defines, used by the onnxruntime recipe with
#: PACKAGECONFIG[cuda] alone (the README: the cuda option needs meta-tegra).
FROM_META_TEGRA = {"CUDA_VERSION", "CUDA_ARCHITECTURES"}
#: The only warnings a clean parse may print: the layers whose recipes are masked.
_ALLOWED_WARNING = re.compile(r"^WARNING: No bb files in default matched BBFILE_PATTERN_(core|openembedded-layer|meta-python) ")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


#: What meta-lorad's recipes depend on that no recipe of openembedded-core, meta-oe,
#: meta-python (scarthgap) or meta-lorad provides: an image with lorad does not build until
#: each has a recipe here. prometheus-client: meta-openembedded has no recipe on any
#: branch; orjson: meta-python has one from its master branch on (after scarthgap); scipy
#: (dp-accounting's accountants import it): none in meta-openembedded, and a scipy build
#: needs a Fortran compiler and BLAS/LAPACK. The test fails when one is added, so that
#: this list shrinks with it.
NOT_YET_PROVIDED = {"python3-orjson", "python3-prometheus-client", "python3-scipy", "python3-scipy-native"}


def _poky_or_skip() -> Path:
    if not (POKY / "bitbake" / "bin" / "bitbake").is_file() or not (POKY / "meta" / "conf" / "layer.conf").is_file():
        pytest.skip(f"no poky checkout of {SERIES} at {POKY} (set LORAD_POKY_DIR to a folder with poky's bitbake/ and "
                    "meta/): no package registry reachable here ships bitbake 2.8 or openembedded-core")
    compat = re.search(r'^LAYERSERIES_COMPAT_core\s*=\s*"([^"]*)"', (POKY / "meta" / "conf" / "layer.conf").read_text(), re.M)
    assert compat and compat.group(1).split() == [SERIES], f"{POKY} is not openembedded-core {SERIES}: {compat and compat.group(1)}"
    return POKY


def _layer_conf(collection: str, depends: str) -> str:
    return (f'BBPATH .= ":${{LAYERDIR}}"\nBBFILE_COLLECTIONS += "{collection}"\n'
            f'BBFILE_PATTERN_{collection} := "^${{LAYERDIR}}/"\nBBFILE_PRIORITY_{collection} = "5"\n'
            f'LAYERDEPENDS_{collection} = "{depends}"\nLAYERSERIES_COMPAT_{collection} = "{SERIES}"\n')


def _dependency_layers(tmp: Path) -> list[Path]:
    if (META_OE / "meta-oe" / "conf" / "layer.conf").is_file() and (META_OE / "meta-python" / "conf" / "layer.conf").is_file():
        return [META_OE / "meta-oe", META_OE / "meta-python"]
    # Stand-ins: the collections meta-lorad's LAYERDEPENDS names, nothing else.
    stubs = []
    for name, collection, depends in (("meta-oe", "openembedded-layer", "core"), ("meta-python", "meta-python", "core openembedded-layer")):
        conf = tmp / "stub-layers" / name / "conf" / "layer.conf"
        conf.parent.mkdir(parents=True)
        conf.write_text(_layer_conf(collection, depends))
        stubs.append(conf.parent.parent)
    return stubs


def _missing_hosttools(poky: Path) -> list[str]:
    """HOSTTOOLS entries this machine lacks. bitbake links them at start; only tasks run them."""
    text = (poky / "meta" / "conf" / "bitbake.conf").read_text()
    tools: list[str] = []
    for block in re.findall(r'^HOSTTOOLS \+= "([^"$]*)"', text, re.M):
        tools += block.replace("\\", " ").split()
    assert len(tools) > 20, "bitbake.conf's HOSTTOOLS list was not found"
    return sorted(t for t in set(tools) if shutil.which(t) is None)


def _locale_env(tmp: Path) -> dict[str, str]:
    """bitbake insists on an en_US.UTF-8 locale; where none is installed, C.UTF-8 under that name."""
    probe = subprocess.run([sys.executable, "-c", "import locale; locale.setlocale(locale.LC_CTYPE, ('en_US', 'UTF-8'))"],
                           capture_output=True, check=False)
    if probe.returncode == 0:
        return {}
    c_utf8 = next((p for p in (Path("/usr/lib/locale/C.utf8"), Path("/usr/lib/locale/C.UTF-8")) if p.is_dir()), None)
    if c_utf8 is None:
        pytest.fail("bitbake needs the en_US.UTF-8 locale, and neither it nor C.UTF-8 is installed")
    (tmp / "locale").mkdir()
    (tmp / "locale" / "en_US.UTF-8").symlink_to(c_utf8)
    return {"LOCPATH": str(tmp / "locale"), "BB_ENV_PASSTHROUGH_ADDITIONS": "LOCPATH"}


def _no_network_prefix() -> list[str]:
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "--net", "true"], capture_output=True, check=False).returncode == 0:
        return [unshare, "--net"]
    return []  # BB_NO_NETWORK alone


@dataclass(frozen=True)
class Build:
    poky: Path
    dir: Path
    env: dict[str, str]
    prefix: list[str]

    def run(self, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix, *argv], cwd=self.dir, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)


@pytest.fixture(scope="module", params=["qemuarm64", "qemux86-64"])
def build(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Build:
    poky = _poky_or_skip()
    tmp = tmp_path_factory.mktemp(f"bitbake-{request.param}")
    deps = _dependency_layers(tmp)
    conf = tmp / "build" / "conf"
    conf.mkdir(parents=True)
    layers = [poky / "meta", *deps, LAYER]
    # Only meta-lorad's recipes are parsed: the other layers give their configuration and classes.
    masks = [f"^{poky / 'meta'}/recipes-", *(f"^{d}/" for d in deps)]
    (conf / "bblayers.conf").write_text(
        'BBPATH = "${TOPDIR}"\nBBFILES ?= ""\n'
        f'BBLAYERS = "{" ".join(map(str, layers))}"\nBBMASK = "{" ".join(masks)}"\n')
    missing = _missing_hosttools(poky)
    (conf / "local.conf").write_text(
        f'MACHINE = "{request.param}"\nCONF_VERSION = "2"\nBB_NO_NETWORK = "1"\n'
        # Tools only tasks would run (chrpath, cpio, diffstat, gawk, ... where this machine lacks them).
        + (f'HOSTTOOLS:remove = "{" ".join(missing)}"\n' if missing else ""))
    # openembedded-core's way to opt out of its host checks ("touch conf/sanity.conf", see
    # meta/conf/sanity.conf): they are about building (compiler versions, not running as
    # root, ...), and CI runs as root; a parse needs none of them.
    (conf / "sanity.conf").write_text("")
    env = {
        "PATH": f"{poky / 'bitbake' / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp),
        "LANG": "C.UTF-8",
        "BB_NO_NETWORK": "1",
        **_locale_env(tmp),
    }
    return Build(poky, tmp / "build", env, _no_network_prefix())


@pytest.fixture(scope="module")
def probe(build: Build) -> dict[str, Any]:
    out = build.dir / "probe.json"
    done = build.run(sys.executable, str(PROBE), str(build.poky), str(LAYER), str(out))
    assert done.returncode == 0 and out.is_file(), (done.stdout + done.stderr)[-4000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_bitbake_parses_every_recipe_without_error_or_warning(build: Build) -> None:
    done = build.run("bitbake", "-p")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert not [line for line in output.splitlines() if line.startswith("ERROR")], output[-4000:]
    warnings = [line for line in output.splitlines() if line.startswith("WARNING") and not _ALLOWED_WARNING.match(line)]
    assert not warnings, "\n".join(warnings)
    recipes = len(list(LAYER.glob("recipes-*/*/*.bb")))
    summary = re.search(r"Parsing of (\d+) \.bb files complete .* (\d+) targets, (\d+) skipped, \d+ masked, (\d+) errors", output)
    assert summary, output[-2000:]
    parsed, _targets, skipped, errors = map(int, summary.groups())
    assert (parsed, skipped, errors) == (recipes, 0, 0), summary.group(0)


def test_parse_is_against_the_supported_release(probe: dict[str, Any]) -> None:
    assert probe["series"].split() == [SERIES]
    assert probe["bitbake"].startswith("2.8."), probe["bitbake"]


def test_every_recipe_and_variant_was_parsed(probe: dict[str, Any]) -> None:
    parsed = set(probe["recipes"])
    for recipe in LAYER.glob("recipes-*/*/*.bb"):
        rel = str(recipe.relative_to(LAYER))
        assert rel in parsed, f"{rel} was not parsed"
        if 'BBCLASSEXTEND = "native"' in recipe.read_text():
            assert f"virtual:native:{rel}" in parsed, f"{rel}: no native variant"


def test_no_recipe_uses_a_variable_the_release_does_not_define(probe: dict[str, Any]) -> None:
    problems = []
    for fn, r in probe["recipes"].items():
        for u in r["undefined"]:
            if not (u["file"].startswith("onnxruntime_") and u["name"] in FROM_META_TEGRA):
                problems.append(f"{fn}: {u['file']}:{u['line']} uses ${{{u['name']}}}, which {SERIES} does not define")
        assert r["s"].startswith(r["workdir"] + "/"), f"{fn}: S = {r['s']!r} is not under WORKDIR"
    assert not problems, "\n".join(problems)


def test_the_fetcher_needs_no_network_and_checks_every_download(probe: dict[str, Any]) -> None:
    problems = []
    for fn, r in probe["recipes"].items():
        if r["fetch_error"]:
            problems.append(f"{fn}: the fetcher failed without network: {r['fetch_error']}")
        for s in r["sources"]:
            if s["recommends_checksum"] and not _SHA256.match(s["sha256"] or ""):
                problems.append(f"{fn}: {s['uri']} has no sha256sum")
            for name, rev in s.get("revisions", {}).items():
                if not _COMMIT.match(rev or ""):
                    problems.append(f"{fn}: {s['uri']} ({name}) is not pinned to a commit: {rev!r}")
    assert not problems, "\n".join(problems)
    # The downloads were looked at: the PyPI sdists, the crates and ONNX Runtime's archives.
    checked = [s for r in probe["recipes"].values() for s in r["sources"] if s["recommends_checksum"]]
    assert len(checked) > 50


def _recipe_names(layer: Path) -> set[str]:
    return {p.name.split("_")[0].removesuffix(".bb") for p in layer.glob("**/recipes-*/*/*.bb")}


def test_every_dependency_has_a_provider_in_the_release(build: Build, probe: dict[str, Any]) -> None:
    if not (META_OE / "meta-python" / "conf" / "layer.conf").is_file():
        pytest.skip(f"no meta-openembedded checkout of {SERIES} at {META_OE} (LORAD_META_OE_DIR) to look providers up in")
    provided = set()
    for layer in (build.poky / "meta", META_OE / "meta-oe", META_OE / "meta-python", LAYER):
        provided |= _recipe_names(layer)
    # python3's own packages (python3-json, python3-logging, python3-modules, ...).
    text = (build.poky / "meta" / "recipes-devtools" / "python" / "python3" / "python3-manifest.json").read_text()
    manifest = json.loads(text[text.index("# EOC") + 6:])  # a comment block, then JSON (as python3_*.bb reads it)
    provided |= {f"python3-{name}" for name in manifest} | {"python3-modules"}
    for r in probe["recipes"].values():
        provided |= set(r["rdepends"])  # the packages the layer's recipes make
    missing = set()
    for r in probe["recipes"].values():
        for dep in [*r["depends"], *(d for deps in r["rdepends"].values() for d in deps)]:
            base = dep.removesuffix("-native")
            base = re.sub(r"-(dev|dbg|staticdev|doc|src|locale|ptest)$", "", base)
            if not dep.startswith("virtual/") and dep not in provided and base not in provided:
                missing.add(dep)
    assert missing == NOT_YET_PROVIDED, (
        f"depended on but provided by no recipe: {sorted(missing - NOT_YET_PROVIDED)}; "
        f"now provided, take them out of NOT_YET_PROVIDED: {sorted(NOT_YET_PROVIDED - missing)}")
