"""The `depthwise_direct` plan pass and the direct depthwise kernel
(kernels/depthwise.py): the plan before and after the pass and where it
must not apply, eval and train-mode (no gradient) outputs against the torch
twin over kernel sizes, strides, dilations, a residual add and every kind of
epilogue, with the pass on and off, and the kernels compiled for real GPUs.
(Whole networks against torchvision's: test_tv_models.py.)"""
import pytest
import torch

import netdsl
from netdsl.compiler import checked_net
from netdsl.plan import inference_plan
from netdsl.plan.show import listing
from twin import compare, twins

SPEC = """\
net Depthwise input(8, 9, 7) {
    conv(8, 3, padding=1, groups=8) -> bn -> relu6
    residual { conv(8, 5, padding=2, groups=8, bias=false) -> bn }
    relu
    conv(8, 3, stride=2, padding=2, dilation=2, groups=8) -> hardswish
    conv(8, (1, 3), stride=(1, 2), groups=8, bias=false) -> silu
    conv(16, 1)
}

net NotDepthwise input(8, 6, 6) {
    conv(16, 3, padding=1, groups=8)
    conv(16, 3, padding=1, groups=4)
}

net Filter input(3, 6, 6) {
    conv(weight=[[0, 1, 0], [1, -4, 1], [0, 1, 0]], padding=1)
}
"""


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "d.net"
    path.write_text(SPEC)
    return path


def test_the_plan_before_and_after(spec):
    net = checked_net(spec, "Depthwise")
    before = listing(inference_plan(net, disable={"depthwise_direct"}))
    assert before == """\
t1 = conv_bn_relu6(x)  0 1 2
t2 = conv_bn_add_relu(t1, t1)  3 4 5
t3 = conv_hardswish(t2)  6 7
t4 = conv_silu(t3)  8 9
t5 = conv(t4)  10
return t5"""
    after = listing(inference_plan(net))
    assert after == """\
t1 = depthwise_conv_bn_relu6(x)  0 1 2
t2 = depthwise_conv_bn_add_relu(t1, t1)  3 4 5
t3 = depthwise_conv_hardswish(t2)  6 7
t4 = depthwise_conv_silu(t3)  8 9
t5 = conv(t4)  10
return t5"""


def test_no_change_where_the_conv_is_not_one_channel_per_channel(spec):
    """A channel multiplier of 2, and groups of 4 channels: the implicit GEMM keeps them."""
    net = checked_net(spec, "NotDepthwise")
    assert listing(inference_plan(net)) == listing(inference_plan(net, disable={"depthwise_direct"}))
    assert "depthwise" not in listing(inference_plan(net))


def test_a_literal_filter_on_every_channel_is_depthwise(spec):
    """(The course's edge detector, applied to each of 3 channels.)"""
    net = checked_net(spec, "Filter")
    assert listing(inference_plan(net)) == "t1 = depthwise_conv(x)  0\nreturn t1"
    tri, ref = twins(spec, "Filter")
    compare(tri, ref, torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize("disable,layout", [((), "nchw"), ((), "channels_last"),
                                            pytest.param(("depthwise_direct",), "nchw", marks=pytest.mark.slow)],
                         ids=["direct-nchw", "direct-channels_last", "gemm-nchw"])
def test_against_torch(spec, disable, layout):
    """Eval mode (BN folded into the epilogue) and train mode without gradients (BN statistics of the
    conv's output, then an apply kernel); the first conv reads the caller's tensor in either layout."""
    tri, ref = twins(spec, "Depthwise", disable=list(disable))
    torch.manual_seed(2)
    x = torch.randn(3, 8, 9, 7)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    compare(tri, ref, x)


def test_the_generated_forward_calls_the_direct_kernel(spec):
    import inspect
    import sys

    src = inspect.getsource(sys.modules[type(netdsl.build(spec, "Depthwise")).__module__])
    assert src.count("rt.depthwise(K, depthwise_") == 4
    assert "def depthwise_conv_bn_relu6__0(" in src


def test_kernels_compile_for_sm90_and_sm80(spec):
    from netdsl import aot
    m = netdsl.build(spec, "Depthwise").eval()
    kernels = [k for k in aot.signatures(m, torch.randn(2, 8, 9, 7)) if k[0].fn.__name__.startswith("depthwise_")]
    assert len(kernels) == 4
    for kernel, sig, meta in kernels:
        for arch in (90, 80):
            info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
            assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (kernel.fn.__name__, arch, info)
