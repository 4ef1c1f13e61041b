"""Command-line interface: ``prunekit train``, ``prunekit demo``, ``prunekit methods``."""
