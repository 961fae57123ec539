"""Block outputs (training forward): a residual block's output, act(BN(raw)
+ shortcut), that feeds a block whose body starts with a 1×1, stride-1
conv is not written by an apply kernel.  That conv runs first of the
output's consumers, before a downsample shortcut too, and makes the output
as it loads raw, storing it for the other consumers and for backward
(CONV2D's IN_RES): nothing reads it back for that conv."""
from __future__ import annotations

from dataclasses import replace

from .. import ir
from .ir import Plan


def makes_input(j) -> bool:
    """A fused residual block whose body starts with a 1×1, stride-1, ungrouped
    conv that another layer follows: the conv can make a block output it is
    given as it loads it."""
    if not (isinstance(j, ir.Join) and j.kind == "residual" and j.fused):
        return False
    body = j.branches[0].items
    if len(body) < 2 or not (isinstance(body[0], ir.Fused) and body[0].kind == "conv"):
        return False
    a = body[0].main.attrs
    return (tuple(a["kernel_size"]) == (1, 1) and tuple(a["stride"]) == (1, 1) and tuple(a["padding"]) == (0, 0)
            and tuple(a["dilation"]) == (1, 1) and a["groups"] == 1)


def block_outputs(plan: Plan) -> Plan:
    steps = list(plan.steps)
    # such a block's first conv runs right after its input's fork, before the shortcut
    for j in [s.unit for s in steps if s.op == "fork" and makes_input(s.unit) and s.unit.branches[1].items]:
        fork = next(k for k, s in enumerate(steps) if s.op == "fork" and s.unit is j)
        first = next(k for k, s in enumerate(steps) if s.op == "conv" and s.unit is j.branches[0].items[0])
        steps.insert(fork + 1, steps.pop(first))
    readers: dict[str, list] = {}
    for s in steps:
        for r in s.reads:
            readers.setdefault(r, []).append(s)
    for k, s in enumerate(steps):
        u, rs = s.unit, readers.get(s.out, ())
        if (s.op == "conv" and isinstance(u, ir.Fused) and u.kind == "conv" and u.bn is not None and u.residual
                and len(rs) == 1 and rs[0].op == "fork" and makes_input(rs[0].unit)
                and rs[0].training_only == s.training_only):
            steps[k] = replace(s, leave=True)
    return plan.with_steps(steps)
