"""specs/inception.net's InceptionV3 against torchvision's Inception3 with its
auxiliary classifier (tests/tv_models.py loads the model file): the parameter
count, the state_dict keys and shapes, a strict load of torchvision's weights,
the eval-mode output on those weights (the logits alone), and the training-mode
pair of logits and auxiliary logits."""
import pytest
import torch

import netdsl
from netdsl import check_file, ir
from netdsl.report import state_keys, totals

from conftest import SPECS
from tv_models import tv_module
from twin import randomize, rel_err


def reference(num_classes=1000):
    """torchvision's inception_v3(weights=None, aux_logits=True, init_weights=False)."""
    return tv_module("inception").Inception3(num_classes=num_classes, aux_logits=True, init_weights=False)


def test_count_keys_and_shapes_match_torchvision():
    res = check_file(SPECS / "inception.net", "InceptionV3")
    assert res.ok, res.diagnostics
    net = res.nets[0]
    assert totals(net)["params"] == 27_161_264
    with torch.device("meta"):  # layouts only: no memory, no initialisation
        ref = reference().state_dict()
    ours = state_keys(net)
    assert set(ours) == set(ref) and len(ours) == len(ref)
    # torchvision registers AuxLogits between Mixed_6e and Mixed_7a; the spec writes the head after the main
    # path, which otherwise keeps torchvision's order
    main = [k for k in ours if not k.startswith("AuxLogits.")]
    assert main == [k for k in ref if not k.startswith("AuxLogits.")]
    shapes = {t.key(l.name): t.shape for l in ir.walk_layers(net.body) for t in l.tensors}
    assert shapes == {k: tuple(v.shape) for k, v in ref.items()}


def test_batch_norm_settings_and_a_strict_load():
    ref = reference(num_classes=10)
    ours = netdsl.build(SPECS / "inception.net", "InceptionV3", target="torch", num_classes=10)
    ours.load_state_dict(ref.state_dict(), strict=True)
    bns = {n: (m.eps, m.momentum) for n, m in ref.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {n: (m.eps, m.momentum) for n, m in ours.named_modules() if isinstance(m, torch.nn.BatchNorm2d)} == bns
    assert len(bns) == 96 and all(eps == 0.001 for eps, _ in bns.values())


@pytest.mark.slow
def test_eval_forward_matches_torchvision():
    """The Triton module on torchvision's weights with random batch-norm
    statistics, eval mode, one 75×75 image (Inception's smallest input; the
    auxiliary head runs only in training): the logits alone, as torchvision's
    eval-mode output."""
    torch.manual_seed(0)
    ref = reference(num_classes=10).eval()
    randomize(ref, seed=1)
    ours = netdsl.build(SPECS / "inception.net", "InceptionV3", num_classes=10).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 75, 75)
    with torch.no_grad():
        y, yr = ours(x), ref(x)
    assert isinstance(y, torch.Tensor) and y.shape == yr.shape == (1, 10) and yr.abs().max() > 0.01
    assert rel_err(y, yr) < 1e-4


@pytest.mark.slow
def test_training_mode_returns_the_auxiliary_logits_too():
    """The --target torch module in training mode, two 299×299 images (the
    auxiliary head needs Mixed_6e's 17×17 map) with the dropout rate at 0:
    (logits, auxiliary logits) and the running statistics as torchvision's."""
    torch.manual_seed(0)
    ref = tv_module("inception").Inception3(num_classes=10, aux_logits=True, init_weights=False, dropout=0.0)
    randomize(ref, seed=2)
    ours = netdsl.build(SPECS / "inception.net", "InceptionV3", target="torch", num_classes=10, dropout=0.0)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 299, 299)
    with torch.no_grad():
        y, yr = ours.train()(x), ref.train()(x)
    assert isinstance(y, tuple) and len(y) == 2 and y[1].shape == yr.aux_logits.shape == (2, 10)
    assert rel_err(y[0], yr.logits) < 1e-5 and rel_err(y[1], yr.aux_logits) < 1e-5
    theirs = ref.state_dict()
    assert all(rel_err(t, theirs[k]) < 1e-5 for k, t in ours.state_dict().items() if "running" in k)
