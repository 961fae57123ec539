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
from twin import grad_compare, saved_bytes, twins


def _autograd_source(m):
    import inspect

    return inspect.getsource(type(m).forward_autograd), inspect.getsource(type(m).forward)


def test_resnet50_defers_two_batch_norms_per_bottleneck_and_the_downsample_bns():
    m = netdsl.build("specs/resnet.net", "ResNet50")
    train_src, infer_src = _autograd_source(m)
    deferred = re.findall(r"self\.layer\('([\w.]+)'\), t\d+, bn=self\.layer\('[\w.]+'\), defer=True", train_src)
    assert len(deferred) == 36, deferred
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
    # 53 conv+BN layers, 36 deferred: 17 apply kernels (4 normalise their residual as they load it); every BN
    # takes its statistics from its conv's epilogue, merged by the conv's last programs: no bn_stats launch
    assert names.count("channel_affine") == 17 and names.count("bn_stats") == 0
    assert sum(bool(meta.get("RES_BN")) for k, _, meta in launches if k.fn.__name__ == "channel_affine") == 4
    assert sum(bool(meta.get("STATS")) for _, _, meta in launches) == 53
    assert sum(bool(meta.get("MERGE")) for k, _, meta in launches if k.fn.__name__.startswith("conv_bn")) == 53
    assert sum(bool(meta.get("IN_BN")) for k, _, meta in launches if k.fn.__name__.startswith("conv_bn")) == 32
    assert sum(bool(meta.get("IN_BN")) for k, _, meta in launches if k.fn.__name__.startswith("conv_wgrad")) == 32
    # backward: each deferred BN's sums come from its consumer's dgrad epilogue (channel_grad merges them),
    # and its apply rides in its producer's dgrad and wgrad.  So do 15 bn3s' (the block's output feeds the next
    # block; the next block's conv1 or downsample dgrad runs last, adds the shortcut's gradient and takes relu'
    # from the stored output).  The last bn3 and the stem's BN (a pool follows: no dgrad to ride in) take their
    # sums from a reduction pass that writes g = dy·relu'; a downsample BN's from one over its block's g.
    # No BN applies at all (the stem conv's input needs no gradient: 52 dgrads, 53 wgrads)
    flagged = {f: [k.fn.__name__ for k, _, meta in launches if meta.get(f)]
               for f in ("OUT_BNG", "IN_BNG", "G_BNG", "OUT_MASK")}
    assert len(flagged["OUT_BNG"]) == 47 and len(flagged["IN_BNG"]) == 52 and len(flagged["G_BNG"]) == 53, flagged
    assert len(flagged["OUT_MASK"]) == 15 and set(flagged["OUT_MASK"]) <= set(flagged["OUT_BNG"])
    assert all(n.startswith("conv_dgrad") for n in flagged["OUT_BNG"] + flagged["IN_BNG"])
    assert all(n.startswith("conv_wgrad") for n in flagged["G_BNG"])
    # every dgrad that takes a BN's sums also finishes that BN's backward in its last programs (MERGE): the
    # 6 BNs whose sums need a pass of their own are the only channel_grad launches left
    merged = [k.fn.__name__ for k, _, meta in launches if meta.get("MERGE") and k.fn.__name__.startswith("conv_dgrad")]
    assert merged == flagged["OUT_BNG"]
    grads = [meta for k, _, meta in launches if k.fn.__name__ == "channel_grad" and meta["NORM"]]  # (not fc's bias)
    assert len(grads) == 6 and not any(meta.get("PARTIALS") for meta in grads)
    assert sum(bool(meta.get("STORE_G")) for meta in grads) == 2
    assert names.count("channel_grad_apply") == 0


def test_no_deferral_where_the_activation_has_other_consumers(tmp_path):
    p = tmp_path / "n.net"
    p.write_text(
        "net N input(3, 8, 8) {\n"
        "  conv(4, 3, padding=1) -> bn -> relu -> maxpool(2)\n"               # consumer is a pool
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


@pytest.mark.parametrize("file,net,count", [
    ("resnet.net", "ResNet18", 11),        # conv1 of each basic block, the 3 downsamples' BN (into the add)
    ("vgg.net", "VGG16_BN", 8),            # each conv followed by a conv, not a pool
    ("googlenet.net", "GoogLeNet", 19),    # conv2→conv3, and the 3×3 and 5×5 branches' reductions
    ("densenet.net", "DenseNet121", 119),  # norm1 and norm2 of 58 dense layers, each transition's norm
])
def test_zoo_deferrals(file, net, count):
    m = netdsl.build(f"specs/{file}", net)
    train_src, infer_src = _autograd_source(m)
    assert train_src.count("defer=True") == count and "defer" not in infer_src


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
