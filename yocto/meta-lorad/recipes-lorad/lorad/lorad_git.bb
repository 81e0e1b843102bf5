SUMMARY = "Edge daemon serving an ONNX base model with hot-swapped LoRA adapters"
DESCRIPTION = "lorad serves one frozen ONNX model with LoRA adapters loaded and \
hot-swapped at run time, trains adapters on the device with DP-SGD through ONNX \
Runtime's on-device training API, and installs signed adapter updates pulled \
over MQTT. It runs as a systemd notify service with a watchdog."
HOMEPAGE = "https://github.com/lorad/lorad"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

# "+git": bitbake appends the commit to the package version (PKGV).
PV = "0.2.0+git"

# The lorad git repository to build: by default the one this layer sits in
# (yocto/meta-lorad/../..); point LORAD_SRC at another clone in local.conf.
# Only committed work is built.
LORAD_SRC ??= "${@os.path.normpath(d.getVar('LORAD_LAYERDIR') + '/../..')}"
LORAD_BRANCH ??= "main"
SRC_URI = "git://${LORAD_SRC};protocol=file;branch=${LORAD_BRANCH} \
           file://lorad.service \
           file://lorad.yaml \
           "
# The commit built, pinned so that parsing needs no repository access
# (${AUTOREV} would make every parse ask the repository for its branch head)
# and an image is reproducible. The release process sets it: when a version
# is tagged, SRCREV becomes that tag's commit (`git rev-parse vX.Y.Z^{commit}`)
# and PV its version, in the same change that bumps lorad.__version__.
# Between releases it is the last commit that updated it. To build another
# commit, set SRCREV:pn-lorad in local.conf (a hash, or "${AUTOREV}" to follow
# LORAD_BRANCH while developing).
SRCREV = "6d1b8c7aedfbf0a55cbbb3c24afd5629c870f037"
S = "${WORKDIR}/git"

inherit python_setuptools_build_meta systemd useradd

FILES:${PN} += "${systemd_system_unitdir}/lorad.service"

# Third-party Python distributions lorad imports, one per dependency in
# pyproject.toml (tests/unit/test_yocto_layer.py keeps the two lists in step).
# python3-onnxruntime comes from
# recipes-ml/onnxruntime (built with the training APIs).
LORAD_PYTHON_RDEPENDS = "\
    python3-aiohttp \
    python3-cryptography \
    python3-dp-accounting \
    python3-numpy \
    python3-onnx \
    python3-onnxruntime \
    python3-orjson \
    python3-paho-mqtt \
    python3-platformdirs \
    python3-prometheus-client \
    python3-pydantic \
    python3-pydantic-core \
    python3-pyyaml \
    python3-safetensors \
    python3-securesystemslib \
    python3-systemd \
    python3-tqdm \
    python3-tuf \
    python3-zstandard \
    "
# The whole standard library: OE splits it into ~40 packages, and a module missed
# here would surface only as an ImportError on the device.
LORAD_STDLIB_RDEPENDS = "python3-modules"
RDEPENDS:${PN} += "${LORAD_PYTHON_RDEPENDS} ${LORAD_STDLIB_RDEPENDS}"

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --user-group --no-create-home \
                       --home-dir ${localstatedir}/lib/lorad \
                       --shell ${base_sbindir}/nologin lorad"

SYSTEMD_SERVICE:${PN} = "lorad.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${WORKDIR}/lorad.service ${D}${systemd_system_unitdir}/lorad.service
    sed -i -e 's#/usr/bin/lorad#${bindir}/lorad#' \
           -e 's#/etc/lorad/#${sysconfdir}/lorad/#' \
           ${D}${systemd_system_unitdir}/lorad.service

    install -d ${D}${sysconfdir}/lorad
    install -m 0644 ${WORKDIR}/lorad.yaml ${D}${sysconfdir}/lorad/lorad.yaml
}

CONFFILES:${PN} = "${sysconfdir}/lorad/lorad.yaml"
