"""Depthwise direct: a depthwise conv (groups == input channels == output
channels) runs the direct kernel of kernels/depthwise.py, with the same
epilogue, instead of the implicit GEMM, which pads each group's single
input channel to tl.dot's 16.  (Literal filters applied to every channel,
as the course's blur, are depthwise convs too.)"""
from __future__ import annotations

from dataclasses import replace

from .. import ir
from ..kernels.depthwise import is_depthwise
from .ir import Plan


def depthwise_direct(plan: Plan) -> Plan:
    def direct(s) -> bool:
        u = s.unit
        return s.op == "conv" and isinstance(u, ir.Fused) and u.kind == "conv" and is_depthwise(u.main.attrs)

    return plan.with_steps([replace(s, op="depthwise") if direct(s) else s for s in plan.steps])
