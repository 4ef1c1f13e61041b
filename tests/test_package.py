"""The package as a user imports it."""

import subprocess
import sys

import prunekit


def test_import_loads_neither_the_application_nor_matplotlib():
    code = (
        "import sys, prunekit\n"
        "assert 'prunekit.app' not in sys.modules, 'the application imported'\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
        "prunekit.load_sparse, prunekit.save_sparse  # the export format is the library's\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version_is_defined_once():
    from importlib.metadata import version

    assert version("prunekit") == prunekit.__version__
