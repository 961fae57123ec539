"""Each kernel family against torch, through the real pipeline (spec ->
generated module), on random odd sizes: non-multiples of the block sizes,
1×1 and 7×7 kernels, stride 2, dilation 2, groups, ceil_mode, batch 1."""
import random

import pytest
import torch

from twin import compare, twins


def _configs():
    rng = random.Random(1234)
    nets = []

    def add(name, input_shape, body):
        nets.append((name, input_shape, body))

    for i in range(8):
        g = rng.choice([1, 1, 2, 3])
        cin, cout = g * rng.randint(1, 5), g * rng.randint(1, 6)
        k, s, d = rng.choice([1, 3, 5, 7]), rng.choice([1, 2]), rng.choice([1, 1, 2])
        p = rng.randint(0, k // 2 * d)
        H, W = rng.randint(d * (k - 1) + 1, 19), rng.randint(d * (k - 1) + 1, 17)
        act = rng.choice(["relu", "leaky_relu(0.2)", "sigmoid", "tanh", "identity"])
        bias = rng.choice(["true", "false"])
        tail = rng.choice(["-> bn -> " + act, "-> " + act, "-> bn"])
        add(f"Conv{i}", (cin, H, W), f"conv({cout}, {k}, stride={s}, padding={p}, dilation={d}, groups={g}, bias={bias}) {tail}")
    add("Depthwise", (6, 11, 9), "conv(6, 3, padding=1, groups=6) -> bn -> relu -> conv(12, 1)")
    add("Wide", (40, 5, 7), "conv(70, 3, padding=1) -> bn -> relu")
    for i in range(4):
        k, s, p, op = rng.randint(1, 4), rng.randint(1, 3), rng.randint(0, 1), 0
        op = rng.randint(0, s - 1)
        add(f"ConvT{i}", (3, rng.randint(2, 7), rng.randint(2, 7)),
            f"conv_transpose({rng.randint(1, 5)}, {k}, stride={s}, padding={min(p, k - 1)}, output_padding={op})")
    add("ConvTGroups", (4, 5, 6), "conv_transpose(6, 3, stride=2, padding=1, output_padding=1, groups=2, bias=false)")
    for i in range(6):
        k, s = rng.randint(1, 4), rng.randint(1, 3)
        p = rng.randint(0, k // 2)
        ceil = rng.choice(["true", "false"])
        H, W = rng.randint(k, 15), rng.randint(k, 13)
        if i % 2:
            add(f"MaxPool{i}", (3, H, W), f"maxpool({k}, stride={s}, padding={p}, dilation={rng.randint(1, 2) if p == 0 else 1}, ceil_mode={ceil})")
        else:
            cip = rng.choice(["true", "false"])
            add(f"AvgPool{i}", (3, H, W), f"avgpool({k}, stride={s}, padding={p}, ceil_mode={ceil}, count_include_pad={cip})")
    add("Adaptive", (5, 10, 7), "adaptive_avgpool((3, 4)) -> adaptive_avgpool(6)")
    add("Global", (5, 9, 7), "global_avgpool -> flatten -> linear(4) -> relu -> linear(3)")
    add("UpNearest", (3, 5, 4), "upsample(2) -> upsample(3)")
    add("UpBilinear", (3, 5, 4), 'upsample(2, mode="bilinear") -> upsample(3, mode="bilinear", align_corners=true)')
    add("LRN", (7, 5, 6), "lrn(3, alpha=0.01, beta=0.75, k=2) -> lrn(4)")
    add("Softmax", (6, 3, 3), "softmax -> flatten -> linear(5) -> softmax")
    add("BN1d", (12,), "linear(7) -> bn -> relu -> linear(3, bias=false)")
    add("Residual", (4, 9, 9), "residual { conv(4, 3, padding=1) -> bn -> relu -> conv(4, 3, padding=1) -> bn } -> relu")
    add("ResidualProj", (4, 9, 9), "residual { conv(6, 3, stride=2, padding=1) -> bn } shortcut { conv(6, 1, stride=2) -> bn } -> relu")
    add("ResidualPool", (4, 8, 8), "residual { conv(4, 3, padding=1) -> maxpool(3, stride=1, padding=1) }")
    add("AddBranches", (3, 6, 6), "add { conv(5, 1) ; conv(5, 3, padding=1) -> tanh ; conv(5, 1, bias=false) }")
    add("ConcatSame", (3, 6, 6), "concat { conv(2, 1) -> bn -> relu ; maxpool(3, stride=1, padding=1) ; conv(4, 3, padding=1) }")
    add("ConcatStrided", (3, 7, 7), "concat { conv(2, 3, stride=2, padding=1) ; avgpool(2, stride=2, ceil_mode=true) }")
    add("Dense", (4, 5, 5), "dense { bn -> relu -> conv(3, 3, padding=1) ; bn -> relu -> conv(3, 1) ; conv(2, 1) } -> bn")
    add("Filters", (2, 8, 8), "conv(weight=[[0, -1, 0], [-1, 5, -1], [0, -1, 0]], padding=1) -> conv(weight=[[[1, 2], [3, 4]], [[0, 1], [1, 0]]], stride=2)")
    add("BNLeaky", (3, 7, 5), "bn -> leaky_relu(0.1) -> bn(affine=false) -> sigmoid")
    # train-mode BN + act deferred into the next conv's loads (autograd forward)
    add("Deferred", (3, 7, 6), "conv(4, 3, padding=1, bias=true) -> bn -> sigmoid -> "
        "conv(6, 3, stride=2, padding=1, groups=2) -> bn(affine=false) -> relu -> conv(5, 1) -> bn -> tanh")
    return nets


CONFIGS = _configs()


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("kernels") / "kernels.net"
    p.write_text("\n".join(f"net {n} input({', '.join(map(str, s))}) {{\n    {b}\n}}" for n, s, b in CONFIGS) + "\n")
    return str(p)


@pytest.mark.parametrize("name,shape,body", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_kernel_against_torch(spec_path, name, shape, body):
    tri, ref = twins(spec_path, name, seed=sum(map(ord, name)))
    torch.manual_seed(len(name))
    batch = 1 if len(name) % 2 else 3
    x = torch.randn(batch, *shape)
    compare(tri, ref, x)


def test_channels_last_and_strided_inputs(spec_path):
    tri, ref = twins(spec_path, "Conv0")
    x = torch.randn(2, *CONFIGS[0][1])
    tri.eval(), ref.eval()
    with torch.no_grad():
        expect = ref(x)
        assert torch.allclose(tri(x.contiguous(memory_format=torch.channels_last)), expect, rtol=1e-4, atol=1e-5)
        wide = torch.randn(2, CONFIGS[0][1][0], CONFIGS[0][1][1], CONFIGS[0][1][2] * 2)[..., ::2]
        assert torch.allclose(tri(wide), ref(wide), rtol=1e-4, atol=1e-5)


def test_dropout_in_kernel(tmp_path):
    p = tmp_path / "d.net"
    p.write_text("net D input(64, 16, 16) { dropout(0.25) }\n")
    import netdsl

    m = netdsl.build(str(p), "D")
    x = torch.rand(4, 64, 16, 16) + 1.0
    with torch.no_grad():
        m.eval()
        assert torch.equal(m(x), x)
        m.train()
        y = m(x)
    dropped = (y == 0).float().mean().item()
    assert 0.22 < dropped < 0.28
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    with torch.no_grad():
        assert not torch.equal(m(x), y)  # a fresh mask per call


@pytest.mark.slow
@pytest.mark.parametrize("merge", ["1", "0"])
def test_bn_statistics_from_many_conv_tiles(tmp_path, monkeypatch, merge):
    """Train-mode BN takes its statistics from the conv epilogue's per-tile
    sums (Chan's merge), merged by the conv's last program of each channel
    block (the default) or, compiled without grid_merge, by a bn_stats launch.
    GPU-sized 16×16 tiles: 191 tiles of 16 pixels, the last one partial,
    merged 16 tiles at a time (the last block partial), for 2 channel blocks;
    a mean of ~50 against a spread of ~1, where sums of squares would cancel."""
    import netdsl
    from netdsl import runtime as rt
    from netdsl.kernels import conv as kconv

    monkeypatch.setattr(kconv, "conv_blocks", lambda M, cout, cin, on_gpu: (16, 16, 16))
    p = tmp_path / "tiles.net"
    p.write_text("net Tiles input(8, 39, 39) { conv(32, 1) -> bn -> relu }\n")

    def pair():
        tri, ref = twins(str(p), "Tiles", seed=7, disable=() if merge == "1" else ("grid_merge",))
        with torch.no_grad():
            ref.state_dict()["0.bias"].add_(50.0)
            tri.load_state_dict(ref.state_dict())
        return tri, ref

    x = torch.randn(2, 8, 39, 39)
    tri, _ = pair()
    tri.train()
    with torch.no_grad(), netdsl.kernel_log() as log:
        tri(x)
    names = [n for n, _ in log]
    assert names[0].startswith("conv_bn_relu__") and log[0][1] == (191, 2, 1)
    assert names[1:] == (["channel_affine"] if merge == "1" else ["bn_stats", "channel_affine"])
    assert all(int(c.abs().sum()) == 0 for c in rt._COUNTERS.values())  # left at zero for the next launch
    tri, ref = pair()
    compare(tri, ref, x, modes=("train",), tol=1e-5)
    assert int(tri.state_dict()["1.num_batches_tracked"]) == 3 + 1  # (twins start it at 3)


@pytest.mark.parametrize("merge", ["1", "0"])
def test_bn_momentum_none_is_a_cumulative_average(tmp_path, monkeypatch, merge):
    """momentum=None set on the module: torch's running statistics are then the
    plain average over the batches seen, 1 / num_batches_tracked a step; so are
    ours, whether the conv's last programs or bn_stats update them."""
    p = tmp_path / "m.net"
    p.write_text("net M input(3, 9, 9) { conv(6, 3, padding=1) -> bn -> relu -> maxpool(2) -> bn }\n")
    tri, ref = twins(str(p), "M", seed=3, disable=() if merge == "1" else ("grid_merge",))
    for m in (tri, ref):
        m.train()
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.momentum = None
    with torch.no_grad():
        for step in range(3):
            x = torch.randn(4, 3, 9, 9) * (step + 1) + step
            assert torch.allclose(tri(x), ref(x), rtol=1e-4, atol=1e-4)
    ours, theirs = tri.state_dict(), ref.state_dict()
    for k in theirs:
        if "running" in k:
            assert torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6), k
        if k.endswith("num_batches_tracked"):
            assert int(ours[k]) == int(theirs[k]) == 3 + 3, k  # (twins start it at 3)
