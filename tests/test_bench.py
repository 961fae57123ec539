"""bench/gpu.py runs end to end (--smoke: on the CPU, small), so that a bug in
the script itself shows up without a GPU."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_bench_runs_end_to_end_on_the_cpu():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--tune", "2"],
                         capture_output=True, text=True, timeout=1500, env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout.split("\n\n")[-1].splitlines()

    def check(name):  # a check row: its name, then its value
        (line,) = [line for line in table if line.startswith(name + " ")]
        return float(line.split()[-1])

    # the checks: each gradient path against the twin (rows present; their size is no test here: layer4's BNs
    # normalise 2 values per channel at batch 2, 32×32), a repeat bit for bit, no merge counter left set
    # (bit for bit without the atomic weight-gradient adds; with them, a repeat is only reported)
    for merge in ("1", "0"):
        assert check(f"ResNet18 train grads repeat max abs diff (merge={merge}, wgrad_add=0)") == 0.0
        assert check(f"ResNet18 train grads worst rel err (merge={merge}, wgrad_add=0)") >= 0.0
    assert check("ResNet18 train grads worst rel err (wgrad adds)") >= 0.0
    assert check("ResNet18 train grads repeat max abs diff (wgrad adds)") >= 0.0
    assert check("ResNet18 train grads worst rel err (combo=0)") >= 0.0
    assert check("grid-merge counters left nonzero") == 0
    assert check("ResNet18 eval output rel err") < 1e-4
    # the timed rows: two layer shapes forward and forward+backward, inference and a training step, the
    # step both ways of launching a conv's backward, and without the weight-gradient adds
    timed = [line for line in table if " netdsl " in line]
    assert [line.split()[0] for line in timed] == ["L3_64_7x7_s2_8"] * 2 + ["L64_64_1x1_s1_8"] * 2 + ["ResNet18"] * 2
    assert "netdsl-combo0" in timed[-1] and "netdsl-add0" in timed[-1] and "train step" in timed[-1]
    # --tune: inference and a training step tuned first (the wall clock, nothing saved), then the defaults
    # timed beside the tuned launches
    notes = [line for line in table if line.startswith("tune ResNet18 ")]
    assert [n.split()[2] for n in notes] == ["infer", "train"], notes
    assert all(" sites timed, " in n for n in notes)
    assert all("netdsl-untuned" in line for line in timed[-2:])
    # each network's kernels compiled in parallel first (for an sm_90 here), how long noted: the checks',
    # then the timed rows', each way of launching and of merging, tuned and untuned
    pre = [re.match(r"precompile (.*?)\s+(\d+) kernels in [0-9.]+ s \(\d+ threads\)$", line)
           for line in table if line.startswith("precompile ")]
    assert all(pre), [line for line in table if line.startswith("precompile ")]
    assert [m.group(1) for m in pre] == ["ResNet18 fp32(ieee) b2", "ResNet18 fp32(ieee) b2 merge=0",
                                         "ResNet18 fp32(ieee) b2 combo=0", "ResNet18 fp32(ieee) b2 wgrad_add=0",
                                         "ResNet18 fp32(tf32) b2", "ResNet18 fp32(tf32) b2 combo=0",
                                         "ResNet18 fp32(tf32) b2 wgrad_add=0", "ResNet18 fp32(tf32) b2 untuned"]
    # (the untuned kernels may all be compiled already; so may wgrad_add=0's, where no weight gradient rides)
    assert all(int(m.group(2)) > 0 for m in pre[:3] + pre[4:6])
