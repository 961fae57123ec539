"""GPU benchmark: correctness first, then timings, netdsl against eager
PyTorch (cuDNN) and torch.compile, one table printed last.

    python bench/gpu.py [--quick] [--max-autotune] [--layer-compile] [--tune SECONDS] [--json OUT.json]

Its results go in BENCHMARKS.md; rows it has not produced there read "not
measured (needs an NVIDIA GPU)".

Rows (median of CUDA-event timings after warm-up, milliseconds):
- every distinct conv→BN→ReLU layer shape of ResNet-50 at batch 256, forward
  (train-mode BN) and forward+backward;
- ResNet-50 and VGG-16: inference (eval, BN folded) and one training step
  (forward, backward, SGD step), fp32 (TF32 allowed) and bf16 (autocast),
  channels_last; the training step also captured in a CUDA graph and
  replayed (netdsl-cudagraph: no launch overhead left);
against eager PyTorch on the --target torch twin, torch.compile (default) and,
with --max-autotune, mode="max-autotune" (with inductor freezing for
inference, so Inductor folds BN too).  --tune SECONDS first tunes ResNet-50's
conv launches (`netdsl tune`: inference and a training step, each dtype, at
the timed batch, within that many seconds in all), prints what it picked,
and adds a netdsl-untuned column (the defaults, NETDSL_TUNED=0) to the
network rows.  Before each network's rows, netdsl.precompile compiles its
kernels in parallel, and a note row says how long that took.

--smoke runs the same script on the CPU (Triton's interpreter) with a small
ResNet-18 and two small layer shapes, fp32 only, wall-clock timing and no
torch.compile: a check that the script itself runs end to end, so that a bug
in the script shows up without a GPU (tests/test_bench.py).
Its times mean nothing.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import netdsl  # noqa: E402

# What the run covers; --smoke swaps in small settings that run on the CPU.
RUN = dict(device="cuda", net=("resnet.net", "ResNet50"), check_batch=8, size=224, nets=("ResNet50", "VGG16"),
           layers=None, layer_size=None, dtypes=(torch.float32, torch.bfloat16))
SMOKE = dict(device="cpu", net=("resnet.net", "ResNet18"), check_batch=2, size=32, nets=("ResNet18",),
             layers=2, layer_size=8, dtypes=(torch.float32,))


def timed(fn, warmup=3, reps=10):
    if RUN["device"] == "cpu":  # (--smoke: wall clock, one run)
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def twins(path, net, **overrides):
    dev = RUN["device"]
    tri = netdsl.build(str(path), net, **overrides).to(dev).to(memory_format=torch.channels_last)
    tri.spec = (str(path), net)
    ref = netdsl.build(str(path), net, target="torch", **overrides).to(dev).to(memory_format=torch.channels_last)
    tri.load_state_dict(ref.state_dict())
    return tri, ref


def variant(m, *disable):
    """m (from twins) compiled without the fusions named (netdsl.switches), with m's state."""
    path, net = m.spec
    v = netdsl.build(path, net, disable=disable).to(RUN["device"]).to(memory_format=torch.channels_last)
    v.load_state_dict(m.state_dict())
    return v


def precompiled(rows, label, m, x, dtype=torch.float32, trains=(False, True), env=None):
    """Compile m's kernels for inference and a training step on x (trains), in
    parallel (netdsl.precompile), with env's variables set (NETDSL_TUNED=0:
    the default launch configurations), and note how long that took.
    --smoke: for an sm_90 this machine does not have (aot.jit_target), as the
    tests do."""
    import contextlib

    from netdsl import aot
    from netdsl.parallel_compile import compile_step, default_jobs

    start, n = time.perf_counter(), 0
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with aot.jit_target(90) if RUN["device"] == "cpu" else contextlib.nullcontext():
            for train in trains:
                with torch.autocast(RUN["device"], dtype=dtype, enabled=dtype != torch.float32):
                    n += compile_step(m, x, train).submitted
    except Exception as e:  # the timings still run (their first launches compile one by one): say why
        rows.append(("note", f"precompile {label}", f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:150]}"))
        return
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    rows.append(("note", f"precompile {label}", f"{n} kernels in {time.perf_counter() - start:.1f} s "
                                                f"({default_jobs()} threads)"))


def correctness(rows):
    """Outputs and gradients against the twin on ResNet-50 (batch 8), before any timing."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    file, net = RUN["net"]
    tri, ref = twins(ROOT / "specs" / file, net)
    x = torch.randn(RUN["check_batch"], 3, RUN["size"], RUN["size"], device=RUN["device"])
    x = x.to(memory_format=torch.channels_last)
    label = f"{net} fp32(ieee) b{RUN['check_batch']}"
    # the other ways of merging and of launching a conv's backward, checked below: modules compiled without
    # those fusions (combo's without wgrad_add too: a weight gradient only rides in the combined launch)
    merge0, combo0, add0 = variant(tri, "grid_merge"), variant(tri, "combo", "wgrad_add"), variant(tri, "wgrad_add")
    merge0_add0 = variant(tri, "grid_merge", "wgrad_add")
    precompiled(rows, label, tri, x)
    precompiled(rows, label + " merge=0", merge0, x, trains=(True,))
    precompiled(rows, label + " combo=0", combo0, x, trains=(True,))
    precompiled(rows, label + " wgrad_add=0", add0, x, trains=(True,))
    for mode in ("eval", "train"):
        tri.train(mode == "train"), ref.train(mode == "train")
        with torch.no_grad():
            rows.append(("check", f"{net} {mode} output rel err", rel(tri(x), ref(x))))
    tri.train(), ref.train()

    def grads(m):
        m.zero_grad(set_to_none=True)
        m(x).square().mean().backward()
        return [p.grad.clone() for p in m.parameters()]

    theirs = grads(ref)
    # the weight gradients some 1×1 convs' dgrads sum by atomic adds (the default): their last bits vary
    ours, again = grads(tri), grads(tri)
    rows.append(("check", f"{net} train grads worst rel err (wgrad adds)",
                 max(rel(a, b) for a, b in zip(ours, theirs))))
    rows.append(("check", f"{net} train grads repeat max abs diff (wgrad adds)",
                 max((a - b).abs().max().item() for a, b in zip(again, ours))))
    # without them, the BN statistics and BN-backward sums, merged by each conv's (dgrad's) last
    # programs (an atomic count per channel block), and by separate launches
    for merge, m in (("1", add0), ("0", merge0_add0)):
        m.train()
        ours = grads(m)
        rows.append(("check", f"{net} train grads worst rel err (merge={merge}, wgrad_add=0)",
                     max(rel(a, b) for a, b in zip(ours, theirs))))
        again = grads(m)  # same inputs, same order of every sum: bit for bit
        rows.append(("check", f"{net} train grads repeat max abs diff (merge={merge}, wgrad_add=0)",
                     max((a - b).abs().max().item() for a, b in zip(again, ours))))
    # each conv's dgrad and wgrad in one launch (the default), and in one launch each
    combo0.train()
    rows.append(("check", f"{net} train grads worst rel err (combo=0)",
                 max(rel(a, b) for a, b in zip(grads(combo0), theirs))))
    from netdsl import runtime as rt

    rows.append(("check", "grid-merge counters left nonzero", sum(int(c.ne(0).sum()) for c in rt._COUNTERS.values())))
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True


def resnet50_layer_shapes():
    """Distinct (C_in, C_out, k, stride, H) of ResNet-50's conv→BN→ReLU layers, from netdsl check."""
    net = netdsl.checked_net(str(ROOT / "specs" / "resnet.net"), "ResNet50")
    from netdsl import ir

    shapes = []
    for layer in ir.walk_layers(net.body):
        if layer.op == "conv":
            a = layer.attrs
            key = (layer.in_shape[0], a["out_channels"], a["kernel_size"][0], a["stride"][0], layer.in_shape[1])
            if key not in shapes:
                shapes.append(key)
    return shapes


def layer_rows(rows, batch, compile_modes):
    tmp = Path(tempfile.mkdtemp())
    for cin, cout, k, s, H in resnet50_layer_shapes()[:RUN["layers"]]:
        H = min(H, RUN["layer_size"] or H)
        name = f"L{cin}_{cout}_{k}x{k}_s{s}_{H}"
        spec = tmp / f"{name}.net"
        spec.write_text(f"net {name} input({cin}, {H}, {H}) {{\n"
                        f"    conv({cout}, {k}, stride={s}, padding={k // 2}, bias=false) -> bn -> relu\n}}\n")
        tri, ref = twins(spec, name)
        x = torch.randn(batch, cin, H, H, device=RUN["device"]).to(memory_format=torch.channels_last)
        with torch.no_grad():
            err = rel(tri(x), ref(x))
        flops = 2 * batch * cin * cout * k * k * (H // s) ** 2
        for label, fn_of in (("fwd", lambda m: (lambda: m(x))),
                             ("fwd+bwd", lambda m: (lambda: m(x).sum().backward()))):
            t = {"netdsl": timed(fn_of(tri)), "eager": timed(fn_of(ref))}
            for cm in compile_modes:
                t[cm] = timed(fn_of(torch.compile(ref, mode=None if cm == "compile" else cm)))
            rows.append(("layer", f"{name} {label}", t, flops * (3 if label == "fwd+bwd" else 1), err))


TUNED = []  # non-empty once --tune ran


def untuned(fn):
    """fn with the launchers' default configurations (NETDSL_TUNED=0)."""
    def run():
        os.environ["NETDSL_TUNED"] = "0"
        try:
            fn()
        finally:
            os.environ.pop("NETDSL_TUNED")
    return run


def net_rows(rows, batch, compile_modes):
    for file, net in (("resnet.net", "ResNet50"), ("resnet.net", "ResNet18"), ("vgg.net", "VGG16")):
        if net not in RUN["nets"]:
            continue
        tri, ref = twins(ROOT / "specs" / file, net)
        dev, size = RUN["device"], RUN["size"]
        x = torch.randn(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), device=dev)
        for dtype in RUN["dtypes"]:
            dname = "fp32(tf32)" if dtype == torch.float32 else "bf16"
            combo0, add0 = variant(tri, "combo", "wgrad_add"), variant(tri, "wgrad_add")
            precompiled(rows, f"{net} {dname} b{batch}", tri, x, dtype)
            precompiled(rows, f"{net} {dname} b{batch} combo=0", combo0, x, dtype, (True,))
            precompiled(rows, f"{net} {dname} b{batch} wgrad_add=0", add0, x, dtype, (True,))
            if TUNED:
                precompiled(rows, f"{net} {dname} b{batch} untuned", tri, x, dtype, env={"NETDSL_TUNED": "0"})

            def infer(m):
                def run():
                    with torch.inference_mode(), torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
                        m(x)
                return run

            def step(m):
                opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

                def run():
                    with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
                        loss = F.cross_entropy(m(x).float(), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                return run

            tri.eval(), ref.eval()
            t = {"netdsl": timed(infer(tri)), "eager": timed(infer(ref))}
            if TUNED:
                t["netdsl-untuned"] = timed(untuned(infer(tri)))
            for cm in compile_modes:
                import torch._inductor.config as icfg

                icfg.freezing = True
                t[cm] = timed(infer(torch.compile(ref, mode=None if cm == "compile" else cm)))
                icfg.freezing = False
            rows.append(("net", f"{net} inference {dname} b{batch}", t, None, None))
            tri.train(), ref.train()
            t = {"netdsl": timed(step(tri), reps=5), "eager": timed(step(ref), reps=5)}
            combo0.train(), add0.train()
            t["netdsl-combo0"] = timed(step(combo0), reps=5)  # each conv's dgrad and wgrad launched apart
            t["netdsl-add0"] = timed(step(add0), reps=5)  # every weight gradient by its wgrad's programs
            if dev == "cuda":
                t["netdsl-cudagraph"] = timed(graphed_step(tri, x, y, dtype), reps=5)
            if TUNED:
                t["netdsl-untuned"] = timed(untuned(step(tri)), reps=5)
            for cm in compile_modes:
                t[cm] = timed(step(torch.compile(ref, mode=None if cm == "compile" else cm)), reps=5)
            rows.append(("net", f"{net} train step {dname} b{batch}", t, None, None))


def graphed_step(m, x, y, dtype):
    """m's training step on x, y (SGD with momentum) captured in a CUDA graph,
    after warm-up steps on a side stream; returns its replay."""
    dev = RUN["device"]
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

    def once():
        # (autocast's cast cache would hold tensors from outside the graph)
        with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
            loss = F.cross_entropy(m(x).float(), y)
        loss.backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            once()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        once()
    return graph.replay


def tune_rows(rows, batch, budget):
    """Tune ResNet-50 (or --smoke's net) at the timed batch: the picks stay for the rest of the run."""
    from netdsl import tune as T

    file, net = RUN["net"]
    tri, _ = twins(ROOT / "specs" / file, net)
    dev, size = RUN["device"], RUN["size"]
    x = torch.randn(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
    timer = None if dev == "cuda" else timed  # (--smoke: the wall clock, and nothing saved)
    runs = [(dtype, train) for dtype in RUN["dtypes"] for train in (False, True)]
    for dtype, train in runs:
        dname = "fp32(tf32)" if dtype == torch.float32 else "bf16"
        start = time.perf_counter()
        with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
            res = T.tune(tri, x, train=train, timer=timer, budget_s=budget / len(runs), save=dev == "cuda")
        print(f"\n{net} {'train step' if train else 'inference'} {dname} b{batch}: tuned in "
              f"{time.perf_counter() - start:.0f} s\n{T.format_results(res)}", flush=True)
        done = [r for r in res if r.best_ms and r.default_ms]
        picked = sum(1 for r in done if r.config)
        gain = sum(r.default_ms for r in done) / max(sum(r.best_ms for r in done), 1e-9)
        rows.append(("note", f"tune {net} {'train' if train else 'infer'} {dname} b{batch}",
                     f"{len(done)} of {len(res)} sites timed, {picked} off the defaults, "
                     f"their kernels' sum {gain:.2f}× faster"))


def table(rows):
    lines = []
    for kind, name, *rest in rows:
        if kind == "note":
            lines.append(f"{name:48} {rest[0]}")
            continue
        if kind == "check":
            lines.append(f"{name:48} {rest[0]:.2e}")
            continue
        t, flops, err = rest
        cells = "  ".join(f"{k} {v:8.3f}" for k, v in t.items())
        ratios = "  ".join(f"{k}/netdsl {v / t['netdsl']:5.2f}" for k, v in t.items() if k != "netdsl")
        extra = f"  {flops / t['netdsl'] / 1e9:7.1f} TFLOP/s" if flops else ""
        extra += f"  err {err:.1e}" if err is not None else ""
        lines.append(f"{name:48} {cells}  {ratios}{extra}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="batch 64 and no per-layer rows")
    ap.add_argument("--max-autotune", action="store_true", help="also torch.compile(mode='max-autotune') (slow to compile)")
    ap.add_argument("--layer-compile", action="store_true",
                    help="also torch.compile each single-layer twin (23 compiles: minutes)")
    ap.add_argument("--json", help="write the rows here too")
    ap.add_argument("--smoke", action="store_true", help="the whole script on the CPU, small (see above)")
    ap.add_argument("--tune", type=float, metavar="SECONDS",
                    help="first tune ResNet-50's conv launches for this long in all (see above)")
    args = ap.parse_args()
    if args.smoke:
        RUN.update(SMOKE)
        args.quick, args.max_autotune, args.layer_compile = False, False, False
    elif not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    import triton

    device = torch.cuda.get_device_name() if RUN["device"] == "cuda" else "CPU (--smoke: times mean nothing)"
    print(f"{time.strftime('%Y-%m-%d')}  {device}  torch {torch.__version__}  "
          f"triton {triton.__version__}", flush=True)
    torch.backends.cudnn.benchmark = True
    modes = [] if args.smoke else ["compile"] + (["max-autotune"] if args.max_autotune else [])
    rows = []
    correctness(rows)
    print(table(rows), flush=True)
    if not args.quick:
        layer_rows(rows, 2 if args.smoke else 256, modes if args.layer_compile else [])
    batch = 2 if args.smoke else 64 if args.quick else 256
    if args.tune:
        tune_rows(rows, batch, args.tune)
        TUNED.append(True)
    net_rows(rows, batch, modes)
    print("\n" + table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, default=str, indent=1))


if __name__ == "__main__":
    main()
