"""Shape inference and counting: graph IR -> graph IR with shapes.

Fills every node's input and output shape (batch dimension left out), resolves
the attributes that depend on the input (a conv's in_channels, a linear's
in_features, a batch norm's features), and counts each layer's tensors,
parameters and multiply-accumulates.  Errors go to `diags`; a dimension an
error made unknown is None, and checks on unknown dimensions are skipped so
one mistake is reported once.
"""
from __future__ import annotations

import dataclasses
import math

from . import ir
from .diagnostics import Diagnostics
from .elaborate import _notes
from .ops import OPS, TensorSize, fmt_shape


def infer_shapes(net: ir.Net, diags: Diagnostics) -> ir.Net:
    named: dict = {}  # each named tensor's shape (`as @name`), filled in execution order
    body = _seq(net.body, net.input_shape, diags, named)
    return dataclasses.replace(net, body=body, tensors=named)


def _seq(seq: ir.Seq, shape, diags, named) -> ir.Seq:
    items, s = [], shape
    for node in seq.items:
        node = _node(node, s, diags, named)
        items.append(node)
        s = node.out_shape
    return ir.Seq(tuple(items), shape, s)


def _node(node, shape, diags, named):
    if isinstance(node, ir.Layer):
        return _layer(node, shape, diags, named)
    if isinstance(node, ir.Seq):
        return _seq(node, shape, diags, named)
    if isinstance(node, ir.Join):
        return _join(node, shape, diags, named)
    if isinstance(node, ir.Dense):
        return _dense(node, shape, diags, named)
    raise AssertionError(node)


# Ops that take C×H×W: after an error upstream they are still checked on an
# input of unknown sizes, so problems of their own (e.g. groups) are reported.
_SPATIAL = {"conv", "conv_transpose", "maxpool", "avgpool", "adaptive_avgpool", "global_avgpool", "upsample", "lrn"}


def _layer(layer: ir.Layer, shape, diags, named) -> ir.Layer:
    if layer.op == "name":  # (named even when unknown, so that its readers report nothing more)
        named[layer.attrs["tensor"]] = shape
        return dataclasses.replace(layer, in_shape=shape, out_shape=shape)
    if layer.op == "read":
        return dataclasses.replace(layer, in_shape=shape, out_shape=named.get(layer.attrs["tensor"]))
    if layer.op == "unknown" or (shape is None and layer.op not in _SPATIAL):
        return dataclasses.replace(layer, in_shape=shape, out_shape=None)
    spec = OPS[layer.op]
    shape = shape if shape is not None else (None, None, None)
    if isinstance(layer.attrs.get("size"), TensorSize):  # upsample(size=@name): that tensor's height and width
        target = named.get(layer.attrs["size"].name)
        layer = dataclasses.replace(layer, attrs=dict(layer.attrs, size=None, like=layer.attrs["size"].name,
                                                      like_size=None if target is None else tuple(target[1:3])))

    def err(msg):
        diags.error(layer.pos, msg, _notes(layer.trace))

    out, attrs = spec.infer(layer.attrs, shape, err)
    tensors = spec.tensors(attrs, shape, out)
    params = sum(math.prod(t.shape) for t in tensors if t.kind != "buffer")
    return dataclasses.replace(layer, attrs=attrs, in_shape=shape, out_shape=out, tensors=tensors,
                               params=params, macs=spec.macs(attrs, shape, out))


def _agree(a, b) -> bool:
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _join(join: ir.Join, shape, diags, named) -> ir.Join:
    branches = tuple(_seq(b, shape, diags, named) for b in join.branches)
    outs = [b.out_shape for b in branches]
    notes = _notes(join.trace)
    out = None
    if any(o is None for o in outs):
        out = None
    elif join.kind in ("add", "residual"):
        out = outs[0]
        for i, o in enumerate(outs[1:], 1):
            if not _agree(out, o):
                if join.kind == "residual":
                    what = "the shortcut" if branches[1].items else "the identity shortcut"
                    diags.error(join.pos, f"residual add of unequal shapes: the body gives {fmt_shape(out)} "
                                          f"but {what} gives {fmt_shape(o)}", notes)
                else:
                    diags.error(join.pos, f"add of unequal shapes: branch 1 gives {fmt_shape(out)} "
                                          f"but branch {i + 1} gives {fmt_shape(o)}", notes)
                out = None
                break
    elif join.kind == "mul":
        out = _broadcast(outs, join.pos, notes, diags)
    else:
        out = _concat(outs, join.pos, notes, diags, "branch")
    return dataclasses.replace(join, branches=branches, in_shape=shape, out_shape=out)


def _broadcast(shapes, pos, notes, diags):
    """torch's broadcasting for branches of one rank: each dimension equal, or 1 in all but one branch."""
    out = list(shapes[0])
    for i, s in enumerate(shapes[1:], 1):
        if len(s) != len(out) or not all(a is None or b is None or a == b or 1 in (a, b) for a, b in zip(out, s)):
            diags.error(pos, f"mul of shapes that do not broadcast: branch 1 gives {fmt_shape(shapes[0])} "
                             f"but branch {i + 1} gives {fmt_shape(s)}", notes)
            return None
        out = [None if a is None or b is None else max(a, b) for a, b in zip(out, s)]
    return tuple(out)


def _concat(shapes, pos, notes, diags, what):
    for i, s in enumerate(shapes):
        if len(s) != 3:
            diags.error(pos, f"concat needs C×H×W tensors but {what} {i + 1} gives {fmt_shape(s)}", notes)
            return None
    for i, s in enumerate(shapes[1:], 1):
        if not _agree(shapes[0][1:], s[1:]):
            diags.error(pos, f"concat of unequal spatial sizes: {what} 1 gives {fmt_shape(shapes[0])} "
                             f"but {what} {i + 1} gives {fmt_shape(s)}", notes)
            return None
    chans = [s[0] for s in shapes]
    c = None if None in chans else sum(chans)
    h = next((s[1] for s in shapes if s[1] is not None), None)
    w = next((s[2] for s in shapes if s[2] is not None), None)
    return (c, h, w)


def _dense(dense: ir.Dense, shape, diags, named) -> ir.Dense:
    feats = [shape]
    steps = []
    notes = _notes(dense.trace)
    for step in dense.steps:
        cur = _concat(feats, dense.pos, notes, diags, "input") if all(f is not None for f in feats) else None
        step = _seq(step, cur, diags, named)
        steps.append(step)
        feats.append(step.out_shape)
    out = _concat(feats, dense.pos, notes, diags, "output") if all(f is not None for f in feats) else None
    return dataclasses.replace(dense, steps=tuple(steps), in_shape=shape, out_shape=out)
