"""The __init__ shared by both targets: every layer as a torch.nn layer under
its dotted spec name.  The Triton module only reads their parameters and
buffers; the torch module calls them."""
from __future__ import annotations

import keyword
import math

from .. import ir
from ..diagnostics import Diagnostic, NetdslError

# Names the generated file defines or imports; a network may not shadow them.
RESERVED = {"torch", "triton", "tl", "rt", "nn", "F", "K", "NETWORKS"}


def check_class_name(net: ir.Net):
    if keyword.iskeyword(net.name) or net.name in RESERVED or net.name.startswith("__") or "__" in net.name:
        raise NetdslError([Diagnostic(net.pos, f"'{net.name}' cannot be a network name in generated Python code")])


def _pair(p):
    return tuple(p)


def module_expr(layer: ir.Layer) -> str:
    a, op = layer.attrs, layer.op
    if op == "conv" and a.get("pixel_linear"):
        return f"rt.PixelLinear({a['in_channels']}, {a['out_channels']}, bias={a['bias']})"
    if op == "conv":
        if a["weight"] is not None:
            w = a["weight"]
            values = list(w["values"])
            if len(w["shape"]) == 2:  # one filter for every channel
                values = values * a["out_channels"]
            return (f"rt.frozen_conv({a['in_channels']}, {a['out_channels']}, {_pair(a['kernel_size'])}, "
                    f"{a['groups']}, {values!r}, stride={_pair(a['stride'])}, padding={_pair(a['padding'])}, "
                    f"dilation={_pair(a['dilation'])})")
        return (f"nn.Conv2d({a['in_channels']}, {a['out_channels']}, {_pair(a['kernel_size'])}, stride={_pair(a['stride'])}, "
                f"padding={_pair(a['padding'])}, dilation={_pair(a['dilation'])}, groups={a['groups']}, bias={a['bias']})")
    if op == "conv_transpose":
        return (f"nn.ConvTranspose2d({a['in_channels']}, {a['out_channels']}, {_pair(a['kernel_size'])}, "
                f"stride={_pair(a['stride'])}, padding={_pair(a['padding'])}, output_padding={_pair(a['output_padding'])}, "
                f"groups={a['groups']}, bias={a['bias']}, dilation={_pair(a['dilation'])})")
    if op == "bn" and a.get("frozen"):
        return f"rt.FrozenBatchNorm2d({a['num_features']}, eps={a['eps']!r})"
    if op == "bn":
        cls = "BatchNorm1d" if a["dims"] == 1 else "BatchNorm2d"
        return (f"nn.{cls}({a['num_features']}, eps={a['eps']!r}, momentum={a['momentum']!r}, affine={a['affine']}, "
                f"track_running_stats={a['track_running_stats']})")
    if op == "groupnorm":
        return f"nn.GroupNorm({a['groups']}, {a['channels']}, eps={a['eps']!r}, affine={a['affine']})"
    if op == "layernorm":
        return f"rt.LayerNorm2d({a['channels']}, eps={a['eps']!r}, elementwise_affine={a['affine']})"
    if op == "linear":
        return f"nn.Linear({a['in_features']}, {a['out_features']}, bias={a['bias']})"
    if op == "relu":
        return "nn.ReLU()"
    if op == "leaky_relu":
        return f"nn.LeakyReLU({a['negative_slope']!r})"
    if op == "sigmoid":
        return "nn.Sigmoid()"
    if op == "tanh":
        return "nn.Tanh()"
    if op == "relu6":
        return "nn.ReLU6()"
    if op == "hardsigmoid":
        return "nn.Hardsigmoid()"
    if op == "silu":
        return "nn.SiLU()"
    if op == "hardswish":
        return "nn.Hardswish()"
    if op == "gelu":
        return f"nn.GELU(approximate={a['approximate']!r})"
    if op == "hardtanh":
        return f"nn.Hardtanh({a['min_val']!r}, {a['max_val']!r})"
    if op == "maxpool":
        return (f"nn.MaxPool2d({_pair(a['kernel_size'])}, stride={_pair(a['stride'])}, padding={_pair(a['padding'])}, "
                f"dilation={_pair(a['dilation'])}, ceil_mode={a['ceil_mode']})")
    if op == "avgpool":
        return (f"nn.AvgPool2d({_pair(a['kernel_size'])}, stride={_pair(a['stride'])}, padding={_pair(a['padding'])}, "
                f"ceil_mode={a['ceil_mode']}, count_include_pad={a['count_include_pad']})")
    if op in ("adaptive_avgpool", "global_avgpool"):
        return f"nn.AdaptiveAvgPool2d({_pair(a['output_size'])})"
    if op == "upsample":
        if a["mode"] == "bilinear":
            return f"nn.Upsample(scale_factor={a['scale_factor']!r}, mode='bilinear', align_corners={a['align_corners']})"
        return f"nn.Upsample(scale_factor={a['scale_factor']!r}, mode='nearest')"
    if op == "channels":
        return f"rt.Channels({a['start']}, {a['stop']})"
    if op == "channel_shuffle":
        return f"nn.ChannelShuffle({a['groups']})"
    if op == "flatten":
        return "nn.Flatten()"
    if op == "dropout":
        return f"nn.Dropout({a['p']!r})"
    if op == "stochastic_depth":
        return f"rt.StochasticDepth({a['p']!r}, {a['mode']!r})"
    if op == "lrn":
        return f"nn.LocalResponseNorm({a['size']}, alpha={a['alpha']!r}, beta={a['beta']!r}, k={a['k']!r})"
    if op == "softmax":
        return f"nn.Softmax(dim={a['dim']})"
    if op == "identity":
        return "nn.Identity()"
    raise AssertionError(op)


def owns_no_module(layer: ir.Layer) -> bool:
    """A named tensor's write or read, and an upsampling to a named tensor's size (a call, not a module)."""
    return layer.op in ("name", "read") or (layer.op == "upsample" and bool(layer.attrs.get("like")))


def init_lines(net: ir.Net) -> list[str]:
    lines, seen = [], set()
    for layer in ir.walk_layers(net.body):
        if layer.name in seen or owns_no_module(layer):
            continue
        seen.add(layer.name)
        if layer.op == "layer_scale":  # a bare parameter, not a module
            (t,) = layer.tensors
            lines.append(f"self._add_param({layer.name!r}, {t.shape!r}, {layer.attrs['init']!r})")
        else:
            lines.append(f"self._add({layer.name!r}, {module_expr(layer)})")
    return lines


def class_lines(net: ir.Net) -> list[str]:
    """A network class's header and __init__: the same for both targets, so
    both register the same parameters under the same names."""
    lines = ["", "",
             f"class {net.name}(rt.NetModule):",
             f'    """{net.name} ({where(net)}): input {shape_text(net.input_shape)}, {outputs_text(net)}."""',
             "",
             f"    input_shape = {tuple(net.input_shape)!r}",
             "",
             "    def __init__(self):",
             "        super().__init__()"]
    return lines + [f"        {line}" for line in init_lines(net)]


def where(layer_or_pos, name: str | None = None) -> str:
    pos = layer_or_pos.pos if hasattr(layer_or_pos, "pos") else layer_or_pos
    import os

    return f"{os.path.basename(pos.file)}:{pos.line}"


def shape_text(s) -> str:
    return "×".join(str(d) for d in s)


def outputs_text(net: ir.Net) -> str:
    if not net.outputs:
        return f"output {shape_text(net.out_shape)}"
    return "outputs " + ", ".join((f"{k!r}: " if k is not None else "") + shape_text(s)
                                  + (" (training)" if o.training else "") for (k, s), o in zip(net.output_shapes, net.outputs))


def numel(s) -> int:
    return math.prod(s)
