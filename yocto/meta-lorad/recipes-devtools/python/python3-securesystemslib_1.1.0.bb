SUMMARY = "Cryptographic routines for Secure Systems Lab projects (TUF, in-toto)"
DESCRIPTION = "Signing, verification and key handling shared by TUF and in-toto; \
python-tuf verifies the signatures of lorad's adapter updates through it."
HOMEPAGE = "https://github.com/secure-systems-lab/securesystemslib"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://LICENSE;md5=e9703d169911cdb29305f88411c78717"

# sha256 of securesystemslib-1.1.0.tar.gz as downloaded from PyPI.
SRC_URI[sha256sum] = "27143a8e04b5573636f260f21d7e26b48bcedcf394e6f74ec31e9a5287e0c38b"

# Built with hatchling (pyproject.toml build-system). 1.1.0 leaves the hatchling
# version open and builds with hatchling 1.21; later releases (1.6.0 checked) pin
# an exact, newer hatchling. tuf 6 needs securesystemslib ~= 1.0.
inherit pypi python_hatchling

# The "crypto" extra: CryptoSigner and key verification, which lorad's OTA uses.
RDEPENDS:${PN} += "python3-cryptography python3-json python3-logging"

BBCLASSEXTEND = "native"
