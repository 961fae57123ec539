"""Helpers: build a Triton module and its --target torch twin with the same
state, randomise every parameter and buffer, and compare outputs."""
import copy

import torch

import netdsl


def randomize(module, seed=0):
    """Fresh random parameters and BN statistics (never the defaults' zeros and ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(3)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif t.is_floating_point() and t.dim() <= 1 and ("bn" in name or "norm" in name):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("weight") else torch.randn(t.shape, generator=g) * 0.2)


def spread(module, seed, names):
    """Weights (and layer scales) of the layers whose names contain one of `names` drawn around 1, their
    biases around 0, so each one counts (a norm's defaults are ones and zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if any(n in name for n in names):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (0.0 if name.endswith("bias") else 1.0))


def twins(path, net, seed=0, **overrides):
    tri = netdsl.build(path, net, **overrides)
    ref = netdsl.build(path, net, target="torch", **overrides)
    randomize(ref, seed)
    tri.load_state_dict(ref.state_dict())
    return tri, ref


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def compare(tri, ref, x, modes=("eval", "train"), tol=1e-4):
    """Outputs within `tol` of the torch twin.  Deep networks in train mode
    normalise every layer by small-batch statistics, which amplifies rounding:
    there torch's own fp32 result can sit further than `tol` from the exact
    (float64) one, and ours must then be no further from it than 2× torch's
    (measured on ResNet152: 0.6-0.85× torch's error)."""
    exact = copy.deepcopy(ref).double()
    for mode in modes:
        getattr(tri, mode)()
        getattr(ref, mode)()
        getattr(exact, mode)()
        with torch.no_grad():
            y, yr = tri(x), ref(x)
        assert y.shape == yr.shape, (mode, y.shape, yr.shape)
        err = rel_err(y, yr)
        if err >= tol:
            with torch.no_grad():
                y64 = exact(x.double())
            assert rel_err(y, y64) < 2 * rel_err(yr, y64), (mode, err, rel_err(y, y64), rel_err(yr, y64))
    ours, theirs, truth = tri.state_dict(), ref.state_dict(), exact.state_dict()
    for k in theirs:
        if k.endswith("running_mean") or k.endswith("running_var"):
            err = rel_err(ours[k], theirs[k])
            if err >= tol:  # the same rule as for outputs, against the float64 twin
                assert rel_err(ours[k], truth[k]) < 2 * rel_err(theirs[k], truth[k]), (k, err)
        if k.endswith("num_batches_tracked"):
            assert ours[k].item() == theirs[k].item(), k



def _grads(module, x, mode, w):
    getattr(module, mode)()
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = module(x)
    (y * w.to(y.dtype)).sum().backward()
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return y, grads


def grad_compare(tri, ref, x, modes=("train", "eval"), tol=1e-3):
    """Gradients of the input and of every parameter within `tol` of the torch
    twin's (relative to the largest entry of each), for a random weighting of
    the outputs.  Where a gradient is a cancellation (a conv bias feeding a
    train-mode batch norm is exactly zero in theory; a BN's gamma before a
    scale-invariant BN nearly so), torch's own fp32 result carries the same
    rounding noise: the rule is then compare()'s, ours no further from the
    float64 twin's gradient than 2× torch's (plus a noise floor of 1e-5 of
    the network's largest gradient, for gradients that are zero in theory).
    Deep networks with max pooling can still differ where an fp32 rounding
    flips a nearly tied maximum; then our kernels, run in float64, must match
    the float64 twin to 1e-6 on every gradient."""
    exact = copy.deepcopy(ref).double()
    for mode in modes:
        state = copy.deepcopy(ref.state_dict())  # train-mode forwards move running statistics
        with torch.no_grad():
            w = torch.randn(ref.eval()(x).shape, generator=torch.Generator().manual_seed(5))
        ya, ours = _grads(tri, x, mode, w)
        yb, theirs = _grads(ref, x, mode, w)
        assert mode == "train" or rel_err(ya, yb) < 1e-4, (mode, rel_err(ya, yb))
        truth, flips = None, []
        for name, b in theirs.items():
            a = ours[name]
            if b is None:  # a frozen parameter: no gradient, no kernel
                assert a is None, (mode, name)
                continue
            assert a is not None and a.shape == b.shape, (mode, name)
            err = rel_err(a, b)
            if err >= tol:
                if truth is None:
                    exact.load_state_dict(state)
                    truth = _grads(exact, x.double(), mode, w)[1]
                # a theoretically zero gradient is pure rounding noise: held to
                # 1e-5 of the network's largest gradient, an absolute noise floor
                floor = 1e-5 * max(t.abs().max().item() for t in truth.values() if t is not None)
                ours_off = (a.double() - truth[name]).abs().max().item()
                torch_off = (b.double() - truth[name]).abs().max().item()
                if ours_off > 2 * torch_off + floor:
                    flips.append((name, err, ours_off, torch_off))
        if flips:
            # Max pooling and ReLU are discontinuous: an fp32 forward that differs
            # from torch's in the 6th digit can pick another maximum of a nearly
            # tied window (or flip a ReLU at ~0), and route that gradient
            # elsewhere.  Then the kernels themselves must agree with the float64
            # twin when run in float64, where no such flip happens.
            ours64 = copy.deepcopy(tri).double()
            ours64.load_state_dict(state)
            g64 = _grads(ours64, x.double(), mode, w)[1]
            for name, t in truth.items():
                if t is not None:
                    assert rel_err(g64[name], t) < 1e-6, (mode, name, rel_err(g64[name], t), flips[:3])


def saved_bytes(model, x):
    """Bytes of the distinct storages one forward keeps for backward (saved-tensor hooks)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())
