"""`netdsl train`: real data offline, checkpoints, resume, --json, errors;
and LeNet-5 learning the digits through the Triton kernels."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from netdsl import data as D

ROOT = Path(__file__).resolve().parent.parent
TINY = "net Tiny input(1, 12, 12) {\n    conv(4, 3) -> bn -> relu -> maxpool(2) -> flatten -> linear(10)\n}\n"


def _train(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "netdsl", "train", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True)


def test_digits_split_is_fixed_stratified_and_real():
    ds = D.load("digits")
    assert len(ds.train) + len(ds.test) == 1797 and ds.classes == 10
    assert len(ds.test) == 364
    assert torch.equal(D.load("digits").test.labels, ds.test.labels)  # the same held-out set every run
    assert torch.bincount(ds.test.labels).min() >= 35
    assert ds.train.images.std() > 0.3  # real images, not zeros


def test_prepare_resizes_channels_and_augments():
    ds = D.load("digits")
    imgs = ds.train.images[:8]
    mean, std = D.stats(ds.train, 3)
    x = D.prepare(imgs, (3, 32, 32), mean, std, None, None)
    assert x.shape == (8, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])
    aug = D.Augment.parse("hflip,vflip,rotate:15,rot90,crop:36,noise:0.05")
    assert (aug.hflip, aug.vflip, aug.rotate, aug.rot90, aug.resize, aug.noise) == (True, True, 15.0, True, 36, 0.05)
    g = torch.Generator().manual_seed(0)
    y = D.prepare(imgs, (3, 32, 32), mean, std, aug, g)
    assert y.shape == x.shape and not torch.allclose(x, y)
    with pytest.raises(D.DataError, match="unknown augmentation 'blur'"):
        D.Augment.parse("hflip,blur")


def test_mnist_and_cifar_folders_in_torchvision_layout(tmp_path):
    import gzip
    import pickle

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 6), ("t10k", 4)):
        imgs = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            b"\0\0\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)) + imgs.numpy().tobytes())
        with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(b"\0\0\x08\x01" + n.to_bytes(4, "big") + bytes(range(n)))
    ds = D.load(f"mnist:{tmp_path}")
    assert ds.train.images.shape == (6, 1, 28, 28) and ds.test.labels.tolist() == [0, 1, 2, 3]
    cifar = tmp_path / "c" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(cifar / name, "wb") as f:
            pickle.dump({"data": torch.randint(0, 256, (3, 3072), dtype=torch.uint8).numpy(), "labels": [1, 2, 3]}, f)
    ds = D.load(f"cifar10:{tmp_path / 'c'}")
    assert ds.train.images.shape == (15, 3, 32, 32) and len(ds.test) == 3
    with pytest.raises(D.DataError, match="no such folder"):
        D.load(f"mnist:{tmp_path / 'nowhere'}")


def test_train_checkpoint_resume_and_json(tmp_path):
    spec = tmp_path / "tiny.net"
    spec.write_text(TINY)
    ckpt = tmp_path / "tiny.pt"
    p = _train(spec, "--net", "Tiny", "--epochs", 1, "--limit", 96, "--batch-size", 48, "--out", ckpt, "--json",
               "--augment", "noise:0.05", "--optimizer", "adam")
    assert p.returncode == 0, p.stderr
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(last) == {"epoch", "loss", "accuracy", "seconds"} and last["epoch"] == 1
    assert 0.0 <= last["accuracy"] <= 1.0 and last["loss"] > 0
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1 and {"model", "optimizer"} <= set(state)
    p = _train(spec, "--net", "Tiny", "--epochs", 2, "--limit", 96, "--batch-size", 48, "--resume", ckpt,
               "--out", ckpt, "--json", "--optimizer", "adam")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["epoch"] == 2
    assert "epoch 1:" not in p.stderr and "epoch 2:" in p.stderr  # resumed, not restarted
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2


def test_auxiliary_logits_add_to_the_loss_at_0_4():
    """A network that returns (logits, auxiliary logits) in training: the loss is torchvision's reference
    training's for Inception-v3."""
    from netdsl.train import _loss

    torch.manual_seed(0)
    logits, aux, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    out, loss = _loss((logits, aux), y)
    assert out is logits
    ce = torch.nn.functional.cross_entropy
    assert torch.allclose(loss, ce(logits, y) + 0.4 * ce(aux, y))
    assert torch.equal(_loss(logits, y)[1], ce(logits, y))


def test_a_network_returning_a_dict_is_not_trained(tmp_path):
    spec = tmp_path / "pyramid.net"
    spec.write_text("net P input(1, 12, 12) {\n  conv(4, 3) -> as @a\n  maxpool(2) -> as @b\n"
                    "  return \"a\": @a, \"b\": @b\n}\n")
    p = _train(spec, "--net", "P", "--epochs", 1, "--limit", 8)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "P returns a dict in eval mode; netdsl train trains a classifier that returns its logits" in p.stderr


@pytest.mark.parametrize("args,message", [
    (["--data", "imagenet"], "unknown dataset 'imagenet'"),
    (["--data", "mnist"], "'mnist' needs a folder"),
    (["--data", "cifar10:/nonexistent"], "no cifar-10-batches-py/test_batch"),
    (["--set", "num_classes=5"], "has 5 outputs but digits has 10 classes"),
    (["--resume", "/nonexistent.pt"], "cannot read the checkpoint"),
])
def test_train_errors_are_one_line_and_exit_2(args, message):
    p = _train("specs/lenet.net", "--net", "LeNet5", "--epochs", 1, *args)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_lenet5_learns_the_digits_through_triton_kernels():
    """The README's figure: LeNet-5, 2 epochs of Adam on the bundled digits,
    on the CPU through Triton's interpreter, passes 90% held-out accuracy."""
    p = _train("specs/lenet.net", "--net", "LeNet5", "--optimizer", "adam", "--lr", "0.003", "--batch-size", 32,
               "--epochs", 2, "--json")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["accuracy"] > 0.9, result


@pytest.mark.slow
def test_two_processes_under_torchrun_with_sync_bn_train_as_one(tmp_path):
    """`torchrun --nproc_per_node=2 -m netdsl train --sync-bn`: each process trains half of every batch, and
    the checkpoint is one process's on the whole batches (fp32 rounding apart); without --sync-bn each
    process's batch norm normalises its half, and the running statistics differ."""
    spec = tmp_path / "tiny.net"
    spec.write_text(TINY)
    common = ["--net", "Tiny", "--epochs", 1, "--limit", 64, "--batch-size", 16, "--device", "cpu", "--json"]
    one = _train(spec, *common, "--out", tmp_path / "one.pt")
    assert one.returncode == 0, one.stderr
    runs = {}
    for flag in ("--sync-bn", None):
        out = tmp_path / f"two{flag or ''}.pt"
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "netdsl", "train", str(spec), *map(str, common), "--out", str(out)]
                           + ([flag] if flag else []), cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert len(p.stdout.strip().splitlines()) == 1  # (process 0 reports)
        runs[flag] = torch.load(out, weights_only=True)["model"]
    single = torch.load(tmp_path / "one.pt", weights_only=True)["model"]
    for k, v in single.items():
        assert torch.allclose(runs["--sync-bn"][k].double(), v.double(), rtol=1e-5, atol=1e-6), k
    assert not torch.allclose(runs[None]["1.running_var"], single["1.running_var"], rtol=1e-3)
