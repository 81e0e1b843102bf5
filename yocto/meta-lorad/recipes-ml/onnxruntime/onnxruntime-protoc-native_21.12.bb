SUMMARY = "protoc 21.12 for the build host, for ONNX Runtime's generated code"
DESCRIPTION = "ONNX Runtime builds its own protobuf 21.12 library and needs a protoc of \
the same version on the build host to generate its .pb.cc files. Upstream downloads a \
prebuilt protoc for that; this recipe builds it from the same protobuf source archive \
(the protobuf entry of ONNX Runtime's cmake/deps.txt), so the build runs no foreign binary."
HOMEPAGE = "https://protobuf.dev/"
LICENSE = "BSD-3-Clause"
LIC_FILES_CHKSUM = "file://LICENSE;md5=37b5762e07f0af8c74ce80a8bda4266b"

# The archive and checksums of onnxruntime-deps.inc's protobuf entry (same DL_DIR file).
SRC_URI = "https://github.com/protocolbuffers/protobuf/archive/refs/tags/v21.12.zip;downloadfilename=onnxruntime-dep-protobuf-v21.12.zip"
SRC_URI[sha256sum] = "6a31b662deaeb0ac35e6287bda2f3369b19836e6c9f8828d4da444346f420298"
SRC_URI[sha1sum] = "7cf2733949036c7d52fda017badcab093fe73bfa"

S = "${WORKDIR}/protobuf-${PV}"

inherit cmake
inherit_defer native

# protoc alone, linked statically, without zlib (protoc does not use it).
EXTRA_OECMAKE = "-Dprotobuf_BUILD_TESTS=OFF \
                 -Dprotobuf_BUILD_SHARED_LIBS=OFF \
                 -Dprotobuf_BUILD_PROTOC_BINARIES=ON \
                 -Dprotobuf_WITH_ZLIB=OFF \
                 -Dprotobuf_INSTALL=OFF"

# Under its own name: meta-oe's protobuf-native (4.25, used by python3-onnx) installs
# protoc too, and the two may share a native sysroot.
do_install() {
    install -d ${D}${bindir}
    install -m 0755 ${B}/protoc ${D}${bindir}/onnxruntime-protoc
}
