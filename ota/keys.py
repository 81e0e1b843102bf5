"""Ed25519 key files of the fleet: private keys 0600 (PEM, PKCS#8), public keys as TUF JSON.

A key file's name carries its role and a short key id, e.g. ``root.1a2b3c4d.key``. Offline
roles (root, targets) can keep their private files on removable media: every loader
takes the directories to search.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Key, SSlibKey

from lorad.adapters.fsutil import atomic_write_bytes

__all__ = ["generate_key", "save_key", "load_signer", "load_public_key", "find_signers",
           "ed25519_private_key", "key_files"]


def generate_key() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def save_key(directory: Path, role: str, signer: CryptoSigner) -> Path:
    """Write ``<role>.<keyid8>.key`` (0600) and ``.pub``; returns the private key path."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    stem = f"{role}.{signer.public_key.keyid[:8]}"
    atomic_write_bytes(directory / f"{stem}.key", signer.private_bytes, mode=0o600)
    atomic_write_bytes(directory / f"{stem}.pub", json.dumps(
        {"keyid": signer.public_key.keyid, **signer.public_key.to_dict()}, indent=1).encode())
    return directory / f"{stem}.key"


def ed25519_private_key(path: Path) -> Ed25519PrivateKey:
    """The private key in ``path``, refusing files others can read."""
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"private key {path} has mode {mode:o}; it must be 0600")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_signer(path: Path) -> CryptoSigner:
    key = ed25519_private_key(path)
    return CryptoSigner(key, SSlibKey.from_crypto(key.public_key()))


def load_public_key(path: Path) -> Key:
    d = json.loads(path.read_bytes())
    return SSlibKey.from_dict(d.pop("keyid"), d)


def find_signers(dirs: Iterable[Path], keyids: Iterable[str]) -> dict[str, CryptoSigner]:
    """Signers for those of ``keyids`` whose private key file is in one of ``dirs``."""
    wanted = set(keyids)
    found: dict[str, CryptoSigner] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        for p in sorted(d.glob("*.key")):
            short = p.stem.rpartition(".")[2]
            for kid in wanted - found.keys():
                if kid.startswith(short):
                    signer = load_signer(p)
                    if signer.public_key.keyid == kid:
                        found[kid] = signer
    return found


def key_files(directory: Path) -> dict[str, Path]:
    """Short key id (from the file name ``<role>.<id8>.key``) -> private key file in ``directory``."""
    if not directory.is_dir():
        return {}
    return {p.stem.rpartition(".")[2]: p for p in sorted(directory.glob("*.key"))}
