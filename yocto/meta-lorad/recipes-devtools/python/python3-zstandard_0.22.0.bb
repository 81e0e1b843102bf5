SUMMARY = "Python bindings to the Zstandard (zstd) compression library"
DESCRIPTION = "Python bindings to the Zstandard compression library, built with the \
zstd sources bundled in the sdist. lorad compresses adapter update payloads with it."
HOMEPAGE = "https://github.com/indygreg/python-zstandard"
LICENSE = "BSD-3-Clause"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3ae87c50fd64b6f0942823686871e758"

# sha256 of zstandard-0.22.0.tar.gz as downloaded from PyPI.
SRC_URI[sha256sum] = "8226a33c542bcb54cd6bd0a366067b610b41713b64c9abec1bc4533d69f51e70"

# pyproject.toml pins its build requirements exactly (cffi==1.16.0,
# setuptools==68.2.2) and uses setuptools' legacy backend, so the PEP 517 classes
# would reject scarthgap's versions; setup.py is run directly instead. It builds
# the C extension against the zstd sources bundled in the sdist; the optional
# CFFI backend is skipped (lorad uses the default C backend).
inherit pypi setuptools3

BBCLASSEXTEND = "native"
