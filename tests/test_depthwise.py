"""The `depthwise_direct` plan pass and the direct depthwise kernels
(kernels/depthwise.py): the plan before and after the pass and where it
must not apply, eval and train-mode outputs and gradients against the torch
twin over kernel sizes, strides, dilations, a residual add and every kind of
epilogue, with the pass on and off, float64 gradcheck, a GPU's many small
tiles, and the kernels compiled for real GPUs.  (Whole networks against
torchvision's: test_tv_models.py.)"""
import inspect
import sys

import pytest
import torch

import netdsl
from netdsl import runtime as rt
from netdsl.compiler import checked_net
from netdsl.kernels import depthwise as kdw
from netdsl.plan import inference_plan
from netdsl.plan.show import listing
from twin import compare, grad_compare, rel_err, twins

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


def _source(model) -> str:
    return inspect.getsource(sys.modules[type(model).__module__])


def test_the_generated_forward_calls_the_direct_kernel(spec):
    src = _source(netdsl.build(spec, "Depthwise"))
    forward, autograd = src.split("def forward_autograd")
    assert forward.count("rt.depthwise(K, depthwise_") == 4
    assert "def depthwise_conv_bn_relu6__0(" in src
    # the autograd forward: the conv by the direct kernel, its batch norm (with the residual add) and activation
    # by the kernels after it; the batch norm's statistics from the sums the direct kernel's epilogue leaves
    assert autograd.count("rt.depthwise(K, depthwise_") == 4 and "rt.conv(K" in autograd
    assert "t6, t7 = rt.depthwise(K, depthwise_conv_bn_add_relu__3, self.layer('3'), t5, stats=self.training" \
        in autograd
    assert "rt.batchnorm(K, self.layer('4'), t6, residual=t4, act='relu', partials=t7" in autograd
    assert "rt.activation(K, t9, 'hardswish')" in autograd
    src = _source(netdsl.build(spec, "Depthwise", disable=["depthwise_direct"]))
    assert "rt.depthwise(" not in src.split("def forward_autograd")[1]


@pytest.mark.parametrize("disable,layout", [((), "channels_last"), pytest.param((), "nchw", marks=pytest.mark.slow)])
def test_gradients_against_torch(spec, disable, layout):
    """Train and eval mode: the input's and every parameter's gradients, through the direct backward
    kernels (input, weight and bias gradients) and the batch-norm kernels after them."""
    tri, ref = twins(spec, "Depthwise", disable=list(disable))
    torch.manual_seed(3)
    x = torch.randn(3, 8, 9, 7)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad_compare(tri, ref, x)


GEOMETRIES = [dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=5, stride=2, padding=2),
              dict(kernel_size=3, stride=2, padding=2, dilation=2), dict(kernel_size=(1, 3), stride=(1, 2)),
              dict(kernel_size=2, stride=3, padding=1)]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
def test_gradcheck_float64(tmp_path, geometry):
    """The conv alone in float64: gradcheck on the input, and the weight and bias gradients against
    torch's conv2d, for windows that skip inputs (stride 3 over a 2-wide window) and overlap them."""
    g = dict(geometry, dilation=geometry.get("dilation", 1), padding=geometry.get("padding", 0))
    args = ", ".join(f"{k}={v!r}".replace("[", "(").replace("]", ")") for k, v in g.items() if k != "kernel_size")
    (tmp_path / "g.net").write_text(f"net G input(4, 7, 8) {{ conv(4, {g['kernel_size']!r}, {args}, groups=4) }}\n")
    m = netdsl.build(tmp_path / "g.net", "G").double()
    assert "rt.depthwise(" in _source(m).split("def forward_autograd")[1]
    torch.manual_seed(5)
    with torch.no_grad():
        m.layer("0").bias.normal_()
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True, atol=1e-6, rtol=1e-4)
    conv = m.layer("0")
    w = torch.randn_like(m(x))
    (m(x) * w).sum().backward()
    ref = torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, 4)
    dx, dw, db = torch.autograd.grad((ref * w).sum(), (x, conv.weight, conv.bias))
    assert rel_err(conv.weight.grad, dw) < 1e-12 and rel_err(conv.bias.grad, db) < 1e-12


def test_many_programs(spec, monkeypatch):
    """Tiles of 8 pixels and 4 channels (a GPU's grid has many programs; the interpreter's few) against one
    tile: the input gradient's programs each gather their own pixels (the same sums, bit for bit), the
    weight gradient's partials add up in order."""
    mod = sys.modules[type(netdsl.build(spec, "Depthwise")).__module__]
    kernel = mod.depthwise_conv_bn_relu6__0  # the first conv's: 3×3, padding 1
    K = mod.K
    torch.manual_seed(6)
    x, dy, w = torch.randn(2, 8, 9, 7), torch.randn(2, 8, 9, 7), torch.randn(8, 1, 3, 3)

    def grads():
        dx, dw, db = torch.empty_like(x), torch.empty_like(w), torch.empty(8)
        bw = kernel.netdsl_backward
        kdw.depthwise2d_dgrad(rt._rt, bw.dgrad, dy, w, dx)
        kdw.depthwise2d_wgrad(rt._rt, bw.wgrad, K.depthwise_wgrad_sum, x, dy, dw, db)
        return dx, dw, db

    one = grads()
    monkeypatch.setattr(kdw, "_tiles", lambda rt_, t, M, C: (8, 4))
    many = grads()
    assert torch.equal(one[0], many[0])
    ref = torch.nn.functional.conv2d(x.requires_grad_(), w.requires_grad_(), torch.zeros(8, requires_grad=True),
                                     padding=1, groups=8)
    want = torch.autograd.grad((ref * dy).sum(), (x, w))
    assert rel_err(many[0], want[0]) < 1e-6 and rel_err(many[1], want[1]) < 1e-6
    assert rel_err(many[2], dy.sum((0, 2, 3))) < 1e-6 and rel_err(one[1], many[1]) < 1e-6


def test_kernels_compile_for_sm90_and_sm80(spec):
    from netdsl import aot
    m = netdsl.build(spec, "Depthwise")
    x = torch.randn(2, 8, 9, 7)
    kernels = [k for k in aot.signatures(m.eval(), x) + aot.signatures(m, x, train=True, backward=True)
               if k[0].fn.__name__.startswith("depthwise_")]
    names = {k[0].fn.__name__.split("__")[0] for k in kernels}
    assert {"depthwise_dgrad", "depthwise_wgrad", "depthwise_wgrad_sum"} <= names and len(kernels) >= 12
    for kernel, sig, meta in kernels:
        for arch in (90, 80):
            info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
            assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (kernel.fn.__name__, arch, info)
