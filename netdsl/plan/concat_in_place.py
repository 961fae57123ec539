"""Concat in place: a concatenation's part is stored in its channels of the
buffer by the kernel that makes it, instead of being written on its own and
copied there.

Applies where the buffer keeps its input's spatial size (so it can be made
before its parts), the part is made by a step that can store anywhere, and
nothing else reads the part.  A dense block's features go the same way: each
layer stores its feature beside the ones before it."""
from __future__ import annotations

from dataclasses import replace

from .ir import Plan
from .lower import STORES_ANYWHERE


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
