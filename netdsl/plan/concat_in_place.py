"""Concat in place: a concatenation's part is stored in its channels of the
buffer by the kernel that makes it, instead of being written on its own and
copied there.

Applies where the buffer keeps its input's spatial size (so it can be made
before its parts), the part is made by a step that can store anywhere, and
nothing else reads the part.  A dense block's features go the same way: each
layer stores its feature beside the ones before it."""
from __future__ import annotations

from dataclasses import replace

from .. import ir
from .ir import Plan, Step, Value
from .lower import STORES_ANYWHERE, preserves_size


def concat_in_place(plan: Plan) -> Plan:
    steps, values = list(plan.steps), dict(plan.values)
    i = 0
    while i < len(steps):
        s = steps[i]
        dst = values[s.out] if s.op == "copy" else None
        made = {t.out: k for k, t in enumerate(steps)}
        buf = made.get(dst.base) if dst is not None and dst.base is not None else None
        if buf is None or not steps[buf].in_place:
            i += 1
            continue
        src = s.reads[0]
        maker = made.get(src)
        readers = [k for k, t in enumerate(steps) if src in t.reads]
        # (the buffer must exist before the part is made: a dense block's input is made before its buffer)
        if maker is None or maker < buf or steps[maker].op not in STORES_ANYWHERE or readers != [i] \
                or values[src].base is not None or steps[maker].training_only != steps[buf].training_only:
            i += 1
            continue
        # the part becomes those channels of the buffer; its maker stores there
        values[src] = replace(values[src], base=dst.base, c0=dst.c0, step=dst.step, nchw=False)
        if steps[maker].op == "buffer":  # a nested concatenation: a channel range, not a buffer of its own
            del steps[maker]
            i -= 1
        del steps[i]
    return plan.with_steps(steps, values)


def last_conv(node):
    """The fused conv whose kernel makes node's output, if one does."""
    while isinstance(node, ir.Seq) and node.items:
        node = node.items[-1]
    return node if isinstance(node, ir.Fused) and node.kind == "conv" else None


def concat_in_place_train(plan: Plan) -> Plan:
    """The training forward's: a concatenation whose parts keep its input's
    size gets its buffer before its parts, and each part a conv makes is
    stored in its channels (its concat step then copies only the others).
    A dense block's buffer is there already; each layer's last conv stores
    its feature there."""
    steps, values = list(plan.steps), dict(plan.values)
    index = {id(s.unit): k for k, s in enumerate(steps) if s.op == "conv"}

    def store(f, buf, c0):
        k = index.get(id(f)) if f is not None else None
        if k is not None:
            steps[k] = replace(steps[k], into=(buf, c0))

    for s in list(steps):
        u = s.unit
        if s.op == "concat" and isinstance(u, ir.Join) and all(preserves_size(b) for b in u.branches):
            fork = next((k for k, t in enumerate(steps) if t.op == "fork" and t.unit is u), None)
            if fork is None:  # (one branch: nothing to gain)
                continue
            buf = f"{s.out}_buffer"
            values[buf] = Value(buf, values[s.out].shape)
            steps.insert(fork + 1, Step("buffer", u, steps[fork].reads, buf, in_place=True,
                                        training_only=s.training_only))
            steps[steps.index(s)] = replace(s, into=(buf, 0))
            index = {id(t.unit): k for k, t in enumerate(steps) if t.op == "conv"}
            c0 = 0
            for b in u.branches:
                store(last_conv(b), buf, c0)
                c0 += b.out_shape[0]
        elif s.op == "buffer" and isinstance(u, ir.Dense):
            c = u.in_shape[0]
            for layer in u.steps:
                store(last_conv(layer), s.out, c)
                c += layer.out_shape[0]
    return plan.with_steps(steps, values)
