"""The conv backward kernels (building blocks for training): weight and input
gradients against torch.nn.grad on random odd sizes, strides, dilations and
groups; and a deferred batch norm's backward riding along in them."""
import random

import pytest
import torch

from netdsl import runtime as rt
from netdsl.codegen import triton_module
from netdsl.kernels import conv as kconv
from netdsl.kernels import render
from netdsl.kernels import norm as knorm

HELPERS = tuple((t, n) for t, n, _ in triton_module.HELPERS) + ((knorm.CHANNEL_GRAD, "channel_grad"),)


def _kernels(tmp_path, consts):
    src = ("import triton\nimport triton.language as tl\n\n"
           + "".join(render(t, n, "helper") + "\n\n" for t, n in HELPERS)
           + render(kconv.CONV2D_WGRAD, "wgrad", "test", **consts) + "\n\n"
           + render(kconv.CONV_TRANSPOSE2D, "dgrad", "test", **consts) + "\n\n"
           + render(kconv.CONV2D_BACKWARD, "backward", "test", **consts))
    path = tmp_path / f"k{abs(hash(tuple(sorted(consts.items()))))}.py"
    path.write_text(src)
    from netdsl.cache import import_file

    mod = import_file(path)
    _kernels.channel_grad = mod.channel_grad
    _kernels.backward = mod.backward
    return mod.wgrad, mod.dgrad


@pytest.mark.parametrize("seed", range(6))
def test_weight_and_input_gradients(tmp_path, seed):
    rng = random.Random(seed)
    g = rng.choice([1, 1, 2, 3])
    cin, cout = g * rng.randint(1, 4), g * rng.randint(1, 5)
    k, s, d = rng.choice([1, 3, 5]), rng.choice([1, 2]), rng.choice([1, 2])
    p = rng.randint(0, k // 2 * d)
    N, H, W = rng.randint(1, 3), rng.randint(d * (k - 1) + 1, 13), rng.randint(d * (k - 1) + 1, 11)
    consts = dict(KH=k, KW=k, SH=s, SW=s, PH=p, PW=p, DH=d, DW=d, GROUPS=g)
    wgrad, _ = _kernels(tmp_path, consts)
    x = torch.randn(N, cin, H, W)
    w = torch.randn(cout, cin // g, k, k)
    y = torch.nn.functional.conv2d(x, w, stride=s, padding=p, dilation=d, groups=g)
    dy = torch.randn_like(y).contiguous(memory_format=torch.channels_last)
    dw = torch.empty_like(w)
    kconv.conv2d_wgrad(rt._rt, wgrad, dy, x, dw, groups=g)
    expect_w = torch.nn.grad.conv2d_weight(x, w.shape, dy, stride=s, padding=p, dilation=d, groups=g)
    assert torch.allclose(dw, expect_w, rtol=1e-4, atol=1e-4)
    dx = torch.empty_like(x)
    kconv.conv2d_backward(rt._rt, _kernels.backward, dy, w, x, dx=dx, groups=g)
    expect_x = torch.nn.grad.conv2d_input(x.shape, w, dy, stride=s, padding=p, dilation=d, groups=g)
    assert torch.allclose(dx, expect_x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("combo", ["1", pytest.param("0", marks=pytest.mark.slow)])
def test_one_launch_gives_both_gradients(tmp_path, monkeypatch, combo):
    """conv2d_backward: the input and weight gradients (and the bias's) from
    one launch of the combined kernel (compiled without combo: two launches of
    it, one part each), or either part alone; against torch.nn.grad, with a grouped
    strided conv, and with GPU-sized 16×16 tiles so both grids have many
    programs laid end to end."""
    from netdsl.launch import _RT

    launcher_rt = rt._rt if combo == "1" else _RT({"combo", "wgrad_add"})  # what a module's K.rt says
    monkeypatch.setattr(kconv, "conv_blocks", lambda M, cout, cin, on_gpu: (16, 16, 16))
    torch.manual_seed(3)
    consts = dict(KH=3, KW=3, SH=2, SW=2, PH=1, PW=1, DH=1, DW=1, GROUPS=2)
    _kernels(tmp_path, consts)
    backward = _kernels.backward
    x, w = torch.randn(2, 34, 9, 7), torch.randn(36, 17, 3, 3)
    conv = dict(stride=2, padding=1, groups=2)
    dy = torch.randn_like(torch.nn.functional.conv2d(x, w, **conv)).contiguous(memory_format=torch.channels_last)
    expect_x = torch.nn.grad.conv2d_input(x.shape, w, dy, **conv)
    expect_w = torch.nn.grad.conv2d_weight(x, w.shape, dy, **conv)
    grids = {}
    for want_x, want_w in ((True, True), (True, False), (False, True)):
        dx = torch.full_like(x, float("nan")) if want_x else None
        dw = torch.full_like(w, float("nan")) if want_w else None
        db = torch.full((36,), float("nan")) if want_w else None
        with rt.kernel_log() as log:
            kconv.conv2d_backward(launcher_rt, backward, dy, w, x, dx=dx, dw=dw, groups=2, dbias=db)
        grids[want_x, want_w] = [grid for _, grid in log]
        if want_x:
            assert torch.allclose(dx, expect_x, rtol=1e-4, atol=1e-4)
        if want_w:
            assert torch.allclose(dw, expect_w, rtol=1e-4, atol=1e-4)
            assert torch.allclose(db, dy.sum((0, 2, 3)), rtol=1e-4, atol=1e-4)
    # the wgrad's 18 programs (1 × 1 tiles of channels, 2 groups × 9 taps), then the dgrad's 32 (8 tiles of
    # 16 of the 126 pixels × 2 tiles of 16 of 17 channels × 2 groups): one grid, or one launch each
    assert grids[True, True] == ([(18 + 32,)] if combo == "1" else [(32,), (18,)])
    assert grids[True, False] == [(32,)] and grids[False, True] == [(18,)]


@pytest.mark.slow
@pytest.mark.parametrize("split", [3, 7])
def test_split_k_weight_gradient(tmp_path, monkeypatch, split):
    """Where a wgrad has few tiles (a first layer; a 1×1 conv of 64 channels),
    its pixels are split into chunks too, one program each, and the last of a
    tile's programs sums the partial tiles (and the bias's sums) in chunk
    order.  Forced here through the config (7 asks for more chunks than 84
    pixels make: 6 of 16, the last of 4), with GPU-sized 16×16×16 tiles,
    standalone and in one launch with
    the dgrad (whose merge counters sit beside the wgrad's); against
    torch.nn.grad, and bit for bit run to run."""
    monkeypatch.setattr(kconv, "conv_blocks", lambda M, cout, cin, on_gpu: (16, 16, 16))
    torch.manual_seed(5)
    consts = dict(KH=3, KW=3, SH=2, SW=2, PH=1, PW=1, DH=1, DW=1, GROUPS=1)
    wgrad, _ = _kernels(tmp_path, consts)
    x, w = torch.randn(2, 20, 13, 11), torch.randn(24, 20, 3, 3)
    conv = dict(stride=2, padding=1)
    dy = torch.randn_like(torch.nn.functional.conv2d(x, w, **conv)).contiguous(memory_format=torch.channels_last)
    expect_x = torch.nn.grad.conv2d_input(x.shape, w, dy, **conv)
    expect_w = torch.nn.grad.conv2d_weight(x, w.shape, dy, **conv)
    M = 2 * 7 * 6  # 84 output pixels, in chunks of whole 16-pixel steps
    k_chunk = 16 * -(-(-(-M // split)) // 16)
    chunks = -(-M // k_chunk)
    tiles = 2 * 2 * 9  # (24 output channels: 2 blocks of 16) × (20 input channels: 2) × 9 taps
    dgrad = 18 * 2  # the dgrad's: 286 input pixels in 18 tiles × 2 blocks of the 20 channels
    cfg = {"SPLIT": split, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
    runs = []
    for combined in (False, True):
        dw, db = torch.full_like(w, float("nan")), torch.full((24,), float("nan"))
        dx = torch.full_like(x, float("nan"))
        with rt.kernel_log() as log:
            if combined:
                kconv.conv2d_backward(rt._rt, _kernels.backward, dy, w, x, dx=dx, dw=dw, dbias=db,
                                      config={"w_" + k: v for k, v in cfg.items()})
                assert torch.allclose(dx, expect_x, rtol=1e-4, atol=1e-4)
            else:
                kconv.conv2d_wgrad(rt._rt, wgrad, dy, x, dw, dbias=db, config=cfg)
        (grid,) = [g for _, g in log]
        assert grid == ((tiles * chunks + dgrad,) if combined else (2, 2, 9 * chunks)), grid
        assert chunks == (3 if split == 3 else 6)
        assert torch.allclose(dw, expect_w, rtol=1e-4, atol=1e-4)
        assert torch.allclose(db, dy.sum((0, 2, 3)), rtol=1e-4, atol=1e-4)
        runs.append(dw.clone())
        assert torch.equal(dw, runs[0])  # the same chunks in the same order, whichever kernel ran them
        again = torch.empty_like(dw)
        kconv.conv2d_wgrad(rt._rt, wgrad, dy, x, again, dbias=db, config=cfg)
        assert torch.equal(again, runs[0])


def test_wgrad_split_only_where_tiles_leave_sms_idle():
    """The split heuristic, as planned for a 132-SM GPU (batch 256, ResNet-50)."""
    class Plan:
        gpu_tiles = staticmethod(lambda x: True)

    x = torch.empty(1)
    assert kconv.wgrad_split(Plan, x, tiles=1, M=256 * 56 * 56, BK=32) == 132  # layer1's 1×1 64→64
    assert kconv.wgrad_split(Plan, x, tiles=49, M=256 * 112 * 112, BK=32) == 3  # the 7×7 stem
    assert kconv.wgrad_split(Plan, x, tiles=256, M=256 * 7 * 7, BK=32) == 1  # layer4's 1×1 512→2048
    assert kconv.wgrad_split(Plan, x, tiles=1, M=8 * 7 * 7, BK=32) == 1  # too few pixels to share
    assert kconv.wgrad_split(rt._rt, x, tiles=1, M=10**6, BK=32) == 1  # the interpreter: never


def test_backward_kernels_compile_for_sm90_and_sm80(tmp_path):
    from netdsl import aot

    wgrad, dgrad = _kernels(tmp_path, dict(KH=3, KW=3, SH=2, SW=2, PH=1, PW=1, DH=1, DW=1, GROUPS=1))
    dy, x, dw = torch.randn(8, 64, 14, 14), torch.randn(8, 32, 28, 28), torch.empty(64, 32, 3, 3)
    with rt.plan_launches() as plan:  # (a conv_transpose layer's kernels: a conv's backward has its own test)
        kconv.conv2d_wgrad(rt._rt, wgrad, dy, x, dw)
        kconv.conv_transpose2d(rt._rt, dgrad, dy, dw, x)
    for kernel, args, meta in plan:
        sig = {n: aot._type(a) for n, a in zip(kernel.arg_names, args)}
        sig.update({k: "constexpr" for k in meta if k not in aot.OPTIONS})
        for arch in (90, 80):
            info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
            assert info["spill_stores"] == 0, (kernel.fn.__name__, arch, info)


@pytest.mark.parametrize("act,train,stride", [("relu", True, 1), ("sigmoid", True, 2), ("tanh", False, 1)])
def test_deferred_batch_norm_backward_rides_in_dgrad_and_wgrad(tmp_path, act, train, stride):
    """P: r = conv(x); a = act(BN(r)) is never stored; Q: y = conv(a).  Q's
    dgrad gives a's gradient and, in its epilogue, the sums for BN's
    backward; P's dgrad and wgrad apply BN's backward as they load a's
    gradient.  Against torch autograd through the same graph."""
    torch.manual_seed(7)
    consts = dict(KH=3, KW=3, SH=stride, SW=stride, PH=1, PW=1, DH=1, DW=1, GROUPS=1)
    _kernels(tmp_path, consts)
    x = torch.randn(3, 5, 11, 9, dtype=torch.float64)
    wp, wq = torch.randn(6, 5, 3, 3, dtype=torch.float64), torch.randn(7, 6, 3, 3, dtype=torch.float64)
    gamma, beta = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    conv = dict(stride=stride, padding=1)
    # P's output, with a mean far from zero (x̂ must be centred)
    r = (torch.nn.functional.conv2d(x, wp, **conv) + 3.0).contiguous(memory_format=torch.channels_last).requires_grad_()
    rm, rv = torch.randn(6, dtype=torch.float64) + 3.0, torch.rand(6, dtype=torch.float64) + 0.5
    g_, b_ = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    a = getattr(torch, act)(torch.nn.functional.batch_norm(r, rm.clone(), rv.clone(), g_, b_, training=train, eps=1e-5))
    a.retain_grad()
    y = torch.nn.functional.conv2d(a, wq, **conv)
    dy = torch.randn_like(y).contiguous(memory_format=torch.channels_last)
    y.backward(dy)
    # netdsl's side: the statistics as the forward computed them
    if train:
        mean, var = r.detach().mean((0, 2, 3)), r.detach().var((0, 2, 3), unbiased=False)
    else:
        mean, var = rm, rv
    rstd = 1 / torch.sqrt(var + 1e-5)
    scale, shift = gamma * rstd, (beta if train else beta - mean * gamma * rstd)
    bng = kconv.BNGrad(r.detach(), mean, rstd, scale, shift, train, act, 0.01, train)
    da = torch.empty_like(r).contiguous(memory_format=torch.channels_last)
    # Q's backward: its input gradient only (a stands in for Q's input: no wgrad part runs)
    partials = kconv.conv2d_backward(rt._rt, _kernels.backward, dy, wq, da, dx=da, grad_out=bng)
    assert torch.allclose(da, a.grad, rtol=1e-9, atol=1e-9)
    coef, dgamma, dbeta = torch.empty(18, dtype=torch.float64), torch.empty(6, dtype=torch.float64), torch.empty(6, dtype=torch.float64)
    knorm.channel_grad(rt._rt, _kernels.channel_grad, da, mean=mean, rstd=rstd, weight=gamma, train=train,
                       partials=partials, dweight=dgamma, dbias=dbeta, coef=coef)
    assert torch.allclose(dgamma, g_.grad, rtol=1e-9, atol=1e-9) and torch.allclose(dbeta, b_.grad, rtol=1e-9, atol=1e-9)
    # P's backward, one launch: r's gradient is never formed; its dgrad and wgrad parts apply BN's backward
    # to a's gradient as they load it
    bng = bng._replace(coef=coef)
    dx, dw = torch.empty_like(x), torch.empty_like(wp)
    kconv.conv2d_backward(rt._rt, _kernels.backward, da, wp, x, dx=dx, dw=dw, grad_in=bng)
    expect_x = torch.nn.grad.conv2d_input(x.shape, wp, r.grad, **conv)
    expect_w = torch.nn.grad.conv2d_weight(x, wp.shape, r.grad, **conv)
    assert torch.allclose(dx, expect_x, rtol=1e-8, atol=1e-8) and torch.allclose(dw, expect_w, rtol=1e-8, atol=1e-8)


def test_conv_act_backward_rides_in_dgrad_and_wgrad(tmp_path):
    """A conv or linear + bias + act without BN: act' is applied as the dgrad
    and wgrad load dy, and the wgrad sums the bias's gradient, so g is never
    stored and there is no reduction pass.  No change where a residual needs g
    itself (one pass writes it and sums the bias).  Numbers against torch."""
    import netdsl
    from launches import parts
    from twin import grad_compare, twins

    p = tmp_path / "a.net"
    p.write_text("net A input(3, 8, 8) {\n"
                 "  conv(6, 3, padding=1) -> relu\n"
                 "  conv(6, 3, padding=1) -> tanh\n"
                 "  residual { conv(6, 3, padding=1) } -> leaky_relu(0.1)\n"
                 "  flatten\n"
                 "  linear(5) -> sigmoid\n"
                 "  linear(3)\n"
                 "}\n")
    tri, ref = twins(str(p), "A")
    tri.train()
    with rt.plan_launches() as launches:
        y = tri(torch.randn(2, 3, 8, 8))
        n = len(launches)
        y.backward(torch.empty_like(y))
    backward = [(k.fn.__name__.split("__")[0], meta) for k, _, meta in parts(launches[n:])]
    assert [m["G_ACTG"] for k, m in backward if k == "conv_wgrad"] == [0, 3, 0, 4, 1]
    assert [m["DBIAS"] for k, m in backward if k == "conv_wgrad"] == [True, True, False, True, True]
    assert [m["IN_ACTG"] for k, m in backward if k == "conv_dgrad"] == [0, 3, 0, 4]  # (the input needs none)
    # the residual conv: its output's gradient is also the shortcut's
    assert [m["STORE_G"] for k, m in backward if k == "channel_grad"] == [True]
    assert not any(k == "elementwise" and m["OP"] == 4 for k, m in backward)  # (no act' pass)
    grad_compare(tri, ref, torch.randn(3, 3, 8, 8))
    from netdsl import aot

    for kernel, sig, meta in aot.signatures(tri, torch.randn(16, 3, 8, 8), train=True, backward=True):
        if any(meta.get(p + f) for p in ("", "d_", "w_") for f in ("G_ACTG", "IN_ACTG", "DBIAS")):
            for arch in (90, 80):
                info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
                assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (kernel.fn.__name__, arch, info)


def _bn_train(r, gamma, beta):
    """A train-mode BN's batch statistics and its (scale, shift), as the forward's deferred BN holds them."""
    mean, var = r.mean((0, 2, 3)), r.var((0, 2, 3), unbiased=False)
    rstd = 1 / torch.sqrt(var + 1e-5)
    return mean, rstd, gamma * rstd, beta


@pytest.mark.parametrize("deterministic", [False, True], ids=["adds", "deterministic"])
def test_a_pointwise_convs_weight_gradient_rides_in_its_dgrad(tmp_path, deterministic):
    """Q, a 1×1 stride-1 conv between two deferred train-mode BN + relus (a
    bottleneck's conv3, say): a = relu(BN_r(r)) is its input, o = relu(BN_z(Q(a)))
    its output.  Its backward is one launch of dgrad programs only: they apply
    BN_z's backward to o's gradient as they load it (grad_in), take BN_r's sums
    in their epilogue (grad_out) and add each K step's aᵀ·(Q's output gradient)
    into dw (WGRAD_ADD), from small tiles so many programs add into each
    entry.  Under torch.use_deterministic_algorithms, the wgrad's own programs
    run instead.  dx and dw against torch autograd (float64)."""
    torch.manual_seed(11)
    _kernels(tmp_path, dict(KH=1, KW=1, SH=1, SW=1, PH=0, PW=0, DH=1, DW=1, GROUPS=1))
    f64 = dict(dtype=torch.float64)
    N, cin, cout, H, W = 3, 20, 24, 7, 9
    r = (torch.randn(N, cin, H, W, **f64) + 2.0).contiguous(memory_format=torch.channels_last).requires_grad_()
    gr, br = torch.rand(cin, **f64) + 0.5, torch.randn(cin, **f64)
    gz, bz = torch.rand(cout, **f64) + 0.5, torch.randn(cout, **f64)
    wq = torch.randn(cout, cin, 1, 1, **f64).requires_grad_()
    a = torch.relu(torch.nn.functional.batch_norm(r, None, None, gr, br, training=True, eps=1e-5))
    a.retain_grad()
    z = torch.nn.functional.conv2d(a, wq)
    z.retain_grad()
    o = torch.relu(torch.nn.functional.batch_norm(z, None, None, gz, bz, training=True, eps=1e-5))
    do = torch.randn_like(o).contiguous(memory_format=torch.channels_last)
    o.backward(do)
    # BN_z's backward as its coefficients: dz = A·g + B + C·x̂, g = do·relu'
    zd = z.detach()
    mz, rz, sz, hz = _bn_train(zd, gz, bz)
    xh = (zd - mz[:, None, None]) * rz[:, None, None]
    g = do * ((xh * gz[:, None, None] + bz[:, None, None]) > 0)
    A = gz * rz
    coef = torch.cat([A, -A * g.mean((0, 2, 3)), -A * (g * xh).mean((0, 2, 3))])
    grad_in = kconv.BNGrad(zd, mz, rz, sz, hz, True, "relu", 0.01, True, coef)
    rd = r.detach()
    mr, rr, sr, hr = _bn_train(rd, gr, br)
    grad_out = kconv.BNGrad(rd, mr, rr, sr, hr, True, "relu", 0.01, True)
    da, dw = torch.empty_like(rd), torch.full_like(wq, float("nan"))  # (the adds must start from zero)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    launches = []

    class Seen(type(rt._rt)):
        @staticmethod
        def launch(kernel, grid, *args, **meta):
            launches.append((grid, meta))
            rt.launch(kernel, grid, *args, **meta)

    try:
        kconv.conv2d_backward(Seen(), _kernels.backward, do, wq, rd, dx=da, dw=dw, grad_in=grad_in,
                              prologue=(mr, sr, hr, "relu", 0.01), grad_out=grad_out, pointwise=True,
                              config={"d_BLOCK_M": 16, "d_BLOCK_N": 8, "d_BLOCK_K": 8})
    finally:
        torch.use_deterministic_algorithms(before)
    (grid, meta), = launches
    assert (meta["d_WGRAD_ADD"], meta["WGRAD"]) == ((False, True) if deterministic else (True, False))
    if not deterministic:  # 12 rows of tiles (189 pixels) × 3 of 8 channels, each adding into its dw columns
        assert meta["d_WX_BN"] and meta["d_WX_ACT"] == 1 and grid == (12 * 3,)
    assert torch.allclose(da, a.grad, rtol=1e-9, atol=1e-9)
    assert torch.allclose(dw, wq.grad, rtol=1e-9, atol=1e-9)


def test_which_pointwise_weight_gradients_ride():
    """wgrad_rides as planned for a GPU (BLOCK_M 64), ResNet-50's bottleneck
    shapes at batch 2: the adds (⌈M/64⌉ · C_out · C_in) against what the
    wgrad would read again.  Each conv with a deferred BN backward on its
    output gradient (grad_in)."""
    from types import SimpleNamespace

    class Plan:
        gpu_tiles = staticmethod(lambda x: True)
        wgrad_add = staticmethod(lambda: True)
        combo = staticmethod(lambda: True)

    def rides(cout, cin, hw, shared=True, **kw):
        dy, x = torch.empty(2, cout, hw, hw), torch.empty(2, cin, hw, hw)
        out = SimpleNamespace(x=x if shared else torch.empty_like(x))
        kw = dict(dict(grad_in=object(), grad_out=out, pointwise=True), **kw)
        return kconv.wgrad_rides(Plan, dy, x, torch.empty(cout, cin, 1, 1), 64, **kw)

    # conv3, whose dgrad's epilogue loads its input for BN2's sums: layer1, layer2 (1024 adds a pixel
    # against 2·512 + 128 reads); not layer3 (4096 against 2304) or layer4
    assert [rides(4 * c, c, hw) for c, hw in ((64, 56), (128, 28), (256, 14), (512, 7))] == [True, True, False, False]
    # conv1 reads a block output its dgrad does not load: 64·256 adds against 2·64 reads
    assert not rides(64, 256, 56, shared=False)
    assert not rides(256, 64, 56, pointwise=False)  # (a 3×3, or strided: the caller says)
    assert not rides(256, 64, 56, dbias=torch.empty(256))
    assert not rides(256, 64, 56, groups=2)
