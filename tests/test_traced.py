"""Generated modules under torch.compile and torch.export (eval mode): the
inference forward traced as one registered op, netdsl::forward, whose fake
implementation runs the same forward launching nothing.  No graph breaks,
compiled and exported outputs equal to the eager module's, one compile for
two batch sizes, an exported program that carries its weights and loads in
a fresh process, opcheck, and the errors a traced module in train mode
gives."""
import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import netdsl
from conftest import ROOT, SPECS
from netdsl import traced

# (spec, network, input, build arguments), at small sizes; GoogLeNet's and DenseNet's forwards take the
# interpreter seconds each: slow run
NETS = [pytest.param("lenet.net", "LeNet5", (2, 1, 32, 32), {}, id="LeNet5"),
        pytest.param("resnet.net", "ResNet18", (2, 3, 32, 32), {"width": 8, "num_classes": 10}, id="ResNet18"),
        pytest.param("googlenet.net", "GoogLeNet", (2, 3, 32, 32), {"num_classes": 10}, id="GoogLeNet",
                     marks=pytest.mark.slow),
        pytest.param("densenet.net", "DenseNet121", (2, 3, 32, 32), {"growth": 8, "num_classes": 10},
                     id="DenseNet121", marks=pytest.mark.slow)]

PYRAMID = """\
net Pyramid input(3, 16, 16) {
    conv(8, 3, padding=1) -> relu -> as @c1
    maxpool(2) -> conv(8, 3, padding=1, groups=8) -> bn -> relu -> as @c2
    return "fine": @c1, "coarse": @c2
}
"""


def _model(file, net, overrides):
    torch.manual_seed(0)
    m = netdsl.build(SPECS / file if not str(file).startswith("/") else file, net, **overrides).eval()
    with torch.no_grad():  # (batch-norm statistics away from their defaults)
        for name, t in m.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                t.normal_(0.0, 0.3)
    return m


def _same(a, b):
    if isinstance(a, dict):
        assert list(a) == list(b)
        return all(_same(a[k], b[k]) for k in a)
    return torch.equal(a, b)


@pytest.mark.parametrize("file,net,shape,overrides", NETS)
def test_compile_fullgraph_and_export_give_the_eager_outputs(file, net, shape, overrides, tmp_path):
    """(fullgraph=True: a graph break would be an error; LeNet-5 also through torch._dynamo.explain)"""
    m = _model(file, net, overrides)
    x = torch.randn(shape)
    with torch.no_grad():
        want = m(x)
        if net == "LeNet5":
            assert torch._dynamo.explain(m)(x).graph_break_count == 0
        for backend in ("aot_eager", "inductor") if net in ("LeNet5", "ResNet18") else ("inductor",):
            torch._dynamo.reset()
            assert _same(torch.compile(m, fullgraph=True, backend=backend)(x), want), backend
    ep = torch.export.export(m, (x,), strict=False)
    assert [n.target for n in ep.graph.nodes if n.op == "call_function"][0] is torch.ops.netdsl.forward.default
    torch.export.save(ep, tmp_path / "m.pt2")
    assert _same(torch.export.load(tmp_path / "m.pt2").module()(x), want)


def test_a_dict_of_outputs_and_a_dynamic_batch(tmp_path):
    """One compile (dynamic=True) serves batch 2 and 5 (another image size may guard its way to a second);
    an export with a dynamic batch dimension too."""
    spec = tmp_path / "p.net"
    spec.write_text(PYRAMID)
    m = _model(spec, "Pyramid", {})
    counter = CompileCounter()
    compiled = torch.compile(m, fullgraph=True, backend=counter, dynamic=True)
    with torch.no_grad():
        for shape in ((2, 3, 16, 16), (5, 3, 16, 16), (5, 3, 20, 12)):
            x = torch.randn(shape)
            got, want = compiled(x), m(x)
            assert list(got) == ["fine", "coarse"] and _same(got, want)
            assert got["coarse"].shape == (shape[0], 8, shape[2] // 2, shape[3] // 2)
            if shape[0] == 5 and shape[2] == 16:
                assert counter.frame_count == 1
    batch = torch.export.Dim("batch")
    ep = torch.export.export(m, (torch.randn(2, 3, 16, 16),), strict=False, dynamic_shapes={"x": {0: batch}})
    x = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        assert _same(ep.module()(x), m(x))


def test_an_exported_program_loads_and_runs_in_a_fresh_process(tmp_path):
    """(The op runs on a private instance of the generated class, with its own random initialisation: every
    equal output here and above shows it ran the state it was handed.)"""
    m = _model("resnet.net", "ResNet18", {"width": 8, "num_classes": 10})
    x = torch.randn(3, 3, 32, 32)
    ep = torch.export.export(m, (x,), strict=False)
    with torch.no_grad():
        want = m(x)
    torch.export.save(ep, tmp_path / "m.pt2")
    torch.save({"x": x, "y": want}, tmp_path / "io.pt")
    script = (f"import torch, netdsl.traced\nio = torch.load({str(tmp_path / 'io.pt')!r})\n"
              f"ep = torch.export.load({str(tmp_path / 'm.pt2')!r})\n"
              "assert torch.equal(ep.module()(io['x']), io['y'])\nprint('ok')\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_opcheck():
    m = _model("lenet.net", "LeNet5", {})
    state = [t.detach() for t in traced._state(m)]
    for x in (torch.randn(2, 1, 32, 32), torch.randn(5, 1, 32, 32)):
        torch.library.opcheck(torch.ops.netdsl.forward.default, (m.traced_key, x, state))


def test_train_mode_and_a_traced_backward_are_clear_errors():
    m = netdsl.build(SPECS / "lenet.net", "LeNet5")
    x = torch.randn(2, 1, 32, 32)
    with pytest.raises(traced.TracedModeError, match=r"LeNet5: torch.compile and torch.export take a netdsl module "
                                                     r"in eval mode only \(call .eval\(\) first\)"):
        torch.export.export(m, (x,), strict=False)
    m.eval()
    y = torch.compile(m, fullgraph=True, backend="aot_eager")(x)  # (parameters that want gradients)
    with pytest.raises(traced.TracedModeError, match="netdsl::forward is the inference forward"):
        y.sum().backward()
    with pytest.raises(traced.TracedModeError, match="netdsl::forward is the inference forward"):
        torch.export.export(m, (x,), strict=False).module()(x).sum().backward()
