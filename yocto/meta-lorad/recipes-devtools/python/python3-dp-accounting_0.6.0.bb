SUMMARY = "Tools for tracking differential privacy budgets (RDP and PLD accountants)"
DESCRIPTION = "Google's dp_accounting library: privacy accountants for differentially \
private mechanisms (Renyi DP and privacy loss distributions). lorad computes the \
epsilon its DP-SGD training has spent with it."
HOMEPAGE = "https://github.com/google/differential-privacy/tree/main/python"
LICENSE = "Apache-2.0"
# The sdist ships no licence file; setup.py carries the Apache-2.0 header.
LIC_FILES_CHKSUM = "file://setup.py;beginline=1;endline=13;md5=c6f402b27db497aafe96f11e6557fcff"

# sha256 of dp_accounting-0.6.0.tar.gz as downloaded from PyPI. (0.4.4's sdist
# does not build: it lacks the VERSION file its setup.py reads.)
SRC_URI[sha256sum] = "87820afdec3baa83c57abaad91163628de6abf74f292e56330b5a081d57c69e1"

# The sdist is named with an underscore (dp_accounting-0.6.0.tar.gz).
PYPI_PACKAGE = "dp_accounting"

# setup.py only, no pyproject.toml: the PEP 517 build uses setuptools' legacy backend.
inherit pypi python_setuptools_build_meta

# requirements.txt also lists dm-tree, a C++ extension built with Bazel/CMake; it is
# imported only by dp_accounting's own tests, so it is left out.
RDEPENDS:${PN} += "python3-absl python3-attrs python3-mpmath python3-numpy python3-scipy"

BBCLASSEXTEND = "native"
