"""`netdsl check` as a user runs it."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SPECS


def run(*args, cwd=ROOT, env_extra=None):
    env = dict(os.environ, **env_extra) if env_extra else None
    p = subprocess.run([sys.executable, "-m", "netdsl", *args], capture_output=True, text=True, cwd=cwd, env=env)
    return p.returncode, p.stdout, p.stderr


def test_check_prints_a_table_per_network():
    rc, out, err = run("check", "specs/resnet.net")
    assert rc == 0, err
    for name in ("ResNet18", "ResNet34", "ResNet50", "ResNet101", "ResNet152", "CifarResNet"):
        assert f"{name}  (input " in out
    assert "Total params: 11,689,512" in out and "Total params: 60,192,808" in out
    assert "layer2.0.downsample.0" in out


def test_check_json():
    rc, out, _ = run("check", "specs/lenet.net", "--json")
    assert rc == 0
    doc = json.loads(out)
    (net,) = doc["networks"]
    assert net["name"] == "LeNet5" and net["input"] == [1, 32, 32] and net["output"] == [10]
    assert net["params"] == 61_706 and net["macs"] == 416_520
    first = net["layers"][0]
    assert first == {"name": "conv1", "op": "conv", "output": [6, 28, 28], "params": 156, "macs": 117_600}


def test_net_input_and_set_options():
    rc, out, _ = run("check", "specs/resnet.net", "--net", "ResNet18", "--input", "3,32,32",
                     "--set", "num_classes=10", "--json")
    assert rc == 0
    (net,) = json.loads(out)["networks"]
    assert net["input"] == [3, 32, 32] and net["output"] == [10]
    assert net["params"] == 11_689_512 - 513 * 990


def test_errors_exit_2_with_location_and_caret(spec_file):
    path = spec_file("net N input(1, 28, 28) {\n    conv(16, 5, in_channels=3, padding=1)\n}\n")
    rc, out, err = run("check", path)
    assert rc == 2 and out == ""
    lines = err.splitlines()
    assert lines[0] == f"{path}:2:5: error: conv expects 3 input channels (weight [16, 3, 5, 5]) but its input has 1 channel"
    assert lines[1] == "        conv(16, 5, in_channels=3, padding=1)"
    assert lines[2].startswith("        ^~~~")
    assert "Traceback" not in err


def test_syntax_error_exit_2(spec_file):
    rc, _, err = run("check", spec_file("net N input(1, 2, 3) { relu relu }"))
    assert rc == 2 and ":1:29: error: syntax error" in err and "Traceback" not in err


@pytest.mark.parametrize("args,fragment", [
    (["check", "specs/resnet.net", "--net", "ResNet19"], "did you mean 'ResNet18'"),
    (["check", "specs/resnet.net", "--set", "num_clases=3"], "did you mean 'num_classes'"),
    (["check", "specs/resnet.net", "--set", "num_classes=\"x\""], "does not match the parameter's type"),
    (["check", "specs/resnet.net", "--input", "3,0,7"], "positive integers"),
    (["check", "specs/nope.net"], "cannot read file"),
    (["check", "specs/resnet.net", "--set", "num_classes"], "expected name=value"),
])
def test_bad_command_lines_exit_2_without_traceback(args, fragment):
    rc, _, err = run(*args)
    assert rc == 2 and fragment in err and "Traceback" not in err


def test_check_does_not_import_torch_or_triton():
    code = ("import sys, netdsl.cli as c; rc = c.main(['check', 'specs/resnet.net', '--json']);"
            "assert 'torch' not in sys.modules and 'triton' not in sys.modules, 'heavy import'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr


def test_every_spec_passes_check():
    for f in sorted(SPECS.glob("*.net")):
        rc, _, err = run("check", str(f.relative_to(ROOT)))
        assert rc == 0, err
