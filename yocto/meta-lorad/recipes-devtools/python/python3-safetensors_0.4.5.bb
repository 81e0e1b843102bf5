SUMMARY = "Simple, safe way to store and distribute tensors"
DESCRIPTION = "Hugging Face's safetensors format for tensors, with its Rust core. \
lorad reads and writes LoRA adapter weights (PEFT's adapter_model.safetensors) \
with it."
HOMEPAGE = "https://github.com/huggingface/safetensors"
LICENSE = "Apache-2.0"
# The sdist has no top-level licence file; the Rust crate's is the project's.
LIC_FILES_CHKSUM = "file://safetensors/LICENSE;md5=86d3f3a95c324c9479bd8986968f4327"

# sha256 of safetensors-0.4.5.tar.gz as downloaded from PyPI.
SRC_URI[sha256sum] = "d73de19682deabb02524b3d5d1f8b3aaba94c72f1bbfc7911b9b9d5d391c0310"

# safetensors is a Rust extension (pyo3) built by maturin: oe-core's rust, cargo
# and maturin recipes build it, no meta-rust needed on scarthgap. 0.4.5 uses
# pyo3 0.22 (MSRV 1.63), within scarthgap's Rust 1.75; later releases move to
# newer pyo3 and crates that may need a newer compiler.
inherit pypi python_maturin cargo-update-recipe-crates

# The maturin manifest is bindings/python/Cargo.toml (pyproject.toml
# [tool.maturin] manifest-path); its Cargo.lock lists the crates below.
CARGO_SRC_DIR = "bindings/python"
require ${BPN}-crates.inc

# lorad only uses safetensors.numpy.
RDEPENDS:${PN} += "python3-numpy"

BBCLASSEXTEND = "native"
