"""Lowering for training: a fused graph -> the plan of its training
(autograd) forward, one step per autograd Function, in the order they run.

It differs from the inference lowering (lower.py) where autograd needs it:
- every step makes a fresh tensor; a concatenation is one step (its parts
  copied into its buffer) and its backward hands each part a channel slice;
- a tensor with several consumers goes through a fork step, one alias a
  consumer, whose backward sums their gradients with the add kernel;
- a dense block keeps one buffer, whose first channels each layer's
  concatenation is.
Convs store where they are told (concat_in_place_train) and leave their BN
and activation to a consumer (deferred_bn, block_outputs) only once a pass
says so."""
from __future__ import annotations

from .. import ir
from .ir import Plan, Step, Value
from .lower import _LAYER_OPS, _Lower, training_only


def uses(net: ir.Net) -> dict:
    """How many times each named tensor is read or returned (its aliases)."""
    count: dict[str, int] = {}
    for layer in ir.walk_layers(net.body):
        if layer.op == "read":
            count[layer.attrs["tensor"]] = count.get(layer.attrs["tensor"], 0) + 1
    for o in net.outputs:
        count[o.tensor] = count.get(o.tensor, 0) + 1
    return count


class _LowerTrain(_Lower):
    """The inference lowering's walk (emit) with the training forward's steps."""

    def __init__(self, net: ir.Net):
        self.steps: list[Step] = []
        self.values = {"x": Value("x", tuple(net.input_shape), nchw=True)}
        self.count = 0
        self.residual: list[str] = []  # shortcut values awaiting a fused epilogue
        self.uses = uses(net)
        self.named: dict[str, list] = {}  # named tensor -> the aliases its readers take, last first
        self.made: dict[str, str] = {}  # named tensor -> the value that holds it (for its size)
        self.training = False  # the steps being made feed only training's outputs

    def new(self, shape) -> str:
        self.count += 1
        v = Value(f"t{self.count}", tuple(shape))
        self.values[v.name] = v
        return v.name

    def put(self, op, unit, reads, shape, **kw) -> str:
        out = self.new(shape)
        self.steps.append(Step(op, unit, tuple(reads), out, training_only=self.training, **kw))
        return out

    def fork(self, unit, x: str, n: int) -> list[str]:
        """n aliases of x, one a consumer, last first (consumers pop them)."""
        if n == 1:
            return [x]
        names = tuple(self.new(self.values[x].shape) for _ in range(n))
        self.steps.append(Step("fork", unit, (x,), names[0], training_only=self.training, outs=names))
        return list(names[::-1])

    def layer(self, l: ir.Layer, x: str) -> str:
        if l.op == "identity":
            return x
        if l.op == "name":  # one alias for the chain going on, one for each read and output
            name = l.attrs["tensor"]
            self.made[name] = x
            self.named[name] = self.fork(l, x, 1 + self.uses.get(name, 0))
            return self.named[name].pop()
        if l.op == "read":
            return self.named[l.attrs["tensor"]].pop()
        reads = (x, self.made[l.attrs["like"]]) if l.op == "upsample" and l.attrs.get("like") else (x,)
        return self.put(_LAYER_OPS.get(l.op, l.op), l, reads, l.out_shape)

    def join(self, j: ir.Join, x: str) -> str:
        if j.kind == "concat":
            return self.concat(j, x)
        xs = self.fork(j, x, len(j.branches))  # (branch i takes xs[i])
        if j.fused:  # the add happens in the epilogue of the body's last kernel
            body, short = j.branches
            self.residual.append(self.emit(short, xs[1]))
            v = self.emit(body, xs[0])
            self.residual.pop()
            return v
        outs = [self.emit(b, xi) for b, xi in zip(j.branches, xs)]
        op = "mul" if j.kind == "mul" else "add"
        v = outs[0]
        for extra in outs[1:]:
            v = self.put(op, j, (v, extra), j.out_shape)
        return v

    def concat(self, j: ir.Join, x: str) -> str:
        xs = self.fork(j, x, len(j.branches))
        outs = [self.emit(b, xi) for b, xi in zip(j.branches, xs)]
        return self.put("concat", j, outs, j.out_shape)

    def dense(self, d: ir.Dense, x: str) -> str:
        """Each layer reads the concatenation of all earlier features, as
        torchvision's: those are the first channels of one buffer, and each
        concatenation copies only the features not in it yet."""
        buf = self.put("buffer", d, (x,), d.out_shape, in_place=True)
        L = len(d.steps)
        aliases = [self.fork(d, x, L + 1)]  # feature j feeds the layers j..L-1 and the last concatenation
        c = d.in_shape[0]
        for k, step in enumerate(d.steps):
            # (the first layer's input goes through the buffer too: its BN's statistics are kept there)
            inp = self.put("concat", d, tuple(a.pop() for a in aliases), (c,) + tuple(d.in_shape[1:]), into=(buf, 0))
            aliases.append(self.fork(d, self.emit(step, inp), L - k))
            c += step.out_shape[0]
        return self.put("concat", d, tuple(a.pop() for a in aliases), d.out_shape, into=(buf, 0))


def lower_train(net: ir.Net) -> Plan:
    """The fused graph of net (its input activations split off:
    fusion.split_input_activations) -> its training forward's plan."""
    lo = _LowerTrain(net)
    only, result = training_only(net.body.items, net.outputs), "x"
    for i, item in enumerate(net.body.items):
        lo.training = i in only
        result = lo.emit(item, result)
    outputs = tuple((o.key, lo.named[o.tensor].pop(), o.training) for o in net.outputs)
    return Plan(net, tuple(lo.steps), lo.values, result, outputs)
