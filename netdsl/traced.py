"""Generated modules under torch.compile and torch.export, in eval mode.

Traced (by Dynamo, or by torch.export), a generated module's inference
forward is one registered op, `netdsl::forward(key, x, state)`: the
network's planned launches run inside it on the state it is handed (the
module's parameters and buffers, in registration order), on a private eval
instance of the generated class, so an exported program runs the weights it
carries.  Its fake implementation runs the same forward on the fake tensors
with nothing launched (launch.shapes_only): the runtime's own shape checks,
shape arithmetic and allocations give the outputs, so one compile serves
every batch size (image sizes are symbolic too, though a launcher's tile
choice may guard them into another compile).  key names the
generated file and class, so a program exported here and loaded in another
process finds the module in the netdsl cache.

The training forward is not a registered op: its backward's fusions are
settled by autograd Functions at run time (grad.py), which a trace cannot
follow.  A traced module in train mode is an error that says so."""
from __future__ import annotations

import functools
import sys
import threading

import torch

from .launch import shapes_only, thread_flag


class TracedModeError(RuntimeError):
    """A generated module traced in train mode, or a traced forward's backward."""


_local = threading.local()


def tracing() -> bool:
    """Is the generated forward being traced, and not run by netdsl::forward itself (or its shapes' dry run)?"""
    return torch.compiler.is_compiling() and not getattr(_local, "inside", False)


def _inside():
    return thread_flag(_local, "inside")


def _state(m) -> list:
    """m's parameters, then its buffers, in registration order (netdsl::forward's state)."""
    return list(m.parameters()) + list(m.buffers())


def _names(m) -> list[str]:
    return [n for n, _ in m.named_parameters()] + [n for n, _ in m.named_buffers()]


@functools.lru_cache(maxsize=None)
def _instance(key: str):
    """A private eval-mode instance of key's class (its own parameters are replaced by the op's state)."""
    name, file, cls = key.split("|")
    mod = sys.modules.get(name)
    if mod is None:
        from .cache import import_file

        mod = import_file(file, name)
    with torch._subclasses.fake_tensor.unset_fake_temporarily():  # (real parameters, even if a trace asks first)
        return getattr(mod, cls)().eval()


def _flat(out):
    """(structure, tensors) of a forward's result: one tensor, a tuple or a dict."""
    if isinstance(out, torch.Tensor):
        return None, [out]
    if isinstance(out, dict):
        return tuple(out), list(out.values())
    return len(out), list(out)


def _unflat(structure, tensors):
    if structure is None:
        return tensors[0]
    if isinstance(structure, tuple):
        return dict(zip(structure, tensors))
    return tuple(tensors)


def _outputs(m, x, state) -> list:
    """m's forward on x with state as its parameters and buffers, flattened; an output that is x or a view (of
    a buffer, or of another output) copied, as an op's outputs may alias neither its inputs nor each other."""
    with torch.no_grad(), _inside():
        out = torch.func.functional_call(m, dict(zip(_names(m), state)), (x,))
    return [t.clone(memory_format=torch.contiguous_format) if t is x or t._base is not None else t
            for t in _flat(out)[1]]


@torch.library.custom_op("netdsl::forward", mutates_args=())
def forward(key: str, x: torch.Tensor, state: list[torch.Tensor]) -> list[torch.Tensor]:
    """key: a generated class's traced_key (its module's import name, file and class name).
    The network of key on x, with state as its parameters and buffers (in registration order), in eval mode."""
    return _outputs(_instance(key), x, state)


@forward.register_fake
def _(key, x, state):
    # the same forward on the fake (perhaps symbolic) tensors, launching nothing: the runtime's own shape
    # arithmetic and allocations give each output's shape and strides.  Every output's batch is x's, so the
    # run takes a symbolic batch's example value: the launchers' tile choices would otherwise guard on it
    n = x.shape[0]
    if not isinstance(n, int):
        x = x.new_empty_strided((n.node.hint or 2, *x.shape[1:]), x.stride())
    with shapes_only():
        outs = _outputs(_instance(key), x, state)
    return [t.new_empty_strided((n, *t.shape[1:]), t.stride()) for t in outs]


@torch.library.custom_op("netdsl::no_backward", mutates_args=())
def no_backward(like: torch.Tensor) -> torch.Tensor:
    """What netdsl::forward's backward returns for each input: it raises when a backward runs (a trace's fake
    run of it passes, so a module whose parameters want gradients still compiles and exports for inference)."""
    raise TracedModeError("a traced netdsl module's forward has no backward: netdsl::forward is the inference "
                          "forward (train the module without torch.compile or torch.export)")


@no_backward.register_fake
def _(like):
    return torch.empty_like(like)


def _save(ctx, inputs, output):
    _, x, state = inputs
    ctx.save_for_backward(x, *state)


def _backward(ctx, grads):
    x, *state = ctx.saved_tensors
    return None, no_backward(x), [no_backward(t) for t in state]


torch.library.register_autograd("netdsl::forward", _backward, setup_context=_save)


def run(module, x):
    """The generated forward's traced path: netdsl::forward on module's state, its outputs as the module returns them."""
    net = type(module).__name__
    if module.training:
        raise TracedModeError(f"{net}: torch.compile and torch.export take a netdsl module in eval mode only "
                              f"(call .eval() first): its training forward and backward are not a registered op")
    return _unflat(module.traced_returns, torch.ops.netdsl.forward(module.traced_key, x, _state(module)))
