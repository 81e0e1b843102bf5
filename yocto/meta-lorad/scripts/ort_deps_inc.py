#!/usr/bin/env python3
"""Write recipes-ml/onnxruntime/onnxruntime-deps.inc from the layer's copy of deps.txt.

ONNX Runtime's CMake downloads every third-party source listed in its cmake/deps.txt
(name;url;sha1) with FetchContent. For a build without network, each archive becomes a
SRC_URI entry here, checked by bitbake's fetcher with its sha256 (files/deps-sha256.txt,
which says how each was obtained) and deps.txt's SHA1, copied unpacked-as-is into
${WORKDIR}/ort-deps, and the recipe lays them out as ONNX Runtime's dependency mirror
(onnxruntime_CMAKE_DEPS_MIRROR_DIR): the URL with "https://" replaced by the mirror
directory. ONNX Runtime then takes each dependency from that local file, verifies the
SHA1 again and applies its own patches to it. An entry a build needs but whose archive has
no known sha256 (FROM_GIT) is fetched with git at a pinned commit instead, and the recipe
recreates the archive from it.

To move the recipe to another ONNX Runtime commit: copy that commit's cmake/deps.txt
(without its comment lines) over files/deps.txt, set SRCREV, put the sha256 of every
changed archive in files/deps-sha256.txt, run this script, and run
tests/unit/test_yocto_layer.py. do_configure refuses to run if the copy and the source
tree's deps.txt differ.

    python3 yocto/meta-lorad/scripts/ort_deps_inc.py          # rewrite the .inc
    python3 yocto/meta-lorad/scripts/ort_deps_inc.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["FROM_GIT", "NOT_MIRRORED", "Dep", "GitDep", "read_deps", "read_sha256", "render"]

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes-ml" / "onnxruntime"
DEPS = RECIPE_DIR / "files" / "deps.txt"
SHA256 = RECIPE_DIR / "files" / "deps-sha256.txt"
INC = RECIPE_DIR / "onnxruntime-deps.inc"

#: deps.txt entries a Linux build for x86_64/aarch64 (CPU, CUDA) never fetches: the
#: build options that would use them are not offered by the recipe.
NOT_MIRRORED = {
    "coremltools": "CoreML execution provider (Apple only)",
    "directx_headers": "DirectML execution provider (Windows only)",
    "microsoft_wil": "Windows Implementation Library (Windows only)",
    "protoc_win64": "protoc for Windows build hosts",
    "protoc_win32": "protoc for Windows build hosts",
    "protoc_mac_universal": "protoc for macOS build hosts",
    "protoc_linux_x86": "protoc for 32-bit x86 build hosts (bitbake runs on x86_64 or aarch64)",
    "protoc_linux_x64": "prebuilt protoc: onnxruntime-protoc-native builds it from the protobuf source instead",
    "protoc_linux_aarch64": "prebuilt protoc: onnxruntime-protoc-native builds it from the protobuf source instead",
    "tensorboard": "full training build (--enable_training); the training APIs (PACKAGECONFIG[training]) do not use it",
    "extensions": "onnxruntime-extensions (--use_extensions), not offered",
    "composable_kernel": "ROCm execution provider",
    "onnx_tensorrt": "TensorRT execution provider (not offered; CUDA only)",
    "dawn": "WebGPU execution provider",
}


class GitDep:
    """A deps.txt archive recreated from a git checkout: the commit of its tag and its root folder."""

    def __init__(self, repo: str, commit: str, prefix: str, packageconfig: str, why: str) -> None:
        self.repo = repo
        self.commit = commit
        self.prefix = prefix
        self.packageconfig = packageconfig
        self.why = why


#: deps.txt entries fetched with git (the commit is the check) because no sha256 of their
#: archive could be computed: the upstream repository holds files too large for the copy
#: the archives were recreated from. do_ort_deps_mirror recreates the archive with
#: `git archive` as GitHub makes it; ONNX Runtime's CMake checks it against deps.txt's SHA1.
FROM_GIT = {
    "cutlass": GitDep("github.com/NVIDIA/cutlass.git", "f7b19de32c5d1f3cedfc735c2849f12b537522ee",
                      "cutlass-3.5.1/", "cuda", "CUDA kernels (flash attention), PACKAGECONFIG[cuda] only"),
}


class Dep:
    """One deps.txt line."""

    def __init__(self, name: str, url: str, sha1: str) -> None:
        if not url.startswith("https://"):
            raise ValueError(f"{name}: only https URLs can be mirrored, got {url!r}")
        if len(sha1) != 40 or any(c not in "0123456789abcdefABCDEF" for c in sha1):
            raise ValueError(f"{name}: {sha1!r} is not a SHA1")
        self.name = name
        self.url = url
        # bitbake compares lower-case hex digests; deps.txt has some in upper case.
        self.sha1 = sha1.lower()

    @property
    def download_name(self) -> str:
        # Many archives are called v1.0.zip and the like: prefix the name so that they
        # cannot collide with another recipe's download in DL_DIR.
        return f"onnxruntime-dep-{self.name}-{Path(urlsplit(self.url).path).name}"

    @property
    def mirror_path(self) -> str:
        return self.url.removeprefix("https://")


def read_deps(path: Path = DEPS) -> list[Dep]:
    deps = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split(";")
        if len(fields) != 3:
            raise ValueError(f"{path}:{number}: expected name;url;sha1, got {line!r}")
        deps.append(Dep(*fields))
    return deps


def read_sha256(path: Path = SHA256) -> dict[str, str]:
    sums: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, _, digest = line.partition(";")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or name in sums:
            raise ValueError(f"{path}:{number}: expected a new name;sha256 (lower-case hex), got {line!r}")
        sums[name] = digest
    return sums


def render(deps: list[Dep], sha256: dict[str, str]) -> str:
    names = {d.name for d in deps}
    unknown = (set(NOT_MIRRORED) | set(FROM_GIT)) - names
    if unknown:
        raise ValueError(f"NOT_MIRRORED/FROM_GIT name entries deps.txt does not have: {sorted(unknown)}")
    if set(NOT_MIRRORED) & set(FROM_GIT):
        raise ValueError(f"both skipped and fetched with git: {sorted(set(NOT_MIRRORED) & set(FROM_GIT))}")
    mirrored = [d for d in deps if d.name not in NOT_MIRRORED and d.name not in FROM_GIT]
    missing = [d.name for d in mirrored if d.name not in sha256]
    if missing:
        raise ValueError(f"no sha256 in {SHA256.name} for {missing}: compute it, or fetch the entry with git (FROM_GIT)")
    extra = set(sha256) - {d.name for d in mirrored}
    if extra:
        raise ValueError(f"{SHA256.name} has sums for entries that are not fetched as archives: {sorted(extra)}")
    out = [
        "# Generated by scripts/ort_deps_inc.py from files/deps.txt and files/deps-sha256.txt:",
        "# do not edit by hand. The third-party sources ONNX Runtime's CMake would download",
        "# (cmake/deps.txt), checked with their sha256 and with the SHA1 that deps.txt lists.",
        "",
        'ORT_DEPS = "' + " ".join(d.name for d in mirrored) + '"',
        "# Not fetched (options the recipe does not offer, or built from source instead):",
    ]
    out += [f"#   {name}: {why}" for name, why in NOT_MIRRORED.items()]
    out.append('ORT_DEPS_NOT_MIRRORED = "' + " ".join(NOT_MIRRORED) + '"')
    for d in mirrored:
        out += [
            "",
            f'SRC_URI += "{d.url};name={d.name};unpack=0;subdir=ort-deps;downloadfilename={d.download_name}"',
            f'SRC_URI[{d.name}.sha256sum] = "{sha256[d.name]}"',
            f'SRC_URI[{d.name}.sha1sum] = "{d.sha1}"',
            f'ORT_DEP_FILE[{d.name}] = "{d.download_name}"',
            f'ORT_DEP_MIRROR_PATH[{d.name}] = "{d.mirror_path}"',
        ]
    by_name = {d.name: d for d in deps}
    out += [
        "",
        "# Fetched with git at the commit of the archive's tag (no sha256 of the archive could be",
        "# computed); do_ort_deps_mirror recreates the archive, which CMake checks against the SHA1.",
        'ORT_DEPS_FROM_GIT = "' + " ".join(FROM_GIT) + '"',
    ]
    for name, g in FROM_GIT.items():
        uri = f"git://{g.repo};protocol=https;nobranch=1;name={name};destsuffix=ort-git/{name}"
        out += [
            f"#   {name}: {g.why}",
            f"SRC_URI += \"${{@bb.utils.contains('PACKAGECONFIG', '{g.packageconfig}', '{uri}', '', d)}}\"",
            f'SRCREV_{name} = "{g.commit}"',
            f'ORT_DEP_GIT_PREFIX[{name}] = "{g.prefix}"',
            f'ORT_DEP_SHA1[{name}] = "{by_name[name].sha1}"',
            f'ORT_DEP_MIRROR_PATH[{name}] = "{by_name[name].mirror_path}"',
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    text = render(read_deps(), read_sha256())
    if argv == ["--check"]:
        if INC.read_text(encoding="utf-8") != text:
            print(f"{INC} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    INC.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
