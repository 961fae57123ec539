"""The `gate_in_prologue` plan pass: a squeeze-and-excitation product
x · gate read only by a conv is made by that conv as it loads x.  The plan
before and after, where it must not apply, outputs against the torch twin
(eval, and train mode without gradients), the plan's figures against a
recorded run, and the gated conv compiled for real GPUs."""
import sys

import pytest
import torch

import netdsl
from conftest import ROOT
from netdsl import runtime as rt
from netdsl.compiler import checked_net
from netdsl.plan import inference_plan
from netdsl.plan.cost import launches
from netdsl.plan.gate_in_prologue import gate_in_prologue
from netdsl.plan.lower import lower
from netdsl.fusion import fuse
from netdsl.plan.show import listing
from twin import compare, twins

sys.path.insert(0, str(ROOT / "bench"))
import fusion as bench  # noqa: E402  (the launch bytes bench/fusion.py records)

SPEC = """\
block SE(c, squeeze) {
    mul {
        identity
        { global_avgpool -> fc1: conv(squeeze, 1) -> relu -> fc2: conv(c, 1) -> hardsigmoid }
    }
}

net Gated input(8, 7, 6) {
    conv(16, 3, padding=1, bias=false) -> bn -> hardswish
    se: SE(16, 8)
    project: conv(8, 1, bias=false) -> bn
    residual { conv(8, 1) -> relu -> SE(8, 4) -> conv(8, 3, padding=1, bias=false) -> bn }
    SE(8, 4) -> relu
    conv(4, 1)
}
"""

BEFORE = """\
t1 = conv_bn_hardswish(x)  0 1 2
t2 = global_avgpool(t1)  se.1
t3 = conv_relu(t2)  se.fc1 se.3
t4 = conv_hardsigmoid(t3)  se.fc2 se.5
t5 = mul(t1, t4)  se
t6 = conv_bn(t5)  project 5
t7 = conv_relu(t6)  6 7
t8 = global_avgpool(t7)  8.1
t9 = conv_relu(t8)  8.fc1 8.3
t10 = conv_hardsigmoid(t9)  8.fc2 8.5
t11 = mul(t7, t10)  8
t12 = conv_bn_add(t11, t6)  9 10
t13 = global_avgpool(t12)  11.1
t14 = conv_relu(t13)  11.fc1 11.3
t15 = conv_hardsigmoid(t14)  11.fc2 11.5
t16 = mul(t12, t15)  11
t17 = relu(t16)  12
t18 = conv(t17)  13
return t18"""

# the first two products go into their convs' loads (the second's conv also adds the shortcut); the last
# feeds a relu, and stays
AFTER = """\
t1 = conv_bn_hardswish(x)  0 1 2
t2 = global_avgpool(t1)  se.1
t3 = conv_relu(t2)  se.fc1 se.3
t4 = conv_hardsigmoid(t3)  se.fc2 se.5
t5 = gate_conv_bn(t1, t4)  project 5
t6 = conv_relu(t5)  6 7
t7 = global_avgpool(t6)  8.1
t8 = conv_relu(t7)  8.fc1 8.3
t9 = conv_hardsigmoid(t8)  8.fc2 8.5
t10 = gate_conv_bn_add(t6, t5, t9)  9 10
t11 = global_avgpool(t10)  11.1
t12 = conv_relu(t11)  11.fc1 11.3
t13 = conv_hardsigmoid(t12)  11.fc2 11.5
t14 = mul(t10, t13)  11
t15 = relu(t14)  12
t16 = conv(t15)  13
return t16"""


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    p = tmp_path_factory.mktemp("gate") / "se.net"
    p.write_text(SPEC)
    return p


def test_the_plan_before_and_after(spec):
    net = checked_net(spec, "Gated")
    assert listing(inference_plan(net, disable={"gate_in_prologue"})) == BEFORE
    assert listing(gate_in_prologue(lower(fuse(net))).renumbered()) == AFTER
    assert listing(inference_plan(net)) == AFTER


def test_no_change_without_a_product_a_conv_alone_reads():
    """ResNet has no products; a product read twice (the gate's input feeds a second product) keeps its launch."""
    net = checked_net(str(ROOT / "specs" / "resnet.net"), "ResNet18")
    plan = lower(fuse(net))
    assert gate_in_prologue(plan) == plan
    twice = "net T input(4, 5, 5) {\n  mul { identity ; { global_avgpool -> sigmoid } } -> as @p\n" \
            "  conv(4, 1) -> as @a\n  @p -> conv(4, 1)\n  return @a, @p\n}\n"
    from netdsl.compiler import check_text

    plan = lower(fuse(check_text(twice, "t.net").nets[0]))
    assert gate_in_prologue(plan) == plan


@pytest.mark.parametrize("layout", ["nchw", pytest.param("channels_last", marks=pytest.mark.slow)])
def test_against_torch(spec, layout):
    tri, ref = twins(spec, "Gated")
    torch.manual_seed(7)
    x = torch.randn(3, 8, 7, 6)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    compare(tri, ref, x)
    assert "gate=" in open(sys.modules[type(tri).__module__].__file__).read()


def test_the_figures_are_a_recorded_runs(spec):
    """The gated convs read x and the gate: the plan's bytes are the recorded launches' operands."""
    net = checked_net(spec, "Gated")
    batch = 3
    fig = launches(inference_plan(net), batch)
    model = netdsl.build(spec, "Gated").eval()
    x = torch.randn(batch, *net.input_shape)
    with torch.no_grad():
        model(x)  # (the batch-norm folds, cached)
        with rt.plan_launches() as recorded:
            model(x)
    assert len(fig.launches) == len(recorded) == 16
    assert [l.bytes for l in fig.launches] == [bench.launch_bytes(*r) for r in recorded]


def test_the_gated_conv_compiles_for_sm90_and_sm80(spec):
    from netdsl import aot

    m = netdsl.build(spec, "Gated").eval()
    kernels = [k for k in aot.signatures(m, torch.randn(2, 8, 7, 6)) if k[2].get("IN_GATE")]
    assert len(kernels) == 2
    for kernel, sig, meta in kernels:
        for arch in (90, 80):
            info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
            assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (kernel.fn.__name__, arch, info)
