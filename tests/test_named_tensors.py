"""Named tensors (`as @name`, `@name`), upsampling to a named tensor's size,
dotted labels and networks with several outputs: a feature pyramid against
torchvision's FeaturePyramidNetwork, a training-only auxiliary head, the
plan they make, and their errors."""
import shutil

import pytest
import torch

import netdsl
from conftest import ROOT
from netdsl import check_text, ir
from netdsl import runtime as rt
from netdsl.compiler import checked_net
from netdsl.plan import inference_plan
from netdsl.plan.cost import eager, launches
from netdsl.plan.show import listing
from test_cli import run
from twin import rel_err
from tv_models import tv_module

# a small backbone whose stages feed detection.net's FPN block; 18 px gives
# stages of 9, 5, 3 and 2 px, so each nearest upsampling is by a ratio that
# is not an integer
SMALL = """\
import "detection.net"

net SmallFPN input(3, 18, 18) {
    conv(8, 3, stride=2, padding=1) -> relu -> as @c0
    conv(16, 3, stride=2, padding=1) -> relu -> as @c1
    conv(24, 3, stride=2, padding=1) -> relu -> as @c2
    conv(32, 3, stride=2, padding=1) -> relu -> as @c3
    fpn: FPN(4, 16)
    return "0": @p0, "1": @p1, "2": @p2, "3": @p3, "pool": @pool
}

net Aux input(3, 16, 16) {
    conv(8, 3, padding=1, bias=false) -> bn -> relu -> as @mid
    conv(8, 3, stride=2, padding=1, bias=false) -> bn -> relu -> global_avgpool -> flatten -> fc: linear(5) -> as @logits
    @mid -> aux: { avgpool(5, stride=3) -> conv(4, 1, bias=false) -> bn -> relu -> global_avgpool -> flatten -> fc: linear(5) } -> as @aux
    return @logits, @aux if training
}
"""

FPN_PLAN = """\
t1 = conv_relu(x)  0 1
t2 = conv_relu(t1)  2 3
t3 = conv_relu(t2)  4 5
t4 = conv_relu(t3)  6 7
t5 = conv(t4)  fpn.inner_blocks.3.0
t6 = conv(t5)  fpn.layer_blocks.3.0
t7 = conv(t3)  fpn.inner_blocks.2.0
t8 = upsample(t5, t3)  fpn.3
t9 = add(t7, t8)  fpn
t10 = conv(t9)  fpn.layer_blocks.2.0
t11 = conv(t2)  fpn.inner_blocks.1.0
t12 = upsample(t9, t2)  fpn.6
t13 = add(t11, t12)  fpn
t14 = conv(t13)  fpn.layer_blocks.1.0
t15 = conv(t1)  fpn.inner_blocks.0.0
t16 = upsample(t13, t1)  fpn.9
t17 = add(t15, t16)  fpn
t18 = conv(t17)  fpn.layer_blocks.0.0
t19 = maxpool(t6)  fpn.11
return {'0': t18, '1': t14, '2': t10, '3': t6, 'pool': t19}"""

AUX_PLAN = """\
t1 = conv_bn_relu(x)  0 1 2
t2 = conv_bn_relu(t1)  3 4 5
t3 = global_avgpool(t2)  6
t4 = flatten(t3)  7
t5 = linear(t4)  fc
t6 = avgpool(t1)  aux.0  (training)
t7 = conv_bn_relu(t6)  aux.1 aux.2 aux.3  (training)
t8 = global_avgpool(t7)  aux.4  (training)
t9 = flatten(t8)  aux.5  (training)
t10 = linear(t9)  aux.fc  (training)
return (t5, t10) if self.training else t5"""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("named")
    for name in ("detection.net", "resnet.net"):  # (detection.net imports resnet.net)
        shutil.copy(ROOT / "specs" / name, d / name)
    (d / "small.net").write_text(SMALL)
    return str(d / "small.net")


def _reference_fpn(model):
    """torchvision's FeaturePyramidNetwork (with LastLevelMaxPool) behind the
    same backbone in torch, holding model's weights: (forward, its parameters
    by model's names)."""
    tv_module("resnet")  # (makes torchvision's files importable without its compiled extension)
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

    fpn = FeaturePyramidNetwork([8, 16, 24, 32], 16, extra_blocks=LastLevelMaxPool())
    sd = model.state_dict()
    fpn.load_state_dict({k[len("fpn."):]: v for k, v in sd.items() if k.startswith("fpn.")}, strict=True)
    stages = [torch.nn.Conv2d(cin, c, 3, stride=2, padding=1) for cin, c in zip((3, 8, 16, 24), (8, 16, 24, 32))]
    params = {f"fpn.{k}": p for k, p in fpn.named_parameters()}
    for i, conv in enumerate(stages):
        conv.load_state_dict({"weight": sd[f"{2 * i}.weight"], "bias": sd[f"{2 * i}.bias"]})
        params.update({f"{2 * i}.weight": conv.weight, f"{2 * i}.bias": conv.bias})

    def forward(x):
        feats = {}
        for i, conv in enumerate(stages):
            x = feats[str(i)] = torch.relu(conv(x))
        return fpn(feats)

    return forward, params


def test_a_feature_pyramid_computes_what_torchvisions_does(small):
    torch.manual_seed(0)
    model = netdsl.build(small, "SmallFPN")
    with torch.no_grad():
        for p in model.parameters():  # (biases away from torchvision's zeros)
            torch.nn.init.normal_(p, std=0.2)
    ref, ref_params = _reference_fpn(model)
    x = torch.randn(2, 3, 18, 18)
    with torch.no_grad():
        out, want = model(x), ref(x)
    assert list(out) == list(want) == ["0", "1", "2", "3", "pool"]
    assert [tuple(t.shape) for t in out.values()] == [(2, 16, 9, 9), (2, 16, 5, 5), (2, 16, 3, 3), (2, 16, 2, 2),
                                                      (2, 16, 1, 1)]
    for k in want:
        assert torch.allclose(out[k], want[k], rtol=1e-4, atol=1e-5), k
    # gradients through every level, the upsamplings and the forks of the stage outputs
    weights = {k: torch.randn_like(v) for k, v in want.items()}
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    sum((v * weights[k]).sum() for k, v in model(xa).items()).backward()
    sum((v * weights[k]).sum() for k, v in ref(xb).items()).backward()
    assert rel_err(xa.grad, xb.grad) < 1e-5
    mine = dict(model.named_parameters())
    assert set(mine) == set(ref_params)
    errs = {k: rel_err(mine[k].grad, p.grad) for k, p in ref_params.items()}
    assert max(errs.values()) < 1e-5, errs


def test_a_step_of_a_network_with_several_outputs_is_planned(small):
    """aot and netdsl.precompile record a step: its backward seeds every output."""
    from netdsl import aot

    model = netdsl.build(small, "SmallFPN")
    names = {k.fn.__name__.split("__")[0] for k, _, _ in
             aot.signatures(model, torch.randn(2, 3, 18, 18), train=True, backward=True)}
    assert {"conv_backward", "upsample_backward", "pool_backward"} <= names


def test_the_pyramids_plan(small):
    net = checked_net(small, "SmallFPN")
    assert listing(inference_plan(net)) == FPN_PLAN
    # an upsampling to a tensor's size reads only that tensor's shape: its bytes are its input's and output's
    fig = launches(inference_plan(net), 2)
    up = [l for l in fig.launches if l.step.op == "upsample"]
    assert [l.bytes for l in up] == [2 * 16 * (4 + 9) * 4, 2 * 16 * (9 + 25) * 4, 2 * 16 * (25 + 81) * 4]


def test_a_training_only_output_runs_in_training_only(small):
    net = checked_net(small, "Aux")
    assert listing(inference_plan(net)) == AUX_PLAN
    # eval's figures leave the auxiliary head out, eager's as torchvision runs it (in training only)
    assert len(launches(inference_plan(net), 4).launches) == 4 and eager(net, 4)[0] == 8
    torch.manual_seed(1)
    tri = netdsl.build(small, "Aux")
    ref = netdsl.build(small, "Aux", target="torch")
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(3, 3, 16, 16)
    tri.eval(), ref.eval()
    with torch.no_grad():
        out = tri(x)
        assert isinstance(out, torch.Tensor) and rel_err(out, ref(x)) < 1e-5
        with rt.plan_launches() as recorded:  # (records the launches without running them)
            tri(x)
        assert len(recorded) == 4  # the plan's four (its batch-norm folds are cached from the first forward)
    out = tri(x.clone().requires_grad_())  # (eval with gradients: the autograd forward skips the head too)
    assert isinstance(out, torch.Tensor) and rel_err(out, ref(x)) < 1e-5
    with torch.no_grad(), rt.plan_launches() as recorded:
        tri.train()(x)
    assert len(recorded) > 4  # and the head's
    tri.train(), ref.train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (logits, aux), (want_logits, want_aux) = tri(xa), ref(xb)
    assert torch.allclose(logits, want_logits, rtol=1e-4, atol=1e-5)
    assert torch.allclose(aux, want_aux, rtol=1e-4, atol=1e-5)
    w1, w2 = torch.randn_like(logits), torch.randn_like(aux)
    ((logits * w1).sum() + (aux * w2).sum()).backward()
    ((want_logits * w1).sum() + (want_aux * w2).sum()).backward()
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)
    theirs = dict(ref.named_parameters())
    for k, p in tri.named_parameters():
        assert torch.allclose(p.grad, theirs[k].grad, rtol=1e-3, atol=1e-5), k


def test_check_lists_every_output():
    rc, out, err = run("check", "specs/detection.net", "--net", "ResNet50_FPN")
    assert rc == 0, err
    assert ('ResNet50_FPN  (input 3×224×224, outputs "0": 256×56×56, "1": 256×28×28, "2": 256×14×14, '
            '"3": 256×7×7, "pool": 256×4×4)') in out
    assert "Total params: 26,799,296" in out


def _fpn_backbone():
    return tv_module("detection.backbone_utils").resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                                                     trainable_layers=5)


def test_resnet50_fpn_has_torchvisions_keys_and_loads_its_state():
    from netdsl.report import state_keys, totals

    net = checked_net(str(ROOT / "specs" / "detection.net"), "ResNet50_FPN")
    ref = _fpn_backbone()
    assert set(state_keys(net)) == set(ref.state_dict())
    assert totals(net)["trainable"] == sum(p.numel() for p in ref.parameters() if p.requires_grad) == 26_799_296
    model = netdsl.build(str(ROOT / "specs" / "detection.net"), "ResNet50_FPN")
    model.load_state_dict(ref.state_dict(), strict=True)


@pytest.mark.slow
def test_resnet50_fpn_computes_what_torchvisions_does():
    torch.manual_seed(0)
    ref = _fpn_backbone().eval()
    with torch.no_grad():
        for name, b in ref.named_buffers():  # frozen batch norms away from the identity
            if name.endswith("running_var") or name.endswith(".weight"):
                b.uniform_(0.5, 1.5)
            else:
                b.normal_(0, 0.1)
        for p in ref.fpn.parameters():
            torch.nn.init.normal_(p, std=0.05)
    model = netdsl.build(str(ROOT / "specs" / "detection.net"), "ResNet50_FPN").eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out, want = model(x), ref(x)
    assert list(out) == list(want)
    for k in want:
        err = ((out[k] - want[k]).abs().max() / want[k].abs().max()).item()
        assert err < 1e-5, (k, err)


def errors(text):
    res = check_text(text, "e.net")
    return [(d.pos.line, d.pos.col, d.message) for d in res.diagnostics]


def test_a_name_read_before_it_is_written():
    assert errors("net N input(3, 8, 8) {\n  @skip -> relu\n  relu -> as @skp\n}") == [
        (2, 3, "@skip is read before it is written (`as @skip` names a tensor)")]
    assert errors("net N input(3, 8, 8) {\n  relu -> as @skip\n  @skp -> relu\n}") == [
        (3, 3, "@skp is read before it is written (`as @skp` names a tensor); did you mean 'skip'?")]


def test_a_name_used_twice():
    text = "block B() {\n  relu -> as @x\n}\nnet N input(3, 8, 8) {\n  B()\n  B()\n}"
    res = check_text(text, "e.net")
    (d,) = res.diagnostics
    assert (d.pos.line, d.pos.col) == (2, 14)
    assert d.message.startswith("@x is already named at e.net:2:14")
    assert [n for _, n in d.notes] == ["in block 'B' used here"]


def test_named_tensor_errors():
    base = "net N input(3, 8, 8) {\n  relu -> as @a\n  %s\n}"
    assert errors(base % "relu -> @a") == [
        (3, 11, "a read of a named tensor must start a line: here it would drop the tensor the chain carries")]
    assert errors(base % "conv(4, 3, padding=@a)") == [
        (3, 22, "conv's padding cannot be a tensor; only upsample(size=@name) takes one")]
    assert errors(base % 'return "a": @a, @a') == [
        (3, 3, 'give every output a key (`return "a": @x, "b": @y`) or none')]
    assert errors(base % 'return "a": @a, "a": @a') == [(3, 19, 'output key "a" is already used at e.net:3:10')]
    assert errors(base % "return @a if training") == [(3, 3, "a network needs an output outside training mode")]
    assert errors(base % "return @b") == [(3, 10, "@b is read before it is written (`as @b` names a tensor)")]
    assert errors("block B() {\n  relu\n  return @a\n}\nnet N input(3, 8, 8) {\n  relu -> as @a\n  B()\n}") == [
        (3, 3, "`return` ends a network's body: it cannot stand in a block or a group, or before other lines")]
    # the shortcut of a residual runs before its body: it cannot read what the body names
    text = "net N input(3, 8, 8) {\n  residual { relu -> as @r } shortcut { @r }\n}"
    assert errors(text) == [(2, 41, "@r is named in this residual's body, which runs after its shortcut")]


def test_upsample_to_a_named_tensors_size_needs_an_image():
    text = "net N input(3, 8, 8) {\n  relu -> as @x\n  global_avgpool -> flatten -> as @f\n  @x -> upsample(size=@f)\n}"
    assert errors(text) == [(4, 9, "upsample(size=@f) needs a C×H×W tensor")]


def test_dotted_labels_key_layers_where_they_say():
    res = check_text("net N input(3, 8, 8) {\n  a.b.{1 + 1}.0: conv(4, 3)\n}", "e.net")
    assert res.ok
    layers = [l.name for l in ir.walk_layers(res.nets[0].body)]
    assert layers == ["a.b.2.0"]
