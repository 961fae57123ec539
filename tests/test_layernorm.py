"""ConvNeXt's layers: `layernorm` over each pixel's channels (torchvision's
LayerNorm2d), `linear(n, over="channels")` (a Linear on each pixel, with
Linear's weight) and `layer_scale` (a bare per-channel parameter).  Shapes,
keys and errors, the plan they lower to, forward and gradients against the
torch twin, float64 gradcheck, and the kernels compiled for real GPUs."""
import pytest
import torch
import torch.nn.functional as F

import netdsl
from netdsl import check_text
from netdsl.compiler import checked_net
from netdsl.plan import inference_plan
from netdsl.plan.show import listing
from netdsl.report import state_keys
from twin import compare, grad_compare, rel_err, spread, twins

SPEC = """\
net Block input(8, 6, 5) {
    stem: conv(16, 1)
    norm: layernorm(eps=1e-6)
    residual {
        block: {
            conv(16, 3, padding=1, groups=16)
            layernorm(eps=1e-6)
            linear(32, over="channels") -> gelu
            linear(16, over="channels")
        }
        layer_scale: layer_scale(0.5)
    }
    global_avgpool
    head: layernorm -> flatten -> fc: linear(10)
}

net Plain input(12) {
    norm: layernorm(affine=false) -> fc: linear(4)
}

net Small input(6, 3, 4) {
    norm: layernorm
    residual {
        block: { linear(8, over="channels") -> gelu -> linear(6, over="channels") }
        layer_scale: layer_scale(0.5)
    }
    head: layernorm(affine=false)
}
"""


def _spec(tmp_path):
    path = tmp_path / "ln.net"
    path.write_text(SPEC)
    return path


def _spread(module, seed):
    spread(module, seed, ("norm", "head", "block.1", "layer_scale"))


def test_shapes_keys_and_parameter_count(tmp_path):
    res = check_text(SPEC, str(_spec(tmp_path)))
    assert res.ok, res.diagnostics
    block = res.nets[0]
    assert block.out_shape == (10,)
    # (torch's order: a module's own parameters, the bare layer_scale among the root's, before its children's)
    assert state_keys(block) == [
        "layer_scale", "stem.weight", "stem.bias", "norm.weight", "norm.bias", "block.0.weight", "block.0.bias",
        "block.1.weight", "block.1.bias", "block.2.weight", "block.2.bias", "block.4.weight", "block.4.bias",
        "head.weight", "head.bias", "fc.weight", "fc.bias"]
    m = netdsl.build(_spec(tmp_path), "Block")
    assert list(m.state_dict()) == state_keys(block)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["block.2.weight"] == (32, 16) and shapes["block.4.weight"] == (16, 32)  # Linear's, not a conv's
    assert shapes["layer_scale"] == (16, 1, 1)
    assert sum(v.numel() for v in m.parameters()) == 144 + 32 + 160 + 32 + 544 + 528 + 16 + 32 + 170
    assert state_keys(res.nets[1]) == ["fc.weight", "fc.bias"]  # affine=false: no parameters


def test_the_plan(tmp_path):
    """A per-pixel linear runs as a 1×1 conv with its activation in the epilogue; the layer scale before the
    residual add keeps the add a launch of its own (stochastic depth may come between them, as in ConvNeXt)."""
    assert listing(inference_plan(checked_net(_spec(tmp_path), "Block"))) == """\
t1 = conv(x)  stem
t2 = layernorm(t1)  norm
t3 = depthwise_conv(t2)  block.0
t4 = layernorm(t3)  block.1
t5 = linear_gelu(t4)  block.2 block.3
t6 = linear(t5)  block.4
t7 = layer_scale(t6)  layer_scale
t8 = add(t7, t2)  add
t9 = global_avgpool(t8)  4
t10 = layernorm(t9)  head
t11 = flatten(t10)  6
t12 = linear(t11)  fc
return t12"""


@pytest.mark.parametrize("net,shape", [("Block", (3, 8, 6, 5)), ("Plain", (5, 12))])
def test_forward_and_gradients_match_torch(tmp_path, net, shape):
    tri, ref = twins(_spec(tmp_path), net)
    _spread(ref, seed=len(net))
    tri.load_state_dict(ref.state_dict())
    torch.manual_seed(1)
    x = torch.randn(*shape) * 2 + 0.5
    compare(tri, ref, x)
    grad_compare(tri, ref, x, modes=("train",))  # (layer norm has no running statistics: one mode is enough)


def test_the_layer_norm_kernel_on_every_layout(tmp_path):
    """Channels-last (where a pixel's channels are contiguous) and NCHW inputs, with and without affine,
    more channels than a power of two."""
    import sys

    from netdsl import runtime as rt

    K = sys.modules[type(netdsl.build(_spec(tmp_path), "Plain")).__module__].K  # the generated file's kernels
    torch.manual_seed(3)
    for cl in (True, False):
        x = torch.randn(2, 40, 3, 5) * 3 + 1
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        for affine in (True, False):
            ln = rt.LayerNorm2d(40, eps=1e-5, elementwise_affine=affine)
            if affine:
                with torch.no_grad():
                    ln.weight.normal_()
                    ln.bias.normal_()
            with torch.no_grad():
                y = rt.layernorm(K, ln, x)
            want = F.layer_norm(x.permute(0, 2, 3, 1), (40,), ln.weight, ln.bias, 1e-5).permute(0, 3, 1, 2)
            assert y.shape == want.shape and rel_err(y, want) < 1e-5, (cl, affine)


def test_gradcheck_float64(tmp_path):
    m = netdsl.build(_spec(tmp_path), "Small").double()
    _spread(m, seed=4)
    torch.manual_seed(4)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True, atol=1e-6, rtol=1e-4)
    # and the parameters' gradients: the float64 twin's
    ref = netdsl.build(_spec(tmp_path), "Small", target="torch").double()
    ref.load_state_dict(m.state_dict())
    w = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    (m(x) * w).sum().backward()
    (ref(x.detach().requires_grad_()) * w).sum().backward()
    grads = [(name, p.grad, q.grad) for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters())]
    assert len(grads) == 7
    for name, a, b in grads:
        assert rel_err(a, b) < 1e-10, name


def test_kernels_compile_for_sm90_and_sm80(tmp_path):
    from netdsl import aot
    m = netdsl.build(_spec(tmp_path), "Block")
    kernels = aot.signatures(m, torch.randn(2, 8, 6, 5), train=True, backward=True)
    names = {k.fn.__name__ for k, _, _ in kernels}
    assert {"layernorm", "layernorm_backward", "layernorm_param_grad", "mul_grad"} <= names
    for kernel, sig, meta in kernels:
        if kernel.fn.__name__ in ("layernorm", "layernorm_backward", "layernorm_param_grad", "mul_grad"):
            for arch in (90, 80):
                info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
                assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (kernel.fn.__name__, arch, info)


@pytest.mark.parametrize("body,message", [
    ("input(3) { layer_scale }", None),
    ("input(3, 4, 4) { flatten -> layernorm -> layer_scale }", None),
    ("input(3, 4, 4) { flatten -> linear(5, over=\"channels\") }",
     "linear over channels needs a C×H×W input but gets 48"),
    ("input(3, 4, 4) { linear(5) }", "linear needs a flat input but gets 3×4×4"),
    ("input(3, 4, 4) { linear(5, over=\"pixels\") }", "linear's over must be one of"),
    ("input(3, 4, 4) { linear(5, in_features=4, over=\"channels\") }",
     "linear expects 4 input channels (weight [5, 4]) but its input has 3 channels"),
])
def test_errors(body, message):
    res = check_text(f"net N {body}\n", "e.net")
    if message is None:
        assert res.ok, res.diagnostics
        return
    assert not res.ok
    assert any(message in d.message for d in res.diagnostics), [d.message for d in res.diagnostics]


def test_many_programs(tmp_path, monkeypatch):
    """Tiles of 2 pixels (a GPU's grid has many programs; the interpreter's one): dγ and dβ then add up many
    programs' partial sums, and the results stay the same."""
    import triton

    from netdsl.kernels import layernorm as kln
    monkeypatch.setattr(kln, "_tiles", lambda rt, x4: (2, max(2, triton.next_power_of_2(x4.shape[1]))))
    tri, ref = twins(_spec(tmp_path), "Small")
    _spread(ref, seed=6)
    tri.load_state_dict(ref.state_dict())
    torch.manual_seed(6)
    x = torch.randn(3, 6, 3, 4)
    compare(tri, ref, x)
    grad_compare(tri, ref, x, modes=("train",))
