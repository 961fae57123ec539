"""The `netdsl` command.  Bad input gives `file:line:col: error: ...`, the
line, a caret, and exit status 2 -- never a traceback."""
from __future__ import annotations

import argparse
import json
import sys

from .diagnostics import NetdslError, render_all
from .switches import SWITCHES, SwitchError

EXIT_OK, EXIT_INVALID, EXIT_INTERNAL = 0, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: same shape, status 2
        self.print_usage(sys.stderr)
        sys.stderr.write(f"netdsl: error: {message}\n")
        raise SystemExit(EXIT_INVALID)


def _input_shape(text: str):
    try:
        dims = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W or F as integers, got '{text}'") from None
    if len(dims) not in (1, 3) or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W or F as positive integers, got '{text}'")
    return dims


def parse_value(text: str):
    """A --set value: a number, true/false, a quoted string or a list of those."""
    from . import ir
    from .expr import EvalError, evaluate
    from .parser import parse

    try:
        prog = parse(f"net _ input({text}) {{ }}", "--set")
        args = prog.nets[0].input
        if len(args) != 1 or args[0].name is not None:
            raise ValueError
        expr = args[0].value

        def literal(e):
            if isinstance(e, (ir.Name, ir.Func, ir.Index)):
                raise ValueError
            for v in vars(e).values():
                for x in v if isinstance(v, tuple) else (v,):
                    if isinstance(x, (ir.Const, ir.Name, ir.Unary, ir.Binary, ir.TupleExpr, ir.ListExpr, ir.Index, ir.Func)):
                        literal(x)

        literal(expr)
        return evaluate(expr, {})
    except (NetdslError, ValueError, EvalError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a value (a number, true/false, \"text\" or [list])") from None


def _assignment(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected name=value, got '{text}'")
    name, value = text.split("=", 1)
    return name.strip(), parse_value(value.strip())


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="netdsl", description="Compile declarative CNN specs into fused Triton kernels.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("check", help="check shapes and print per-layer shapes, parameters and MACs")
    c.add_argument("file")
    c.add_argument("--net", help="only this network")
    c.add_argument("--input", type=_input_shape, metavar="C,H,W", help="override the declared input shape")
    c.add_argument("--set", type=_assignment, action="append", default=[], metavar="NAME=VALUE",
                   help="override a network parameter (repeatable)")
    c.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    k = sub.add_parser("compile", help="generate a Python module: Triton kernels and nn.Modules")
    k.add_argument("file")
    k.add_argument("--net", help="only this network")
    k.add_argument("--set", type=_assignment, action="append", default=[], metavar="NAME=VALUE",
                   help="override a network parameter (repeatable)")
    k.add_argument("--target", choices=("triton", "torch"), default="triton",
                   help="triton (default): fused Triton kernels; torch: the same network in plain PyTorch")
    k.add_argument("-o", "--output", metavar="OUT.py", help="where to write (default: FILE's name with .py, here)")
    k.add_argument("--report", action="store_true",
                   help="compile every kernel for sm_90 and sm_80 and print registers, spills, shared memory, warps, stages")
    k.add_argument("--batch", type=int, default=32, help="batch size the --report launches are planned for (default 32)")
    k.add_argument("--tuned", action="store_true",
                   help="bake in the launch configurations `netdsl tune` saved for these kernels (every device)")
    k.add_argument("--disable", action="append", default=[], metavar="NAME",
                   help="compile without this fusion (repeatable): " + ", ".join(SWITCHES))
    q = sub.add_parser("plan", help="print a network's kernel plan: each launch, what it fuses and the bytes it moves, "
                                    "against eager PyTorch (nothing runs)")
    q.add_argument("file")
    q.add_argument("--net", required=True, help="the network to plan")
    q.add_argument("--batch", type=_positive, default=32, help="batch size the bytes are counted at (default 32)")
    q.add_argument("--input", type=_input_shape, metavar="C,H,W", help="input shape (default: the net's own)")
    q.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the tensors' dtype (default fp32)")
    q.add_argument("--disable", action="append", default=[], metavar="NAME",
                   help="plan without this fusion (repeatable): " + ", ".join(SWITCHES))
    q.add_argument("--set", type=_assignment, action="append", default=[], metavar="NAME=VALUE",
                   help="override a network parameter (repeatable)")
    q.add_argument("--train", action="store_true", help="a training step's plan (not made by the compiler yet)")
    q.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    u = sub.add_parser("tune", help="time launch configurations of a network's conv kernels on the GPU; keep the fastest")
    u.add_argument("file")
    u.add_argument("--net", required=True, help="the network to tune")
    u.add_argument("--batch", type=_positive, default=32, help="batch size to tune for (default 32)")
    u.add_argument("--input", type=_input_shape, metavar="C,H,W", help="input shape (default: the net's own)")
    u.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="fp32 (TF32 where torch allows it) or bf16 (under torch.autocast)")
    u.add_argument("--eval", action="store_true", help="tune inference (BN folded) instead of a training step")
    u.add_argument("--budget", type=float, metavar="SECONDS", help="start no new layer shape after this long")
    u.add_argument("--retune", action="store_true", help="also time shapes tuned before")
    u.add_argument("--jobs", type=_positive, metavar="N",
                   help="kernels compiled at a time (default: one per CPU core, at most 32)")
    u.add_argument("--set", type=_assignment, action="append", default=[], metavar="NAME=VALUE",
                   help="override a network parameter (repeatable)")
    t = sub.add_parser("train", help="train a network on real data (offline): digits, mnist:DIR or cifar10:DIR")
    t.add_argument("file")
    t.add_argument("--net", required=True, help="the network to train")
    t.add_argument("--data", default="digits",
                   help="digits (default: scikit-learn's bundled 8×8 digits), mnist:DIR or cifar10:DIR "
                        "(torchvision's on-disk layout; nothing is downloaded)")
    t.add_argument("--epochs", type=_positive, default=10)
    t.add_argument("--batch-size", type=_positive, default=64)
    t.add_argument("--lr", type=float, help="learning rate (default 0.05 for sgd, 1e-3 for adam)")
    t.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--augment", default="", metavar="LIST",
                   help="comma list of hflip, vflip, rotate:DEG, rot90, crop:SIZE (resize to SIZE, random crop back), noise:STD")
    t.add_argument("--out", metavar="CKPT.pt", help="save a checkpoint (model, optimizer, epoch) after each epoch")
    t.add_argument("--resume", metavar="CKPT.pt", help="resume from a checkpoint")
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    t.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: batch norms normalise by the statistics of the whole batch over the "
                        "processes (nn.SyncBatchNorm)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=int, default=0, help="train on only this many examples")
    t.add_argument("--set", type=_assignment, action="append", default=[], metavar="NAME=VALUE",
                   help="override a network parameter (repeatable)")
    t.add_argument("--json", action="store_true",
                   help="end with one JSON line: the final epoch, loss, accuracy (held-out, 0-1) and seconds")
    return p


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return v


def cmd_train(args) -> int:
    from . import train as T
    from .data import DataError
    from .runtime import ShapeError

    opts = T.Options(file=args.file, net=args.net, data=args.data, epochs=args.epochs, batch_size=args.batch_size,
                     lr=args.lr, optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
                     out=args.out, resume=args.resume, augment=args.augment, device=args.device, seed=args.seed,
                     limit=args.limit, overrides=dict(args.set), progress=sys.stderr.isatty(), sync_bn=args.sync_bn)
    try:
        result = T.train(opts)
    except (DataError, T.TrainError, ShapeError) as e:
        sys.stderr.write(f"netdsl: error: {e}\n")
        return EXIT_INVALID
    if not T.reporting_process():  # (under torchrun, process 0 reports)
        return EXIT_OK
    if args.json:
        print(T.result_json(result))
    else:
        print(f"{args.net}: epoch {result.epoch}, loss {result.loss:.4f}, held-out accuracy {result.accuracy:.4f}, "
              f"{result.seconds:.1f} s")
    return EXIT_OK


def cmd_tune(args) -> int:
    import contextlib

    import torch

    from . import tune as T
    from . import tuning
    from .cache import build

    if not torch.cuda.is_available():
        sys.stderr.write("netdsl: error: tuning times kernels on a CUDA GPU, and torch sees none on this machine\n")
        return EXIT_INVALID
    model = build(args.file, args.net, **dict(args.set)).cuda().to(memory_format=torch.channels_last)
    shape = args.input or model.input_shape
    x = torch.randn(args.batch, *shape, device="cuda")
    if x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()

    def progress(i, n, r):
        sys.stderr.write(f"[{i + 1}/{n}] {r.kind} {r.kernel} {r.shapes.split(',')[0]}: {r.default_ms:.3f} -> "
                         f"{r.best_ms:.3f} ms\n")

    with autocast:
        results = T.tune(model, x, train=not args.eval, budget_s=args.budget, retune=args.retune, progress=progress,
                         jobs=args.jobs)
    print(T.format_results(results))
    print(f"saved in {tuning.file_path()} under '{tuning.device_tag(x.device)}'")
    return EXIT_OK


def cmd_check(args) -> int:
    from .compiler import check_file
    from .report import table, to_json

    res = check_file(args.file, args.net, dict(args.set), args.input)
    if args.json:
        print(json.dumps({"networks": [to_json(n) for n in res.nets if _valid(n, res)],
                          "errors": [f"{d.pos}: {d.message}" for d in res.diagnostics]}))
    else:
        for n in res.nets:
            if _valid(n, res):
                print(table(n))
    if res.diagnostics:
        sys.stderr.write(render_all(res.diagnostics, res.sources))
        count = len(res.diagnostics)
        sys.stderr.write(f"{count} error{'s' if count != 1 else ''}\n")
        return EXIT_INVALID
    return EXIT_OK


def cmd_compile(args) -> int:
    import os

    from .compiler import compile_program
    from .fusion import kernels_of
    from .parser import load
    from .codegen.triton_module import kernel_names

    source, nets = compile_program(load(args.file), args.net, dict(args.set), target=args.target,
                                   disable=args.disable)
    stem = os.path.splitext(os.path.basename(args.file))[0]
    out = args.output or f"{stem}{'_torch' if args.target == 'torch' else ''}.py"
    with open(out, "w") as f:
        f.write(source)
    print(f"wrote {out}: {len(nets)} network{'s' if len(nets) != 1 else ''} ({', '.join(n.name for n in nets)})")
    if args.tuned and args.target == "triton":
        from . import tuning

        baked = tuning.bake(out)
        print(f"baked in {sum(map(len, baked.values()))} tuned launch configurations"
              + (f" ({', '.join(baked)})" if baked else ": `netdsl tune` has saved none for these kernels"))
    if args.target == "torch":
        return EXIT_OK
    print(f"{len(kernel_names(source))} Triton kernels")
    for net in nets:
        units = [u for u in kernels_of(net.body) if hasattr(u, "layers")]
        fused = [u for u in units if len(u.layers) + (u.act is not None) + u.residual > 1]
        print(f"{net.name}: {len(fused)} fused kernels")
        for u in fused:
            parts = [l.name for l in u.layers] + (["add"] if u.residual else []) + ([u.act.name] if u.act else [])
            print(f"  {' + '.join(parts)}  ->  {u.describe()}")
    if args.report:
        import torch

        from . import aot
        from .cache import import_file

        mod = import_file(out)
        for net in nets:
            x = torch.randn(args.batch, *net.input_shape)
            print(f"\n{net.name}: kernels as compiled for the GPU (batch {args.batch}: inference, and a training step forward and backward)")
            print(aot.format_report(aot.report(mod.NETWORKS[net.name](), x)))
    return EXIT_OK


def cmd_plan(args) -> int:
    from .compiler import checked_net
    from .plan import inference_plan
    from .plan.cost import eager, launches
    from .plan.show import table, to_json
    from .switches import check as check_switches

    disabled = check_switches(args.disable)
    if args.train:
        sys.stderr.write("netdsl plan: error: training steps are not planned by the compiler yet: their fusions are "
                         "decided as the autograd forward runs; `python bench/fusion.py --breakdown NET` counts a "
                         "recorded step\n")
        return EXIT_INVALID
    net = checked_net(args.file, args.net, dict(args.set), args.input)
    plan = inference_plan(net, disabled)
    fig = launches(plan, args.batch, args.dtype)
    base = eager(net, args.batch, args.dtype)
    if args.json:
        print(json.dumps(to_json(plan, fig, base, args.batch, args.dtype, disabled)))
    else:
        print(table(plan, fig, base, args.batch, args.dtype, disabled))
    return EXIT_OK


def _valid(net, res) -> bool:
    return all(s is not None and None not in s for _, s in net.output_shapes) and res.ok


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"check": cmd_check, "compile": cmd_compile, "plan": cmd_plan, "train": cmd_train, "tune": cmd_tune}[args.command](args)
    except NetdslError as e:
        sys.stderr.write(render_all(e.diagnostics, e.sources))
        return EXIT_INVALID
    except SwitchError as e:  # a bad --disable set: one line
        sys.stderr.write(f"netdsl: error: {e}\n")
        return EXIT_INVALID
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:  # a netdsl bug: say so plainly instead of a traceback
        sys.stderr.write(f"netdsl: internal error: {type(e).__name__}: {e}\n"
                         "please report this with the spec that caused it\n")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
