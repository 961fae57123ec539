"""Parallel compilation before the first step (parallel_compile.py) and of the
tuner's candidates.  There is no GPU here: aot.jit_target(90) points
Triton's JIT at an sm_90 it compiles for and cannot launch on, so these run
the very compile path a GPU's first launches take, with the launches' own
specialisation.  What is checked: that one dry step compiles every kernel
the step launches, once each, with the launch's options; that it leaves the
module, its gradients and the dropout stream as they were; that a second
step has nothing left to compile; and that the tuner's candidates compile
one per config, a failing one left to the timing run to reject."""
import contextlib
import copy
import threading

import pytest
import torch

from netdsl import aot
from netdsl import parallel_compile as P
from netdsl import runtime as rt
from netdsl import tune as T
from netdsl import tuning
from netdsl.cache import build

SPEC = """
block Basic(planes) {
    residual {
        conv(planes, 3, padding=1, bias=false) -> bn -> relu
        conv(planes, 3, padding=1, bias=false) -> bn
    }
    relu
}
net Tiny(num_classes = 5) input(3, 8, 8) {
    stem: conv(16, 3, padding=1, bias=false) -> bn -> relu
    b1: Basic(16)
    pool: global_avgpool -> flatten
    drop: dropout(0.5)
    fc: linear(num_classes)
}
"""
SM90 = ("compile-only", 90)  # (aot.CompileOnlyDriver's device: the JIT's caches are per device)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("NETDSL_CACHE", str(tmp_path / "cache"))
    spec = tmp_path / "tiny.net"
    spec.write_text(SPEC)
    return build(str(spec), "Tiny")


def _compiled(kernel):
    """The kernels the JIT holds for sm_90: {specialisation key: compiled kernel}."""
    caches = kernel.device_caches.get(SM90)
    return dict(caches[0]) if caches else {}


def _planned(module, x, train):
    module.train(train)
    with rt.plan_launches() as plan:
        if train:
            y = module(x)
            y.backward(torch.empty_like(y))
        else:
            with torch.no_grad():
                module(x)
    module.zero_grad(set_to_none=True)
    return plan


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_one_dry_step_compiles_every_kernel_the_step_launches(tiny, train):
    x = torch.randn(4, 3, 8, 8)
    plan = _planned(tiny, x, train)
    kernels = {id(k): k for k, _, _ in plan}
    before = {i: len(_compiled(k)) for i, k in kernels.items()}
    with aot.jit_target(90):
        n = P.compile_step(tiny, x, train=train, jobs=2).submitted
        again = P.compile_step(tiny, x, train=train, jobs=2)
    assert again.submitted == 0  # a second step finds all of them
    new = {i: {key: c for key, c in _compiled(k).items()} for i, k in kernels.items()}
    assert n == sum(len(new[i]) - before[i] for i in kernels) > 0
    # and the second step's launches use exactly those
    assert {id(c) for c in again.kernels()} == {id(c) for d in new.values() for c in d.values()}
    for k, _, meta in plan:  # every launch's kernel, compiled for sm_90 with its launch options
        got = list(new[id(k)].values())
        assert got, k.fn.__name__
        assert any(c.metadata.num_warps == meta.get("num_warps", 4) and c.metadata.target.arch == 90 for c in got)
        assert all("ptx" in c.asm and c.asm["cubin"] for c in got)
    names = {k.fn.__name__ for k in kernels.values()}
    assert any(nm.startswith("conv_bn_relu") for nm in names)
    if train:
        assert any(nm.startswith("conv_backward") for nm in names)


@pytest.mark.parametrize("step", ["compile", "plan", "record"])
def test_a_dry_step_leaves_the_module_its_gradients_and_dropout_as_they_were(tiny, step):
    """What compiles a step ahead (parallel_compile), plans one (aot) or records
    one for the tuner (tune.record, whose kernels run: the running statistics
    move) leaves the module as it found it (rt.one_step)."""
    x = torch.randn(4, 3, 8, 8)
    for p in tiny.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in tiny.parameters()]
    state = copy.deepcopy(tiny.state_dict())
    calls = rt._dropout_calls
    tiny.eval()
    if step == "compile":
        with aot.jit_target(90):
            P.compile_step(tiny, x, train=True, jobs=2)
    elif step == "plan":
        assert aot.signatures(tiny, x, train=True, backward=True)
    else:
        assert T.record(tiny, x)
    assert not tiny.training  # (the mode it was in)
    assert rt._dropout_calls == calls
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, g in zip(tiny.parameters(), grads):
        assert torch.equal(p.grad, g)
    # and it still computes: a real step on the CPU after the dry one
    tiny.train()
    y = tiny(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(p.grad).all() for p in tiny.parameters())


def test_launches_from_another_thread_compile_in_the_pool_too(tiny):
    # a CUDA backward launches from autograd's own thread, where triton.AsyncCompileMode (a context
    # variable) was never entered: its compiles must still go to the pool, and nothing may run
    x = torch.randn(3, 3, 8, 8)
    tiny.eval()
    out = {}

    def forward():
        with torch.no_grad():
            out["y"] = tiny(x)

    with aot.jit_target(90), P.parallel(2) as compiles:
        t = threading.Thread(target=forward)
        t.start()
        t.join()
        submitted = {k.name for k in compiles.kernels()}
    assert compiles.submitted == len(compiles.kernels())  # (a fresh module: nothing was compiled before)
    assert "y" in out
    # every kernel of the forward (the stem's conv, the block's two, the fc's ...) went to the pool
    assert submitted == {k.fn.__name__ for k, _, _ in _planned(tiny, x, False)}
    with aot.jit_target(90), P.parallel(2) as again:  # here, in this thread, all of them are found
        with torch.no_grad():
            tiny(x)
    assert again.submitted == 0 and {k.name for k in again.kernels()} == submitted
    assert torch.isfinite(tiny(x)).all()  # and the real launches (the interpreter here) run after it


def test_precompile_does_nothing_for_a_cpu_tensor(tiny):
    assert P.precompile(tiny, torch.randn(2, 3, 8, 8)) == 0


def test_the_tuners_candidates_compile_one_per_config(tiny, monkeypatch):
    monkeypatch.setattr(T, "CONV", [(32, 64, 32, 4, 4), (64, 64, 64, 4, 3), (64, 32, 16, 8, 2)])
    tuning.forget()
    sites = T.record(tiny, torch.randn(4, 3, 8, 8))
    site = next(s for s in sites if s.kind == "conv" and s.name.startswith("conv_bn_relu"))
    configs = T.candidates(site)
    assert len(configs) == 3
    bad = dict(configs[0], BLOCK_K=24)  # tl.arange takes powers of 2 only: the compile fails
    work = tuning.clone((site.args, site.kwargs))
    before = len(_compiled(site.kernel))
    with aot.jit_target(90):
        n = T.precompile_candidates(site, configs + [bad], work, jobs=2)
    assert n == 4  # submitted: 3 compiled, the bad one failed and is left out
    got = list(_compiled(site.kernel).values())[before:]
    assert len(got) == 3
    assert sorted((c.metadata.num_warps, c.metadata.num_stages) for c in got) == [(4, 3), (4, 4), (8, 2)]
    assert T.precompile_candidates(site, configs, work, jobs=1) == 0  # one job: each compiles when timed


def test_netdsl_train_warns_and_goes_on_when_compiling_ahead_fails(tiny, monkeypatch):
    from netdsl import train

    def broken(*a, **k):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(P, "precompile", broken)
    with pytest.warns(UserWarning, match="compiling the kernels ahead failed .*no compiler today"):
        train._precompile(tiny, torch.randn(2, 3, 8, 8))


def test_the_tuner_warns_and_goes_on_when_compiling_candidates_ahead_fails(tiny, monkeypatch):
    tuning.forget()
    site = next(s for s in T.record(tiny, torch.randn(4, 3, 8, 8)) if s.kind == "conv")

    @contextlib.contextmanager
    def broken(*a, **k):
        raise RuntimeError("no pool today")
        yield

    monkeypatch.setattr(P, "parallel", broken)
    with pytest.warns(UserWarning, match="candidates ahead failed .*no pool today"):
        assert T.precompile_candidates(site, T.candidates(site), tuning.clone((site.args, site.kwargs)), 2) == 0
