"""lorad.trainer: DP-LoRA training, accountant, privacy ledger, scheduler, example store."""

if __name__ != "lorad.trainer":
    # The repository folder is not a top-level package: on the import path it would shadow
    # an unrelated distribution of the same name (python-daemon, AdapterHub's adapters).
    raise ImportError(f"lorad's trainer package is imported as lorad.trainer, not as {__name__!r}")

