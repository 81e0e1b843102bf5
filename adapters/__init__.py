"""lorad.adapters: LoRA graph surgery, adapter files, registry, cache, inference engine."""

if __name__ != "lorad.adapters":
    # The repository folder is not a top-level package: on the import path it would shadow
    # an unrelated distribution of the same name (python-daemon, AdapterHub's adapters).
    raise ImportError(f"lorad's adapters package is imported as lorad.adapters, not as {__name__!r}")

