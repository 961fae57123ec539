"""Wall time of `netdsl check` (a fresh process, as a user runs it) on every spec file.

    python bench/check_speed.py [--repeat N]

Prints the median, best and worst of N runs per file.  The target for
specs/resnet.net (six networks) is well under half a second.
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    print(f"{'spec':24} {'median s':>9} {'min s':>7} {'max s':>7}")
    for spec in sorted((ROOT / "specs").glob("*.net")):
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "netdsl", "check", str(spec)], check=True,
                           stdout=subprocess.DEVNULL, cwd=ROOT)
            times.append(time.perf_counter() - t)
        print(f"{spec.name:24} {statistics.median(times):9.3f} {min(times):7.3f} {max(times):7.3f}")


if __name__ == "__main__":
    main()
