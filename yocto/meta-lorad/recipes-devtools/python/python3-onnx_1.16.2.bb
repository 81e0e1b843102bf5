SUMMARY = "Open Neural Network Exchange: model format, checker, shape inference and helpers"
DESCRIPTION = "The onnx Python package: the ONNX protobuf model format, its checker, \
shape inference and graph helpers. lorad builds and edits its inference and \
training graphs with it."
HOMEPAGE = "https://onnx.ai/"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

# sha256 of onnx-1.16.2.tar.gz as downloaded from PyPI.
SRC_URI[sha256sum] = "b33a282b038813c4b69e73ea65c2909768e8dd6cc10619b70632335daf094646"

# 1.16 is the ONNX release ONNX Runtime 1.19 is built against; lorad writes IR 9 /
# opset 17 models that it accepts. From 1.17 on, onnx also needs ml_dtypes, which
# no OE layer packages.

# setup.py drives CMake to build the C++ checker and shape inference (a pybind11
# extension; the sdist bundles pybind11) against protobuf. cmake is inherited
# first for its cross toolchain file; the setuptools class, inherited last,
# provides the configure/compile/install tasks.
inherit cmake pypi python_setuptools_build_meta

DEPENDS += "protobuf protobuf-native python3-numpy"

# setup.py appends CMAKE_ARGS to its cmake command line. protoc must run on the
# build host; the generated code links the target's shared libprotobuf.
export CMAKE_ARGS = "-DCMAKE_TOOLCHAIN_FILE=${WORKDIR}/toolchain.cmake \
                     -DONNX_CUSTOM_PROTOC_EXECUTABLE=${STAGING_BINDIR_NATIVE}/protoc \
                     -DONNX_USE_PROTOBUF_SHARED_LIBS=ON \
                     -DProtobuf_PROTOC_EXECUTABLE=${STAGING_BINDIR_NATIVE}/protoc"
export ONNX_ML = "1"
export MAX_JOBS = "${@oe.utils.cpu_count()}"

RDEPENDS:${PN} += "python3-numpy python3-protobuf"
