"""Errors raised by the adapters package.

Two roots, as the rest of lorad: :class:`InvalidAdapterError` when data from outside
(an uploaded file, a file on disk, a request) is wrong, :class:`AdapterStorageError` when
the disk or the runtime failed. Caller mistakes are ValueError/RuntimeError.
"""

__all__ = [
    "AdapterError",
    "InvalidAdapterError",
    "BaseModelMismatchError",
    "AdapterNotFoundError",
    "AdapterStorageError",
    "CacheFullError",
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


class CacheFullError(AdapterError):
    """The adapter does not fit in the cache budget: the rest is pinned or in use."""
