"""The plan of the training (autograd) forward (netdsl/plan/, train_plan):
each of its passes stated as plan text before and after, and a plan it
leaves alone; gradients against torch with a pass off (with every pass on,
the default plans, the other test files check them); and the generated
forward_autograd as the plan's own lines."""
import re

import pytest
import torch

import netdsl
from conftest import ROOT
from netdsl.compiler import checked_net
from netdsl.fusion import fuse, split_input_activations
from netdsl.plan import train_plan
from netdsl.plan.block_outputs import block_outputs
from netdsl.plan.concat_in_place import concat_in_place_train
from netdsl.plan.deferred_bn import deferred_bn
from netdsl.plan.depthwise_direct import depthwise_direct_train
from netdsl.plan.lower_train import lower_train
from netdsl.plan.split_channels import split_channels
from netdsl.plan.show import listing
from twin import compare, grad_compare, twins

BLOCKS = """\
block Unit(out, k = 1, s = 1) {
    conv: conv(out, k, stride=s, padding=k // 2, bias=false)
    bn: bn
    relu
}

block Bottleneck(out, down) {
    residual {
        a: Unit(4)
        b: Unit(4, 3)
        conv: conv(out, 1, bias=false) -> bn: bn
    } shortcut down: if down { conv(out, 1, bias=false) -> bn }
    relu
}

net Blocks input(3, 8, 8) {
    stem: Unit(8, 3, 2)
    pool: maxpool(3, stride=2, padding=1)
    b1: Bottleneck(16, true)
    b2: Bottleneck(16, false)
    head: { global_avgpool -> flatten -> linear(5) }
}

net Mixed input(4, 8, 8) {
    stem: Unit(8)
    mix: concat {
        a: Unit(4)
        b: { Unit(4) -> Unit(6, 3) }
        c: { maxpool(3, stride=1, padding=1) -> Unit(2) }
        d: identity
    }
    dense: dense { for j in range(2) { layer{j}: { bn -> relu -> conv(4, 3, padding=1, bias=false) } } }
    head: { global_avgpool -> flatten -> linear(5) }
}

block Half(c) {
    concat {
        channels(0, c // 2)
        channels(c // 2, c) -> b: { conv(c // 2, 1, bias=false) -> bn -> relu }
    }
    channel_shuffle(2)
}

net Shuffle input(8, 6, 6) {
    conv(8, 3, padding=1, bias=false) -> bn -> relu
    u: Half(8)
    head: { global_avgpool -> flatten -> linear(5) }
}

net Gap input(8, 6, 6) {  # channels 3 and 4 go unused: their gradient is 0
    conv(8, 3, padding=1, bias=false) -> bn -> relu
    concat { channels(0, 3) ; channels(5, 8) -> conv(3, 1) }
    head: { global_avgpool -> flatten -> linear(5) }
}

net Depthwise input(8, 6, 6) {
    dw1: conv(8, 3, padding=1, groups=8, bias=false) -> bn1: bn -> relu6
    pw: conv(16, 1) -> bn2: bn -> hardswish
    dw2: conv(16, 3, padding=1, groups=16) -> relu
    dw3: conv(16, 3, padding=1, groups=16)
    head: { global_avgpool -> flatten -> linear(5) }
}
"""

# the lowered plan: one step per autograd Function, a fork where a tensor has several consumers
LOWERED = """\
t1 = conv_bn_relu(x)  stem.conv stem.bn stem.2
t2 = maxpool(t1)  pool
t3, t4 = fork(t2)  b1
t5 = conv_bn(t3)  b1.down.0 b1.down.1
t6 = conv_bn_relu(t4)  b1.a.conv b1.a.bn b1.a.2
t7 = conv_bn_relu(t6)  b1.b.conv b1.b.bn b1.b.2
t8 = conv_bn_add_relu(t7, t5)  b1.conv b1.bn b1.5
t9, t10 = fork(t8)  b2
t11 = conv_bn_relu(t10)  b2.a.conv b2.a.bn b2.a.2
t12 = conv_bn_relu(t11)  b2.b.conv b2.b.bn b2.b.2
t13 = conv_bn_add_relu(t12, t9)  b2.conv b2.bn b2.4
t14 = global_avgpool(t13)  head.0
t15 = flatten(t14)  head.1
t16 = linear(t15)  head.2
return t16"""

# b1's output is made by b2's first conv as it loads (leave); b1's first conv runs before its downsample
BLOCK_OUTPUTS = """\
t1 = conv_bn_relu(x)  stem.conv stem.bn stem.2
t2 = maxpool(t1)  pool
t3, t4 = fork(t2)  b1
t5 = conv_bn_relu(t4)  b1.a.conv b1.a.bn b1.a.2
t6 = conv_bn(t3)  b1.down.0 b1.down.1
t7 = conv_bn_relu(t5)  b1.b.conv b1.b.bn b1.b.2
t8 = conv_bn_add_relu(t7, t6)  b1.conv b1.bn b1.5  (leave)
t9, t10 = fork(t8)  b2
t11 = conv_bn_relu(t10)  b2.a.conv b2.a.bn b2.a.2
t12 = conv_bn_relu(t11)  b2.b.conv b2.b.bn b2.b.2
t13 = conv_bn_add_relu(t12, t9)  b2.conv b2.bn b2.4
t14 = global_avgpool(t13)  head.0
t15 = flatten(t14)  head.1
t16 = linear(t15)  head.2
return t16"""

# the stem's BN + relu into the max pool; each block's first two into the conv after; the downsample's BN
# into the apply of b1's last conv, which adds it
DEFERRED = """\
t1 = conv_bn_relu(x)  stem.conv stem.bn stem.2  (defer)
t2 = maxpool(t1)  pool
t3, t4 = fork(t2)  b1
t5 = conv_bn_relu(t4)  b1.a.conv b1.a.bn b1.a.2  (defer)
t6 = conv_bn(t3)  b1.down.0 b1.down.1  (defer)
t7 = conv_bn_relu(t5)  b1.b.conv b1.b.bn b1.b.2  (defer)
t8 = conv_bn_add_relu(t7, t6)  b1.conv b1.bn b1.5  (leave)
t9, t10 = fork(t8)  b2
t11 = conv_bn_relu(t10)  b2.a.conv b2.a.bn b2.a.2  (defer)
t12 = conv_bn_relu(t11)  b2.b.conv b2.b.bn b2.b.2  (defer)
t13 = conv_bn_add_relu(t12, t9)  b2.conv b2.bn b2.4
t14 = global_avgpool(t13)  head.0
t15 = flatten(t14)  head.1
t16 = linear(t15)  head.2
return t16"""

MIXED_LOWERED = """\
t1 = conv_bn_relu(x)  stem.conv stem.bn stem.2
t2, t3, t4, t5 = fork(t1)  mix
t6 = conv_bn_relu(t5)  mix.a.conv mix.a.bn mix.a.2
t7 = conv_bn_relu(t4)  mix.b.0.conv mix.b.0.bn mix.b.0.2
t8 = conv_bn_relu(t7)  mix.b.1.conv mix.b.1.bn mix.b.1.2
t9 = maxpool(t3)  mix.c.0
t10 = conv_bn_relu(t9)  mix.c.1.conv mix.c.1.bn mix.c.1.2
t11 = concat(t6, t8, t10, t2)  mix
t12 = buffer(t11)  dense
t13, t14, t15 = fork(t11)  dense
t16 = concat(t13)  dense  (into t12[0:])
t17 = bn_relu(t16)  dense.layer0.0 dense.layer0.1
t18 = conv(t17)  dense.layer0.2
t19, t20 = fork(t18)  dense
t21 = concat(t14, t19)  dense  (into t12[0:])
t22 = bn_relu(t21)  dense.layer1.0 dense.layer1.1
t23 = conv(t22)  dense.layer1.2
t24 = concat(t15, t20, t23)  dense  (into t12[0:])
t25 = global_avgpool(t24)  head.0
t26 = flatten(t25)  head.1
t27 = linear(t26)  head.2
return t27"""

# the concatenation's buffer comes before its parts, and the parts convs make are stored in it (the max
# pool's branch ends in a conv too; the identity branch is copied); each dense layer's conv stores its feature
MIXED_IN_PLACE = """\
t1 = conv_bn_relu(x)  stem.conv stem.bn stem.2
t2, t3, t4, t5 = fork(t1)  mix
t6 = buffer(t1)  mix
t7 = conv_bn_relu(t5)  mix.a.conv mix.a.bn mix.a.2  (into t6[0:])
t8 = conv_bn_relu(t4)  mix.b.0.conv mix.b.0.bn mix.b.0.2
t9 = conv_bn_relu(t8)  mix.b.1.conv mix.b.1.bn mix.b.1.2  (into t6[4:])
t10 = maxpool(t3)  mix.c.0
t11 = conv_bn_relu(t10)  mix.c.1.conv mix.c.1.bn mix.c.1.2  (into t6[10:])
t12 = concat(t7, t9, t11, t2)  mix  (into t6[0:])
t13 = buffer(t12)  dense
t14, t15, t16 = fork(t12)  dense
t17 = concat(t14)  dense  (into t13[0:])
t18 = bn_relu(t17)  dense.layer0.0 dense.layer0.1
t19 = conv(t18)  dense.layer0.2  (into t13[20:])
t20, t21 = fork(t19)  dense
t22 = concat(t15, t20)  dense  (into t13[0:])
t23 = bn_relu(t22)  dense.layer1.0 dense.layer1.1
t24 = conv(t23)  dense.layer1.2  (into t13[24:])
t25 = concat(t16, t21, t24)  dense  (into t13[0:])
t26 = global_avgpool(t25)  head.0
t27 = flatten(t26)  head.1
t28 = linear(t27)  head.2
return t28"""

DEPTHWISE_LOWERED = """\
t1 = conv_bn_relu6(x)  dw1 bn1 2
t2 = conv_bn(t1)  pw bn2
t3 = hardswish(t2)  5
t4 = conv_relu(t3)  dw2 7
t5 = conv(t4)  dw3
t6 = global_avgpool(t5)  head.0
t7 = flatten(t6)  head.1
t8 = linear(t7)  head.2
return t8"""

# the direct kernel does each depthwise conv (and its bias); its BN and activation run in the kernels after
# (the BN kernels for a BN, the elementwise kernel for an activation alone); a BN's statistics come from the
# per-tile sums the direct kernel's epilogue leaves (t2)
DEPTHWISE_DIRECT = """\
t1, t2 = depthwise_conv(x)  dw1
t3 = bn_relu6(t1)  bn1 2  (partials t2)
t4 = conv_bn(t3)  pw bn2
t5 = hardswish(t4)  5
t6 = depthwise_conv(t5)  dw2
t7 = relu(t6)  7
t8 = depthwise_conv(t7)  dw3
t9 = global_avgpool(t8)  head.0
t10 = flatten(t9)  head.1
t11 = linear(t10)  head.2
return t11"""


# ShuffleNet's halves: a fork, each half's channels step (whose gradient is whole-size, zeros in the other half)
SHUFFLE_IN_PLACE = """\
t1 = conv_bn_relu(x)  0 1 2
t2, t3 = fork(t1)  u
t4 = buffer(t1)  u
t5 = channels(t3)  u.0
t6 = channels(t2)  u.1
t7 = conv_bn_relu(t6)  u.b.0 u.b.1 u.b.2  (into t4[4:])
t8 = concat(t5, t7)  u  (into t4[0:])
t9 = channel_shuffle(t8)  u.3
t10 = global_avgpool(t9)  head.0
t11 = flatten(t10)  head.1
t12 = linear(t11)  head.2
return t12"""

# one split: its backward writes the halves' gradients side by side
SHUFFLE_SPLIT = """\
t1 = conv_bn_relu(x)  0 1 2
t2, t3 = split(t1)  u.0 u.1
t4 = buffer(t1)  u
t5 = conv_bn_relu(t3)  u.b.0 u.b.1 u.b.2  (into t4[4:])
t6 = concat(t2, t5)  u  (into t4[0:])
t7 = channel_shuffle(t6)  u.3
t8 = global_avgpool(t7)  head.0
t9 = flatten(t8)  head.1
t10 = linear(t9)  head.2
return t10"""


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    p = tmp_path_factory.mktemp("train_plan") / "blocks.net"
    p.write_text(BLOCKS)
    return str(p)


def lowered(path, name):
    return lower_train(split_input_activations(fuse(checked_net(path, name))))


def test_block_outputs_and_deferred_bn_before_and_after(spec):
    p = lowered(spec, "Blocks")
    assert listing(p.renumbered()) == LOWERED
    p = block_outputs(p)
    assert listing(p.renumbered()) == BLOCK_OUTPUTS
    assert listing(deferred_bn(p).renumbered()) == DEFERRED
    net = checked_net(spec, "Blocks")
    assert listing(train_plan(net)) == DEFERRED
    assert listing(train_plan(net, {"block_outputs", "deferred_bn"})) == LOWERED


def test_concat_in_place_before_and_after(spec):
    p = lowered(spec, "Mixed")
    assert listing(p.renumbered()) == MIXED_LOWERED
    assert listing(concat_in_place_train(p).renumbered()) == MIXED_IN_PLACE


def test_depthwise_direct_before_and_after(spec):
    p = lowered(spec, "Depthwise")
    assert listing(p.renumbered()) == DEPTHWISE_LOWERED
    assert listing(depthwise_direct_train(p).renumbered()) == DEPTHWISE_DIRECT
    # the BN after the direct kernel is then deferred into the pointwise conv, which applies it as it loads
    assert "t3 = bn_relu6(t1)  bn1 2  (defer)  (partials t2)\n" in listing(train_plan(checked_net(spec, "Depthwise")))


def test_split_channels_before_and_after(spec):
    p = concat_in_place_train(lowered(spec, "Shuffle"))
    assert listing(p.renumbered()) == SHUFFLE_IN_PLACE
    assert listing(split_channels(p).renumbered()) == SHUFFLE_SPLIT
    assert listing(train_plan(checked_net(spec, "Shuffle"))) == SHUFFLE_SPLIT


def test_each_pass_leaves_a_plan_without_its_pattern_alone(spec):
    lenet = lowered(str(ROOT / "specs" / "lenet.net"), "LeNet5")  # no batch norm, no join
    for rewrite in (block_outputs, deferred_bn, concat_in_place_train, depthwise_direct_train, split_channels):
        assert rewrite(lenet) == lenet
    mixed = lowered(spec, "Mixed")  # forks read by convs and pools, not channel ranges
    assert split_channels(mixed) == mixed
    resnet = lowered(str(ROOT / "specs" / "resnet.net"), "ResNet18")  # no concatenation, no depthwise conv
    assert concat_in_place_train(resnet) == resnet and depthwise_direct_train(resnet) == resnet
    # a basic block starts with a 3×3 conv: nothing makes its input as it loads
    assert block_outputs(resnet) == resnet
    mixed = lowered(spec, "Mixed")
    assert block_outputs(mixed) == mixed


# (each pass on: the default plans, which the deferred-BN, fork, dense-block, depthwise and ShuffleNet tests
# run; all the switches off at once: test_switches.py)
CASES = [("Blocks", ("block_outputs",)), ("Mixed", ("deferred_bn",)), ("Shuffle", ("split_channels",)), ("Gap", ())]


@pytest.mark.slow
@pytest.mark.parametrize("name,off", CASES,
                         ids=[f"{n}-{'-'.join(o) or 'all'}" for n, o in CASES])
def test_each_plan_computes_what_torch_does(spec, name, off):
    """The module with every pass, and without each in turn: outputs and gradients as torch's."""
    x = torch.randn(3, *checked_net(spec, name).input_shape)
    tri, ref = twins(spec, name, disable=list(off))
    compare(tri, ref, x, modes=("train",))
    grad_compare(tri, ref, x, modes=("train",))


def test_the_generated_training_forward_is_the_plan_line_by_line(spec):
    """One call a step, in plan order: the autograd Function each step is."""
    src = netdsl.compile_to_module(spec, "Blocks").__file__
    text = open(src).read()
    body = text[text.index("    def forward_autograd(self, x):"):]
    body = body[:body.index("\n\n")]
    calls = re.findall(r"rt\.(\w+)\(", body)
    plan = train_plan(checked_net(spec, "Blocks"))
    ops = {"maxpool": "pool", "global_avgpool": "adaptive_avgpool"}
    assert calls == [ops.get(s.op, s.op) for s in plan.steps]
    assert body.count("leave=True") == 1 and body.count("defer=True") == 6
