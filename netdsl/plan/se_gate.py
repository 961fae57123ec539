"""SE gate: a squeeze-and-excitation gate (global average pool → 1×1 conv
→ act → 1×1 conv → act, MobileNetV3's and EfficientNet's) whose input a
direct depthwise conv makes is one launch, kernels/gate.py's, instead of
three; and the depthwise conv's epilogue leaves each tile's per-channel sums
of its output, so the gate pools those few rows per sample instead of
reading the output again.

Applies where the pool's input is a direct depthwise step's own output (not
a buffer's channels), each of the pool and the squeeze conv has the next as
its only reader and is not returned, and both convs are plain 1×1 convs
(stride 1, no padding, groups 1, no batch norm or residual) with at most
kernels/gate.py's MAX_SQUEEZE channels between them.  Other gates (RegNetY's,
after a grouped conv) keep their three launches: pooling a full tensor in
one program a sample would trade the pool kernel's parallelism for two
launches."""
from __future__ import annotations

from dataclasses import replace

from .. import ir
from ..kernels.gate import MAX_SQUEEZE
from .ir import Gate, Plan, Value


def se_gate(plan: Plan) -> Plan:
    steps, values = list(plan.steps), dict(plan.values)
    for pool in [s for s in steps if s.op == "global_avgpool" or (
            s.op == "adaptive_avgpool" and tuple(s.unit.attrs["output_size"]) == (1, 1))]:
        made = [s for s in steps if s.out == pool.reads[0]]
        if len(made) != 1 or made[0].op != "depthwise" or made[0].outs or values[pool.reads[0]].base is not None:
            continue
        (dw,) = made
        squeeze = _only_reader(plan, steps, pool)
        excite = _only_reader(plan, steps, squeeze) if squeeze is not None and _plain(plan, squeeze, pool) else None
        if excite is None or not _plain(plan, excite, squeeze) or excite.out in plan.returned() \
                or squeeze.unit.main.attrs["out_channels"] > MAX_SQUEEZE \
                or excite.unit.main.attrs["out_channels"] != values[pool.reads[0]].shape[0] \
                or len({s.training_only for s in (pool, squeeze, excite)}) != 1:
            continue
        sums = f"{dw.out}_sums"
        values[sums] = Value(sums, (values[dw.out].shape[0],), sums=True)
        steps[steps.index(dw)] = replace(dw, outs=(dw.out, sums))
        i = steps.index(pool)
        steps[i] = replace(pool, op="se_gate", unit=Gate(pool.unit, squeeze.unit, excite.unit),
                           reads=(dw.out, sums), out=excite.out)
        steps.remove(squeeze)
        steps.remove(excite)
        del values[pool.out], values[squeeze.out]
    return plan.with_steps(steps, values)


def _only_reader(plan: Plan, steps, s):
    """The one step that reads s's output, where nothing else does (nor the caller)."""
    readers = [t for t in steps if s.out in t.reads]
    if len(readers) != 1 or s.out in plan.returned() or any(v.base == s.out for v in plan.values.values()):
        return None
    return readers[0]


def _plain(plan: Plan, s, before) -> bool:
    """A 1×1 conv on before's output alone, with a bias or not and an activation or not, nothing else fused."""
    f = s.unit
    if s.op != "conv" or not isinstance(f, ir.Fused) or f.kind != "conv" or f.bn is not None or f.residual \
            or s.reads != (before.out,) or s.prologue or plan.value(s.out).base is not None \
            or (f.act is not None and f.act.op == "hardtanh"):  # (its bounds have no slot in the kernel)
        return False
    a = f.main.attrs
    return tuple(a["kernel_size"]) == (1, 1) and tuple(a["stride"]) == (1, 1) and tuple(a["padding"]) == (0, 0) \
        and a["groups"] == 1
