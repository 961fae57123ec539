"""A ResNet-18 training step captured in a CUDA graph (torch.cuda.graph),
replayed three times, against the same steps run eagerly: every launch of
forward, backward and the optimizer's step is captured, nothing syncs with
the host, and buffers that must start at zero (the grid-wide merges'
counters) are left at zero by the launches themselves, so each replay
computes what a fresh step does."""
import copy

import pytest
import torch
import torch.nn.functional as F

import netdsl
from twin import randomize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def test_a_captured_training_step_replays_as_eager_steps():
    torch.manual_seed(0)
    ref = netdsl.build("specs/resnet.net", "ResNet18", target="torch", num_classes=10)
    randomize(ref, seed=0)
    eager = netdsl.build("specs/resnet.net", "ResNet18", num_classes=10)
    eager.load_state_dict(ref.state_dict())
    eager = eager.cuda().train()
    graphed = copy.deepcopy(eager)
    xs = [torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last) for _ in range(3)]
    ys = [torch.randint(0, 10, (4,), device="cuda") for _ in range(3)]

    # (SGD without momentum: no optimizer state, so the warm-up's steps can be undone in place)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.05)
    static_x, static_y = xs[0].clone(), ys[0].clone()
    start = {k: v.clone() for k, v in graphed.state_dict().items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: every kernel compiled, every cache filled
        for _ in range(2):
            opt_g.zero_grad(set_to_none=True)
            _step(graphed, opt_g, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():  # the warm-up's steps undone, in place (the graph keeps these tensors)
        for k, v in graphed.state_dict().items():
            v.copy_(start[k])
    opt_g.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _step(graphed, opt_g, static_x, static_y)

    for x, y in zip(xs, ys):
        opt_e.zero_grad(set_to_none=True)
        loss = _step(eager, opt_e, x, y)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.allclose(static_loss, loss, rtol=1e-4, atol=1e-5)
        for (k, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
            assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5), k
