"""The kernel plans of a network's forwards, made at compile time.

    graph --fuse--> fused graph --lower--> plan --shuffle_in_concat--> plan
          --depthwise_direct--> plan --gate_in_prologue--> plan --se_gate--> plan --concat_in_place--> plan
    fused graph --split_input_activations--> --lower_train--> plan --concat_in_place_train--> plan
          --split_channels--> plan
          --depthwise_direct_train--> plan --block_outputs--> plan --deferred_bn--> plan

Each pass is a pure function; `inference_plan` and `train_plan` list them
in order.  The code generator prints the results as the generated `forward`
and `forward_autograd` (one line a step), and `netdsl plan` prints the
inference plan with the bytes each launch moves (cost.py).  A pass can be
switched off (switches.py's names).  The training backward is not planned
here: each step's autograd Function runs its backward kernels, and the
fusions between them are settled as they run (grad.py)."""
from __future__ import annotations

from .. import ir
from ..fusion import fuse, split_input_activations
from .block_outputs import block_outputs
from .concat_in_place import concat_in_place, concat_in_place_train
from .deferred_bn import deferred_bn
from .depthwise_direct import depthwise_direct, depthwise_direct_train
from .gate_in_prologue import gate_in_prologue
from .se_gate import se_gate
from .shuffle_in_concat import shuffle_in_concat
from .split_channels import split_channels
from .ir import Plan
from .lower import lower
from .lower_train import lower_train

def inference_plan(net: ir.Net, disable=frozenset(), fused: bool = False) -> Plan:
    """net (shape-checked; fused=True: already through fuse) -> its inference plan."""
    g = net if fused else fuse(net)  # conv/linear/bn + act and residual adds into kernel epilogues (fusion.py)
    p = lower(g)  # one step per kernel, concatenations by copies
    if "shuffle_in_concat" not in disable:
        p = shuffle_in_concat(p)  # a channel shuffle after a concatenation: its parts stored interleaved
    if "depthwise_direct" not in disable:
        p = depthwise_direct(p)  # depthwise convs by the direct kernel, not the implicit GEMM
    if "gate_in_prologue" not in disable:
        p = gate_in_prologue(p)  # a squeeze-and-excitation product made by its conv as it loads x
    if "se_gate" not in disable:
        p = se_gate(p)  # a squeeze-and-excitation gate in one launch, pooling its depthwise conv's per-tile sums
    if "concat_in_place" not in disable:
        p = concat_in_place(p)  # branch and dense-layer outputs stored straight into their channels
    return p.renumbered()  # t1, t2, ... in the order the forward makes them


def train_plan(net: ir.Net, disable=frozenset(), fused: bool = False) -> Plan:
    """net (shape-checked; fused=True: already through fuse) -> the plan of its training forward."""
    g = split_input_activations(net if fused else fuse(net))  # silu, hardswish, gelu after their kernel
    p = lower_train(g)  # one step per autograd Function; a fork where a tensor has several consumers
    if "concat_in_place" not in disable:
        p = concat_in_place_train(p)  # convs store a concatenation's parts and dense features in its buffer
    if "split_channels" not in disable:
        p = split_channels(p)  # a fork read only by channel ranges: one split, its gradients written side by side
    if "depthwise_direct" not in disable:
        p = depthwise_direct_train(p)  # depthwise convs by the direct kernel; their BN and act by the kernels after
    if "block_outputs" not in disable:
        p = block_outputs(p)  # a residual block's output made by the next block's first 1×1 conv as it loads
    if "deferred_bn" not in disable:
        p = deferred_bn(p)  # a conv's BN apply and act left to the conv or pool that consumes it
    return p.renumbered()  # t1, t2, ... in the order the forward makes them
