"""Errors raised by the adapters package.

Two roots, as the rest of lorad: :class:`InvalidAdapterError` when data from outside
(an uploaded file, a file on disk, a request) is wrong, :class:`AdapterStorageError` when
the disk or the runtime failed. Caller mistakes are ValueError/RuntimeError.
"""

from collections.abc import Sequence

__all__ = [
    "AdapterError",
    "InvalidAdapterError",
    "BaseModelMismatchError",
    "AdapterNotFoundError",
    "AdapterStorageError",
    "AdapterDamagedError",
    "CacheFullError",
    "RequestTooLargeError",
    "OverloadedError",
]


class AdapterError(Exception):
    """Base of every error of the adapters package."""


class InvalidAdapterError(AdapterError):
    """An adapter (file, upload, tensors) is malformed, truncated or has wrong shapes."""


class BaseModelMismatchError(InvalidAdapterError):
    """The adapter was made for another base model (fingerprint differs)."""


class AdapterNotFoundError(AdapterError, LookupError):
    """No adapter (or no such version) of that name exists."""

    def __init__(self, name: str, version: int | None = None, *, stored: list[int] | None = None) -> None:
        self.name = name
        self.version = version
        what = f"adapter {name!r}" if version is None else f"version {version} of adapter {name!r}"
        known = f"; stored versions: {stored}" if stored else ""
        super().__init__(f"{what} not found{known}")


class AdapterStorageError(AdapterError):
    """The on-disk registry could not be read or written."""


class AdapterDamagedError(AdapterStorageError):
    """A stored adapter (or one stored version) failed its check on disk: it is listed as
    damaged and never served until a rollback to a sound version, a new version or a
    delete repairs it. ``reason`` may name state paths: :meth:`describe` leaves it out for
    callers who may not see them."""

    def __init__(self, name: str, reason: str, *, version: int | None = None, sound_versions: Sequence[int] = ()) -> None:
        self.name = name
        self.reason = reason
        #: The damaged version, when known (None: the pointer to the current one is damaged).
        self.version = version
        #: Stored versions that pass the check: what a rollback can go to.
        self.sound_versions = tuple(sound_versions)
        super().__init__(self.describe(with_reason=True))

    def describe(self, *, with_reason: bool) -> str:
        what = f"adapter {self.name!r}" + (f" (version {self.version})" if self.version is not None else "")
        why = f": {self.reason}" if with_reason else " (authenticated callers and the daemon log see why)"
        to = f"a sound stored version ({', '.join(map(str, self.sound_versions))})" if self.sound_versions else None
        repair = f"roll back to {to}, upload a new version or delete it" if to else "upload a new version or delete it"
        return f"{what} is damaged on disk and is not served{why}; repair it: {repair}"


class CacheFullError(AdapterError):
    """The adapter does not fit in the cache budget: the rest is pinned or in use."""


class RequestTooLargeError(AdapterError, ValueError):
    """A request costs more than one request may (tokens or rows); HTTP 413."""


class OverloadedError(AdapterError):
    """No room for the request within the configured wait (large requests queue); HTTP 503."""
