"""Only-Train-Once structured pruning side by side with only-train-once 3.0.1 and Torch-Pruning 1.6.1.

The entry point of the package ``benchmarks/structured/`` (parts, usage and results described in
its ``__init__``): ``python benchmarks/structured.py --parts discovery latency``.
"""

from structured.cli import main

if __name__ == "__main__":
    main()
