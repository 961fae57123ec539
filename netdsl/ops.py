"""The builtin layers: signatures, shape rules, owned tensors and MAC counts.

One `OpSpec` per layer kind.  Shape rules follow PyTorch exactly (floor in the
conv formula, pooling's ceil_mode rule, transposed conv's output_padding);
they call `err(sentence)` for every problem and return the output shape, with
None for any dimension an error left unknown, so later layers can still be
checked without cascading errors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .ir import Tensor

REQUIRED = object()


class ArgError(Exception):
    """A bad argument value; the message is one sentence."""


# ------------------------------------------------------------------ argument kinds


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def int_at_least(lo):
    def check(v, what):
        if not _is_int(v) or v < lo:
            raise ArgError(f"{what} must be an integer >= {lo}, got {show(v)}")
        return v

    check.kind = f"an integer >= {lo}"
    return check


def pair_at_least(lo):
    def check(v, what):
        if _is_int(v) and v >= lo:
            return (v, v)
        if isinstance(v, tuple) and len(v) == 2 and all(_is_int(x) and x >= lo for x in v):
            return tuple(v)
        raise ArgError(f"{what} must be an integer >= {lo} or a pair of them, got {show(v)}")

    return check


def number(v, what):
    if not _is_num(v):
        raise ArgError(f"{what} must be a number, got {show(v)}")
    return float(v)


def probability(v, what):
    v = number(v, what)
    if not 0.0 <= v < 1.0:
        raise ArgError(f"{what} must be in [0, 1), got {show(v)}")
    return v


def drop_probability(v, what):
    v = number(v, what)
    if not 0.0 <= v <= 1.0:
        raise ArgError(f"{what} must be in [0, 1], got {show(v)}")
    return v


def positive_number(v, what):
    v = number(v, what)
    if v <= 0:
        raise ArgError(f"{what} must be positive, got {show(v)}")
    return v


def boolean(v, what):
    if not isinstance(v, bool):
        raise ArgError(f"{what} must be true or false, got {show(v)}")
    return v


def one_of(*choices):
    def check(v, what):
        if v not in choices:
            raise ArgError(f"{what} must be one of {', '.join(repr(c) for c in choices)}; got {show(v)}")
        return v

    return check


def optional(inner):
    def check(v, what):
        return None if v is None else inner(v, what)

    return check


def weights(v, what):
    """A nested list of numbers: [kh][kw], [cin][kh][kw] or [out][cin][kh][kw]."""

    def shape_of(x):
        if _is_num(x):
            return ()
        if isinstance(x, (list, tuple)) and x:
            shapes = {shape_of(e) for e in x}
            if len(shapes) != 1:
                raise ArgError(f"{what} must be a rectangular nested list of numbers")
            return (len(x),) + shapes.pop()
        raise ArgError(f"{what} must be a nested list of numbers, got {show(x)}")

    shape = shape_of(v)
    if len(shape) not in (2, 3, 4):
        raise ArgError(f"{what} must have 2, 3 or 4 levels of nesting ([kh][kw], [cin][kh][kw] or [out][cin][kh][kw]), got {len(shape)}")

    def flat(x):
        return [float(x)] if _is_num(x) else [y for e in x for y in flat(e)]

    return {"shape": shape, "values": tuple(flat(v))}


@dataclass(frozen=True)
class TensorSize:
    """`size=@name`: the spatial size of a named tensor (shape inference resolves it)."""

    name: str


def tensor_size(v, what):
    if not isinstance(v, TensorSize):
        raise ArgError(f"{what} takes a named tensor (size=@name), got {show(v)}")
    return v


def show(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, tuple):
        return "(" + ", ".join(show(x) for x in v) + ")"
    if isinstance(v, list):
        return "[" + ", ".join(show(x) for x in v) + "]"
    return repr(v)


# ------------------------------------------------------------------ specs


@dataclass(frozen=True)
class P:
    name: str
    check: Callable
    default: object = REQUIRED


@dataclass(frozen=True)
class OpSpec:
    name: str
    torch: str  # the torch.nn class it corresponds to, for tables and --target torch
    params: tuple[P, ...]
    infer: Callable  # (attrs, in_shape, err) -> (out_shape, attrs)
    tensors: Callable = lambda a, i, o: ()
    macs: Callable = lambda a, i, o: 0
    summary: Callable = lambda a: ""


def fmt_shape(s) -> str:
    if s is None:
        return "?"
    return "×".join("?" if d is None else str(d) for d in s)


def _prod(xs):
    out = 1
    for x in xs:
        if x is None:
            return None
        out *= x
    return out


def window_out(n, k, s, p, d, ceil_mode) -> int:
    """PyTorch's output length of a sliding window (conv and pooling); may be < 1."""
    out = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + p:  # the last window must start inside the input or left padding
        out -= 1
    return out


def _window(n, k, s, p, d, ceil_mode, what, err):
    if n is None:
        return None
    out = window_out(n, k, s, p, d, ceil_mode)
    if out < 1:
        extent = d * (k - 1) + 1
        if n + 2 * p < extent:
            err(f"{what} is larger than its padded input ({extent} > {n} + 2·{p})")
        else:
            err(f"the output size would be {out} for a {n}-pixel input")
        return None
    return out


def _need_rank3(name, s, err):
    if len(s) != 3:
        err(f"{name} needs a C×H×W input but gets {fmt_shape(s)}; it cannot follow flatten or linear")
        return False
    return True


def _pair_str(p):
    return str(p[0]) if p[0] == p[1] else f"{p[0]}×{p[1]}"


# -- conv


def _conv_infer(a, s, err):
    a = dict(a)
    if not _need_rank3("linear over channels" if a.get("pixel_linear") else "conv", s, err):
        return (a["out_channels"], None, None), a
    C, H, W = s
    w = a["weight"]
    if w is not None:
        shape = w["shape"]
        if len(shape) == 2:  # one filter applied to every channel (depthwise)
            if C is None:
                return (None, None, None), a
            a.update(out_channels=C, groups=C, in_channels=C, kernel_size=shape)
        elif len(shape) == 3:
            a.update(out_channels=1, groups=1, in_channels=shape[0], kernel_size=shape[1:])
        else:
            a.update(out_channels=shape[0], in_channels=shape[1] * a["groups"], kernel_size=shape[2:])
    out, g = a["out_channels"], a["groups"]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = a["kernel_size"], a["stride"], a["padding"], a["dilation"]
    expect = a["in_channels"]
    if C is not None and expect is not None and C != expect:
        weight = f"[{out}, {expect}]" if a.get("pixel_linear") else f"[{out}, {expect // g}, {kh}, {kw}]"
        err(f"{'linear' if a.get('pixel_linear') else 'conv'} expects {expect} input channels (weight {weight}) "
            f"but its input has {C} channel{'s' if C != 1 else ''}")
    elif C is not None and C % g:
        err(f"groups={g} does not divide the {C} input channels")
    elif out is not None and out % g:
        err(f"groups={g} does not divide the {out} output channels")
    a["in_channels"] = C if expect is None else expect
    Ho = _window(H, kh, sh, ph, dh, False, f"the {kh}×{kw} kernel (dilation {dh})", err)
    Wo = None if Ho is None and H is not None else _window(W, kw, sw, pw, dw, False, f"the {kh}×{kw} kernel (dilation {dw})", err)
    return (out, Ho, Wo), a


def _conv_tensors(a, i, o):
    cin, out, g = a["in_channels"], a["out_channels"], a["groups"]
    if cin is None or out is None:
        return ()
    kh, kw = a["kernel_size"]
    frozen = a["weight"] is not None
    shape = (out, cin) if a.get("pixel_linear") else (out, cin // g, kh, kw)  # (Linear's weight)
    ts = [Tensor("weight", shape, "frozen" if frozen else "param")]
    if a["bias"] and not frozen:
        ts.append(Tensor("bias", (out,), "param"))
    return tuple(ts)


def _conv_macs(a, i, o):
    n = _prod(o)
    if n is None or a["in_channels"] is None:
        return 0
    kh, kw = a["kernel_size"]
    return n * (a["in_channels"] // a["groups"]) * kh * kw


def _conv_summary(a):
    if a.get("pixel_linear"):
        return f"{a.get('in_channels') or '?'}→{a['out_channels']} per pixel"
    kh, kw = a["kernel_size"] or (0, 0)
    parts = [f"{a.get('in_channels') or '?'}→{a['out_channels'] or '?'}", f"{kh}×{kw}"]
    if a["stride"] != (1, 1):
        parts.append(f"s{_pair_str(a['stride'])}")
    if a["padding"] != (0, 0):
        parts.append(f"p{_pair_str(a['padding'])}")
    if a["dilation"] != (1, 1):
        parts.append(f"d{_pair_str(a['dilation'])}")
    if a["groups"] != 1:
        parts.append(f"g{a['groups']}")
    if a.get("weight") is not None:
        parts.append("frozen")
    return " ".join(parts)


# -- transposed conv


def _convt_infer(a, s, err):
    a = dict(a)
    if not _need_rank3("conv_transpose", s, err):
        return (a["out_channels"], None, None), a
    C, H, W = s
    out, g = a["out_channels"], a["groups"]
    if C is not None and C % g:
        err(f"groups={g} does not divide the {C} input channels")
    elif out % g:
        err(f"groups={g} does not divide the {out} output channels")
    a["in_channels"] = C
    dims = []
    for n, k, st, p, op, d in zip((H, W), a["kernel_size"], a["stride"], a["padding"], a["output_padding"], a["dilation"]):
        if op >= max(st, d):
            err(f"output_padding {op} must be smaller than the stride ({st}) or the dilation ({d})")
            dims.append(None)
            continue
        if n is None:
            dims.append(None)
            continue
        v = (n - 1) * st - 2 * p + d * (k - 1) + op + 1
        if v <= 0:
            err(f"the output's spatial size reaches {v} (≤ 0): padding {p} is too large for a {n}-pixel input")
            v = None
        dims.append(v)
    return (out, *dims), a


def _convt_tensors(a, i, o):
    cin, out, g = a["in_channels"], a["out_channels"], a["groups"]
    if cin is None:
        return ()
    kh, kw = a["kernel_size"]
    ts = [Tensor("weight", (cin, out // g, kh, kw), "param")]
    if a["bias"]:
        ts.append(Tensor("bias", (out,), "param"))
    return tuple(ts)


def _convt_macs(a, i, o):
    n = _prod(i)
    if n is None:
        return 0
    kh, kw = a["kernel_size"]
    return n * (a["out_channels"] // a["groups"]) * kh * kw


# -- batch norm


def _bn_infer(a, s, err):
    a = dict(a)
    if a.get("frozen") and len(s) != 3:
        err(f"frozen_bn needs a C×H×W input, got {fmt_shape(s)}")
    elif len(s) not in (1, 3):
        err(f"batch norm needs a C or C×H×W input, got {fmt_shape(s)}")
    a["num_features"] = s[0]
    a["dims"] = 1 if len(s) == 1 else 2
    return s, a


def _bn_tensors(a, i, o):
    c = a["num_features"]
    if c is None:
        return ()
    ts = []
    if a.get("frozen"):  # torchvision's FrozenBatchNorm2d: four buffers, nothing trains
        return tuple(Tensor(n, (c,), "buffer") for n in ("weight", "bias", "running_mean", "running_var"))
    if a["affine"]:
        ts += [Tensor("weight", (c,), "param"), Tensor("bias", (c,), "param")]
    if a["track_running_stats"]:
        ts += [Tensor("running_mean", (c,), "buffer"), Tensor("running_var", (c,), "buffer"),
               Tensor("num_batches_tracked", (), "buffer")]
    return tuple(ts)


# -- pooling


def _pool_infer(kind):
    def infer(a, s, err):
        a = dict(a)
        if a["stride"] is None:
            a["stride"] = a["kernel_size"]
        if not _need_rank3(kind, s, err):
            return (s[0], None, None), a
        C, H, W = s
        dil = a.get("dilation", (1, 1))
        dims = []
        for n, k, st, p, d in zip((H, W), a["kernel_size"], a["stride"], a["padding"], dil):
            if p > k // 2:
                err(f"{kind} padding {p} is more than half the kernel size {k} (PyTorch requires padding <= kernel/2)")
                dims.append(None)
                continue
            dims.append(_window(n, k, st, p, d, a["ceil_mode"], f"the {k}-wide pooling window", err))
        return (C, *dims), a

    return infer


def _pool_summary(a):
    parts = ["{}×{}".format(*a["kernel_size"])]
    if a["stride"] is not None and a["stride"] != a["kernel_size"]:
        parts.append(f"s{_pair_str(a['stride'])}")
    if a["padding"] != (0, 0):
        parts.append(f"p{_pair_str(a['padding'])}")
    if a["ceil_mode"]:
        parts.append("ceil")
    return " ".join(parts)


def _adaptive_infer(a, s, err):
    a = dict(a)
    if not _need_rank3("adaptive_avgpool", s, err):
        return (s[0], None, None), a
    return (s[0], *a["output_size"]), a


def _global_infer(a, s, err):
    a = dict(a, output_size=(1, 1))
    if not _need_rank3("global_avgpool", s, err):
        return (s[0], None, None), a
    return (s[0], 1, 1), a


# -- upsample


def _upsample_infer(a, s, err):
    a = dict(a)
    if not _need_rank3("upsample", s, err):
        return (s[0], None, None), a
    if a.get("like") is not None:  # to a named tensor's size (torch's size=): its ratio is set at run time
        size = a.get("like_size")
        if size is not None and len(size) != 2:
            err(f"upsample(size=@{a['like']}) needs a C×H×W tensor")
            size = None
        return (s[0], *(size or (None, None))), a
    f = a["scale_factor"]
    if a["mode"] == "nearest" and f != int(f):
        err(f"nearest upsampling needs an integer scale factor, got {f:g}")
    C, H, W = s
    return (C, None if H is None else int(H * f), None if W is None else int(W * f)), a


# -- linear


def _linear_infer(a, s, err):
    a = dict(a)
    if len(s) != 1:
        err(f"linear needs a flat input but gets {fmt_shape(s)}; add `flatten` before it, "
            f"or write over=\"channels\" for a linear layer applied to each pixel's channels")
        a["in_features"] = a["in_features"] or _prod(s)
        return (a["out_features"],), a
    F = s[0]
    if a["in_features"] is not None and F is not None and F != a["in_features"]:
        err(f"linear expects {a['in_features']} input features but its input has {F}")
    elif a["in_features"] is None:
        a["in_features"] = F
    return (a["out_features"],), a


def _linear_tensors(a, i, o):
    if a["in_features"] is None:
        return ()
    ts = [Tensor("weight", (a["out_features"], a["in_features"]), "param")]
    if a["bias"]:
        ts.append(Tensor("bias", (a["out_features"],), "param"))
    return tuple(ts)


def _linear_macs(a, i, o):
    return (a["in_features"] or 0) * a["out_features"]


# -- layer norm and layer scale


def _channel_infer(name):
    def infer(a, s, err):
        a = dict(a)
        if len(s) not in (1, 3):
            err(f"{name} needs a C or C×H×W input, got {fmt_shape(s)}")
        a["channels"] = s[0]
        return s, a

    return infer


def _layernorm_tensors(a, i, o):
    c = a["channels"]
    if c is None or not a["affine"]:
        return ()
    return (Tensor("weight", (c,), "param"), Tensor("bias", (c,), "param"))


def _groupnorm_infer(a, s, err):
    s, a = _channel_infer("groupnorm")(a, s, err)
    if s[0] is not None and s[0] % a["groups"]:
        err(f"groupnorm's {a['groups']} groups do not divide the {s[0]} channels")
    return s, a


def _layer_scale_tensors(a, i, o):
    c = a["channels"]
    if c is None:
        return ()
    # a bare parameter, under the layer's own name (torchvision's CNBlock.layer_scale)
    return (Tensor("", (c, 1, 1) if len(i) == 3 else (c,), "param"),)


# -- channel ranges and shuffles (ShuffleNet)


def _channels_infer(a, s, err):
    a = dict(a)
    if not _need_rank3("channels", s, err):
        return (None, None, None), a
    C = s[0]
    start, stop = a["start"], a["stop"]
    if stop <= start:
        err(f"channels({start}, {stop}) is empty: stop must be above start")
        return (None, *s[1:]), a
    if C is not None and stop > C:
        err(f"channels({start}, {stop}) reaches past the input's {C} channels")
        return (None, *s[1:]), a
    return (stop - start, *s[1:]), a


def _shuffle_infer(a, s, err):
    a = dict(a)
    if _need_rank3("channel_shuffle", s, err) and s[0] is not None and s[0] % a["groups"]:
        err(f"channel_shuffle's {a['groups']} groups do not divide the {s[0]} channels")
    return s, a


def _flatten_infer(a, s, err):
    return (_prod(s),), dict(a)


def _softmax_infer(a, s, err):
    if not 1 <= a["dim"] <= len(s):
        err(f"softmax dim must be between 1 and {len(s)} for a {fmt_shape(s)} input (dim 0 is the batch)")
    return s, dict(a)


def _lrn_infer(a, s, err):
    _need_rank3("lrn", s, err)
    return s, dict(a)


def _identity(a, s, err):
    return s, dict(a)


_pair1 = pair_at_least(1)
_pair0 = pair_at_least(0)

OPS: dict[str, OpSpec] = {}


def _op(spec: OpSpec):
    OPS[spec.name] = spec


_op(OpSpec("conv", "Conv2d", (
    P("out_channels", optional(int_at_least(1)), REQUIRED), P("kernel_size", optional(_pair1), REQUIRED),
    P("stride", _pair1, 1), P("padding", _pair0, 0), P("dilation", _pair1, 1), P("groups", int_at_least(1), 1),
    P("bias", boolean, True), P("in_channels", optional(int_at_least(1)), None), P("weight", optional(weights), None),
    P("scale", number, 1.0)), _conv_infer, _conv_tensors, _conv_macs, _conv_summary))
_op(OpSpec("conv_transpose", "ConvTranspose2d", (
    P("out_channels", int_at_least(1)), P("kernel_size", _pair1), P("stride", _pair1, 1), P("padding", _pair0, 0),
    P("output_padding", _pair0, 0), P("groups", int_at_least(1), 1), P("bias", boolean, True),
    P("dilation", _pair1, 1)), _convt_infer, _convt_tensors, _convt_macs, _conv_summary))
_op(OpSpec("bn", "BatchNorm2d", (
    P("eps", positive_number, 1e-5), P("momentum", probability, 0.1), P("affine", boolean, True),
    P("track_running_stats", boolean, True)), _bn_infer, _bn_tensors,
    summary=lambda a: ("frozen " if a.get("frozen") else "") + (f"eps={a['eps']:g}" if a["eps"] != 1e-5 else "")))
# torchvision's FrozenBatchNorm2d; elaboration makes it a bn with frozen=True (fixed statistics, affine buffers)
_op(OpSpec("frozen_bn", "FrozenBatchNorm2d", (P("eps", positive_number, 1e-5),), _bn_infer, _bn_tensors))
_op(OpSpec("relu", "ReLU", (), _identity))
_op(OpSpec("leaky_relu", "LeakyReLU", (P("negative_slope", number, 0.01),), _identity,
           summary=lambda a: f"slope={a['negative_slope']:g}"))
_op(OpSpec("sigmoid", "Sigmoid", (), _identity))
_op(OpSpec("tanh", "Tanh", (), _identity))
_op(OpSpec("relu6", "ReLU6", (), _identity))
_op(OpSpec("hardsigmoid", "Hardsigmoid", (), _identity))
_op(OpSpec("silu", "SiLU", (), _identity))
_op(OpSpec("hardswish", "Hardswish", (), _identity))
_op(OpSpec("gelu", "GELU", (P("approximate", one_of("none", "tanh"), "none"),), _identity,
           summary=lambda a: "tanh" if a["approximate"] == "tanh" else ""))


def _hardtanh_infer(a, s, err):
    if a["min_val"] >= a["max_val"]:
        err(f"hardtanh's min_val must be below its max_val, got {a['min_val']:g} and {a['max_val']:g}")
    return s, dict(a)


_op(OpSpec("hardtanh", "Hardtanh", (P("min_val", number, -1.0), P("max_val", number, 1.0)), _hardtanh_infer,
           summary=lambda a: f"[{a['min_val']:g}, {a['max_val']:g}]"))

# the element-wise activations, which kernels apply in their epilogues (fusion.py)
ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "relu6", "hardsigmoid", "silu", "hardswish", "gelu", "hardtanh")


def act_kernel_args(op: str, attrs: dict) -> tuple[str, dict]:
    """The kernels' activation name (ACT_CODES) and its runtime arguments."""
    if op == "leaky_relu":
        return op, {"slope": attrs["negative_slope"]}
    if op == "hardtanh":
        return op, {"bounds": (attrs["min_val"], attrs["max_val"])}
    if op == "gelu" and attrs["approximate"] == "tanh":
        return "gelu_tanh", {}
    return op, {}
_op(OpSpec("maxpool", "MaxPool2d", (
    P("kernel_size", _pair1), P("stride", optional(_pair1), None), P("padding", _pair0, 0),
    P("dilation", _pair1, 1), P("ceil_mode", boolean, False)), _pool_infer("maxpool"), summary=_pool_summary))
_op(OpSpec("avgpool", "AvgPool2d", (
    P("kernel_size", _pair1), P("stride", optional(_pair1), None), P("padding", _pair0, 0),
    P("ceil_mode", boolean, False), P("count_include_pad", boolean, True)), _pool_infer("avgpool"),
    summary=_pool_summary))
_op(OpSpec("adaptive_avgpool", "AdaptiveAvgPool2d", (P("output_size", _pair1, 1),), _adaptive_infer,
           summary=lambda a: _pair_str(a["output_size"])))
_op(OpSpec("global_avgpool", "AdaptiveAvgPool2d", (), _global_infer))
_op(OpSpec("upsample", "Upsample", (
    P("scale_factor", positive_number, 2.0), P("mode", one_of("nearest", "bilinear"), "nearest"),
    P("align_corners", boolean, False), P("size", tensor_size, None)), _upsample_infer,
    summary=lambda a: (f"to @{a['like']}'s size" if a.get("like") else f"×{a['scale_factor']:g}") + f" {a['mode']}"))
_op(OpSpec("linear", "Linear", (
    P("out_features", int_at_least(1)), P("bias", boolean, True), P("in_features", optional(int_at_least(1)), None),
    P("over", one_of("features", "channels"), "features")),
    _linear_infer, _linear_tensors, _linear_macs))
_op(OpSpec("layernorm", "LayerNorm", (P("eps", positive_number, 1e-5), P("affine", boolean, True)),
           _channel_infer("layernorm"), _layernorm_tensors,
           summary=lambda a: f"eps={a['eps']:g}" if a["eps"] != 1e-5 else ""))
_op(OpSpec("groupnorm", "GroupNorm", (P("groups", int_at_least(1)), P("eps", positive_number, 1e-5),
                                      P("affine", boolean, True)), _groupnorm_infer, _layernorm_tensors,
           summary=lambda a: f"groups={a['groups']}" + (f" eps={a['eps']:g}" if a["eps"] != 1e-5 else "")))
_op(OpSpec("layer_scale", "Parameter", (P("init", number, 1e-6),), _channel_infer("layer_scale"), _layer_scale_tensors,
           summary=lambda a: f"init={a['init']:g}"))
_op(OpSpec("channels", "Tensor slice", (P("start", int_at_least(0)), P("stop", int_at_least(1))), _channels_infer,
           summary=lambda a: f"[{a['start']}:{a['stop']}]"))
_op(OpSpec("channel_shuffle", "ChannelShuffle", (P("groups", int_at_least(1)),), _shuffle_infer,
           summary=lambda a: f"groups={a['groups']}"))
_op(OpSpec("flatten", "Flatten", (), _flatten_infer))
_op(OpSpec("dropout", "Dropout", (P("p", probability, 0.5),), _identity, summary=lambda a: f"p={a['p']:g}"))
_op(OpSpec("stochastic_depth", "StochasticDepth", (P("p", drop_probability), P("mode", one_of("row", "batch"), "row")),
           _identity, summary=lambda a: f"p={a['p']:g}" + (" batch" if a["mode"] == "batch" else "")))
_op(OpSpec("lrn", "LocalResponseNorm", (
    P("size", int_at_least(1)), P("alpha", number, 1e-4), P("beta", number, 0.75), P("k", number, 1.0)),
    _lrn_infer, summary=lambda a: f"size={a['size']}"))
_op(OpSpec("softmax", "Softmax", (P("dim", int_at_least(1), 1),), _softmax_infer))
_op(OpSpec("identity", "Identity", (), _identity))


def stateless(op: str) -> bool:
    """Ops that own no tensors; several of them may share one name (like reusing nn.ReLU)."""
    return op in ACTIVATIONS or op in ("maxpool", "avgpool", "adaptive_avgpool", "global_avgpool", "upsample",
                                       "flatten", "dropout", "stochastic_depth", "lrn", "softmax", "identity",
                                       "channels", "channel_shuffle")
