"""`groupnorm(groups)`: torch's GroupNorm, with one program per sample and
group.  Shapes, keys and errors, the plan, forward and gradients against the
torch twin (groups of one channel, of several, of all; channels-last and
NCHW inputs; a flat input), float64 gradcheck, and the kernels compiled for
real GPUs."""
import pytest
import torch

import netdsl
from netdsl import check_text
from netdsl.compiler import checked_net
from netdsl.plan import inference_plan
from netdsl.plan.show import listing
from twin import compare, grad_compare, spread, twins

SPEC = """\
net Groups input(3, 7, 6) {
    conv(12, 3, padding=1) -> gn: groupnorm(4) -> relu
    conv(8, 1, bias=false) -> norm: groupnorm(8, eps=1e-3)
    last: groupnorm(1, affine=false)
}

net Flat input(10) {
    gn: groupnorm(5)
}

net Input input(6, 5, 5) {
    gn: groupnorm(2)
}
"""


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "g.net"
    path.write_text(SPEC)
    return path


def _spread(module, seed):
    spread(module, seed, ("gn", "norm"))


def test_shapes_keys_and_the_plan(spec):
    net = checked_net(spec, "Groups")
    assert net.out_shape == (8, 7, 6)
    m = netdsl.build(spec, "Groups")
    assert {k: tuple(v.shape) for k, v in m.state_dict().items() if "n" in k.split(".")[0]} == {
        "gn.weight": (12,), "gn.bias": (12,), "norm.weight": (8,), "norm.bias": (8,)}
    assert listing(inference_plan(net)) == """\
t1 = conv(x)  0
t2 = groupnorm(t1)  gn
t3 = relu(t2)  2
t4 = conv(t3)  3
t5 = groupnorm(t4)  norm
t6 = groupnorm(t5)  last
return t6"""


@pytest.mark.parametrize("net,shape", [("Groups", (3, 3, 7, 6)), ("Flat", (4, 10)), ("Input", (2, 6, 5, 5))])
def test_forward_and_gradients_match_torch(spec, net, shape):
    tri, ref = twins(spec, net)
    _spread(ref, seed=len(net))
    tri.load_state_dict(ref.state_dict())
    torch.manual_seed(1)
    x = torch.randn(*shape) * 2 + 0.5  # (the caller's NCHW tensor; the layers after a conv get channels-last ones)
    compare(tri, ref, x)
    grad_compare(tri, ref, x, modes=("train",))  # (group norm has no running statistics: one mode is enough)


def test_gradcheck_float64(spec):
    m = netdsl.build(spec, "Input").double()
    _spread(m, seed=3)
    torch.manual_seed(3)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True, atol=1e-6, rtol=1e-4)
    ref = netdsl.build(spec, "Input", target="torch").double()
    ref.load_state_dict(m.state_dict())
    w = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    (m(x) * w).sum().backward()
    (ref(x.detach().requires_grad_()) * w).sum().backward()
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item() < 1e-10, name


def test_kernels_compile_for_sm90_and_sm80(spec):
    from netdsl import aot
    m = netdsl.build(spec, "Groups")
    kernels = aot.signatures(m, torch.randn(2, 3, 7, 6), train=True, backward=True)
    ours = [(k, sig, meta) for k, sig, meta in kernels
            if k.fn.__name__ in ("groupnorm", "groupnorm_backward", "layernorm_param_grad")]
    assert {k.fn.__name__ for k, _, _ in ours} == {"groupnorm", "groupnorm_backward", "layernorm_param_grad"}
    for kernel, sig, meta in ours:
        for arch in (90, 80):
            info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
            assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (kernel.fn.__name__, arch, info)


def test_errors():
    res = check_text("net N input(6, 4, 4) {\n    groupnorm(4)\n}\n", "e.net")
    assert not res.ok
    assert [str(d.pos.line) + ":" + d.message for d in res.diagnostics] == [
        "2:groupnorm's 4 groups do not divide the 6 channels"]


def test_many_pixel_tiles_a_group(spec, monkeypatch):
    """Tiles of 4 pixels (a GPU's walk a group in many tiles; the interpreter's take one): the same results."""
    import triton

    from netdsl.kernels import groupnorm as kgn
    monkeypatch.setattr(kgn, "_tiles",
                        lambda rt, x4, groups: (max(2, triton.next_power_of_2(x4.shape[1] // groups)), 4))
    tri, ref = twins(spec, "Input")
    _spread(ref, seed=5)
    tri.load_state_dict(ref.state_dict())
    torch.manual_seed(5)
    x = torch.randn(2, 6, 5, 5)
    compare(tri, ref, x)
    grad_compare(tri, ref, x, modes=("train",))
