"""Errors raised by the ota package.

Two roots, as in python-tuf's ngclient: :class:`RejectedError` when the remote side (the
broker, a repository, a command sender) sent data that fails verification, and
:class:`TransportError` when the channel itself failed (no broker, timeout, disconnect).
Every rejection carries a ``reason`` code from :data:`REASONS`, so that a device can
report exactly why it refused an update or a command. Caller mistakes are ValueError or
RuntimeError.
"""

from __future__ import annotations

__all__ = [
    "REASONS",
    "OtaError",
    "RejectedError",
    "UpdateRejectedError",
    "CommandRejectedError",
    "TransportError",
]

#: Every reason code a rejection may carry, with what it means.
REASONS: dict[str, str] = {
    # TUF metadata
    "signature": "metadata is not signed by the threshold of trusted keys for its role",
    "rollback": "metadata version is older than the one already trusted",
    "expired": "metadata has expired (or the device clock says so)",
    "mix_and_match": "metadata versions do not match what the snapshot/timestamp name",
    "metadata_invalid": "metadata is malformed or does not match its recorded length/hash",
    "too_large": "more bytes arrived than were signed or allowed",
    # target payload
    "digest_mismatch": "payload bytes do not match the signed length/sha256",
    "chunk_digest": "a chunk does not match its signed sha256",
    "chunk_length": "a chunk has the wrong length",
    "chunk_index": "a chunk index is outside the signed chunk list",
    "target_invalid": "the signed target description is malformed",
    "payload_invalid": "the payload cannot be decoded into an adapter",
    "adapter_digest": "the reconstructed adapter does not match the signed digest",
    "base_model_mismatch": "the adapter was made for another base model",
    "delta_base_missing": "a delta names a base version that is not installed here",
    "older_version": "the offered adapter version is not newer than the installed one",
    "privacy_budget": "the adapter's signed privacy record exceeds the device's max_epsilon",
    "privacy_record_missing": "the adapter carries no privacy record and the device requires one",
    "not_addressed": "no signed target is addressed to this device or its groups",
    # install
    "install_failed": "the adapter service refused the adapter",
    "health_check_failed": "the installed adapter failed its recorded probe set",
    # commands
    "command_signature": "the command is not signed by a trusted fleet command key",
    "command_replay": "the command sequence number was already used (replay)",
    "command_stale": "the command was issued too long ago or in the future",
    "command_target": "the command is addressed to another device",
    "command_invalid": "the command is malformed",
}


class OtaError(Exception):
    """Base of every error of the ota package."""


class RejectedError(OtaError):
    """Data from outside failed verification; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; allowed: {sorted(REASONS)}")
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


class UpdateRejectedError(RejectedError):
    """An update (metadata, target, payload, installed result) was refused."""


class CommandRejectedError(RejectedError):
    """A fleet command was refused (bad signature, replay, stale, not for us)."""


class TransportError(OtaError):
    """The channel failed: broker unreachable, disconnected, timed out, or refused us."""
