"""stochastic_depth(p, mode): torchvision's StochasticDepth, which drops a
residual branch per sample ("row") or for the whole batch in training and is
the identity in eval.  The mask is drawn in the kernel, so against torch it
is judged by its law: whole samples zeroed at rate p, the rest scaled by
1 / (1 - p), and the backward applying the same mask."""
import pytest
import torch

import netdsl
from twin import compare, grad_compare, twins

SPEC = """\
net Alone input(4, 3, 5) { stochastic_depth(0.3) }
net Batch input(4, 3, 5) { stochastic_depth(0.5, mode="batch") }
net Block input(8, 6, 6) {
    residual { conv(8, 3, padding=1, bias=false) -> bn -> silu -> conv(8, 1, bias=false) -> bn -> stochastic_depth(P) }
}
"""


def _spec(tmp_path, p=0.2):
    f = tmp_path / "sd.net"
    f.write_text(SPEC.replace("P", repr(p)))
    return str(f)


def test_whole_samples_dropped_at_rate_p_and_the_same_mask_backward(tmp_path):
    m = netdsl.build(_spec(tmp_path), "Alone").train()
    torch.manual_seed(1)
    x = (torch.rand(400, 4, 3, 5) + 0.5).requires_grad_()  # never zero: a zero output means dropped
    y = m(x)
    kept = (y != 0).flatten(1)
    assert torch.equal(kept.all(1), kept.any(1)), "a sample is dropped whole or kept whole"
    keep = kept.all(1)[:, None, None, None]
    assert 0.22 < 1 - keep.float().mean().item() < 0.38
    assert torch.allclose(y, torch.where(keep, x / 0.7, torch.zeros_like(x)))
    w = torch.randn_like(y)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, torch.where(keep, w / 0.7, torch.zeros_like(w)))
    y2 = m(x.detach())
    assert not torch.equal(y2 != 0, y != 0), "each call draws a fresh mask"
    m.eval()
    assert torch.equal(m(x.detach()), x.detach())


def test_batch_mode_keeps_or_drops_the_whole_batch(tmp_path):
    m = netdsl.build(_spec(tmp_path), "Batch").train()
    torch.manual_seed(2)
    x = torch.rand(6, 4, 3, 5) + 0.5
    outcomes = set()
    for _ in range(12):
        y = m(x)
        assert torch.equal(y, torch.zeros_like(y)) or torch.allclose(y, x * 2)
        outcomes.add(bool(y.any()))
    assert outcomes == {True, False}


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_the_end_points(tmp_path, p):
    m = netdsl.build(_spec(tmp_path, p), "Block").train()
    ref = netdsl.build(_spec(tmp_path, p), "Block", target="torch").train()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 8, 6, 6)
    assert torch.allclose(m(x), ref(x), atol=1e-5)  # p = 1: the input alone; p = 0: the whole block


def test_a_residual_block_with_stochastic_depth_against_torch_in_eval(tmp_path):
    tri, ref = twins(_spec(tmp_path, 0.2), "Block", seed=5)
    x = torch.randn(3, 8, 6, 6)
    compare(tri, ref, x, modes=("eval",))
    grad_compare(tri, ref, x, modes=("eval",))


def test_its_kernels_compile_for_sm90_and_sm80(tmp_path):
    from netdsl import aot
    for net, op in (("Alone", 7), ("Batch", 8)):
        m = netdsl.build(_spec(tmp_path), net)
        kernels = aot.signatures(m, torch.randn(2, 4, 3, 5), train=True, backward=True)
        assert sorted(meta["OP"] for k, _, meta in kernels if k.fn.__name__ == "elementwise") == [op]
        for kernel, sig, meta in kernels:
            for arch in (90, 80):
                info = aot.ptxas_info(aot.compile_one(kernel, sig, meta, arch), arch)
                assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (kernel.fn.__name__, arch, info)
