"""sync_bn: two CPU processes (gloo) each run a share of a batch, of unequal
sizes, through a module built with sync_bn=True in train mode, and get what
one process gets on the whole batch: outputs, input gradients, running
statistics, and parameter gradients that add up to its."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import netdsl
from twin import randomize

# a stem whose BN + relu the max pool applies, a BN deferred into a conv, a
# block output the next block's first 1×1 conv makes, a downsample BN added
# in the block's apply, a conv bias before a BN, and a BatchNorm1d
SPEC = """
block Block(out, down) {
    residual {
        conv(4, 1, bias=false) -> bn -> relu
        conv(4, 3, padding=1, bias=false) -> bn -> relu
        conv(out, 1, bias=false) -> bn
    } shortcut proj: if down { conv(out, 1, bias=false) -> bn }
    relu
}

net Sync input(3, 8, 8) {
    conv(6, 3, padding=1, bias=false) -> bn -> relu
    maxpool(2)
    conv(6, 3, padding=1) -> bn -> relu
    Block(8, true)
    Block(8, false)
    global_avgpool -> flatten
    linear(6) -> bn -> relu
    linear(4)
}
"""
SPLIT = (3, 5)  # each process's share of the batch


def _inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(sum(SPLIT), 3, 8, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(sum(SPLIT), 4, generator=g, dtype=torch.float64)  # the loss: a random weighting
    return x, weight


def _step(model, x, weight):
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * weight).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return y.detach(), x.grad, grads, {k: v.clone() for k, v in model.state_dict().items()}


def _worker(rank, world, port, path, init, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, weight = _inputs()
        lo = sum(SPLIT[:rank])
        part = slice(lo, lo + SPLIT[rank])
        results = {}
        for sync in (True, False):
            model = netdsl.build(path, "Sync", sync_bn=sync)
            model.load_state_dict(init)
            model.double().train()
            results[sync] = _step(model, x[part], weight[part])
        torch.save(results, out.format(rank))
        torch.distributed.barrier()  # (both ranks done before either tears gloo down)
    finally:
        torch.distributed.destroy_process_group()


def _runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sync_bn")
    path = tmp / "sync.net"
    path.write_text(SPEC)
    ref = netdsl.build(str(path), "Sync", target="torch")
    randomize(ref, seed=2)
    init = ref.state_dict()
    single = netdsl.build(str(path), "Sync")  # also compiles the module once, before the workers import it
    single.load_state_dict(init)
    single.double().train()
    x, weight = _inputs()
    one = _step(single, x, weight)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp / "rank{}.pt")
    mp.spawn(_worker, args=(2, port, str(path), init, out), nprocs=2, join=True)
    return one, [torch.load(out.format(r), weights_only=True) for r in range(2)]


def _close(a, b, tol=1e-9):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() < tol


def test_two_synchronised_processes_equal_one_on_the_whole_batch(tmp_path_factory):
    (y, dx, grads, state), ranks = _runs(tmp_path_factory)
    synced = [r[True] for r in ranks]
    assert _close(torch.cat([r[0] for r in synced]), y)
    assert _close(torch.cat([r[1] for r in synced]), dx)
    for k, g in grads.items():  # each process's gradient is its share's, as nn.SyncBatchNorm's: they add up
        a, b = synced[0][2][k], synced[1][2][k]
        # (relative to the shares: the conv bias before a batch norm has a gradient of 0 in theory, not the shares)
        scale = max(g.abs().max(), a.abs().max())
        assert ((a + b - g).abs().max() / scale).item() < 1e-9, k
    for k, v in state.items():  # the running statistics and batches tracked, on both processes
        for r in synced:
            assert _close(r[3][k].double(), v.double()), k

    # without sync_bn, each process normalises its own share
    plain = [r[False] for r in ranks]
    assert not _close(torch.cat([r[0] for r in plain]), y, 1e-3)
    assert not _close(plain[0][3]["1.running_mean"], state["1.running_mean"], 1e-3)


@pytest.mark.slow
def test_the_synchronised_kernels_compile_for_sm90_and_sm80(tmp_path, monkeypatch):
    """What a synchronised step launches besides the rest (this process's
    statistics kept, the finishes from the all-gathered and all-reduced
    sums) compiles without spills.  (One process stands for the group: the
    launches are planned, so no collective runs.)"""
    from netdsl import aot
    from netdsl import launch

    path = tmp_path / "sync.net"
    path.write_text(SPEC)
    model = netdsl.build(str(path), "Sync", sync_bn=True).train()
    monkeypatch.setattr(launch, "synced", lambda bn: "group" if isinstance(bn, torch.nn.SyncBatchNorm) else None)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    launches = aot.signatures(model, torch.randn(4, 3, 8, 8), train=True, backward=True)
    synced = [(k, sig, meta) for k, sig, meta in launches if meta.get("SYNC") or "sync_finish" in k.fn.__name__]
    assert {k.fn.__name__ for k, _, _ in synced} == {"bn_stats", "channel_grad", "bn_sync_finish",
                                                     "bn_grad_sync_finish"}
    for kernel, sig, meta in synced:
        for arch in (90, 80):
            info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
            assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (kernel.fn.__name__, arch, info)
