"""Deferred BN (training forward): a train-mode conv→BN(→act), or a
BN(→act) alone, whose one consumer is a conv, leaves its BN apply and
activation to that conv, which applies them as it loads (CONV2D's
prologue): the activation is never written, read back or kept for
backward.  The same for a conv→BN(→act) feeding a max or average pool (a
stem's), and for a downsample's conv→BN (no act) whose one consumer is the
block's last conv: that conv's BN apply normalises it as it adds it.

The consumer's backward then takes the deferred BN's backward sums in its
epilogue, and the producing conv applies its input gradient as it loads
(grad.Deferred).  The inference forward folds BN into the conv instead."""
from __future__ import annotations

from dataclasses import replace

from .. import ir
from .ir import Plan


def _defers(s, c, pos: int) -> bool:
    """Can step s leave its BN apply and act to c, which reads it as its read pos?"""
    u = s.unit
    if not (s.op in ("conv", "batchnorm") and isinstance(u, ir.Fused) and u.bn is not None and not u.residual):
        return False
    if c.training_only != s.training_only or c.op not in ("conv", "pool"):
        return False
    if c.op == "pool":  # (its backward's apply rides in the producing conv's implicit-GEMM dgrad and wgrad)
        return pos == 0 and s.op == "conv"
    if pos == 0:
        return c.unit.kind == "conv"
    return s.op == "conv" and u.act is None and c.unit.bn is not None and c.unit.residual


def deferred_bn(plan: Plan) -> Plan:
    readers: dict[str, list] = {}
    for k, s in enumerate(plan.steps):
        for pos, r in enumerate(s.reads):
            readers.setdefault(r, []).append((k, pos))
    steps = list(plan.steps)
    for k, s in enumerate(steps):
        rs = readers.get(s.out, ())
        if len(rs) == 1 and _defers(s, steps[rs[0][0]], rs[0][1]):
            steps[k] = replace(s, defer=True)
    return plan.with_steps(steps)
