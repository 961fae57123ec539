"""Wall time of `netdsl check` and `netdsl compile` on every spec file, each
run in a fresh process as a user runs it.

    python bench/compile_speed.py [--repeat N]

Prints the median, best and worst of N runs per file and command.  The target
for `check specs/resnet.net` (six networks) is well under half a second.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
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
