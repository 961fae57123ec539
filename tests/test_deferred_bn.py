"""The fusion of a train-mode conv→BN→act into its consumer conv's loads
(autograd forward): which layers defer, that nothing else does, and that
the deferred activation is neither written nor kept for backward.  Numeric
checks against torch: the "Deferred", "Residual" and "Depthwise" configs of
test_kernels.py, through test_grad.py (gradcheck in float64, fp32 twin)."""
import re

import pytest
import torch

import netdsl
from netdsl import runtime as rt
from launches import parts
from twin import compare, grad_compare, saved_bytes, twins


def _autograd_source(m):
    import inspect

    return inspect.getsource(type(m).forward_autograd), inspect.getsource(type(m).forward)


def test_resnet50_defers_two_batch_norms_per_bottleneck_and_the_downsample_bns():
    m = netdsl.build("specs/resnet.net", "ResNet50")
    train_src, infer_src = _autograd_source(m)
    deferred = re.findall(r"self\.layer\('([\w.]+)'\), t\d+, bn=self\.layer\('[\w.]+'\), defer=True", train_src)
    assert len(deferred) == 36, deferred
    # ... and the stem's BN + ReLU, into the max pool that follows it
    assert "conv1'), x, bn=self.layer('bn1'), defer=True" in train_src
    assert sum(bool(re.fullmatch(r"layer\d\.\d+\.conv[12]", d)) for d in deferred) == 32
    # each downsample's BN rides in its block's last apply, which adds the shortcut
    assert [d for d in deferred if "downsample" in d] == [f"layer{i}.0.downsample.0" for i in range(1, 5)]
    assert "defer" not in infer_src
    m.train()
    with rt.plan_launches() as launches:  # one training step, planned: no kernel runs
        y = m(torch.randn(2, 3, 64, 64))
        y.backward(torch.empty_like(y))
    # each conv's (and fc's) backward is one launch: 54, the stem's without a dgrad part (see parts())
    assert sum(k.fn.__name__.startswith("conv_backward") for k, _, _ in launches) == 54
    launches = parts(launches)
    names = [k.fn.__name__ for k, _, _ in launches]
    # 53 conv+BN layers, 37 deferred (36 into a conv, the stem's into the max pool), 16 block outputs: 15 made
    # by the next block's conv1 as it loads (which runs before a downsample shortcut reads the output; 4 of
    # them normalise their residual, a downsample's, as they load it), and 1 apply kernel (the pool follows);
    # every BN takes its statistics from its conv's epilogue, merged by the conv's last programs: no bn_stats
    assert names.count("channel_affine") == 1 and names.count("bn_stats") == 0
    assert "leave=True" in train_src and train_src.count("leave=True") == 15
    made = [meta for k, _, meta in launches if meta.get("IN_RES")]
    assert len(made) == 15 and all(meta["IN_ACT"] == 1 for meta in made)  # (the block's relu)
    assert sum(bool(meta["IN_RES_BN"]) for meta in made) == 4 and all(meta["IN_BITS"] for meta in made)
    assert [bool(meta["IN_BN"]) for k, _, meta in launches if k.fn.__name__.startswith("maxpool")] == [True]
    assert sum(bool(meta.get("RES_BN")) for k, _, meta in launches if k.fn.__name__ == "channel_affine") == 0
    assert sum(bool(meta.get("STATS")) for _, _, meta in launches) == 53
    assert sum(bool(meta.get("MERGE")) for k, _, meta in launches if k.fn.__name__.startswith("conv_bn")) == 53
    assert sum(bool(meta.get("IN_BN")) for k, _, meta in launches if k.fn.__name__.startswith("conv_bn")) == 32 + 15
    # 9 weight gradients ride in their 1×1 convs' dgrads (WGRAD_ADD, kernels/conv.py's wgrad_rides): layer1's 3
    # conv3s, its stride-1 downsample and its first conv1 (the max pool's output), and layer2's 4 conv3s; each
    # conv3's dgrad applies its deferred input BN (bn2's) to the input tile it adds from, as the wgrad would
    rides = [(tuple(args[1].shape[:2]), bool(meta["WX_BN"])) for k, args, meta in launches if meta.get("WGRAD_ADD")]
    assert rides == [((512, 128), True)] * 4 + [((256, 64), True)] * 3 + [((256, 64), False), ((64, 64), False)]
    assert sum(bool(meta.get("IN_BN")) for k, _, meta in launches if k.fn.__name__.startswith("conv_wgrad")) == 25
    # backward: each deferred BN's sums come from its consumer's dgrad epilogue (channel_grad merges them),
    # and its apply rides in its producer's dgrad and wgrad.  So do 15 bn3s' (the block's output feeds the next
    # block; the next block's conv1 or downsample dgrad runs last, adds the shortcut's gradient and takes relu'
    # from the stored output).  The stem's BN takes its sums from the max pool's backward epilogue, as a
    # consumer conv's dgrad would.  The last bn3 takes its sums from a reduction pass that writes
    # g = dy·relu'; a downsample BN's from one over its block's g.
    # No BN applies at all (the stem conv's input needs no gradient: 52 dgrads, 53 weight gradients, 9 of them
    # in the dgrads)
    flagged = {f: [k.fn.__name__ for k, _, meta in launches if meta.get(f)]
               for f in ("OUT_BNG", "IN_BNG", "G_BNG", "OUT_MASK")}
    assert len(flagged["OUT_BNG"]) == 48 and len(flagged["IN_BNG"]) == 52 and len(flagged["G_BNG"]) == 53 - 9, flagged
    assert len(flagged["OUT_MASK"]) == 15 and set(flagged["OUT_MASK"]) <= set(flagged["OUT_BNG"])
    # ... reading only the sign bits of that output, which the conv1 that made it stored beside it (and the
    # last block's apply kernel beside its own)
    assert sum(bool(meta.get("MASK_BITS")) for _, _, meta in launches) == 15
    assert sum(bool(meta.get("IN_BITS")) for _, _, meta in launches) == 15
    assert sum(bool(meta.get("BITS")) for k, _, meta in launches if k.fn.__name__ == "channel_affine") == 1
    assert [n for n in flagged["OUT_BNG"] if not n.startswith("conv_dgrad")] == ["pool_backward__maxpool"]
    assert all(n.startswith("conv_dgrad") for n in flagged["IN_BNG"])
    assert all(n.startswith("conv_wgrad") for n in flagged["G_BNG"])
    # every dgrad (and the pool's backward) that takes a BN's sums also finishes that BN's backward in its last
    # programs (MERGE): the 5 BNs whose sums need a pass of their own are the only channel_grad launches left.
    # The 4 downsample BNs' sums come from their blocks' conv3 dgrads too, per tile (RES_SUMS: the gradient it
    # loads is that BN's output gradient as well), so their channel_grads only merge partials (PARTIALS)
    merged = [k.fn.__name__ for k, _, meta in launches
              if meta.get("MERGE") and k.fn.__name__.startswith(("conv_dgrad", "pool_backward"))]
    assert merged == flagged["OUT_BNG"]
    grads = [meta for k, _, meta in launches if k.fn.__name__ == "channel_grad" and meta["NORM"]]  # (not fc's bias)
    assert len(grads) == 5 and sum(bool(meta.get("PARTIALS")) for meta in grads) == 4
    assert sum(bool(meta.get("RES_SUMS")) for _, _, meta in launches) == 4
    assert not any(meta.get("STORE_G") for meta in grads if meta["PARTIALS"])
    assert sum(bool(meta.get("STORE_G")) for meta in grads) == 1
    assert names.count("channel_grad_apply") == 0


def test_no_deferral_where_the_activation_has_other_consumers(tmp_path):
    p = tmp_path / "n.net"
    p.write_text(
        "net N input(3, 8, 8) {\n"
        "  conv(4, 3, padding=1) -> relu -> bn -> relu -> maxpool(2)\n"       # a pool after a BN no conv made
        "  residual { conv(4, 3, padding=1) -> bn -> relu } -> conv(4, 1)\n"  # inside a residual: the add reads it
        "  concat { conv(2, 1) -> bn -> relu ; conv(2, 1) }\n"                # a concat branch's end
        "  conv(3, 1) -> relu -> conv(3, 1)\n"                                # no BN: nothing to defer
        "}\n")
    m = netdsl.build(str(p), "N")
    train_src, _ = _autograd_source(m)
    assert "defer" not in train_src and "rt.conv(" in train_src


def test_deferred_activation_is_not_kept_for_backward(tmp_path):
    """Saved-tensor hooks: the deferred chain keeps the conv outputs only;
    each activation between two convs is neither stored nor saved."""
    p = tmp_path / "c.net"
    p.write_text("net C input(8, 16, 16) { conv(16, 3, padding=1) -> bn -> relu -> conv(16, 3, padding=1) -> bn -> relu "
                 "-> conv(16, 3, padding=1) -> bn -> relu }\n")
    tri, ref = twins(str(p), "C")
    x = torch.randn(4, 8, 16, 16)
    sizes = {name: saved_bytes(m.train(), x) for name, m in (("tri", tri), ("ref", ref))}
    act = 4 * 16 * 16 * 16 * 4  # one activation, fp32
    # torch keeps the three conv outputs, two BN outputs (ReLU's mask, and conv inputs) and the last ReLU's;
    # netdsl keeps three conv outputs and the last layer's output
    assert sizes["tri"] <= sizes["ref"] - 2 * act, sizes
    grad_compare(tri, ref, x)


@pytest.mark.parametrize("file,net,count,pools", [
    ("resnet.net", "ResNet18", 12, 1),        # conv1 of each basic block, the 3 downsamples' BN (into the add), the stem
    ("vgg.net", "VGG16_BN", 13, 5),           # every conv: 8 into a conv, 5 into a max pool
    ("googlenet.net", "GoogLeNet", 21, 2),    # conv2→conv3, the 3×3 and 5×5 branches' reductions, conv1 and conv3
    ("densenet.net", "DenseNet121", 120, 1),  # norm1 and norm2 of 58 dense layers, each transition's norm, the stem
])
def test_zoo_deferrals(file, net, count, pools):
    m = netdsl.build(f"specs/{file}", net)
    train_src, infer_src = _autograd_source(m)
    assert train_src.count("defer=True") == count and "defer" not in infer_src
    lines = train_src.splitlines()
    assert sum("rt.pool(" in line and "defer=True" in lines[i - 1] for i, line in enumerate(lines)) == pools


def test_deferred_outputs_are_freed_without_the_garbage_collector(tmp_path):
    """No reference cycle through the autograd graph: once the loss is gone,
    the deferred conv output is freed by reference counting alone."""
    import gc
    import weakref

    p = tmp_path / "f.net"
    p.write_text("net Chain input(3, 8, 8) { conv(4, 3, padding=1) -> bn -> relu -> conv(4, 3, padding=1) -> bn -> relu }\n")
    m = netdsl.build(str(p), "Chain").train()
    from netdsl.grad import Deferred

    seen = []
    real_init = Deferred.__init__
    gc.disable()
    try:
        Deferred.__init__ = lambda self, *a: (real_init(self, *a), seen.append(self))[0]
        y = m(torch.randn(2, 3, 8, 8)).sum()
        raw = weakref.ref(seen[0].raw)
        seen.clear()
        del y
        assert raw() is None
    finally:
        Deferred.__init__ = real_init
        gc.enable()


def test_batch_norm_not_after_a_conv_keeps_its_backward_apply(tmp_path):
    """DenseNet's norm→relu→conv on a tensor no conv produced (here a ReLU's
    output): the forward still defers, and the consumer's dgrad still takes
    the BN backward's sums (and finishes them), but no conv's dgrad can take
    its apply, so that runs as its own kernel (and is still right)."""
    p = tmp_path / "b.net"
    p.write_text("net B input(4, 8, 8) { conv(6, 3, padding=1) -> relu -> bn -> relu -> conv(5, 3, padding=1) }\n")
    tri, ref = twins(str(p), "B")
    train_src, _ = _autograd_source(tri)
    assert "rt.batchnorm(" in train_src and "defer=True" in train_src
    tri.train()
    with rt.plan_launches() as launches:
        y = tri(torch.randn(2, 4, 8, 8))
        y.backward(torch.empty_like(y))
    launches = parts(launches)
    applies = [meta for k, _, meta in launches if k.fn.__name__ == "channel_grad_apply"]
    assert len(applies) == 1 and applies[0]["Y_FROM_X"]
    assert [k.fn.__name__.split("__")[0] for k, _, meta in launches if meta.get("OUT_BNG")] == ["conv_dgrad"]
    # the dgrad's last programs finish that BN's sums (MERGE): no channel_grad merges partials
    assert [k.fn.__name__.split("__")[0] for k, _, meta in launches if meta.get("MERGE")] == ["conv_dgrad"]
    assert sum(bool(meta.get("PARTIALS")) for _, _, meta in launches) == 0
    assert not any(meta.get(f) for _, _, meta in launches for f in ("IN_BNG", "G_BNG"))
    grad_compare(tri, ref, torch.randn(3, 4, 8, 8))


POOLED = """net P input(3, 12, 12) {
    conv(8, 3, padding=1, bias=false) -> bn -> relu -> maxpool(3, stride=2, padding=1)
    conv(6, 3, padding=1) -> bn -> leaky_relu(0.1) -> avgpool(3, stride=2, padding=1, ceil_mode=true, count_include_pad=false)
    conv(5, 1, bias=false) -> bn(affine=false) -> tanh -> maxpool(2, ceil_mode=true)
    conv(4, 1, bias=false) -> bn(track_running_stats=false) -> relu -> avgpool(2)
    flatten
    linear(3)
}
"""


def _spec(tmp_path, text, name="n.net"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _pooled(tmp_path):
    return _spec(tmp_path, POOLED, "pooled.net")


def test_a_pool_takes_its_producer_convs_batch_norm_and_activation(tmp_path):
    """conv→BN→act→pool (a stem's): the pool applies the BN and activation as
    it loads the conv output, so no apply kernel writes the activation; the
    pool's backward takes the BN backward's sums in its epilogue and its last
    programs finish them; the producing conv's dgrad and wgrad apply that
    backward as they load: no channel_grad pass, no BN apply anywhere."""
    tri, _ = twins(_pooled(tmp_path), "P")
    train_src, _ = _autograd_source(tri)
    assert train_src.count("defer=True") == 4 and train_src.count("K=K)") == 4
    tri.train()
    with rt.plan_launches() as launches:
        y = tri(torch.randn(2, 3, 12, 12))
        y.backward(torch.empty_like(y))
    launches = parts(launches)
    names = [k.fn.__name__.split("__")[0] for k, _, _ in launches]
    assert "channel_affine" not in names and "channel_grad_apply" not in names and "bn_stats" not in names
    pools = [meta for k, _, meta in launches if k.fn.__name__.split("__")[0] in ("maxpool", "avgpool")]
    assert [bool(meta["IN_BN"]) for meta in pools] == [True] * 4
    assert [meta["IN_ACT"] for meta in pools] == [1, 2, 4, 1] and [meta["IN_CENTER"] for meta in pools] == [True] * 4
    backs = [meta for k, _, meta in launches if k.fn.__name__.startswith("pool_backward")]
    assert [(meta["OUT_BNG"], meta["MERGE"]) for meta in backs] == [(True, True)] * 4
    # (affine=false: no parameter gradients to store; the second conv's bias gets its gradient from the merge)
    assert [(meta["OUT_AFFINE"], meta["OUT_CBIAS"]) for meta in backs] == \
        [(True, False), (True, True), (False, False), (True, False)][::-1]  # (backward runs last layer first)
    assert "channel_grad" not in names  # (the linear's bias: summed by its wgrad)
    # (the two 1×1 convs' weight gradients ride in their dgrads, WGRAD_ADD: their wgrad programs do not run)
    assert sum(bool(meta.get("G_BNG")) for k, _, meta in launches if k.fn.__name__.startswith("conv_wgrad")) == 2
    assert sum(bool(meta.get("WGRAD_ADD") and meta["IN_BNG"]) for _, _, meta in launches) == 2
    assert sum(bool(meta.get("IN_BNG")) for k, _, meta in launches if k.fn.__name__.startswith("conv_dgrad")) == 3


@pytest.mark.parametrize("merge", ["1", "0"])
def test_pool_deferred_batch_norm_matches_torch(tmp_path, monkeypatch, merge):
    """Outputs, running statistics and every gradient against the torch twin,
    in train mode and in eval mode with gradients (frozen statistics);
    compiled without grid_merge, the pool's backward leaves per-tile sums that
    a channel_grad launch merges instead."""
    tri, ref = twins(_pooled(tmp_path), "P", disable=() if merge == "1" else ("grid_merge",))
    x = torch.randn(4, 3, 12, 12)
    compare(tri, ref, x)
    grad_compare(tri, ref, x)
    tri.train()
    with rt.plan_launches() as launches:
        y = tri(x)
        y.backward(torch.empty_like(y))
    partials = [meta for k, _, meta in launches if k.fn.__name__ == "channel_grad" and meta["PARTIALS"]]
    assert len(partials) == (4 if merge == "0" else 0)


def test_pool_deferred_activation_is_not_kept_for_backward(tmp_path):
    """What backward keeps of conv→BN→ReLU→maxpool: the conv output and the
    pool's taps (int8), not the activation."""
    p = tmp_path / "s.net"
    p.write_text("net S input(3, 16, 16) { conv(16, 3, padding=1) -> bn -> relu -> maxpool(2) -> conv(8, 1) }\n")
    tri, ref = twins(str(p), "S")
    x = torch.randn(4, 3, 16, 16)
    sizes = {name: saved_bytes(m.train(), x) for name, m in (("tri", tri), ("ref", ref))}
    x_, raw, taps, pooled = 4 * 3 * 16 * 16 * 4, 4 * 16 * 16 * 16 * 4, 4 * 16 * 8 * 8, 4 * 16 * 8 * 8 * 4
    weights = (16 * 3 * 3 * 3 + 8 * 16) * 4
    # ours: the first conv's input and output, the pool's taps (int8), the last conv's input and both weights;
    # torch also keeps the BN output and the ReLU's (the pool's input), and int64 indices
    assert sizes["tri"] == x_ + raw + taps + pooled + weights, sizes
    assert sizes["tri"] <= sizes["ref"] - raw, sizes
    grad_compare(tri, ref, x)


@pytest.mark.slow
@pytest.mark.parametrize("merge", ["1", "0"])
def test_pool_deferred_batch_norm_compiles_for_sm90_and_sm80_without_spills(tmp_path, monkeypatch, merge):
    """The pools that apply a deferred BN + act, and their backwards that take
    (and, merging, finish) its sums, compile for real GPUs as the JIT
    specialises them, in fp32 and in bf16 under autocast, without spills."""
    from netdsl import aot

    m = netdsl.build(_pooled(tmp_path), "P", disable=() if merge == "1" else ("grid_merge",))
    names = set()
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            results = aot.compile_launches(m, torch.randn(16, 3, 12, 12), archs=(90, 80))
        for name, arch, compiled in results:
            if name.split("__")[0] in ("maxpool", "avgpool", "pool_backward"):
                names.add(name)
                info = aot.ptxas_info(compiled, arch)
                assert info["registers"] and info["spill_stores"] == 0 and info["spill_loads"] == 0, \
                    (name, arch, info)
    assert len([n for n in names if n.startswith("pool_backward")]) == 4, names  # (one per pool: each geometry its own)


BOTTLENECKS = """block B(c, w, stride = 1) {
    residual {
        conv(w, 1, bias=false) -> bn -> relu
        conv(w, 3, stride=stride, padding=1, bias=false) -> bn -> relu
        conv(c, 1, bias=false) -> bn
    } shortcut sc: if stride != 1 { conv(c, 1, stride=stride, bias=false) -> bn }
    relu
}
block Basic(c) {
    residual { conv(c, 3, padding=1, bias=false) -> bn -> relu -> conv(c, 3, padding=1, bias=false) -> bn }
    relu
}
net N input(16, 8, 8) {
    B(16, 8)
    B(16, 8)
    B(16, 8, 2)
    B(16, 4)
    Basic(16)
    flatten
    linear(3)
}
"""


def _bottlenecks(tmp_path):
    return _spec(tmp_path, BOTTLENECKS, "bottlenecks.net")


def test_a_block_output_is_made_by_the_next_blocks_first_conv(tmp_path):
    """A residual block's output act(BN(conv3) + shortcut), where the next block
    has an identity shortcut and starts with a 1×1 stride-1 conv: that conv
    makes it as it loads conv3's output (normalising the residual too where
    it is a downsample's conv output) and stores it, with its relu bits, for
    the shortcut and for backward; where the next block downsamples, its
    conv1 runs before the shortcut conv, which reads the stored output.  Not
    into a 3×3 conv."""
    tri, _ = twins(_bottlenecks(tmp_path), "N")
    train_src, infer_src = _autograd_source(tri)
    left = re.findall(r"self\.layer\('([\w.]+)'\), t\d+, bn=self\.layer\('[\w.]+'\), leave=True", train_src)
    # blocks 1 to 3 (block 4 precedes a 3×3 conv, the basic block the linear)
    assert left == ["0.6", "1.6", "2.6"] and "leave" not in infer_src, left
    # block 3's conv1 before its shortcut conv, which reads block 2's output as conv1 stored it
    assert train_src.index("self.layer('2.0')") < train_src.index("self.layer('2.sc.0')"), train_src
    tri.train()
    with rt.plan_launches() as launches:
        y = tri(torch.randn(2, 16, 8, 8))
        y.backward(torch.empty_like(y))
    launches = parts(launches)
    made = [(args, meta) for k, args, meta in launches if meta.get("IN_RES")]
    # blocks 1 and 2's outputs (identity shortcuts); block 3's, whose shortcut is the downsample's conv output,
    # its BN deferred: normalised as it is loaded
    assert [(bool(meta["IN_RES_BN"]), bool(meta["IN_BITS"])) for _, meta in made] == \
        [(False, True), (False, True), (True, True)]
    assert [meta["IN_ACT"] for _, meta in made] == [1, 1, 1]
    # the apply kernels left: block 4's and the basic block's
    applies = [meta for k, _, meta in launches if k.fn.__name__ == "channel_affine"]
    assert len(applies) == 2, len(applies)


@pytest.mark.parametrize("fallback", [False, True], ids=["made", "materialized"])
def test_a_block_output_made_by_the_next_conv_matches_torch(tmp_path, monkeypatch, fallback):
    """Outputs, running statistics and gradients against torch, train and eval
    (frozen statistics); "materialized": the next conv declines to make the
    output (as one under an autocast dtype change would), so the apply kernel
    writes it after all, just before that conv runs."""
    if fallback:
        monkeypatch.setattr(rt, "_makes_block", lambda layer, x: False)
    tri, ref = twins(_bottlenecks(tmp_path), "N")
    x = torch.randn(3, 16, 8, 8)
    tri.train()
    with rt.plan_launches() as launches:
        y = tri(x)
        y.backward(torch.empty_like(y))
    assert sum(bool(meta.get("IN_RES")) for _, _, meta in launches) == (0 if fallback else 3)
    # block 3's conv3 dgrad also takes its downsample BN's sums (RES_SUMS), and 7 1×1 convs' dgrads their weight
    # gradients (WGRAD_ADD): both are in the gradients compared below
    assert sum(bool(meta.get("d_RES_SUMS")) for _, _, meta in launches) == 1
    assert sum(bool(meta.get("d_WGRAD_ADD")) for _, _, meta in launches) == 7
    assert sum(k.fn.__name__ == "channel_affine" for k, _, _ in launches) == (5 if fallback else 2)
    compare(tri, ref, x)
    grad_compare(tri, ref, x)


def test_a_block_output_made_by_the_next_conv_under_autocast(tmp_path):
    """fp16 under autocast (the interpreter has no bf16): the output is made
    in the conv's dtype, as the apply kernel would have stored it."""
    tri, ref = twins(_bottlenecks(tmp_path), "N")
    x = torch.randn(4, 16, 8, 8)
    outs = []
    for m in (tri, ref):
        m.train()
        with torch.autocast("cpu", dtype=torch.float16):
            outs.append(m(x))
    assert outs[0].dtype == outs[1].dtype == torch.float16
    assert (outs[0].float() - outs[1].float()).abs().max() / outs[1].float().abs().max() < 1e-2
    with rt.plan_launches() as launches, torch.autocast("cpu", dtype=torch.float16):
        tri(x)
    assert sum(bool(meta.get("IN_RES")) for _, _, meta in launches) == 3


@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("flag", ["IN_RES", "d_WGRAD_ADD", "d_RES_SUMS"],
                         ids=["block-output", "dgrad-with-wgrad", "dgrad-with-shortcut-sums"])
def test_bottleneck_fusions_compile_for_sm90_and_sm80_without_spills(tmp_path, bf16, flag):
    """The convs that make a block output as they load it (IN_RES), the
    dgrads that carry their conv's weight gradient (d_WGRAD_ADD, no wgrad
    programs alongside), and those that take a downsample BN's sums (d_RES_SUMS)."""
    from netdsl import aot

    m = netdsl.build(_bottlenecks(tmp_path), "N")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        variants = [v for v in aot.signatures(m, torch.randn(16, 16, 8, 8), train=True, backward=True)
                    if v[2].get(flag)]
    assert variants
    for kernel, sig, meta in variants:
        assert flag != "d_WGRAD_ADD" or not meta["WGRAD"]
        for arch in (90, 80):
            info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
            assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (kernel.fn.__name__, arch, info)


def test_weight_gradients_that_ride_in_dgrads_under_autocast(tmp_path, monkeypatch):
    """fp16 under autocast (the interpreter has no bf16): a conv's weight
    gradient is fp16 there, so the dgrad adds into an fp32 buffer, rounded
    once at the end; the gradients match the wgrad's own (a module compiled
    without wgrad_add) to fp16's rounding."""
    from twin import rel_err

    tri, _ = twins(_bottlenecks(tmp_path), "N")
    tri.train()
    x = torch.randn(4, 16, 8, 8)
    state = {k: v.clone() for k, v in tri.state_dict().items()}

    def grads(m):  # (from the same state: a train-mode forward moves the running statistics)
        m.train()
        m.load_state_dict(state)
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            y = m(x)
        y.float().square().mean().backward()
        return {k: p.grad.clone() for k, p in m.named_parameters()}

    with rt.plan_launches() as plan, torch.autocast("cpu", dtype=torch.float16):
        tri(x).float().sum().backward()
    rides = [meta for _, _, meta in plan if meta.get("d_WGRAD_ADD")]
    assert len(rides) == 7, len(rides)  # (the bottlenecks' 1×1 convs with dgrads, at BLOCK_M 64: all of them)
    added = grads(tri)
    without, _ = twins(_bottlenecks(tmp_path), "N", disable=("wgrad_add",))
    with rt.plan_launches() as plan, torch.autocast("cpu", dtype=torch.float16):
        without.train()(x).float().sum().backward()
    assert not any(meta.get("d_WGRAD_ADD") for _, _, meta in plan)
    own = grads(without)
    assert added.keys() == own.keys()
    for k in own:
        assert rel_err(added[k], own[k]) < 2e-3, (k, rel_err(added[k], own[k]))
