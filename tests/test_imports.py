"""Import hygiene: no module of rankwise imports itself back through others, and the CLI starts light.

The graph is read from the source with `ast` (every import statement, function-level ones included, since a lazy
import still closes a loop when its function runs), so it needs no imports of its own and sees code paths a run
would not take. An edge goes to the module an import names: `from .methods import PlainLora` is an edge to the
package `rankwise.methods` (its __init__ runs), `from . import lora` is an edge to `rankwise.methods.lora`, and a
string naming a submodule ("rankwise.dynamic.method", what `importlib.import_module` is given) is an edge too. The
implicit import of a parent package is not an edge: every module would otherwise be in a loop with any
__init__ that re-exports it, which is how packages are meant to work.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "transformers", "peft", "datasets")


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module under src/rankwise (a package is its __init__.py)."""
    found = {}
    for path in sorted((SRC / "rankwise").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _package_of(name: str, path: Path) -> str:
    """The package a relative import in this module is resolved against."""
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _absolute(base: str, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    parts = base.split(".")
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([module] if module else []))


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The rankwise modules this module's import statements name (anywhere in the file)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(_package_of(name, path), node.level, node.module)
            for alias in node.names:  # `from pkg import sub` imports the submodule when there is one
                sub = f"{target}.{alias.name}"
                targets.add(sub if sub in modules else target)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value \
                and node.value in modules:
            targets.add(node.value)  # a dynamic import (importlib.import_module("rankwise.x.y"))
    resolved = set()
    for target in targets:  # `import rankwise.a.b` names a.b; a name below a module resolves to that module
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search: white/grey/black)."""
    state = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done
    for root in sorted(graph):
        if state[root]:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_graph_reader_sees_what_python_imports():
    """The reader's edges, checked by hand on modules whose imports are known (a reader that saw nothing would
    pass the cycle test vacuously)."""
    graph = import_graph()
    assert {"rankwise.types", "rankwise.parsing"} <= graph["rankwise.cli"]  # module-level
    assert "rankwise.training.commands" in graph["rankwise.cli"]  # function-level, inside build_parser
    assert "rankwise.methods.lora" in graph["rankwise.methods"]  # `from . import lora`
    assert "rankwise.methods.base" in graph["rankwise.methods.lora"]  # `from .base import ...`
    assert "rankwise.dynamic.method" in graph["rankwise.methods"]  # importlib.import_module over a tuple of names


def test_cycle_finder_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b", "c"}, "c": set()}) == ["b", "b"]
    assert find_cycle({"a": {"c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no cycle


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("argv", [["--help"], ["strategies"], ["train", "--help"]])
def test_commands_without_a_model_import_nothing_heavy(argv):
    """`import rankwise.cli` and commands that need no model load no torch/transformers/peft/datasets (a fresh
    process: this one has imported them already)."""
    code = ("import sys, contextlib, io\n"
            "import rankwise.cli\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    code = rankwise.cli.main({argv!r})\n"
            "assert code == 0 and out.getvalue(), (code, out.getvalue())\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"rankwise {' '.join(argv)} imported {done.stdout.strip()}"
