"""netdsl: declarative CNN specs compiled to fused Triton kernels.

The front end (parsing, elaboration, shape inference, `netdsl check`) imports
neither torch nor triton.
"""
from .compiler import check_file, check_text, checked_net
from .diagnostics import Diagnostic, NetdslError

__all__ = ["build", "check_file", "check_text", "checked_net", "compile_to_module", "kernel_log", "precompile",
           "Diagnostic", "NetdslError"]


def build(path, net: str, target: str = "triton", disable=(), sync_bn: bool = False, **overrides):
    """Compile (or fetch from the cache) and instantiate one network of a spec
    file; disable: fusions to compile it without (netdsl.switches.SWITCHES).
    sync_bn: its batch norms are nn.SyncBatchNorm, whose train-mode statistics
    are the global batch's of the processes of torch.distributed (the state
    dict is the same)."""
    from .cache import build as _build

    model = _build(path, net, target, disable, **overrides)
    if sync_bn:
        import torch

        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def compile_to_module(path, net=None, target: str = "triton", disable=(), **overrides):
    from .cache import compile_to_module as _compile

    return _compile(path, net, target, disable, **overrides)


def precompile(module, x, *, train: bool = True, jobs=None) -> int:
    """Compile, in parallel, every kernel one step of module on the CUDA tensor
    x will launch (train: forward and backward), so the first step need not
    compile them one by one; returns how many compiles ran (0 on the CPU)."""
    from .parallel_compile import precompile as _precompile

    return _precompile(module, x, train=train, jobs=jobs)


def kernel_log():
    """`with netdsl.kernel_log() as log: model(x)`: every kernel launch as (name, grid)."""
    from .runtime import kernel_log as _log

    return _log()
__version__ = "0.1.0"
