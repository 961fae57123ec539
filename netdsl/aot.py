"""Ahead-of-time compilation of every kernel a module launches, for real
GPUs, on a machine without one: the interpreter accepts code the compiler
rejects, so this is the check that generated kernels really compile.

`compile_launches(module, x, archs)` runs one inference and one training
step with every launch compiling only (runtime.compile_only), Triton's JIT
pointed at an sm_<arch> it cannot launch on (`jit_target`): what it compiles
is what that GPU's first launches would.  `signatures` and `compile_one`
compile one planned launch with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`, for tests that vary its constexprs.
"""
from __future__ import annotations

import contextlib

import torch

from . import runtime as rt

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def _type(v) -> str:
    if isinstance(v, (torch.Tensor, rt.TensorInfo)):
        return "*" + _DTYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {v!r}")


OPTIONS = ("num_warps", "num_stages", "maxnreg")  # launch options, not constexpr arguments


def signatures(module, x, train: bool = False, backward: bool = False):
    """Distinct (kernel, signature, meta) that one forward (with backward: one
    training step, forward and backward) launches; meta holds the constexprs
    and the launch options (num_warps, num_stages).  With backward the input
    needs a gradient too, so a first conv's dgrad is among them.  Planned
    launches compute nothing, and the module is left as it was (rt.one_step)."""
    with rt.plan_launches() as plan:
        rt.one_step(module, x.detach().requires_grad_() if backward else x, train, backward)
    seen, out = set(), []
    for kernel, args, meta in plan:
        names = kernel.arg_names
        sig = {n: _type(a) for n, a in zip(names, args)}
        sig.update({k: "constexpr" for k in meta if k not in OPTIONS})
        key = (kernel.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(meta.items())))
        if key not in seen:
            seen.add(key)
            out.append((kernel, sig, dict(meta)))
    return out


def compile_one(kernel, sig, meta, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {k: v for k, v in meta.items() if k not in OPTIONS}
    options = {k: v for k, v in meta.items() if k in OPTIONS}
    return triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", arch, 32), options=options)


def compile_launches(module, x, archs=(90, 80), train_too: bool = True, jobs: int | None = None):
    """Compile what one inference (train_too: and one training step, forward
    and backward) of module on x launches, for each architecture, as Triton's
    JIT compiles it on that GPU: through the launch path itself, so with each
    launch's specialisation (16-byte aligned pointers, integers divisible by
    16 or equal to 1: a channels_last channel stride of 1 is a constant),
    which ASTSource without attributes (compile_one) leaves out.  `jobs`
    compiles at a time.  Returns [(kernel name, arch, compiled)], one per
    distinct compiled variant, in launch order."""
    from .parallel_compile import compile_step

    results = []
    for arch in archs:
        with jit_target(arch):
            seen = {}
            for train in (False, True) if train_too else (False,):
                for c in compile_step(module, x, train, jobs).kernels():
                    seen.setdefault(id(c), c)
        results += [(c.name, arch, c) for c in seen.values()]
    return results


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for this architecture (it bundles one, so no
    CUDA install is needed; newer Triton releases pick a newer one per arch)."""
    import os

    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            tool = get_ptxas(arch)
        except TypeError:  # releases whose get_ptxas takes no architecture
            tool = get_ptxas()
        path = getattr(tool, "path", tool)
        if path and os.path.isfile(path):
            return path
    except ImportError:
        pass
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_info(compiled, arch: int) -> dict:
    """Registers per thread and spills, as ptxas reports them for the kernel's PTX."""
    import re
    import subprocess
    import tempfile

    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        r = subprocess.run([_ptxas(arch), "-v", "--gpu-name", gpu, f.name, "-o", "/dev/null"],
                           capture_output=True, text=True, check=True)
    text = r.stderr + r.stdout
    regs = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(stores.group(1)) if stores else 0,
            "spill_loads": int(loads.group(1)) if loads else 0}


def report(module, x, archs=(90, 80)) -> list[dict]:
    """One row per distinct launch and architecture: what the real compiler says."""
    rows = []
    for name, arch, compiled in compile_launches(module, x, archs):
        md = compiled.metadata
        info = ptxas_info(compiled, arch)
        rows.append({"kernel": name, "arch": f"sm_{arch}", **info, "shared_bytes": md.shared,
                     "warps": md.num_warps, "stages": md.num_stages})
    return rows


def format_report(rows) -> str:
    head = ("kernel", "arch", "regs", "spill st/ld", "shared", "warps", "stages")
    body = [(r["kernel"], r["arch"], str(r["registers"]), f"{r['spill_stores']}/{r['spill_loads']}",
             f"{r['shared_bytes']:,}", str(r["warps"]), str(r["stages"])) for r in rows]
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head] + body]
    return "\n".join(lines[:1] + ["─" * len(lines[0])] + lines[1:])


class CompileOnlyDriver:
    """A Triton driver for a GPU this machine lacks: Triton's JIT compiles
    for it (the launch path itself, with the launch's own specialisation of
    pointer alignment and integer values, which ASTSource without attributes
    leaves out) and can launch nothing.  Use it through `jit_target(arch)`."""

    def __init__(self, arch: int = 90):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # the JIT keeps its caches per device: one "device" per architecture
        return ("compile-only", self.target.arch)

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def jit_target(arch: int = 90):
    """Inside the block, Triton's JIT compiles for sm_<arch> (with runtime.compile_only,
    launches compile and run nothing)."""
    from triton.runtime.driver import driver

    previous = getattr(driver, "_active", None)  # (reading .active would look for a GPU, and fail here)
    driver.set_active(CompileOnlyDriver(arch))
    try:
        yield
    finally:
        driver.set_active(previous)
