"""Kernel templates and their launchers, one module per op family.

Each family module holds Triton kernel *templates* (source text with `$NAME`
holes for what the spec fixes: kernel size, stride, padding, dilation, groups)
and the launchers that compute grids and pass pointers / sizes / strides.
Code generation fills the templates into the generated file; epilogue options
stay `tl.constexpr` flags chosen by the launchers.
"""
from string import Template

ACT_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4}


def render(template: str, name: str, header: str, **consts) -> str:
    body = Template(template).substitute(NAME=name, **{k: repr(v) for k, v in consts.items()})
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + body.strip() + "\n"
