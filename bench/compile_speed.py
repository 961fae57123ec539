"""Wall time of `netdsl check` and `netdsl compile` on every spec file, each
run in a fresh process as a user runs it.

    python bench/compile_speed.py [--repeat N]
    python bench/compile_speed.py --kernels [--jobs 1,2] [--batch 8]

Prints the median, best and worst of N runs per file and command.  The target
for `check specs/resnet.net` (six networks) is well under half a second.

--kernels: how long Triton takes to compile the GPU kernels of one training
step and one inference of ResNet-50, VGG-16, GoogLeNet and DenseNet-121
(224×224, channels_last, fp32) for sm_90, on this machine's CPU: what a GPU's
first step waits for.  No GPU is needed (aot.jit_target).  Each figure is a
fresh process with an empty Triton cache, at each number of compile jobs
(netdsl.precompile's pool; 1: one after another, as first launches compile).
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times)


NETS = [("resnet.net", "ResNet50"), ("vgg.net", "VGG16"), ("googlenet.net", "GoogLeNet"),
        ("densenet.net", "DenseNet121")]


def kernel_compile(file, net, batch, jobs):
    """(kernels, seconds) of one step's and one inference's compiles (run in a fresh process)."""
    import torch

    sys.path.insert(0, str(ROOT))
    import netdsl
    from netdsl import aot
    from netdsl.parallel_compile import compile_step

    m = netdsl.build(str(ROOT / "specs" / file), net).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224).to(memory_format=torch.channels_last)
    t = time.perf_counter()
    with aot.jit_target(90):
        n = compile_step(m, x, True, jobs).submitted + compile_step(m, x, False, jobs).submitted
    return n, time.perf_counter() - t


def kernels(jobs_list, batch):
    import json
    import os

    print(f"{'network':12} {'kernels':>7} " + " ".join(f"{f'{j} job(s) s':>11}" for j in jobs_list))
    with tempfile.TemporaryDirectory() as tmp:
        for file, net in NETS:
            cells, n = [], None
            for jobs in jobs_list:
                env = dict(os.environ, TRITON_CACHE_DIR=str(Path(tmp) / f"triton-{net}-{jobs}"),
                           NETDSL_CACHE=str(Path(tmp) / "netdsl"))
                out = subprocess.run([sys.executable, __file__, "--one", file, net, str(batch), str(jobs)],
                                     check=True, capture_output=True, text=True, env=env, cwd=ROOT).stdout
                n, secs = json.loads(out.strip().splitlines()[-1])
                cells.append(f"{secs:11.1f}")
            print(f"{net:12} {n:7d} " + " ".join(cells), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--kernels", action="store_true", help="time the GPU kernels' compiles instead (see above)")
    ap.add_argument("--jobs", default="1,2", help="with --kernels: compile jobs to time, comma-separated")
    ap.add_argument("--batch", type=int, default=8, help="with --kernels: the batch size")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # (one --kernels figure, in its own process)
    args = ap.parse_args()
    if args.one:
        import json

        file, net, batch, jobs = args.one
        print(json.dumps(kernel_compile(file, net, int(batch), int(jobs))))
        return
    if args.kernels:
        kernels([int(j) for j in args.jobs.split(",")], args.batch)
        return
    print(f"{'spec':16} {'command':8} {'median s':>9} {'min s':>7} {'max s':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in sorted((ROOT / "specs").glob("*.net")):
            for what in ("check", "compile"):
                cmd = [sys.executable, "-m", "netdsl", what, str(spec)]
                if what == "compile":
                    cmd += ["-o", str(Path(tmp) / "out.py")]
                med, lo, hi = timed(cmd, args.repeat)
                print(f"{spec.name:16} {what:8} {med:9.3f} {lo:7.3f} {hi:7.3f}")


if __name__ == "__main__":
    main()
