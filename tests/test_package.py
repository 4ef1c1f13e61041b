"""The package as a user imports it."""

import subprocess
import sys

import prunekit


def test_import_loads_neither_the_training_stack_nor_matplotlib():
    code = (
        "import sys, prunekit\n"
        "assert 'prunekit.training' not in sys.modules, 'training stack imported'\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
        "prunekit.load_sparse  # the export functions load on first use\n"
        "assert 'prunekit.training' in sys.modules\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot (and a backend change) imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version_is_defined_once():
    from importlib.metadata import version

    assert version("prunekit") == prunekit.__version__
