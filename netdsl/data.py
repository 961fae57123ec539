"""Datasets for `netdsl train`, all offline: scikit-learn's bundled 8×8
digits (the default), and MNIST / CIFAR-10 from a local folder in
torchvision's on-disk layout.  Nothing is ever downloaded.

Images are kept as uint8 or float tensors in memory and shaped per batch to
the network's input: channels (grey ↔ RGB), size (bilinear resize), the
course's augmentations, then normalisation by the training set's mean/std.
"""
from __future__ import annotations

import gzip
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


class DataError(ValueError):
    """A dataset that cannot be found or read; the message says what to do."""


@dataclass
class Split:
    images: torch.Tensor  # [N, C, H, W], float in [0, 1] or uint8
    labels: torch.Tensor  # [N] int64

    def __len__(self):
        return self.labels.shape[0]


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: int


def load(spec: str, seed: int = 0) -> Dataset:
    """`digits`, `mnist:DIR` or `cifar10:DIR`."""
    kind, _, where = spec.partition(":")
    if kind == "digits":
        if where:
            raise DataError("'digits' takes no folder: it is bundled with scikit-learn")
        return _digits(seed)
    if kind in ("mnist", "cifar10"):
        if not where:
            raise DataError(f"'{kind}' needs a folder: --data {kind}:DIR (torchvision's on-disk layout; "
                            "nothing is downloaded)")
        return _mnist(Path(where)) if kind == "mnist" else _cifar10(Path(where))
    raise DataError(f"unknown dataset '{spec}': use digits, mnist:DIR or cifar10:DIR")


def _digits(seed: int) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn: pip install 'netdsl[train]'") from None
    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(d.target, dtype=torch.int64)
    # a fixed, stratified 80/20 split: the same held-out set every run
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = math.floor(len(idx) * 0.8)
        train_idx.append(idx[:cut])
        test_idx.append(idx[cut:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    return Dataset("digits", Split(images[tr], labels[tr]), Split(images[te], labels[te]), 10)


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\0\0" or data[2] != 8:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return torch.frombuffer(bytearray(data[4 + 4 * dims:]), dtype=torch.uint8).reshape(shape)


def _find(root: Path, candidates, stem: str) -> Path:
    for base in candidates:
        for name in (stem, stem + ".gz"):
            if (base / name).exists():
                return base / name
    raise DataError(f"{root}: no {stem}[.gz] under {', '.join(str(c) for c in candidates)} "
                    "(expected torchvision's layout: DIR/MNIST/raw/...)")


def _mnist(root: Path) -> Dataset:
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    bases = [root / "MNIST" / "raw", root / "raw", root]
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(_find(root, bases, f"{prefix}-images-idx3-ubyte"))
        y = _read_idx(_find(root, bases, f"{prefix}-labels-idx1-ubyte"))
        parts[split] = Split(x.unsqueeze(1).contiguous(), y.to(torch.int64))
    return Dataset("mnist", parts["train"], parts["test"], 10)


def _cifar10(root: Path) -> Dataset:
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    if not (base / "test_batch").exists():
        raise DataError(f"{root}: no cifar-10-batches-py/test_batch (expected torchvision's layout)")

    def batch(name):
        # torchvision's format is Python pickles; these are the user's own files
        with open(base / name, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        x = torch.tensor(d["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32)
        return x, torch.tensor(d["labels"], dtype=torch.int64)

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    test = batch("test_batch")
    return Dataset("cifar10", Split(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])),
                   Split(*test), 10)


# ------------------------------------------------------------------ augmentation


@dataclass
class Augment:
    """The course's augmentations: flips, small and right-angle rotations,
    resize then random crop back to the input size, and Gaussian noise."""

    hflip: bool = False
    vflip: bool = False
    rotate: float = 0.0  # degrees, uniform in [-rotate, rotate]
    rot90: bool = False
    resize: int = 0  # resize to this (square) size, then crop (random in training) to the input size
    noise: float = 0.0  # standard deviation, on [0, 1] images

    @classmethod
    def parse(cls, text: str) -> Augment:
        """"hflip,vflip,rotate:15,rot90,crop:36,noise:0.05" ('crop:S' = resize to S, random crop back)."""
        a = cls()
        for item in filter(None, (t.strip() for t in (text or "").split(","))):
            key, _, val = item.partition(":")
            try:
                if key in ("hflip", "flip"):
                    a.hflip = True
                elif key == "vflip":
                    a.vflip = True
                elif key == "rot90":
                    a.rot90 = True
                elif key == "rotate":
                    a.rotate = float(val)
                elif key in ("crop", "resize"):
                    a.resize = int(val)
                elif key == "noise":
                    a.noise = float(val)
                else:
                    raise DataError(f"unknown augmentation '{key}' (hflip, vflip, rotate:DEG, rot90, crop:SIZE, noise:STD)")
            except ValueError as e:
                if isinstance(e, DataError):
                    raise
                raise DataError(f"augmentation '{item}': '{val}' is not a number") from None
        return a


def _rotate(x, degrees, g):
    n = x.shape[0]
    theta = (torch.rand(n, generator=g) * 2 - 1) * math.radians(degrees)
    return _affine(x, theta)


def _affine(x, theta):
    cos, sin = torch.cos(theta), torch.sin(theta)
    mat = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                       torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def prepare(images, input_shape, mean, std, augment: Augment | None, g: torch.Generator | None):
    """A batch of stored images -> the network's input, float32 [N, C, H, W]."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    C, H, W = input_shape
    if x.shape[1] != C:
        x = x.mean(1, keepdim=True) if C == 1 else x[:, :1].expand(-1, C, -1, -1) if x.shape[1] == 1 else None
        if x is None:
            raise DataError(f"cannot feed {images.shape[1]}-channel images to a {C}-channel network")
    train = augment is not None
    a = augment or Augment()
    size = (a.resize, a.resize) if a.resize else (H, W)
    if tuple(x.shape[2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=size[0] < x.shape[2])
    if train:
        n = x.shape[0]
        if a.hflip:
            flip = torch.rand(n, generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if a.vflip:
            flip = torch.rand(n, generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(2), x)
        if a.rotate:
            x = _rotate(x, a.rotate, g)
        if a.rot90:
            k = torch.randint(0, 4, (n,), generator=g)
            x = _affine(x, k.float() * (math.pi / 2))
    if tuple(x.shape[2:]) != (H, W):  # crop back to the input size: random in training, centred otherwise
        dh, dw = x.shape[2] - H, x.shape[3] - W
        if dh < 0 or dw < 0:
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        elif train:
            i = int(torch.randint(0, dh + 1, (1,), generator=g))
            j = int(torch.randint(0, dw + 1, (1,), generator=g))
            x = x[:, :, i:i + H, j:j + W]
        else:
            x = x[:, :, dh // 2:dh // 2 + H, dw // 2:dw // 2 + W]
    if train and a.noise:
        x = x + torch.randn(x.shape, generator=g) * a.noise
    return ((x - mean) / std).contiguous()


def batches(split: Split, batch_size: int, shuffle: bool, g: torch.Generator | None):
    n = len(split)
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield split.images[idx], split.labels[idx]


def stats(split: Split, channels: int):
    """Per-dataset mean and std (on [0, 1] images), broadcast to the network's channels."""
    x = split.images[: min(len(split), 10000)]
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True)
    mean = x.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6).view(1, -1, 1, 1)
    return mean.expand(1, channels, 1, 1), std.expand(1, channels, 1, 1)
