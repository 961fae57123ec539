"""What `netdsl check` prints: a torchinfo-like table, or JSON."""
from __future__ import annotations

import math

from . import ir
from .ops import OPS, fmt_shape

BYTES_FP32 = 4
NAMING = ("name", "read")  # a named tensor's write and read: rows of their own, no new tensor


def outputs_text(net: ir.Net) -> str:
    """`output 10` for one output; `outputs "0": 256×16×16, "pool": ...` (a dict) or `outputs 10, 10` (a tuple)."""
    shapes = net.output_shapes
    if len(shapes) == 1 and shapes[0][0] is None and not net.outputs:
        return f"output {fmt_shape(shapes[0][1])}"
    return "outputs " + ", ".join((f'"{k}": ' if k is not None else "") + fmt_shape(s)
                                  + (" (training)" if o.training else "") for (k, s), o in zip(shapes, net.outputs))


def rows(net: ir.Net):
    """(name, op, summary, out_shape, params, macs) for every layer and join, in order."""

    def visit(node):
        if isinstance(node, ir.Layer):
            spec = OPS.get(node.op)
            summary = spec.summary(node.attrs) if spec else ""
            yield node.name, node.op, summary, node.out_shape, node.params, node.macs
        for child in ir.children(node):
            yield from visit(child)
        if isinstance(node, ir.Join):  # the join's own row follows its branches
            yield node.name or "(root)", "add" if node.kind == "residual" else node.kind, "", node.out_shape, 0, 0
        elif isinstance(node, ir.Dense):
            yield node.name or "(root)", "dense", f"{len(node.steps)} layers", node.out_shape, 0, 0

    yield from visit(net.body)


def totals(net: ir.Net) -> dict:
    layers = list(ir.walk_layers(net.body))
    params = sum(l.params for l in layers)
    frozen = sum(math.prod(t.shape) for l in layers for t in l.tensors if t.kind == "frozen")
    acts = sum(math.prod(r[3]) for r in rows(net)
               if r[3] is not None and None not in r[3] and r[1] not in NAMING)
    buffers = sum(math.prod(t.shape) for l in layers for t in l.tensors if t.kind == "buffer")
    return {
        "params": params,
        "trainable": params - frozen,
        "frozen": frozen,
        "macs": sum(l.macs for l in layers),
        "activation_bytes": acts * BYTES_FP32,
        "param_bytes": (params + buffers) * BYTES_FP32,
    }


def state_keys(net: ir.Net) -> list[str]:
    """The state_dict keys the network's module has, in torch's order: the
    modules in registration order, each with its own parameters, then its
    own buffers, then its children's (so a bare parameter such as a layer
    scale comes before the layers of the module that holds it)."""

    def fresh():
        return {"params": [], "buffers": [], "children": {}}

    root = fresh()

    def module(parts):
        m = root
        for p in parts:
            m = m["children"].setdefault(p, fresh())
        return m

    for layer in ir.walk_layers(net.body):
        if layer.op in NAMING:
            continue
        module(layer.name.split("."))  # (registered, with or without tensors, in this order)
        for t in layer.tensors:
            key = t.key(layer.name)
            module(key.split(".")[:-1])["buffers" if t.kind == "buffer" else "params"].append(key)

    def keys(m):
        return m["params"] + m["buffers"] + [k for child in m["children"].values() for k in keys(child)]

    return keys(root)


def to_json(net: ir.Net) -> dict:
    t = totals(net)
    return {
        "name": net.name,
        "input": list(net.input_shape),
        "output": list(net.out_shape) if net.out_shape else None,
        "outputs": [{"key": k, "tensor": name, "shape": list(net.tensors[name]) if net.tensors.get(name) else None}
                    for k, name in ((o.key, o.tensor) for o in net.outputs)],
        "params": t["params"],
        "trainable_params": t["trainable"],
        "macs": t["macs"],
        "activation_bytes": t["activation_bytes"],
        "layers": [
            {"name": n, "op": op, "output": list(s) if s else None, "params": p, "macs": m}
            for n, op, _, s, p, m in rows(net)
        ],
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def table(net: ir.Net) -> str:
    head = ("Layer", "Op", "Output", "Params", "MACs")
    body = [(n, f"{op} {summ}".strip(), fmt_shape(s), f"{p:,}" if p else "-", f"{m:,}" if m else "-")
            for n, op, summ, s, p, m in rows(net)]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(5)]
    right = (False, False, False, True, True)

    def line(r):
        return "  ".join(c.rjust(w) if rj else c.ljust(w) for c, w, rj in zip(r, widths, right)).rstrip()

    rule = "─" * len(line(head))
    t = totals(net)
    out = [f"{net.name}  (input {fmt_shape(net.input_shape)}, {outputs_text(net)})", rule, line(head), rule]
    out += [line(r) for r in body]
    out += [rule,
            f"Total params: {t['params']:,}" + (f"  (trainable {t['trainable']:,}, frozen {t['frozen']:,})" if t["frozen"] else ""),
            f"Total MACs: {t['macs']:,}  (batch 1)",
            f"Activations: {_mb(t['activation_bytes'])}  Params + buffers: {_mb(t['param_bytes'])}  (fp32, batch 1)",
            ""]
    return "\n".join(out)
