"""The `se_gate` plan pass: a squeeze-and-excitation gate whose input a
direct depthwise conv makes runs as one launch, pooling the per-tile sums
that conv's epilogue left instead of reading its output again.  Plan text
before and after, plans it leaves alone, numbers against torch (and a
float64 twin), the figures against a recorded run, and both kernels
compiled for real GPUs."""
import sys

import pytest
import torch

import netdsl
from conftest import ROOT
from netdsl import runtime as rt
from netdsl.compiler import check_text, checked_net
from netdsl.fusion import fuse
from netdsl.plan import inference_plan
from netdsl.plan.cost import launches
from netdsl.plan.depthwise_direct import depthwise_direct
from netdsl.plan.lower import lower
from netdsl.plan.se_gate import se_gate
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
    dw: conv(16, 3, padding=1, groups=16, bias=false) -> bn -> hardswish
    se: SE(16, 8)
    project: conv(8, 1, bias=false) -> bn
    residual { conv(8, 1) -> relu -> SE(8, 4) -> conv(8, 3, padding=1, bias=false) -> bn }
    conv(8, 3, stride=2, padding=1, groups=8) -> SE(8, 4) -> relu
    conv(4, 1)
}
"""

# the first and last gates' inputs are made by depthwise convs (with and without a folded BN); the middle
# one's by a 1×1 conv, which keeps its pool and convs
BEFORE = """\
t1 = conv_bn_hardswish(x)  0 1 2
t2 = depthwise_conv_bn_hardswish(t1)  dw 4 5
t3 = global_avgpool(t2)  se.1
t4 = conv_relu(t3)  se.fc1 se.3
t5 = conv_hardsigmoid(t4)  se.fc2 se.5
t6 = gate_conv_bn(t2, t5)  project 8
t7 = conv_relu(t6)  9 10
t8 = global_avgpool(t7)  11.1
t9 = conv_relu(t8)  11.fc1 11.3
t10 = conv_hardsigmoid(t9)  11.fc2 11.5
t11 = gate_conv_bn_add(t7, t6, t10)  12 13
t12 = depthwise_conv(t11)  14
t13 = global_avgpool(t12)  15.1
t14 = conv_relu(t13)  15.fc1 15.3
t15 = conv_hardsigmoid(t14)  15.fc2 15.5
t16 = mul(t12, t15)  15
t17 = relu(t16)  16
t18 = conv(t17)  17
return t18"""

AFTER = """\
t1 = conv_bn_hardswish(x)  0 1 2
t2, t3 = depthwise_conv_bn_hardswish(t1)  dw 4 5
t4 = se_gate(t2, t3)  se.1 se.fc1 se.3 se.fc2 se.5
t5 = gate_conv_bn(t2, t4)  project 8
t6 = conv_relu(t5)  9 10
t7 = global_avgpool(t6)  11.1
t8 = conv_relu(t7)  11.fc1 11.3
t9 = conv_hardsigmoid(t8)  11.fc2 11.5
t10 = gate_conv_bn_add(t6, t5, t9)  12 13
t11, t12 = depthwise_conv(t10)  14
t13 = se_gate(t11, t12)  15.1 15.fc1 15.3 15.fc2 15.5
t14 = mul(t11, t13)  15
t15 = relu(t14)  16
t16 = conv(t15)  17
return t16"""


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    p = tmp_path_factory.mktemp("se_gate") / "se.net"
    p.write_text(SPEC)
    return p


def test_the_plan_before_and_after(spec):
    net = checked_net(spec, "Gated")
    assert listing(inference_plan(net, disable={"se_gate"})) == BEFORE
    assert listing(inference_plan(net)) == AFTER
    # (by itself, on the plan depthwise_direct left: the gate_in_prologue products stay muls)
    alone = listing(se_gate(depthwise_direct(lower(fuse(net)))).renumbered())
    assert alone.count("se_gate(") == 2 and alone.count("global_avgpool(") == 1 and "gate_conv" not in alone


def test_no_change_without_a_gate_on_a_depthwise_conv(spec):
    """ResNet has no gates; RegNetY's follow grouped convs (not depthwise); a gate whose pooled value is also
    returned keeps its launches; and without depthwise_direct no conv leaves sums."""
    for file, name in (("resnet.net", "ResNet18"), ("regnet.net", "RegNetY_400MF")):
        plan = lower(fuse(checked_net(str(ROOT / "specs" / file), name)))
        plan = depthwise_direct(plan)
        assert se_gate(plan) == plan
    returned = ("net T input(4, 5, 5) {\n  conv(4, 3, padding=1, groups=4) -> as @d\n"
                "  @d -> global_avgpool -> as @p\n  @p -> conv(2, 1) -> relu -> conv(4, 1) -> sigmoid -> as @g\n"
                "  mul { @d ; @g }\n  return @p, @g\n}\n")
    plan = depthwise_direct(lower(fuse(check_text(returned, "t.net").nets[0])))
    assert se_gate(plan) == plan
    plan = lower(fuse(checked_net(spec, "Gated")))
    assert se_gate(plan) == plan


def test_against_torch_and_a_float64_twin(spec):
    tri, ref = twins(spec, "Gated")
    torch.manual_seed(5)
    x = torch.randn(3, 8, 7, 6)
    compare(tri, ref, x)  # eval (the sums), train mode without gradients (the gate pools the BN's output)
    source = open(sys.modules[type(tri).__module__].__file__).read()
    assert source.count("pool=True") == 2 and source.count("rt.se_gate(") == 2
    t64, r64 = twins(spec, "Gated", seed=1)
    t64, r64 = t64.double().eval(), r64.double().eval()
    with torch.no_grad():
        y, yr = t64(x.double()), r64(x.double())
    assert (y - yr).abs().max() <= 1e-12 * yr.abs().max()


def test_a_wide_gate_against_torch(tmp_path):
    """3840 channels squeezed to 160 (EfficientNet-B7's widest), in blocks of channels, at float64."""
    wide = tmp_path / "wide.net"
    wide.write_text(WIDE)
    tri, ref = twins(wide, "B7")
    tri, ref = tri.double().eval(), ref.double().eval()
    x = torch.randn(2, 3840, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, yr = tri(x), ref(x)
    assert (y - yr).abs().max() <= 1e-12 * yr.abs().max()


def test_the_figures_are_a_recorded_runs(spec):
    """The depthwise convs write their per-tile sums (a GPU's 32-pixel tiles: 2 rows a sample for 7×6
    pixels, 1 for 4×3), the gates read them and their convs' weights and biases."""
    net = checked_net(spec, "Gated")
    batch = 3
    fig = launches(inference_plan(net), batch)
    model = netdsl.build(spec, "Gated").eval()
    x = torch.randn(batch, *net.input_shape)
    with torch.no_grad():
        model(x)  # (the batch-norm folds, cached)
        with rt.plan_launches() as recorded:
            model(x)
    assert len(fig.launches) == len(recorded) == 14
    assert [l.bytes for l in fig.launches] == [bench.launch_bytes(*r) for r in recorded]
    gate = fig.launches[2]
    assert gate.step.op == "se_gate"
    assert gate.bytes == 4 * (batch * 2 * 16 + (8 * 16 + 8) + (16 * 8 + 16) + batch * 16)


# EfficientNet-B7's widest gate (3840 channels squeezed to 160), and the widest squeeze a gate takes
WIDE = SPEC.split("net Gated")[0].replace("relu", "silu").replace("hardsigmoid", "sigmoid") + """\
net B7 input(3840, 7, 7) {
    conv(3840, 3, padding=1, groups=3840, bias=false) -> bn -> silu
    SE(3840, 160)
}
net Widest input(64, 4, 4) {
    conv(64, 3, padding=1, groups=64) -> SE(64, 1024)
}
"""


def test_the_gate_and_pooling_depthwise_conv_compile_for_sm90_and_sm80(spec, tmp_path):
    from netdsl import aot

    wide = tmp_path / "wide.net"
    wide.write_text(WIDE)
    kernels = []
    for file, name, shape in ((spec, "Gated", (2, 8, 7, 6)), (wide, "B7", (2, 3840, 7, 7)),
                              (wide, "Widest", (2, 64, 4, 4))):
        m = netdsl.build(file, name).eval()
        kernels += [k for k in aot.signatures(m, torch.randn(*shape))
                    if k[2].get("POOL") or k[0].fn.__name__ == "se_gate"]
    # (Gated's gates squeeze to at most 16 channels: one specialisation of the generic kernel)
    assert sorted(k[0].fn.__name__.split("__")[0] for k in kernels) == \
        ["depthwise_conv", "depthwise_conv", "depthwise_conv_bn_hardswish", "depthwise_conv_bn_silu"] + ["se_gate"] * 3
    for kernel, sig, meta in kernels:
        for arch in (90, 80):
            info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
            assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (kernel.fn.__name__, arch, info)
