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
