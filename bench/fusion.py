"""Fusion figures: kernel launches and device-memory bytes per forward pass,
netdsl's plan against eager PyTorch running the --target torch twin.

    python bench/fusion.py [--batch B] [--breakdown NET] [--net NET ...] [--disable FUSION ...]

Eval figures are the compiler's kernel plan (`netdsl plan`: nothing runs),
in the steady state: batch-norm folds run on the first call after a
parameter changes, and are left out.  Train-mode forwards and training steps
are counted by planning a run (no kernel runs; the tile sizes are a GPU's).  Its bytes are each launch's distinct tensor
operands (reads and writes, weights included).  Eager's compute ops and bytes
are counted with a torch dispatch mode over the twin's forward (each op's
tensor inputs and outputs).  Both are estimates from tensor sizes: caches are
ignored.  A training step's netdsl figure is launches + the torch ops of
autograd's own engine (gradient sums where a tensor feeds two layers).
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import netdsl  # noqa: E402
from netdsl import runtime as rt  # noqa: E402
from netdsl.compiler import checked_net  # noqa: E402
from netdsl.plan import cost as plan_cost, inference_plan  # noqa: E402

NETS = [("resnet.net", "ResNet18"), ("resnet.net", "ResNet50"), ("vgg.net", "VGG16"),
        ("googlenet.net", "GoogLeNet"), ("densenet.net", "DenseNet121"), ("mobilenet.net", "MobileNetV3Large"),
        ("efficientnet.net", "EfficientNetB0"), ("shufflenet.net", "ShuffleNetV2_x1_0"),
        ("convnext.net", "ConvNeXtTiny")]
FREE = plan_cost.FREE  # allocations and views


def nbytes(t):
    if isinstance(t, rt.TensorInfo):
        return t.nbytes
    return rt.distinct_bytes(t) if isinstance(t, torch.Tensor) else 0


def distinct_tensors(values):
    seen = {}
    for v in values:
        if isinstance(v, rt.TensorInfo):  # (a tuple itself: first)
            seen[(v.data_ptr, v.shape, v.stride)] = v
        elif isinstance(v, (list, tuple)):
            for x in distinct_tensors(v):
                seen[id(x)] = x
        elif isinstance(v, torch.Tensor):
            seen[(v.data_ptr(), tuple(v.shape), tuple(v.stride()))] = v
    return list(seen.values())


def launch_bytes(kernel, args, meta):
    """A launch's distinct tensor operands.  A conv's backward launch
    (conv_backward: its dgrad's and wgrad's programs in one grid) counts each
    part that runs on its own: both read dy, so it moves twice.  A weight
    gradient that rides in the dgrad (WGRAD_ADD) is one of the dgrad's
    operands, counted once as the weights its programs all read are: its
    atomic adds, ⌈M/BLOCK_M⌉ · |dW| in all, land in L2 (wgrad_rides weighs
    them against the reads they save); zeroing it is an op the step's
    dispatch count sees."""
    if not kernel.fn.__name__.startswith("conv_backward"):
        return sum(nbytes(t) for t in distinct_tensors(args))
    named = list(zip(kernel.arg_names, args))  # (its pointers, sizes and strides come before its constexprs)
    return sum(sum(nbytes(t) for t in distinct_tensors([a for n, a in named if n.startswith(prefix)]))
               for flag, prefix in (("DGRAD", "d_"), ("WGRAD", "w_")) if meta[flag])


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__ not in FREE:
            self.ops += 1
            self.bytes += sum(nbytes(t) for t in distinct_tensors(list(args) + list((kwargs or {}).values()) + [out]))
        return out


def netdsl_forward(model, x):
    """A train-mode forward, recorded without running: (launches, bytes)."""
    with torch.no_grad(), rt.plan_launches() as plan:
        model(x)
    return len(plan), sum(launch_bytes(*p) for p in plan)


def eager(model, x):
    with torch.no_grad(), Count() as c:
        model(x)
    return c.ops, c.bytes


def _step(model, x, seed):
    model(x).backward(seed)  # as in training: the input itself needs no gradient
    model.zero_grad(set_to_none=True)


def netdsl_step(model, x):
    """A training step (forward and backward, train mode): our launches, plus
    any torch op autograd's engine itself runs, counted by dispatch."""
    seed = torch.ones(x.shape[0], 1000)
    with rt.plan_launches() as plan, Count() as engine:
        _step(model, x, seed)
    return len(plan), engine.ops, sum(launch_bytes(*p) for p in plan) + engine.bytes


def step_breakdown(model, x):
    """A training step's launches and bytes by kernel (the name before "__"), forward and backward apart."""
    seed = torch.ones(x.shape[0], 1000)
    model.train()
    with rt.plan_launches() as plan:
        y = model(x)
        n_forward = len(plan)
        y.backward(seed)
    model.zero_grad(set_to_none=True)
    rows = {}
    for i, (kernel, args, meta) in enumerate(plan):
        key = ("forward" if i < n_forward else "backward", kernel.fn.__name__.split("__")[0])
        count, total = rows.get(key, (0, 0))
        rows[key] = (count + 1, total + launch_bytes(kernel, args, meta))
    return sorted(rows.items(), key=lambda kv: (kv[0][0] != "forward", -kv[1][1]))


def eager_step(model, x):
    seed = torch.ones(x.shape[0], 1000)
    with Count() as c:
        _step(model, x, seed)
    return c.ops, c.bytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--breakdown", metavar="NET", help="one network's training step by kernel (e.g. ResNet50)")
    ap.add_argument("--net", action="append", metavar="NET", help="only these networks (repeatable)")
    ap.add_argument("--disable", action="append", default=[], metavar="FUSION",
                    help="compile without this fusion (netdsl compile --disable; repeatable)")
    args = ap.parse_args()
    if args.breakdown:
        file = next(f for f, n in NETS if n == args.breakdown)
        rows = step_breakdown(netdsl.build(str(ROOT / "specs" / file), args.breakdown),
                              torch.randn(args.batch, 3, 224, 224))
        print(f"{args.breakdown} training step, batch {args.batch}, fp32: launches and MB by kernel")
        for (phase, name), (count, total) in rows:
            print(f"{phase:9} {name:28} {count:5d} {total / 1e6:10.1f}")
        return
    print(f"batch {args.batch}, fp32, 3×224×224 inputs; forward passes, and training steps (forward + backward)")
    print(f"{'network':16} {'mode':5} {'netdsl launches':>15} {'eager ops':>9} {'ratio':>6} "
          f"{'netdsl MB':>10} {'eager MB':>10} {'ratio':>6}")
    for file, name in NETS:
        if args.net and name not in args.net:
            continue
        tri = netdsl.build(str(ROOT / "specs" / file), name, disable=args.disable)
        ref = netdsl.build(str(ROOT / "specs" / file), name, target="torch")
        x = torch.randn(args.batch, 3, 224, 224)
        net = checked_net(str(ROOT / "specs" / file), name)
        for mode in ("eval", "train"):
            tri.train(mode == "train")
            ref.train(mode == "train")
            if mode == "eval":  # the compiler's plan, and eager's ops traced on the meta device
                fig = plan_cost.launches(inference_plan(net, frozenset(args.disable)), args.batch)
                (launches, nb), (ops, eb) = (len(fig.launches), fig.total_bytes), plan_cost.eager(net, args.batch)
            else:
                launches, nb = netdsl_forward(tri, x)
                ops, eb = eager(ref, x)
            print(f"{name:16} {mode:5} {launches:15d} {ops:9d} {launches / ops:6.2f} "
                  f"{nb / 1e6:10.1f} {eb / 1e6:10.1f} {nb / eb:6.2f}")
        tri.train()
        ref.train()
        launches, engine_ops, nb = netdsl_step(tri, x)
        ops, eb = eager_step(ref, x)
        print(f"{name:16} {'step':5} {f'{launches}+{engine_ops}':>15} {ops:9d} {(launches + engine_ops) / ops:6.2f} "
              f"{nb / 1e6:10.1f} {eb / 1e6:10.1f} {nb / eb:6.2f}")


if __name__ == "__main__":
    main()
