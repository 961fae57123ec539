"""Compile every kernel a step launches, in parallel, before the step runs.

Triton compiles a kernel on its first launch, on the launching thread, one
after another; a netdsl training step launches dozens of distinct kernels
(ResNet-50: 51 to compile for a step and an inference, about 30 s of compiles
one after another on a 2-core CPU: bench/compile_speed.py --kernels).
`precompile(module, x)` runs one step with every launch compiling only
(runtime.compile_only: Triton's JIT, given the launch's own arguments, so
its specialisation is the real launch's), inside triton.AsyncCompileMode:
the compiles go to a pool of threads (Triton's passes and ptxas run outside
Python's GIL), and the real step finds them in the JIT's cache.

Nothing runs on the GPU and nothing the step touches changes: the
parameters' gradients, the batch-norm statistics (their kernels do not run)
and the dropout stream are as they were.  The tuner (tune.py) uses the same
pool for its candidates.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from . import runtime as rt


def default_jobs() -> int:
    return max(1, min(os.cpu_count() or 1, 32))


class Compiles:
    """What launches made inside `parallel`: each launch's kernel, compiled
    (the JIT held it already) or a future of it (sent to the pool)."""

    def __init__(self, launched):
        self.launched = launched

    @property
    def submitted(self) -> int:
        """Compiles sent to the pool.  (Counted from the launches: Triton 3.9
        empties its AsyncCompileMode's own record when the block ends.)"""
        return len({id(k) for k in self.launched if hasattr(k, "result")})

    def kernels(self) -> list:
        """The distinct compiled kernels the launches use, in launch order
        (after the block; a failed compile is left out)."""
        seen = {}
        for k in self.launched:
            k = k.result(ignore_errors=True) if hasattr(k, "result") else k
            if k is not None:
                seen.setdefault(id(k), k)
        return list(seen.values())


_PARSE = threading.Lock()


@contextlib.contextmanager
def _parses_in_turn():
    """Triton parses a kernel's source (JITFunction.parse: ast.parse) as it
    compiles it, and as it hashes it.  Under CPython 3.11 two threads parsing
    at once failed here with `SystemError: AST constructor recursion depth
    mismatch`: the AST builder's recursion count is not per thread
    (python/cpython#106905).  So parses take turns; the rest of a compile
    (MLIR passes, LLVM, ptxas) still runs in parallel."""
    from triton.runtime.jit import JITFunction

    owner = next(c for c in JITFunction.__mro__ if "parse" in c.__dict__)  # (a base class, in Triton 3.6)
    original = owner.__dict__["parse"]

    def parse(self):
        with _PARSE:
            return original(self)

    owner.parse = parse
    try:
        yield
    finally:
        owner.parse = original


@contextlib.contextmanager
def parallel(jobs: int | None = None, ignore_errors: bool = False):
    """Launches inside the block compile only, `jobs` compiles at a time;
    leaving it waits for every compile.  Yields a Compiles.  ignore_errors:
    a kernel that fails to compile is left out (its launch will raise again
    when it runs) instead of raising here."""
    import triton

    with _parses_in_turn(), ThreadPoolExecutor(jobs or default_jobs(), thread_name_prefix="netdsl-compile") as pool, \
            triton.AsyncCompileMode(pool, ignore_errors=ignore_errors) as mode, rt.compile_only(mode) as launched:
        yield Compiles(launched)


def compile_step(module, x, train: bool = True, jobs: int | None = None) -> Compiles:
    """Compile every kernel one step of module on x launches (train: a
    training step, forward and backward; else inference), whatever device x
    is on (Triton compiles for its active driver's GPU).  Nothing is
    computed, so any output gradient will do, and nothing the step touches
    changes (rt.one_step)."""
    with parallel(jobs) as compiles:
        rt.one_step(module, x, train)
    return compiles


def precompile(module, x, *, train: bool = True, jobs: int | None = None) -> int:
    """Compile, `jobs` at a time (default: one per CPU core, at most 32),
    every kernel one step of module on the CUDA tensor x will launch, so the
    first real step starts at once; returns how many compiles ran (0 for a
    CPU tensor: the interpreter runs kernels uncompiled)."""
    if not x.is_cuda:
        return 0
    return compile_step(module, x, train, jobs).submitted
