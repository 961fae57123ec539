"""`netdsl plan`'s output: a plan as a table (one line a launch) or JSON."""
from __future__ import annotations

from .. import ir
from ..codegen.layers import shape_text, where
from .cost import Figures
from .ir import Plan, Step, returned


def kernel_text(step: Step) -> str:
    """What a launch does: conv_bn_relu, conv_bn_add_relu, maxpool, copy, ..."""
    u = step.unit
    if isinstance(u, ir.Fused):
        return ("depthwise_" if step.op == "depthwise" else "") + "".join(f"{p}_" for p in step.prologue) \
            + u.describe()
    if step.op in ("copy", "add", "mul", "fork", "concat"):
        return step.op
    return u.op if isinstance(u, ir.Layer) else step.op


def covers(step: Step) -> list[tuple[str, str]]:
    """(layer, file:line) for each layer a launch covers; a join's own name and line for an add, mul or copy."""
    if step.layers:
        return [(l.name, where(l)) for l in step.layers]
    u = step.unit
    return [(u.name or step.op, where(u))]


def table(plan: Plan, fig: Figures, eager: tuple[int, int], batch: int, dtype: str, disabled=()) -> str:
    net = plan.net
    head = (f"{net.name}: inference forward (eval), batch {batch}, {dtype}, input {shape_text(net.input_shape)}"
            + (f", without {', '.join(sorted(disabled))}" if disabled else ""))
    rows = [("#", "kernel", "reads", "writes", "MB", "covers")]
    # a step that launches nothing (a flatten that is a view, an eval dropout) passes its input on: the table
    # names that input where a launch reads its output
    launched = {id(l.step) for l in fig.launches}
    alias = {s.out: s.reads[0] for s in plan.steps if id(s) not in launched and s.op != "buffer" and s.reads
             and not s.training_only}

    def source(name):
        while name in alias:
            name = alias[name]
        return name

    for i, launch in enumerate(fig.launches, 1):
        s = launch.step
        spots = covers(s)
        lines_at = list(dict.fromkeys(at for _, at in spots))
        file = lines_at[0].rsplit(":", 1)[0]
        text = (" → ".join(name for name, _ in spots) + f" ({file}:"
                + ",".join(at.rsplit(":", 1)[1] for at in lines_at if at.startswith(file + ":")) + ")")
        rows.append((str(i), kernel_text(s), ", ".join(_ref(plan, source(r)) for r in s.reads),
                     ", ".join(_ref(plan, o) for o in s.outs or (s.out,)), f"{launch.bytes / 1e6:.2f}", text))
    widths = [max(len(r[k]) for r in rows) for k in range(5)]
    lines = [head]
    for r in rows:
        lines.append("  ".join(c.rjust(w) if k in (0, 4) else c.ljust(w) for k, (c, w) in enumerate(zip(r, widths)))
                     + "  " + r[5])
    ops, eb = eager
    n, nb = len(fig.launches), fig.total_bytes
    lines.append(f"launches {n} (eager PyTorch: {ops} ops, {n / ops:.2f}×); bytes moved {nb / 1e6:.1f} MB "
                 f"(eager: {eb / 1e6:.1f} MB, {nb / eb:.2f}×)")
    if fig.folds:
        lines.append(f"after a parameter changes, the first forward also runs {fig.folds} bn_fold launches")
    return "\n".join(lines)


def _ref(plan: Plan, name: str) -> str:
    """A value, or the buffer channels it is: t3[64:96] (a nested concatenation's: of the outermost buffer)."""
    v = plan.value(name)
    if v.step != 1:  # a shuffled concatenation's part: every step-th channel (of a buffer of its own)
        return f"{v.base}[{v.c0}::{v.step}]"
    c0, root = 0, v
    while root.base is not None:
        c0 += root.c0
        root = plan.value(root.base)
    return f"{root.name}[{c0}:{c0 + v.shape[0]}]" if root is not v else v.name


def to_json(plan: Plan, fig: Figures, eager: tuple[int, int], batch: int, dtype: str, disabled=()) -> dict:
    launches = []
    for launch in fig.launches:
        s = launch.step
        launches.append({
            "kernel": kernel_text(s),
            "epilogue": list(s.epilogue),
            "covers": [{"layer": name, "at": at} for name, at in covers(s)],
            "reads": [{"value": r, "shape": [batch, *plan.value(r).shape]} for r in s.reads],
            "writes": {"value": s.out, "shape": [batch, *plan.value(s.out).shape],
                       **({"into": plan.value(s.out).base, "channel": plan.value(s.out).c0,
                           "channel_step": plan.value(s.out).step}
                          if plan.value(s.out).base is not None else {})},
            **({"tile_sums": s.outs[1]} if len(s.outs) > 1 else {}),  # (se_gate's: per-tile sums of the output)
            "bytes": launch.bytes,
        })
    ops, eb = eager
    return {"network": plan.net.name, "mode": "inference", "batch": batch, "dtype": dtype,
            "input": list(plan.net.input_shape), "disabled": sorted(disabled), "launches": launches,
            "totals": {"launches": len(fig.launches), "bytes": fig.total_bytes, "bn_folds": fig.folds},
            "eager": {"ops": ops, "bytes": eb}}


def listing(plan: Plan) -> str:
    """The plan's steps, one a line, as the pass tests state them: `t3[0:8] = conv_bn_relu(t1)  b1.conv`."""
    lines = []
    for s in plan.steps:
        kernel = "buffer" if s.op == "buffer" else kernel_text(s)
        names = " ".join(name for name, _ in covers(s))
        # (the training forward's: what is left to a consumer, where a conv stores)
        flags = [f for f in ("defer", "leave") if getattr(s, f)] + ([f"into {s.into[0]}[{s.into[1]}:]"] if s.into else []) \
            + ([f"partials {s.partials}"] if s.partials else [])
        outs = ", ".join(s.outs) if s.outs else _ref(plan, s.out)
        lines.append(f"{outs} = {kernel}({', '.join(_ref(plan, r) for r in s.reads)})  {names}"
                     + "".join(f"  ({f})" for f in flags) + ("  (training)" if s.training_only else ""))
    return "\n".join(lines + [f"return {returned(plan.outputs, lambda v: _ref(plan, v), _ref(plan, plan.result))}"])

