"""Ahead-of-time compilation of every kernel a module launches, for real
GPUs, on a machine without one: the interpreter accepts code the compiler
rejects, so this is the check that generated kernels really compile.

`compile_launches(module, x, archs)` runs one forward in plan mode (no kernel
executes; tiles are those a GPU would get), then compiles each distinct
(kernel, signature, constexprs) with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`.
"""
from __future__ import annotations

import torch

from . import runtime as rt

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}


def _type(v) -> str:
    if isinstance(v, torch.Tensor):
        return "*" + _DTYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {v!r}")


def signatures(module, x, train: bool = False):
    """Distinct (kernel, signature, constexprs) that one forward launches."""
    module.train(train)
    with torch.no_grad(), rt.plan_launches() as plan:
        module(x)
    seen, out = set(), []
    for kernel, args, meta in plan:
        names = kernel.arg_names
        sig = {n: _type(a) for n, a in zip(names, args)}
        sig.update({k: "constexpr" for k in meta})
        key = (kernel.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(meta.items())))
        if key not in seen:
            seen.add(key)
            out.append((kernel, sig, dict(meta)))
    return out


def compile_one(kernel, sig, constexprs, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", arch, 32))


def compile_launches(module, x, archs=(90, 80), train_too: bool = True):
    """Compile every distinct launch; returns [(kernel name, arch, compiled)]."""
    todo = signatures(module, x, False) + (signatures(module, x, True) if train_too else [])
    done, results = set(), []
    for kernel, sig, meta in todo:
        key = (kernel.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(meta.items())))
        if key in done:
            continue
        done.add(key)
        for arch in archs:
            results.append((kernel.fn.__name__, arch, compile_one(kernel, sig, meta, arch)))
    return results
