"""A forked tensor's gradient (a residual block's input, inception branches):
a consumer conv adds a sibling consumer's gradient in its dgrad epilogue,
so ForkFn launches no sum.  Structure (ResNet-50's planned step), a no-change
case (a consumer that cannot add: max pooling), and numbers against torch,
including a partial backward whose offered gradients must not leak into the
next pass."""
import pytest
import torch

import netdsl
from netdsl import runtime as rt
from launches import parts
from twin import grad_compare, saved_bytes, twins

BLOCK = ("net R input(4, 8, 8) {{\n"
         "  conv(8, 3, padding=1) -> bn -> relu\n"
         "  residual {{ conv(8, 3, padding=1) -> bn -> relu -> conv(8, 3, padding=1) -> bn }} -> relu\n"
         "  residual {{ conv(8, 3, padding=1) -> bn -> relu -> conv(8, 3, padding=1) -> bn }} -> relu\n"
         "  {tail}\n"
         "}}\n")


ADD, COPY = 1, 3  # the elementwise kernel's OP codes


def _elementwise(launches, op):
    """The (args, meta) of the planned elementwise launches with that OP."""
    return [(args, meta) for k, args, meta in launches if k.fn.__name__ == "elementwise" and meta["OP"] == op]


def _planned_step(m, x):
    m.train()
    with rt.plan_launches() as launches:
        y = m(x)
        n = len(launches)
        y.backward(torch.empty_like(y))
    return launches[:n], parts(launches[n:])


def test_resnet50_step_sums_no_forked_gradients_apart():
    m = netdsl.build("specs/resnet.net", "ResNet50")
    _, backward = _planned_step(m, torch.randn(2, 3, 64, 64))
    adds = _elementwise(backward, ADD)
    summed = [k.fn.__name__ for k, _, meta in backward if meta.get("HAS_RES")]
    # 16 bottlenecks: the block input's two gradients meet in the dgrad of conv1 or of the downsample conv
    assert adds == [] and len(summed) == 16 and all(n.startswith("conv_dgrad") for n in summed), summed
    # 44 wgrads (and fc's: it sums the bias too; 9 more ride in 1×1 convs' dgrads, WGRAD_ADD), 52 dgrads, 5 BN
    # reductions (47 more finished by dgrads' last programs, and the stem's by the max pool's backward), 2 pools:
    # no BN apply
    assert len(backward) == 105 and not any(k.fn.__name__ == "channel_grad_apply" for k, _, _ in backward)
    # launched: each conv's dgrad and wgrad as one (see launches.parts)
    assert len({id(args) for _, args, _ in backward}) == 114 - 53


def test_a_consumer_that_cannot_add_leaves_the_sum_to_the_fork(tmp_path):
    """(The other order is ResNet's and GoogLeNet's: the pool offers, the conv's dgrad adds.)"""
    p = tmp_path / "g.net"
    p.write_text("net G input(4, 8, 8) {\n"
                 "  conv(6, 1) -> relu\n"
                 # the conv's backward runs first (autograd runs later nodes first) and offers its gradient;
                 # the pool's cannot add it, so the fork does
                 "  concat { maxpool(3, stride=1, padding=1) ; conv(4, 1) -> relu }\n"
                 "}\n")
    tri, ref = twins(str(p), "G")
    _, backward = _planned_step(tri, torch.randn(2, 4, 8, 8))
    adds = _elementwise(backward, ADD)
    assert len(adds) == 1 and not any(meta.get("HAS_RES") for _, _, meta in backward)
    grad_compare(tri, ref, torch.randn(3, 4, 8, 8))


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_forked_gradients_match_torch(tmp_path, act):
    p = tmp_path / "r.net"
    p.write_text(BLOCK.format(tail="conv(3, 1)").replace("} -> relu", f"}} -> {act}"))
    tri, ref = twins(str(p), "R")
    _, backward = _planned_step(tri, torch.randn(2, 4, 8, 8))
    assert sum(bool(meta.get("HAS_RES")) for _, _, meta in backward) == 2
    # the stem's and the first block's outputs each feed a block, whose conv1 dgrad runs last: it takes act'
    # (relu's, and the block's act) and the producer's BN's sums, so that BN needs no reduction pass; the
    # second block's last BN, before a plain conv, does
    masked = [meta["OUT_MASK"] for _, _, meta in backward if meta.get("OUT_MASK")]
    assert masked == [1 if act == "relu" else 4, 1], masked
    reductions = [meta for k, _, meta in backward if k.fn.__name__ == "channel_grad" and meta["NORM"]]
    assert sum(not meta["PARTIALS"] for meta in reductions) == 1
    grad_compare(tri, ref, torch.randn(3, 4, 8, 8))


def test_a_partial_backward_does_not_leak_into_the_next(tmp_path):
    """autograd.grad for the first conv's weight of a residual block runs the
    residual add's backward (which offers its gradient to the fork) and that
    conv's (which takes it), but never the fork's; the next full backward
    must start afresh, not see the shortcut's gradient as taken already."""
    p = tmp_path / "r.net"
    p.write_text(BLOCK.format(tail="conv(3, 1)"))
    tri, ref = twins(str(p), "R")
    x = torch.randn(3, 4, 8, 8)
    grads = {}
    for name, m in (("tri", tri), ("ref", ref)):
        m.train()
        m.load_state_dict(ref.state_dict())
        out = m(x)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        loss = (out * w).sum()
        branch = dict(m.named_parameters())["3.weight"]  # the first block's first conv (layers are numbered)
        partial, = torch.autograd.grad(loss, [branch], retain_graph=True)
        m.zero_grad()
        loss.backward()
        grads[name] = (partial, {n: q.grad.clone() for n, q in m.named_parameters()})
    assert torch.allclose(grads["tri"][0], grads["ref"][0], rtol=1e-3, atol=1e-4)
    # (a conv bias before a train-mode BN has a gradient of zero in theory: noise, judged against the largest)
    floor = 1e-5 * max(g.abs().max().item() for g in grads["ref"][1].values())
    for n, g in grads["ref"][1].items():
        assert torch.allclose(grads["tri"][1][n], g, rtol=1e-3, atol=floor), n


DENSE = ("block DL(growth) {\n"
         "    norm1: bn -> relu1: relu -> conv1: conv(8, 1, bias=false)\n"
         "    norm2: bn -> relu2: relu -> conv2: conv(growth, 3, padding=1, bias=false)\n"
         "}\n"
         "net Dn input(3, 8, 8) {\n"
         "    conv0: conv(6, 3, padding=1) -> norm0: bn -> relu0: relu\n"
         "    block1: dense { for j in range(4) { layer{j + 1}: DL(3) } }\n"
         "    norm5: bn -> relu: relu -> conv(4, 1)\n"
         "}\n")


def test_densenet_step_sums_no_features_apart():
    """Each dense layer's input is the concatenation of the block's features;
    its BN backward adds, in its apply kernel, the next layer's input gradient
    over the same channels, which holds every later layer's share."""
    m = netdsl.build("specs/densenet.net", "DenseNet121")
    _, backward = _planned_step(m, torch.randn(2, 3, 64, 64))
    adds = _elementwise(backward, ADD)
    summed = [k.fn.__name__ for k, _, meta in backward if meta.get("HAS_RES")]
    assert adds == [] and summed == ["channel_grad_apply"] * 58  # one per dense layer


def test_dense_block_gradients_match_torch(tmp_path):
    p = tmp_path / "d.net"
    p.write_text(DENSE)
    tri, ref = twins(str(p), "Dn")
    _, backward = _planned_step(tri, torch.randn(2, 3, 8, 8))
    assert sum(bool(meta.get("HAS_RES")) for _, _, meta in backward) == 4
    grad_compare(tri, ref, torch.randn(3, 3, 8, 8))


@pytest.mark.slow
def test_the_summing_kernels_compile_for_sm90_and_sm80_without_spills(tmp_path, monkeypatch):
    """The interpreter accepts what ptxas may not: the dgrad and apply
    variants that add a sibling's gradient (and the deferred BN backward's
    prologue and epilogue, a block output's act' in the dgrad (from its sign
    bits, and the apply kernel that stores them), a shortcut's BN
    in the apply, a dense block's cached statistics, the convs' and dgrads'
    grid-wide merges and the launches that stand in for them in a module
    compiled without grid_merge) compile for real GPUs, without spills."""
    from netdsl import aot

    p = tmp_path / "f.net"
    p.write_text(BLOCK.format(tail="residual { conv(6, 3, stride=2, padding=1) -> bn } "
                                   "shortcut { conv(6, 1, stride=2) -> bn } -> relu") + DENSE)
    names = ("HAS_RES", "IN_BNG", "OUT_BNG", "G_BNG", "OUT_MASK", "MASK_BITS", "BITS", "RES_BN", "CACHED", "MERGE",
             "PARTIALS")
    variants = {}
    for merge in ("1", "0"):
        for net, shape in (("R", (16, 4, 8, 8)), ("Dn", (16, 3, 8, 8))):
            m = netdsl.build(str(p), net, disable=() if merge == "1" else ("grid_merge",))
            for kernel, sig, meta in aot.signatures(m, torch.randn(*shape), train=True, backward=True):
                if any(m.get(f) for _, _, m in parts([(kernel, sig, meta)]) for f in names):
                    key = (kernel.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(meta.items())))
                    variants[key] = (kernel, sig, meta)
    variants = list(variants.values())
    views = parts(variants)  # (a conv's backward launch as its dgrad and wgrad parts)
    assert {f for _, _, meta in views for f in names if meta.get(f)} == set(names)
    assert {k.fn.__name__.split("__")[0] for k, _, meta in views if meta.get("MERGE")} == \
        {"conv_bn_relu", "conv_bn", "conv_bn_add_relu", "conv_dgrad"}
    assert {k.fn.__name__ for k, _, meta in views if meta.get("PARTIALS")} == {"bn_stats", "channel_grad"}
    assert {k.fn.__name__.split("__")[0] for k, _, meta in views if meta.get("HAS_RES")} >= \
        {"conv_dgrad", "channel_grad_apply"}
    for kernel, sig, meta in variants:
        for arch in (90, 80):
            info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
            assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (kernel.fn.__name__, arch, info)


def test_a_dense_block_copies_each_feature_once_into_one_buffer(tmp_path):
    """The autograd forward's concatenations share one buffer per block: each
    layer's last conv stores its feature in the buffer's channels, so only
    the 4 block inputs are copied (not the ~600 copies of concatenating
    afresh), and backward keeps that one buffer, not one concatenation per
    layer.  An inception's branches store into their concatenation alike."""
    m = netdsl.build("specs/densenet.net", "DenseNet121")
    forward, _ = _planned_step(m, torch.randn(2, 3, 64, 64))
    copies = _elementwise(forward, COPY)
    assert len(copies) == 4
    g = netdsl.build("specs/googlenet.net", "GoogLeNet")
    forward, _ = _planned_step(g, torch.randn(2, 3, 64, 64))
    assert _elementwise(forward, COPY) == []
    p = tmp_path / "d8.net"
    p.write_text(DENSE.split("net Dn")[0] + "net Dn input(8, 8, 8) {\n"
                 "    block1: dense { for j in range(8) { layer{j + 1}: DL(4) } }\n    conv(4, 1)\n}\n")
    tri, ref = twins(str(p), "Dn")
    x = torch.randn(4, 8, 8, 8)
    saved = {name: saved_bytes(m.train(), x) for name, m in (("tri", tri), ("ref", ref))}
    # torch keeps every layer's concatenation (8 of them, growing); netdsl one 40-channel buffer
    assert 3 * saved["tri"] < saved["ref"], saved
    grad_compare(tri, ref, x)


def test_concat_branches_store_in_place_except_where_a_pool_ends_one(tmp_path):
    """Structure: the conv-ended branches store into the concatenation's
    channels, the pool-ended one is copied (no change there); numbers against
    torch, train and eval."""
    p = tmp_path / "c.net"
    p.write_text("net C input(4, 8, 8) {\n"
                 "  conv(6, 1) -> bn -> relu\n"
                 "  concat { conv(4, 1) -> bn -> relu ; maxpool(3, stride=1, padding=1) ; conv(3, 3, padding=1) }\n"
                 "  conv(5, 1) -> bn\n"
                 "}\n")
    tri, ref = twins(str(p), "C")
    forward, _ = _planned_step(tri, torch.randn(2, 4, 8, 8))
    copies = _elementwise(forward, COPY)
    assert len(copies) == 1 and copies[0][0][0][1][1] == 6  # the pool's 6 channels (the source's shape)
    grad_compare(tri, ref, torch.randn(3, 4, 8, 8))


def test_dense_layers_share_their_inputs_batch_statistics(tmp_path):
    """Every dense layer's first BN normalises the block buffer's leading
    channels, whose batch statistics do not change from layer to layer: each
    BN reduces only the channels no earlier one did (one feature), and takes
    the rest from the block's cache.  Outputs and running statistics against
    torch after a training forward."""
    from twin import rel_err

    p = tmp_path / "d.net"
    p.write_text(DENSE)
    tri, ref = twins(str(p), "Dn")
    forward, _ = _planned_step(tri, torch.randn(2, 3, 8, 8))
    stats = [(args[0][1][1], meta["CACHED"]) for k, args, meta in forward if k.fn.__name__ == "bn_stats"
             and not meta["PARTIALS"]]
    # the block input's 6 channels, then each layer's 3-channel feature; norm5 reads only the last feature
    assert stats == [(6, True), (3, True), (3, True), (3, True), (3, True)], stats
    x = torch.randn(4, 3, 8, 8)
    tri.train(), ref.train()
    ya, yb = tri(x), ref(x)
    assert rel_err(ya, yb) < 1e-4
    for (name, a), (_, b) in zip(tri.state_dict().items(), ref.state_dict().items()):
        assert rel_err(a.double(), b.double()) < 1e-5, name


@pytest.mark.slow  # (half a minute each in the interpreter)
@pytest.mark.parametrize("merge", ["1", "0"])
def test_grid_merges_with_gpu_sized_tiles(tmp_path, monkeypatch, merge):
    """The BN sums a conv's forward and a dgrad's epilogue leave per tile are
    finished by the kernel's last program of each channel block (the default)
    or, compiled without grid_merge, by bn_stats / channel_grad launches: the
    same gradients as torch either way.  GPU-sized 16×16 tiles: 23
    tiles of 16 pixels, the last one partial, merged 16 at a time (the last
    block partial)."""
    from netdsl.kernels import conv as kconv

    monkeypatch.setattr(kconv, "conv_blocks", lambda M, cout, cin, on_gpu: (16, 16, 16))
    p = tmp_path / "r.net"
    p.write_text(BLOCK.format(tail="conv(3, 1)").replace("input(4, 8, 8)", "input(4, 11, 11)"))
    tri, ref = twins(str(p), "R", disable=() if merge == "1" else ("grid_merge",))
    x = torch.randn(3, 4, 11, 11)
    forward, backward = _planned_step(tri, x)
    merged = [k.fn.__name__.split("__")[0] for k, _, meta in forward + backward if meta.get("MERGE")]
    # 5 conv+BN forwards; 4 dgrads take a BN's sums (2 deferred, 2 block outputs)
    on = merge == "1"
    assert merged == (["conv_bn_relu"] * 5 + ["conv_dgrad"] * 4 if on else [])
    assert sum(k.fn.__name__ == "bn_stats" for k, _, _ in forward) == (0 if on else 5)
    assert sum(bool(meta.get("PARTIALS")) for k, _, meta in backward if k.fn.__name__ == "channel_grad") \
        == (0 if on else 4)
    grad_compare(tri, ref, x, modes=("train",))  # (eval mode, whose dgrads merge too: the tests above)


def test_split_reductions_with_gpu_sized_tiles(tmp_path, monkeypatch):
    """A BN's statistics where no conv's epilogue left them (a dense block's
    buffer, with its cache), and a BN backward's sums where no dgrad's did,
    split the pixels into tiles, one program each, and the last program of
    each channel block merges: tiles of 16 pixels × 16 channels here, as a
    GPU's are 64 × 64 (or 32).  Growth 5 puts the cache's boundary past the
    first block of channels (16 of 21 known: one block from the cache alone,
    one straddling).  Outputs, running statistics and gradients against torch."""
    from twin import rel_err

    from netdsl.kernels import norm as knorm

    monkeypatch.setattr(knorm, "_split_tiles", lambda rt, x4, C, bc_max: (16, 16))
    p = tmp_path / "d.net"
    p.write_text(DENSE.replace("DL(3)", "DL(5)"))
    tri, ref = twins(str(p), "Dn")
    x = torch.randn(5, 3, 8, 8)  # 320 pixels: 20 tiles, merged 16 at a time, then the 2 groups' rows
    forward, backward = _planned_step(tri, x)
    stats = [(args[-9], args[-8]) for k, args, meta in forward if k.fn.__name__ == "bn_stats" and not meta["PARTIALS"]]
    # (KNOWN, grid_m): the block input's 6 channels, then each layer's 5-channel feature, then norm5's
    assert stats == [(0, 20), (6, 20), (11, 20), (16, 20), (21, 20)], stats
    sums = [meta for k, _, meta in backward if k.fn.__name__ == "channel_grad" and not meta["PARTIALS"]]
    assert sums, [k.fn.__name__ for k, _, _ in backward]
    with rt.kernel_log() as log:
        tri.train(), ref.train()
        ya, yb = tri(x), ref(x)
    grids = [grid for name, grid in log if name == "bn_stats"]
    # 20 tiles a fresh column; with 16 or more channels known, first one program per block of cached channels
    assert grids == [(20,), (20,), (20,), (20 + 1,), (20 + 1,)], grids
    assert rel_err(ya, yb) < 1e-4
    for (name, a), (_, b) in zip(tri.state_dict().items(), ref.state_dict().items()):
        assert rel_err(a.double(), b.double()) < 1e-5, name
    with rt.kernel_log() as log:
        grad_compare(tri, ref, x, modes=("train",))
    # the BN backward's own passes: 20 tiles of pixels × the channel blocks
    assert {grid[0] for name, grid in log if name == "channel_grad"} >= {20}


@pytest.mark.parametrize("act,channels,bits", [("relu", 8, True), ("leaky_relu(0.2)", 16, True), ("relu", 6, False),
                                               ("sigmoid", 8, False)])
def test_a_block_outputs_activation_mask_is_kept_as_bits(tmp_path, act, channels, bits):
    """A residual block's output y = act(BN(raw) + shortcut) is stored for its
    consumers, and the dgrad that takes act' from it needs only y > 0 (relu,
    leaky relu): the apply kernel also stores that, a bit a channel (1/32 of
    y's fp32 bytes), and the dgrad reads the bits instead of y.  With channels
    no multiple of 8, or an activation that needs y itself: y, as before."""
    p = tmp_path / "r.net"
    p.write_text(BLOCK.replace("(8,", f"({channels},").replace("} -> relu", f"}} -> {act}").format(tail="conv(3, 1)"))
    tri, ref = twins(str(p), "R")
    x = torch.randn(2, 4, 8, 8)
    forward, backward = _planned_step(tri, x)
    applies = [(args, meta) for k, args, meta in forward if k.fn.__name__ == "channel_affine"]
    assert [bool(meta["BITS"]) for _, meta in applies] == [False, bits, bits]  # (the stem's is no block output)
    if bits:  # the bits buffer: one byte per 8 channels of each pixel
        assert [a[9].shape for a, meta in applies if meta["BITS"]] == [(2 * 8 * 8, channels // 8)] * 2
    masked = [meta for _, _, meta in backward if meta.get("OUT_MASK")]
    assert [bool(meta["MASK_BITS"]) for meta in masked] == [bits, False]  # (block 1's output; the stem's)
    grad_compare(tri, ref, torch.randn(3, 4, 8, 8))
