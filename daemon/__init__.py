"""lorad.daemon: the process (config, HTTP API, metrics, systemd, CLIs, embedded demo model)."""

if __name__ != "lorad.daemon":
    # The repository folder is not a top-level package: on the import path it would shadow
    # an unrelated distribution of the same name (python-daemon, AdapterHub's adapters).
    raise ImportError(f"lorad's daemon package is imported as lorad.daemon, not as {__name__!r}")

