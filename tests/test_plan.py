"""The kernel plan of the inference forward (netdsl/plan/): the pass that
stores a concatenation's parts in place, stated as plan text before and
after, a plan it leaves alone, and numbers against torch; the figures
`netdsl plan` prints, against a recorded run; and the generated forward
as the plan's own lines."""
import json
import re
import sys

import pytest
import torch

import netdsl
from conftest import ROOT
from netdsl import runtime as rt
from netdsl.compiler import checked_net
from netdsl.plan import inference_plan
from netdsl.plan.concat_in_place import concat_in_place
from netdsl.plan.cost import eager, launches
from netdsl.plan.lower import lower
from netdsl.fusion import fuse
from netdsl.plan.show import listing
from test_cli import run
from twin import rel_err, twins

sys.path.insert(0, str(ROOT / "bench"))
import fusion as bench  # noqa: E402  (the launch bytes and eager counts bench/fusion.py records)

MIXED = """\
block Unit(out, k = 1) {
    conv: conv(out, k, padding=k // 2, bias=false)
    bn: bn
    relu
}

net Mixed input(4, 8, 8) {
    stem: Unit(8)
    mix: concat {
        a: Unit(4)
        b: { Unit(4) -> Unit(6, 3) }
        c: { maxpool(3, stride=1, padding=1) -> Unit(2) }
        d: identity
        e: concat { Unit(2) ; relu }
    }
    head: { global_avgpool -> flatten -> linear(5) }
}
"""

BEFORE = """\
t1 = conv_bn_relu(x)  stem.conv stem.bn stem.2
t2 = buffer(t1)  mix
t3 = conv_bn_relu(t1)  mix.a.conv mix.a.bn mix.a.2
t4 = conv_bn_relu(t1)  mix.b.0.conv mix.b.0.bn mix.b.0.2
t5 = conv_bn_relu(t4)  mix.b.1.conv mix.b.1.bn mix.b.1.2
t6 = maxpool(t1)  mix.c.0
t7 = conv_bn_relu(t6)  mix.c.1.conv mix.c.1.bn mix.c.1.2
t8 = buffer(t1)  mix.e
t9 = conv_bn_relu(t1)  mix.e.0.conv mix.e.0.bn mix.e.0.2
t10 = relu(t1)  mix.e.1
t8[0:2] = copy(t9)  mix.e
t8[2:10] = copy(t10)  mix.e
t2[0:4] = copy(t3)  mix
t2[4:10] = copy(t5)  mix
t2[10:12] = copy(t7)  mix
t2[12:20] = copy(t1)  mix
t2[20:30] = copy(t8)  mix
t11 = global_avgpool(t2)  head.0
t12 = flatten(t11)  head.1
t13 = linear(t12)  head.2
return t13"""

# every part but the identity branch (its input feeds the other branches too) is stored in place;
# the nested concatenation is channels 20:30 of the outer buffer
AFTER = """\
t1 = conv_bn_relu(x)  stem.conv stem.bn stem.2
t2 = buffer(t1)  mix
t2[0:4] = conv_bn_relu(t1)  mix.a.conv mix.a.bn mix.a.2
t4 = conv_bn_relu(t1)  mix.b.0.conv mix.b.0.bn mix.b.0.2
t2[4:10] = conv_bn_relu(t4)  mix.b.1.conv mix.b.1.bn mix.b.1.2
t6 = maxpool(t1)  mix.c.0
t2[10:12] = conv_bn_relu(t6)  mix.c.1.conv mix.c.1.bn mix.c.1.2
t2[20:22] = conv_bn_relu(t1)  mix.e.0.conv mix.e.0.bn mix.e.0.2
t2[22:30] = relu(t1)  mix.e.1
t2[12:20] = copy(t1)  mix
t10 = global_avgpool(t2)  head.0
t11 = flatten(t10)  head.1
t12 = linear(t11)  head.2
return t12"""


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    p = tmp_path_factory.mktemp("plan") / "mixed.net"
    p.write_text(MIXED)
    return p


def test_concat_in_place_before_and_after(mixed):
    net = checked_net(str(mixed), "Mixed")
    before = lower(fuse(net)).renumbered()
    assert listing(before) == BEFORE
    assert listing(concat_in_place(before).renumbered()) == AFTER
    assert listing(inference_plan(net)) == AFTER and listing(inference_plan(net, {"concat_in_place"})) == BEFORE


def test_concat_in_place_leaves_a_plan_without_concatenations_alone():
    net = checked_net(str(ROOT / "specs" / "resnet.net"), "ResNet18")
    plan = lower(fuse(net))
    assert concat_in_place(plan) == plan
    # a spatial-size change in a branch: the buffer is made after its parts, and they are copied
    net = checked_net(str(ROOT / "specs" / "googlenet.net"), "GoogLeNet")
    assert listing(inference_plan(net)).count("copy(") == 0


@pytest.mark.parametrize("disable", [(), ("concat_in_place",)])
def test_both_plans_compute_what_torch_does(mixed, disable):
    tri, ref = twins(str(mixed), "Mixed", disable=list(disable))
    x = torch.randn(3, 4, 8, 8)
    tri.eval(), ref.eval()
    with torch.no_grad():
        assert rel_err(tri(x), ref(x)) < 1e-4


NETS = [("lenet.net", "LeNet5", None), ("resnet.net", "ResNet18", (3, 64, 64)),
        ("googlenet.net", "GoogLeNet", (3, 96, 96)), ("densenet.net", "DenseNet121", (3, 64, 64)),
        ("alexnet.net", "AlexNet", None), ("course.net", "SequentialCNN", None)]


@pytest.mark.parametrize("spec,name,size", NETS, ids=[n for _, n, _ in NETS])
def test_the_figures_are_a_recorded_runs(spec, name, size):
    """Launches and bytes from the plan, without running, against the launches
    an eval forward records (and eager's against the torch twin's CPU run)."""
    path = str(ROOT / "specs" / spec)
    net = checked_net(path, name, input_shape=size)
    batch = 3
    fig = launches(inference_plan(net), batch)
    model = netdsl.build(path, name).eval()
    x = torch.randn(batch, *net.input_shape)
    with torch.no_grad(), rt.plan_launches() as recorded:
        model(x)
    # (a planned run caches no batch-norm fold: each forward records them, as a first forward runs them)
    folds = [r for r in recorded if r[0].fn.__name__ == "bn_fold"]
    recorded = [r for r in recorded if r[0].fn.__name__ != "bn_fold"]
    assert len(fig.launches) == len(recorded)
    assert [l.bytes for l in fig.launches] == [bench.launch_bytes(*r) for r in recorded]
    assert fig.folds == len(folds) == sum(1 for l in net_layers(net) if l.op == "bn")
    ref = netdsl.build(path, name, target="torch").eval()
    assert eager(net, batch) == bench.eager(ref, x)


def net_layers(net):
    from netdsl import ir

    return list(ir.walk_layers(net.body))


def test_the_generated_forward_is_the_plan_line_by_line(mixed):
    """One call a step, in plan order, storing where the plan says."""
    src = netdsl.compile_to_module(str(mixed), "Mixed").__file__
    text = open(src).read()
    body = text[text.index("    def forward(self, x):"):text.index("    def forward_autograd")]
    calls = re.findall(r"rt\.(\w+)\(", body)
    assert calls[:4] == ["check_input", "traced", "traced_run", "grad_wanted"]
    plan = inference_plan(checked_net(str(mixed), "Mixed"))
    assert calls[4:] == [{"buffer": "concat_buffer"}.get(s.op, s.op) for s in plan.steps]
    assert "out=t2[:, 20:30][:, 2:10]" in body and body.count("rt.copy(") == 1


def test_netdsl_plan_prints_the_plan_and_its_totals():
    rc, out, err = run("plan", "specs/resnet.net", "--net", "ResNet18", "--batch", "8")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "ResNet18: inference forward (eval), batch 8, fp32, input 3×224×224"
    assert re.match(r" 1  conv_bn_relu +x +t1 +30\.55  conv1 → bn1 → relu \(resnet\.net:[\d,]+\)$", lines[2])
    # (the flatten between them is a view, no launch: the linear reads the pool's output)
    assert re.match(r"22  global_avgpool +(t\d+) +(t\d+) .*\n23  linear +\2 ", "\n".join(lines[-4:-2]))
    assert lines[-2] == ("launches 23 (eager PyTorch: 68 ops, 0.34×); bytes moved 253.1 MB "
                         "(eager: 620.9 MB, 0.41×)")
    assert lines[-1] == "after a parameter changes, the first forward also runs 20 bn_fold launches"


def test_netdsl_plan_json(mixed):
    rc, out, _ = run("plan", str(mixed), "--net", "Mixed", "--batch", "2", "--json", "--disable", "concat_in_place")
    doc = json.loads(out)
    assert rc == 0 and doc["disabled"] == ["concat_in_place"]
    with_copies = doc["totals"]["launches"]
    rc, out, _ = run("plan", str(mixed), "--net", "Mixed", "--batch", "2", "--json")
    doc = json.loads(out)
    assert doc["totals"]["launches"] == with_copies - 6  # AFTER's six parts stored in place, not copied
    first = doc["launches"][0]
    assert first["kernel"] == "conv_bn_relu" and first["epilogue"] == ["bn", "relu"]
    assert first["reads"][0]["shape"] == [2, 4, 8, 8] and first["covers"][0]["layer"] == "stem.conv"
    assert doc["launches"][1]["writes"] == {"value": "t3", "shape": [2, 4, 8, 8], "into": "t2", "channel": 0,
                                          "channel_step": 1}
    assert doc["totals"] == {"launches": 11, "bytes": 76452, "bn_folds": 6}
    assert sum(l["bytes"] for l in doc["launches"]) == doc["totals"]["bytes"]


def test_netdsl_plan_errors():
    rc, _, err = run("plan", "specs/resnet.net", "--net", "ResNet18", "--train")
    assert rc == 2 and "training steps are not planned by the compiler yet" in err
    rc, _, err = run("plan", "specs/resnet.net", "--net", "ResNet18", "--disable", "folding")
    assert rc == 2 and err.startswith("netdsl: error: --disable folding: no such fusion")
    rc, _, err = run("plan", "specs/resnet.net", "--net", "ResNet9")
    assert rc == 2 and "no network named 'ResNet9'" in err
