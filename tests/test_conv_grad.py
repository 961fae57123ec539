"""The conv backward kernels (building blocks for training): weight and input
gradients against torch.nn.grad on random odd sizes, strides, dilations and groups."""
import random

import pytest
import torch

from netdsl import runtime as rt
from netdsl.kernels import conv as kconv
from netdsl.kernels import render


def _kernels(tmp_path, consts):
    src = ("import triton\nimport triton.language as tl\n\n"
           + render(kconv.CONV2D_WGRAD, "wgrad", "test", **consts) + "\n\n"
           + render(kconv.CONV_TRANSPOSE2D, "dgrad", "test", **consts))
    path = tmp_path / f"k{abs(hash(tuple(sorted(consts.items()))))}.py"
    path.write_text(src)
    from netdsl.cache import import_file

    mod = import_file(path)
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
    wgrad, dgrad = _kernels(tmp_path, consts)
    x = torch.randn(N, cin, H, W)
    w = torch.randn(cout, cin // g, k, k)
    y = torch.nn.functional.conv2d(x, w, stride=s, padding=p, dilation=d, groups=g)
    dy = torch.randn_like(y).contiguous(memory_format=torch.channels_last)
    dw = torch.empty_like(w)
    kconv.conv2d_wgrad(rt._rt, wgrad, dy, x, dw, groups=g)
    expect_w = torch.nn.grad.conv2d_weight(x, w.shape, dy, stride=s, padding=p, dilation=d, groups=g)
    assert torch.allclose(dw, expect_w, rtol=1e-4, atol=1e-4)
    dx = torch.empty_like(x)
    kconv.conv2d_dgrad(rt._rt, dgrad, dy, w, dx, groups=g)
    expect_x = torch.nn.grad.conv2d_input(x.shape, w, dy, stride=s, padding=p, dilation=d, groups=g)
    assert torch.allclose(dx, expect_x, rtol=1e-4, atol=1e-4)


def test_backward_kernels_compile_for_sm90_and_sm80(tmp_path):
    from netdsl import aot

    wgrad, dgrad = _kernels(tmp_path, dict(KH=3, KW=3, SH=2, SW=2, PH=1, PW=1, DH=1, DW=1, GROUPS=1))
    dy, x, dw = torch.randn(8, 64, 14, 14), torch.randn(8, 32, 28, 28), torch.empty(64, 32, 3, 3)
    with rt.plan_launches() as plan:
        kconv.conv2d_wgrad(rt._rt, wgrad, dy, x, dw)
        kconv.conv2d_dgrad(rt._rt, dgrad, dy, dw, x)
    for kernel, args, meta in plan:
        sig = {n: aot._type(a) for n, a in zip(kernel.arg_names, args)}
        sig.update({k: "constexpr" for k in meta if k not in aot.OPTIONS})
        for arch in (90, 80):
            info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
            assert info["spill_stores"] == 0, (kernel.fn.__name__, arch, info)
