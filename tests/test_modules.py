"""Generated modules: zoo networks against their torch twins, the module
contract (state_dict, train/eval, any input size), kernel logging, caching,
byte-identical output, no torch compute in the compiled path, and ahead-of-time
compilation of every kernel for sm_90 and sm_80."""
import pickle
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import netdsl
from netdsl import runtime as rt

from conftest import ROOT, SPECS
from twin import compare, twins

FAST = [
    ("lenet.net", "LeNet5", (2, 1, 32, 32), {}),
    ("resnet.net", "CifarResNet", (2, 3, 32, 32), {}),
    ("resnet.net", "ResNet18", (4, 3, 64, 64), {"width": 8, "num_classes": 10}),
    ("course.net", "SequentialCNN", (2, 1, 28, 28), {}),
    ("course.net", "TestNet", (2, 1, 28, 28), {}),
    ("course.net", "Net", (3, 4), {}),
    ("course.net", "BasicNet", (3, 4), {}),
    ("course.net", "MyLinear", (3, 4), {}),
    ("course.net", "Sharpen", (2, 1, 28, 28), {}),
    ("course.net", "Blur", (2, 1, 28, 28), {}),
    ("course.net", "EdgeDetect", (2, 1, 28, 28), {}),
    ("course.net", "Filters", (2, 3, 28, 28), {}),
    ("course.net", "Slides", (2, 1, 28, 28), {}),
]
SLOW = [
    ("resnet.net", "ResNet34", (4, 3, 64, 64), {"width": 8}),
    ("resnet.net", "ResNet50", (4, 3, 64, 64), {"width": 8}),
    ("resnet.net", "ResNet101", (4, 3, 64, 64), {"width": 8}),
    ("resnet.net", "ResNet152", (4, 3, 64, 64), {"width": 8}),
    ("googlenet.net", "GoogLeNet", (4, 3, 64, 64), {"dropout": 0.0}),
    ("densenet.net", "DenseNet121", (4, 3, 64, 64), {"growth": 8}),
    ("alexnet.net", "AlexNet", (2, 3, 96, 96), {"dropout": 0.0}),
] + [("vgg.net", name, (2, 3, 32, 32), {}) for name in (
    "VGG_A", "VGG_A_LRN", "VGG_B", "VGG_C", "VGG_D", "VGG_E", "VGG11", "VGG13", "VGG16", "VGG19",
    "VGG11_BN", "VGG13_BN", "VGG16_BN", "VGG19_BN")]


def _zoo_case(file, net, shape, overrides):
    tri, ref = twins(str(SPECS / file), net, **overrides)
    torch.manual_seed(0)
    compare(tri, ref, torch.randn(*shape))


@pytest.mark.parametrize("file,net,shape,overrides", FAST, ids=[c[1] for c in FAST])
def test_zoo_against_torch_twin(file, net, shape, overrides):
    _zoo_case(file, net, shape, overrides)


@pytest.mark.slow
@pytest.mark.parametrize("file,net,shape,overrides", SLOW, ids=[c[1] for c in SLOW])
def test_zoo_against_torch_twin_slow(file, net, shape, overrides):
    _zoo_case(file, net, shape, overrides)


@pytest.fixture(scope="module")
def small_resnet():
    return netdsl.build(str(SPECS / "resnet.net"), "ResNet18", width=8, num_classes=10)


def test_state_dict_keys_match_torchvision_layout_and_twin(small_resnet):
    ref = netdsl.build(str(SPECS / "resnet.net"), "ResNet18", target="torch", width=8, num_classes=10)
    assert list(small_resnet.state_dict()) == list(ref.state_dict())
    assert "layer2.0.downsample.0.weight" in small_resnet.state_dict()
    ref.load_state_dict(small_resnet.state_dict(), strict=True)
    small_resnet.load_state_dict(ref.state_dict(), strict=True)


def test_default_initialisation_is_torchs(small_resnet):
    conv = small_resnet.layer("layer1.0.conv1")
    assert isinstance(conv, torch.nn.Conv2d) and conv.weight.std() > 0
    bn = small_resnet.layer("layer1.0.bn1")
    assert torch.equal(bn.weight, torch.ones(8)) and torch.equal(bn.running_var, torch.ones(8))
    assert "(layer1): Module" in repr(small_resnet) and "Conv2d(3, 8, kernel_size=(7, 7)" in repr(small_resnet)


def test_save_load_round_trip(small_resnet, tmp_path):
    small_resnet.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = small_resnet(x)
    torch.save(small_resnet.state_dict(), tmp_path / "ckpt.pt")
    other = netdsl.build(str(SPECS / "resnet.net"), "ResNet18", width=8, num_classes=10).eval()
    other.load_state_dict(torch.load(tmp_path / "ckpt.pt"), strict=True)
    with torch.no_grad():
        assert torch.equal(other(x), y)
    clone = pickle.loads(pickle.dumps(small_resnet))
    with torch.no_grad():
        assert torch.equal(clone(x), y)


def test_any_batch_and_input_size(small_resnet):
    small_resnet.eval()
    with torch.no_grad():
        assert small_resnet(torch.randn(1, 3, 32, 32)).shape == (1, 10)
        assert small_resnet(torch.randn(3, 3, 45, 61)).shape == (3, 10)


def test_too_small_input_names_layer_and_spec_line():
    m = netdsl.build(str(SPECS / "lenet.net"), "LeNet5").eval()
    with pytest.raises(rt.ShapeError, match=r"conv2 \(lenet.net:4\)"):
        with torch.no_grad():
            m(torch.randn(1, 1, 12, 12))
    with pytest.raises(rt.ShapeError, match=r"fc1 \(lenet.net:6\): expects \[N, 400\]"):
        with torch.no_grad():
            m(torch.randn(1, 1, 36, 36))
    with pytest.raises(rt.ShapeError, match="1 channel"):
        m(torch.randn(1, 3, 32, 32))


def test_kernel_log_records_every_launch():
    m = netdsl.build(str(SPECS / "resnet.net"), "ResNet18", width=8, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), netdsl.kernel_log() as log:
        m(x)
    names = [n for n, _ in log]
    # eval: per conv+bn one fold (first call only) + one conv kernel, residual add and ReLU in its epilogue
    assert names.count("bn_fold") == 20
    assert sum(n.startswith("conv_") for n in names) == 20
    assert names[1] == "conv_bn_relu__conv1" and names[-1] == "linear__fc"
    assert all(isinstance(g, tuple) and all(isinstance(d, int) for d in g) for _, g in log)
    with torch.no_grad(), netdsl.kernel_log() as again:
        y = m(x)
    assert len(again) == len(log) - 20 and "bn_fold" not in [n for n, _ in again]
    with torch.no_grad():  # an in-place change to a BN parameter invalidates its cached fold
        m.layer("fc").weight.mul_(1.0)
        m.layer("layer4.1.bn2").weight.mul_(2.0)
    with torch.no_grad(), netdsl.kernel_log() as changed:
        y2 = m(x)
    assert [n for n, _ in changed].count("bn_fold") == 1 and not torch.equal(y, y2)
    m.train()
    with torch.no_grad(), netdsl.kernel_log() as train:
        m(x)
    names = [n for n, _ in train]  # train: conv (its last programs merge the statistics), apply for each conv+bn
    assert names.count("bn_stats") == 0 and names.count("channel_affine") == 20 and "bn_fold" not in names
    with netdsl.kernel_log() as outside:
        pass
    assert outside == []


class _NoTorchCompute(TorchDispatchMode):
    """Fails on any torch op outside a kernel launch except allocation, views
    and zeroing (a memset: the weight gradient a dgrad adds into, WGRAD_ADD)."""

    ALLOWED = {"empty.memory_format", "empty_strided.default", "view.default", "slice.Tensor", "as_strided.default",
               "detach.default", "alias.default", "_unsafe_view.default", "empty_like.default", "zero_.default",
               "set_.source_Storage_storage_offset"}  # a dense block's concatenations share one buffer

    def __enter__(self):
        # the grid-wide merges' counters are zeroed once per device and stream, then reset by the kernels
        # themselves: allocate them first, as an earlier step would have (else this test depends on the order)
        rt.counters(torch.device("cpu"), 1)
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        if not rt.in_launch() and name not in self.ALLOWED:
            raise AssertionError(f"torch op {name} ran outside a Triton kernel")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_no_torch_compute_in_the_compiled_path(small_resnet, mode):
    getattr(small_resnet, mode)()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), _NoTorchCompute():
        small_resnet(x)
    g = netdsl.build(str(SPECS / "googlenet.net"), "GoogLeNet", num_classes=10)
    getattr(g, mode)()
    with torch.no_grad(), _NoTorchCompute():
        g(x)


def test_compile_is_byte_identical_and_imports_little(tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}.py"
        subprocess.run([sys.executable, "-m", "netdsl", "compile", "specs/resnet.net", "-o", str(out)],
                       check=True, cwd=ROOT, capture_output=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    text = outs[0].decode()
    imports = sorted({l for l in text.splitlines() if l.startswith(("import ", "from "))})
    assert imports == ["from netdsl import runtime as rt", "import torch", "import torch.nn as nn", "import triton",
                       "import triton.language as tl"]
    assert "def conv_bn_relu__conv1(" in text and "class ResNet152(rt.NetModule):" in text
    assert "# used by:" in text and "(resnet.net:7)" in text


def test_compile_cli_summary_and_import(tmp_path):
    out = tmp_path / "lenet_gen.py"
    p = subprocess.run([sys.executable, "-m", "netdsl", "compile", "specs/lenet.net", "-o", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert f"wrote {out}: 1 network (LeNet5)" in p.stdout
    assert "conv1 + 1  ->  conv_relu" in p.stdout and "fc1 + 8  ->  linear_relu" in p.stdout
    from netdsl.cache import import_file

    mod = import_file(out)
    built = netdsl.build(str(SPECS / "lenet.net"), "LeNet5").eval()
    imported = mod.LeNet5().eval()
    imported.load_state_dict(built.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(imported(x), built(x))


def test_compile_errors_exit_2(tmp_path):
    bad = tmp_path / "bad.net"
    bad.write_text("net N input(1, 8, 8) {\n  conv(4, 9)\n}\n")
    p = subprocess.run([sys.executable, "-m", "netdsl", "compile", str(bad)], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 2 and ":2:3: error:" in p.stderr and "Traceback" not in p.stderr


def test_build_uses_the_cache(tmp_path, monkeypatch):
    spec = tmp_path / "c.net"
    spec.write_text("net C input(2, 6, 6) { conv(3, 3) -> relu }\n")
    monkeypatch.setenv("NETDSL_CACHE", str(tmp_path / "cache"))
    netdsl.build(str(spec), "C")
    import netdsl.cache as cache

    def fail(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(cache, "compile_program", fail)
    assert isinstance(netdsl.build(str(spec), "C"), torch.nn.Module)
    spec.write_text("net C input(2, 6, 6) { conv(4, 3) -> relu }\n")
    with pytest.raises(AssertionError, match="generated again"):
        netdsl.build(str(spec), "C")


def _aot(file, net, shape, bf16=False, **overrides):
    """Every launch compiles for sm_90 and sm_80, and no default configuration
    spills registers (bf16: under autocast, as bench/gpu.py trains)."""
    from netdsl import aot

    m = netdsl.build(file, net, **overrides)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        results = aot.compile_launches(m, torch.randn(*shape), archs=(90, 80))
    assert results
    for name, arch, compiled in results:
        assert "ptx" in compiled.asm and compiled.asm["cubin"], (name, arch)
        info = aot.ptxas_info(compiled, arch)
        assert info["registers"] and info["spill_stores"] == 0 and info["spill_loads"] == 0, (name, arch, info)
    return {name for name, _, _ in results}


def test_every_kernel_template_compiles_for_sm90_and_sm80(tmp_path):
    spec = tmp_path / "all.net"
    spec.write_text(
        "net All input(4, 17, 13) {\n"
        "  conv(8, 3, padding=1, groups=2) -> bn -> relu -> lrn(3) -> maxpool(3, stride=2, ceil_mode=true) -> bn\n"
        "  residual { conv(8, 3, padding=1) -> bn } -> leaky_relu\n"
        "  concat { conv_transpose(4, 2, stride=2) -> avgpool(2, stride=2) ; upsample(1, mode=\"bilinear\") }\n"
        "  add { dropout(0.1) ; sigmoid } -> upsample(2) -> softmax -> adaptive_avgpool(3) -> flatten -> linear(5) -> tanh\n"
        "}\n")
    names = _aot(str(spec), "All", (32, 4, 17, 13))
    assert {"bn_stats", "bn_fold", "channel_affine", "elementwise", "adaptive_avgpool", "softmax"} <= names
    assert any(n.startswith("conv_transpose__") for n in names) and any(n.startswith("lrn__") for n in names)


@pytest.mark.slow
@pytest.mark.parametrize("file,net,shape", [
    ("resnet.net", "ResNet50", (8, 3, 224, 224)), ("googlenet.net", "GoogLeNet", (8, 3, 224, 224)),
    ("densenet.net", "DenseNet121", (8, 3, 224, 224)), ("vgg.net", "VGG16", (8, 3, 224, 224)),
    ("alexnet.net", "AlexNet", (8, 3, 224, 224)), ("course.net", "Filters", (8, 3, 28, 28)),
    ("resnet.net", "CifarResNet", (32, 3, 32, 32)),
])
def test_zoo_kernels_compile_for_sm90_and_sm80(file, net, shape):
    _aot(str(SPECS / file), net, shape)


@pytest.mark.slow
@pytest.mark.parametrize("file,net", [("resnet.net", "ResNet50"), ("googlenet.net", "GoogLeNet"),
                                      ("densenet.net", "DenseNet121")])
def test_zoo_kernels_compile_in_bf16(file, net):
    _aot(str(SPECS / file), net, (8, 3, 224, 224), bf16=True)


def test_int64_indexing_compiles_for_huge_tensors():
    """A tensor past 2^31 elements switches the kernels to int64 offsets; the
    conv kernel compiles that way (a run needs a GPU with the memory)."""
    import triton.language as tl

    from netdsl import aot
    from netdsl.cache import compile_to_module

    x = torch.empty(2**31 // (28 * 28) + 1, 1, 28, 28, device="meta")
    assert rt.needs_int64(x) and not rt.needs_int64(x[:1000])
    mod = compile_to_module(str(SPECS / "course.net"), "Slides")
    kernel = next(v for k, v in vars(mod).items() if k.startswith("conv__"))
    sig = {n: "*fp32" if n.endswith("_ptr") else "i32" for n in kernel.arg_names}
    sig.update(slope="fp32")
    meta = dict(HAS_SCALE=False, HAS_SHIFT=True, HAS_RES=False, ACT=0, IDX64=True, PRECISION="tf32", ACC=tl.float32,
                BLOCK_M=64, BLOCK_N=16, BLOCK_K=16)
    sig.update({k: "constexpr" for k in meta})
    ptx = aot.compile_one(kernel, sig, meta, 90).asm["ptx"]
    # the pixel index itself is 64-bit: divided and multiplied as s64 (int32 offsets give none of these)
    assert re.search(r"\b(div|rem|mul\.lo)\.s64\b", ptx)
    narrow = aot.compile_one(kernel, sig, dict(meta, IDX64=False), 90).asm["ptx"]
    assert not re.search(r"\b(div|rem|mul\.lo)\.s64\b", narrow)


def test_int64_indexing_reaches_the_split_reductions():
    """bn_stats and channel_grad over a tensor past 2^31 elements (planned on
    the meta device: nothing is allocated) launch with int64 offsets, and
    compile that way for sm_90."""
    from netdsl import aot
    from netdsl.cache import compile_to_module
    from netdsl.kernels import norm as knorm

    x = torch.empty(2**31 // (16 * 28 * 28) + 1, 16, 28, 28, device="meta").to(memory_format=torch.channels_last)
    K = compile_to_module(str(SPECS / "densenet.net"), "DenseNet121").K
    bn = torch.nn.BatchNorm2d(16, device="meta")
    v = [torch.empty(16, device="meta") for _ in range(4)]
    with rt.plan_launches() as plan:
        knorm.bn_stats(rt._rt, K.bn_stats, bn, x, knorm.BatchStats(*v))
        knorm.channel_grad(rt._rt, K.channel_grad, x, x4=x, mean=v[0], rstd=v[1], weight=bn.weight, train=True,
                           g4=x, dweight=v[2], dbias=v[3], coef=torch.empty(48, device="meta"))
    assert [k.fn.__name__ for k, _, _ in plan] == ["bn_stats", "channel_grad"]
    for kernel, args, meta in plan:
        assert meta["IDX64"] and not meta["PARTIALS"]
        sig = {n: aot._type(a) for n, a in zip(kernel.arg_names, args)}
        sig.update({k: "constexpr" for k in meta if k not in aot.OPTIONS})
        ptx = aot.compile_one(kernel, sig, meta, 90).asm["ptx"]
        # the pixel index itself is 64-bit: divided and multiplied as s64 (int32 offsets give none of these)
        assert re.search(r"\b(div|rem|mul\.lo)\.s64\b", ptx), kernel.fn.__name__


@pytest.mark.slow
def test_compile_report_prints_registers_and_spills(tmp_path):
    p = subprocess.run([sys.executable, "-m", "netdsl", "compile", "specs/lenet.net", "-o", str(tmp_path / "l.py"),
                        "--report", "--batch", "16"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "LeNet5: kernels as compiled for the GPU (batch 16: inference, and a training step forward and backward)" in p.stdout
    rows = [l.split() for l in p.stdout.splitlines() if l.startswith(("conv_relu__conv1", "linear_relu__fc1"))]
    assert {r[1] for r in rows} == {"sm_90", "sm_80"}
    for name, arch, regs, spills, shared, warps, stages in rows:
        assert 0 < int(regs) <= 255 and spills == "0/0" and int(warps) in (4, 8) and int(stages) >= 1


def test_nested_kernel_logs_each_see_their_launches():
    m = netdsl.build(str(SPECS / "course.net"), "Net").eval()
    x = torch.randn(2, 4)
    with torch.no_grad(), netdsl.kernel_log() as outer:
        with netdsl.kernel_log() as first:
            pass
        with netdsl.kernel_log() as inner:
            m(x)
        m(x)
    assert first == [] and len(inner) == 2 and len(outer) == 4


@pytest.mark.parametrize("file,net,overrides", [
    pytest.param("resnet.net", "ResNet18", {"width": 8, "num_classes": 10}, id="ResNet18"),
    pytest.param("googlenet.net", "GoogLeNet", {"num_classes": 10, "dropout": 0.0}, id="GoogLeNet",
                 marks=pytest.mark.slow),
    pytest.param("densenet.net", "DenseNet121", {"growth": 4, "num_classes": 10}, id="DenseNet121",
                 marks=pytest.mark.slow),
])
def test_no_torch_compute_in_a_training_step(file, net, overrides):
    """Forward and backward: every gradient comes from a kernel; a tensor with
    several consumers is forked, so autograd's engine never sums with torch."""
    m = netdsl.build(str(SPECS / file), net, **overrides).train()
    x, g = torch.randn(2, 3, 32, 32), torch.randn(2, 10)
    with _NoTorchCompute():
        m(x).backward(g)
    assert all(p.grad is not None for p in m.parameters())


RECURSIVE = """block Level(depth, c) {
    if depth > 0 {
        concat {
            identity
            conv(c, 3, padding=1, bias=false) -> bn -> relu -> Level(depth - 1, 2 * c)
        }
    } else { relu }
}
net U(depth = 2) input(3, 6, 6) { Level(depth, 4) -> conv(5, 1) }
"""


def test_a_recursive_block_against_its_torch_twin(spec_file):
    """A block that calls itself (to a depth its `if` chooses) runs as the
    network it unrolls to: outputs in eval and train mode, and gradients."""
    from twin import grad_compare

    tri, ref = twins(spec_file(RECURSIVE, "u.net"), "U")
    assert sum(1 for k in tri.state_dict() if k.endswith(".weight")) == 2 + 2 + 1  # two conv+bn levels, the head
    x = torch.randn(2, 3, 6, 6)
    compare(tri, ref, x)
    grad_compare(tri, ref, x)


# The launched kernels that still take more than 64 arguments (pointers, sizes, strides and constexprs), with
# their counts: the conv family's epilogues and prologues are constexpr-selected roles of one kernel each.
# These counts may only go down; every other kernel stays within 64.
WIDE_KERNELS = {"CONV2D": 84, "CONV2D_BACKWARD": 178}


def test_launched_kernels_take_at_most_64_arguments_but_two_conv_kernels():
    from netdsl.codegen import triton_module as tm
    from netdsl.compiler import compile_program
    from netdsl.kernels import conv as kconv
    from netdsl.parser import load

    helpers = {name for _, name, _ in tm.HELPERS}
    templates = {name: getattr(kconv, name) for name in WIDE_KERNELS}
    counts, wide = {}, {}
    for file in sorted(SPECS.glob("*.net")):
        source, _ = compile_program(load(str(file)), None)
        for name, params in re.findall(r"^@triton\.jit\ndef (\w+)\((.*?)\):", source, flags=re.M | re.S):
            if name in helpers:
                continue
            n = len([p for line in params.splitlines() for p in line.split("#")[0].split(",") if p.strip()])
            counts[name] = n
            if n > 64:
                template = [t for t, text in templates.items() if _same_signature(text, source, name)]
                assert template, f"{file.name}: {name} takes {n} arguments"
                wide[template[0]] = max(wide.get(template[0], 0), n)
    assert wide == WIDE_KERNELS
    assert len(counts) > 100 and max(n for k, n in counts.items() if n <= 64) > 40  # (the parse found them)


def _same_signature(template: str, source: str, name: str) -> bool:
    """Is the generated kernel `name` an instance of template (its signature's text, the name apart)?"""
    head = template.split("):\n")[0].split("def $NAME(")[1]
    return f"def {name}({head}):" in source
