"""Split channels (training forward): a tensor whose only consumers take
channel ranges of it (ShuffleNet's halves), through a fork, becomes one
split step.  Its backward writes each range's gradient into its channels of
one tensor; forked, each range's backward would write a whole-size
gradient, zeros outside its channels, and the fork would add them up."""
from __future__ import annotations

from dataclasses import replace

from .ir import Plan


def _ranges(fork, steps) -> list | None:
    """The channels steps reading fork's aliases, one each, in channel order, or None."""
    readers = []
    for alias in fork.outs:
        rs = [s for s in steps if alias in s.reads]
        if len(rs) != 1 or rs[0].op != "channels" or rs[0].training_only != fork.training_only:
            return None
        readers.append(rs[0])
    readers.sort(key=lambda s: s.unit.attrs["start"])
    spans = [(s.unit.attrs["start"], s.unit.attrs["stop"]) for s in readers]
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):  # (overlapping ranges: their gradients add up)
        return None
    return readers


def split_channels(plan: Plan) -> Plan:
    steps = list(plan.steps)
    for fork in [s for s in steps if s.op == "fork"]:
        readers = _ranges(fork, steps)
        if readers is None:
            continue
        for r in readers:
            steps.remove(r)
        # (its unit: the channels layers, one an output)
        split = replace(fork, op="split", unit=tuple(r.unit for r in readers), out=readers[0].out,
                        outs=tuple(r.out for r in readers))
        steps[steps.index(fork)] = split
    return plan.with_steps(steps)
