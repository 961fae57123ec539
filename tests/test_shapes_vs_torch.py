"""Shape inference agrees with torch.nn on random layer configurations: the
same output shape when torch accepts the input, an error when torch refuses."""
import random

import pytest
import torch
import torch.nn as nn

from netdsl import check_text


def ours(input_shape, layer_text):
    dims = ", ".join(map(str, input_shape))
    res = check_text(f"net N input({dims}) {{\n  {layer_text}\n}}", "s.net")
    if not res.ok:
        return None
    return res.nets[0].out_shape


def theirs(input_shape, module):
    try:
        with torch.no_grad():
            return tuple(module(torch.randn(1, *input_shape)).shape[1:])
    except RuntimeError:
        return None


def b(v):
    return "true" if v else "false"


@pytest.mark.parametrize("seed", range(6))
def test_conv(seed):
    rng = random.Random(seed)
    for _ in range(40):
        g = rng.choice([1, 1, 2, 4])
        cin, cout = g * rng.randint(1, 3), g * rng.randint(1, 3)
        H, W = rng.randint(1, 20), rng.randint(1, 20)
        k, s, p, d = rng.randint(1, 7), rng.randint(1, 3), rng.randint(0, 3), rng.randint(1, 3)
        text = f"conv({cout}, {k}, stride={s}, padding={p}, dilation={d}, groups={g})"
        mod = nn.Conv2d(cin, cout, k, s, p, d, g)
        assert ours((cin, H, W), text) == theirs((cin, H, W), mod), text


@pytest.mark.parametrize("seed", range(4))
def test_conv_rectangular_kernels(seed):
    rng = random.Random(100 + seed)
    for _ in range(30):
        H, W = rng.randint(1, 16), rng.randint(1, 16)
        k, s, p = (rng.randint(1, 5), rng.randint(1, 5)), (rng.randint(1, 3), rng.randint(1, 3)), (rng.randint(0, 2), rng.randint(0, 2))
        text = f"conv(2, {k}, stride={s}, padding={p})"
        assert ours((3, H, W), text) == theirs((3, H, W), nn.Conv2d(3, 2, k, s, p)), text


@pytest.mark.parametrize("seed", range(4))
def test_conv_transpose(seed):
    rng = random.Random(200 + seed)
    for _ in range(40):
        H, W = rng.randint(1, 12), rng.randint(1, 12)
        k, s, p, d = rng.randint(1, 5), rng.randint(1, 3), rng.randint(0, 3), rng.randint(1, 2)
        op = rng.randint(0, 2)
        text = f"conv_transpose(4, {k}, stride={s}, padding={p}, output_padding={op}, dilation={d})"
        try:
            mod = nn.ConvTranspose2d(2, 4, k, s, p, op, dilation=d)
        except ValueError:
            mod = None
        expect = theirs((2, H, W), mod) if mod is not None else None
        if expect is not None and min(expect[1:]) <= 0:
            expect = None
        assert ours((2, H, W), text) == expect, text


@pytest.mark.parametrize("seed", range(6))
def test_max_pool(seed):
    rng = random.Random(300 + seed)
    for _ in range(40):
        H, W = rng.randint(1, 20), rng.randint(1, 20)
        k, s, p, d = rng.randint(1, 5), rng.randint(1, 3), rng.randint(0, 3), rng.randint(1, 2)
        ceil = rng.random() < 0.5
        text = f"maxpool({k}, stride={s}, padding={p}, dilation={d}, ceil_mode={b(ceil)})"
        mod = nn.MaxPool2d(k, s, p, d, ceil_mode=ceil)
        assert ours((3, H, W), text) == theirs((3, H, W), mod), text


@pytest.mark.parametrize("seed", range(6))
def test_avg_pool(seed):
    rng = random.Random(400 + seed)
    for _ in range(40):
        H, W = rng.randint(1, 20), rng.randint(1, 20)
        k, s, p = rng.randint(1, 5), rng.randint(1, 3), rng.randint(0, 3)
        ceil = rng.random() < 0.5
        text = f"avgpool({k}, stride={s}, padding={p}, ceil_mode={b(ceil)})"
        mod = nn.AvgPool2d(k, s, p, ceil_mode=ceil)
        assert ours((3, H, W), text) == theirs((3, H, W), mod), text


def test_upsample_and_adaptive_pool():
    rng = random.Random(5)
    for _ in range(30):
        H, W, f = rng.randint(1, 12), rng.randint(1, 12), rng.randint(1, 4)
        for mode in ("nearest", "bilinear"):
            text = f'upsample({f}, mode="{mode}")'
            assert ours((2, H, W), text) == theirs((2, H, W), nn.Upsample(scale_factor=f, mode=mode)), text
        o = rng.randint(1, 6)
        assert ours((2, H, W), f"adaptive_avgpool({o})") == theirs((2, H, W), nn.AdaptiveAvgPool2d(o))


def test_course_conv_slides():
    # nn.Conv2d(1, 3, kernel_size=3, stride=1/1/2, padding=0/1/1) on 1×28×28
    assert ours((1, 28, 28), "conv(3, 3, stride=1, padding=0)") == (3, 26, 26)
    assert ours((1, 28, 28), "conv(3, 3, stride=1, padding=1)") == (3, 28, 28)
    assert ours((1, 28, 28), "conv(3, 3, stride=2, padding=1)") == (3, 14, 14)
    # F.conv2d(x[1,3,28,28], w[16,3,5,5], stride=1, padding=1) and stride=2, padding=2
    assert ours((3, 28, 28), "conv(16, 5, stride=1, padding=1)") == (16, 26, 26)
    assert ours((3, 28, 28), "conv(16, 5, stride=2, padding=2)") == (16, 14, 14)
    # MaxPool2d(2, stride=2) and avg_pool2d on 16×14×14; interpolate ×2 and ×3 on 16×7×7
    assert ours((16, 14, 14), "maxpool(2, stride=2)") == (16, 7, 7)
    assert ours((16, 14, 14), "avgpool(2, stride=2)") == (16, 7, 7)
    assert ours((16, 7, 7), "upsample(2)") == (16, 14, 14)
    assert ours((16, 7, 7), "upsample(3)") == (16, 21, 21)
