"""Backward: every kernel family passes torch.autograd.gradcheck in float64,
and the fp32 gradients of the same small networks (and of the zoo, in
test_train.py) agree with the --target torch twin."""
import pytest
import torch

import netdsl
from test_kernels import CONFIGS, spec_path  # noqa: F401  (the fixture)
from twin import grad_compare, randomize, twins

# dropout draws a fresh mask per call, which finite differences cannot follow
GRADCHECK = [c for c in CONFIGS if "dropout" not in c[2]]


def _gradcheck_cases():
    """Every family in train mode in the default run; the random convs (the
    slowest under the interpreter in float64), the deferred batch norms and
    projection shortcuts (the default run has test_deferred_bn.py's
    comparisons with torch), dense blocks (test_fork_grads.py's) and eval
    mode in the slow run."""
    cases = []
    for name, shape, body in GRADCHECK:
        for mode in ("train", "eval"):
            slow = mode == "eval" or (name.startswith("Conv") and name not in ("Conv0", "ConvT0")) \
                or name in ("Depthwise", "Wide", "Deferred", "Dense", "ResidualProj")
            marks = [pytest.mark.slow] if slow else []
            cases.append(pytest.param(name, shape, body, mode, marks=marks, id=f"{name}-{mode}"))
    return cases


def _functional(module, names):
    def f(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x,))
    return f


@pytest.mark.parametrize("name,shape,body,mode", _gradcheck_cases())
def test_gradcheck_float64(spec_path, name, shape, body, mode):  # noqa: F811
    m = netdsl.build(spec_path, name)
    randomize(m, seed=len(name))
    m = m.double()
    getattr(m, mode)()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = [p.detach().clone().requires_grad_() for n, p in m.named_parameters() if p.requires_grad]
    torch.manual_seed(len(name) + 7)
    x = torch.randn(2, *shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_functional(m, names), (x, *params), fast_mode=True, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name,shape,body", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_grads_against_torch_twin(spec_path, name, shape, body):  # noqa: F811
    tri, ref = twins(spec_path, name, seed=sum(map(ord, name)))
    torch.manual_seed(len(name))
    x = torch.randn(3, *shape)
    grad_compare(tri, ref, x)


def test_dropout_backward_uses_the_forward_mask(tmp_path):
    p = tmp_path / "d.net"
    p.write_text("net D input(32, 8, 8) { dropout(0.3) }\n")
    m = netdsl.build(str(p), "D").train()
    x = (torch.rand(4, 32, 8, 8) + 1.0).requires_grad_()
    y = m(x)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    kept = y != 0
    assert 0.25 < 1 - kept.float().mean().item() < 0.35
    assert torch.allclose(x.grad, torch.where(kept, w / 0.7, torch.zeros_like(w)))


def test_maxpool_ties_go_to_the_first_maximum_like_torch(tmp_path):
    # after a ReLU, windows of zeros are common: torch sends the gradient to the
    # first zero in row-major order, and so must we
    p = tmp_path / "m.net"
    p.write_text("net M input(3, 9, 9) { relu -> maxpool(3, stride=2, padding=1) }\n")
    tri = netdsl.build(str(p), "M")
    ref = netdsl.build(str(p), "M", target="torch")
    x = torch.randn(2, 3, 9, 9) - 0.8
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(2, 3, 5, 5)
    (tri(xa) * w).sum().backward()
    (ref(xb) * w).sum().backward()
    assert torch.equal(xa.grad != 0, xb.grad != 0)  # the same receivers
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)  # overlapping windows: summation order


def test_second_backward_and_double_backward_are_refused(tmp_path):
    p = tmp_path / "c.net"
    p.write_text("net C input(2, 6, 6) { conv(3, 3) -> bn -> relu -> flatten -> linear(2) }\n")
    m = netdsl.build(str(p), "C")
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    loss = m(x).square().sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()  # as torch: the saved tensors are freed
    # the backward kernels are not themselves differentiable: asking for a
    # gradient of a gradient is an error, never a silent zero
    (g,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()
