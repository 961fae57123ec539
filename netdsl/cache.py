"""`netdsl.build(...)`: compile a spec, cache the generated module by content
hash, import it and return a network instance."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from . import __version__
from .compiler import compile_program
from .parser import grammar_path, load
from .switches import check as check_switches


def cache_dir() -> Path:
    d = Path(os.environ.get("NETDSL_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "netdsl"))
    (d / "modules").mkdir(parents=True, exist_ok=True)
    return d / "modules"


@functools.lru_cache(maxsize=1)
def compiler_digest(root: Path | None = None) -> str:
    """A hash of every source file of the compiler, runtime and grammar: a
    changed pass, template or launcher gives a new module, never a stale one
    from the cache."""
    here = root or Path(__file__).resolve().parent
    h = hashlib.sha256()
    files = [(str(p.relative_to(here)), p) for p in sorted(here.rglob("*.py"))]
    files.append(("netdsl.lark", grammar_path()))
    for name, p in files:
        h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _key(prog, net, overrides, target, disable=frozenset()) -> str:
    h = hashlib.sha256()
    for name in sorted(prog.sources):
        h.update(name.encode() + b"\0" + prog.sources[name].encode() + b"\0")
    h.update(repr((net, sorted((overrides or {}).items()), target, sorted(disable), __version__)).encode())
    h.update(compiler_digest().encode())
    return h.hexdigest()[:20]


def import_file(path: str | os.PathLike, name: str | None = None):
    """Import a generated file as a module (kernels need a real file: Triton reads their source)."""
    path = str(path)
    name = name or "netdsl_generated_" + hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def compile_to_module(path, net: str | None = None, target: str = "triton", disable=(), **overrides):
    """The generated module for a spec file, from the cache when the content is
    unchanged; disable: fusions to switch off (switches.py), part of the key."""
    prog = load(path)
    disable = check_switches(disable) if target == "triton" else frozenset()
    key = _key(prog, net, overrides, target, disable)
    out = cache_dir() / f"{Path(str(path)).stem}_{key}.py"
    if not out.exists():
        source, _ = compile_program(prog, net, overrides, target=target, disable=disable)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(source)
        os.replace(tmp, out)
    return import_file(out, f"netdsl_gen_{key}")


def build(path, net: str, target: str = "triton", disable=(), **overrides):
    """A ready module instance: `netdsl.build("specs/resnet.net", net="ResNet18", num_classes=10)`;
    `disable=["grid_merge"]` compiles it without that fusion (switches.py)."""
    mod = compile_to_module(path, net, target, disable, **overrides)
    return mod.NETWORKS[net]()
