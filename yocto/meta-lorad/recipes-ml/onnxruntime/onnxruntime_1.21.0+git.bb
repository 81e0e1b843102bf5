SUMMARY = "ONNX Runtime built from source, with its Python bindings"
DESCRIPTION = "ONNX Runtime inference engine with its Python bindings. lorad serves \
with it and trains LoRA adapters with differential privacy on its portable backend, \
which runs the whole DP-SGD step as an ordinary ONNX graph in an InferenceSession. \
PACKAGECONFIG[training] adds the C/C++ training API and onnxruntime.training.api \
for lorad's ort-training backend."
HOMEPAGE = "https://onnxruntime.ai/"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://LICENSE;md5=0f7e3b1308cb5c00b372a6e78835732d"

# onnxruntime-protoc-native: the protoc 21.12 of the build host (ONNX_CUSTOM_PROTOC_EXECUTABLE).
DEPENDS = "onnxruntime-protoc-native python3 python3-numpy python3-numpy-native \
           python3-setuptools-native python3-wheel-native"

# Which source: the upstream commit whose cmake/deps.txt is files/deps.txt (the only
# ONNX Runtime source tree that could be read while this recipe was written). It is
# a main commit, not a release tag; PV is an estimate: its deps.txt (abseil 20240722,
# onnx 1.16.1, xnnpack 2024.09.04) dates it after the 1.20 branch point, and the
# stored onnxruntime/__init__.py of that period says 1.21.0. Moving to a release (PyPI has 1.32 now) is: SRCREV and branch of the
# tag, PV in the file name, the tag's cmake/deps.txt over files/deps.txt, then
# scripts/ort_deps_inc.py; do_configure stops if the copy and the tree disagree.
SRC_URI = "git://github.com/microsoft/onnxruntime.git;protocol=https;branch=main \
           file://deps.txt"
SRCREV = "008eeb96a1e2e8d5c23519a81a837f52b54d384b"
# The .inc adds a second git source with PACKAGECONFIG[cuda]: the version names this one.
SRCREV_FORMAT = "default"
S = "${WORKDIR}/git"

# Every third-party archive ONNX Runtime's CMake would download (FetchContent), as
# SRC_URI entries with their sha256 and deps.txt's SHA1: see the .inc and scripts/ort_deps_inc.py.
require onnxruntime-deps.inc

COMPATIBLE_HOST = "(x86_64|aarch64).*-linux"

# cmake: the cross toolchain file, cmake-native and ninja-native.
# python_pep517: installs the wheel that build.py produces (do_install).
inherit cmake python3native python3-dir python_pep517

# Offline configure. ONNX Runtime looks for each deps.txt URL under
# onnxruntime_CMAKE_DEPS_MIRROR_DIR (the URL with https:// replaced by that directory)
# and, when the file is there, hands the local path to FetchContent, which checks the
# SHA1 and applies ONNX Runtime's own patches (protobuf, date, cpuinfo, onnx, abseil,
# eigen...). FETCHCONTENT_SOURCE_DIR_<NAME> would skip those patch steps, so the
# mirror is used instead. FETCHCONTENT_TRY_FIND_PACKAGE_MODE=NEVER keeps CMake from
# preferring the sysroot's protobuf/abseil/re2 (meta-oe's protobuf 4.25 lacks the 21.x
# API ONNX Runtime is written against); FETCHCONTENT_UPDATES_DISCONNECTED stops any
# update step. do_configure has no network (scarthgap's default, stated below): an
# entry missing from the mirror fails the configure instead of being downloaded.
ORT_DEPS_MIRROR = "${WORKDIR}/ort-deps-mirror"
do_configure[network] = "0"
do_compile[network] = "0"

python do_ort_deps_mirror() {
    import os
    import subprocess
    unpacked = os.path.join(d.getVar("WORKDIR"), "ort-deps")
    mirror = d.getVar("ORT_DEPS_MIRROR")
    bb.utils.remove(mirror, recurse=True)
    for name in d.getVar("ORT_DEPS").split():
        src = os.path.join(unpacked, d.getVarFlag("ORT_DEP_FILE", name))
        dst = os.path.join(mirror, d.getVarFlag("ORT_DEP_MIRROR_PATH", name))
        if not os.path.isfile(src):
            bb.fatal("onnxruntime dependency %s: %s was not unpacked" % (name, src))
        bb.utils.mkdirhier(os.path.dirname(dst))
        os.symlink(src, dst)
    # Entries fetched with git (only when their PACKAGECONFIG is on): the archive as
    # GitHub makes it, `git archive` of the commit with US Pacific time stamps (a POSIX
    # TZ rule, so no tzdata is needed). CMake checks it against deps.txt's SHA1, so a
    # difference fails do_configure; it is checked here first for a clearer message.
    for name in d.getVar("ORT_DEPS_FROM_GIT").split():
        checkout = os.path.join(d.getVar("WORKDIR"), "ort-git", name)
        if not os.path.isdir(checkout):
            continue
        dst = os.path.join(mirror, d.getVarFlag("ORT_DEP_MIRROR_PATH", name))
        bb.utils.mkdirhier(os.path.dirname(dst))
        env = dict(os.environ, TZ="PST8PDT,M3.2.0,M11.1.0")
        subprocess.run(["git", "-C", checkout, "archive", "--format=zip",
                        "--prefix=" + d.getVarFlag("ORT_DEP_GIT_PREFIX", name), "-o", dst,
                        d.getVar("SRCREV_" + name)], env=env, check=True)
        if bb.utils.sha1_file(dst) != d.getVarFlag("ORT_DEP_SHA1", name):
            bb.fatal("onnxruntime dependency %s: the archive made from git differs from deps.txt's SHA1" % name)
}
addtask ort_deps_mirror after do_unpack before do_configure

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
# The C/C++ training API (TrainingSession, CheckpointState; onnxruntime.training.api
# in Python) for lorad's trainer.backend: ort-training. ONNX Runtime deprecated its
# training *packages* with 1.20 (no onnxruntime-training wheels after 1.19.2), but
# orttraining/training_api stays in the source tree and --enable_training_apis still
# builds it. Not needed for DP training: lorad's portable backend runs on the plain
# build.
PACKAGECONFIG[training] = ",,"
inherit_defer ${@bb.utils.contains('PACKAGECONFIG', 'cuda', 'cuda', '', d)}

ORT_CUDA_HOME = "${RECIPE_SYSROOT}/usr/local/cuda-${CUDA_VERSION}"
ORT_CUDA_ARGS = "${@bb.utils.contains('PACKAGECONFIG', 'cuda', \
    '--use_cuda --cuda_home ${ORT_CUDA_HOME} --cudnn_home ${RECIPE_SYSROOT}${prefix} --cuda_version ${CUDA_VERSION}', '', d)}"
ORT_CUDA_DEFINES = "${@bb.utils.contains('PACKAGECONFIG', 'cuda', \
    'CMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}', '', d)}"
ORT_TRAINING_ARGS = "${@bb.utils.contains('PACKAGECONFIG', 'training', '--enable_training_apis', '', d)}"

# --allow_running_as_root is not needed: bitbake refuses to run as root.
# --skip_submodule_sync: build.py would otherwise run `git submodule update`, which
# needs the network; the third-party sources come from the mirror instead.
ORT_BUILD_ARGS = "\
    --build_dir ${B} \
    --config Release \
    --parallel ${@oe.utils.parallel_make(d, False) or 1} \
    --skip_tests \
    --skip_submodule_sync \
    --build_wheel \
    --cmake_generator Ninja \
    --compile_no_warning_as_error \
    ${ORT_TRAINING_ARGS} \
    ${ORT_CUDA_ARGS} \
    --cmake_extra_defines \
        CMAKE_TOOLCHAIN_FILE=${WORKDIR}/toolchain.cmake \
        onnxruntime_BUILD_UNIT_TESTS=OFF \
        onnxruntime_CMAKE_DEPS_MIRROR_DIR=${ORT_DEPS_MIRROR} \
        FETCHCONTENT_TRY_FIND_PACKAGE_MODE=NEVER \
        FETCHCONTENT_UPDATES_DISCONNECTED=ON \
        ONNX_CUSTOM_PROTOC_EXECUTABLE=${STAGING_BINDIR_NATIVE}/onnxruntime-protoc \
        Python_EXECUTABLE=${PYTHON} \
        Python_INCLUDE_DIR=${STAGING_INCDIR}/${PYTHON_DIR} \
        Python_NumPy_INCLUDE_DIR=${STAGING_LIBDIR}/${PYTHON_DIR}/site-packages/numpy/core/include \
        ${ORT_CUDA_DEFINES} \
    "

# build.py runs CMake (--update) and then the build and the wheel (--build).
do_configure() {
    # The SRC_URI entries are only right for the deps.txt they were made from.
    if ! grep -v '^#' ${S}/cmake/deps.txt | cmp -s - ${WORKDIR}/deps.txt; then
        bbfatal "cmake/deps.txt of SRCREV ${SRCREV} differs from the layer's files/deps.txt: update it and run scripts/ort_deps_inc.py"
    fi
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
FILES:python3-${BPN} += "${PYTHON_SITEPACKAGES_DIR}"
# onnx: lorad builds its training graphs with it (and onnxruntime.training.artifacts
# does, with PACKAGECONFIG[training]).
RDEPENDS:python3-${BPN} += "python3-numpy python3-onnx"
ALLOW_EMPTY:${PN} = "1"
