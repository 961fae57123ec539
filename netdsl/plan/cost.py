"""What a plan moves: each launch's bytes at a batch size, from the shapes
the plan states (nothing runs), and the same figures for eager PyTorch,
counted by tracing the `--target torch` twin on the meta device.

A launch's bytes are its distinct tensor operands, read or written, weights
and per-channel vectors included; caches are ignored.  Eval batch-norm folds
run once after a parameter changes and are counted apart."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import ir
from ..kernels.depthwise import pool_tiles
from .ir import Plan, Step

ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Launch:
    step: Step
    bytes: int


@dataclass(frozen=True)
class Figures:
    launches: tuple[Launch, ...]
    folds: int  # bn_fold launches after a parameter change (eval)

    @property
    def total_bytes(self) -> int:
        return sum(l.bytes for l in self.launches)


def _root(plan: Plan, name: str):
    """Where a value's memory is: (buffer, first channel, shape), for counting an operand once."""
    v = plan.value(name)
    c0 = v.c0
    while v.base is not None:
        v = plan.value(v.base)
        c0 += v.c0
    return v.name, c0, plan.value(name).step, plan.value(name).shape


def _is_view_flatten(plan: Plan, step: Step) -> bool:
    """rt.flatten is a view of an NCHW-contiguous tensor (channels-last ones are where H·W > 1 and C > 1)."""
    v = plan.value(step.reads[0])
    if len(v.shape) != 3:
        return True
    return v.base is None and (v.nchw or v.shape[0] == 1 or v.shape[1] * v.shape[2] == 1)


def launches(plan: Plan, batch: int, dtype: str = "fp32") -> Figures:
    """The launches of plan's inference forward in eval mode, steady state, with a GPU's tiles."""
    e, stat = ELEMENT[dtype], 4
    out = []
    folds = 0
    made = {o: s for s in plan.steps for o in s.outs}

    def size(name):
        v = plan.value(name)
        if v.sums:  # fp32, a row per tile of each sample (the depthwise conv that left them)
            hw = math.prod(plan.value(made[name].outs[0]).shape[1:])
            return batch * pool_tiles(True, hw, v.shape[0]) * v.shape[0] * stat
        return batch * math.prod(v.shape) * e

    for s in plan.steps:
        if s.op == "buffer" or (s.op == "flatten" and _is_view_flatten(plan, s)) or s.training_only:
            continue
        stored = plan.value(s.out).base is not None
        if s.op == "dropout" and not stored:  # eval: the input itself
            continue
        # (an upsampling to a tensor's size reads only its shape)
        reads = s.reads[:1] if s.op == "upsample" and s.unit.attrs.get("like") else s.reads
        if s.op == "se_gate":  # (x for its shape: the kernel reads its per-tile sums)
            reads = s.reads[1:]
        operands = {_root(plan, r): size(r) for r in reads}
        for o in s.outs or (s.out,):
            operands[_root(plan, o)] = size(o)
        nbytes = sum(operands.values())
        u = s.unit
        if isinstance(u, ir.Fused):
            main, bn = u.main, u.bn
            if u.kind in ("conv", "linear"):
                nbytes += _weight(main) * e
                if bn is None and main.attrs.get("bias"):
                    nbytes += _out_channels(main) * e
            if bn is not None:
                folds += 1
                nbytes += 2 * bn.attrs["num_features"] * stat  # the folded scale and shift
        elif s.op == "conv_transpose":
            nbytes += _weight(u) * e + (u.attrs["out_channels"] * e if u.attrs["bias"] else 0)
        elif s.op == "se_gate":  # both convs' weights and biases
            nbytes += sum(_weight(f.main) + (_out_channels(f.main) if f.main.attrs.get("bias") else 0)
                          for f in (u.squeeze, u.excite)) * e
        elif s.op in ("layernorm", "groupnorm", "layer_scale"):  # γ (and β)
            nbytes += sum(math.prod(t.shape) for t in u.tensors) * e
        out.append(Launch(s, nbytes))
    return Figures(tuple(out), folds)


def _weight(layer: ir.Layer) -> int:
    return math.prod(next(t.shape for t in layer.tensors if t.suffix == "weight"))


def _out_channels(layer: ir.Layer) -> int:
    a = layer.attrs
    return a["out_channels"] if layer.op == "conv" else a["out_features"]


def eager(net: ir.Net, batch: int, dtype: str = "fp32") -> tuple[int, int]:
    """(ops, bytes) of eager PyTorch's eval forward of net, at batch: the
    `--target torch` twin traced on the meta device (shapes only), each
    dispatched op counted with its distinct tensor inputs and outputs; views
    and allocations are free."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ..codegen import torch_module

    source = torch_module.generate([net], "<plan>")
    scope: dict = {}
    exec(compile(source, f"<{net.name} twin>", "exec"), scope)  # generated from a checked graph: no spec text runs
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    with torch.device("meta"):
        model = scope["NETWORKS"][net.name]().to(dt).eval()
        x = torch.empty((batch, *net.input_shape), dtype=dt)

    class Count(TorchDispatchMode):
        ops = nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if func.__name__ not in FREE:
                self.ops += 1
                seen = {}
                # (an eval batch norm's saved statistics are empty on a real device, C-sized on meta)
                outs = result[:1] if func.__name__.startswith(("native_batch_norm", "_native_batch_norm_legit")) else result
                for t in _tensors((args, kwargs or {}, outs)):
                    seen[id(t)] = t.numel() * t.element_size()
                self.nbytes += sum(seen.values())
            return result

    with torch.no_grad(), Count() as c:
        model(x)
    return c.ops, c.nbytes


# ops that move no data: allocations and views
FREE = {"empty.memory_format", "empty_strided.default", "empty_like.default", "new_empty_strided.default",
        "view.default", "_unsafe_view.default", "t.default", "detach.default", "alias.default", "slice.Tensor",
        "as_strided.default", "expand.default", "_reshape_alias.default", "reshape.default", "flatten.using_ints",
        "unsqueeze.default", "set_.source_Storage_storage_offset"}  # (a dense block's buffer channels: set_)


def _tensors(value):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
