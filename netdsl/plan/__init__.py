"""The kernel plan of a network's inference forward, made at compile time.

    graph --fuse--> fused graph --lower--> plan --shuffle_in_concat--> plan
          --depthwise_direct--> plan --gate_in_prologue--> plan --concat_in_place--> plan

Each pass is a pure function; `inference_plan` lists them in order.  The
code generator prints the result as the generated `forward` (one line a
step), and `netdsl plan` prints it with the bytes each launch moves
(cost.py).  A pass can be switched off (switches.py's names).  The training forward
and backward are not planned here yet:
their fusions are decided as the autograd forward runs (codegen's _Forward
and grad.py)."""
from __future__ import annotations

from .. import ir
from ..fusion import fuse
from .concat_in_place import concat_in_place
from .depthwise_direct import depthwise_direct
from .gate_in_prologue import gate_in_prologue
from .shuffle_in_concat import shuffle_in_concat
from .ir import Plan
from .lower import lower

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
    if "concat_in_place" not in disable:
        p = concat_in_place(p)  # branch and dense-layer outputs stored straight into their channels
    return p.renumbered()  # t1, t2, ... in the order the forward makes them
