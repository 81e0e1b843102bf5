"""Checks of the Yocto layer yocto/meta-lorad that run without bitbake.

(tests/yocto parses the layer with real bitbake against openembedded-core scarthgap, and
lints it with oelint-adv.)

Each recipe is read as BitBake statements (assignments, inherit/require, task
functions) so a typo that bitbake would reject fails here; the lorad recipe's Python
runtime dependencies are compared with pyproject.toml in both directions, and the
versions the layer builds must satisfy pyproject's specifiers; the unit file is
checked by `systemd-analyze verify` (when it runs here) and against `lorad serve`;
the default config is loaded by the daemon's own parser. The ONNX Runtime recipe must
build without network: every third-party source its CMake would download is a SRC_URI
entry laid out as ONNX Runtime's dependency mirror, and no task body downloads anything.
"""

from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from lorad.daemon.cli import build_parser
from lorad.daemon.config import load_config

REPO = Path(__file__).resolve().parents[2]
LAYER = REPO / "yocto" / "meta-lorad"
LORAD_DIR = LAYER / "recipes-lorad" / "lorad"
LORAD_RECIPE = LORAD_DIR / "lorad_git.bb"
UNIT = LORAD_DIR / "files" / "lorad.service"
DEFAULT_CONFIG = LORAD_DIR / "files" / "lorad.yaml"
ORT_DIR = LAYER / "recipes-ml" / "onnxruntime"
ORT_RECIPE, = ORT_DIR.glob("onnxruntime_*.bb")
ORT_DEPS_INC = ORT_DIR / "onnxruntime-deps.inc"
ORT_DEPS_TXT = ORT_DIR / "files" / "deps.txt"
ORT_DEPS_SCRIPT = LAYER / "scripts" / "ort_deps_inc.py"

RECIPES = sorted(LAYER.glob("recipes-*/*/*.bb"))
INCLUDES = sorted(LAYER.glob("recipes-*/*/*.inc"))

#: pyproject distribution name -> OE package, where it is not "python3-<name>".
PACKAGE_FOR = {
    "systemd-python": "python3-systemd",
    "onnxruntime": "python3-onnxruntime",
    "onnxruntime-training-cpu": "python3-onnxruntime",
}
#: Provided by openembedded-core or meta-python (scarthgap), not by this layer.
FROM_OTHER_LAYERS = {
    "python3-aiohttp", "python3-cryptography", "python3-numpy", "python3-paho-mqtt",
    "python3-platformdirs", "python3-pyyaml",
    "python3-systemd", "python3-tqdm", "python3-pydantic", "python3-pydantic-core",
}
#: Needed, but no scarthgap layer has a recipe and this layer has none yet: an image with
#: lorad does not build until it has (tests/yocto/test_bitbake_parse.py checks this list
#: against the real layers, as NOT_YET_PROVIDED).
NOT_YET_PROVIDED = {"python3-prometheus-client", "python3-orjson"}

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA1 = _COMMIT
#: Commands that download: none may appear in a recipe's task bodies or values. The
#: fetcher (SRC_URI) is the one way in, so that BB_NO_NETWORK / mirrors / checksums apply.
_DOWNLOADS = re.compile(
    r"\b(git\s+(clone|fetch|pull|submodule|ls-remote)|curl|wget|pip3?\s+(download|install)"
    r"|npm\s+(install|ci)|cargo\s+fetch|FetchContent_Populate|file\s*\(\s*DOWNLOAD)\b",
    re.IGNORECASE,
)


# ---------------------------------------------------------------- a BitBake reader


@dataclass(frozen=True)
class Assignment:
    name: str           # "SRC_URI", "RDEPENDS:${PN}", "do_configure"
    flag: str | None    # "sha256sum" in SRC_URI[sha256sum]
    op: str
    value: str
    line: int


@dataclass(frozen=True)
class Recipe:
    path: Path
    assignments: list[Assignment]
    inherits: list[str]
    requires: list[str]
    functions: list[str]

    def values(self, name: str, flag: str | None = None) -> list[str]:
        return [a.value for a in self.assignments if a.name == name and a.flag == flag]

    def value(self, name: str, flag: str | None = None) -> str:
        found = self.values(name, flag)
        assert found, f"{self.path.name}: no {name}{f'[{flag}]' if flag else ''}"
        return " ".join(found)

    def flags(self, name: str) -> dict[str, str]:
        return {a.flag: a.value for a in self.assignments if a.name == name and a.flag}


_NAME = r"[A-Za-z0-9_${}.+/@~-]+(?::[A-Za-z0-9_${}.+-]+)*"
_ASSIGN = re.compile(rf"^(?:export\s+)?(?P<name>{_NAME})(?:\[(?P<flag>[A-Za-z0-9_.+-]+)\])?\s*(?P<op>\?\?=|\?=|:=|\+=|=\+|\.=|=\.|=)\s*(?P<value>.*)$")
_FUNC = re.compile(rf"^(?:python\s+|fakeroot\s+)*(?P<name>{_NAME})?\s*\(\)\s*\{{\s*$")
_DIRECTIVE = re.compile(r"^(?P<kw>inherit_defer|inherit|require|include|addtask|deltask|EXPORT_FUNCTIONS)\s+(?P<arg>.+)$")


def parse_bitbake(path: Path) -> Recipe:
    """Statements of a .bb/.inc/.conf file; AssertionError naming the line of anything else."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assignments: list[Assignment] = []
    inherits: list[str] = []
    requires: list[str] = []
    functions: list[str] = []
    i = 0
    while i < len(lines):
        start = i
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            assert i < len(lines), f"{path.name}:{start + 1}: continuation at end of file"
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        func = _FUNC.match(line)
        if func:
            while i < len(lines) and lines[i] != "}":
                i += 1
            assert i < len(lines), f"{path.name}:{start + 1}: function body never closed with '}}'"
            i += 1
            functions.append(func.group("name") or "<anonymous>")
            continue
        m = _ASSIGN.match(line)
        if m:
            raw = m.group("value").strip()
            assert len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'", \
                f"{path.name}:{start + 1}: value of {m.group('name')} is not one quoted string: {raw!r}"
            body = raw[1:-1]
            assert raw[0] not in body, f"{path.name}:{start + 1}: stray quote in the value of {m.group('name')}"
            assignments.append(Assignment(m.group("name"), m.group("flag"), m.group("op"), " ".join(body.split()), start + 1))
            continue
        d = _DIRECTIVE.match(line)
        assert d, f"{path.name}:{start + 1}: not a BitBake statement: {line!r}"
        if d.group("kw") in ("inherit", "inherit_defer"):
            inherits.extend(d.group("arg").split())
        elif d.group("kw") in ("require", "include"):
            requires.append(d.group("arg").strip())
    return Recipe(path, assignments, inherits, requires, functions)


def _expand_bpn(text: str, recipe_path: Path) -> str:
    return text.replace("${BPN}", recipe_path.stem.split("_")[0])


@pytest.fixture(scope="module")
def recipes() -> dict[str, Recipe]:
    return {p.name: parse_bitbake(p) for p in RECIPES}


@pytest.fixture(scope="module")
def lorad_recipe() -> Recipe:
    return parse_bitbake(LORAD_RECIPE)


def _pyproject_requirements() -> list[Requirement]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return [Requirement(r) for r in data["project"]["dependencies"]]


def _package_for(req: Requirement) -> str:
    name = canonicalize_name(req.name)
    return PACKAGE_FOR.get(name, f"python3-{name}")


# ---------------------------------------------------------------- the reader itself


@pytest.mark.parametrize("text", [
    'LICENSE = MIT\n',
    'do_install() {\n    true\n',
    'install -d ${D}\n',
    'SRC_URI = "file://a \n',
    'SRC_URI = "a" "b"\n',
], ids=["unquoted", "unclosed function", "shell outside a function", "half-quoted", "two strings"])
def test_the_reader_rejects_what_bitbake_would(tmp_path: Path, text: str) -> None:
    p = tmp_path / "x.bb"
    p.write_text(text)
    with pytest.raises(AssertionError):
        parse_bitbake(p)


# ---------------------------------------------------------------- layer.conf


def test_layer_conf_declares_the_layer() -> None:
    conf = parse_bitbake(LAYER / "conf" / "layer.conf")
    assert "lorad" in conf.value("BBFILE_COLLECTIONS").split()
    assert conf.value("BBFILE_PATTERN_lorad") == "^${LAYERDIR}/"
    assert int(conf.value("BBFILE_PRIORITY_lorad")) > 0
    # One release: the one tests/yocto parses the layer against.
    assert conf.value("LAYERSERIES_COMPAT_lorad").split() == ["scarthgap"]
    assert {"core", "openembedded-layer", "meta-python"} <= set(conf.value("LAYERDEPENDS_lorad").split())
    assert conf.values("LORAD_LAYERDIR") == ["${LAYERDIR}"]
    # Every recipe in the layer is matched by a BBFILES pattern.
    patterns = [p.replace("${LAYERDIR}/", "") for p in conf.value("BBFILES").split()]
    for recipe in RECIPES:
        rel = recipe.relative_to(LAYER)
        assert any(rel.match(p) for p in patterns), f"{rel} is not matched by BBFILES {patterns}"


# ---------------------------------------------------------------- recipes


def test_the_layer_has_the_expected_recipes() -> None:
    names = {p.name for p in RECIPES}
    assert {"lorad_git.bb", ORT_RECIPE.name, "python3-safetensors_0.4.5.bb"} <= names
    assert {p.stem.split("_")[0] for p in RECIPES} >= {"python3-tuf", "python3-securesystemslib", "python3-dp-accounting", "python3-onnx"}


@pytest.mark.parametrize("path", RECIPES + INCLUDES, ids=lambda p: p.name)
def test_every_file_is_made_of_bitbake_statements(path: Path) -> None:
    parse_bitbake(path)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_has_licence_and_source_checksums(path: Path) -> None:
    r = parse_bitbake(path)
    assert r.value("LICENSE")
    lic = r.value("LIC_FILES_CHKSUM").split()
    assert lic, f"{path.name}: empty LIC_FILES_CHKSUM"
    for entry in lic:
        md5 = dict(p.split("=", 1) for p in entry.split(";")[1:]).get("md5", "")
        assert _MD5.match(md5), f"{path.name}: LIC_FILES_CHKSUM entry without an md5: {entry}"

    src_uri = " ".join(r.values("SRC_URI"))
    # The pypi class adds the sdist's https URL to SRC_URI.
    if "pypi" in r.inherits or re.search(r"\b(https?|ftp)://", src_uri):
        checksum = r.value("SRC_URI", "sha256sum")
        assert _SHA256.match(checksum), f"{path.name}: SRC_URI[sha256sum] is not a sha256: {checksum!r}"
        assert len(set(checksum)) > 4, f"{path.name}: SRC_URI[sha256sum] looks like a placeholder"
    for uri in src_uri.split():
        if uri.startswith(("git://", "gitsm://")):
            # Pinned, lorad's own included: ${AUTOREV} makes every parse ask the repository.
            name = _uri_params(uri)[1].get("name")
            srcrev = r.value(f"SRCREV_{name}" if name else "SRCREV")
            assert _COMMIT.match(srcrev), f"{path.name}: {uri} needs SRCREV pinned to a commit, got {srcrev!r}"
    for req in r.requires:
        assert (path.parent / _expand_bpn(req, path)).is_file(), f"{path.name}: required file {req} is missing"


def test_checksums_are_distinct_across_recipes(recipes: dict[str, Recipe]) -> None:
    sums = [r.value("SRC_URI", "sha256sum") for r in recipes.values() if r.values("SRC_URI", "sha256sum")]
    assert len(sums) >= 5
    assert len(sums) == len(set(sums)), "two recipes claim the same source checksum"


def test_every_crate_has_its_checksum_and_nothing_else() -> None:
    inc = parse_bitbake(LAYER / "recipes-devtools" / "python" / "python3-safetensors-crates.inc")
    crates = {u.removeprefix("crate://crates.io/").replace("/", "-") for u in inc.value("SRC_URI").split()}
    assert all(u.startswith("crate://crates.io/") for u in inc.value("SRC_URI").split())
    sums = {flag.removesuffix(".sha256sum"): v for flag, v in inc.flags("SRC_URI").items()}
    assert crates == set(sums), f"crates without checksum: {crates - set(sums)}; checksums without crate: {set(sums) - crates}"
    assert all(_SHA256.match(v) for v in sums.values())
    assert any(c.startswith("pyo3-0.22") for c in crates)


# ---------------------------------------------------------------- lorad vs pyproject


def test_lorad_python_rdepends_match_pyproject(lorad_recipe: Recipe) -> None:
    rdepends = set(lorad_recipe.value("LORAD_PYTHON_RDEPENDS").split())
    wanted = {_package_for(req) for req in _pyproject_requirements()}
    assert rdepends == wanted, (
        f"in pyproject.toml but not in LORAD_PYTHON_RDEPENDS: {sorted(wanted - rdepends)}; "
        f"in LORAD_PYTHON_RDEPENDS but not in pyproject.toml: {sorted(rdepends - wanted)}"
    )
    assert "${LORAD_PYTHON_RDEPENDS}" in lorad_recipe.value("RDEPENDS:${PN}")


def test_every_lorad_dependency_has_a_recipe(lorad_recipe: Recipe, recipes: dict[str, Recipe]) -> None:
    built_here = {p.stem.split("_")[0] for p in RECIPES}
    for r in recipes.values():
        for packages in r.values("PACKAGES"):
            built_here |= {_expand_bpn(p, r.path) for p in packages.split()}
    for pkg in lorad_recipe.value("LORAD_PYTHON_RDEPENDS").split():
        assert pkg in built_here or pkg in FROM_OTHER_LAYERS or pkg in NOT_YET_PROVIDED, \
            f"no recipe in this layer or its dependencies provides {pkg}"
    assert not (built_here & FROM_OTHER_LAYERS), "a package is both built here and expected from another layer"


def test_versions_built_here_satisfy_pyproject() -> None:
    versions: dict[str, Version] = {}
    for path in RECIPES:
        pn, _, pv = path.stem.partition("_")
        if pv and pv != "git":
            versions[pn] = Version(pv)
    versions["python3-onnxruntime"] = versions.pop("onnxruntime")
    checked = 0
    for req in _pyproject_requirements():
        pkg = _package_for(req)
        if canonicalize_name(req.name) == "onnxruntime-training-cpu":
            # PyPI's training wheel (x86_64 development venvs only) is not what the
            # layer builds: devices get plain onnxruntime, the `onnxruntime` line.
            continue
        if pkg in versions:
            # Markers are ignored: the device build serves every platform the
            # pyproject lines cover between them.
            assert req.specifier.contains(versions[pkg], prereleases=True), \
                f"the layer builds {pkg} {versions[pkg]} but pyproject.toml asks for {req}"
            checked += 1
    assert checked >= 6


# ---------------------------------------------------------------- onnxruntime


def test_onnxruntime_is_plain_with_training_apis_and_cuda_as_options() -> None:
    r = parse_bitbake(ORT_RECIPE)
    args = r.value("ORT_BUILD_ARGS").split()
    for flag in ("--build_wheel", "--parallel", "--skip_tests", "--skip_submodule_sync", "${ORT_TRAINING_ARGS}", "${ORT_CUDA_ARGS}"):
        assert flag in args, f"ORT_BUILD_ARGS lacks {flag}"
    assert "--enable_training_apis" not in args, "the default build must be plain ONNX Runtime"
    assert args[args.index("--config") + 1] == "Release"
    text = ORT_RECIPE.read_text()
    assert "${ORT_BUILD_ARGS} --update" in text and "${ORT_BUILD_ARGS} --build" in text
    flags = r.flags("PACKAGECONFIG")
    assert {"cuda", "training"} <= set(flags)
    assert flags["cuda"].split(",")[2].split() == ["cuda-toolkit", "cudnn"]
    assert r.value("ORT_TRAINING_ARGS") == "${@bb.utils.contains('PACKAGECONFIG', 'training', '--enable_training_apis', '', d)}"
    assert r.value("PACKAGECONFIG") == "", "training and cuda are opt-in"
    for flag in ("--use_cuda", "--cuda_home", "--cudnn_home"):
        assert flag in r.value("ORT_CUDA_ARGS")
    assert {"do_configure", "do_compile", "do_install", "do_ort_deps_mirror"} <= set(r.functions)
    assert "python3-${BPN}" in r.value("PACKAGES").split()


def _deps_txt() -> dict[str, tuple[str, str]]:
    deps = {}
    for line in ORT_DEPS_TXT.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, url, sha1 = line.split(";")
            assert name not in deps, f"deps.txt lists {name} twice"
            deps[name] = (url, sha1.lower())
    return deps


def _uri_params(uri: str) -> tuple[str, dict[str, str]]:
    url, *params = uri.split(";")
    return url, dict(p.split("=", 1) for p in params)


def test_every_onnxruntime_dependency_is_a_checked_src_uri_entry_in_the_mirror() -> None:
    deps = _deps_txt()
    inc = parse_bitbake(ORT_DEPS_INC)
    mirrored = inc.value("ORT_DEPS").split()
    skipped = inc.value("ORT_DEPS_NOT_MIRRORED").split()
    from_git = inc.value("ORT_DEPS_FROM_GIT").split()
    assert not set(mirrored) & set(skipped) and not set(from_git) & (set(mirrored) | set(skipped))
    assert set(mirrored) | set(skipped) | set(from_git) == set(deps), (
        f"deps.txt entries neither fetched nor declared unused: {sorted(set(deps) - set(mirrored) - set(skipped) - set(from_git))}; "
        f"names deps.txt does not have: {sorted((set(mirrored) | set(skipped) | set(from_git)) - set(deps))}"
    )
    # What a Linux CPU/CUDA build needs is never among the skipped ones. No prebuilt protoc
    # is fetched: onnxruntime-protoc-native builds it from the same protobuf archive.
    needed = {"abseil_cpp", "protobuf", "onnx", "eigen", "re2", "flatbuffers", "json", "microsoft_gsl", "date",
              "safeint", "mp11", "pybind11", "pytorch_cpuinfo", "utf8_range", "cudnn_frontend"}
    assert needed <= set(mirrored), f"skipped but needed: {sorted(needed - set(mirrored))}"
    assert {s for s in deps if s.startswith("protoc_")} <= set(skipped)
    assert from_git == ["cutlass"]

    entries = {}
    # The archives (the cutlass git entry is a PACKAGECONFIG expression, checked below).
    for uri in (u for u in inc.value("SRC_URI").split() if u.startswith("https://")):
        url, params = _uri_params(uri)
        entries[params["name"]] = (url, params)
    sums = inc.flags("SRC_URI")
    files = inc.flags("ORT_DEP_FILE")
    paths = inc.flags("ORT_DEP_MIRROR_PATH")
    assert set(entries) == set(mirrored) == set(files)
    assert set(paths) == set(mirrored) | set(from_git)
    # sha256 for each (bitbake's and oelint's rule), and deps.txt's own SHA1 beside it.
    assert set(sums) == {f"{n}.sha1sum" for n in mirrored} | {f"{n}.sha256sum" for n in mirrored}
    assert len({sums[f"{n}.sha256sum"] for n in mirrored}) == len(mirrored)
    for name in mirrored:
        url, sha1 = deps[name]
        got_url, params = entries[name]
        assert got_url == url, f"{name}: SRC_URI has {got_url}, deps.txt {url}"
        assert _SHA1.match(sums[f"{name}.sha1sum"]) and sums[f"{name}.sha1sum"] == sha1, f"{name}: sha1sum differs from deps.txt"
        assert _SHA256.match(sums[f"{name}.sha256sum"]), f"{name}: no sha256sum"
        assert params["unpack"] == "0" and params["subdir"] == "ort-deps", f"{name}: must be copied as-is for FetchContent"
        assert params["downloadfilename"] == files[name] and files[name].startswith(f"onnxruntime-dep-{name}-")
        # onnxruntime_external_deps.cmake looks for <mirror>/<URL without https://>.
        assert url.startswith("https://") and paths[name] == url.removeprefix("https://")
    assert len(set(files.values())) == len(files), "two dependencies share a download name in DL_DIR"

    for name in from_git:
        assert f"name={name};destsuffix=ort-git/{name}" in inc.value("SRC_URI")
        assert inc.flags("ORT_DEP_SHA1")[name] == deps[name][1]
        assert paths[name] == deps[name][0].removeprefix("https://")
        assert _COMMIT.match(inc.value(f"SRCREV_{name}"))

    r = parse_bitbake(ORT_RECIPE)
    assert "file://deps.txt" in r.value("SRC_URI").split()
    assert "onnxruntime-protoc-native" in r.value("DEPENDS").split()
    assert "ONNX_CUSTOM_PROTOC_EXECUTABLE=${STAGING_BINDIR_NATIVE}/onnxruntime-protoc" in r.value("ORT_BUILD_ARGS").split()
    assert _COMMIT.match(r.value("SRCREV"))
    assert "onnxruntime-deps.inc" in r.requires
    defines = r.value("ORT_BUILD_ARGS").split()
    for define in ("onnxruntime_CMAKE_DEPS_MIRROR_DIR=${ORT_DEPS_MIRROR}", "FETCHCONTENT_TRY_FIND_PACKAGE_MODE=NEVER",
                   "FETCHCONTENT_UPDATES_DISCONNECTED=ON"):
        assert define in defines, f"ORT_BUILD_ARGS lacks {define}"
    assert "addtask ort_deps_mirror after do_unpack before do_configure" in ORT_RECIPE.read_text()
    # The .inc is what the script makes from deps.txt (no hand edits drift from it).
    done = subprocess.run([sys.executable, str(ORT_DEPS_SCRIPT), "--check"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("body", [
    "git clone https://github.com/x/y", "curl -L -o a.zip https://x", "wget https://x", "pip download onnx",
    "${PYTHON} -m pip install x", "cmake -P x.cmake  # file( DOWNLOAD https://x a)", "git submodule update --init",
])
def test_the_download_check_catches(body: str) -> None:
    assert _DOWNLOADS.search(body)


@pytest.mark.parametrize("path", RECIPES + INCLUDES, ids=lambda p: p.name)
def test_no_task_downloads(path: Path) -> None:
    r = parse_bitbake(path)
    for a in r.assignments:
        if a.flag == "network":
            assert a.value == "0", f"{path.name}:{a.line}: {a.name}[network] = {a.value!r}: only do_fetch may use the network"
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.lstrip().startswith("#"):
            assert not _DOWNLOADS.search(line), f"{path.name}:{number} downloads outside the fetcher: {line.strip()}"
    assert "--skip_submodule_sync" in parse_bitbake(ORT_RECIPE).value("ORT_BUILD_ARGS").split()


# ---------------------------------------------------------------- the unit file


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=True, interpolation=None, empty_lines_in_values=False)
    unit.optionxform = str  # type: ignore[assignment, method-assign]
    unit.read_string(UNIT.read_text(encoding="utf-8"))
    return unit


def test_unit_file_settings() -> None:
    s = _unit()["Service"]
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30", "Restart": "on-failure",
        "StateDirectory": "lorad", "ConfigurationDirectory": "lorad", "User": "lorad",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
        "StandardOutput": "journal", "StandardError": "journal",
    }
    assert {k: s.get(k) for k in expected} == expected
    assert set(s["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert set(s["ReadOnlyPaths"].split()) == {"-/sys/class/power_supply", "-/sys/class/thermal"}
    assert int(s["CPUWeight"]) > 0 and "Nice" in s
    assert _unit()["Install"]["WantedBy"] == "multi-user.target"


def test_exec_start_is_accepted_by_lorad_serve() -> None:
    argv = shlex.split(_unit()["Service"]["ExecStart"])
    assert argv[:2] == ["/usr/bin/lorad", "serve"]
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and str(args.config) == "/etc/lorad/lorad.yaml"
    help_text = subprocess.run(
        [sys.executable, "-m", "lorad.daemon.cli", "serve", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    for flag in (a for a in argv if a.startswith("--")):
        assert flag in help_text, f"ExecStart uses {flag}, which `lorad serve --help` does not list"


def test_recipe_installs_the_config_the_unit_reads(lorad_recipe: Recipe) -> None:
    assert lorad_recipe.value("CONFFILES:${PN}") == "${sysconfdir}/lorad/lorad.yaml"
    # ${WORKDIR}: scarthgap has no ${UNPACKDIR} (styhead's).
    assert "${WORKDIR}/lorad.yaml ${D}${sysconfdir}/lorad/lorad.yaml" in LORAD_RECIPE.read_text()
    assert lorad_recipe.value("SYSTEMD_SERVICE:${PN}") == UNIT.name
    assert {"python_setuptools_build_meta", "systemd", "useradd"} <= set(lorad_recipe.inherits)
    assert lorad_recipe.value("USERADD_PARAM:${PN}").split()[-1] == _unit()["Service"]["User"]


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # systemd-analyze comes with Debian's systemd package, which .ci/setup installs.
    # verify checks that the ExecStart binary exists: point it at one that does.
    text = UNIT.read_text(encoding="utf-8").replace("ExecStart=/usr/bin/lorad ", f"ExecStart={sys.executable} ")
    unit = tmp_path / UNIT.name
    unit.write_text(text, encoding="utf-8")
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    output = (done.stdout + done.stderr).strip()
    # Unknown keys and unparsable values are only warnings (exit 0): fail on any output.
    assert done.returncode == 0 and not output, output


# ---------------------------------------------------------------- the default config


def test_default_config_loads_and_leaves_the_state_dir_to_systemd(tmp_path: Path) -> None:
    config = load_config(DEFAULT_CONFIG, environ={"STATE_DIRECTORY": str(tmp_path)})
    assert config.state_dir == tmp_path
    assert config.server.host == "127.0.0.1"
    assert config.model.name == "demo" and config.model.path is None


def test_default_config_passes_lorad_check_config() -> None:
    done = subprocess.run([sys.executable, "-m", "lorad.daemon.cli", "check-config", str(DEFAULT_CONFIG)],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
