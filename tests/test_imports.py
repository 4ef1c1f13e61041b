"""The import graph of the package: no circle, and the library never imports the application."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import prunekit

ROOT = Path(prunekit.__file__).parent
APPLICATION = ("prunekit.app", "prunekit.cli")


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every prunekit module ``path`` imports, at module level or inside functions (a lazy import
    is still an arrow); ``from package import submodule`` is an arrow to the submodule only."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prunekit"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            found |= subs
            if len(subs) < len(node.names):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("prunekit")}
    return found & MODULES.keys()


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle in ``graph``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            for child in children:
                if state.get(child) == 1:
                    return [*path[path.index(child) :], child]
                if not state.get(child):
                    state[child] = 1
                    stack.append((child, iter(sorted(graph[child]))))
                    path.append(child)
                    break
            else:
                state[node] = 2
                stack.pop()
                path.pop()
    return None


def test_the_graph_is_read_from_every_module():
    assert {"prunekit.app.training", "prunekit.posttrain.grid", "prunekit.core"} <= MODULES.keys()
    assert "prunekit.posttrain.grid" in GRAPH["prunekit.posttrain.obs"]
    assert "prunekit.app.loop" in GRAPH["prunekit.app.training"]


def test_no_circle_anywhere():
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH) or [])


def test_the_cycle_finder_finds_a_planted_circle():
    planted = {k: set(v) for k, v in GRAPH.items()}
    planted["prunekit.posttrain.grid"].add("prunekit.posttrain.obs")
    cycle = _cycle(planted)
    assert cycle is not None and cycle[0] == cycle[-1]


def test_the_library_never_imports_the_application():
    arrows = [
        (name, target)
        for name, targets in GRAPH.items()
        if not name.startswith(APPLICATION)
        for target in targets
        if target.startswith(APPLICATION)
    ]
    assert arrows == []


def test_every_public_subpackage_is_an_attribute_and_import_stays_light():
    code = (
        "import sys, prunekit\n"
        "assert 'prunekit.structured' not in sys.modules and 'prunekit.app' not in sys.modules\n"
        "assert callable(prunekit.structured.find_groups)\n"
        "assert callable(prunekit.distributed.compress_gradients)\n"
        "assert callable(prunekit.data.load_dataset) and callable(prunekit.models.build_model)\n"
        "assert 'matplotlib' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in ("core", "data", "distributed", "methods", "models", "posttrain", "structured"):
        assert getattr(prunekit, name) is importlib.import_module(f"prunekit.{name}")


def test_the_methods_need_the_ddp_helpers_not_the_gradient_compression_feature():
    code = (
        "import sys, prunekit, prunekit.structured\n"
        "from prunekit.methods import cram\n"
        "assert 'prunekit.core.ddp' in sys.modules\n"
        "assert 'prunekit.distributed' not in sys.modules, 'gradient compression imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "prunekit.distributed" not in GRAPH["prunekit.methods.cram"]


def test_the_old_home_of_the_ddp_helpers_still_works_with_a_warning():
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from prunekit.distributed.sync import unwrap\n"
        "from prunekit.core.ddp import unwrap as new\n"
        "assert unwrap is new\n"
        "assert any(issubclass(w.category, DeprecationWarning) for w in caught), caught\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


#: the modules longer than MAX_LINES, each with the one concept it holds (a new long module must be
#: split, or added here with its one concept; an entry that is no longer long is removed)
MAX_LINES = 400
LONG_MODULES = {
    "prunekit.app.run_dir": "the run directory: its record, overwriting and restoring, its lock",
    "prunekit.distributed.codecs": "the wire formats of QSGD and natural compression",
    "prunekit.posttrain.methods": "the table of post-training methods: one config and rule each",
    "prunekit.posttrain.mfac": "the blocked inverse empirical Fisher and M-FAC's pruning step",
    "prunekit.posttrain.obc": "OBC/OBQ: greedy optimal brain compression of one layer",
    "prunekit.posttrain.obs": "the OBS rules of one layer: SparseGPT, Wanda, magnitude",
    "prunekit.posttrain.pipeline": "prunekit.compress: the walk over the model",
    "prunekit.posttrain.sequential": "the order of the units and the forwards that feed them",
    "prunekit.structured.groups": "zero-invariant groups and what they cost",
    "prunekit.structured.heads": "attention heads as groups",
    "prunekit.structured.hesso": "HESSO: its config, its FLOPs target and its update",
    "prunekit.structured.rules": "the table of per-op rules of group discovery",
    "prunekit.structured.slim": "the slim model built from the zero groups",
}


def test_a_long_module_holds_one_named_concept():
    lengths = {
        name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()
    }
    unnamed = sorted(n for n, k in lengths.items() if k > MAX_LINES and n not in LONG_MODULES)
    assert unnamed == [], f"over {MAX_LINES} lines: split them, or name their one concept"
    stale = sorted(n for n in LONG_MODULES if lengths.get(n, 0) <= MAX_LINES)
    assert stale == [], "no longer long (or gone): remove from LONG_MODULES"
