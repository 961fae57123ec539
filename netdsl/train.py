"""`netdsl train`: train a compiled network on real data, offline.

The model is the generated Triton module (every forward and backward op a
Triton kernel; on a CPU, Triton's interpreter).  The loss (cross-entropy),
the optimizer step and the data pipeline are plain PyTorch.

Under torchrun (`torchrun --nproc_per_node=N -m netdsl train ...`) each
process trains a share of every batch, its gradients averaged with the
others' (DistributedDataParallel over nccl on CUDA; one all-reduce a step
over gloo on the CPU, where DDP refuses SyncBatchNorm layers): every process draws the same batches and
augmentations, and takes its contiguous share, so the processes together
take the steps one process would take on the whole batch (exactly so with
`--sync-bn`, whose batch norms normalise by the whole batch's statistics;
without it each process's batch norms see its share only).  Process 0
reports and writes the checkpoint.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import data as D


class TrainError(ValueError):
    """A training setup that cannot work (a bad checkpoint, a class count mismatch)."""


@dataclass
class Options:
    file: str
    net: str
    data: str = "digits"
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None  # default: 0.05 for SGD, 1e-3 for Adam
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    out: str | None = None
    resume: str | None = None
    augment: str = ""
    device: str | None = None
    seed: int = 0
    limit: int = 0  # use only this many training examples (quick runs)
    overrides: dict = field(default_factory=dict)
    progress: bool = True
    sync_bn: bool = False  # batch norms synchronised over the processes torchrun starts


@dataclass
class EpochResult:
    epoch: int
    loss: float
    train_accuracy: float
    accuracy: float
    seconds: float


def _optimizer(opts: Options, params):
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=opts.lr if opts.lr is not None else 0.05, momentum=opts.momentum,
                               weight_decay=opts.weight_decay)
    if opts.optimizer == "adam":
        return torch.optim.Adam(params, lr=opts.lr if opts.lr is not None else 1e-3, weight_decay=opts.weight_decay)
    raise TrainError(f"unknown optimizer '{opts.optimizer}' (sgd or adam)")


def evaluate(model, split: D.Split, input_shape, mean, std, batch_size, device, group=None) -> float:
    """Accuracy (0-1) on a split; inference mode, so no autograd bookkeeping.
    group (a _Group): each process counts its share of the split."""
    model.eval()
    n = len(split)
    lo, hi = group.share(n) if group else (0, n)
    correct = 0
    with torch.inference_mode():
        for images, labels in D.batches(D.Split(split.images[lo:hi], split.labels[lo:hi]), batch_size, False, None):
            x = D.prepare(images, input_shape, mean, std, None, None).to(device)
            correct += (model(x).argmax(1).cpu() == labels).sum().item()
    if group:
        correct = group.sum([correct])[0]
    return correct / max(1, n)


class _Group:
    """The processes torchrun started (WORLD_SIZE > 1), each training a share of every batch."""

    def __init__(self, device_type: str):
        import os

        import torch.distributed as dist

        self.dist = dist
        self.started = not dist.is_initialized()
        if self.started:
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))

    @staticmethod
    def wanted() -> bool:
        import os

        return int(os.environ.get("WORLD_SIZE", "1")) > 1

    def share(self, n: int) -> tuple[int, int]:
        """This process's contiguous share [lo, hi) of n items (the first n % world take one more)."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)

    def sum(self, values) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        self.dist.all_reduce(t)
        return t.tolist()

    def average_grads(self, model):
        """What DistributedDataParallel does on GPUs, here on the CPU, where it refuses SyncBatchNorm layers:
        each gradient averaged over the processes (one all-reduce of them all)."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.dist.all_reduce(flat)
        flat /= self.world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def close(self):
        self.dist.barrier()
        if self.started:
            self.dist.destroy_process_group()


class _Progress:
    """A rich progress bar on a terminal (or when forced); silent otherwise."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}"),
                                TimeRemainingColumn(), transient=False)

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def task(self, description, total):
        return self.bar.add_task(description, total=total, loss=0.0, acc=0.0) if self.bar else None

    def update(self, task, **fields):
        if self.bar:
            self.bar.update(task, advance=1, **fields)

    def print(self, text):
        if self.bar:
            self.bar.console.print(text)
        else:
            print(text, file=sys.stderr)


def train(opts: Options, log=print) -> EpochResult:
    from . import build

    torch.manual_seed(opts.seed)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    group = _Group(device.type) if _Group.wanted() else None
    try:
        return _train(opts, log, build, device, group)
    finally:
        if group:
            group.close()


def _train(opts: Options, log, build, device, group) -> EpochResult:
    if group and device.type == "cuda":
        device = torch.device("cuda", group.local_rank)
        torch.cuda.set_device(device)
    dataset = D.load(opts.data, seed=opts.seed)
    model = build(opts.file, opts.net, sync_bn=opts.sync_bn, **opts.overrides).to(device)
    input_shape = tuple(model.input_shape)
    if len(input_shape) != 3:
        raise TrainError(f"{opts.net} takes [N, {input_shape[0]}] features; training needs an image network [N, C, H, W]")
    out_features = _out_features(model, input_shape, device, opts.net)
    if out_features < dataset.classes:
        raise TrainError(f"{opts.net} has {out_features} outputs but {dataset.name} has {dataset.classes} classes "
                         f"(set the class count, e.g. --set num_classes={dataset.classes})")
    train_split = dataset.train
    if opts.limit:
        train_split = D.Split(train_split.images[:opts.limit], train_split.labels[:opts.limit])
    mean, std = D.stats(train_split, input_shape[0])
    augment = D.Augment.parse(opts.augment)
    optimizer = _optimizer(opts, [p for p in model.parameters() if p.requires_grad])
    start = 0
    if opts.resume:
        start = _load_checkpoint(opts.resume, model, optimizer, opts.net)
    if device.type == "cuda":  # the kernels of a step and of evaluation, compiled in parallel, not one by one
        _precompile(model, torch.empty(min(opts.batch_size, len(train_split)), *input_shape, device=device))
    stepper = model
    if group and device.type == "cuda":
        stepper = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device])
    world = group.world if group else 1
    g = torch.Generator().manual_seed(opts.seed * 1000 + start)
    t0 = time.perf_counter()
    result = None
    steps = -(-len(train_split) // opts.batch_size)
    with _Progress(opts.progress and not (group and group.rank)) as progress:
        for epoch in range(start + 1, opts.epochs + 1):
            model.train()
            task = progress.task(f"epoch {epoch}/{opts.epochs}", steps)
            total_loss = total_correct = seen = 0
            for images, labels in D.batches(train_split, opts.batch_size, True, g):
                if len(labels) < 2 * world and _has_bn(model):  # BN needs two samples per channel (a process)
                    continue
                # (every process draws the whole batch and its augmentation, so all draw alike, and takes its share)
                x = D.prepare(images, input_shape, mean, std, augment, g)
                lo, hi = group.share(len(labels)) if group else (0, len(labels))
                x, y = x[lo:hi].to(device), labels[lo:hi].to(device)
                optimizer.zero_grad(set_to_none=True)
                logits, loss = _loss(stepper(x), y)
                # the processes' gradients are averaged: weigh each share's mean loss by its size
                (loss * (len(y) * world / len(labels))).backward()
                if group and stepper is model:
                    group.average_grads(model)
                optimizer.step()
                n = len(y)
                total_loss += loss.item() * n
                total_correct += (logits.argmax(1) == y).sum().item()
                seen += n
                progress.update(task, loss=total_loss / seen, acc=total_correct / seen)
            if group:
                total_loss, total_correct, seen = group.sum([total_loss, total_correct, seen])
            accuracy = evaluate(model, dataset.test, input_shape, mean, std, opts.batch_size, device, group)
            result = EpochResult(epoch, total_loss / max(1, seen), total_correct / max(1, seen), accuracy,
                                 time.perf_counter() - t0)
            if not (group and group.rank):
                progress.print(f"epoch {epoch}: loss {result.loss:.4f}, train accuracy {result.train_accuracy:.3f}, "
                               f"held-out accuracy {accuracy:.3f} ({len(dataset.test)} {dataset.name} examples), "
                               f"{result.seconds:.1f} s")
            if opts.out and not (group and group.rank):
                _save_checkpoint(opts.out, model, optimizer, epoch, opts)
    if result is None:  # resumed at or past the last epoch: report where it stands
        accuracy = evaluate(model, dataset.test, input_shape, mean, std, opts.batch_size, device, group)
        result = EpochResult(start, float("nan"), float("nan"), accuracy, time.perf_counter() - t0)
    return result


def reporting_process() -> bool:
    """False in the processes torchrun started but the first (they print nothing)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _precompile(model, x):
    from .parallel_compile import precompile

    try:
        precompile(model, x, train=True)
        precompile(model, x, train=False)
    except Exception as e:  # a speed-up only: the first step compiles what is missing, and raises what is wrong
        warnings.warn(f"netdsl: compiling the kernels ahead failed ({type(e).__name__}: {e}); "
                      "the first step compiles them one by one")


def _has_bn(model) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _loss(out, y):
    """(logits, loss): a classifier's cross-entropy; a network that returns auxiliary logits in training
    (Inception-v3's `return @logits, @aux if training`) adds theirs at 0.4, as torchvision's reference
    training does."""
    if isinstance(out, torch.Tensor):
        return out, F.cross_entropy(out, y)
    logits, *aux = out
    return logits, F.cross_entropy(logits, y) + sum(0.4 * F.cross_entropy(a, y) for a in aux)


def _out_features(model, input_shape, device, net) -> int:
    from .runtime import plan_launches

    with torch.no_grad(), plan_launches():  # shapes only: no kernel runs
        model.eval()
        out = model(torch.empty(2, *input_shape, device=device))
    if not isinstance(out, torch.Tensor):
        raise TrainError(f"{net} returns {'a dict' if isinstance(out, dict) else 'a tuple'} in eval mode; "
                         "netdsl train trains a classifier that returns its logits")
    return out.shape[1]


def _save_checkpoint(path, model, optimizer, epoch, opts: Options):
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "net": opts.net, "file": opts.file, "optimizer_name": opts.optimizer}
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    import os

    os.replace(tmp, path)


def _load_checkpoint(path, model, optimizer, net) -> int:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise TrainError(f"{path}: cannot read the checkpoint ({e})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise TrainError(f"{path}: not a netdsl training checkpoint (no 'model' entry)")
    if state.get("net") not in (None, net):
        raise TrainError(f"{path}: a checkpoint of {state['net']}, not {net}")
    try:
        model.load_state_dict(state["model"])
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as e:
        raise TrainError(f"{path}: does not fit {net}: {str(e).splitlines()[0]}") from None
    return int(state.get("epoch", 0))


def result_json(r: EpochResult) -> str:
    return json.dumps({"epoch": r.epoch, "loss": r.loss, "accuracy": r.accuracy, "seconds": round(r.seconds, 3)})
