"""``python -m structured`` from ``benchmarks/``: the same as ``python benchmarks/structured.py``."""

from .cli import main

main()
