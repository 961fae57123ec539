"""frozen_bn: torchvision's FrozenBatchNorm2d (detection backbones), a batch
norm whose statistics and affine parameters are fixed buffers and which
stays in eval mode while the network trains.  Against torchvision's own
class: keys, strict loads both ways, forward and gradients in train and
eval mode, buffers untouched by training, and its fold into the conv's
epilogue in the plan."""
import importlib

import pytest
import torch

import netdsl
from netdsl.compiler import checked_net
from netdsl.plan import inference_plan
from netdsl.plan.show import listing
from tv_models import tv_module
from twin import rel_err

SPEC = """\
net Frozen input(3, 8, 8) {
    conv(8, 3, padding=1, bias=false) -> frozen_bn -> relu
    residual { body: { conv(8, 3, padding=1, bias=false) -> frozen_bn(eps=0.001) } } -> relu
    head: conv(4, 1)
}
"""


class Reference(torch.nn.Module):
    """The same network from torchvision's FrozenBatchNorm2d, under the spec's names."""

    def __init__(self):
        super().__init__()
        tv_module("resnet")  # (installs the loader's stand-ins: torchvision.ops.misc is then importable)
        frozen = importlib.import_module("torchvision.ops.misc").FrozenBatchNorm2d
        self.add_module("0", torch.nn.Conv2d(3, 8, 3, padding=1, bias=False))
        self.add_module("1", frozen(8))
        self.body = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), frozen(8, eps=0.001))
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(getattr(self, "1")(getattr(self, "0")(x)))
        return self.head(torch.relu(self.body(x) + x))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    p = tmp_path_factory.mktemp("frozen") / "f.net"
    p.write_text(SPEC)
    torch.manual_seed(0)
    ref = Reference()
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name.startswith(("1.", "body.1.")):
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith(("weight", "var")) else torch.randn_like(t) * 0.3)
    return str(p), ref, ref.state_dict()


def test_keys_and_strict_loads(pair):
    path, ref, state = pair
    ours = netdsl.build(path, "Frozen")
    assert list(ours.state_dict()) == list(state)  # four buffers each, no num_batches_tracked
    assert [n for n, _ in ours.named_parameters()] == ["0.weight", "body.0.weight", "head.weight", "head.bias"]
    ours.load_state_dict(state, strict=True)
    bn = torch.nn.BatchNorm2d(8)  # a BatchNorm2d checkpoint loads too (its num_batches_tracked is dropped)
    ours.layer("1").load_state_dict(bn.state_dict(), strict=True)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_and_gradients_against_torchvision(pair, mode):
    path, ref, state = pair
    ours = netdsl.build(path, "Frozen")
    ours.load_state_dict(state, strict=True)
    getattr(ours, mode)(), getattr(ref, mode)()
    ref.zero_grad(set_to_none=True)
    assert ours.layer("1").training is False
    torch.manual_seed(1)
    x = torch.randn(3, 3, 8, 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    assert rel_err(ya, yb) < 1e-4
    w = torch.randn_like(ya)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    assert rel_err(xa.grad, xb.grad) < 1e-4
    theirs = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        assert rel_err(p.grad, theirs[n].grad) < 1e-4, n
    after = ours.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state if k.startswith(("1.", "body.1.")))


def test_it_folds_into_the_conv_in_the_plan(pair):
    path, _, _ = pair
    text = listing(inference_plan(checked_net(path, "Frozen")))
    assert text.splitlines() == ["t1 = conv_bn_relu(x)  0 1 2", "t2 = conv_bn_add_relu(t1, t1)  body.0 body.1 4",
                                 "t3 = conv(t2)  head", "return t3"]
