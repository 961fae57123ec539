"""Shuffle in concat: a channel shuffle in g groups of a concatenation of g
equal parts (ShuffleNet's units) costs no launch.  Part i's channel j is the
shuffle's output channel j·g + i, so each part is stored (or copied) into
every g-th channel of the buffer from channel i on, and the buffer is the
shuffle's output.

Applies where the buffer is a concatenation's own (not a channel range of
another), its only reader is the shuffle, and its parts are exactly g
copies of equal width.  It runs before concat_in_place, which then lets
each part's producer store into its strided channels."""
from __future__ import annotations

from dataclasses import replace

from .ir import Plan


def shuffle_in_concat(plan: Plan) -> Plan:
    steps, values, renames = list(plan.steps), dict(plan.values), []
    for s in [t for t in steps if t.op == "channel_shuffle"]:
        src, g = s.reads[0], s.unit.attrs["groups"]
        buf = values[src]
        maker = next((t for t in steps if t.out == src), None)
        parts = [v for v in values.values() if v.base == src]
        width = buf.shape[0] // g
        copies = {t.out for t in steps if t.op == "copy"}
        if (maker is None or maker.op != "buffer" or buf.base is not None
                or sorted(v.c0 for v in parts) != [i * width for i in range(g)]
                or any(v.shape[0] != width or v.name not in copies or v.step != 1 for v in parts)
                or any(v.base in {p.name for p in parts} for v in values.values())
                or [t for t in steps if src in t.reads] != [s] or src in plan.returned()):
            continue
        for v in parts:
            values[v.name] = replace(v, c0=v.c0 // width, step=g)
        steps.remove(s)
        steps = [replace(t, reads=tuple(src if r == s.out else r for r in t.reads)) for t in steps]
        for name, v in values.items():
            if v.base == s.out:  # (a channel range of the shuffled tensor: of the buffer now)
                values[name] = replace(v, base=src)
        del values[s.out]
        renames.append((s.out, src))
    plan = plan.with_steps(steps, values)
    for old, new in renames:
        plan = plan.renamed(old, new)
    return plan
