"""The fusion pass: graph IR -> graph IR with `Fused` kernels.

A table of (pattern, rewrite) rules is tried at every position of every
sequence, first match wins:

    fuse_conv_bn_act     conv [-> bn] [-> act]      one conv kernel, BN folded (eval) or
                                                    conv + stats + apply (train)
    fuse_linear_act      linear [-> act]            one GEMM kernel with bias and act
    fuse_bn_act          bn [-> act]                one apply kernel (DenseNet's pre-activation)

and after a sequence is rewritten, `fuse_residual_act` moves a residual add
(and the activation after it) into the epilogue of the body's last kernel:
conv -> bn -> add -> relu becomes one kernel in eval mode.

Every activation but hardtanh (whose bounds have no slot in the kernels'
epilogue helper) fuses.  The backward kernels differentiate an epilogue's
activation from its output, which does not determine the derivative of
silu, hardswish or gelu: `split_input_activations` gives the training
forward those as kernels of their own, which keep their input.
"""
from __future__ import annotations

import dataclasses

from . import ir
from .kernels import FROM_INPUT
from .ops import ACTIVATIONS


_FUSES = tuple(a for a in ACTIVATIONS if a != "hardtanh")


def _is(node, op) -> bool:
    return isinstance(node, ir.Layer) and node.op == op


def _act_at(items, i):
    return items[i] if i < len(items) and isinstance(items[i], ir.Layer) and items[i].op in _FUSES else None


def fuse_conv_bn_act(items, i):
    if not _is(items[i], "conv"):
        return None
    layers, j = [items[i]], i + 1
    if j < len(items) and _is(items[j], "bn") and len(items[j].in_shape or ()) == 3:
        layers.append(items[j])
        j += 1
    act = _act_at(items, j)
    return ir.Fused("conv", tuple(layers), act), j + (act is not None)


def fuse_linear_act(items, i):
    if not _is(items[i], "linear"):
        return None
    act = _act_at(items, i + 1)
    return ir.Fused("linear", (items[i],), act), i + 1 + (act is not None)


def fuse_bn_act(items, i):
    if not _is(items[i], "bn"):
        return None
    act = _act_at(items, i + 1)
    return ir.Fused("bn", (items[i],), act), i + 1 + (act is not None)


RULES = (fuse_conv_bn_act, fuse_linear_act, fuse_bn_act)


def fuse_residual_act(items, i):
    """Join(residual) whose body ends in a conv/bn kernel without activation,
    optionally followed by an activation: the add and the activation move into
    that kernel's epilogue."""
    join = items[i]
    if not (isinstance(join, ir.Join) and join.kind == "residual" and not join.fused):
        return None
    body, short = join.branches
    last = body.items[-1] if body.items else None
    if not (isinstance(last, ir.Fused) and last.kind in ("conv", "bn") and last.act is None and not last.residual):
        return None
    act = _act_at(items, i + 1)
    last = dataclasses.replace(last, residual=True, act=act)
    body = dataclasses.replace(body, items=body.items[:-1] + (last,), out_shape=last.out_shape)
    out = act.out_shape if act is not None else join.out_shape
    return dataclasses.replace(join, branches=(body, short), fused=True, out_shape=out), i + 1 + (act is not None)


def _seq(seq: ir.Seq) -> ir.Seq:
    items = [_inside(n, _seq) for n in seq.items]
    out, i = [], 0
    while i < len(items):
        for rule in RULES:
            hit = rule(items, i)
            if hit is not None:
                out.append(hit[0])
                i = hit[1]
                break
        else:
            out.append(items[i])
            i += 1
    items, out, i = out, [], 0
    while i < len(items):
        hit = fuse_residual_act(items, i)
        if hit is not None:
            out.append(hit[0])
            i = hit[1]
        else:
            out.append(items[i])
            i += 1
    return dataclasses.replace(seq, items=tuple(out))


def _inside(node, rewrite):
    """node with `rewrite` (Seq -> Seq) applied to each sequence it is or holds."""
    if isinstance(node, ir.Seq):
        return rewrite(node)
    if isinstance(node, ir.Join):
        return dataclasses.replace(node, branches=tuple(rewrite(b) for b in node.branches))
    if isinstance(node, ir.Dense):
        return dataclasses.replace(node, steps=tuple(rewrite(s) for s in node.steps))
    return node


def fuse(net: ir.Net) -> ir.Net:
    return dataclasses.replace(net, body=_seq(net.body))


def _input_act(unit) -> bool:
    return isinstance(unit, ir.Fused) and unit.act is not None and unit.act.op in FROM_INPUT


def _split_seq(seq: ir.Seq) -> ir.Seq:
    out = []
    for node in seq.items:
        node = _inside(node, _split_seq)
        if _input_act(node):
            out += [dataclasses.replace(node, act=None), node.act]
        elif isinstance(node, ir.Join) and node.fused and _input_act(node.branches[0].items[-1]):
            body, short = node.branches
            last = body.items[-1]
            body = dataclasses.replace(body, items=body.items[:-1] + (dataclasses.replace(last, act=None),))
            out += [dataclasses.replace(node, branches=(body, short)), last.act]
        else:
            out.append(node)
    return dataclasses.replace(seq, items=tuple(out))


def split_input_activations(net: ir.Net) -> ir.Net:
    """A fused graph -> the same with each fused silu, hardswish or gelu
    (kernels.FROM_INPUT) as a layer of its own after its kernel: the
    training forward's graph."""
    return dataclasses.replace(net, body=_split_seq(net.body))


def kernels_of(node):
    """Every Fused unit and unfused Layer under node, in order (for summaries)."""
    if isinstance(node, (ir.Fused, ir.Layer)):
        yield node
    for child in ir.children(node):
        yield from kernels_of(child)
