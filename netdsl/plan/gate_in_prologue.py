"""Gate in prologue: a squeeze-and-excitation product x · gate (gate one
value per sample and channel) whose only reader is a conv (MobileNetV3's and
EfficientNet's projection conv) is not a launch of its own: the conv
multiplies x by the gate as it loads it, so the product is never written
and read back.

Applies where the product is the conv's input (not its residual), nothing
else reads it, it is not returned nor stored into a buffer, and the conv is
an implicit GEMM's (not the direct depthwise kernel's)."""
from __future__ import annotations

from dataclasses import replace

from .ir import Plan


def gate_in_prologue(plan: Plan) -> Plan:
    steps, values = list(plan.steps), dict(plan.values)
    for s in [t for t in steps if t.op == "mul"]:
        full, gate = _factors(plan, s)
        readers = [t for t in steps if s.out in t.reads]
        if full is None or len(readers) != 1 or s.out in plan.returned() or values[s.out].base is not None \
                or any(v.base == s.out for v in values.values()):
            continue
        (conv,) = readers
        if conv.op != "conv" or conv.unit.kind != "conv" or conv.reads[0] != s.out or s.out in conv.reads[1:] \
                or conv.prologue or conv.training_only != s.training_only:
            continue
        i = steps.index(conv)
        steps[i] = replace(conv, reads=(full,) + conv.reads[1:] + (gate,), prologue=("gate",))
        steps.remove(s)
        del values[s.out]
    return plan.with_steps(steps, values)


def _factors(plan: Plan, s):
    """(the full-size factor, the gate) of a product, or (None, None) where it is not x · gate[n, c]."""
    a, b = (plan.value(r) for r in s.reads)
    out = plan.value(s.out).shape
    for full, gate in ((a, b), (b, a)):
        if len(out) == 3 and full.shape == out and gate.shape == (out[0], 1, 1) and gate.base is None \
                and full.step == 1:
            return full.name, gate.name
    return None, None
