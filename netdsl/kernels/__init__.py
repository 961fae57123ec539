"""Kernel templates and their launchers, one module per op family.

Each family module holds Triton kernel *templates* (source text with `$NAME`
holes for what the spec fixes: kernel size, stride, padding, dilation, groups)
and the launchers that compute grids and pass pointers / sizes / strides.
Code generation fills the templates into the generated file; epilogue options
stay `tl.constexpr` flags chosen by the launchers.
"""
from string import Template

ACT_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4, "relu6": 5, "hardsigmoid": 6}

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


_GEOMETRY = (("KH", "KH"), ("KW", "KW"), ("SH", "SH"), ("SW", "SW"), ("PH", "PH"), ("PW", "PW"),
             ("DH", "DH"), ("DW", "DW"), ("GROUPS", "G"))


def render(template: str, name: str, header: str, **consts) -> str:
    """Fill a template: $NAME, each constant, and $GEOMETRY (the window's sizes
    as literal assignments, so the compiler sees them as constants)."""
    geometry = "\n".join(f"    {var} = {consts[key]!r}" for key, var in _GEOMETRY if key in consts).lstrip()
    body = Template(template).substitute(NAME=name, GEOMETRY=geometry, **{k: repr(v) for k, v in consts.items()})
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + body.strip() + "\n"
