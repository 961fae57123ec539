"""relu6 and hardsigmoid at every place an activation runs: a conv's and a
linear's epilogue, a batch norm's apply (and a deferred one, applied as the
next conv loads), after a residual add, and alone; forward and gradients
against the torch twin, in train and eval mode."""
import copy

import pytest
import torch

from twin import compare, grad_compare, twins

SPEC = """\
net ConvBN input(3, 8, 8) { conv(8, 3, padding=1) -> bn -> ACT -> conv(6, 3, padding=1) -> bn -> ACT }
net ConvLinear input(3, 8, 8) { conv(8, 3, padding=1) -> ACT -> maxpool(2) -> flatten -> linear(10) -> ACT }
net Residual input(8, 6, 6) {
    residual { conv(8, 3, padding=1, bias=false) -> bn -> ACT -> conv(8, 3, padding=1, bias=false) -> bn }
    ACT
}
net PreAct input(8, 6, 6) { bn -> ACT -> conv(8, 1) -> maxpool(2) -> ACT }
"""


NETS = ["ConvBN", "ConvLinear", "Residual", "PreAct"]
# hardsigmoid takes the same paths as relu6: one of its cases in the default run, the rest in the slow one
CASES = [pytest.param(act, net, marks=[pytest.mark.slow] if act == "hardsigmoid" and net != "ConvBN" else [],
                      id=f"{net}-{act}") for act in ("relu6", "hardsigmoid") for net in NETS]


@pytest.mark.parametrize("act,net", CASES)
def test_against_torch(tmp_path, act, net):
    p = tmp_path / "a.net"
    p.write_text(SPEC.replace("ACT", act))
    # (the convs' and linears' default init draws from the global generator: the same in any test order)
    torch.manual_seed(0)
    tri, ref = twins(str(p), net, seed=len(net))
    with torch.no_grad():  # wide enough that the activations' inputs land on both flat pieces and the linear one
        for name, t in ref.state_dict().items():
            if name.endswith("weight"):
                t.mul_(6.0)
    tri.load_state_dict(ref.state_dict())
    torch.manual_seed(len(act))
    x = torch.randn(3, *tri.input_shape) * 4
    ys, probe = [], copy.deepcopy(ref)  # (a train-mode forward moves the running statistics)
    for mode in ("train", "eval"):
        getattr(probe, mode)()
        with torch.no_grad():
            ys.append(probe(x))
    lo, hi = (0.0, 6.0) if act == "relu6" else (0.0, 1.0)
    y = torch.cat([t.flatten() for t in ys])
    assert (y == lo).any() and (y == hi).any() and ((y > lo) & (y < hi)).any(), "every piece is exercised"
    compare(tri, ref, x)
    grad_compare(tri, ref, x)


# silu, hardswish, gelu and hardtanh: the output does not determine their
# derivative.  In eval the first three run in the epilogues like the others;
# the training forward runs them as kernels of their own, which keep the
# input (fusion.split_input_activations).  hardtanh never fuses.
FROM_INPUT = ["silu", "hardswish", "gelu", 'gelu(approximate="tanh")', "hardtanh(-0.5, 2)"]
# silu and tanh-gelu against torch in the default run (the others take the same paths), the rest in the slow one
AGAINST_TORCH = [pytest.param(a, marks=[] if a in ("silu", 'gelu(approximate="tanh")') else [pytest.mark.slow])
                 for a in FROM_INPUT]
INPUT_SPEC = """\
net Chain input(3, 8, 8) { conv(8, 3, padding=1) -> bn -> ACT -> conv(8, 3, padding=1) -> ACT -> maxpool(2) -> flatten -> linear(10) -> ACT }
net Alone input(4, 5, 5) { ACT }
net Res input(8, 5, 5) { residual { conv(8, 3, padding=1, bias=false) -> bn } -> ACT }
"""


def _spec(tmp_path, act):
    p = tmp_path / "a.net"
    p.write_text(INPUT_SPEC.replace("ACT", act))
    return str(p)


@pytest.mark.parametrize("act", AGAINST_TORCH)
def test_from_input_activations_against_torch(tmp_path, act):
    tri, ref = twins(_spec(tmp_path, act), "Chain", seed=len(act))
    torch.manual_seed(len(act))
    x = torch.randn(3, *tri.input_shape) * 4
    probe = copy.deepcopy(ref).eval()
    seen = []
    getattr(probe, "2").register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        probe(x)
    z = seen[0]  # the first activation's inputs reach past every kink (hardswish's ±3, hardtanh's bounds)
    assert (z < -3).any() and (z > 3).any() and ((z > -0.5) & (z < 2)).any()
    compare(tri, ref, x)
    grad_compare(tri, ref, x)
    tri, ref = twins(_spec(tmp_path, act), "Res", seed=len(act) + 1)  # after a residual add
    compare(tri, ref, torch.randn(3, 8, 5, 5) * 2)
    grad_compare(tri, ref, torch.randn(3, 8, 5, 5) * 2)


@pytest.mark.parametrize("act", FROM_INPUT)
def test_from_input_activations_fuse_in_eval_and_stand_alone_in_training(tmp_path, act):
    from launches import parts
    from netdsl import runtime as rt
    from netdsl.compiler import checked_net
    from netdsl.plan import inference_plan
    from netdsl.plan.show import listing
    name = act.split("(")[0]
    text = listing(inference_plan(checked_net(_spec(tmp_path, act), "Chain")))
    kernels = [line.split(" = ")[1].split("(")[0] for line in text.splitlines()[:-1]]
    if name == "hardtanh":
        assert kernels == ["conv_bn", "hardtanh", "conv", "hardtanh", "maxpool", "flatten", "linear", "hardtanh"]
    else:
        assert kernels == [f"conv_bn_{name}", f"conv_{name}", "maxpool", "flatten", f"linear_{name}"]
    import netdsl
    m = netdsl.build(_spec(tmp_path, act), "Chain").train()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with rt.plan_launches() as launches:
        m(x)
    ops = [meta.get("OP") for k, _, meta in parts(launches) if k.fn.__name__ == "elementwise"]
    assert [op for op in ops if op != 3] == [0, 0, 0], "three activation kernels of their own"  # (3: flatten's copy)


@pytest.mark.parametrize("act", FROM_INPUT)
def test_from_input_activations_gradcheck_float64(tmp_path, act):
    import netdsl
    m = netdsl.build(_spec(tmp_path, act), "Alone").double()
    torch.manual_seed(len(act))
    x = (torch.randn(2, 4, 5, 5, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True, atol=1e-6, rtol=1e-4)
    ref = netdsl.build(_spec(tmp_path, act), "Alone", target="torch").double()
    assert torch.allclose(m(x), ref(x), rtol=1e-12, atol=1e-12)  # and exactly torch's formula


@pytest.mark.parametrize("act", FROM_INPUT)
def test_from_input_activations_compile_for_sm90_and_sm80(tmp_path, act):
    import netdsl
    from netdsl import aot
    m = netdsl.build(_spec(tmp_path, act), "Alone")
    kernels = aot.signatures(m, torch.randn(2, 4, 5, 5), train=True, backward=True)
    ops = sorted(meta["OP"] for k, _, meta in kernels if k.fn.__name__ == "elementwise")
    assert ops == [0, 5]  # the activation, and its derivative from the input
    chain = netdsl.build(_spec(tmp_path, act), "Chain")  # and the eval epilogues
    kernels += [k for k in aot.signatures(chain, torch.randn(2, 3, 8, 8)) if k[2].get("ACT", 0) >= 7]
    for kernel, sig, meta in kernels:
        for arch in (90, 80):
            info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
            assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (kernel.fn.__name__, arch, info)
