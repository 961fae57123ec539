"""specs/segmentation.net's UNet, a recursive block: its parameter count
against the common PyTorch UNet (DoubleConv / Down / Up / OutConv, written
out below; torchvision has no UNet), and outputs, running statistics and
gradients against that module at depth 2 (its state_dict mapped key by key,
in order)."""
import pytest
import torch
import torch.nn as nn

import netdsl
from netdsl import check_file

from conftest import SPECS
from twin import rel_err


class DoubleConv(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class UNet(nn.Module):
    """The usual flat UNet: an encoder of Down steps, a decoder of Up steps, each Up concatenating the skip first."""

    def __init__(self, cin, classes, width, depth):
        super().__init__()
        self.inc = DoubleConv(cin, width)
        self.downs = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), DoubleConv(width << i, width << (i + 1)))
                                   for i in range(depth))
        self.ups = nn.ModuleList(nn.ConvTranspose2d(width << (i + 1), width << i, 2, stride=2)
                                 for i in reversed(range(depth)))
        self.decs = nn.ModuleList(DoubleConv(width << (i + 1), width << i) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up, dec in zip(self.ups, self.decs):
            x = dec(torch.cat([skips.pop(), up(x)], 1))
        return self.outc(x)


def _order(depth):
    """The reference's parameters in the order the recursive spec registers them: level by level down the
    encoder, then back up (each level's transposed conv, then its decoder), then the head."""
    names = ["inc"] + [f"downs.{i}.1" for i in range(depth)]
    for i in range(depth):
        names += [f"ups.{i}", f"decs.{i}"]
    return names + ["outc"]


def test_the_parameter_count_is_the_common_unets():
    res = check_file(SPECS / "segmentation.net", "UNet")
    assert res.ok, res.diagnostics
    count = sum(p.numel() for p in UNet(3, 2, 64, 4).parameters())
    assert count == 31_037_698
    from netdsl.report import totals
    assert totals(res.nets[0])["params"] == count


@pytest.mark.slow  # (a quarter of a minute of interpreter launches)
def test_against_the_common_unet(tmp_path):
    """Eval and train mode: outputs, running statistics, and the input's and every parameter's gradients."""
    depth, width = 2, 4
    torch.manual_seed(0)
    ref = UNet(3, 2, width, depth)
    with torch.no_grad():  # statistics and affine parameters away from their defaults
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    for name in ("segmentation.net", "resnet.net"):  # (segmentation.net imports resnet.net)
        (tmp_path / name).write_text((SPECS / name).read_text())
    (tmp_path / "u.net").write_text('import "segmentation.net"\n'
                                    f"net U input(3, 8, 4) {{ level: Level({width}, {depth}) -> head: conv(2, 1) }}\n")
    ours = netdsl.build(tmp_path / "u.net", "U")
    theirs = ref.state_dict()
    keys = dict(zip(ours.state_dict(), [k for prefix in _order(depth) for k in theirs if k.startswith(prefix + ".")]))
    assert len(keys) == len(theirs) and all(ours.state_dict()[a].shape == theirs[b].shape for a, b in keys.items())
    ours.load_state_dict({a: theirs[b] for a, b in keys.items()}, strict=True)
    x = torch.randn(2, 3, 8, 4)
    for mode in ("eval", "train"):
        getattr(ours, mode)()
        getattr(ref, mode)()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        assert ya.shape == yb.shape == (2, 2, 8, 4) and rel_err(ya, yb) < 1e-4, mode
        w = torch.randn(ya.shape, generator=torch.Generator().manual_seed(1))
        (ya * w).sum().backward()
        (yb * w).sum().backward()
        assert rel_err(xa.grad, xb.grad) < 1e-3, mode
        params = dict(ref.named_parameters())
        for name, p in ours.named_parameters():
            assert rel_err(p.grad, params[keys[name]].grad) < 1e-3, (mode, name)
        ours.zero_grad()
        ref.zero_grad()
    mine, theirs = ours.state_dict(), ref.state_dict()
    for a, b in keys.items():  # the running statistics the train-mode forward moved
        if "running" in a:
            assert rel_err(mine[a], theirs[b]) < 1e-4, a


def test_too_deep_for_the_input_is_a_located_error():
    res = check_file(SPECS / "segmentation.net", "UNet", overrides={"depth": 9})
    assert not res.ok
    assert any("larger than its padded input" in d.message or "output size" in d.message for d in res.diagnostics)
