"""Training: the zoo's gradients against the torch twin, optimizers, grad
modes, frozen parameters, checkpoints and what backward saves."""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import netdsl
from netdsl import runtime as rt
from launches import parts
from test_modules import FAST
from test_modules import SLOW as ZOO_SLOW
from twin import grad_compare, randomize, rel_err, saved_bytes, twins

SPECS = Path(__file__).resolve().parent.parent / "specs"

# The forward twins' zoo (test_modules); the slow part by family: the rest of
# the zoo reuses these kernels at more layers (VGG without BN or LRN is
# AlexNet's conv→ReLU→pool pattern).  CifarResNet's blocks are ResNet18's
# pattern at another size: its gradients are a slow variant.
SLOW = [c for c in ZOO_SLOW + FAST if c[1] in ("ResNet50", "GoogLeNet", "DenseNet121", "AlexNet", "VGG_A_LRN",
                                                "VGG11_BN", "CifarResNet")]
FAST = [c for c in FAST if c not in SLOW]


def _zoo(file, net, shape, overrides):
    tri, ref = twins(str(SPECS / file), net, **overrides)
    torch.manual_seed(3)
    grad_compare(tri, ref, torch.randn(*shape))


@pytest.mark.parametrize("file,net,shape,overrides", FAST, ids=[c[1] for c in FAST])
def test_zoo_gradients_against_torch_twin(file, net, shape, overrides):
    _zoo(file, net, shape, overrides)


@pytest.mark.slow
@pytest.mark.parametrize("file,net,shape,overrides", SLOW, ids=[c[1] for c in SLOW])
def test_zoo_gradients_against_torch_twin_slow(file, net, shape, overrides):
    _zoo(file, net, shape, overrides)


SMALL = """
net Small input(3, 12, 12) {
    conv(8, 3, padding=1, bias=false) -> bn -> relu
    residual { conv(8, 3, padding=1, bias=false) -> bn -> relu -> conv(8, 3, padding=1, bias=false) -> bn } -> relu
    maxpool(2)
    conv(6, 1) -> relu
    global_avgpool -> flatten -> linear(5)
}
"""


@pytest.fixture(scope="module")
def small_spec(tmp_path_factory):
    p = tmp_path_factory.mktemp("train") / "small.net"
    p.write_text(SMALL)
    return str(p)


def _steps(model, opt, xs, ys):
    model.train()
    for x, y in zip(xs, ys):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True),
    lambda p: torch.optim.Adam(p, lr=3e-3),
    lambda p: torch.optim.AdamW(p, lr=3e-3),
    lambda p: torch.optim.RMSprop(p, lr=1e-3),
], ids=["sgd", "adam", "adamw", "rmsprop"])
def test_optimizer_steps_match_the_twin(small_spec, make_opt):
    # (no conv bias before a batch norm: its gradient is rounding noise, which
    # Adam would normalise into full-size steps in both twins, differently)
    tri, ref = twins(small_spec, "Small")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, 12, 12, generator=g) for _ in range(3)]
    ys = [torch.randint(0, 5, (4,), generator=g) for _ in range(3)]
    _steps(tri, make_opt(tri.parameters()), xs, ys)
    _steps(ref, make_opt(ref.parameters()), xs, ys)
    ours = tri.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.allclose(ours[k].double(), v.double(), rtol=1e-4, atol=1e-5), k


def test_zero_grad_and_gradient_accumulation(small_spec):
    tri, ref = twins(small_spec, "Small")
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 3, 12, 12, generator=g) for _ in range(2)]
    for m in (tri, ref):
        m.train()
        m.zero_grad(set_to_none=True)
        for x in xs:  # two micro-batches accumulate into .grad
            m(x).square().mean().backward()
    for (n, a), (_, b) in zip(tri.named_parameters(), ref.named_parameters()):
        assert rel_err(a.grad, b.grad) < 1e-3, n
    tri.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in tri.parameters())


def test_no_grad_and_inference_mode_skip_autograd(small_spec):
    m = netdsl.build(small_spec, "Small")
    randomize(m)
    x = torch.randn(2, 3, 12, 12)
    m.eval()
    with torch.no_grad():
        m(x)  # folds BN once; the fold is cached until a parameter changes
    with torch.no_grad(), netdsl.kernel_log() as plain:
        y = m(x)
    assert y.grad_fn is None and not y.requires_grad
    with torch.inference_mode(), netdsl.kernel_log() as inference:
        z = m(x)
    assert z.is_inference() and torch.equal(y, z)
    assert plain == inference  # the fused inference path: BN folded into the convs
    assert not any("bn_fold" in name or "channel_affine" in name or "bn_stats" in name for name, _ in plain)
    y2 = m(x)  # with grad: the autograd path, same numbers
    assert y2.grad_fn is not None and torch.allclose(y, y2, rtol=1e-5, atol=1e-6)
    m.train()
    before = m.state_dict()["1.running_mean"].clone()
    with torch.no_grad():
        m(x)  # as torch: train-mode BN under no_grad still updates its running statistics
    assert not torch.equal(before, m.state_dict()["1.running_mean"])


def test_frozen_parameters_get_no_gradient_and_no_kernel(small_spec):
    tri, ref = twins(small_spec, "Small")
    for m in (tri, ref):
        for p in list(m.parameters())[:3]:  # the first conv and its BN
            p.requires_grad_(False)
    torch.manual_seed(2)
    grad_compare(tri, ref, torch.randn(3, 3, 12, 12), modes=("train",))
    # the course's literal filters never train: a backward only reaches the input
    f = netdsl.build(str(SPECS / "course.net"), "Filters")
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    with netdsl.kernel_log() as log:
        f(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in f.parameters())
    # each conv's backward launch runs its dgrad part only
    with rt.plan_launches() as plan:
        f(x).sum().backward()
    backward = [k.fn.__name__ for k, _, _ in parts(plan)]
    assert any("dgrad" in name for name in backward) and not any("wgrad" in name for name in backward)
    assert len(log) == len(plan)


def test_checkpoint_of_the_torch_twin_loads_strictly(small_spec, tmp_path):
    ref = netdsl.build(small_spec, "Small", target="torch")
    randomize(ref, seed=4)
    torch.save(ref.state_dict(), tmp_path / "twin.pt")
    tri = netdsl.build(small_spec, "Small")
    tri.load_state_dict(torch.load(tmp_path / "twin.pt", weights_only=True), strict=True)
    x = torch.randn(5, 3, 12, 12)
    tri.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(tri(x).argmax(1), ref(x).argmax(1))
        assert rel_err(tri(x), ref(x)) < 1e-4


@pytest.mark.parametrize("file,net,shape,overrides", [
    ("resnet.net", "ResNet18", (4, 3, 64, 64), {"width": 8, "num_classes": 10}),
    ("course.net", "SequentialCNN", (4, 1, 28, 28), {}),
], ids=["ResNet18", "SequentialCNN"])
def test_backward_saves_no_more_than_eager(file, net, shape, overrides):
    """What a training forward keeps for backward (distinct storages), ours
    against eager PyTorch's for the twin: the memory of a training step
    beyond the parameters."""
    tri, ref = twins(str(SPECS / file), net, **overrides)
    tri.train(), ref.train()
    x = torch.randn(*shape)
    ours, eager = saved_bytes(tri, x.clone().requires_grad_()), saved_bytes(ref, x.clone().requires_grad_())
    assert ours <= eager, (ours, eager)


def test_autocast_half_inputs_fp32_master_gradients(small_spec):
    """Under torch.autocast convs and linears run in half precision (fp16 here:
    the CPU interpreter has no bf16; on CUDA bf16 runs the same code), BN
    statistics stay fp32, and gradients land fp32 on the fp32 parameters.
    Half-precision gradients differ from each other by rounding alone, so
    ours and torch's are both judged against a float64 twin.  The convs keep
    their default initialisation, so the global generator is seeded: fp16
    rounding can flip a max-pool's pick between near-equal values, which
    moves a whole gradient, and the values must not hang on test order."""
    torch.manual_seed(0)
    tri, ref = twins(small_spec, "Small")
    exact = copy.deepcopy(ref).double()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 12, 12, generator=g)
    y = torch.randint(0, 5, (4,), generator=g)
    outs = []
    for m in (tri, ref):
        m.train()
        with torch.autocast("cpu", dtype=torch.float16):
            out = m(x)
            loss = F.cross_entropy(out.float(), y) * 1024  # scaled, as GradScaler does: no fp16 underflow
        loss.backward()
        outs.append(out)
    exact.train()
    (F.cross_entropy(exact(x.double()), y) * 1024).backward()
    assert outs[0].dtype == outs[1].dtype == torch.float16
    assert rel_err(outs[0], outs[1]) < 1e-2
    params = zip(tri.named_parameters(), ref.parameters(), exact.parameters())
    for (n, a), b, e in params:
        assert a.grad.dtype == torch.float32, n
        ours, torchs = rel_err(a.grad, e.grad), rel_err(b.grad, e.grad)
        assert ours < max(2 * torchs, 1e-2), (n, ours, torchs)
    assert all(t.dtype == torch.float32 for k, t in tri.state_dict().items() if "running" in k)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_training_step_compiles_for_gpus(small_spec, dtype):
    """bf16 cannot run under the CPU interpreter: a planned autocast training
    step (forward and backward) compiles every launch for sm_90 and sm_80
    instead, without spills."""
    from netdsl import aot

    m = netdsl.build(small_spec, "Small")
    with torch.autocast("cpu", dtype=dtype):
        launches = aot.signatures(m, torch.randn(32, 3, 12, 12), train=True, backward=True)
    names = {k.fn.__name__ for k, _, _ in launches}
    assert {"conv_backward__0", "channel_grad", "pool_backward__9"} <= names, names
    # the BN backward rides in the dgrad's and wgrad's loads (both parts of one conv_backward launch)
    assert any(meta.get("d_IN_BNG") and meta["DGRAD"] for _, _, meta in launches)
    assert any(meta.get("w_G_BNG") and meta["WGRAD"] for _, _, meta in launches)
    assert any(sig.get("x_ptr") == ("*bf16" if dtype == torch.bfloat16 else "*fp16")
               for k, sig, _ in launches if k.fn.__name__.startswith("conv_bn_relu")), "convs ran in fp32"
    for kernel, sig, meta in launches:
        for arch in (90, 80):
            info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
            assert info["spill_stores"] == 0, (kernel.fn.__name__, arch, info)
