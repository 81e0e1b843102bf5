SUMMARY = "The Update Framework: metadata API and ngclient updater"
DESCRIPTION = "python-tuf, the reference implementation of The Update Framework: \
its metadata API and ngclient, with which lorad verifies signed adapter updates."
HOMEPAGE = "https://theupdateframework.io/"
LICENSE = "Apache-2.0 | MIT"
LIC_FILES_CHKSUM = "file://LICENSE;md5=8cc789b082b3d97e1ccc5261f8594d3f \
                    file://LICENSE-MIT;md5=0905c600830081fce64622608c4a2628"

# sha256 of tuf-6.0.0.tar.gz as downloaded from PyPI.
SRC_URI[sha256sum] = "9eed0f7888c5fff45dc62164ff243a05d47fb8a3208035eb268974287e0aee8d"

# 6.0 is the first release whose ngclient Updater takes the `bootstrap` root that
# lorad's OTA client passes; lorad's OTA tests fail with 5.x.
inherit pypi python_hatchling

# Upstream pins hatchling==1.27.0 and writes license-files as a PEP 639 list,
# which older hatchling (scarthgap's) rejects with a TypeError. Unpin it and
# use the table form that hatchling has always accepted; the wheel is the same.
do_configure:prepend() {
    sed -i -e 's/"hatchling==[0-9.]*"/"hatchling"/' \
           -e 's/^license-files = \[\(.*\)\]$/license-files = { paths = [\1] }/' \
           ${S}/pyproject.toml
}

# tuf.ngclient imports its default urllib3 fetcher even when, as in lorad, the
# caller supplies its own FetcherInterface.
RDEPENDS:${PN} += "python3-json python3-logging python3-securesystemslib python3-urllib3"

BBCLASSEXTEND = "native"
