"""The spec zoo: exact parameter counts, output shapes and torchvision's keys."""
import pytest

from netdsl import check_file
from netdsl.report import state_keys, totals, to_json

from conftest import SPECS

COUNTS = {
    ("lenet.net", "LeNet5"): 61_706,
    ("alexnet.net", "AlexNet"): 61_100_840,
    ("vgg.net", "VGG11"): 132_863_336,
    ("vgg.net", "VGG13"): 133_047_848,
    ("vgg.net", "VGG16"): 138_357_544,
    ("vgg.net", "VGG19"): 143_667_240,
    ("vgg.net", "VGG11_BN"): 132_868_840,
    ("vgg.net", "VGG16_BN"): 138_365_992,
    ("googlenet.net", "GoogLeNet"): 6_624_904,
    ("resnet.net", "ResNet18"): 11_689_512,
    ("resnet.net", "ResNet34"): 21_797_672,
    ("resnet.net", "ResNet50"): 25_557_032,
    ("resnet.net", "ResNet101"): 44_549_160,
    ("resnet.net", "ResNet152"): 60_192_808,
    ("resnet.net", "ResNeXt50_32x4d"): 25_028_904,
    ("resnet.net", "WideResNet50_2"): 68_883_240,
    ("resnet.net", "CifarResNet"): 9_817_354,
    ("densenet.net", "DenseNet121"): 7_978_856,
    ("squeezenet.net", "SqueezeNet1_1"): 1_235_496,
    ("mobilenet.net", "MobileNetV2"): 3_504_872,
    ("mobilenet.net", "MobileNetV3Large"): 5_483_032,
    ("mobilenet.net", "MobileNetV3Small"): 2_542_856,
    ("mnasnet.net", "MNASNet1_0"): 4_383_312,
    ("efficientnet.net", "EfficientNetB0"): 5_288_548,
    ("efficientnet.net", "EfficientNetB7"): 66_347_960,
    ("regnet.net", "RegNetX_400MF"): 5_495_976,
    ("regnet.net", "RegNetY_400MF"): 4_344_144,
    ("convnext.net", "ConvNeXtTiny"): 28_589_128,
    ("shufflenet.net", "ShuffleNetV2_x1_0"): 2_278_604,
    ("segmentation.net", "UNet"): 31_037_698,
    ("segmentation.net", "DeepLabV3_ResNet50"): 39_638_869,
}

# The VGG paper's table 2 rounds to millions.
PAPER_MILLIONS = {"VGG_A": 133, "VGG_A_LRN": 133, "VGG_B": 133, "VGG_C": 134, "VGG_D": 138, "VGG_E": 144}

NETWORKS = {
    "lenet.net": ["LeNet5"],
    "alexnet.net": ["AlexNet"],
    "vgg.net": ["VGG_A", "VGG_A_LRN", "VGG_B", "VGG_C", "VGG_D", "VGG_E", "VGG11", "VGG13", "VGG16", "VGG19",
                "VGG11_BN", "VGG13_BN", "VGG16_BN", "VGG19_BN"],
    "googlenet.net": ["GoogLeNet"],
    "resnet.net": ["ResNet18", "ResNet34", "ResNet50", "ResNet101", "ResNet152", "ResNeXt50_32x4d", "WideResNet50_2",
                   "CifarResNet"],
    "densenet.net": ["DenseNet121"],
    "squeezenet.net": ["SqueezeNet1_1"],
    "mobilenet.net": ["MobileNetV2", "MobileNetV3Large", "MobileNetV3Small"],
    "mnasnet.net": ["MNASNet1_0"],
    "efficientnet.net": [f"EfficientNetB{b}" for b in range(8)],
    "regnet.net": ["RegNetX_400MF", "RegNetY_400MF"],
    "convnext.net": ["ConvNeXtTiny"],
    "shufflenet.net": ["ShuffleNetV2_x1_0"],
    "segmentation.net": ["UNet", "DeepLabV3_ResNet50"],
    "course.net": ["SequentialCNN", "TestNet", "BasicNet", "Net", "MyLinear", "Sharpen", "Blur", "EdgeDetect",
                   "Filters", "Slides"],
}


def one(file, net, **kw):
    res = check_file(SPECS / file, net, **kw)
    assert res.ok, res.diagnostics
    return res.nets[0]


@pytest.mark.parametrize("file", sorted(NETWORKS))
def test_every_spec_file_checks_and_has_exactly_these_networks(file):
    res = check_file(SPECS / file)
    assert res.ok, res.diagnostics
    assert [n.name for n in res.nets] == NETWORKS[file]


@pytest.mark.parametrize("file,net", sorted(COUNTS))
def test_parameter_counts(file, net):
    assert totals(one(file, net))["params"] == COUNTS[(file, net)]


@pytest.mark.parametrize("net", sorted(PAPER_MILLIONS))
def test_vgg_paper_configurations(net):
    assert round(totals(one("vgg.net", net))["params"] / 1e6) == PAPER_MILLIONS[net]


@pytest.mark.parametrize("file,net,shape", [
    ("lenet.net", "LeNet5", (10,)), ("alexnet.net", "AlexNet", (1000,)), ("vgg.net", "VGG16", (1000,)),
    ("googlenet.net", "GoogLeNet", (1000,)), ("resnet.net", "ResNet50", (1000,)),
    ("resnet.net", "CifarResNet", (10,)), ("densenet.net", "DenseNet121", (1000,)),
    ("squeezenet.net", "SqueezeNet1_1", (1000,)), ("mobilenet.net", "MobileNetV3Small", (1000,)),
    ("efficientnet.net", "EfficientNetB7", (1000,)),
    ("course.net", "SequentialCNN", (128, 6, 6)), ("course.net", "TestNet", (10,)), ("course.net", "Net", (2,)),
    ("course.net", "Sharpen", (1, 28, 28)), ("course.net", "Slides", (3, 42, 42)),
])
def test_output_shapes(file, net, shape):
    assert one(file, net).out_shape == shape


def _layer_shapes(net):
    return {r["name"]: tuple(r["output"]) for r in to_json(net)["layers"]}


def test_intermediate_shapes_follow_the_formula():
    s = _layer_shapes(one("resnet.net", "ResNet50"))
    assert s["conv1"] == (64, 112, 112)
    assert s["maxpool"] == (64, 56, 56)
    assert s["layer1.0.conv3"] == (256, 56, 56)
    assert s["layer2.0.conv2"] == (128, 28, 28)
    assert s["layer4.2.bn3"] == (2048, 7, 7)
    g = _layer_shapes(one("googlenet.net", "GoogLeNet"))
    assert g["maxpool1"] == (64, 56, 56)  # ceil_mode: 112 -> 56, not 55
    assert g["inception3a"] == (256, 28, 28)
    assert g["maxpool4"] == (832, 7, 7)
    c = _layer_shapes(one("resnet.net", "CifarResNet"))
    assert [c[f"blk{i}"] for i in range(1, 5)] == [(128, 5, 5), (256, 3, 3), (512, 2, 2), (512, 1, 1)]


def test_input_override_runs_resnet18_on_cifar_sizes():
    net = one("resnet.net", "ResNet18", input_shape=(3, 32, 32))
    assert _layer_shapes(net)["layer4.1.bn2"] == (512, 1, 1)
    assert net.out_shape == (1000,)


def test_parameter_override():
    net = one("resnet.net", "ResNet18", overrides={"num_classes": 10, "width": 16})
    assert net.out_shape == (10,)
    assert _layer_shapes(net)["layer4.1.bn2"] == (128, 7, 7)


def test_macs_of_resnet18_and_lenet():
    # conv: output elements × in/groups × kh × kw; linear: in × out (batch 1)
    assert totals(one("resnet.net", "ResNet18"))["macs"] == 1_814_073_344
    lenet = totals(one("lenet.net", "LeNet5"))["macs"]
    assert lenet == 6 * 28 * 28 * 25 + 16 * 10 * 10 * 6 * 25 + 400 * 120 + 120 * 84 + 84 * 10


def test_frozen_filters_are_counted_but_not_trainable():
    t = totals(one("course.net", "Filters"))
    assert t["params"] == 3 * 25 * 2 + 3 * 9 and t["trainable"] == 0


@pytest.mark.parametrize("file,net", [
    ("resnet.net", "ResNet18"), ("resnet.net", "ResNet50"), ("resnet.net", "ResNet152"),
    ("vgg.net", "VGG16"), ("vgg.net", "VGG11_BN"), ("alexnet.net", "AlexNet"),
    ("googlenet.net", "GoogLeNet"), ("densenet.net", "DenseNet121"),
])
def test_state_dict_keys_and_shapes_match_torchvision(file, net):
    import torch
    from tv_reference import reference

    with torch.device("meta"):  # layouts only: no memory, no initialisation
        ref = reference(net).state_dict()
    ours = one(file, net)
    assert state_keys(ours) == list(ref)
    from netdsl import ir

    shapes = {t.key(l.name): t.shape for l in ir.walk_layers(ours.body) for t in l.tensors}
    assert shapes == {k: tuple(v.shape) for k, v in ref.items()}


def test_course_keys():
    assert state_keys(one("course.net", "Net")) == ["net.0.net.weight", "net.0.net.bias", "net.2.weight", "net.2.bias"]
    assert state_keys(one("course.net", "BasicNet")) == ["net.weight", "net.bias"]
    assert state_keys(one("course.net", "TestNet")) == ["net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias"]
    keys = state_keys(one("resnet.net", "CifarResNet"))
    assert "blk1.extra.0.weight" in keys and "blk1.extra.1.running_var" in keys and "outlayer.bias" in keys
