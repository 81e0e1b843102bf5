"""What real bitbake makes of meta-lorad: run by tests/yocto/test_bitbake_parse.py.

    python3 bitbake_probe.py POKY_DIR LAYER_DIR OUT_JSON   (in a bitbake build directory)

It imports bitbake from POKY_DIR/bitbake/lib (so it runs under whatever Python runs
bitbake), parses every recipe of LAYER_DIR and each of its variants (native, ...) through
tinfoil, and writes one JSON object to OUT_JSON: per recipe, the variables its own files
use that the parsed recipe does not define (what `${UNPACKDIR}` is on scarthgap), every
SRC_URI entry as bitbake's fetcher sees it (the checksums it will check, the git revision
it will fetch), and its build and runtime dependencies. Building the fetcher's view
resolves revisions, so a `${AUTOREV}` that needs the network fails here as it would at
parse time with BB_NO_NETWORK. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

#: `${NAME}` references (not `${@python}`, not overrides such as `${PN}:append`).
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: Names a shell function of the layer sets itself (`name=...`, `for name in`, `local name`).
_SHELL_SET = re.compile(r"(?:^|[;\s(])(?:local\s+|export\s+)?([A-Za-z_][A-Za-z0-9_]*)=|\bfor\s+([A-Za-z_][A-Za-z0-9_]*)\s+in\b")


def _layer_files(d: Any, fn: str, layer: str) -> list[str]:
    files = [fn]
    for f in (d.getVar("BBINCLUDED") or "").split():
        if f.startswith(layer + os.sep) and f.endswith((".bb", ".inc", ".bbappend")) and f not in files and os.path.isfile(f):
            files.append(f)
    return files


def _undefined(d: Any, files: list[str]) -> list[dict[str, Any]]:
    found = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        shell_set = {a or b for a, b in _SHELL_SET.findall(text)}
        for number, line in enumerate(text.splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            for name in _REF.findall(line):
                if name not in shell_set and d.getVar(name, False) is None:
                    found.append({"file": os.path.basename(path), "line": number, "name": name})
    return found


def _sources(bb: Any, d: Any) -> tuple[list[dict[str, Any]], str | None]:
    uris = (d.getVar("SRC_URI") or "").split()
    try:
        fetcher = bb.fetch2.Fetch(uris, d)
    except Exception as e:  # any fetcher failure is reported to the test, which names it
        return [], f"{type(e).__name__}: {e}"
    out = []
    for uri in uris:
        ud = fetcher.ud[uri]
        entry: dict[str, Any] = {
            "uri": uri,
            "type": ud.type,
            "recommends_checksum": bool(ud.method.recommends_checksum(ud)),
            "sha256": getattr(ud, "sha256_expected", None),
            "sha1": getattr(ud, "sha1_expected", None),
        }
        revisions = getattr(ud, "revisions", None)
        if revisions is not None:
            entry["revisions"] = dict(revisions)
        out.append(entry)
    return out, None


def main(poky: str, layer: str) -> dict[str, Any]:
    sys.path.insert(0, os.path.join(poky, "bitbake", "lib"))
    import bb.fetch2  # type: ignore[import-not-found]  # poky/bitbake/lib, put on sys.path above
    import bb.tinfoil  # type: ignore[import-not-found]
    import bb.utils  # type: ignore[import-not-found]

    layer = os.path.realpath(layer)
    recipes = {}
    with bb.tinfoil.Tinfoil(tracking=False) as tinfoil:
        tinfoil.prepare(quiet=2)
        for fn in sorted(tinfoil.all_recipe_files(variants=True)):
            real = fn.rsplit(":", 1)[-1]
            if not os.path.realpath(real).startswith(layer + os.sep):
                continue
            d = tinfoil.parse_recipe_file(fn)
            sources, fetch_error = _sources(bb, d)
            recipes[fn.replace(layer + os.sep, "")] = {
                "pn": d.getVar("PN"),
                "pv": d.getVar("PV"),
                "s": d.getVar("S"),
                "workdir": d.getVar("WORKDIR"),
                "undefined": _undefined(d, _layer_files(d, real, layer)),
                "sources": sources,
                "fetch_error": fetch_error,
                "depends": sorted(bb.utils.explode_deps(d.getVar("DEPENDS") or "")),
                "rdepends": {pkg: sorted(bb.utils.explode_deps(d.getVar("RDEPENDS:" + pkg) or ""))
                             for pkg in (d.getVar("PACKAGES") or "").split()},
            }
        distro_version = tinfoil.config_data.getVar("DISTRO_VERSION")
        series = tinfoil.config_data.getVar("LAYERSERIES_CORENAMES")
    return {"recipes": recipes, "bitbake": bb.__version__, "distro_version": distro_version, "series": series}


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2])
    with open(sys.argv[3], "w", encoding="utf-8") as out:
        json.dump(result, out, indent=1)
