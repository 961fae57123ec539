"""`mul { a ; b }`: a product of branches with broadcasting, which with
`identity` as one branch is squeeze-and-excitation (x · gate(x)).  Shapes
and errors, the plan it lowers to, forward and gradients against the torch
twin (each broadcast pattern: a per-channel gate, a per-pixel one, both
factors broadcast), float64 gradcheck, and the kernels compiled for real
GPUs."""
import pytest
import torch

import netdsl
from netdsl import check_text
from netdsl.compiler import checked_net
from netdsl.plan import inference_plan
from netdsl.plan.show import listing
from twin import compare, grad_compare, twins

SPEC = """\
block SE(c, squeeze) {
    mul {
        identity
        { global_avgpool -> fc1: conv(squeeze, 1) -> relu -> fc2: conv(c, 1) -> hardsigmoid }
    }
}

net Gate input(16, 8, 8) {
    conv(16, 3, padding=1, bias=false) -> bn -> relu
    se: SE(16, 4)
    conv(8, 1)
}

net Spatial input(6, 7, 5) {
    conv(6, 3, padding=1) -> relu
    mul {
        identity
        conv(1, 3, padding=1) -> sigmoid
    }
}

net Outer input(6, 7, 5) {
    mul {
        global_avgpool -> conv(6, 1)
        conv(1, 1) -> tanh
        identity
    }
}
"""


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    p = tmp_path_factory.mktemp("mul") / "se.net"
    p.write_text(SPEC)
    return str(p)


def test_shapes_and_table():
    res = check_text(SPEC, "se.net")
    assert not res.diagnostics
    net = {n.name: n for n in res.nets}
    assert net["Gate"].out_shape == (8, 8, 8) and net["Spatial"].out_shape == (6, 7, 5)
    assert net["Outer"].out_shape == (6, 7, 5)


def test_the_plan_of_squeeze_and_excitation(spec):
    """(branches share their join's scope, as torchvision's SqueezeExcitation
    holds fc1 and fc2 directly: its keys are se.fc1.weight, ...)  The product
    is made by the conv after it as it loads x (the gate_in_prologue pass,
    test_gate.py)."""
    plan = inference_plan(checked_net(spec, "Gate"), disable={"gate_in_prologue"})
    assert listing(plan) == """\
t1 = conv_bn_relu(x)  0 1 2
t2 = global_avgpool(t1)  se.1
t3 = conv_relu(t2)  se.fc1 se.3
t4 = conv_hardsigmoid(t3)  se.fc2 se.5
t5 = mul(t1, t4)  se
t6 = conv(t5)  4
return t6"""
    assert listing(inference_plan(checked_net(spec, "Gate"))).endswith("""\
t5 = gate_conv(t1, t4)  4
return t5""")


@pytest.mark.parametrize("net", ["Gate", "Spatial", "Outer"])
def test_against_torch(spec, net):
    tri, ref = twins(spec, net, seed=len(net))
    torch.manual_seed(len(net))
    x = torch.randn(3, *tri.input_shape)
    compare(tri, ref, x)
    grad_compare(tri, ref, x)


@pytest.mark.parametrize("net", ["Outer"])  # (both factors broadcast: each reduction of mul_grad)
def test_gradcheck_float64(spec, net):
    m = netdsl.build(spec, net).double().train()
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in m.named_parameters()]
    torch.manual_seed(3)
    x = torch.randn(2, *m.input_shape, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))
    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True, atol=1e-6, rtol=1e-4)


def test_kernels_compile_for_sm90_and_sm80(spec):
    from netdsl import aot
    m = netdsl.build(spec, "Outer")
    kernels = aot.signatures(m, torch.randn(2, 6, 7, 5), train=True, backward=True)
    names = {k.fn.__name__ for k, _, _ in kernels}
    assert "mul_grad" in names
    assert any(meta.get("OP") == 6 for k, _, meta in kernels if k.fn.__name__ == "elementwise")
    for kernel, sig, meta in kernels:
        if kernel.fn.__name__ in ("mul_grad", "elementwise"):
            for arch in (90, 80):
                info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
                assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (kernel.fn.__name__, arch, info)
