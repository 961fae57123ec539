"""The zoo against torchvision's own model files (loaded by tests/tv_models.py):
the same state_dict keys and shapes, torchvision's weights load strictly, and
for SqueezeNet 1.1 the same outputs on those weights."""
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
from twin import rel_err

# spec file, network, torchvision module, factory
CASES = [
    ("resnet.net", "ResNeXt50_32x4d", "resnet", "resnext50_32x4d"),
    ("resnet.net", "WideResNet50_2", "resnet", "wide_resnet50_2"),
    ("squeezenet.net", "SqueezeNet1_1", "squeezenet", "squeezenet1_1"),
]
IDS = [c[1] for c in CASES]


@functools.cache
def reference(module, factory):
    """torchvision's model, made once per worker (construction is most of these tests' time)."""
    return tv_model(module, factory)


def test_loader_imports_the_installed_model_files_without_compiled_ops():
    assert tv_module("resnet").__file__.endswith("torchvision/models/resnet.py")
    assert not any("torchvision" in lib for lib in torch.ops.loaded_libraries)
    if os.path.exists("/proc/self/maps"):  # Linux: no torchvision shared object is mapped into the process
        assert "torchvision/_C" not in open("/proc/self/maps").read()
    assert "torchvision.io" not in sys.modules and "torchvision.datasets" not in sys.modules


@pytest.mark.parametrize("file,net,module,factory", CASES, ids=IDS)
def test_state_dict_keys_and_shapes_match_torchvision(file, net, module, factory):
    ref = reference(module, factory).state_dict()
    res = check_file(SPECS / file, net)
    assert res.ok, res.diagnostics
    ours = res.nets[0]
    assert state_keys(ours) == list(ref)
    shapes = {f"{l.name}.{t.suffix}": t.shape for l in ir.walk_layers(ours.body) for t in l.tensors}
    assert shapes == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.parametrize("file,net,module,factory", CASES, ids=IDS)
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

