"""The Triton target: one standalone file with the kernels (templates filled
with what the spec fixes), and one nn.Module per network whose forward is a
straight line of kernel launches through netdsl's runtime."""
from __future__ import annotations

from .. import ir
from ..diagnostics import Diagnostic, NetdslError
from ..kernels import conv as kconv
from ..kernels import depthwise as kdw
from ..kernels import elementwise as kew
from ..kernels import gate as kgate
from ..kernels import groupnorm as kgn
from ..kernels import layernorm as kln
from ..kernels import norm as knorm
from ..kernels import pool as kpool
from ..kernels import ACTIVATION, ACTIVATION_GRAD, ACTIVATION_GRAD_INPUT, render
from ..ops import ACTIVATIONS, act_kernel_args
from ..plan import inference_plan, train_plan
from ..plan.ir import returned
from .layers import check_class_name, class_lines, where

GENERIC = {  # kernels with nothing spec-specific; one copy per file
    "bn_stats": knorm.BN_STATS,
    "bn_fold": knorm.BN_FOLD,
    "channel_affine": knorm.CHANNEL_AFFINE,
    "elementwise": kew.ELEMENTWISE,
    "mul_grad": kew.MUL_GRAD,
    "adaptive_avgpool": kpool.ADAPTIVE_AVGPOOL2D,
    "softmax": knorm.SOFTMAX,
    "channel_grad": knorm.CHANNEL_GRAD,
    "channel_grad_apply": knorm.CHANNEL_GRAD_APPLY,
    "adaptive_avgpool_backward": kpool.ADAPTIVE_AVGPOOL2D_BACKWARD,
    "softmax_backward": knorm.SOFTMAX_BACKWARD,
    "layernorm": kln.LAYERNORM,
    "layernorm_backward": kln.LAYERNORM_BACKWARD,
    "layernorm_param_grad": kln.LAYERNORM_PARAM_GRAD,
    "groupnorm": kgn.GROUPNORM,
    "groupnorm_backward": kgn.GROUPNORM_BACKWARD,
    "depthwise_wgrad_sum": kdw.DEPTHWISE_WGRAD_SUM,
    "se_gate": kgate.SE_GATE,
    "bn_sync_finish": knorm.BN_SYNC_FINISH,
    "bn_grad_sync_finish": knorm.BN_GRAD_SYNC_FINISH,
}

# The backward kernels of a spec-specific forward template: (name prefix,
# template), instantiated with the forward kernel's own constants.
BACKWARD = {
    kconv.CONV2D: (("backward", "conv_backward", kconv.CONV2D_BACKWARD),),
    kconv.CONV_TRANSPOSE2D: (("dgrad", "conv_transpose_dgrad", kconv.CONV2D),
                             ("wgrad", "conv_transpose_wgrad", kconv.CONV2D_WGRAD)),
    kpool.POOL2D: (("backward", "pool_backward", kpool.POOL2D_BACKWARD),),
    kpool.UPSAMPLE2D: (("backward", "upsample_backward", kpool.UPSAMPLE2D_BACKWARD),),
    knorm.LRN: (("backward", "lrn_backward", knorm.LRN_BACKWARD),),
    kdw.DEPTHWISE2D: (("dgrad", "depthwise_dgrad", kdw.DEPTHWISE2D_DGRAD),
                      ("wgrad", "depthwise_wgrad", kdw.DEPTHWISE2D_WGRAD)),
}

# The @triton.jit helpers the kernels call, by these names: (template, name, doc).
HELPERS = (
    (ACTIVATION, "activation", "the epilogue activation: 0 none, 1 relu, 2 leaky relu, 3 sigmoid, 4 tanh, 5 relu6, "
                              "6 hardsigmoid, 7 silu, 8 hardswish, 9 gelu, 10 gelu (tanh)"),
    (ACTIVATION_GRAD, "activation_grad", "its derivative, from the saved output: dy · act'(y)"),
    (ACTIVATION_GRAD_INPUT, "activation_grad_input",
     "the derivative of silu, hardswish, gelu and hardtanh (11), from the saved input: dy · act'(x)"),
    (kconv.CHANNEL_VECTOR, "channel_vector",
     "a per-channel vector for a tile's channels, broadcast along its rows or columns"),
    (kconv.BN_ACT_PROLOGUE, "bn_act_prologue", "a deferred batch norm + activation, applied as a conv loads its input"),
    (kconv.BN_ACT_GRAD, "bn_act_grad",
     "backward of a deferred batch norm + activation: g = dy·act'(y) and x̂, y recomputed"),
    (kconv.BN_GRAD_PROLOGUE, "bn_grad_prologue",
     "and its input gradient A·g + B + C·x̂, applied as a conv's dgrad or wgrad loads dy"),
    (kconv.CONV_TRANSPOSE_TILE, "conv_transpose_tile",
     "one tile of a transposed conv, or of a conv's input gradient (a conv's dgrad), with BN backwards along"),
    (kconv.CONV_WGRAD_TILE, "conv_wgrad_tile", "one tile of a conv's weight gradient"),
    (knorm.BN_MERGE, "bn_merge",
     "batch-norm statistics from per-tile partial sums (bn_stats, or a conv's merging programs)"),
    (knorm.BN_FINISH, "bn_finish",
     "batch-norm mean, rstd, scale/shift from the batch statistics, and the running-stat update"),
    (knorm.BN_KEEP, "bn_keep", "a synchronised batch norm's count, mean and variance over this process's batch"),
    (knorm.CHANNEL_SUMS, "channel_sums", "per-channel sums of two buffers of per-tile partials"),
    (kconv.MERGE_SLOTS, "merge_slots", "a merging kernel's place in its two-level tree: its group and counters"),
    (kconv.MERGE_COLUMN, "merge_column", "a merging kernel's two-level tree over its column of tiles' partials"),
    (kconv.LAST_TO_ARRIVE, "last_to_arrive", "true in the last program to arrive at a counter (a grid-wide merge)"),
    (knorm.STORE_SIGN_BITS, "store_sign_bits", "act(...) > 0 as bits, 8 channels a byte: a relu' mask for a dgrad"),
    (kdw.PIXEL_TILE, "pixel_tile", "a [pixels, channels] tile of an N×H×W grid: its indices and masks"),
    (knorm.BN_GRAD_FINISH, "bn_grad_finish",
     "batch-norm backward: parameter gradients and the input gradient's coefficients, from the batch sums"),
)

_GENERIC_DOC = {
    "bn_stats": "batch-norm training statistics: per-channel mean, scale/shift and the running-stat update",
    "bn_fold": "batch-norm eval scale/shift from the running statistics, ready to fold into a conv",
    "channel_affine": "y = act(x·scale[c] + shift[c] + residual): batch norm apply",
    "elementwise": "activations, unfused adds, products (with broadcasting), dropout, copies",
    "mul_grad": "backward of a broadcast product: dy · other summed over the broadcast dimensions",
    "adaptive_avgpool": "adaptive / global average pooling",
    "softmax": "softmax over channels",
    "channel_grad": "backward: per-channel sums of dy·act'(y) (batch-norm and bias gradients)",
    "channel_grad_apply": "backward: dx of batch norm (and activation), and the residual's gradient",
    "adaptive_avgpool_backward": "backward of adaptive / global average pooling",
    "softmax_backward": "backward of softmax over channels",
    "layernorm": "layer norm over each pixel's channels",
    "layernorm_backward": "backward of layer norm: dx, and per-program partial sums for dγ and dβ",
    "layernorm_param_grad": "backward of layer and group norm: dγ and dβ from the partial sums",
    "groupnorm": "group norm: one program per sample and group",
    "groupnorm_backward": "backward of group norm: dx, and each sample's per-channel sums for dγ and dβ",
    "depthwise_wgrad_sum": "backward of a depthwise conv: its weight and bias gradients from per-program partials",
    "se_gate": "a squeeze-and-excitation gate: global average pool, squeeze and excite 1×1 convs, one program a sample",
    "bn_sync_finish": "a batch norm synchronised over processes: the global batch's statistics from each process's",
    "bn_grad_sync_finish": "its backward: the input gradient's coefficients from the sums all-reduced over processes",
}


def mangle(name: str) -> str:
    return name.replace(".", "_").replace("-", "_") or "root"


class _Kernels:
    """Distinct specialized kernels, named after their first user."""

    def __init__(self):
        self.by_key: dict = {}
        self.order: list = []

    def get(self, template: str, what: str, user, label: str, **consts) -> str:
        key = (template, tuple(sorted(consts.items())))
        entry = self.by_key.get(key)
        if entry is None:
            label = mangle(label)
            entry = {"name": f"{what}__{label}", "template": template, "consts": consts,
                     "users": [], "title": _title(what, consts),
                     "backward": [(role, f"{prefix}__{label}", tmpl) for role, prefix, tmpl in BACKWARD.get(template, ())]}
            self.by_key[key] = entry
            self.order.append(entry)
        entry["users"].append(user)
        return entry["name"]

    def source(self) -> list[str]:
        out = []
        for e in self.order:
            users = e["users"]
            shown = [f"  {u}" for u in users[:8]] + ([f"  ... and {len(users) - 8} more"] if len(users) > 8 else [])
            header = "\n".join([e["title"], "used by:"] + shown)
            out.append(render(e["template"], e["name"], header, **e["consts"]))
            for role, name, template in e["backward"]:
                header = ("backward" if role == "backward" else f"backward ({role})") + f" of {e['name']}"
                if template is kconv.CONV2D_BACKWARD:
                    header += ": its weight gradient's programs, then its input gradient's, in one grid"
                out.append(render(template, name, header, **e["consts"]))
        return out

    def attachments(self) -> list[str]:
        """Lines handing each forward kernel its backward kernels."""
        lines = []
        for e in self.order:
            if e["backward"]:
                roles = ", ".join(f"{role}={name}" for role, name, _ in e["backward"])
                lines.append(f"rt.attach_backward({e['name']}, {roles})")
        return lines


def _title(what, c) -> str:
    if "KH" in c:
        return (f"{what}: {c['KH']}×{c['KW']} window, stride {c['SH']}×{c['SW']}, padding {c['PH']}×{c['PW']}, "
                f"dilation {c['DH']}×{c['DW']}" + (f", groups {c['GROUPS']}" if "GROUPS" in c else ""))
    return what


def _conv_consts(a):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = a["kernel_size"], a["stride"], a["padding"], a["dilation"]
    return dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, GROUPS=a["groups"])


def _conv_module(layer: ir.Layer) -> str:
    """The generated code's expression for a conv's module (a per-pixel linear's, seen as a 1×1 conv)."""
    return f"self.layer({layer.name!r})" + (".as_conv()" if layer.attrs.get("pixel_linear") else "")


def _chain_text(f: ir.Fused) -> str:
    names = [l.name for l in f.layers] + (["(+ shortcut)"] if f.residual else []) + ([f.act.name] if f.act else [])
    return f"{' -> '.join(names)}  ({where(f.main)})"


def _train_lines(plan, kernels: _Kernels) -> tuple[list[str], str]:
    """The training forward: one line a step of its plan (plan.train_plan),
    each an autograd Function with Triton backward kernels; the steps that
    feed only training's outputs under `if self.training:`."""
    def step_lines(step, prev):
        lines = []
        v, u, op, reads = step.out, step.unit, step.op, step.reads
        x = reads[0] if reads else None
        if op == "fork":
            lines.append(f"{', '.join(step.outs)} = rt.fork(K, {x}, {len(step.outs)})")
        elif op == "split":
            ranges = tuple((l.attrs["start"], l.attrs["stop"]) for l in u)
            at = ", ".join(f"{l.name} ({where(l)})" for l in u)
            lines.append(f"{', '.join(step.outs)} = rt.split_channels(K, {x}, {ranges!r}, at={at!r})")
        elif op == "buffer":
            what = "dense block" if isinstance(u, ir.Dense) else "concat"
            lines.append(f"{v} = rt.concat_buffer({x}, {plan.value(v).shape[0]}, {x}.shape[2], {x}.shape[3])  "
                         f"# {what} {u.name} ({where(u)})")
        elif op == "concat":
            into = f", into={step.into[0]}" if step.into else ""
            at = f"{u.name} ({where(u)})" if isinstance(u, ir.Dense) else (u.name or "concat") + f" ({where(u)})"
            lines.append(f"{v} = rt.concat(K, [{', '.join(reads)}]{into}, at={at!r})")
        elif op in ("add", "mul"):
            chained = prev is not None and prev.unit is u and prev.op == op and x == prev.out
            at = "" if chained else f", at={(u.name or op) + ' (' + where(u) + ')'!r}"
            lines.append(f"{v} = rt.{op}(K, {x}, {reads[1]}{at})")
        elif op == "depthwise":  # (the direct kernel: its BN and act are the next steps')
            main = u.main
            consts = _conv_consts(main.attrs)
            consts.pop("GROUPS")
            kern = kernels.get(kdw.DEPTHWISE2D, "depthwise_conv", f"{main.name}  ({where(main)})", main.name, **consts)
            # (with a second output: the sums of the first its BN's statistics come from, in train mode)
            outs, stats = (", ".join(step.outs), ", stats=self.training") if step.outs else (v, "")
            lines += [f"# {_chain_text(u)}",
                      f"{outs} = rt.depthwise(K, {kern}, self.layer({main.name!r}), {x}{stats}, "
                      f"at={main.name + ' (' + where(main) + ')'!r})"]
        elif isinstance(u, ir.Fused):
            lines += _train_fused_lines(step, kernels)
        else:
            lines.append(_layer_line(u, kernels, v, x, "", train=True, size_of=reads[1] if len(reads) > 1 else None))
        return lines

    return _guarded(plan, step_lines), returned(plan.outputs, str, plan.result)


def _guarded(plan, step_lines) -> list[str]:
    """step_lines(step, the step before) for each step of plan, in order; the
    steps that feed only training's outputs under `if self.training:`."""
    lines, guarded, prev = [], False, None
    for step in plan.steps:
        if step.training_only != guarded:
            guarded = step.training_only
            if guarded:
                lines.append("if self.training:  # (what only training's outputs need)")
        lines += ["    " + line if guarded else line for line in step_lines(step, prev)]
        prev = step
    return lines


def _train_fused_lines(step, kernels: _Kernels) -> list[str]:
    f, v, x = step.unit, step.out, step.reads[0]
    main = f.main
    at = f"{main.name} ({where(main)})"
    act = _act_args(f.act)
    res = f", residual={step.reads[1]}" if f.residual else ""
    head = f"# {_chain_text(f)}"
    defer = ", defer=True" if step.defer else ""
    if f.kind == "conv":
        kern = kernels.get(kconv.CONV2D, f.describe(), _chain_text(f), main.name, **_conv_consts(main.attrs))
        bn = f", bn=self.layer({f.bn.name!r})" if f.bn is not None else ""
        into = f", into=({step.into[0]}, {step.into[1]})" if step.into else ""
        leave = ", leave=True" if step.leave else ""
        return [head, f"{v} = rt.conv(K, {kern}, {_conv_module(main)}, {x}{bn}{defer}{into}{leave}{res}{act}, at={at!r})"]
    if f.kind == "linear":
        kern = kernels.get(kconv.CONV2D, f.describe(), _chain_text(f), main.name,
                           KH=1, KW=1, SH=1, SW=1, PH=0, PW=0, DH=1, DW=1, GROUPS=1)
        return [head, f"{v} = rt.linear(K, {kern}, self.layer({main.name!r}), {x}{act}, at={at!r})"]
    sums = f", partials={step.partials}" if step.partials else ""
    return [head, f"{v} = rt.batchnorm(K, self.layer({main.name!r}), {x}{res}{act}{defer}{sums}, at={at!r})"]


def _plan_lines(plan, kernels: _Kernels) -> tuple[list[str], str]:
    """The inference forward: one line a step of the plan (plan/), in its order;
    the steps that feed only training's outputs under `if self.training:`."""
    def step_lines(step, _):
        lines = []
        v = plan.value(step.out)
        reads = [plan.ref(r) for r in step.reads]
        x = reads[0]
        # a value that is a buffer's channels: the step stores there (out=), the name stays for reading it
        o = f", out={plan.ref(v.name)}" if v.base is not None else ""
        u, op = step.unit, step.op
        if op == "buffer":
            what = "dense block" if isinstance(u, ir.Dense) else "concat"
            lines.append(f"{v.name} = rt.concat_buffer({x}, {v.shape[0]}, {x}.shape[2], {x}.shape[3])  "
                         f"# {what} {u.name} ({where(u)})")
        elif op == "copy":
            lines.append(f"rt.copy(K, {x}, {plan.ref(v.name)})")
        elif op in ("add", "mul"):
            lines.append(f"{v.name} = rt.{op}(K, {x}, {reads[1]}{o}, at={(u.name or op) + ' (' + where(u) + ')'!r})")
        elif op == "se_gate":
            lines += _gate_lines(u, v.name, x, reads[1])
        elif isinstance(u, ir.Fused):
            lines += _fused_lines(u, kernels, ", ".join(step.outs) or v.name, x, reads[1] if u.residual else None, o,
                                  op, gate=reads[-1] if "gate" in step.prologue else None, pool=bool(step.outs))
        else:
            lines.append(_layer_line(u, kernels, v.name, x, o, size_of=reads[1] if len(reads) > 1 else None))
        return lines

    return _guarded(plan, step_lines), returned(plan.outputs, plan.ref, plan.ref(plan.result))


def _act_args(act) -> str:
    if act is None:
        return ""
    name, extra = act_kernel_args(act.op, act.attrs)
    return f", act={name!r}" + "".join(f", {k}={v!r}" for k, v in extra.items())


def _gate_lines(g, v, x, sums) -> list[str]:
    """plan/se_gate.py's step: the pool and both convs of a squeeze-and-excitation gate in one launch."""
    acts = ""
    for i, f in enumerate((g.squeeze, g.excite), 1):
        if f.act is not None:
            name, extra = act_kernel_args(f.act.op, f.act.attrs)
            acts += f", act{i}={name!r}" + "".join(f", {k}{i}={val!r}" for k, val in extra.items())
    chain = " -> ".join(l.name for l in g.layers)
    at = f"{g.pool.name} ({where(g.pool)})"
    return [f"# {chain}  ({where(g.pool)})",
            f"{v} = rt.se_gate(K, {x}, {sums}, self.layer({g.squeeze.main.name!r}), "
            f"self.layer({g.excite.main.name!r}){acts}, at={at!r})"]


def _fused_lines(f: ir.Fused, kernels: _Kernels, v, x, residual, o, op="conv", gate=None, pool=False) -> list[str]:
    main = f.main
    at = f"{main.name} ({where(main)})"
    act = _act_args(f.act)
    res = f", residual={residual}" if residual is not None else ""
    head = f"# {_chain_text(f)}"
    if op == "depthwise":  # (plan/depthwise_direct.py)
        consts = _conv_consts(main.attrs)
        consts.pop("GROUPS")
        kern = kernels.get(kdw.DEPTHWISE2D, "depthwise_" + f.describe(), _chain_text(f), main.name, **consts)
        bn = f", bn=self.layer({f.bn.name!r})" if f.bn is not None else ""
        pooled = ", pool=True" if pool else ""  # (it returns the output and its per-tile sums: plan/se_gate.py)
        return [head, f"{v} = rt.depthwise(K, {kern}, self.layer({main.name!r}), {x}{bn}{res}{act}{o}{pooled}, "
                      f"at={at!r})"]
    if f.kind == "conv":
        kern = kernels.get(kconv.CONV2D, f.describe(), _chain_text(f), main.name, **_conv_consts(main.attrs))
        bn = f", bn=self.layer({f.bn.name!r})" if f.bn is not None else ""
        g = f", gate={gate}" if gate is not None else ""
        return [head, f"{v} = rt.conv(K, {kern}, {_conv_module(main)}, {x}{bn}{res}{act}{g}{o}, at={at!r})"]
    if f.kind == "linear":
        kern = kernels.get(kconv.CONV2D, f.describe(), _chain_text(f), main.name,
                           KH=1, KW=1, SH=1, SW=1, PH=0, PW=0, DH=1, DW=1, GROUPS=1)
        return [head, f"{v} = rt.linear(K, {kern}, self.layer({main.name!r}), {x}{act}{o}, at={at!r})"]
    return [head, f"{v} = rt.batchnorm(K, self.layer({main.name!r}), {x}{res}{act}{o}, at={at!r})"]


def _layer_line(l: ir.Layer, kernels: _Kernels, v, x, o, train=False, size_of=None) -> str:
    """train: the autograd forward's (a pool takes the kernels a deferred BN's backward needs);
    size_of: the tensor whose size an upsampling takes (`upsample(size=@name)`)."""
    a, op = l.attrs, l.op
    at = f"{l.name} ({where(l)})"
    if op in ACTIVATIONS:
        act, extra = act_kernel_args(op, a)
        args = "".join(f", {k}={val!r}" for k, val in extra.items())
        return f"{v} = rt.activation(K, {x}, {act!r}{args}{o})  # {at}"
    if op in ("maxpool", "avgpool"):
        kern = kernels.get(kpool.POOL2D, op, f"{l.name}  ({where(l)})", l.name, **_pool_consts(l))
        return (f"{v} = rt.pool({kern}, {x}, {tuple(a['kernel_size'])}, {tuple(a['stride'])}, {tuple(a['padding'])}, "
                f"{tuple(a.get('dilation', (1, 1)))}, ceil_mode={a['ceil_mode']}, max_pool={op == 'maxpool'}{o}, "
                f"at={at!r}" + (", K=K)" if train else ")"))
    if op in ("adaptive_avgpool", "global_avgpool"):
        return f"{v} = rt.adaptive_avgpool(K, {x}, {tuple(a['output_size'])}{o}, at={at!r})"
    if op == "upsample":
        kern = kernels.get(kpool.UPSAMPLE2D, f"upsample_{a['mode']}", f"{l.name}  ({where(l)})", l.name,
                           BILINEAR=a["mode"] == "bilinear", ALIGN_CORNERS=a["align_corners"])
        if a.get("like"):
            return (f"{v} = rt.upsample({kern}, {x}, None, {a['align_corners']}, bilinear={a['mode'] == 'bilinear'}, "
                    f"size={size_of}.shape[2:]{o}, at={at!r})")
        return (f"{v} = rt.upsample({kern}, {x}, {a['scale_factor']!r}, {a['align_corners']}, "
                f"bilinear={a['mode'] == 'bilinear'}{o}, at={at!r})")
    if op == "layernorm":
        return f"{v} = rt.layernorm(K, self.layer({l.name!r}), {x}{o}, at={at!r})"
    if op == "groupnorm":
        return f"{v} = rt.groupnorm(K, self.layer({l.name!r}), {x}{o}, at={at!r})"
    if op == "layer_scale":
        return f"{v} = rt.layer_scale(K, {x}, self.param({l.name!r}){o}, at={at!r})"
    if op == "channels":
        return f"{v} = rt.channels(K, {x}, {a['start']}, {a['stop']}, at={at!r})"
    if op == "channel_shuffle":
        return f"{v} = rt.channel_shuffle(K, {x}, {a['groups']}{o}, at={at!r})"
    if op == "flatten":
        return f"{v} = rt.flatten(K, {x})  # {at}"
    if op == "dropout":
        return f"{v} = rt.dropout(K, {x}, {a['p']!r}, self.training{o})  # {at}"
    if op == "stochastic_depth":
        return f"{v} = rt.stochastic_depth(K, {x}, {a['p']!r}, {a['mode']!r}, self.training{o})  # {at}"
    if op == "lrn":
        kern = kernels.get(knorm.LRN, "lrn", f"{l.name}  ({where(l)})", l.name, SIZE=a["size"])
        return f"{v} = rt.lrn({kern}, self.layer({l.name!r}), {x}{o}, at={at!r})"
    if op == "softmax":
        if a["dim"] != 1:
            raise NetdslError([Diagnostic(l.pos, "the Triton target supports softmax over dim 1 only")])
        return f"{v} = rt.softmax(K, {x}{o}, at={at!r})"
    if op == "conv_transpose":
        kern = kernels.get(kconv.CONV_TRANSPOSE2D, "conv_transpose", f"{l.name}  ({where(l)})", l.name,
                           **_conv_consts(a))
        return f"{v} = rt.conv_transpose(K, {kern}, self.layer({l.name!r}), {x}{o}, at={at!r})"
    raise AssertionError(f"unfused {op}")


def _pool_consts(l: ir.Layer) -> dict:
    a = l.attrs
    consts = dict(_conv_consts(dict(a, dilation=a.get("dilation", (1, 1)), groups=1)),
                  IS_MAX=l.op == "maxpool", COUNT_INCLUDE_PAD=a.get("count_include_pad", True))
    consts.pop("GROUPS")
    return consts


def generate(nets: list[ir.Net], source: str, disable=frozenset()) -> str:
    """disable: the fusions switched off (switches.py), checked by the caller."""
    kernels = _Kernels()
    classes = []
    for net in nets:
        check_class_name(net)
        lines, result = _plan_lines(inference_plan(net, disable, fused=True), kernels)
        train_lines, train_result = _train_lines(train_plan(net, disable, fused=True), kernels)
        classes.append((net, (lines, result), (train_lines, train_result)))
    out = [f'"""Generated by netdsl from {source}: Triton kernels and the nn.Modules that run them.',
           "",
           "On CUDA tensors the kernels run compiled; on CPU tensors through Triton's interpreter.",
           'Do not edit; regenerate with `netdsl compile`."""',
           "import torch",
           "import torch.nn as nn",
           "import triton",
           "import triton.language as tl",
           "",
           "from netdsl import runtime as rt",
           ""]
    for template, name, doc in HELPERS:
        out += ["", render(template, name, doc)]
    for name, template in GENERIC.items():
        out += ["", render(template, name, _GENERIC_DOC[name])]
    for src in kernels.source():
        out += ["", src]
    off = f"disable={tuple(sorted(disable))!r}, " if disable else ""
    if disable:  # (said in the header too: a reader of the file sees which fusions it runs without)
        out[1:1] = [f"Compiled without: {', '.join(sorted(disable))} (netdsl compile --disable)."]
    out += ["", "K = rt.Kernels(" + off + ", ".join(f"{n}={n}" for n in GENERIC) + ")"]
    out += kernels.attachments() + [""]
    for net, (lines, result), (train_lines, train_result) in classes:
        out += class_lines(net)
        out += ["",
                "    # the traced forward's (rt.traced_run): this class's name for netdsl::forward, and what its",
                "    # eval forward returns (None: one tensor; n: a tuple of n; names: a dict)",
                f"    traced_key = __name__ + '|' + __file__ + '|{net.name}'",
                f"    traced_returns = {_eval_returns(net)!r}",
                "",
                "    def forward(self, x):",
                f"        x = rt.check_input(x, self.input_shape, {net.name!r})",
                "        if rt.traced():  # (torch.compile, torch.export: the whole forward as one op, netdsl::forward)",
                "            return rt.traced_run(self, x)",
                "        if rt.grad_wanted(self, x):",
                "            return self.forward_autograd(x)"]
        out += [f"        {line}" for line in lines]
        out += [f"        return {result}", ""]
        out += ["    def forward_autograd(self, x):",
                '        """The training forward: each fused kernel an autograd Function with Triton backward kernels."""']
        out += [f"        {line}" for line in train_lines]
        out += [f"        return {train_result}", ""]
    out += ["", f"NETWORKS = {{{', '.join(f'{n.name!r}: {n.name}' for n, *_ in classes)}}}", ""]
    return "\n".join(out)


def _eval_returns(net: ir.Net):
    outs = [o for o in net.outputs if not o.training]
    if len(outs) <= 1 and all(o.key is None for o in outs):
        return None
    return tuple(o.key for o in outs) if outs[0].key is not None else len(outs)


def kernel_names(source: str) -> list[str]:
    import re

    return re.findall(r"^def (\w+)\(", source, flags=re.M)
