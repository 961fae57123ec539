"""netdsl: declarative CNN specs compiled to fused Triton kernels.

The front end (parsing, elaboration, shape inference, `netdsl check`) imports
neither torch nor triton.
"""
from .compiler import check_file, check_text, checked_net
from .diagnostics import Diagnostic, NetdslError

__all__ = ["build", "check_file", "check_text", "checked_net", "compile_to_module", "kernel_log",
           "Diagnostic", "NetdslError"]


def build(path, net: str, target: str = "triton", **overrides):
    """Compile (or fetch from the cache) and instantiate one network of a spec file."""
    from .cache import build as _build

    return _build(path, net, target, **overrides)


def compile_to_module(path, net=None, target: str = "triton", **overrides):
    from .cache import compile_to_module as _compile

    return _compile(path, net, target, **overrides)


def kernel_log():
    """`with netdsl.kernel_log() as log: model(x)`: every kernel launch as (name, grid)."""
    from .runtime import kernel_log as _log

    return _log()
__version__ = "0.1.0"
