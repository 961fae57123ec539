"""The fusions a compile can switch off (`netdsl compile --disable NAME`,
`netdsl.build(..., disable=[...])`), decided when the module is generated:
the generated file carries the set (its `rt.Kernels`), and the module cache
key includes it.  They are there to rule a mechanism out when hunting a bug
and to time each way (bench/gpu.py).  Deterministic mode
(`torch.use_deterministic_algorithms`) rules out the atomic-add variants
whatever the switches say."""
from __future__ import annotations

# name -> what switching it off does
SWITCHES = {
    "deferred_bn": "a train-mode conv→BN→act (or BN→act) feeding a conv or pool gets its own apply kernel "
                   "instead of the consumer applying it as it loads",
    "block_outputs": "a residual block's output is written by its apply kernel instead of being made by the next "
                     "block's first 1×1 conv as it loads",
    "grid_merge": "batch-norm statistics and backward sums are merged by separate launches (bn_stats, "
                  "channel_grad) instead of by the last programs of the kernel that made the partial sums",
    "concat_in_place": "a concatenation's parts (and a dense block's features) are copied into its buffer instead "
                       "of being stored there by the kernels that make them",
    "shuffle_in_concat": "a channel shuffle after a concatenation of equal parts is a launch of its own instead of "
                         "the parts being stored interleaved in the concatenation's buffer (inference forward)",
    "depthwise_direct": "a depthwise conv runs the implicit GEMM instead of the direct depthwise kernels "
                        "(forward and backward)",
    "split_channels": "a tensor read only as channel ranges (ShuffleNet's halves) is forked, each range's "
                      "gradient written whole-size with zeros and the fork adding them, instead of one split "
                      "writing the ranges' gradients side by side (training)",
    "gate_in_prologue": "a squeeze-and-excitation product x · gate is a launch of its own instead of being made "
                        "by its conv as it loads x (inference forward)",
    "se_gate": "a squeeze-and-excitation gate after a depthwise conv runs as three launches (pool, squeeze conv, "
               "excite conv), the pool reading the conv's output, instead of one launch pooling the per-tile sums "
               "the depthwise conv's epilogue left (inference forward)",
    "combo": "a conv's input and weight gradients run as two launches instead of one",
    "wgrad_add": "a 1×1 stride-1 conv's weight gradient is summed by its own programs instead of added into by "
                 "its dgrad's (atomic adds)",
}

# name -> the switches it needs on: a weight gradient rides in the dgrad's programs of the combined launch
NEEDS = {"wgrad_add": ("combo",)}


class SwitchError(ValueError):
    """A --disable name that is unknown, or a set of switches that cannot go together."""


def check(disable) -> frozenset:
    """The set of switches off, checked: unknown names, and a switch left on
    whose need was switched off, are errors."""
    off = frozenset(disable or ())
    unknown = sorted(off - SWITCHES.keys())
    if unknown:
        raise SwitchError(f"--disable {unknown[0]}: no such fusion; the fusions are {', '.join(SWITCHES)}")
    for name, needs in NEEDS.items():
        for need in needs:
            if need in off and name not in off:
                raise SwitchError(f"--disable {need} needs --disable {name} too: '{name}' runs inside '{need}'")
    return off
