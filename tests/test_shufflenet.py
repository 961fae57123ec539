"""ShuffleNet's layers: `channels(start, stop)` (a channel range, read by
its consumers through strides) and `channel_shuffle(groups)`, and the
`shuffle_in_concat` pass that stores a concatenation's parts interleaved
instead of shuffling them afterwards.  Shapes and errors, the plan before
and after the pass and where it must not apply, forward and gradients
against the torch twin with the pass on and off, float64 gradcheck, and the
kernels compiled for real GPUs.  (A unit against torchvision's
InvertedResidual: test_tv_models.py.)"""
import pytest
import torch

import netdsl
from netdsl import check_text
from netdsl.compiler import checked_net
from netdsl.plan import inference_plan
from netdsl.plan.show import listing
from twin import compare, grad_compare, twins

SPEC = """\
block Unit(c) {
    concat {
        channels(0, c // 2)
        channels(c // 2, c) -> branch2: { conv(c // 2, 1, bias=false) -> bn -> relu }
    }
    channel_shuffle(2)
}

net Units input(8, 5, 6) {
    stem: conv(8, 1)
    a: Unit(8)
    b: Unit(8)
}

net Uneven input(6, 5, 5) {
    concat {
        channels(0, 2)
        conv(4, 1)
    }
    channel_shuffle(2)
}

net Alone input(12, 3, 4) {
    conv(12, 1) -> channel_shuffle(3) -> channels(4, 10)
}
"""


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "s.net"
    path.write_text(SPEC)
    return path


def test_shapes(spec):
    res = check_text(SPEC, str(spec))
    assert res.ok, res.diagnostics
    out = {n.name: n.out_shape for n in res.nets}
    assert out == {"Units": (8, 5, 6), "Uneven": (6, 5, 5), "Alone": (6, 3, 4)}


def test_the_plan_before_and_after_shuffle_in_concat(spec):
    net = checked_net(spec, "Units")
    assert listing(inference_plan(net, disable={"shuffle_in_concat"})) == """\
t1 = conv(x)  stem
t2 = buffer(t1)  a
t2[4:8] = conv_bn_relu(t1[4:8])  a.branch2.0 a.branch2.1 a.branch2.2
t2[0:4] = copy(t1[0:4])  a
t4 = channel_shuffle(t2)  a.3
t5 = buffer(t4)  b
t5[4:8] = conv_bn_relu(t4[4:8])  b.branch2.0 b.branch2.1 b.branch2.2
t5[0:4] = copy(t4[0:4])  b
t7 = channel_shuffle(t5)  b.3
return t7"""
    # each part goes to every other channel of the buffer, which is the shuffled tensor
    assert listing(inference_plan(net)) == """\
t1 = conv(x)  stem
t2 = buffer(t1)  a
t2[1::2] = conv_bn_relu(t1[4:8])  a.branch2.0 a.branch2.1 a.branch2.2
t2[0::2] = copy(t1[0:4])  a
t4 = buffer(t2)  b
t4[1::2] = conv_bn_relu(t2[4:8])  b.branch2.0 b.branch2.1 b.branch2.2
t4[0::2] = copy(t2[0:4])  b
return t4"""


@pytest.mark.parametrize("net", ["Uneven", "Alone"])
def test_where_the_pass_does_not_apply(spec, net):
    """Parts of unequal width, and a shuffle of a conv's output: the plan keeps its shuffle."""
    n = checked_net(spec, net)
    assert listing(inference_plan(n)) == listing(inference_plan(n, disable={"shuffle_in_concat"}))
    assert "channel_shuffle" in listing(inference_plan(n))


@pytest.mark.parametrize("net", ["Units", "Uneven", "Alone"])
@pytest.mark.parametrize("disable", [(), ("shuffle_in_concat",)], ids=["on", "off"])
def test_against_torch(spec, net, disable):
    tri, ref = twins(spec, net, seed=len(net), disable=list(disable))
    torch.manual_seed(len(net))
    x = torch.randn(3, *tri.input_shape)
    compare(tri, ref, x)
    if not disable:  # (the pass changes the inference forward only)
        grad_compare(tri, ref, x, modes=("train",))


def test_gradcheck_float64(spec):
    m = netdsl.build(spec, "Alone").double().train()
    torch.manual_seed(2)
    x = torch.randn(2, 12, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True, atol=1e-6, rtol=1e-4)
    units = netdsl.build(spec, "Units").double().train()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(units, (x,), fast_mode=True, atol=1e-6, rtol=1e-4)


def test_kernels_compile_for_sm90_and_sm80(spec):
    from netdsl import aot
    kernels = []
    for off in ((), ("split_channels",)):  # a split's gradient is copies; a channel range's alone, op 10's
        m = netdsl.build(spec, "Units", disable=list(off))
        kernels += aot.signatures(m, torch.randn(2, 8, 5, 6), train=True, backward=True)
    ops = {meta["OP"] for k, _, meta in kernels if k.fn.__name__ == "elementwise"}
    assert {3, 9, 10} <= ops  # the copies of a split's gradient, the shuffle, and a channel range's gradient
    for kernel, sig, meta in kernels:
        if kernel.fn.__name__ == "elementwise" and meta["OP"] in (3, 9, 10):
            for arch in (90, 80):
                info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
                assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (meta["OP"], arch, info)


@pytest.mark.parametrize("body,message", [
    ("input(8, 4, 4) { channels(4, 12) }", "channels(4, 12) reaches past the input's 8 channels"),
    ("input(8, 4, 4) { channels(4, 4) }", "channels(4, 4) is empty: stop must be above start"),
    ("input(8, 4, 4) { flatten -> channels(0, 4) }", "channels needs a C×H×W input but gets 128"),
    ("input(6, 4, 4) { channel_shuffle(4) }", "channel_shuffle's 4 groups do not divide the 6 channels"),
])
def test_errors(body, message):
    res = check_text(f"net N {body}\n", "e.net")
    assert not res.ok
    assert [d.message for d in res.diagnostics if message in d.message], [d.message for d in res.diagnostics]
