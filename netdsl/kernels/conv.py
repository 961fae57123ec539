"""Convolution as implicit GEMM: conv2d (and linear, as a 1×1 conv on a 1×1
image) and transposed conv2d, with fused epilogues.

GEMM view of a conv: M = N·Ho·Wo output pixels, N = C_out/groups, K =
(C_in/groups)·KH·KW.  A program computes a BLOCK_M × BLOCK_N tile, walking the
kernel window and BLOCK_K input channels at a time with `tl.dot` (fp32
accumulation).  Tensors are addressed through strides, so NCHW and
channels_last inputs and channel slices of a concat buffer all work.

Epilogue (constexpr flags): y = act(acc · scale[c] + shift[c] + residual).
`scale`/`shift` carry a bias or a folded BatchNorm.  With STATS, each tile
also writes its per-channel sum and squared deviations for a training-mode
BatchNorm's statistics, so they need no separate pass over y; with MERGE, the
kernel's own programs merge them into the statistics (a two-level tree per
column of tiles, see LAST_TO_ARRIVE), so they need no launch either (and a
dgrad does the same for a BN's backward).

Backward: a conv's input gradient (dgrad: a transposed conv of dy) and weight
gradient (wgrad) are independent, so CONV2D_BACKWARD runs both in one launch,
their programs laid end to end in one grid.
"""
from typing import NamedTuple

import torch
import triton

from . import ACT_CODES
from . import norm
from .norm import merge_counters, reduce_dtype

# The backward kernels' bodies are @triton.jit tile functions of their
# program ids (CONV_TRANSPOSE_TILE, CONV_WGRAD_TILE), one copy per file, with
# the window's geometry as constexprs; a kernel is a thin wrapper that hands
# them its program ids and its geometry.  So one launch can run both a conv's
# input and weight gradients (CONV2D_BACKWARD), and the transposed conv keeps
# its own kernel.
_GEOMETRY_PARAMS = """\
    # the window's geometry
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, G: tl.constexpr,
"""
_GEOMETRY_ARGS = "$KH, $KW, $SH, $SW, $PH, $PW, $DH, $DW, $GROUPS"


def _names(params: str, prefix: str = "") -> list[str]:
    """The parameter names of a signature's text (comments and annotations dropped)."""
    out = []
    for line in params.splitlines():
        line = line.split("#")[0]
        out += [prefix + item.split(":")[0].strip() for item in line.split(",") if item.strip()]
    return out


def _prefixed(params: str, prefix: str) -> str:
    """A signature's text with each parameter renamed prefix + name (and its lines wrapped again)."""
    out = []
    for line in params.splitlines():
        if line.lstrip().startswith("#"):
            out.append(line)
        else:
            out.append("    " + _wrap([prefix + item.strip() for item in line.split(",") if item.strip()], 4) + ",")
    return "\n".join(out) + "\n"


def _runtime(params: str, prefix: str) -> str:
    """A signature's pointers, sizes and strides (what precedes its meta-parameters), prefixed."""
    return _prefixed(params.split("    # meta-parameters\n")[0], prefix)


def _meta(params: str, prefix: str) -> str:
    """A signature's meta-parameters (its constexprs), prefixed."""
    return _prefixed(params.split("    # meta-parameters\n")[1], prefix)


def _wrap(items: list[str], indent: int, width: int = 116) -> str:
    lines, line = [], ""
    for item in items:
        piece = item + ", "
        if line and indent + len(line) + len(piece.rstrip()) > width:
            lines.append(line.rstrip())
            line = ""
        line += piece
    lines.append(line.rstrip().rstrip(","))
    return ("\n" + " " * indent).join(lines)


def _kernel(params: str, tile: str, ids: str) -> str:
    """A kernel whose body is one call of a tile function (see above)."""
    call = f"    {tile}("
    args = _wrap(ids.split(", ") + _names(params) + _GEOMETRY_ARGS.split(", "), len(call))
    return f"@triton.jit\ndef $NAME(\n{params}):\n{call}{args})\n"


CONV2D = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, psum_ptr, pm2_ptr, in_center_ptr, in_scale_ptr, in_shift_ptr,
    count_ptr, bn_w_ptr, bn_b_ptr, rmean_ptr, rvar_ptr, nbt_ptr, mean_ptr, rstd_ptr, bn_scale_ptr, bn_shift_ptr,
    ir_ptr, ir_center_ptr, ir_scale_ptr, ir_shift_ptr, io_ptr, io_bits_ptr,
    # sizes
    N, H, W, C_in, Ho, Wo, C_out, slope, in_slope, eps, momentum,
    # strides
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, srn, src, srh, srw, syn, syc, syh, syw,
    sirn, sirc, sirh, sirw, sion, sioc, sioh, siow,
    # meta-parameters
    ACC: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    STATS: tl.constexpr, MERGE: tl.constexpr, BN_AFFINE: tl.constexpr, BN_TRACK: tl.constexpr,
    IN_BN: tl.constexpr, IN_CENTER: tl.constexpr, IN_ACT: tl.constexpr,
    IN_RES: tl.constexpr, IN_RES_BN: tl.constexpr, IN_RES_CENTER: tl.constexpr, IN_BITS: tl.constexpr,
    IN_GATE: tl.constexpr, IDX64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # IN_GATE (without IN_BN): in_scale_ptr is a squeeze-and-excitation gate,
    # one value per sample and input channel ([N, C_in]), and the conv reads
    # x · gate: the product is never written.
    # IN_RES (with IN_BN; a 1×1, stride-1 conv): x is a residual block's raw
    # conv output, and the block's output act(BN(x) + ir) is made here as it
    # is loaded (ir normalised too with IN_RES_BN, a downsample's deferred
    # BN); the programs of the first column also store it in io (and with
    # IN_BITS its sign bits, store_sign_bits), for the block's
    # other consumers and for backward, so no apply kernel writes it and
    # nothing reads it back for this conv
    $GEOMETRY
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    cin_g = C_in // G
    cout_g = C_out // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < N * Ho * Wo
    n_mask = offs_n < cout_g
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    ow = offs_m % Wo
    oh = (offs_m // Wo) % Ho
    n = offs_m // (Wo * Ho)
    co = g * cout_g + offs_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    # One flat loop over (kernel tap, channel block): it pipelines well and
    # keeps register pressure low (nested tap loops unroll into spills).
    c_blocks = tl.cdiv(cin_g, BLOCK_K)
    for it in range(0, KH * KW * c_blocks):
        tap = it // c_blocks
        c0 = (it - tap * c_blocks) * BLOCK_K
        kh = tap // KW
        kw = tap - kh * KW
        ih = oh * SH - PH + kh * DH
        iw = ow * SW - PW + kw * DW
        pix_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs_k = c0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < cin_g
        a_mask = pix_ok[:, None] & k_mask[None, :]
        a = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + (g * cin_g + offs_k)[None, :] * sxc,
                    mask=a_mask, other=0.0)
        if IN_RES:
            # (1×1, stride 1: ih, iw are oh, ow and offs_m the input pixel; one group)
            a = bn_act_prologue(a, a_mask, offs_k, k_mask, in_center_ptr, in_scale_ptr, in_shift_ptr, IN_CENTER, 0,
                                in_slope, ACC)
            r = tl.load(ir_ptr + (n * sirn + ih * sirh + iw * sirw)[:, None] + offs_k[None, :] * sirc, mask=a_mask,
                        other=0.0)
            if IN_RES_BN:
                r = bn_act_prologue(r, a_mask, offs_k, k_mask, ir_center_ptr, ir_scale_ptr, ir_shift_ptr,
                                    IN_RES_CENTER, 0, in_slope, ACC)
            a = tl.where(a_mask, activation(a + r.to(ACC), IN_ACT, in_slope), 0.0).to(x_ptr.dtype.element_ty)
            if pid_n == 0:
                tl.store(io_ptr + (n * sion + ih * sioh + iw * siow)[:, None] + offs_k[None, :] * sioc, a,
                         mask=a_mask)
                if IN_BITS:
                    store_sign_bits(io_bits_ptr, a, offs_m, m_mask, c0, C_in, BLOCK_M, BLOCK_K)
        elif IN_BN:
            a = bn_act_prologue(a, a_mask, g * cin_g + offs_k, k_mask, in_center_ptr, in_scale_ptr, in_shift_ptr,
                                IN_CENTER, IN_ACT, in_slope, ACC).to(x_ptr.dtype.element_ty)
        elif IN_GATE:
            gate = tl.load(in_scale_ptr + (n * C_in)[:, None] + (g * cin_g + offs_k)[None, :], mask=a_mask, other=0.0)
            a = (a.to(ACC) * gate.to(ACC)).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + co[None, :] * swo + offs_k[:, None] * swi + kh * swh + kw * sww,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + co, mask=n_mask, other=0.0).to(ACC)[None, :]
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + co, mask=n_mask, other=0.0).to(ACC)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + (n * srn + oh * srh + ow * srw)[:, None] + co[None, :] * src, mask=mask, other=0.0)
        acc = acc + r.to(ACC)
    acc = activation(acc, ACT, slope)
    y = acc.to(y_ptr.dtype.element_ty)
    y_off = (n * syn + oh * syh + ow * syw)[:, None] + co[None, :] * syc
    tl.store(y_ptr + y_off, y, mask=mask)
    if STATS:
        # the batch-norm statistics' first pass, on the stored values: per
        # channel, this tile's sum and squared deviations from the tile's mean
        PS = psum_ptr.dtype.element_ty
        v = tl.where(mask, y.to(PS), 0.0)
        s = tl.sum(v, axis=0)
        cnt = tl.minimum(N * Ho * Wo - pid_m * BLOCK_M, BLOCK_M).to(PS)
        d = tl.where(mask, v - (s / cnt)[None, :], 0.0)
        tl.store(psum_ptr + pid_m * C_out + co, s, mask=n_mask)
        tl.store(pm2_ptr + pid_m * C_out + co, tl.sum(d * d, axis=0), mask=n_mask)
        if MERGE:
            # The programs of each column of tiles merge its partials into the
            # batch statistics themselves (no launch of their own): see merge_column.
            M = N * Ho * Wo
            last, mean, m2 = merge_column(psum_ptr, pm2_ptr, count_ptr, pid_m, pid_n, g, tl.num_programs(0),
                                          tl.num_programs(1), tl.num_programs(2), co, n_mask, C_out, M, True, PS,
                                          BLOCK_M, BLOCK_N)
            if last:
                bn_finish(mean, m2 / M, co, n_mask, bn_w_ptr, bn_b_ptr, rmean_ptr, rvar_ptr, nbt_ptr, mean_ptr,
                          rstd_ptr, bn_scale_ptr, bn_shift_ptr, M, eps, momentum, (pid_n == 0) & (g == 0),
                          BN_AFFINE, BN_TRACK)
'''

# A MERGE kernel's place in its two-level tree: its tile row's group of
# BLOCK_M rows, the number of groups, and the counters of its group and of
# its column of tiles (laid out as merge_counters() sizes them).
MERGE_SLOTS = r'''
@triton.jit
def $NAME(count_ptr, pid_m, pid_n, g, grid_m, grid_n, grid_g, BLOCK_M: tl.constexpr):
    n_grp = tl.cdiv(grid_m, BLOCK_M)
    grp = pid_m // BLOCK_M
    col = g * grid_n + pid_n
    grp_slot = count_ptr + col * n_grp + grp
    col_slot = count_ptr + grid_n * grid_g * n_grp + col
    return grp, n_grp, grp_slot, col_slot
'''

# A MERGE kernel's two-level tree over its column of tiles' partials (two
# per tile row and channel, a and b): the last program to finish each group
# of BLOCK_M tiles merges the group's rows into the group's first row, and
# the last group's merger merges those.  Each merger is found by count (see
# last_to_arrive).  CHAN: a and b are sums and squared deviations from the
# tile's mean, merged with Chan's formula into (mean, M2) (bn_merge);
# otherwise plain sums (channel_sums).  Returns whether this program holds
# the column's result, and the result.
MERGE_COLUMN = r'''
@triton.jit
def $NAME(a_ptr, b_ptr, count_ptr, pid_m, pid_n, g, grid_m, grid_n, grid_g, c, c_mask, C, M,
          CHAN: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    grp, n_grp, grp_slot, col_slot = merge_slots(count_ptr, pid_m, pid_n, g, grid_m, grid_n, grid_g, BLOCK_M)
    first = last_to_arrive(grp_slot, tl.minimum(grid_m - grp * BLOCK_M, BLOCK_M))
    last = first & (n_grp == 1)
    a = tl.zeros((BLOCK_N,), dtype=ACC)
    b = tl.zeros((BLOCK_N,), dtype=ACC)
    if first:
        t_end = tl.minimum(grid_m, grp * BLOCK_M + BLOCK_M)
        if CHAN:
            a, b = bn_merge(a_ptr, b_ptr, c, c_mask, C, grp * BLOCK_M, t_end, 1, BLOCK_M, M, ACC, BLOCK_M, BLOCK_N)
        else:
            a, b = channel_sums(a_ptr, b_ptr, c, c_mask, C, grp * BLOCK_M, t_end, 1, ACC, BLOCK_M, BLOCK_N)
        if n_grp > 1:
            row = grp * BLOCK_M * C + c
            if CHAN:  # the group's sum and M2, as its tiles' were stored
                n_g = tl.minimum(M - grp * BLOCK_M * BLOCK_M, BLOCK_M * BLOCK_M).to(ACC)
                tl.store(a_ptr + row, a * n_g, mask=c_mask)
            else:
                tl.store(a_ptr + row, a, mask=c_mask)
            tl.store(b_ptr + row, b, mask=c_mask)
            last = last_to_arrive(col_slot, n_grp)
            if last:
                if CHAN:
                    a, b = bn_merge(a_ptr, b_ptr, c, c_mask, C, 0, grid_m, BLOCK_M, BLOCK_M, M, ACC, BLOCK_M, BLOCK_N)
                else:
                    a, b = channel_sums(a_ptr, b_ptr, c, c_mask, C, 0, grid_m, BLOCK_M, ACC, BLOCK_M, BLOCK_N)
    return last, a, b
'''

# True in the last of `expected` programs to arrive at a counter, after
# which it may read what the others stored before they arrived.  Every
# thread's stores, a CTA barrier, then one thread's acq_rel atomic: the
# order CUTLASS's split-K semaphore and Inductor's grid barrier rely on; the
# loads that follow go to L2 (.cg).  Nobody waits, so it holds however the
# programs are scheduled.  The last arrival resets the counter for the next
# launch on the stream.
LAST_TO_ARRIVE = r'''
@triton.jit
def $NAME(slot, expected):
    tl.debug_barrier()
    last = tl.atomic_add(slot, 1, sem="acq_rel") == expected - 1
    if last:
        tl.atomic_xchg(slot, 0)
        tl.debug_barrier()
    return last
'''

# A per-channel vector (a BN statistic or coefficient) for the channels c of
# a tile, broadcast along the tile: channels run along AXIS (1: columns, 0: rows).
CHANNEL_VECTOR = r'''
@triton.jit
def $NAME(ptr, c, c_mask, ACC: tl.constexpr, AXIS: tl.constexpr):
    v = tl.load(ptr + c, mask=c_mask, other=0.0).to(ACC)
    if AXIS == 1:
        v = v[None, :]
    else:
        v = v[:, None]
    return v
'''

# A deferred batch norm + activation applied as a conv's input is loaded:
# the producing layer stored only its conv output (and its statistics), so
# the normalised activation never makes a round trip through memory.
# Padding and out-of-range pixels stay zero, as they are in the activation.
BN_ACT_PROLOGUE = r'''
@triton.jit
def $NAME(v, mask, c, c_mask, center_ptr, scale_ptr, shift_ptr, HAS_CENTER: tl.constexpr, ACT: tl.constexpr, slope,
          ACC: tl.constexpr):
    v = v.to(ACC)
    if HAS_CENTER:
        v = v - channel_vector(center_ptr, c, c_mask, ACC, 1)
    v = v * channel_vector(scale_ptr, c, c_mask, ACC, 1) + channel_vector(shift_ptr, c, c_mask, ACC, 1)
    v = activation(v, ACT, slope)
    return tl.where(mask, v, 0.0)
'''

# The backward of such a deferred batch norm + activation, on a tile of dy
# (the activation's gradient) and x (the conv output it was applied to):
# g = dy·act'(y), with y recomputed exactly as the consumer's prologue made
# it, and x̂ = (x − mean)·rstd.  Channels run along AXIS (1: columns, 0: rows).
# Out-of-range elements give zeros.
BN_ACT_GRAD = r'''
@triton.jit
def $NAME(dy, x, mask, c, c_mask, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, CENTER: tl.constexpr, ACT: tl.constexpr,
          slope, ACC: tl.constexpr, AXIS: tl.constexpr):
    mean = channel_vector(mean_ptr, c, c_mask, ACC, AXIS)
    x = x.to(ACC)
    g = dy.to(ACC)
    if ACT != 0:
        scale = channel_vector(scale_ptr, c, c_mask, ACC, AXIS)
        shift = channel_vector(shift_ptr, c, c_mask, ACC, AXIS)
        if CENTER:
            y = (x - mean) * scale + shift
        else:  # eval: folded to x·scale + shift
            y = x * scale + shift
        g = activation_grad(g, activation(y, ACT, slope), ACT, slope)
    xh = (x - mean) * channel_vector(rstd_ptr, c, c_mask, ACC, AXIS)
    return tl.where(mask, g, 0.0), tl.where(mask, xh, 0.0)
'''

# ... and the batch norm's input gradient from it, dx = A·g + B + C·x̂ (coef
# holds A, B, C per channel; B = C = 0 with fixed statistics), for a conv's
# dgrad or wgrad to apply as it loads dy: dx never goes through memory.
BN_GRAD_PROLOGUE = r'''
@triton.jit
def $NAME(dy, x, mask, c, c_mask, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, coef_ptr, C, CENTER: tl.constexpr,
          ACT: tl.constexpr, slope, TRAIN: tl.constexpr, ACC: tl.constexpr, AXIS: tl.constexpr):
    g, xh = bn_act_grad(dy, x, mask, c, c_mask, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, CENTER, ACT, slope, ACC, AXIS)
    dx = channel_vector(coef_ptr, c, c_mask, ACC, AXIS) * g
    if TRAIN:
        dx = dx + channel_vector(coef_ptr + C, c, c_mask, ACC, AXIS) \
            + channel_vector(coef_ptr + 2 * C, c, c_mask, ACC, AXIS) * xh
    return tl.where(mask, dx, 0.0)
'''

# Transposed conv gathers: output pixel (oh, ow) takes input (ih, iw) where
# oh = ih·S − P + kh·D, i.e. ih = (oh + P − kh·D) / S when that divides exactly.
_TRANSPOSE_PARAMS = """\
    # pointers
    x_ptr, w_ptr, shift_ptr, res_ptr, y_ptr,
    ix_ptr, in_mean_ptr, in_rstd_ptr, in_scale_ptr, in_shift_ptr, in_coef_ptr,
    ox_ptr, out_mean_ptr, out_rstd_ptr, out_scale_ptr, out_shift_ptr, pg_ptr, pgx_ptr, oy_ptr,
    count_ptr, out_w_ptr, out_dw_ptr, out_db_ptr, out_dcb_ptr, out_coef_ptr,
    wx_ptr, wx_center_ptr, wx_scale_ptr, wx_shift_ptr, dw_ptr, rx_ptr, rx_mean_ptr, rx_rstd_ptr, rpg_ptr, rpgx_ptr,
    # sizes
    N, H, W, C_in, Ho, Wo, C_out, in_slope, out_slope, wx_slope,
    # strides
    sxn, sxc, sxh, sxw, swi, swo, swh, sww, srn, src, srh, srw, syn, syc, syh, syw, sin, sic, sih, siw,
    son, soc, soh, sow, sfn, sfc, sfh, sfw, swxn, swxc, swxh, swxw, sdwi, sdwo, srxn, srxc, srxh, srxw,
    # meta-parameters
    ACC: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
    IN_BNG: tl.constexpr, IN_CENTER: tl.constexpr, IN_ACT: tl.constexpr, IN_TRAIN: tl.constexpr,
    OUT_BNG: tl.constexpr, OUT_CENTER: tl.constexpr, OUT_ACT: tl.constexpr, OUT_MASK: tl.constexpr,
    MASK_BITS: tl.constexpr, MERGE: tl.constexpr, OUT_AFFINE: tl.constexpr, OUT_TRAIN: tl.constexpr, OUT_CBIAS: tl.constexpr,
    IN_ACTG: tl.constexpr, WGRAD_ADD: tl.constexpr, WX_BN: tl.constexpr, WX_CENTER: tl.constexpr, WX_ACT: tl.constexpr,
    RES_SUMS: tl.constexpr,
    IDX64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
"""

CONV_TRANSPOSE_TILE = (
    "@triton.jit\ndef $NAME(\n    # the tile's program ids, and the grid's size\n"
    "    pid_m, pid_n, g, grid_m, grid_n, grid_g,\n" + _TRANSPOSE_PARAMS + _GEOMETRY_PARAMS + "):\n" + r'''    # As a conv's dgrad, two deferred batch norms' backward can ride along.
    # IN_BNG: x is the gradient of a deferred BN + act's output, ix the conv
    # output it normalised; the BN's backward dx = A·g + B + C·x̂ is applied
    # as x is loaded (bn_grad_prologue), so that gradient is never stored.
    # OUT_BNG: y is the gradient of the activation a deferred BN + act made of
    # ox (this conv's input): each tile also writes per channel Σ g and Σ g·x̂,
    # g = y·act', the sums that BN's backward needs (no pass over y for them).
    # HAS_RES: res is another consumer's gradient of this dgrad's (forked)
    # input, added here instead of by a separate sum.
    # IN_ACTG (an activation): x is the gradient of act's output, ix that
    # output (a conv + act without BN): act' is applied as x is loaded.
    # OUT_MASK (an activation): this conv's input is oy = act(BN(ox) + res),
    # stored (a residual block's output); with every consumer's gradient
    # summed, the result is taken through act' (from oy) before it is stored,
    # and OUT_BNG's sums are those of that BN: its reduction pass is gone.
    # MASK_BITS (with OUT_MASK a relu or leaky relu): oy holds only y > 0, a
    # bit per channel (store_sign_bits), not y itself.
    # MERGE (with OUT_BNG): the programs also merge those sums, as CONV2D's
    # MERGE does its statistics, and the last merger finishes that BN's
    # backward (bn_grad_finish): its parameter gradients, and the
    # coefficients of its input gradient.
    # WGRAD_ADD (a 1×1, stride-1, ungrouped conv's dgrad): the weight gradient
    # rides along.  Each K step's gradient chunk a (this conv's output
    # gradient, the BN backward applied) meets the tile of the conv's input
    # wx at the same pixels (WX_BN: its deferred BN + act applied), and
    # aᵀ·wx is atomically added to dw (zeroed before the launch): the wgrad
    # would read a's tensors again, these programs already have them.
    # RES_SUMS (a 1×1, stride-1 dgrad too): x is also the output gradient of
    # another deferred BN without an activation, on rx (a residual block's
    # downsample BN, whose output the block added to this conv's): the first
    # column of programs stores per tile and channel Σ x and Σ x·x̂ of that BN
    # (rpg, rpgx), so its backward's sums need no pass over x and rx.
    cin_g = C_in // G
    cout_g = C_out // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < N * Ho * Wo
    n_mask = offs_n < cout_g
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    ow = offs_m % Wo
    oh = (offs_m // Wo) % Ho
    n = offs_m // (Wo * Ho)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if WGRAD_ADD:
        tl.static_assert((KH == 1) & (KW == 1) & (SH == 1) & (SW == 1) & (PH == 0) & (PW == 0) & (G == 1),
                         "the weight gradient rides only in a 1×1, stride-1, ungrouped conv's dgrad")
        wx_mask = m_mask[:, None] & n_mask[None, :]
        wx = tl.load(wx_ptr + (n * swxn + oh * swxh + ow * swxw)[:, None] + offs_n[None, :] * swxc, mask=wx_mask,
                     other=0.0)
        if WX_BN:
            wx = bn_act_prologue(wx, wx_mask, offs_n, n_mask, wx_center_ptr, wx_scale_ptr, wx_shift_ptr,
                                 WX_CENTER, WX_ACT, wx_slope, ACC)
        wx = wx.to(x_ptr.dtype.element_ty)
    c_blocks = tl.cdiv(cin_g, BLOCK_K)
    for it in tl.range(0, KH * KW * c_blocks, num_stages=STAGES):
        tap = it // c_blocks
        c0 = (it - tap * c_blocks) * BLOCK_K
        kh = tap // KW
        kw = tap - kh * KW
        th = oh + PH - kh * DH
        ih = th // SH
        tw = ow + PW - kw * DW
        iw = tw // SW
        pix_ok = m_mask & (th >= 0) & (th - ih * SH == 0) & (ih < H) & (tw >= 0) & (tw - iw * SW == 0) & (iw < W)
        offs_k = c0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < cin_g
        ci = g * cin_g + offs_k
        a_mask = pix_ok[:, None] & k_mask[None, :]
        a = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + ci[None, :] * sxc, mask=a_mask, other=0.0)
        if RES_SUMS:
            tl.static_assert((KH == 1) & (KW == 1) & (SH == 1) & (SW == 1) & (PH == 0) & (PW == 0) & (G == 1),
                             "a residual BN's sums ride only in a 1×1, stride-1, ungrouped conv's dgrad")
            if pid_n == 0:  # (one column of programs: each pixel and channel once)
                rx = tl.load(rx_ptr + (n * srxn + ih * srxh + iw * srxw)[:, None] + ci[None, :] * srxc, mask=a_mask,
                             other=0.0)
                PS = rpg_ptr.dtype.element_ty
                rg = a.to(PS)  # (zero outside the tile's pixels and channels: so is rg·x̂)
                rxh = (rx.to(PS) - channel_vector(rx_mean_ptr, ci, k_mask, PS, 1)) \
                    * channel_vector(rx_rstd_ptr, ci, k_mask, PS, 1)
                tl.store(rpg_ptr + pid_m * C_in + ci, tl.sum(rg, axis=0), mask=k_mask)
                tl.store(rpgx_ptr + pid_m * C_in + ci, tl.sum(rg * rxh, axis=0), mask=k_mask)
        if IN_BNG:
            ix = tl.load(ix_ptr + (n * sin + ih * sih + iw * siw)[:, None] + ci[None, :] * sic, mask=a_mask, other=0.0)
            a = bn_grad_prologue(a, ix, a_mask, ci, k_mask, in_mean_ptr, in_rstd_ptr, in_scale_ptr, in_shift_ptr,
                                 in_coef_ptr, C_in, IN_CENTER, IN_ACT, in_slope, IN_TRAIN, ACC, 1).to(x_ptr.dtype.element_ty)
        if IN_ACTG != 0:
            iy = tl.load(ix_ptr + (n * sin + ih * sih + iw * siw)[:, None] + ci[None, :] * sic, mask=a_mask, other=0.0)
            a = activation_grad(a.to(ACC), iy.to(ACC), IN_ACTG, in_slope).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + ci[:, None] * swi + offs_n[None, :] * swo + kh * swh + kw * sww,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
        if WGRAD_ADD:  # (a is zero outside the pixels and channels, wx outside the pixels)
            dw_part = tl.dot(tl.trans(a), wx, input_precision=PRECISION)
            tl.atomic_add(dw_ptr + ci[:, None] * sdwi + offs_n[None, :] * sdwo, dw_part,
                          mask=k_mask[:, None] & n_mask[None, :], sem="relaxed")
    co = g * cout_g + offs_n
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + co, mask=n_mask, other=0.0).to(ACC)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + (n * srn + oh * srh + ow * srw)[:, None] + co[None, :] * src, mask=mask, other=0.0)
        acc = acc + r.to(ACC)
    if OUT_MASK != 0:
        if MASK_BITS:  # (relu' and leaky relu' need only the sign)
            byte = tl.load(oy_ptr + offs_m[:, None] * (C_out // 8) + (co // 8)[None, :], mask=mask, other=0)
            fy = tl.where(((byte.to(tl.int32) >> (co % 8)[None, :]) & 1) != 0, 1.0, 0.0)
        else:
            fy = tl.load(oy_ptr + (n * sfn + oh * sfh + ow * sfw)[:, None] + co[None, :] * sfc, mask=mask, other=0.0)
        acc = activation_grad(acc, fy.to(ACC), OUT_MASK, out_slope)
    y = acc.to(y_ptr.dtype.element_ty)
    y_off = (n * syn + oh * syh + ow * syw)[:, None] + co[None, :] * syc
    tl.store(y_ptr + y_off, y, mask=mask)
    if OUT_BNG:  # from the stored values, as the BN backward's apply will read them
        ox = tl.load(ox_ptr + (n * son + oh * soh + ow * sow)[:, None] + co[None, :] * soc, mask=mask, other=0.0)
        gb, xh = bn_act_grad(y, ox, mask, co, n_mask, out_mean_ptr, out_rstd_ptr, out_scale_ptr, out_shift_ptr,
                             OUT_CENTER, OUT_ACT, out_slope, pg_ptr.dtype.element_ty, 1)
        tl.store(pg_ptr + pid_m * C_out + co, tl.sum(gb, axis=0), mask=n_mask)
        tl.store(pgx_ptr + pid_m * C_out + co, tl.sum(gb * xh, axis=0), mask=n_mask)
        if MERGE:  # as CONV2D's (merge_column), over sums
            PS = pg_ptr.dtype.element_ty
            last, sg, sgx = merge_column(pg_ptr, pgx_ptr, count_ptr, pid_m, pid_n, g, grid_m, grid_n, grid_g, co,
                                         n_mask, C_out, N * Ho * Wo, False, PS, BLOCK_M, BLOCK_N)
            if last:
                bn_grad_finish(sg, sgx, tl.zeros_like(sg), co, n_mask, C_out, N * Ho * Wo,
                               tl.load(out_rstd_ptr + co, mask=n_mask, other=0.0).to(PS), out_w_ptr, out_dw_ptr,
                               out_db_ptr, out_dcb_ptr, out_coef_ptr, OUT_AFFINE, OUT_TRAIN, OUT_CBIAS)
''')

# A transposed conv layer's forward: the dgrad's tile with none of its backward roles.  Its own narrow
# signature hands the tile a dummy pointer (y's), zero strides and slopes, and constexpr 0 for every role, so a
# launch passes 31 arguments instead of the tile's 107.
_PLAIN_TRANSPOSE_PARAMS = """\
    # pointers
    x_ptr, w_ptr, shift_ptr, y_ptr,
    # sizes
    N, H, W, C_in, Ho, Wo, C_out,
    # strides
    sxn, sxc, sxh, sxw, swi, swo, swh, sww, syn, syc, syh, syw,
    # meta-parameters
    ACC: tl.constexpr, HAS_SHIFT: tl.constexpr, IDX64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
"""


def _plain_transpose_kernel() -> str:
    own = set(_names(_PLAIN_TRANSPOSE_PARAMS))
    meta = set(_names(_TRANSPOSE_PARAMS.split("    # meta-parameters\n")[1]))

    def arg(name):
        if name in own:
            return name
        if name.endswith("_ptr"):
            return "y_ptr"
        return "0" if name in meta or name.startswith("s") else "0.0"  # (a role's flag, a stride; a slope)

    ids = "tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0), tl.num_programs(1), " \
          "tl.num_programs(2)"
    call = "    conv_transpose_tile("
    args = _wrap(ids.split(", ") + [arg(n) for n in _names(_TRANSPOSE_PARAMS)] + _GEOMETRY_ARGS.split(", "), len(call))
    return f"@triton.jit\ndef $NAME(\n{_PLAIN_TRANSPOSE_PARAMS}):\n{call}{args})\n"


CONV_TRANSPOSE2D = _plain_transpose_kernel()


# Weight gradient (backward of CONV2D): for each tap and group,
# dW[co, ci] = Σ over N·Ho·Wo of dY[·, co] · X[·, ci] at the tap's input pixel.
_WGRAD_PARAMS = """\
    # pointers
    dy_ptr, x_ptr, dw_ptr, in_center_ptr, in_scale_ptr, in_shift_ptr,
    gx_ptr, g_mean_ptr, g_rstd_ptr, g_scale_ptr, g_shift_ptr, g_coef_ptr, db_ptr, part_ptr, count_ptr,
    # sizes
    N, H, W, C_in, Ho, Wo, C_out, in_slope, g_slope, n_split, k_chunk,
    # strides
    sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw, swo, swi, swh, sww, sgn, sgc, sgh, sgw,
    # meta-parameters
    ACC: tl.constexpr, IN_BN: tl.constexpr, IN_CENTER: tl.constexpr, IN_ACT: tl.constexpr,
    G_BNG: tl.constexpr, G_CENTER: tl.constexpr, G_ACT: tl.constexpr, G_TRAIN: tl.constexpr,
    G_ACTG: tl.constexpr, DBIAS: tl.constexpr, SPLIT_K: tl.constexpr, IDX64: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
"""

CONV_WGRAD_TILE = (
    "@triton.jit\ndef $NAME(\n    # the tile's program ids\n"
    "    pid_co, pid_ci, pid_z,\n" + _WGRAD_PARAMS + _GEOMETRY_PARAMS + "):\n" + r'''    # G_ACTG (an activation): dy is the gradient of act's output, gx that
    # output; act' is applied as dy is loaded (as the dgrad's IN_ACTG).
    # DBIAS: the programs of the first input-channel block and tap, which
    # between them read all of dy once, also sum it per output channel: the
    # conv bias's gradient, without a pass of its own.
    # SPLIT_K: few tiles (a first layer's 3 input channels: one tile a tap),
    # so the pixels are split too, into n_split chunks of k_chunk, one
    # program each (pid_z's fastest digit).  Each stores its partial tile in
    # part (and db's in part's tail), and the last of a tile's programs to
    # arrive sums them, in chunk order, into dw: split-K, deterministic.
    cin_g = C_in // G
    cout_g = C_out // G
    offs_co = pid_co * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ci = pid_ci * BLOCK_N + tl.arange(0, BLOCK_N)
    k_begin = 0
    if SPLIT_K:
        split = pid_z % n_split
        pid_z = pid_z // n_split
        k_begin = split * k_chunk
    g = pid_z // (KH * KW)
    tap = pid_z - g * (KH * KW)
    kh = tap // KW
    kw = tap - kh * KW
    co_mask = offs_co < cout_g
    ci_mask = offs_ci < cin_g
    co = g * cout_g + offs_co
    ci = g * cin_g + offs_ci
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    db = tl.zeros((BLOCK_M,), dtype=ACC)
    for m0 in tl.range(k_begin, tl.minimum(k_begin + k_chunk, N * Ho * Wo), BLOCK_K, num_stages=STAGES):
        offs_m = m0 + tl.arange(0, BLOCK_K)
        if IDX64:
            offs_m = offs_m.to(tl.int64)
        m_mask = offs_m < N * Ho * Wo
        ow = offs_m % Wo
        oh = (offs_m // Wo) % Ho
        n = offs_m // (Wo * Ho)
        ih = oh * SH - PH + kh * DH
        iw = ow * SW - PW + kw * DW
        pix_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a_mask = co_mask[:, None] & m_mask[None, :]
        a = tl.load(dy_ptr + co[:, None] * sdc + (n * sdn + oh * sdh + ow * sdw)[None, :], mask=a_mask, other=0.0)
        if G_BNG:  # dy is a deferred BN + act's output gradient: its backward applied here, as in the dgrad
            gx = tl.load(gx_ptr + co[:, None] * sgc + (n * sgn + oh * sgh + ow * sgw)[None, :], mask=a_mask, other=0.0)
            a = bn_grad_prologue(a, gx, a_mask, co, co_mask, g_mean_ptr, g_rstd_ptr, g_scale_ptr, g_shift_ptr,
                                 g_coef_ptr, C_out, G_CENTER, G_ACT, g_slope, G_TRAIN, ACC, 0).to(dy_ptr.dtype.element_ty)
        if G_ACTG != 0:
            gy = tl.load(gx_ptr + co[:, None] * sgc + (n * sgn + oh * sgh + ow * sgw)[None, :], mask=a_mask, other=0.0)
            a = activation_grad(a.to(ACC), gy.to(ACC), G_ACTG, g_slope).to(dy_ptr.dtype.element_ty)
        if DBIAS:
            db += tl.sum(a.to(ACC), axis=1)
        b_mask = pix_ok[:, None] & ci_mask[None, :]
        b = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + ci[None, :] * sxc, mask=b_mask, other=0.0)
        if IN_BN:
            b = bn_act_prologue(b, b_mask, ci, ci_mask, in_center_ptr, in_scale_ptr, in_shift_ptr,
                                IN_CENTER, IN_ACT, in_slope, ACC).to(x_ptr.dtype.element_ty)
        acc += tl.dot(a, b, input_precision=PRECISION)
    w_mask = co_mask[:, None] & ci_mask[None, :]
    dw_off = co[:, None] * swo + offs_ci[None, :] * swi + kh * swh + kw * sww
    if SPLIT_K:
        # part: n_split slices of [C_out, cin_g, KH, KW], then n_split rows of db's C_out
        size = C_out * cin_g * KH * KW
        p_off = co[:, None] * (cin_g * KH * KW) + offs_ci[None, :] * (KH * KW) + kh * KW + kw
        tl.store(part_ptr + split * size + p_off, acc, mask=w_mask)
        if DBIAS:
            if (pid_ci == 0) & (tap == 0):
                tl.store(part_ptr + n_split * size + split * C_out + co, db, mask=co_mask)
        tile = (pid_co * tl.cdiv(cin_g, BLOCK_N) + pid_ci) * (G * KH * KW) + pid_z
        if last_to_arrive(count_ptr + tile, n_split):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
            db = tl.zeros((BLOCK_M,), dtype=ACC)
            for k in range(0, n_split):  # .cg: from L2, where the other programs' partials landed
                acc += tl.load(part_ptr + k * size + p_off, mask=w_mask, other=0.0, cache_modifier=".cg")
                if DBIAS:
                    db += tl.load(part_ptr + n_split * size + k * C_out + co, mask=co_mask, other=0.0,
                                  cache_modifier=".cg")
            # (the stores in each branch, not masked by the arrival: the interpreter of Triton 3.9 refuses
            # an atomic's result in a mask)
            tl.store(dw_ptr + dw_off, acc.to(dw_ptr.dtype.element_ty), mask=w_mask)
            if DBIAS:
                if (pid_ci == 0) & (tap == 0):
                    tl.store(db_ptr + co, db.to(db_ptr.dtype.element_ty), mask=co_mask)
    else:
        tl.store(dw_ptr + dw_off, acc.to(dw_ptr.dtype.element_ty), mask=w_mask)
        if DBIAS:
            if (pid_ci == 0) & (tap == 0):
                tl.store(db_ptr + co, db.to(db_ptr.dtype.element_ty), mask=co_mask)
''')

CONV2D_WGRAD = _kernel(_WGRAD_PARAMS, "conv_wgrad_tile", "tl.program_id(0), tl.program_id(1), tl.program_id(2)")


# A conv's whole backward in one launch: its weight gradient's programs
# (w_*, as CONV2D_WGRAD's) and its input gradient's (d_*, as the dgrad
# CONV_TRANSPOSE2D's), laid end to end in one grid.  DGRAD / WGRAD: which
# parts run (a first layer has no input gradient).
CONV2D_BACKWARD = (
    "@triton.jit\ndef $NAME(\n    # the input gradient's (a transposed conv of dy)\n" + _runtime(_TRANSPOSE_PARAMS, "d_")
    + "    # the weight gradient's\n" + _runtime(_WGRAD_PARAMS, "w_") + """\
    # the two grids: the wgrad's (its first n_wgrad programs), then the dgrad's
    n_wgrad, w_grid_co, w_grid_ci, d_grid_m, d_grid_n, d_grid_g,
    # meta-parameters: the input gradient's, the weight gradient's, and which parts run
""" + _meta(_TRANSPOSE_PARAMS, "d_") + _meta(_WGRAD_PARAMS, "w_") + """\
    DGRAD: tl.constexpr, WGRAD: tl.constexpr,
):
    # The wgrad's programs go first: each walks all N·Ho·Wo pixels, the
    # longest, and the dgrad's short ones fill in behind them.
    pid = tl.program_id(0)
    if WGRAD:
        if pid < n_wgrad:
            conv_wgrad_tile(""" + _wrap(["pid % w_grid_co", "(pid // w_grid_co) % w_grid_ci", "pid // (w_grid_co * w_grid_ci)"]
                                        + _names(_WGRAD_PARAMS, "w_") + _GEOMETRY_ARGS.split(", "), 28) + """)
    if DGRAD:
        if pid >= n_wgrad:
            p = pid - n_wgrad
            conv_transpose_tile(""" + _wrap(["p % d_grid_m", "(p // d_grid_m) % d_grid_n", "p // (d_grid_m * d_grid_n)",
                                             "d_grid_m", "d_grid_n", "d_grid_g"]
                                            + _names(_TRANSPOSE_PARAMS, "d_") + _GEOMETRY_ARGS.split(", "), 32) + ")\n")


def _pow2(n, lo, hi):
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def gpu_options(rt, x) -> dict:
    # 8 warps for the 64×64 tiles: with 4, Triton 3.9 spilled (255 registers,
    # ResNet-50's 1×1 convs); with 8 the worst measured was 137 (sm_80/sm_90)
    return {"num_warps": 8} if rt.gpu_tiles(x) else {}


def conv_blocks(M, cout_g, cin_g, on_gpu):
    # tl.dot needs every block dimension >= 16.  The interpreter prefers big
    # tiles (fewer, larger numpy ops); GPU sizes are a starting point for autotuning.
    if on_gpu:
        return 64 if M >= 64 else 16, _pow2(cout_g, 16, 64), _pow2(cin_g, 16, 32)
    # the interpreter has no tensor-core minimum: tiles fit the channels exactly
    bn, bk = _pow2(cout_g, 1, 512), _pow2(cin_g, 1, 512)
    return _pow2(M, 16, _CPU_TILE // max(bn, bk)), bn, bk


# Elements per interpreted tile: each interpreted op costs ~0.1 ms of Python
# whatever its size, so tiles grow until numpy's own work dominates.
_CPU_TILE = 1 << 18


def _flags(**named) -> str:
    """What of a launch changes its compiled kernel besides the shapes, for a tuning key: "shift.act1.stats"."""
    return ".".join(k if v is True else f"{k}{int(v)}" for k, v in named.items() if v is not False and v)


def _conv_site(x, weight, out, scale=None, shift=None, residual=None, act=None, slope=0.01, stride=(1, 1),
               padding=(0, 0), dilation=(1, 1), groups=1, stats=False, prologue=None, merge=None, block=None,
               gate=None):
    return (x, weight, out), _flags(scale=scale is not None, shift=shift is not None, res=residual is not None,
                                    act=ACT_CODES[act], stats=stats, merge=merge is not None,
                                    prologue=prologue is not None and 1 + ACT_CODES[prologue[3]],
                                    block=block is not None and 1 + (block.res_affine is not None)
                                    + 2 * (block.bits is not None), gate=gate is not None)


def _config_options(rt, x, options, config):
    """Launch options with a tuned config's num_warps / num_stages (GPU launches only)."""
    if rt.gpu_tiles(x):
        options.update({k: config[k] for k in ("num_warps", "num_stages") if k in config})
    return options


def conv2d(rt, kernel, x, weight, out, scale=None, shift=None, residual=None, act=None, slope=0.01,
           stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, stats=False, prologue=None, merge=None,
           block=None, gate=None, config=None):
    """out[N, C_out, Ho, Wo] = act(conv(x, weight) · scale + shift + residual).
    With stats, returns (out, (psum, pm2, tile)): the per-tile partial sums
    norm.bn_stats merges into batch statistics.  merge (with stats, a batch
    norm with batch statistics): the kernel's last programs merge them
    itself, and the second result is the norm.BatchStats (its running
    statistics are updated too).  prologue = (center, scale, shift, act,
    slope): x is a conv output whose batch norm and activation
    act((x − center)·scale + shift) are applied as it is loaded.  block (a
    BlockInput; with prologue, whose act is the block's, on a 1×1 stride-1
    conv): x is a residual block's raw conv output and the block's output
    act(BN(x) + residual) is made as x is loaded, and stored in block.out
    (and its bits).  gate ([N, C_in, 1, 1], no prologue): the conv reads
    x · gate, a squeeze-and-excitation product, as it loads x.  config: a
    tuned {BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages} (tuning.py) over
    the defaults below; None: the tuned one for this shape, if any."""
    config = config or {}
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    Ho, Wo = out.shape[2], out.shape[3]
    M = N * Ho * Wo
    on_gpu = rt.gpu_tiles(x)
    BM, BN, BK = conv_blocks(M, C_out // groups, C_in // groups, on_gpu)
    BM, BN, BK = config.get("BLOCK_M", BM), config.get("BLOCK_N", BN), config.get("BLOCK_K", BK)
    # with the merge along, ptxas capped a grouped 3×3 conv at 64 registers on sm_80 and spilled
    # 4 bytes (Triton 3.6): lift the cap, as the BN-backward dgrads and the wgrads do
    options = _config_options(rt, x, dict(gpu_options(rt, x), **({"maxnreg": 255} if on_gpu and merge is not None
                                                                   else {})), config)
    dummy = out
    r = residual if residual is not None else dummy
    grid = (triton.cdiv(M, BM), triton.cdiv(C_out // groups, BN), groups)
    psum = pm2 = dummy
    if stats:
        ps = reduce_dtype(rt, x)
        psum, pm2 = (torch.empty((grid[0], C_out), device=x.device, dtype=ps) for _ in range(2))
    pptrs, pslope, pmeta = _prologue_args(prologue, dummy)
    if gate is not None:
        assert prologue is None and tuple(gate.shape) == (N, C_in, 1, 1) and gate.stride()[:2] == (C_in, 1), \
            "a gate is one value per sample and input channel, loaded in place of a deferred batch norm's"
        pptrs = (dummy, gate, dummy)
    bptrs, bstrides, bmeta = _block_args(block, dummy)
    if block is not None:
        assert prologue is not None and (KH, KW) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) \
            and groups == 1, "a block output is made only as a 1×1, stride-1 conv loads it"
    mptrs, mscalars, mmeta, merged = (dummy,) * 10, (0.0, 0.0), dict(BN_AFFINE=False, BN_TRACK=False), None
    if merge is not None:
        assert stats, "merging batch statistics needs the partials"
        norm.check_batch(merge, out.shape)
        merged = rt.batch_stats_empty(C_out, out)
        bnptrs, mscalars, bnmeta = norm.bn_operands(merge, merged)
        mptrs = (rt.counters(x.device, merge_counters(grid, BM)),) + bnptrs
        mmeta = dict(BN_AFFINE=bnmeta["AFFINE"], BN_TRACK=bnmeta["TRACK"])
    rt.launch(kernel, grid,
              x, weight, scale if scale is not None else dummy, shift if shift is not None else dummy, r, out,
              psum, pm2, *pptrs, *mptrs, *bptrs, N, H, W, C_in, Ho, Wo, C_out, float(slope), pslope, *mscalars,
              *x.stride(), *weight.stride(), *r.stride(), *out.stride(), *bstrides,
              HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_RES=residual is not None,
              ACT=ACT_CODES[act], STATS=stats, MERGE=merge is not None, **mmeta, **pmeta, **bmeta,
              IN_GATE=gate is not None, IDX64=rt.needs_int64(x, weight, out, r), PRECISION=rt.precision(x),
              ACC=rt.acc(x), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, **options)
    if not stats:
        return out
    return out, merged if merged is not None else (psum, pm2, BM)


class BlockInput(NamedTuple):
    """A residual block's output y = act(BN(x) + residual), left for its
    next conv to make as it loads x (conv2d's block): the residual (a tensor),
    res_affine (center or None, scale, shift: the residual's own deferred BN,
    a downsample's) or None, out where y is stored, bits (norm.relu_bits) or None."""
    residual: torch.Tensor
    res_affine: object
    out: torch.Tensor
    bits: object


def _block_args(block, dummy):
    """(ir, ir center, scale, shift, io, io bits pointers), their strides, and the IN_RES constexprs."""
    if block is None:
        return (dummy,) * 6, (0,) * 8, dict(IN_RES=False, IN_RES_BN=False, IN_RES_CENTER=False, IN_BITS=False)
    rc, rs, rh = block.res_affine if block.res_affine is not None else (None, dummy, dummy)
    ptrs = (block.residual, rc if rc is not None else rs, rs, rh, block.out,
            block.bits if block.bits is not None else dummy)
    return ptrs, (*block.residual.stride(), *block.out.stride()), \
        dict(IN_RES=True, IN_RES_BN=block.res_affine is not None, IN_RES_CENTER=rc is not None,
             IN_BITS=block.bits is not None)


def _prologue_args(prologue, dummy):
    """(center, scale, shift pointers), in_slope, and the IN_* constexprs of a deferred BN + act."""
    if prologue is None:
        return (dummy, dummy, dummy), 0.0, dict(IN_BN=False, IN_CENTER=False, IN_ACT=0)
    center, scale, shift, act, slope = prologue
    return ((center if center is not None else scale), scale, shift), float(slope), \
        dict(IN_BN=True, IN_CENTER=center is not None, IN_ACT=ACT_CODES[act])


class BNGrad(NamedTuple):
    """A deferred batch norm + activation, for the backward kernels that
    handle it: x is the conv output it normalised, y = act((x − mean)·scale +
    shift) (x·scale + shift when not center) is how the forward applied it,
    rstd its x̂ = (x − mean)·rstd; coef (A, B, C per channel) gives its input
    gradient A·g + B + C·x̂ (train: batch statistics, else B = C = 0)."""
    x: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    center: bool
    act: object
    slope: float
    train: bool
    coef: object = None


class ActGrad(NamedTuple):
    """dy is the gradient of act's output y (a conv + act, no BN): the backward
    kernels apply act' as they load it, so g = dy·act'(y) is never stored."""
    y: torch.Tensor
    act: object
    slope: float


def _bng_args(bng, dummy):
    """(x, mean, rstd, scale, shift, coef pointers), slope, x's strides, (BNG, CENTER, ACT, TRAIN) of a BNGrad;
    an ActGrad passes its y where a BNGrad's x goes (the kernels' *_ACTG)."""
    if bng is None:
        return (dummy,) * 6, 0.0, (0, 0, 0, 0), (False, False, 0, False)
    if isinstance(bng, ActGrad):
        return (bng.y,) + (dummy,) * 5, float(bng.slope), bng.y.stride(), (False, False, 0, False)
    coef = bng.coef if bng.coef is not None else bng.mean
    return ((bng.x, bng.mean, bng.rstd, bng.scale, bng.shift, coef), float(bng.slope), bng.x.stride(),
            (True, bng.center, ACT_CODES[bng.act], bng.train))


def _actg(grad_in):
    return ACT_CODES[grad_in.act] if isinstance(grad_in, ActGrad) else 0


class _Part(NamedTuple):
    """One backward kernel's launch, built but not made: its grid, its
    positional and constexpr arguments, its GPU options, and what it returns."""
    grid: tuple
    args: tuple
    meta: dict
    options: dict
    result: object


def _launch(rt, kernel, part):
    rt.launch(kernel, part.grid, *part.args, **part.meta, **part.options)
    return part.result


def _grad_in_flag(grad_in):
    return 0 if grad_in is None else 1 if isinstance(grad_in, ActGrad) else 2 + bool(grad_in.train)


def _wgrad_site(dy, x, dw, groups=1, prologue=None, grad_in=None, dbias=None):
    return (dy, x, dw), _flags(prologue=prologue is not None and 1 + ACT_CODES[prologue[3]],
                               gin=_grad_in_flag(grad_in), dbias=dbias is not None)


def conv2d_wgrad(rt, kernel, dy, x, dw, groups=1, prologue=None, grad_in=None, dbias=None, config=None):
    """dw[C_out, C_in/groups, KH, KW] = the weight gradient of CONV2D given dy
    and its input x (with prologue: as conv2d's, x before its deferred BN + act).
    grad_in (a BNGrad with coef): dy is the gradient of a deferred BN + act
    applied to this conv's output; its backward is applied as dy is loaded
    (an ActGrad: act' is).  dbias: also the bias's gradient, Σ of that
    gradient per output channel."""
    return _launch(rt, kernel, _wgrad_part(rt, dy, x, dw, groups, prologue, grad_in, dbias, config))


def _sm_count(x) -> int:
    # a plan on the CPU: an H100's / H200's 132
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132


def wgrad_split(rt, x, tiles, M, BK):
    """Chunks of the pixels per wgrad tile (split-K).  Only where the tiles
    alone leave SMs idle: one tile walking every pixel was ResNet-50's
    layer1 1×1 wgrad (64×64 channels, one tap), one program for 802,816
    pixels at batch 256.  Then as many chunks as fill the SMs once, each
    at least 32 steps of BLOCK_K pixels: a partial tile written and summed
    again is then a few percent of what its chunk reads."""
    sms = _sm_count(x)
    if not rt.gpu_tiles(x) or tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, tiles), M // (32 * BK)))


def _wgrad_part(rt, dy, x, dw, groups=1, prologue=None, grad_in=None, dbias=None, config=None, count_offset=0):
    config = config or {}
    N, C_in, H, W = x.shape
    C_out, Ho, Wo = dy.shape[1], dy.shape[2], dy.shape[3]
    KH, KW = dw.shape[2], dw.shape[3]
    cout_g, cin_g = C_out // groups, C_in // groups
    if rt.gpu_tiles(x):
        BM, BN, BK = _pow2(cout_g, 16, 64), _pow2(cin_g, 16, 64), 32
    else:
        BM, BN = _pow2(cout_g, 1, 512), _pow2(cin_g, 1, 512)
        BK = _pow2(N * Ho * Wo, 16, _CPU_TILE // max(BM, BN))
    BM, BN, BK = config.get("BLOCK_M", BM), config.get("BLOCK_N", BN), config.get("BLOCK_K", BK)
    grid = (triton.cdiv(cout_g, BM), triton.cdiv(cin_g, BN), groups * KH * KW)
    M = N * Ho * Wo
    tiles = grid[0] * grid[1] * grid[2]
    split = config.get("SPLIT") or wgrad_split(rt, x, tiles, M, BK)
    split = max(1, min(split, triton.cdiv(M, BK), 65535 // grid[2]))  # (a grid's third dimension: < 2^16)
    # (chunks of whole BLOCK_Ks: a combined launch may halve BLOCK_K afterwards, and stays aligned)
    k_chunk = triton.cdiv(triton.cdiv(M, split), BK) * BK
    split = triton.cdiv(M, k_chunk)
    part = count = dw
    if split > 1:
        acc_dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        part = torch.empty(split * (C_out * cin_g * KH * KW + C_out), device=x.device, dtype=acc_dt)
        # (count_offset: counters the launch's other part already uses)
        count = rt.counters(x.device, count_offset + tiles)[count_offset:]
        grid = grid[:2] + (grid[2] * split,)
    pptrs, pslope, pmeta = _prologue_args(prologue, dw)
    gptrs, gslope, gstrides, gflags = _bng_args(grad_in, dw)
    args = (dy, x, dw, *pptrs, *gptrs, dbias if dbias is not None else dw, part, count,
            N, H, W, C_in, Ho, Wo, C_out, pslope, gslope, split, k_chunk,
            *dy.stride(), *x.stride(), *dw.stride(), *gstrides)
    meta = dict(ACC=rt.acc(x), **pmeta, **dict(zip(("G_BNG", "G_CENTER", "G_ACT", "G_TRAIN"), gflags)),
                G_ACTG=_actg(grad_in), DBIAS=dbias is not None, SPLIT_K=split > 1, IDX64=rt.needs_int64(dy, x),
                PRECISION=rt.precision(x), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, STAGES=config.get("STAGES", 2))
    # Left alone, ptxas capped some of the zoo's 26 wgrad variants at 64-80
    # registers and spilled 4-8 bytes, at every warps/stages setting tried,
    # differently under Triton 3.6 and 3.9; with the cap lifted (maxnreg 255),
    # none spills under either (sm_90 and sm_80).  `netdsl tune` picks per shape.
    options = _config_options(rt, x, {"num_warps": 8, "maxnreg": 255} if rt.gpu_tiles(x) else {}, config)
    return _Part(grid, args, meta, options, dw)


def _backward_site(dy, weight, x, dx=None, dw=None, groups=1, prologue=None, grad_in=None, grad_out=None,
                   residual=None, out_mask=None, merge=None, dbias=None, only=None, pointwise=False, res_sums=None):
    return (dy, weight, x), _flags(dx=dx is not None, dw=dw is not None, gin=_grad_in_flag(grad_in),
                                   prologue=prologue is not None and 1 + ACT_CODES[prologue[3]],
                                   gout=grad_out is not None, res=residual is not None,
                                   mask=_mask_flag(out_mask), merge=merge is not None,
                                   dbias=dbias is not None, pointwise=pointwise, rsums=res_sums is not None)


def _mask_bits(out_mask) -> bool:
    """Is an out_mask's y only its sign bits (norm.relu_bits)?"""
    return out_mask is not None and out_mask[0].dtype == torch.uint8


def _mask_flag(out_mask):
    return out_mask is not None and 1 + ACT_CODES[out_mask[1]] + 8 * _mask_bits(out_mask)


def _part_config(config, prefix):
    return {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}


def same_view(a, b) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def wgrad_can_ride(rt, groups=1, dbias=None, pointwise=False) -> bool:
    """Could a conv's weight gradient ride in its dgrad at all (see wgrad_rides)?"""
    return pointwise and groups == 1 and dbias is None and rt.wgrad_add() and rt.combo()


def wgrad_rides(rt, dy, x, dw, BM, groups=1, grad_in=None, grad_out=None, dbias=None, pointwise=False) -> bool:
    """Does a conv's weight gradient ride in its dgrad (WGRAD_ADD)?  Only a
    1×1 stride-1 ungrouped conv's (pointwise: the caller knows its geometry),
    without a bias gradient, and only where the adds cost less than what the
    wgrad would read again.  Each of the dgrad's ⌈M/BM⌉ rows of tiles adds a
    whole C_out × C_in into dw; the wgrad's own programs would read dy (and,
    under a BN backward, the tensor it normalised) and, unless the dgrad
    already loads it for its epilogue's BN sums, the input x.  In ResNet-50
    that is the bottlenecks' conv3 in layer1 and layer2 (at BM = 64);
    layer3's adds would outweigh the reads."""
    if not wgrad_can_ride(rt, groups, dbias, pointwise):
        return False
    M, cout, cin = dy.shape[0] * dy.shape[2] * dy.shape[3], dy.shape[1], x.shape[1]
    reread = cout * (1 + (grad_in is not None)) + cin * (grad_out is not None and same_view(grad_out.x, x))
    return triton.cdiv(M, BM) * cout * cin <= M * reread


def backward_rides(rt, dy, weight, x, dx=None, dw=None, groups=1, grad_in=None, grad_out=None, dbias=None,
                   pointwise=False, config=None, **_) -> bool:
    """Does conv2d_backward's weight gradient ride in its dgrad?  Its
    arguments, as conv2d_backward's.  Where it can (wgrad_can_ride), a tuned
    config's WGRAD_ADD (0 or 1, netdsl tune times both) says; else
    wgrad_rides, at the dgrad's BLOCK_M."""
    config = config or {}
    if dx is None or dw is None or not wgrad_can_ride(rt, groups, dbias, pointwise):
        return False
    if "WGRAD_ADD" in config:
        return bool(config["WGRAD_ADD"])
    M = dy.shape[0] * dy.shape[2] * dy.shape[3]
    BM = config.get("d_BLOCK_M") or conv_blocks(M, x.shape[1] // groups, dy.shape[1] // groups, rt.gpu_tiles(x))[0]
    return wgrad_rides(rt, dy, x, dw, BM, groups, grad_in, grad_out, dbias, pointwise)


def conv2d_backward(rt, kernel, dy, weight, x, dx=None, dw=None, groups=1, prologue=None, grad_in=None,
                    grad_out=None, residual=None, out_mask=None, merge=None, dbias=None, only=None, config=None,
                    pointwise=False, res_sums=None):
    """A conv's input gradient dx (given dx) and weight gradient dw (given
    dw; as conv2d_wgrad's: prologue and dbias are its) in one launch of
    CONV2D_BACKWARD; two where the module was compiled without combo (rt.combo()).  x is the conv's
    input (only its shape, where dw is None).

    dx is a transposed conv of dy with the same weight and geometry.  grad_in:
    as conv2d_wgrad's, for both parts.  grad_out (a BNGrad): dx is the
    gradient of the deferred BN + act applied to this conv's input; returns
    (Σ g, Σ g·x̂ per tile and channel, tile) for norm.channel_grad.  merge
    (with grad_out, a norm.BNSums to fill): the dgrad's last programs finish
    that BN's backward themselves, and it is returned in the partials' place.
    residual: a gradient of the same input from another of its consumers,
    added in.  out_mask = (y, act, slope): the input is y = act(BN(grad_out.x)
    + r), as stored (or only y > 0, as norm.relu_bits holds it); dx leaves as
    dx·act'(y) (grad_out's act must be None).
    Otherwise returns None.  config: a tuned
    {d_BLOCK_*, d_STAGES, w_BLOCK_*, w_STAGES, num_warps, WGRAD_ADD} (tuning.py); only
    ("d" or "w", for the tuner): launch that part alone.  pointwise: the
    conv is 1×1, stride 1, unpadded; where wgrad_rides, dw is summed by the
    dgrad's programs (WGRAD_ADD) and the wgrad's do not run.  res_sums
    (pointwise, with dx) = (rx, mean, rstd): dy is also the output gradient
    of a deferred act-free BN on rx; the dgrad takes that BN's per-tile sums
    (RES_SUMS), and returns (what it returns otherwise, (Σg, Σg·x̂, tile))."""
    config = config or {}
    assert dx is not None or dw is not None
    assert res_sums is None or (pointwise and groups == 1 and dx is not None), "RES_SUMS: a 1×1 stride-1 dgrad's"
    # a part that does not run still fills its arguments: x stands in for dx, weight for dw (neither is written)
    dconfig = _part_config(config, "d_")
    rides = only != "w" and backward_rides(rt, dy, weight, x, dx, dw, groups, grad_in, grad_out, dbias, pointwise,
                                           config)
    # the adds start from zero, and in fp32 where dw is a half type (autocast's): rounded once, at the end,
    # as the wgrad rounds its fp32 sums
    dsum = None
    if rides:
        dsum = dw.zero_() if dw.dtype in (torch.float32, torch.float64) else \
            torch.zeros(dw.shape, device=dw.device, dtype=torch.float32)
    d = _transpose_part(rt, dy, weight, dx if dx is not None else x, groups=groups, grad_in=grad_in,
                        **(dict(grad_out=grad_out, residual=residual, out_mask=out_mask, merge=merge)
                           if dx is not None else {}), config=dconfig,
                        wgrad=(x, dsum, prologue) if rides else None,
                        **(dict(res_sums=res_sums) if res_sums is not None else {}))
    w = _wgrad_part(rt, dy, x, dw if dw is not None else weight, groups, prologue, grad_in, dbias,
                    dict(_part_config(config, "w_"), **({"SPLIT": 1} if rides else {})),
                    count_offset=merge_counters(d.grid, d.meta["BLOCK_M"]) if d.meta["MERGE"] else 0)
    n_d, n_w = (d.grid[0] * d.grid[1] * d.grid[2]), (w.grid[0] * w.grid[1] * w.grid[2])
    options = _config_options(rt, x, dict(d.options, **w.options), config)  # (8 warps; the wgrad's cap lifted)
    wmeta = dict(w.meta)
    if rt.gpu_tiles(x) and dx is not None and dw is not None and rt.combo() and "w_BLOCK_K" not in config:
        # Both parts in one kernel: under Triton 3.9, ptxas spilled 16-20 bytes on sm_80 at 255 registers
        # (ResNet-50's and DenseNet's heaviest dgrads, with a BN backward on each side).  The wgrad's chunk of
        # 16 pixels, not 32, keeps its 2-stage pipeline and fits (250 registers there).  Autotuning will pick.
        wmeta["BLOCK_K"] = 16

    def run(dgrad, wgrad):
        nw = n_w if wgrad else 0
        rt.launch(kernel, ((n_d if dgrad else 0) + nw,), *d.args, *w.args, nw, *w.grid[:2], *d.grid,
                  **{"d_" + k: v for k, v in d.meta.items()}, **{"w_" + k: v for k, v in wmeta.items()},
                  DGRAD=dgrad, WGRAD=wgrad, **options)

    if rides:
        run(True, False)
        if dsum is not dw:
            dw.copy_(dsum)
    elif only is not None:
        run(only == "d" and dx is not None, only == "w" and dw is not None)
    elif rt.combo() or dx is None or dw is None:
        run(dx is not None, dw is not None)
    else:
        run(True, False)
        run(False, True)
    result, rsums = d.result if res_sums is not None else (d.result, None)
    got = result[1] if dx is not None and grad_out is not None else None
    return got if res_sums is None else (got, rsums)


def _transpose_site(x, weight, out, bias=None, groups=1, grad_in=None, grad_out=None, residual=None, out_mask=None,
                    merge=None):
    return (x, weight, out), _flags(bias=bias is not None, gin=_grad_in_flag(grad_in), gout=grad_out is not None,
                                    res=residual is not None, mask=_mask_flag(out_mask),
                                    merge=merge is not None)


def conv_transpose2d(rt, kernel, x, weight, out, bias=None, groups=1, config=None):
    """out = conv_transpose(x, weight) + bias (CONV_TRANSPOSE2D: the dgrad's tile without its roles)."""
    config = config or {}
    N, C_in, H, W = x.shape
    C_out, Ho, Wo = out.shape[1], out.shape[2], out.shape[3]
    M = N * Ho * Wo
    BM, BN, BK = conv_blocks(M, C_out // groups, C_in // groups, rt.gpu_tiles(x))
    BM, BN, BK = config.get("BLOCK_M", BM), config.get("BLOCK_N", BN), config.get("BLOCK_K", BK)
    grid = (triton.cdiv(M, BM), triton.cdiv(C_out // groups, BN), groups)
    args = (x, weight, bias if bias is not None else out, out, N, H, W, C_in, Ho, Wo, C_out,
            *x.stride(), *weight.stride(), *out.stride())
    meta = dict(ACC=rt.acc(x), HAS_SHIFT=bias is not None, IDX64=rt.needs_int64(x, weight, out),
                PRECISION=rt.precision(x), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, STAGES=config.get("STAGES", 3))
    options = dict(gpu_options(rt, x))
    _config_options(rt, x, options, config)
    return _launch(rt, kernel, _Part(grid, args, meta, options, out))


def _transpose_part(rt, x, weight, out, bias=None, groups=1, grad_in=None, grad_out=None, residual=None,
                    out_mask=None, merge=None, config=None, wgrad=None, res_sums=None):
    """wgrad = (the conv's input, dw, its prologue): a 1×1 stride-1 conv's
    dgrad that also adds its weight gradient into dw (WGRAD_ADD).
    res_sums = (rx, mean, rstd): it also takes the per-tile sums of x's other
    deferred BN (RES_SUMS); the result is then (result, (Σg, Σg·x̂, tile))."""
    config = config or {}
    N, C_in, H, W = x.shape
    C_out, Ho, Wo = out.shape[1], out.shape[2], out.shape[3]
    M = N * Ho * Wo
    BM, BN, BK = conv_blocks(M, C_out // groups, C_in // groups, rt.gpu_tiles(x))
    if res_sums is not None and rt.gpu_tiles(x):
        # with the shortcut BN's sums along, ptxas spilled 16 bytes at 255 registers (sm_80, Triton 3.9, ResNet-50's
        # layer3/4 conv3 dgrads beside their wgrads); 16 channels a K step: 205
        BK = min(BK, 16)
    BM, BN, BK = config.get("BLOCK_M", BM), config.get("BLOCK_N", BN), config.get("BLOCK_K", BK)
    grid = (triton.cdiv(M, BM), triton.cdiv(C_out // groups, BN), groups)
    iptrs, islope, istrides, iflags = _bng_args(grad_in, out)
    optrs, oslope, ostrides, oflags = _bng_args(grad_out, out)
    pg = pgx = out
    if grad_out is not None:
        ps = reduce_dtype(rt, x)
        pg, pgx = (torch.empty((grid[0], C_out), device=x.device, dtype=ps) for _ in range(2))
    r = residual if residual is not None else out
    fy, mact, mslope = out_mask if out_mask is not None else (out, None, 0.0)
    if out_mask is not None:
        assert grad_out is None or grad_out.act is None, "act' is the mask's, not the BN's"
        oslope = float(mslope)
    mptrs, mmeta = (out,) * 6, dict(MERGE=False, OUT_AFFINE=False, OUT_TRAIN=False, OUT_CBIAS=False)
    if merge is not None:
        assert grad_out is not None and grad_out.rstd.shape[0] == C_out, "merging a BN backward needs its partials"
        mptrs = (rt.counters(x.device, merge_counters(grid, BM)), *norm.bn_sums_operands(merge, out))
        mmeta = dict(MERGE=True, OUT_AFFINE=merge.dgamma is not None, OUT_TRAIN=merge.train,
                     OUT_CBIAS=merge.dcbias is not None)
    bits = _mask_bits(out_mask)
    wx, dw, wprologue = wgrad if wgrad is not None else (out, out, None)
    wptrs, wslope, wmeta = _prologue_args(wprologue, out)
    rx, rmean, rrstd = res_sums if res_sums is not None else (out, out, out)
    rpg = rpgx = out
    if res_sums is not None:
        rpg, rpgx = (torch.empty((grid[0], C_in), device=x.device, dtype=reduce_dtype(rt, x)) for _ in range(2))
    args = (x, weight, bias if bias is not None else out, r, out, *iptrs, *optrs[:5], pg, pgx, fy, *mptrs,
            wx, *wptrs, dw, rx, rmean, rrstd, rpg, rpgx,
            N, H, W, C_in, Ho, Wo, C_out, islope, oslope, wslope,
            *x.stride(), *weight.stride(), *r.stride(), *out.stride(), *istrides, *ostrides,
            *((0, 0, 0, 0) if bits else fy.stride()), *wx.stride(), *dw.stride()[:2], *rx.stride())
    meta = dict(ACC=rt.acc(x), HAS_SHIFT=bias is not None, HAS_RES=residual is not None,
                **dict(zip(("IN_BNG", "IN_CENTER", "IN_ACT", "IN_TRAIN"), iflags)),
                **dict(zip(("OUT_BNG", "OUT_CENTER", "OUT_ACT"), oflags[:3])), OUT_MASK=ACT_CODES[mact],
                MASK_BITS=bits, **mmeta,
                IN_ACTG=_actg(grad_in), WGRAD_ADD=wgrad is not None, WX_BN=wmeta["IN_BN"],
                WX_CENTER=wmeta["IN_CENTER"], WX_ACT=wmeta["IN_ACT"], RES_SUMS=res_sums is not None,
                IDX64=rt.needs_int64(x, weight, out, r, fy, wx, rx,
                                     *(b[0] for b in (grad_in, grad_out) if b is not None)),
                PRECISION=rt.precision(x), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, STAGES=config.get("STAGES", 3))
    # (3 stages: Triton's default for these loops before they were tile functions)
    options = dict(gpu_options(rt, x))
    # with a BN backward along, ptxas capped one sm_80 variant at 64 registers and spilled: lift the cap, as wgrad's
    if rt.gpu_tiles(x) and (grad_in is not None or grad_out is not None):
        options["maxnreg"] = 255
    _config_options(rt, x, options, config)
    result = out if grad_out is None else (out, merge if merge is not None else (pg, pgx, BM))
    return _Part(grid, args, meta, options, result if res_sums is None else (result, (rpg, rpgx, BM)))


# The launchers a tuner may configure, by kind: (launcher, site).  site(*args,
# **kwargs) -> (tensors, flags): what besides the kernel decides a launch's
# configuration.  tuning.py wraps them; a launcher called directly takes the
# config it is given, or its defaults.
TUNABLE = {
    "conv": (conv2d, _conv_site),
    "conv_wgrad": (conv2d_wgrad, _wgrad_site),
    "conv_backward": (conv2d_backward, _backward_site),
    "conv_transpose": (conv_transpose2d, _transpose_site),
}
