"""Plain-torch rebuilds of torchvision's module layouts, for the older zoo's
key tests (the newer networks are compared with torchvision's own model
files: tests/tv_models.py).  They reproduce torchvision's
attribute names and layer order, so their state_dict keys, tensor shapes and
parameter counts are what a torchvision checkpoint holds."""
from collections import OrderedDict

import torch.nn as nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, n in enumerate(layers):
            setattr(self, f"layer{i + 1}", self._make_layer(block, 64 * 2 ** i, n, 1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)


def resnet(name):
    cfg = {"ResNet18": (BasicBlock, [2, 2, 2, 2]), "ResNet34": (BasicBlock, [3, 4, 6, 3]),
           "ResNet50": (Bottleneck, [3, 4, 6, 3]), "ResNet101": (Bottleneck, [3, 4, 23, 3]),
           "ResNet152": (Bottleneck, [3, 8, 36, 3])}[name]
    return ResNet(*cfg)


VGG_CFGS = {
    "VGG11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "VGG13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "VGG16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "VGG19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def vgg(name):
    bn = name.endswith("_BN")
    cfg = VGG_CFGS[name.replace("_BN", "")]
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers.append(nn.Conv2d(c, v, 3, padding=1))
            if bn:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(True))
            c = v
    m = nn.Module()
    m.features = nn.Sequential(*layers)
    m.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    m.classifier = nn.Sequential(nn.Linear(512 * 49, 4096), nn.ReLU(True), nn.Dropout(),
                                 nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 1000))
    return m


def alexnet():
    m = nn.Module()
    m.features = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(3, 2))
    m.avgpool = nn.AdaptiveAvgPool2d((6, 6))
    m.classifier = nn.Sequential(nn.Dropout(), nn.Linear(256 * 36, 4096), nn.ReLU(True), nn.Dropout(),
                                 nn.Linear(4096, 4096), nn.ReLU(True), nn.Linear(4096, 1000))
    return m


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)


class Inception(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, pp):
        super().__init__()
        self.branch1 = BasicConv2d(cin, c1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, c3r, kernel_size=1), BasicConv2d(c3r, c3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, c5r, kernel_size=1), BasicConv2d(c5r, c5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), BasicConv2d(cin, pp, kernel_size=1))


def googlenet():
    m = nn.Module()
    m.conv1 = BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
    m.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
    m.conv2 = BasicConv2d(64, 64, kernel_size=1)
    m.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
    m.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
    m.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
    m.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
    m.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
    m.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
    m.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
    m.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
    m.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
    m.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
    m.maxpool4 = nn.MaxPool2d(2, 2, ceil_mode=True)
    m.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
    m.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
    m.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    m.dropout = nn.Dropout(0.2)
    m.fc = nn.Linear(1024, 1000)
    return m


def densenet121():
    growth, bn_size, c = 32, 4, 64
    feats = OrderedDict([("conv0", nn.Conv2d(3, 64, 7, 2, 3, bias=False)), ("norm0", nn.BatchNorm2d(64)),
                         ("relu0", nn.ReLU(True)), ("pool0", nn.MaxPool2d(3, 2, 1))])
    for i, n in enumerate((6, 12, 24, 16)):
        block = nn.Module()
        for j in range(n):
            layer = nn.Module()
            layer.norm1 = nn.BatchNorm2d(c + j * growth)
            layer.relu1 = nn.ReLU(True)
            layer.conv1 = nn.Conv2d(c + j * growth, bn_size * growth, 1, bias=False)
            layer.norm2 = nn.BatchNorm2d(bn_size * growth)
            layer.relu2 = nn.ReLU(True)
            layer.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)
            block.add_module(f"denselayer{j + 1}", layer)
        feats[f"denseblock{i + 1}"] = block
        c += n * growth
        if i != 3:
            t = nn.Module()
            t.norm = nn.BatchNorm2d(c)
            t.relu = nn.ReLU(True)
            t.conv = nn.Conv2d(c, c // 2, 1, bias=False)
            t.pool = nn.AvgPool2d(2, 2)
            feats[f"transition{i + 1}"] = t
            c //= 2
    feats["norm5"] = nn.BatchNorm2d(c)
    m = nn.Module()
    m.features = nn.Sequential(feats)
    m.classifier = nn.Linear(c, 1000)
    return m


def reference(name):
    if name.startswith("ResNet"):
        return resnet(name)
    if name.startswith("VGG"):
        return vgg(name)
    return {"AlexNet": alexnet, "GoogLeNet": googlenet, "DenseNet121": densenet121}[name]()
