"""Fusions switched off at compile time (`netdsl compile --disable NAME`,
`netdsl.build(..., disable=[...])`): the generated file says so and runs
without them, the cache keeps the variants apart, and a bad set is one
line of error with exit status 2."""
import re

import pytest
import torch

import netdsl
from netdsl import runtime as rt
from netdsl.switches import SWITCHES, SwitchError, check
from test_cli import run
from test_deferred_bn import BOTTLENECKS
from twin import compare, grad_compare, twins


def test_unknown_names_and_unmet_needs_are_one_line_errors(tmp_path):
    rc, _, err = run("compile", "specs/lenet.net", "--disable", "grid_merges", "-o", str(tmp_path / "x.py"))
    assert rc == 2 and not (tmp_path / "x.py").exists()
    assert err == ("netdsl: error: --disable grid_merges: no such fusion; the fusions are "
                   "deferred_bn, block_outputs, grid_merge, concat_in_place, shuffle_in_concat, depthwise_direct, "
                   "split_channels, gate_in_prologue, se_gate, "
                   "combo, wgrad_add\n")
    rc, _, err = run("compile", "specs/lenet.net", "--disable", "combo", "-o", str(tmp_path / "x.py"))
    assert rc == 2
    assert err == ("netdsl: error: --disable combo needs --disable wgrad_add too: "
                   "'wgrad_add' runs inside 'combo'\n")
    with pytest.raises(SwitchError, match="no such fusion"):
        netdsl.build("specs/lenet.net", "LeNet5", disable=["fold"])
    assert check(["combo", "wgrad_add"]) == {"combo", "wgrad_add"} and check(()) == frozenset()


def test_the_generated_file_says_what_it_runs_without(tmp_path):
    out = tmp_path / "r.py"
    rc, _, err = run("compile", "specs/resnet.net", "--net", "ResNet50", "--disable", "deferred_bn", "--disable",
                     "block_outputs", "-o", str(out))
    assert rc == 0, err
    src = out.read_text()
    assert "Compiled without: block_outputs, deferred_bn (netdsl compile --disable)." in src.splitlines()[1]
    assert "K = rt.Kernels(disable=('block_outputs', 'deferred_bn'), " in src
    assert "defer=True" not in src and "leave=True" not in src
    full = tmp_path / "full.py"
    assert run("compile", "specs/resnet.net", "--net", "ResNet50", "-o", str(full))[0] == 0
    text = full.read_text()
    assert "Compiled without" not in text and "K = rt.Kernels(bn_stats=" in text
    assert text.count("defer=True") > 0 and text.count("leave=True") == 15  # (test_deferred_bn's counts)


def _step(m, x):
    m.train()
    with rt.plan_launches() as launches:
        y = m(x)
        y.backward(torch.empty_like(y))
    return launches


def test_each_switch_changes_what_a_step_launches_and_not_what_it_computes(tmp_path):
    """Every switch off at once against every switch on: other launches (no
    deferred BN or block output made in a conv, merges by separate launches,
    each conv's gradients in two launches, no weight gradient added in a
    dgrad), and the same outputs, running statistics and gradients as torch."""
    p = tmp_path / "b.net"
    p.write_text(BOTTLENECKS)
    x = torch.randn(2, 16, 8, 8)
    on, _ = twins(str(p), "N")
    off, ref = twins(str(p), "N", disable=list(SWITCHES))
    assert type(on).__module__ != type(off).__module__  # two cache entries
    flags = [{f for _, _, meta in _step(m, x) for f, v in meta.items() if v is True} for m in (on, off)]
    for f in ("IN_BN", "IN_RES", "MERGE", "d_WGRAD_ADD"):
        assert f in flags[0] and f not in flags[1], f
    names = [[k.fn.__name__.split("__")[0] for k, _, _ in _step(m, x)] for m in (on, off)]
    assert "bn_stats" not in names[0] and "bn_stats" in names[1]
    # compiled without combo, a conv's backward is two launches of the same kernel, dgrad and wgrad apart
    assert names[1].count("conv_backward") > names[0].count("conv_backward")
    compare(off, ref, x)
    grad_compare(off, ref, x)


def test_a_switch_is_part_of_the_cache_key(tmp_path, monkeypatch):
    monkeypatch.setenv("NETDSL_CACHE", str(tmp_path / "cache"))
    a = netdsl.compile_to_module("specs/lenet.net", "LeNet5")
    b = netdsl.compile_to_module("specs/lenet.net", "LeNet5", disable=["grid_merge"])
    c = netdsl.compile_to_module("specs/lenet.net", "LeNet5", disable=("grid_merge",))
    assert a is not b and b is c
    assert re.search(r"disable=\('grid_merge',\)", open(b.__file__).read())
