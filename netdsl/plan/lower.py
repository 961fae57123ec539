"""Lowering: a fused graph -> a plan with one step per kernel, in the order
the forward runs them.  A concatenation (and a dense block) is lowered the
plain way: its branches make tensors of their own, which copies then put
into the buffer; concat_in_place.py removes the copies it can."""
from __future__ import annotations

from .. import ir
from ..diagnostics import Diagnostic, NetdslError
from ..ops import ACTIVATIONS
from .ir import Plan, Step, Value

# ops that can be told where to store their output (the generated call's out=)
STORES_ANYWHERE = frozenset({"conv", "linear", "batchnorm", "activation", "add", "mul", "copy", "pool", "adaptive_avgpool",
                             "upsample", "lrn", "softmax", "conv_transpose", "dropout", "buffer", "layernorm",
                             "layer_scale", "channel_shuffle", "groupnorm",
                             "depthwise"})

_LAYER_OPS = {**{act: "activation" for act in ACTIVATIONS}, "maxpool": "pool", "avgpool": "pool", "adaptive_avgpool": "adaptive_avgpool",
              "global_avgpool": "adaptive_avgpool", "upsample": "upsample", "flatten": "flatten",
              "dropout": "dropout", "stochastic_depth": "dropout", "lrn": "lrn", "softmax": "softmax", "conv_transpose": "conv_transpose",
              "layernorm": "layernorm", "layer_scale": "layer_scale", "channel_shuffle": "channel_shuffle",
              "groupnorm": "groupnorm"}


def preserves_size(node) -> bool:
    """True when node's output has its input's spatial size for every input size."""
    if isinstance(node, ir.Layer):
        a = node.attrs
        if node.op in ("conv", "maxpool", "avgpool"):
            kh, kw = a["kernel_size"]
            d = a.get("dilation", (1, 1))
            return a["stride"] == (1, 1) and all(2 * p == dd * (k - 1) for p, k, dd in zip(a["padding"], (kh, kw), d))
        return node.op not in ("conv_transpose", "upsample", "adaptive_avgpool", "global_avgpool", "flatten", "linear",
                               "read")  # (a named tensor may have any size)
    if isinstance(node, ir.Fused):
        return all(preserves_size(l) for l in node.layers)
    if isinstance(node, ir.Join) and node.kind == "mul":  # the others broadcast to that branch's size
        return any(preserves_size(b) for b in node.branches)
    return all(preserves_size(child) for child in ir.children(node))


class _Lower:
    def __init__(self, net: ir.Net):
        self.steps: list[Step] = []
        self.values = {"x": Value("x", tuple(net.input_shape), nchw=True)}
        self.count = 0
        self.residual: list[str] = []
        self.named: dict[str, str] = {}  # named tensor -> its value
        self.training = False  # the steps being made feed only training's outputs

    def new(self, shape, nchw=False, base=None, c0=0) -> str:
        self.count += 1
        v = Value(f"t{self.count}", tuple(shape), base, c0, nchw)
        self.values[v.name] = v
        return v.name

    def slice(self, buf: str, c0: int, shape) -> str:
        return self.new(shape, base=buf, c0=c0)

    def put(self, op, unit, reads, shape, nchw=False, in_place=False) -> str:
        out = self.new(shape, nchw)
        self.steps.append(Step(op, unit, tuple(reads), out, in_place, self.training))
        return out

    def emit(self, node, x: str) -> str:
        """Steps computing node(x); the value they leave.  (The training lowering,
        lower_train.py, shares this walk and has its own layer, join, concat and dense.)"""
        if isinstance(node, ir.Seq):
            for item in node.items:
                x = self.emit(item, x)
            return x
        if isinstance(node, ir.Fused):
            op = {"conv": "conv", "linear": "linear", "bn": "batchnorm"}[node.kind]
            reads = (x, self.residual[-1]) if node.residual else (x,)
            return self.put(op, node, reads, node.out_shape)
        if isinstance(node, ir.Layer):
            return self.layer(node, x)
        if isinstance(node, ir.Join):
            return self.join(node, x)
        if isinstance(node, ir.Dense):
            return self.dense(node, x)
        raise AssertionError(type(node).__name__)

    def layer(self, node: ir.Layer, x: str) -> str:
        if node.op == "identity":
            return x
        if node.op == "name":
            self.named[node.attrs["tensor"]] = x
            return x
        if node.op == "read":
            return self.named[node.attrs["tensor"]]
        if node.op == "upsample" and node.attrs.get("like"):  # (reads the named tensor's size)
            return self.put("upsample", node, (x, self.named[node.attrs["like"]]), node.out_shape)
        if node.op == "channels":  # a view of x's channels: no launch, its readers address it by strides
            return self.new(node.out_shape, base=x, c0=node.attrs["start"])
        op = _LAYER_OPS.get(node.op)
        if op is None:
            raise AssertionError(f"unfused {node.op}")
        # elementwise ops keep their input's layout
        keeps = self.values[x].nchw and op in ("activation", "dropout", "softmax", "layernorm", "groupnorm",
                                               "layer_scale", "channel_shuffle")
        return self.put(op, node, (x,), node.out_shape, nchw=keeps or op == "flatten")

    def join(self, j: ir.Join, x: str) -> str:
        if j.kind == "concat":
            return self.concat(j, x)
        if j.fused:  # the add happens in the epilogue of the body's last kernel
            body, short = j.branches
            self.residual.append(self.emit(short, x) if short.items else x)
            v = self.emit(body, x)
            self.residual.pop()
            return v
        outs = [self.emit(b, x) for b in j.branches]
        op = "mul" if j.kind == "mul" else "add"
        v = outs[0]
        for extra in outs[1:]:  # (a product takes the layout of its full-size factor)
            big = v if self.values[v].shape == j.out_shape or op == "add" else extra
            v = self.put(op, j, (v, extra), j.out_shape, nchw=self.values[big].nchw)
        return v

    def concat(self, j: ir.Join, x: str) -> str:
        same = all(preserves_size(b) for b in j.branches)
        buf = self.put("buffer", j, (x,), j.out_shape, in_place=True) if same else None
        outs = [self.emit(b, x) for b in j.branches]
        if buf is None:  # its size is known once a branch has run
            buf = self.put("buffer", j, (outs[0],), j.out_shape)
        c0 = 0
        for b, o in zip(j.branches, outs):
            self.copy(j, o, self.slice(buf, c0, b.out_shape))
            c0 += b.out_shape[0]
        return buf

    def dense(self, d: ir.Dense, x: str) -> str:
        if not all(preserves_size(s) for s in d.steps):
            raise NetdslError([Diagnostic(d.pos, "a dense block's layers must keep the spatial size")])
        buf = self.put("buffer", d, (x,), d.out_shape, in_place=True)
        c = d.in_shape[0]
        self.copy(d, x, self.slice(buf, 0, d.in_shape))
        for step in d.steps:
            feature = self.emit(step, self.slice(buf, 0, (c,) + tuple(d.in_shape[1:])))
            g = step.out_shape[0]
            self.copy(d, feature, self.slice(buf, c, step.out_shape))
            c += g
        return buf

    def copy(self, unit, src: str, dst: str):
        self.steps.append(Step("copy", unit, (src,), dst, training_only=self.training))


def training_only(items, outputs) -> frozenset:
    """The indices of a network body's items that feed only its outputs
    returned in training mode (`return @x, @aux if training`): its forward
    runs them under `if self.training`."""
    if not any(o.training for o in outputs):
        return frozenset()

    def needed(tensors) -> set:
        need, keep, flow = set(tensors), set(), False  # flow: the item after needs this one's output
        for i in reversed(range(len(items))):
            layers = list(ir.walk_layers(items[i]))
            if flow or any(l.op == "name" and l.attrs["tensor"] in need for l in layers):
                keep.add(i)
                need |= {l.attrs["tensor"] for l in layers if l.op == "read"}
                need |= {l.attrs["like"] for l in layers if l.op == "upsample" and l.attrs.get("like")}
                flow = not (isinstance(items[i], ir.Layer) and items[i].op == "read")
            else:
                flow = False
        return keep

    return frozenset(needed(o.tensor for o in outputs) - needed(o.tensor for o in outputs if not o.training))


def lower(net: ir.Net) -> Plan:
    """The fused graph of net -> its inference plan, one step per kernel."""
    lo = _Lower(net)
    only, result = training_only(net.body.items, net.outputs), "x"
    for i, item in enumerate(net.body.items):
        lo.training = i in only
        result = lo.emit(item, result)
    outputs = tuple((o.key, lo.named[o.tensor], o.training) for o in net.outputs)
    return Plan(net, tuple(lo.steps), lo.values, result, outputs)
