"""The package's layering: no import cycles between netdsl's modules, kernels/
a leaf below everything else, and a module cache key that covers every
source file a generated module depends on."""
import ast
import shutil
from pathlib import Path

import pytest

from conftest import ROOT

PKG = ROOT / "netdsl"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The netdsl modules a file imports, at module level or inside a function
    (a lazy import is a dependency all the same).  The package itself
    (netdsl/__init__.py, which every submodule's import runs first anyway) is
    no edge."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("netdsl"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("netdsl"):
                continue
            for a in node.names:  # `from . import runtime` names a module; `from .ops import OPS` a name in one
                sub = f"{mod}.{a.name}"
                found.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                          or (PKG.parent / sub.replace(".", "/")).is_dir() else mod)
    return {m for m in found if m != "netdsl" and m != name}


def _graph():
    return {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_import_graph_is_read_whole():
    graph = _graph()
    # (the reader sees lazy imports and `from . import x` as edges: these are known ones)
    assert "netdsl.kernels.conv" in graph["netdsl.tuning"]
    assert {"netdsl.launch", "netdsl.kernels.conv"} <= graph["netdsl.grad"]
    assert "netdsl.cache" in graph["netdsl.tuning"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles_inside_netdsl():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_kernels_import_nothing_above_them():
    """kernels/ holds templates and launchers: tuned configurations, the
    runtime and the compiler are handed to them, never imported."""
    graph = _graph()
    above = {m: sorted(d for d in deps if not d.startswith("netdsl.kernels"))
             for m, deps in graph.items() if m.startswith("netdsl.kernels")}
    assert len(above) >= 5 and not any(above.values()), above


@pytest.mark.parametrize("changed", ["fusion.py", "elaborate.py", "ops.py", "runtime.py", "kernels/conv.py",
                                     "codegen/triton_module.py"])
def test_the_module_cache_key_covers_the_whole_compiler(tmp_path, changed):
    """A changed source file of the compiler or runtime gives another cache key
    (a stale generated module is never served); an unchanged copy the same."""
    from netdsl.cache import compiler_digest

    copy = tmp_path / "netdsl"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert compiler_digest(copy) == compiler_digest(PKG)
    target = copy / changed
    target.write_text(target.read_text() + "\n# changed\n")
    assert compiler_digest(copy) != compiler_digest(PKG)
