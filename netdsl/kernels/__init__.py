"""Kernel templates and their launchers, one module per op family.

Each family module holds Triton kernel *templates* (source text with `$NAME`
holes for what the spec fixes: kernel size, stride, padding, dilation, groups)
and the launchers that compute grids and pass pointers / sizes / strides.
Code generation fills the templates into the generated file; epilogue options
stay `tl.constexpr` flags chosen by the launchers.
"""
from string import Template

ACT_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4, "relu6": 5, "hardsigmoid": 6,
             "silu": 7, "hardswish": 8, "gelu": 9, "gelu_tanh": 10, "hardtanh": 11}

# Activations whose derivative the output does not determine (silu, gelu and
# hardswish are not monotonic; hardtanh's bounds are runtime values the
# epilogue helper has no slot for): their kernel keeps the input for backward.
FROM_INPUT = ("silu", "hardswish", "gelu", "gelu_tanh", "hardtanh")

# The epilogue activation every kernel family shares (ACT is one of ACT_CODES).
ACTIVATION = r'''
@triton.jit
def $NAME(y, ACT: tl.constexpr, slope):
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
        y = tl.where(y >= 0.0, y, y * slope)
    elif ACT == 3:
        y = tl.sigmoid(y)
    elif ACT == 4:
        y = 2.0 * tl.sigmoid(2.0 * y) - 1.0
    elif ACT == 5:
        y = tl.minimum(tl.maximum(y, 0.0), 6.0)
    elif ACT == 6:
        y = tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0
    elif ACT == 7:
        y = y * tl.sigmoid(y)
    elif ACT == 8:
        y = y * (tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0)
    elif ACT == 9:
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    elif ACT == 10:  # tanh(u) = 2·sigmoid(2u) − 1, u = √(2/π)·(y + 0.044715·y³)
        y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
    return y
'''

# Its derivative, from the activation's output y (what backward keeps):
# relu and leaky relu pass where y > 0, as torch's threshold_backward does;
# relu6 and hardsigmoid where the input was strictly inside the linear
# piece, as torch's hardtanh_backward and hardsigmoid_backward do, which the
# output shows exactly (0 < y < 6, 0 < y < 1).
ACTIVATION_GRAD = r'''
@triton.jit
def $NAME(dy, y, ACT: tl.constexpr, slope):
    if ACT == 1:
        dy = tl.where(y > 0.0, dy, 0.0)
    elif ACT == 2:
        dy = tl.where(y > 0.0, dy, dy * slope)
    elif ACT == 3:
        dy = dy * y * (1.0 - y)
    elif ACT == 4:
        dy = dy * (1.0 - y * y)
    elif ACT == 5:
        dy = tl.where((y > 0.0) & (y < 6.0), dy, 0.0)
    elif ACT == 6:
        dy = tl.where((y > 0.0) & (y < 1.0), dy / 6.0, 0.0)
    return dy
'''

# The derivative of a FROM_INPUT activation, from its input x, with torch's
# choices at the kinks (hardswish's slope is x/3 + 1/2 on [-3, 3]; hardtanh
# passes strictly inside (lo, hi)).
ACTIVATION_GRAD_INPUT = r'''
@triton.jit
def $NAME(dy, x, ACT: tl.constexpr, lo, hi):
    if ACT == 7:
        s = tl.sigmoid(x)
        dy = dy * s * (1.0 + x * (1.0 - s))
    elif ACT == 8:
        dy = tl.where(x < -3.0, 0.0, tl.where(x <= 3.0, dy * (x / 3.0 + 0.5), dy))
    elif ACT == 9:
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        dy = dy * (cdf + x * pdf)
    elif ACT == 10:
        t = 2.0 * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x)) - 1.0
        dy = dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x))
    elif ACT == 11:
        dy = tl.where((x > lo) & (x < hi), dy, 0.0)
    return dy
'''


_GEOMETRY = (("KH", "KH"), ("KW", "KW"), ("SH", "SH"), ("SW", "SW"), ("PH", "PH"), ("PW", "PW"),
             ("DH", "DH"), ("DW", "DW"), ("GROUPS", "G"))


def render(template: str, name: str, header: str, **consts) -> str:
    """Fill a template: $NAME, each constant, and $GEOMETRY (the window's sizes
    as literal assignments, so the compiler sees them as constants)."""
    geometry = "\n".join(f"    {var} = {consts[key]!r}" for key, var in _GEOMETRY if key in consts).lstrip()
    body = Template(template).substitute(NAME=name, GEOMETRY=geometry, **{k: repr(v) for k, v in consts.items()})
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + body.strip() + "\n"
