SUMMARY = "ONNX Runtime built from source with the on-device training APIs (Python package)"
DESCRIPTION = "ONNX Runtime inference engine plus onnxruntime.training.api \
(TrainingSession, CheckpointState) and the artifact builder, which lorad uses \
for on-device DP-SGD of LoRA adapters."
HOMEPAGE = "https://onnxruntime.ai/"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://LICENSE;md5=0f7e3b1308cb5c00b372a6e78835732d"

# Why a source build: the on-device training APIs were published on PyPI as
# onnxruntime-training(-cpu), whose last release is 1.19.2 and which has x86_64
# wheels only. Jetson and Raspberry Pi (aarch64) therefore need ONNX Runtime
# compiled with --enable_training_apis, at the same version lorad is tested with
# on x86_64.
#
# SRCREV is the commit of tag v1.19.2 (on branch rel-1.19.2).
SRC_URI = "gitsm://github.com/microsoft/onnxruntime.git;protocol=https;branch=rel-1.19.2"
SRCREV = "ffceed9d44f2f3efb9dd69fa75fea51163c91d91"
S = "${UNPACKDIR}/git"

COMPATIBLE_HOST = "(x86_64|aarch64).*-linux"

# cmake: the cross toolchain file, cmake-native and ninja-native.
# python_pep517: installs the wheel that build.py produces (do_install).
inherit cmake python3native python3-dir python_pep517

DEPENDS += "python3 python3-numpy python3-numpy-native \
            python3-setuptools-native python3-wheel-native"

# Third-party C++ libraries (protobuf 21.12, abseil, onnx 1.16, eigen, re2,
# flatbuffers, pybind11, ...) are NOT taken from meta-oe: ONNX Runtime 1.19 pins
# exact versions (protobuf's 21.x API in particular; scarthgap's protobuf is 4.25)
# and links them statically. Its CMake fetches each one from cmake/deps.txt and
# verifies the SHA1 listed there, so configure needs the network. When cross
# compiling it also fetches the protoc 21.12 binary for the build host the same
# way. A build without network (BB_NO_NETWORK) needs those archives mirrored and
# deps.txt pointed at the mirror.
do_configure[network] = "1"

# MLAS on Arm: Advanced SIMD (NEON) is part of every ARMv8-A CPU, so no tune flag
# is needed; MLAS compiles its NEON kernels unconditionally on aarch64 and picks
# the fp16 / dot-product kernels at run time (cpuinfo), so an image tuned for a
# Cortex-A72 (Pi 4) runs on it and uses the faster kernels on an Orin. Those files
# are compiled with -march=armv8.2-a+...; GCC warns that this conflicts with the
# machine's -mcpu, hence --compile_no_warning_as_error.

PACKAGECONFIG ??= ""
# Jetson: needs meta-tegra (cuda.bbclass, cuda-toolkit, cudnn). CUDA_VERSION and
# CUDA_ARCHITECTURES (e.g. 87 for Orin, 72 for Xavier) come from its machine
# configuration.
PACKAGECONFIG[cuda] = ",,cuda-toolkit cudnn"
inherit ${@bb.utils.contains('PACKAGECONFIG', 'cuda', 'cuda', '', d)}

ORT_CUDA_HOME = "${RECIPE_SYSROOT}/usr/local/cuda-${CUDA_VERSION}"
ORT_CUDA_ARGS = "${@bb.utils.contains('PACKAGECONFIG', 'cuda', \
    '--use_cuda --cuda_home ${ORT_CUDA_HOME} --cudnn_home ${RECIPE_SYSROOT}${prefix} --cuda_version ${CUDA_VERSION}', '', d)}"
ORT_CUDA_DEFINES = "${@bb.utils.contains('PACKAGECONFIG', 'cuda', \
    'CMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}', '', d)}"

# --allow_running_as_root is not needed: bitbake refuses to run as root.
ORT_BUILD_ARGS = "\
    --build_dir ${B} \
    --config Release \
    --parallel ${@oe.utils.parallel_make(d, False) or 1} \
    --skip_tests \
    --skip_submodule_sync \
    --enable_training_apis \
    --build_wheel \
    --cmake_generator Ninja \
    --compile_no_warning_as_error \
    ${ORT_CUDA_ARGS} \
    --cmake_extra_defines \
        CMAKE_TOOLCHAIN_FILE=${WORKDIR}/toolchain.cmake \
        onnxruntime_BUILD_UNIT_TESTS=OFF \
        Python_EXECUTABLE=${PYTHON} \
        Python_INCLUDE_DIR=${STAGING_INCDIR}/${PYTHON_DIR} \
        Python_NumPy_INCLUDE_DIR=${STAGING_LIBDIR}/${PYTHON_DIR}/site-packages/numpy/core/include \
        ${ORT_CUDA_DEFINES} \
    "

# build.py runs CMake (--update) and then the build and the wheel (--build);
# splitting them keeps the network to do_configure.
do_configure() {
    ${PYTHON} ${S}/tools/ci_build/build.py ${ORT_BUILD_ARGS} --update
}

do_compile() {
    ${PYTHON} ${S}/tools/ci_build/build.py ${ORT_BUILD_ARGS} --build
}

PEP517_WHEEL_PATH = "${B}/Release/dist"

do_install() {
    python_pep517_do_install
}

PACKAGES =+ "python3-${BPN}"
FILES:python3-${BPN} = "${PYTHON_SITEPACKAGES_DIR}"
# onnx: onnxruntime.training.artifacts / onnxblock build the training graphs.
RDEPENDS:python3-${BPN} += "python3-numpy python3-onnx"
ALLOW_EMPTY:${PN} = "1"
