"""The entry point: ``python -m structured`` from ``benchmarks/`` (usage in the package docstring)."""

from .cli import main

if __name__ == "__main__":
    main()
