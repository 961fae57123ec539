"""Tuned launch configurations (tuning.py, tune.py, `netdsl tune`, `netdsl
compile --tuned`).  Timing needs a GPU; here the timer is a stand-in that
favours the launch with the most programs, so the tuner's picks are known
and far from the defaults.  What is checked for real: which sites a step
records, that the module comes back unchanged, that the picks are saved,
reused without timing, baked into generated files and used by the
launches, and that a training step with them still matches torch."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch

from netdsl import runtime as rt
from netdsl import tune as T
from netdsl import tuning
from netdsl.kernels import conv as kconv
from netdsl.cache import import_file
from test_cli import run
from twin import grad_compare, twins

# one worker runs this file: the module's tuned fixture is made once, not once a worker
pytestmark = pytest.mark.xdist_group("tuning")
# the tests on that fixture (about a minute of interpreter work on one worker) run with the slow tests
on_the_tuned_fixture = pytest.mark.slow

SMALL = """
block Bottleneck(inplanes, planes, stride = 1) {
    residual {
        conv1: conv(planes, 1, bias=false) -> bn1: bn -> relu: relu
        conv2: conv(planes, 3, stride=stride, padding=1, bias=false) -> bn2: bn -> relu: relu
        conv3: conv(planes * 2, 1, bias=false) -> bn3: bn
    } shortcut downsample: if stride != 1 or inplanes != planes * 2 {
        conv(planes * 2, 1, stride=stride, bias=false) -> bn
    }
    relu: relu
}
net Small(num_classes = 5) input(3, 8, 8) {
    stem: conv(16, 3, padding=1, bias=false) -> bn -> relu
    b1: Bottleneck(16, 16, stride=2)
    b2: Bottleneck(32, 16)
    pool: global_avgpool -> flatten
    fc: linear(num_classes)
}
"""


def most_programs(calls):
    """A stand-in timer: 1 / the programs fn launched (runs fn once, for real)."""
    def timer(fn):
        with rt.kernel_log() as log:
            fn()
        calls.append(1)
        programs = 1
        for _, grid in log:
            programs += grid[0] * (grid[1] if len(grid) > 1 else 1) * (grid[2] if len(grid) > 2 else 1)
        return 1.0 / programs

    return timer


def _step_plan(module, x):
    module.train()
    with rt.plan_launches() as plan:  # (as in training and in the tuner's step: the input needs no gradient)
        y = module(x)
        y.backward(torch.empty_like(y))
    module.zero_grad(set_to_none=True)
    return plan


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tune-cache")
    spec = cache / "small.net"
    spec.write_text(SMALL)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NETDSL_CACHE", str(cache))
        # two candidates per table keep the interpreter's work small
        mp.setattr(T, "CONV", [(32, 64, 32, 4, 4), (64, 64, 64, 4, 3)])
        mp.setattr(T, "DGRAD", [(16, 16, 16, 3), (64, 64, 32, 4)])
        mp.setattr(T, "WGRAD", [(16, 16, 16, 2), (64, 64, 64, 3)])
        # a split-K wgrad wherever 16-pixel steps allow 4 chunks (on a GPU: where tiles leave SMs idle), so
        # the tuner also times 2 and 8 chunks
        mp.setattr(kconv, "wgrad_split", lambda rt, x, tiles, M, BK: 4)
        tuning.forget()
        tri, ref = twins(str(spec), "Small")
        x = torch.randn(2, 3, 8, 8)
        before = copy.deepcopy(tri.state_dict())
        calls = []
        results = T.tune(tri, x, timer=most_programs(calls))
        yield SimpleNamespace(spec=spec, cache=cache, tri=tri, ref=ref, x=x, before=before, calls=calls,
                              results=results)
    tuning.forget()


@on_the_tuned_fixture
def test_a_training_step_records_every_conv_launch_once_per_shape(tuned):
    kinds = [r.kind for r in tuned.results]
    # 10 conv launches (9 convs and the fc, a 1×1 conv) make 8 sites: b2.conv3 repeats b1.conv3's kernel,
    # shapes and flags; b1.downsample's 1×1 stride-2 input is the only other 2x16x8x8 1×1 conv, with a
    # kernel of its own.  Their backward launches make 9: b1.conv3's dgrad also takes its downsample BN's
    # sums (RES_SUMS), b2.conv3's has an identity shortcut
    assert kinds.count("conv") == 8 and kinds.count("conv_backward") == 9, [(r.kind, r.kernel, r.shapes)
                                                                             for r in tuned.results]
    # (the conv3s' backward sites share kernel and shapes: they differ in their flags)
    assert len({(r.kind, r.kernel, r.shapes) for r in tuned.results}) == len(tuned.results) - 1
    assert all(r.default_ms and r.best_ms and r.config is not None for r in tuned.results)
    # the stand-in timer favours small tiles: both kinds moved off the defaults somewhere
    assert any(r.config for r in tuned.results if r.kind == "conv")
    assert any(r.config for r in tuned.results if r.kind == "conv_backward")
    # ... and 8 chunks where the wgrad's pixels split (more programs), checked against the defaults' result
    assert any(r.config.get("w_SPLIT") == 8 for r in tuned.results if r.kind == "conv_backward")
    for r in tuned.results:
        assert r.best_ms <= r.default_ms and (r.config == {}) == (r.best_ms == r.default_ms), r


@on_the_tuned_fixture
def test_a_pointwise_convs_backward_is_timed_with_and_without_its_weight_gradient_in_the_dgrad(tuned):
    """Where a conv's weight gradient can ride in its dgrad (a 1×1 stride-1
    conv's, kernels/conv.py's WGRAD_ADD), the tuner times both ways and the
    pick says which (WGRAD_ADD).  The interpreter's tiles let every such
    weight gradient ride by default; the stand-in timer favours the most
    programs, the wgrad's own beside the dgrad's, so each pick turns it off."""
    ways = [r.config.get("WGRAD_ADD") for r in tuned.results if r.kind == "conv_backward"]
    # b1.conv1 (16→16 at 8×8), b2.conv1 (32→16) and the two conv3s (16→32 at 4×4); not the downsample
    # (stride 2), the 3×3s, the stem (no dgrad) or fc (its bias's gradient is the wgrad's)
    assert sorted(ways, key=str) == [0, 0, 0, 0] + [None] * 5, ways


@on_the_tuned_fixture
def test_tuning_leaves_the_module_as_it_was(tuned):
    after = tuned.tri.state_dict()
    for k, v in tuned.before.items():
        assert torch.equal(after[k], v), k
    assert all(p.grad is None for p in tuned.tri.parameters())


@on_the_tuned_fixture
def test_picks_are_saved_and_the_second_run_times_nothing(tuned):
    saved = json.loads((tuned.cache / "tuning.json").read_text())["devices"]["cpu"]
    assert len(saved) == len(tuned.results)
    assert sorted(e["kernel"] for e in saved.values()) == sorted(r.kernel for r in tuned.results)
    calls = []
    again = T.tune(tuned.tri, tuned.x, timer=most_programs(calls))
    assert calls == [] and all(r.note == "saved before" for r in again)
    assert sorted(json.dumps(r.config, sort_keys=True) for r in again) == \
        sorted(json.dumps(r.config, sort_keys=True) for r in tuned.results)


def _carries(kernel, args, meta, config):
    """Whether a planned launch carries config in full: its constexprs, and a
    split-K wgrad's chunk count (a runtime argument: w_SPLIT -> w_n_split)."""
    for c, v in config.items():
        if c == "WGRAD_ADD":  # (whether the weight gradient rides in the dgrad: the dgrad part's flag)
            if bool(meta["d_WGRAD_ADD"]) != bool(v):
                return False
        elif c.endswith("SPLIT"):
            if args[kernel.arg_names.index(c[:-len("SPLIT")] + "n_split")] != v:
                return False
        elif meta.get(c) != v:
            return False
    return True


def _uses(plan, results):
    """How many tuned (non-default) configs some planned launch of their kernel carries in full."""
    n = 0
    for r in results:
        if r.config and any(k.fn.__name__ == r.kernel and _carries(k, args, meta, r.config) for k, args, meta in plan):
            n += 1
    return n


@on_the_tuned_fixture
def test_launches_use_the_tuned_configs_and_NETDSL_TUNED_0_the_defaults(tuned, monkeypatch):
    picked = [r for r in tuned.results if r.config]
    assert _uses(_step_plan(tuned.tri, tuned.x), picked) == len(picked)
    monkeypatch.setenv("NETDSL_TUNED", "0")
    assert _uses(_step_plan(tuned.tri, tuned.x), [r for r in picked if r.kind == "conv"]) == 0


@on_the_tuned_fixture
def test_a_training_step_with_tuned_configs_matches_torch(tuned):
    # the picks change tile sizes, so the grid-wide BN merges run over other tile counts
    tri, ref = copy.deepcopy(tuned.tri), copy.deepcopy(tuned.ref)
    with rt.kernel_log() as log:
        grad_compare(tri, ref, tuned.x, modes=("train",))
    programs = {name: grid for name, grid in log}
    assert "conv_bn_relu__stem" in programs


@on_the_tuned_fixture
def test_a_candidate_that_fails_is_rejected_and_one_that_disagrees_is_caught(tuned):
    sites = T.record(tuned.tri, tuned.x)
    site = next(s for s in sites if s.kind == "conv" and s.name == "conv_bn_relu__stem")
    calls = []

    def flaky(fn):  # the first candidate "fails to compile"
        if not calls:
            calls.append(1)
            raise RuntimeError("out of resources: shared memory")
        return most_programs(calls)(fn)

    r = T.tune_site(site, flaky, T.Result(site.kind, site.name, site.shapes, default_ms=1.0))
    assert r.tried == 2 and len(r.rejected) == 1 and "shared memory" in r.rejected[0][1]
    assert r.config == {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 3}
    ref = tuning.clone((site.args, site.kwargs))
    got = tuning.clone((site.args, site.kwargs))
    ref_out, got_out = site.call({}, ref), site.call(r.config, got)
    assert T._agree(site, ref, got, ref_out, got_out) is None
    got[0][2][1, 3, 2, 2] += 1.0  # the conv's output
    assert "off by" in T._agree(site, ref, got, ref_out, got_out)


@on_the_tuned_fixture
def test_compile_tuned_bakes_the_picks_into_the_generated_file(tuned, tmp_path):
    out = tmp_path / "small_gen.py"
    rc, stdout, err = run("compile", str(tuned.spec), "--tuned", "-o", str(out),
                          env_extra={"NETDSL_CACHE": str(tuned.cache)})
    assert rc == 0, err
    assert f"baked in {len(tuned.results)} tuned launch configurations (cpu)" in stdout
    text = out.read_text()
    assert "rt.register_tuned({" in text and text.count("'config':") == len(tuned.results)
    saved = tuned.cache / "tuning.json"
    kept = saved.read_text()
    saved.unlink()  # a machine that never tuned: only the file's own table
    try:
        tuning.forget()
        assert tuning.entries() == {}
        mod = import_file(out, "netdsl_test_baked")
        assert set(tuning.entries()["cpu"]) == set(json.loads(kept)["devices"]["cpu"])
        m = mod.NETWORKS["Small"]()
        picked = [r for r in tuned.results if r.config]
        assert _uses(_step_plan(m, tuned.x), picked) == len(picked)
    finally:
        saved.write_text(kept)
        tuning.forget()


def test_compile_tuned_without_saved_configs_says_so(tmp_path):
    rc, stdout, err = run("compile", "specs/lenet.net", "--tuned", "-o", str(tmp_path / "l.py"),
                          env_extra={"NETDSL_CACHE": str(tmp_path)})
    assert rc == 0, err
    assert "baked in 0 tuned launch configurations: `netdsl tune` has saved none for these kernels" in stdout
    assert "register_tuned" not in (tmp_path / "l.py").read_text()


def test_a_broken_tuning_file_is_ignored_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("NETDSL_CACHE", str(tmp_path))
    (tmp_path / "tuning.json").write_text("{not json")
    tuning.forget()
    try:
        with pytest.warns(UserWarning, match="ignoring the tuning file"):
            assert tuning.entries() == {}
    finally:
        tuning.forget()


@pytest.mark.parametrize("config, ok", [
    ({"BLOCK_M": 64, "num_warps": 8, "num_stages": 3}, True),
    ({"d_BLOCK_M": 128, "w_BLOCK_K": 16, "d_STAGES": 2}, True),
    ({}, True),
    ({"BLOCK_M": 48}, False),  # not a power of two
    ({"BLOCK_M": "64"}, False),
    ({"num_warps": 3}, False),
    ({"WGRAD_ADD": 1, "d_BLOCK_M": 64, "num_warps": 8}, True),
    ({"WGRAD_ADD": 2}, False),  # (0 or 1: whether a weight gradient rides in its dgrad)
    ({"GRID": 4}, False),  # not a tunable
    (["BLOCK_M", 64], False),
])
def test_config_validation(config, ok):
    assert tuning.valid(config) is ok


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_netdsl_tune_needs_a_gpu(spec_file):
    rc, out, err = run("tune", spec_file(SMALL), "--net", "Small")
    assert rc == 2 and out == ""
    assert err == "netdsl: error: tuning times kernels on a CUDA GPU, and torch sees none on this machine\n"


@on_the_tuned_fixture
def test_tune_without_a_gpu_needs_a_timer(tuned):
    with pytest.raises(T.TuneError, match="on a CUDA GPU"):
        T.tune(tuned.tri, tuned.x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tuning_on_the_gpu(tmp_path, monkeypatch, spec_file):
    monkeypatch.setenv("NETDSL_CACHE", str(tmp_path))
    tuning.forget()
    try:
        tri, ref = twins(spec_file(SMALL), "Small")
        tri, ref = tri.cuda(), ref.cuda()
        x = torch.randn(4, 3, 8, 8, device="cuda")
        results = T.tune(tri, x, budget_s=120)
        assert all(r.best_ms for r in results if r.note != "not tuned: out of time")
        torch.backends.cudnn.allow_tf32 = False
        try:
            grad_compare(tri, ref, x, modes=("train",))
        finally:
            torch.backends.cudnn.allow_tf32 = True
    finally:
        tuning.forget()
