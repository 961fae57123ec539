"""A GPU runs a grid's programs in any order; Triton's interpreter always
runs them in one.  Under `rt.shuffled_grid(seed)` the interpreter runs them
in a seeded random order, and every kernel whose programs meet through
counters and atomic adds must give the same result in each order: BN
statistics merged by the conv's last programs (grid-wide merges), pools and
dgrads finishing BN backward sums, split-K weight gradients, weight
gradients added into by a dgrad's programs (WGRAD_ADD) and a downsample
BN's sums taken in conv3's dgrad (RES_SUMS)."""
import copy

import pytest
import torch
import triton
import triton.language as tl

from netdsl import runtime as rt
from netdsl.kernels import conv as kconv
from test_deferred_bn import BOTTLENECKS, POOLED
from twin import grad_compare, rel_err, twins


@triton.jit
def _arrival(order_ptr, count_ptr):
    # each program takes the next arrival number and records its own linear id there
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    slot = tl.atomic_add(count_ptr, 1)
    tl.store(order_ptr + slot, pid)


def _order(grid):
    order = torch.full((grid[0] * grid[1],), -1, dtype=torch.int32)
    rt.launch(_arrival, grid, order, torch.zeros(1, dtype=torch.int32))
    return order.tolist()


def test_shuffled_grid_runs_every_program_once_in_a_seeded_order():
    grid = (5, 3)
    natural = _order(grid)
    assert natural == list(range(15))
    orders = []
    for seed in (1, 2, 1):
        with rt.shuffled_grid(seed):
            orders.append(_order(grid))
    assert all(sorted(o) == natural for o in orders)  # every program once
    assert orders[0] != natural and orders[0] != orders[1]
    assert orders[0] == orders[2]  # seeded: the same order again
    assert _order(grid) == natural  # and the interpreter's own order after the block


def _step(module, x, w):
    """Output, every gradient and the running statistics of one training step."""
    module.train()
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = module(x)
    (y * w).sum().backward()
    out = {"output": y.detach(), "input": x.grad}
    out.update({n: p.grad for n, p in module.named_parameters()})
    out.update({n: b.clone() for n, b in module.named_buffers()})
    return out


def _launched_flags(module, x):
    module.train()
    with rt.plan_launches() as launches:
        y = module(x)
        y.backward(torch.empty_like(y))
    return {f for _, _, meta in launches for f, v in meta.items() if v is True}


@pytest.mark.parametrize("spec, net, shape", [pytest.param(BOTTLENECKS, "N", (3, 16, 8, 8), marks=pytest.mark.slow),
                                              (POOLED, "P", (4, 3, 12, 12))], ids=["bottlenecks", "pools"])
def test_a_training_step_is_the_same_in_three_grid_orders(tmp_path, monkeypatch, spec, net, shape):
    """One training step in the interpreter's order and in three shuffled
    orders: the same outputs, gradients and running statistics (to rounding:
    merges and atomic adds sum in arrival order), and close to torch's."""
    # split-K weight gradients wherever the pixels allow 4 chunks, so their partial sums meet too
    monkeypatch.setattr(kconv, "wgrad_split", lambda rt, x, tiles, M, BK: 4)
    path = tmp_path / "n.net"
    path.write_text(spec)
    tri, ref = twins(str(path), net)
    x = torch.randn(*shape)
    flags = _launched_flags(copy.deepcopy(tri), x)
    assert "MERGE" in flags  # grid-wide merges: BN statistics and BN backward sums
    assert any(f.endswith("SPLIT_K") for f in flags), sorted(flags)
    if net == "N":
        assert {"d_WGRAD_ADD", "d_RES_SUMS"} <= flags, sorted(flags)
    with torch.no_grad():
        w = torch.randn(ref.eval()(x).shape)
    state = copy.deepcopy(tri.state_dict())
    natural = _step(tri, x, w)
    for seed in (11, 12, 13):
        tri.load_state_dict(state)
        with rt.shuffled_grid(seed):
            got = _step(tri, x, w)
        for k, v in natural.items():
            if v is None:
                assert got[k] is None, k
            elif v.is_floating_point():
                assert rel_err(got[k], v) < 1e-5, (seed, k, rel_err(got[k], v))
            else:
                assert torch.equal(got[k], v), (seed, k)
    # and the shuffled step against torch: gradients within grad_compare's rule
    tri.load_state_dict(state)
    with rt.shuffled_grid(14):
        grad_compare(tri, ref, x, modes=("train",))
