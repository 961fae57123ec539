"""Depthwise direct: a depthwise conv (groups == input channels == output
channels) runs the direct kernel of kernels/depthwise.py, with the same
epilogue, instead of the implicit GEMM, which pads each group's single
input channel to tl.dot's 16.  (Literal filters applied to every channel,
as the course's blur, are depthwise convs too.)"""
from __future__ import annotations

from dataclasses import replace

from .. import ir
from ..kernels.depthwise import is_depthwise
from .ir import Plan, Step, Value


def depthwise_direct(plan: Plan) -> Plan:
    def direct(s) -> bool:
        u = s.unit
        return s.op == "conv" and isinstance(u, ir.Fused) and u.kind == "conv" and is_depthwise(u.main.attrs)

    return plan.with_steps([replace(s, op="depthwise") if direct(s) else s for s in plan.steps])


def depthwise_direct_train(plan: Plan) -> Plan:
    """The training forward's: the conv and its bias run in the direct
    kernel, and what its epilogue would do in the kernels after it: its
    batch norm (with the residual add and activation) in the BN kernels, an
    activation alone in the elementwise kernel.  The direct kernel's epilogue
    leaves the per-tile sums of its output that the batch norm's statistics
    come from, so nothing reads the output again for them.  Not where its output is
    stored into a concatenation's buffer, nor a residual add without a batch
    norm (no kernel after it would add the shortcut)."""
    steps, values = [], dict(plan.values)
    for s in plan.steps:
        f = s.unit
        if not (s.op == "conv" and isinstance(f, ir.Fused) and f.kind == "conv" and is_depthwise(f.main.attrs)
                and (f.bn is not None or not f.residual) and not s.into):
            steps.append(s)
            continue
        conv = ir.Fused("conv", (f.main,), None, False)  # (the direct kernel's part: conv and bias)
        if f.bn is None and f.act is None:
            steps.append(replace(s, op="depthwise", unit=conv))
            continue
        raw = f"{s.out}_raw"
        values[raw] = replace(values[s.out], name=raw)
        if f.bn is not None:  # (its epilogue leaves the per-tile sums the batch norm's statistics come from)
            sums = f"{s.out}_sums"
            values[sums] = Value(sums, ())
            steps.append(replace(s, op="depthwise", unit=conv, reads=s.reads[:1], out=raw, outs=(raw, sums)))
            steps.append(Step("batchnorm", ir.Fused("bn", (f.bn,), f.act, f.residual), (raw,) + s.reads[1:], s.out,
                              training_only=s.training_only, partials=sums))
        else:
            steps.append(replace(s, op="depthwise", unit=conv, reads=s.reads[:1], out=raw))
            steps.append(Step("activation", f.act, (raw,), s.out, training_only=s.training_only))
    return plan.with_steps(steps, values)
