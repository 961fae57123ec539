"""The zoo against torchvision's own model files (loaded by tests/tv_models.py):
the same state_dict keys and shapes, torchvision's weights load strictly, and
the same outputs on those weights: blocks one at a time with their
gradients, whole networks in eval mode, and whole networks' train-mode
gradients (MobileNetV2, MobileNetV3Small, EfficientNetB0, ConvNeXtTiny)."""
import functools
import os
import sys

import pytest
import torch

import netdsl
from netdsl import check_file, ir
from netdsl.report import state_keys

from conftest import SPECS
from tv_models import tv_model, tv_module
from twin import compare, grad_compare, randomize, rel_err

# spec file, network, torchvision module, factory
CASES = [
    ("resnet.net", "ResNeXt50_32x4d", "resnet", "resnext50_32x4d"),
    ("resnet.net", "WideResNet50_2", "resnet", "wide_resnet50_2"),
    ("squeezenet.net", "SqueezeNet1_1", "squeezenet", "squeezenet1_1"),
    ("mobilenet.net", "MobileNetV2", "mobilenetv2", "mobilenet_v2"),
    ("mobilenet.net", "MobileNetV3Large", "mobilenetv3", "mobilenet_v3_large"),
    ("mobilenet.net", "MobileNetV3Small", "mobilenetv3", "mobilenet_v3_small"),
    ("mnasnet.net", "MNASNet1_0", "mnasnet", "mnasnet1_0"),
    *[("efficientnet.net", f"EfficientNetB{b}", "efficientnet", f"efficientnet_b{b}") for b in range(8)],
    ("regnet.net", "RegNetX_400MF", "regnet", "regnet_x_400mf"),
    ("regnet.net", "RegNetY_400MF", "regnet", "regnet_y_400mf"),
    ("convnext.net", "ConvNeXtTiny", "convnext", "convnext_tiny"),
    ("shufflenet.net", "ShuffleNetV2_x1_0", "shufflenetv2", "shufflenet_v2_x1_0"),
    ("segmentation.net", "DeepLabV3_ResNet50", "segmentation.deeplabv3", "deeplabv3_resnet50"),
]
# factory arguments beyond weights=None: no pretrained backbone to fetch, no auxiliary head
FACTORY_ARGS = {"deeplabv3_resnet50": {"weights_backbone": None, "aux_loss": False}}
# EfficientNet B1 … B6 differ from B0 and B7 only in their multipliers: their keys and loads run with the slow tests
SLOW = {f"EfficientNetB{b}" for b in range(1, 7)}
ZOO = [pytest.param(*c, id=c[1], marks=[pytest.mark.slow] if c[1] in SLOW else []) for c in CASES]


@functools.cache
def reference(module, factory):
    """torchvision's model, made once per worker (construction is most of these tests' time)."""
    return tv_model(module, factory, **FACTORY_ARGS.get(factory, {}))


def test_loader_imports_the_installed_model_files_without_compiled_ops():
    assert tv_module("resnet").__file__.endswith("torchvision/models/resnet.py")
    assert not any("torchvision" in lib for lib in torch.ops.loaded_libraries)
    if os.path.exists("/proc/self/maps"):  # Linux: no torchvision shared object is mapped into the process
        assert "torchvision/_C" not in open("/proc/self/maps").read()
    assert "torchvision.io" not in sys.modules and "torchvision.datasets" not in sys.modules


@pytest.mark.parametrize("file,net,module,factory", ZOO)
def test_state_dict_keys_and_shapes_match_torchvision(file, net, module, factory):
    ref = reference(module, factory).state_dict()
    res = check_file(SPECS / file, net)
    assert res.ok, res.diagnostics
    ours = res.nets[0]
    if module == "regnet":  # torchvision registers a block's projection before its body; a residual names its body first
        assert sorted(state_keys(ours)) == sorted(ref)
    else:
        assert state_keys(ours) == list(ref)
    shapes = {t.key(l.name): t.shape for l in ir.walk_layers(ours.body) for t in l.tensors}
    assert shapes == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.parametrize("file,net,module,factory", ZOO)
def test_torchvision_weights_load_strictly(file, net, module, factory):
    netdsl.build(SPECS / file, net).load_state_dict(reference(module, factory).state_dict(), strict=True)


def test_squeezenet_forward_matches_torchvision():
    torch.manual_seed(0)
    ref = tv_model("squeezenet", "squeezenet1_1").eval()
    with torch.no_grad():  # torchvision initialises the biases to zero: make them count
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    ours = netdsl.build(SPECS / "squeezenet.net", "SqueezeNet1_1").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 40, 40)  # 40×40: 19×19 after the stem, 2×2 before the classifier
    with torch.no_grad():
        y, yr = ours(x), ref(x)
    assert y.shape == yr.shape == (1, 1000)
    assert (yr > 0).sum() > 100  # the final ReLU leaves much of the output non-zero
    assert rel_err(y, yr) < 1e-4


def test_batch_norm_settings_match_torchvision():
    """MNASNet's momentum (1 − 0.9997, as torchvision computes it), MobileNetV3's and EfficientNet-B7's
    (eps 0.001, momentum 0.01), and every eps."""
    for file, net, module, factory in [c for c in CASES[2:] if c[1] not in SLOW]:
        ours = {n: m for n, m in netdsl.build(SPECS / file, net).named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
        ref = {n: m for n, m in reference(module, factory).named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
        assert ours.keys() == ref.keys()
        assert all((ours[n].momentum, ours[n].eps) == (ref[n].momentum, ref[n].eps) for n in ref), net


# (spec file, the block's call, torchvision module, its class, its arguments, input shape, gradients too)
BLOCKS = [
    ("mobilenet.net", "InvertedResidual(4, 4, 1, 2)", "mobilenetv2", "InvertedResidual", (4, 4, 1, 2), (4, 5, 5), True),
    ("mobilenet.net", "InvertedResidual(4, 8, 2, 1)", "mobilenetv2", "InvertedResidual", (4, 8, 2, 1), (4, 5, 5),
     True),
    ("mnasnet.net", "InvertedResidual(4, 4, 5, 1, 2, 1 - 0.9997)", "mnasnet", "_InvertedResidual",
     (4, 4, 5, 1, 2, 1 - 0.9997), (4, 5, 5), True),
]


@pytest.mark.parametrize("file,call,module,cls,args,shape,grads", BLOCKS, ids=[b[1] for b in BLOCKS])
def test_an_inverted_residual_block_against_torchvision(tmp_path, file, call, module, cls, args, shape, grads):
    """One block, spec'd with the zoo file's own block, against torchvision's
    class: outputs and running statistics in eval and train mode, and the
    train-mode gradients."""
    (tmp_path / file).write_text((SPECS / file).read_text())
    (tmp_path / "b.net").write_text(f'import "{file}"\nnet B input({", ".join(map(str, shape))}) {{ {call} }}\n')
    torch.manual_seed(len(call))
    ref = torch.nn.Sequential(getattr(tv_module(module), cls)(*args))
    randomize(ref, seed=len(call))
    ours = netdsl.build(tmp_path / "b.net", "B")
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, *shape)
    compare(ours, ref, x)
    if grads:
        grad_compare(ours, ref, x, modes=("train",))


# MobileNetV3's bneck rows (torchvision's InvertedResidualConfig arguments):
# SE and hardswish with the input added back, and SE and relu with stride 2
BNECKS = [pytest.param((8, 3, 16, 8, True, "HS", 1), (8, 6, 6), True, id="SE-hardswish-residual"),
          pytest.param((8, 5, 24, 16, True, "RE", 2), (8, 7, 7), True, id="SE-relu-stride2")]


@pytest.mark.parametrize("row,shape,grads", BNECKS)
def test_a_mobilenet_v3_bneck_against_torchvision(tmp_path, row, shape, grads):
    """One bneck block (expand, depthwise, squeeze-and-excitation with a hard
    sigmoid gate, project) against torchvision's InvertedResidual: outputs and
    running statistics in eval and train mode, and train-mode gradients."""
    (tmp_path / "mobilenet.net").write_text((SPECS / "mobilenet.net").read_text())
    args = ", ".join(str(a).lower() if isinstance(a, bool) else f'"{a}"' if isinstance(a, str) else str(a) for a in row)
    (tmp_path / "b.net").write_text(f'import "mobilenet.net"\nnet B input({", ".join(map(str, shape))}) {{ Bneck({args}) }}\n')
    v3 = tv_module("mobilenetv3")
    torch.manual_seed(sum(row[:4]))
    norm = functools.partial(torch.nn.BatchNorm2d, eps=0.001, momentum=0.01)
    ref = torch.nn.Sequential(v3.InvertedResidual(v3.InvertedResidualConfig(*row, 1, 1.0), norm))
    randomize(ref, seed=sum(row[:4]))
    with torch.no_grad():  # spread the gate's inputs over the hard sigmoid's three pieces
        for name, p in ref.named_parameters():
            if ".fc" in name:
                p.mul_(4.0)
    ours = netdsl.build(tmp_path / "b.net", "B")
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, *shape) * 2
    compare(ours, ref, x)
    if grads:
        grad_compare(ours, ref, x, modes=("train",))


def test_efficientnet_stochastic_depth_rates_match_torchvision():
    """Each residual MBConv's drop rate, 0.2 · (its index) / (blocks in the
    network), under torchvision's module name; torchvision's other blocks hold
    one too, unused."""
    for b in (0, 7):
        ref = reference("efficientnet", f"efficientnet_b{b}")
        theirs = {n: m.p for n, m in ref.named_modules() if type(m).__name__ == "StochasticDepth"}
        residual = {n for n, m in ref.named_modules() if getattr(m, "use_res_connect", False)}
        ours = {n: m.p for n, m in netdsl.build(SPECS / "efficientnet.net", f"EfficientNetB{b}").named_modules()
                if type(m).__name__ == "StochasticDepth"}
        assert ours == {n: p for n, p in theirs.items() if n.rsplit(".", 1)[0] in residual}
        assert len(ours) == len(residual) > 8 and max(ours.values()) > 0.17


# EfficientNet's MBConv (torchvision's MBConvConfig: expansion, kernel, stride, input, output, layers)
MBCONVS = [pytest.param((2, 3, 1, 8, 8, 1), (8, 5, 5), True, id="expand2-residual"),
           pytest.param((1, 5, 2, 8, 16, 1), (8, 7, 7), True, id="expand1-stride2")]


@pytest.mark.parametrize("cfg,shape,grads", MBCONVS)
def test_an_efficientnet_mbconv_against_torchvision(tmp_path, cfg, shape, grads):
    """One MBConv (expand, depthwise, squeeze-and-excitation with SiLU and a
    sigmoid gate, project, and stochastic depth on the residual branch)
    against torchvision's: eval and train mode with the drop rate at 0 (a
    drawn mask cannot match torch's), eval mode at 0.2."""
    (tmp_path / "efficientnet.net").write_text((SPECS / "efficientnet.net").read_text())
    e, k, s, i, o, _ = cfg
    eff = tv_module("efficientnet")
    for p in (0.0, 0.2):
        (tmp_path / "b.net").write_text(f'import "efficientnet.net"\nnet B input({", ".join(map(str, shape))}) '
                                        f'{{ MBConv({i}, {o}, {e}, {k}, {s}, {p}, [1e-5, 0.1]) }}\n')
        torch.manual_seed(sum(cfg))
        ref = torch.nn.Sequential(eff.MBConv(eff.MBConvConfig(*cfg), p, torch.nn.BatchNorm2d))
        randomize(ref, seed=sum(cfg))
        ours = netdsl.build(tmp_path / "b.net", "B")
        ours.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(2, *shape)
        modes = ("eval", "train") if p == 0.0 else ("eval",)
        compare(ours, ref, x, modes=modes)
        if grads:
            grad_compare(ours, ref, x, modes=modes)


# RegNet's ResBottleneckBlock (width in, width out, stride, group width, SE ratio): RegNetY's with a
# projection and two groups, and RegNetX's with an identity shortcut
RESBLOCKS = [((8, 16, 2, 8, 0.25), (8, 6, 6)), ((16, 16, 1, 8, None), (16, 5, 5))]


@pytest.mark.parametrize("args,shape", RESBLOCKS, ids=["Y-projection", "X-identity"])
def test_a_regnet_block_against_torchvision(tmp_path, args, shape):
    (tmp_path / "regnet.net").write_text((SPECS / "regnet.net").read_text())
    w_in, w_out, stride, gw, se = args
    (tmp_path / "b.net").write_text(f'import "regnet.net"\nnet B input({", ".join(map(str, shape))}) '
                                    f'{{ ResBottleneck({w_in}, {w_out}, {stride}, {gw}, {str(se is not None).lower()}) }}\n')
    rg = tv_module("regnet")
    torch.manual_seed(w_in + w_out)
    ref = torch.nn.Sequential(rg.ResBottleneckBlock(w_in, w_out, stride, torch.nn.BatchNorm2d, torch.nn.ReLU, gw, 1.0, se))
    randomize(ref, seed=w_in + w_out)
    ours = netdsl.build(tmp_path / "b.net", "B")
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, *shape)
    compare(ours, ref, x)
    grad_compare(ours, ref, x, modes=("train",))


# whole networks with depthwise convs (the direct kernel: seconds in the interpreter, not minutes)
WHOLE = [pytest.param(*c[:4], id=c[1], marks=[pytest.mark.slow] if c[4] else [])
         for c in [("mobilenet.net", "MobileNetV3Small", "mobilenetv3", "mobilenet_v3_small", True),
                   ("shufflenet.net", "ShuffleNetV2_x1_0", "shufflenetv2", "shufflenet_v2_x1_0", False),
                   ("mobilenet.net", "MobileNetV2", "mobilenetv2", "mobilenet_v2", True),
                   ("mobilenet.net", "MobileNetV3Large", "mobilenetv3", "mobilenet_v3_large", True),
                   ("mnasnet.net", "MNASNet1_0", "mnasnet", "mnasnet1_0", True),
                   ("efficientnet.net", "EfficientNetB0", "efficientnet", "efficientnet_b0", True),
                   ("convnext.net", "ConvNeXtTiny", "convnext", "convnext_tiny", True)]]


@pytest.mark.parametrize("file,net,module,factory", WHOLE)
def test_whole_network_in_eval_mode_matches_torchvision(file, net, module, factory):
    """torchvision's model with random weights and batch-norm statistics (its
    own initialisation leaves outputs near 1e-10), eval mode, two 32×32 images:
    within 1e-5 of torchvision's output (measured: 3e-7 to 1e-6, as far as
    torchvision's own fp32 result is from float64)."""
    torch.manual_seed(0)
    ref = tv_model(module, factory).eval()
    randomize(ref, seed=1)
    ours = netdsl.build(SPECS / file, net).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y, yr = ours(x), ref(x)
    assert y.shape == yr.shape == (2, 1000) and yr.abs().max() > 0.01
    assert rel_err(y, yr) < 1e-5


# (spec file, network, torchvision module, factory, its arguments and ours: dropout and stochastic depth off
# on both sides, as a drawn mask need not match torch's)
TRAINED = [("mobilenet.net", "MobileNetV2", "mobilenetv2", "mobilenet_v2", {"dropout": 0.0}, {"dropout": 0.0}),
           ("mobilenet.net", "MobileNetV3Small", "mobilenetv3", "mobilenet_v3_small", {"dropout": 0.0},
            {"dropout": 0.0}),
           ("efficientnet.net", "EfficientNetB0", "efficientnet", "efficientnet_b0",
            {"dropout": 0.0, "stochastic_depth_prob": 0.0}, {"dropout": 0.0, "stochastic_depth": 0.0}),
           ("convnext.net", "ConvNeXtTiny", "convnext", "convnext_tiny", {"stochastic_depth_prob": 0.0},
            {"stochastic_depth": 0.0})]


@pytest.mark.slow
@pytest.mark.parametrize("file,net,module,factory,tv_args,args", TRAINED, ids=[t[1] for t in TRAINED])
def test_whole_network_train_mode_gradients_match_torchvision(file, net, module, factory, tv_args, args):
    """Every parameter's and the input's gradient in train mode (batch
    statistics of two 32×32 images), through the direct depthwise backward
    kernels, judged by grad_compare's rule against torchvision's model."""
    torch.manual_seed(0)
    ref = tv_model(module, factory, **tv_args)
    randomize(ref, seed=3)
    ours = netdsl.build(SPECS / file, net, **args)
    ours.load_state_dict(ref.state_dict(), strict=True)
    grad_compare(ours, ref, torch.randn(2, 3, 32, 32), modes=("train",))


@pytest.mark.slow
def test_regnet_y_400mf_forward_matches_torchvision():
    """The whole network on torchvision's (randomly initialised) weights, eval mode, a 32×32 input."""
    torch.manual_seed(0)
    ref = reference("regnet", "regnet_y_400mf").eval()
    ours = netdsl.build(SPECS / "regnet.net", "RegNetY_400MF").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < 1e-4


# ConvNeXt's CNBlock (dim, layer scale, stochastic depth), and its stem and downsampling layers
# (its 7×7 depthwise conv's gradients take the interpreter a quarter of a minute: slow run; test_layernorm.py
# checks the block's other layers in the fast one)
CNBLOCKS = [pytest.param(8, (8, 4, 5), True, id="dim8", marks=pytest.mark.slow)]


@pytest.mark.parametrize("dim,shape,grads", CNBLOCKS)
def test_a_convnext_block_against_torchvision(tmp_path, dim, shape, grads):
    """One CNBlock (7×7 depthwise, layer norm over channels, the per-pixel MLP
    with GELU, layer scale, stochastic depth, the residual add) against
    torchvision's, with a random layer scale (its 1e-6 start would hide the
    branch): eval and train mode and train-mode gradients at drop rate 0;
    eval mode at 0.3."""
    (tmp_path / "convnext.net").write_text((SPECS / "convnext.net").read_text())
    cx = tv_module("convnext")
    for p in (0.0, 0.3):
        (tmp_path / "b.net").write_text(f'import "convnext.net"\nnet B input({", ".join(map(str, shape))}) '
                                        f'{{ CNBlock({dim}, {p}) }}\n')
        torch.manual_seed(dim)
        ref = torch.nn.Sequential(cx.CNBlock(dim, 1e-6, p))
        with torch.no_grad():
            for name, t in ref.named_parameters():
                t.normal_(1.0 if name.endswith("layer_scale") or name == "0.block.2.weight" else 0.0,
                          0.5 if "block.2" in name or "layer_scale" in name else 0.2)
        ours = netdsl.build(tmp_path / "b.net", "B")
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(2, *shape)
        modes = ("eval", "train") if p == 0.0 else ("eval",)
        compare(ours, ref, x, modes=modes)
        if grads and p == 0.0:
            grad_compare(ours, ref, x, modes=("train",))


def test_convnext_stochastic_depth_rates_match_torchvision():
    """Block k of 18 drops with probability 0.1 · k / 17, under torchvision's module names."""
    ref = reference("convnext", "convnext_tiny")
    theirs = {n: m.p for n, m in ref.named_modules() if type(m).__name__ == "StochasticDepth"}
    ours = {n: m.p for n, m in netdsl.build(SPECS / "convnext.net", "ConvNeXtTiny").named_modules()
            if type(m).__name__ == "StochasticDepth"}
    assert ours.keys() == theirs.keys() and len(ours) == 18
    assert all(abs(ours[n] - theirs[n]) < 1e-12 for n in theirs) and max(ours.values()) == pytest.approx(0.1)


def test_convnext_norms_match_torchvision():
    """Every layer norm's eps (1e-6) and shape, in the stem, between the stages, in the blocks and the head."""
    ref = {n: m for n, m in reference("convnext", "convnext_tiny").named_modules()
           if isinstance(m, torch.nn.LayerNorm)}
    ours = {n: m for n, m in netdsl.build(SPECS / "convnext.net", "ConvNeXtTiny").named_modules()
            if isinstance(m, torch.nn.LayerNorm)}
    assert ours.keys() == ref.keys() and len(ref) == 18 + 1 + 3 + 1
    assert all((ours[n].eps, ours[n].normalized_shape) == (ref[n].eps, ref[n].normalized_shape) for n in ref)


@pytest.mark.parametrize("inp,out,stride,shape", [(8, 8, 1, (8, 5, 6)),
                                                  pytest.param(6, 8, 2, (6, 7, 7), marks=pytest.mark.slow)],
                         ids=["stride1", "stride2"])
def test_a_shufflenet_unit_against_torchvision(tmp_path, inp, out, stride, shape):
    """One unit (a channel half passed through or a downsampling branch1,
    branch2's 1×1, depthwise and 1×1 convs, the concatenation and the channel
    shuffle) against torchvision's InvertedResidual: outputs and running
    statistics in eval and train mode, and train-mode gradients."""
    (tmp_path / "shufflenet.net").write_text((SPECS / "shufflenet.net").read_text())
    (tmp_path / "b.net").write_text(f'import "shufflenet.net"\nnet B input({", ".join(map(str, shape))}) '
                                    f'{{ ShuffleUnit({inp}, {out}, {stride}) }}\n')
    torch.manual_seed(inp + stride)
    ref = torch.nn.Sequential(tv_module("shufflenetv2").InvertedResidual(inp, out, stride))
    randomize(ref, seed=inp + stride)
    ours = netdsl.build(tmp_path / "b.net", "B")
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, *shape)
    compare(ours, ref, x)
    grad_compare(ours, ref, x, modes=("train",))


@pytest.mark.slow
def test_a_deeplab_aspp_against_torchvision(tmp_path):
    """DeepLabV3's head: atrous spatial pyramid pooling (a 1×1 branch, three
    dilated 3×3 branches, the image-level pooling branch spread back over the
    map), its projection, then the 3×3 conv and the classifier, against
    torchvision's ASPP and DeepLabHead layers at 8 channels on a 5×5 map:
    eval-mode outputs and gradients (the projection's dropout draws its own
    mask in train mode)."""
    (tmp_path / "segmentation.net").write_text((SPECS / "segmentation.net").read_text())
    (tmp_path / "resnet.net").write_text((SPECS / "resnet.net").read_text())
    (tmp_path / "h.net").write_text('import "segmentation.net"\nnet H input(16, 5, 5) {\n'
                                    '    ASPP([1, 2, 3], 5, 8)\n'
                                    '    conv(8, 3, padding=1, bias=false) -> bn -> relu\n'
                                    '    conv(5, 1)\n}\n')
    dl = tv_module("segmentation.deeplabv3")
    torch.manual_seed(7)
    ref = torch.nn.Sequential(dl.ASPP(16, [1, 2, 3], 8), torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
                              torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 5, 1))
    randomize(ref, seed=7)
    ours = netdsl.build(tmp_path / "h.net", "H")
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 16, 5, 5)
    compare(ours, ref, x, modes=("eval",))
    grad_compare(ours, ref, x, modes=("eval",))
