"""The kernel plan: the launches of a network's forward, in order, and the
tensors between them; one plan for inference and one for the training
(autograd) forward.  The compiler makes them (plan/__init__.py lists the
passes); the code generator prints them as the generated forwards, and
`netdsl plan` prints the inference plan with what each launch moves.

Tensors are named as the generated forward names them ("x", "t3").  A value
may be a channel range of another (a concatenation's buffer): a step that
writes it stores into that buffer, and nothing copies it there later."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .. import ir


@dataclass(frozen=True)
class Value:
    name: str
    shape: tuple  # one sample's: (C, H, W) or (F,)
    base: str | None = None  # the buffer this is channels c0, c0 + step, ... (C of them) of
    c0: int = 0
    nchw: bool = False  # NCHW-contiguous (the caller's input); netdsl's own 4-d tensors are channels-last
    step: int = 1  # (a shuffled concatenation's part: every step-th channel)
    sums: bool = False  # per-tile fp32 sums an epilogue left (shape: one sample's tiles × channels)


@dataclass(frozen=True)
class Gate:
    """A squeeze-and-excitation gate run as one kernel (plan/se_gate.py): its
    global average pool, then the squeeze and excite convs with their activations."""

    pool: ir.Layer
    squeeze: ir.Fused
    excite: ir.Fused

    @property
    def layers(self) -> tuple:
        return (self.pool,) + tuple(l for f in (self.squeeze, self.excite)
                                    for l in f.layers + ((f.act,) if f.act is not None else ()))


@dataclass(frozen=True)
class Step:
    """One call of the generated forward: a launch, or an allocation (buffer)."""

    op: str  # the runtime function called: conv, linear, batchnorm, activation, add, copy, pool, ..., buffer
    unit: object  # what it covers: an ir.Fused, ir.Layer, ir.Join or ir.Dense (a split: its channels layers)
    reads: tuple[str, ...]  # the input, then a residual or second operand
    out: str
    in_place: bool = False  # a buffer whose parts may be stored in it by their producers (they keep its size)
    training_only: bool = False  # feeds only outputs returned in training mode (`@aux if training`)
    prologue: tuple = ()  # what a conv does to its input as it loads it: ("gate",) multiplies by its last read
    # the training forward's (train_plan):
    defer: bool = False  # its BN apply and activation are left to its one consumer, a conv or pool, as it loads
    leave: bool = False  # a residual block's output, made by the next block's first conv as it loads (block_outputs)
    into: tuple = ()  # (buffer, first channel): a conv stores its output there; a concat copies only what is not
    outs: tuple = ()  # a fork's aliases of its read, one for each consumer, in the order they run; or an
    # output and the per-tile sums of it its epilogue left for a batch norm
    partials: str = ""  # a batch norm's: those sums of its input (in train mode), instead of a pass over it

    @property
    def layers(self) -> tuple:
        u = self.unit
        if isinstance(u, ir.Fused):
            return u.layers + ((u.act,) if u.act is not None else ())
        if isinstance(u, tuple):  # (a split's: its channels layers)
            return u
        if isinstance(u, Gate):
            return u.layers
        return (u,) if isinstance(u, ir.Layer) else ()

    @property
    def epilogue(self) -> tuple[str, ...]:
        """What a fused kernel does after its main operation, in order."""
        u = self.unit
        if not isinstance(u, ir.Fused):
            return ()
        main = u.main
        parts = ["bias"] if main.attrs.get("bias") and u.kind != "bn" else []
        if u.bn is not None and u.kind != "bn":
            parts.append("bn")
        if u.residual:
            parts.append("residual")
        if u.act is not None:
            parts.append(u.act.op)
        return tuple(parts)


@dataclass(frozen=True)
class Plan:
    net: ir.Net
    steps: tuple[Step, ...]
    values: dict = field(hash=False)  # name -> Value
    result: str
    # (dict key or None, value, training only) for a network that returns named tensors; () returns result
    outputs: tuple = ()

    def returned(self) -> tuple:
        """The values the forward returns: its outputs, else its result."""
        return tuple(v for _, v, _ in self.outputs) or (self.result,)

    def renamed(self, old: str, new: str) -> "Plan":
        """result and outputs with value old read as new (a pass that removed old)."""
        return replace(self, result=new if self.result == old else self.result,
                       outputs=tuple((k, new if v == old else v, t) for k, v, t in self.outputs))

    def value(self, name: str) -> Value:
        return self.values[name]

    def ref(self, name: str) -> str:
        """The expression the generated forward reads or writes a value by."""
        v = self.values[name]
        if v.base is None:
            return v.name
        if v.step != 1:
            return f"{self.ref(v.base)}[:, {v.c0}:{v.c0 + v.step * (v.shape[0] - 1) + 1}:{v.step}]"
        return f"{self.ref(v.base)}[:, {v.c0}:{v.c0 + v.shape[0]}]"

    def with_steps(self, steps, values=None) -> "Plan":
        return replace(self, steps=tuple(steps), values=dict(values if values is not None else self.values))

    def renumbered(self) -> "Plan":
        """The values named t1, t2, ... in the order steps make them (after passes removed some)."""
        names = {"x": "x"}
        for s in self.steps:
            for out in s.outs or (s.out,):
                if out not in names and s.op != "copy":  # (a copy's destination is read as its buffer's channels)
                    names[out] = f"t{len(names)}"
        for v in self.values:  # channel ranges no step makes (a dense layer's input)
            names.setdefault(v, f"t{len(names)}")
        values = {names[k]: replace(v, name=names[k], base=names[v.base] if v.base else None)
                  for k, v in self.values.items()}
        steps = [replace(s, reads=tuple(names[r] for r in s.reads), out=names[s.out],
                         outs=tuple(names[o] for o in s.outs), into=(names[s.into[0]], s.into[1]) if s.into else (),
                         partials=names[s.partials] if s.partials else "")
                 for s in self.steps]
        return replace(self, steps=tuple(steps), values=values, result=names[self.result],
                       outputs=tuple((k, names[v], t) for k, v, t in self.outputs))


def returned(outputs, ref, result: str) -> str:
    """The forward's return expression: result, or the outputs ((key, name,
    training) each, or ir.NetOutputs) as ref(name) writes them: one tensor, a
    tuple or a dict; `x if self.training else y` where some are training's only."""
    outputs = [(o.key, o.tensor, o.training) if isinstance(o, ir.NetOutput) else o for o in outputs]
    if not outputs:
        return result

    def expr(outs):
        if outs[0][0] is None:
            names = ", ".join(ref(n) for _, n, _ in outs)
            return names if len(outs) == 1 else f"({names})"
        return "{" + ", ".join(f"{k!r}: {ref(n)}" for k, n, _ in outs) + "}"

    always = [o for o in outputs if not o[2]]
    if len(always) == len(outputs):
        return expr(outputs)
    return f"{expr(outputs)} if self.training else {expr(always)}"
