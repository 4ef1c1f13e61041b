"""Data-parallel training: compressed gradient exchange (DDP communication hooks) and helpers."""

from prunekit.distributed.launch import WorkerError, free_port, run_workers

__all__ = ["WorkerError", "free_port", "run_workers"]
