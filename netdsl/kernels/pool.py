"""Pooling and resampling: max/avg pooling (padding, dilation, ceil_mode,
count_include_pad as torch), adaptive average pooling, nearest and bilinear
upsampling.  Tiles are (output pixels × channels)."""
import math

import torch
import triton

from . import conv as _conv
from .norm import bn_sums_operands, merge_counters, reduce_dtype

POOL2D = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, y_ptr, idx_ptr, in_center_ptr, in_scale_ptr, in_shift_ptr,
    # sizes
    N, C, H, W, Ho, Wo, in_slope,
    # strides
    sxn, sxc, sxh, sxw, syn, syc, syh, syw, sin, sic, sih, siw,
    # meta-parameters
    ACC: tl.constexpr, STORE_IDX: tl.constexpr, IN_BN: tl.constexpr, IN_CENTER: tl.constexpr, IN_ACT: tl.constexpr,
    IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # STORE_IDX (max, for backward): the window tap of each maximum, as torch
    # picks it: the first in row-major order, NaN wins
    # IN_BN: x is a conv output whose batch norm + activation were deferred
    # into this pool (a stem's conv→BN→ReLU→maxpool): applied as each tap is
    # loaded, rounded to x's dtype as an apply kernel would have stored it, so
    # the activation never goes through memory
    $GEOMETRY
    IS_MAX = $IS_MAX
    COUNT_PAD = $COUNT_INCLUDE_PAD
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    m_mask = offs_m < N * Ho * Wo
    c_mask = offs_c < C
    ow = offs_m % Wo
    oh = (offs_m // Wo) % Ho
    n = offs_m // (Wo * Ho)
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    arg = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.int32)
    if IS_MAX:
        acc = tl.full((BLOCK_M, BLOCK_C), float("-inf"), dtype=ACC)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for kh in range(KH):
        ih = h0 + kh * DH
        for kw in range(KW):
            iw = w0 + kw * DW
            ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            mask = ok[:, None] & c_mask[None, :]
            x_off = (n * sxn + ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc
            if IN_BN:
                v = tl.load(x_ptr + x_off, mask=mask, other=0.0)
                v = bn_act_prologue(v, mask, offs_c, c_mask, in_center_ptr, in_scale_ptr, in_shift_ptr, IN_CENTER,
                                    IN_ACT, in_slope, ACC).to(x_ptr.dtype.element_ty)
                if IS_MAX:  # (the prologue zeroes what lies outside: the padding of a max is −inf)
                    v = tl.where(mask, v, float("-inf"))
            else:
                v = tl.load(x_ptr + x_off, mask=mask, other=float("-inf") if IS_MAX else 0.0)
            v = v.to(ACC)
            if IS_MAX:
                take = (v > acc) | (v != v)
                acc = tl.where(take, v, acc)
                if STORE_IDX:
                    arg = tl.where(take, kh * KW + kw, arg)
            else:
                acc += v
    if not IS_MAX:
        # torch's divisor: the window clipped to the padded input, or to the input itself
        h_end = tl.minimum(h0 + KH, H + PH)
        w_end = tl.minimum(w0 + KW, W + PW)
        if COUNT_PAD:
            count = (h_end - h0) * (w_end - w0)
        else:
            count = (tl.minimum(h_end, H) - tl.maximum(h0, 0)) * (tl.minimum(w_end, W) - tl.maximum(w0, 0))
        acc = acc / tl.maximum(count, 1).to(ACC)[:, None]
    y_off = (n * syn + oh * syh + ow * syw)[:, None] + offs_c[None, :] * syc
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & c_mask[None, :])
    if IS_MAX:
        if STORE_IDX:
            i_off = (n * sin + oh * sih + ow * siw)[:, None] + offs_c[None, :] * sic
            tl.store(idx_ptr + i_off, arg.to(idx_ptr.dtype.element_ty), mask=m_mask[:, None] & c_mask[None, :])
'''

# Backward of POOL2D as a gather (deterministic, no atomics): input pixel
# (ih, iw) collects from every window that holds it, i.e. the taps with
# ih = oh·SH − PH + kh·DH; max pooling takes dy where the saved tap is this one.
POOL2D_BACKWARD = r'''
@triton.jit
def $NAME(
    # pointers
    dy_ptr, idx_ptr, dx_ptr,
    ox_ptr, out_mean_ptr, out_rstd_ptr, out_scale_ptr, out_shift_ptr, pg_ptr, pgx_ptr,
    count_ptr, out_w_ptr, out_dw_ptr, out_db_ptr, out_dcb_ptr, out_coef_ptr,
    # sizes
    N, C, H, W, Ho, Wo, out_slope,
    # strides
    sdn, sdc, sdh, sdw, sin, sic, sih, siw, son, soc, soh, sow, sfn, sfc, sfh, sfw,
    # meta-parameters
    ACC: tl.constexpr, OUT_BNG: tl.constexpr, OUT_CENTER: tl.constexpr, OUT_ACT: tl.constexpr,
    MERGE: tl.constexpr, OUT_AFFINE: tl.constexpr, OUT_TRAIN: tl.constexpr, OUT_CBIAS: tl.constexpr,
    IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # OUT_BNG: the forward applied a deferred BN + act as it loaded ox (IN_BN
    # there): dx is that activation's gradient, and each tile also writes per
    # channel Σ g and Σ g·x̂ (g = dx·act', from ox), the sums the BN's backward
    # needs, as a conv's dgrad does (no pass over dx for them).  MERGE: the
    # programs also merge those sums (merge_column), and the last merger
    # finishes the BN's backward (bn_grad_finish): its parameter gradients and
    # the coefficients the producing conv's dgrad and wgrad apply as they load dx.
    $GEOMETRY
    IS_MAX = $IS_MAX
    COUNT_PAD = $COUNT_INCLUDE_PAD
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    m_mask = offs_m < N * H * W
    c_mask = offs_c < C
    iw = offs_m % W
    ih = (offs_m // W) % H
    n = offs_m // (W * H)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for kh in range(KH):
        th = ih + PH - kh * DH
        oh = th // SH
        ok_h = (th >= 0) & (th - oh * SH == 0) & (oh < Ho)
        for kw in range(KW):
            tw = iw + PW - kw * DW
            ow = tw // SW
            ok = m_mask & ok_h & (tw >= 0) & (tw - ow * SW == 0) & (ow < Wo)
            mask = ok[:, None] & c_mask[None, :]
            g = tl.load(dy_ptr + (n * sdn + oh * sdh + ow * sdw)[:, None] + offs_c[None, :] * sdc,
                        mask=mask, other=0.0).to(ACC)
            if IS_MAX:
                tap = tl.load(idx_ptr + (n * sin + oh * sih + ow * siw)[:, None] + offs_c[None, :] * sic,
                              mask=mask, other=-1).to(tl.int32)
                acc += tl.where(tap == kh * KW + kw, g, 0.0)
            else:
                h0 = oh * SH - PH
                w0 = ow * SW - PW
                h_end = tl.minimum(h0 + KH, H + PH)
                w_end = tl.minimum(w0 + KW, W + PW)
                if COUNT_PAD:
                    count = (h_end - h0) * (w_end - w0)
                else:
                    count = (tl.minimum(h_end, H) - tl.maximum(h0, 0)) * (tl.minimum(w_end, W) - tl.maximum(w0, 0))
                acc += g / tl.maximum(count, 1).to(ACC)[:, None]
    mask = m_mask[:, None] & c_mask[None, :]
    dx = acc.to(dx_ptr.dtype.element_ty)
    dx_off = (n * son + ih * soh + iw * sow)[:, None] + offs_c[None, :] * soc
    tl.store(dx_ptr + dx_off, dx, mask=mask)
    if OUT_BNG:  # from the stored values, as the producer's BN backward will read them
        PS = pg_ptr.dtype.element_ty
        ox = tl.load(ox_ptr + (n * sfn + ih * sfh + iw * sfw)[:, None] + offs_c[None, :] * sfc, mask=mask, other=0.0)
        gb, xh = bn_act_grad(dx, ox, mask, offs_c, c_mask, out_mean_ptr, out_rstd_ptr, out_scale_ptr, out_shift_ptr,
                             OUT_CENTER, OUT_ACT, out_slope, PS, 1)
        tl.store(pg_ptr + pid_m * C + offs_c, tl.sum(gb, axis=0), mask=c_mask)
        tl.store(pgx_ptr + pid_m * C + offs_c, tl.sum(gb * xh, axis=0), mask=c_mask)
        if MERGE:
            last, sg, sgx = merge_column(pg_ptr, pgx_ptr, count_ptr, pid_m, pid_c, 0, tl.num_programs(0),
                                         tl.num_programs(1), 1, offs_c, c_mask, C, N * H * W, False, PS, BLOCK_M,
                                         BLOCK_C)
            if last:
                bn_grad_finish(sg, sgx, tl.zeros_like(sg), offs_c, c_mask, C, N * H * W,
                               tl.load(out_rstd_ptr + offs_c, mask=c_mask, other=0.0).to(PS), out_w_ptr, out_dw_ptr,
                               out_db_ptr, out_dcb_ptr, out_coef_ptr, OUT_AFFINE, OUT_TRAIN, OUT_CBIAS)
'''

# Window of output o: [floor(o·H/Ho), ceil((o+1)·H/Ho)); MAX_KH/MAX_KW bound it.
ADAPTIVE_AVGPOOL2D = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, y_ptr,
    # sizes
    N, C, H, W, Ho, Wo,
    # strides
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    # meta-parameters
    ACC: tl.constexpr, MAX_KH: tl.constexpr, MAX_KW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = offs_m < N * Ho * Wo
    c_mask = offs_c < C
    ow = offs_m % Wo
    oh = (offs_m // Wo) % Ho
    n = offs_m // (Wo * Ho)
    hs = (oh * H) // Ho
    he = ((oh + 1) * H + Ho - 1) // Ho
    ws = (ow * W) // Wo
    we = ((ow + 1) * W + Wo - 1) // Wo
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for kh in range(MAX_KH):
        ih = hs + kh
        for kw in range(MAX_KW):
            iw = ws + kw
            ok = m_mask & (ih < he) & (iw < we)
            acc += tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc,
                           mask=ok[:, None] & c_mask[None, :], other=0.0).to(ACC)
    acc = acc / ((he - hs) * (we - ws)).to(ACC)[:, None]
    y_off = (n * syn + oh * syh + ow * syw)[:, None] + offs_c[None, :] * syc
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & c_mask[None, :])
'''

# Gather: input pixel i collects from the outputs o whose window
# [floor(o·H/Ho), ceil((o+1)·H/Ho)) holds it; the first is floor(i·Ho/H) and at
# most MAX_OH (MAX_OW) of them do.
ADAPTIVE_AVGPOOL2D_BACKWARD = r'''
@triton.jit
def $NAME(
    # pointers
    dy_ptr, dx_ptr,
    # sizes
    N, C, H, W, Ho, Wo,
    # strides
    sdn, sdc, sdh, sdw, son, soc, soh, sow,
    # meta-parameters
    MAX_OH: tl.constexpr, MAX_OW: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = offs_m < N * H * W
    c_mask = offs_c < C
    iw = offs_m % W
    ih = (offs_m // W) % H
    n = offs_m // (W * H)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for j in range(MAX_OH):
        oh = (ih * Ho) // H + j
        hs = (oh * H) // Ho
        he = ((oh + 1) * H + Ho - 1) // Ho
        ok_h = (oh < Ho) & (hs <= ih) & (ih < he)
        for i in range(MAX_OW):
            ow = (iw * Wo) // W + i
            ws = (ow * W) // Wo
            we = ((ow + 1) * W + Wo - 1) // Wo
            ok = m_mask & ok_h & (ow < Wo) & (ws <= iw) & (iw < we)
            g = tl.load(dy_ptr + (n * sdn + oh * sdh + ow * sdw)[:, None] + offs_c[None, :] * sdc,
                        mask=ok[:, None] & c_mask[None, :], other=0.0).to(ACC)
            acc += g / ((he - hs) * (we - ws)).to(ACC)[:, None]
    dx_off = (n * son + ih * soh + iw * sow)[:, None] + offs_c[None, :] * soc
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & c_mask[None, :])
'''

# torch's rules: nearest takes floor(o · (1/scale)); bilinear (align_corners
# false) samples at (o + 0.5)/scale − 0.5 clamped at 0, (true) at o·(H−1)/(Ho−1).
UPSAMPLE2D = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, y_ptr,
    # sizes
    N, C, H, W, Ho, Wo, rh, rw,
    # strides
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    # meta-parameters
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    BILINEAR = $BILINEAR
    ALIGN = $ALIGN_CORNERS
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = offs_m < N * Ho * Wo
    mask = m_mask[:, None] & (offs_c < C)[None, :]
    ow = offs_m % Wo
    oh = (offs_m // Wo) % Ho
    n = offs_m // (Wo * Ho)
    base = n * sxn
    cols = offs_c[None, :] * sxc
    if BILINEAR:
        if ALIGN:
            sh = oh.to(ACC) * rh
            sw = ow.to(ACC) * rw
        else:
            sh = tl.maximum((oh.to(ACC) + 0.5) * rh - 0.5, 0.0)
            sw = tl.maximum((ow.to(ACC) + 0.5) * rw - 0.5, 0.0)
        h0 = sh.to(tl.int32)
        w0 = sw.to(tl.int32)
        h1 = tl.minimum(h0 + 1, H - 1)
        w1 = tl.minimum(w0 + 1, W - 1)
        lh = (sh - h0.to(ACC))[:, None]
        lw = (sw - w0.to(ACC))[:, None]
        v00 = tl.load(x_ptr + (base + h0 * sxh + w0 * sxw)[:, None] + cols, mask=mask, other=0.0).to(ACC)
        v01 = tl.load(x_ptr + (base + h0 * sxh + w1 * sxw)[:, None] + cols, mask=mask, other=0.0).to(ACC)
        v10 = tl.load(x_ptr + (base + h1 * sxh + w0 * sxw)[:, None] + cols, mask=mask, other=0.0).to(ACC)
        v11 = tl.load(x_ptr + (base + h1 * sxh + w1 * sxw)[:, None] + cols, mask=mask, other=0.0).to(ACC)
        y = (1.0 - lh) * ((1.0 - lw) * v00 + lw * v01) + lh * ((1.0 - lw) * v10 + lw * v11)
    else:
        ih = tl.minimum((oh.to(ACC) * rh).to(tl.int32), H - 1)
        iw = tl.minimum((ow.to(ACC) * rw).to(tl.int32), W - 1)
        y = tl.load(x_ptr + (base + ih * sxh + iw * sxw)[:, None] + cols, mask=mask, other=0.0)
    y_off = (n * syn + oh * syh + ow * syw)[:, None] + offs_c[None, :] * syc
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)
'''

# Gather with the forward's own index arithmetic, so the two always agree:
# input row i takes from the candidate output rows lo(i) .. lo(i) + SPAN_H − 1
# that sample it (nearest: the one source row; bilinear: either of the two).
UPSAMPLE2D_BACKWARD = r'''
@triton.jit
def $NAME(
    # pointers
    dy_ptr, dx_ptr,
    # sizes
    N, C, H, W, Ho, Wo, rh, rw, inv_h, inv_w,
    # strides
    sdn, sdc, sdh, sdw, son, soc, soh, sow,
    # meta-parameters
    SPAN_H: tl.constexpr, SPAN_W: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    BILINEAR = $BILINEAR
    ALIGN = $ALIGN_CORNERS
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = offs_m < N * H * W
    c_mask = offs_c < C
    iw = offs_m % W
    ih = (offs_m // W) % H
    n = offs_m // (W * H)
    if BILINEAR:
        lo_h = ((ih - 1).to(tl.float32) * inv_h).to(tl.int32) - 2
        lo_w = ((iw - 1).to(tl.float32) * inv_w).to(tl.int32) - 2
    else:
        lo_h = (ih.to(tl.float32) * inv_h).to(tl.int32) - 1
        lo_w = (iw.to(tl.float32) * inv_w).to(tl.int32) - 1
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for j in range(SPAN_H):
        oh = lo_h + j
        if BILINEAR:
            if ALIGN:
                sh = oh.to(tl.float32) * rh
            else:
                sh = tl.maximum((oh.to(tl.float32) + 0.5) * rh - 0.5, 0.0)
            h0 = sh.to(tl.int32)
            h1 = tl.minimum(h0 + 1, H - 1)
            lh = sh - h0.to(tl.float32)
            wt_h = tl.where(h0 == ih, 1.0 - lh, 0.0) + tl.where(h1 == ih, lh, 0.0)
        else:
            wt_h = tl.where(tl.minimum((oh.to(tl.float32) * rh).to(tl.int32), H - 1) == ih, 1.0, 0.0)
        ok_h = (oh >= 0) & (oh < Ho) & (wt_h != 0.0)
        for i in range(SPAN_W):
            ow = lo_w + i
            if BILINEAR:
                if ALIGN:
                    sw = ow.to(tl.float32) * rw
                else:
                    sw = tl.maximum((ow.to(tl.float32) + 0.5) * rw - 0.5, 0.0)
                w0 = sw.to(tl.int32)
                w1 = tl.minimum(w0 + 1, W - 1)
                lw = sw - w0.to(tl.float32)
                wt_w = tl.where(w0 == iw, 1.0 - lw, 0.0) + tl.where(w1 == iw, lw, 0.0)
            else:
                wt_w = tl.where(tl.minimum((ow.to(tl.float32) * rw).to(tl.int32), W - 1) == iw, 1.0, 0.0)
            ok = m_mask & ok_h & (ow >= 0) & (ow < Wo) & (wt_w != 0.0)
            g = tl.load(dy_ptr + (n * sdn + oh * sdh + ow * sdw)[:, None] + offs_c[None, :] * sdc,
                        mask=ok[:, None] & c_mask[None, :], other=0.0).to(ACC)
            acc += g * (wt_h * wt_w).to(ACC)[:, None]
    dx_off = (n * son + ih * soh + iw * sow)[:, None] + offs_c[None, :] * soc
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & c_mask[None, :])
'''


def _tiles(M, C, on_gpu):
    # the interpreter runs each program in Python: few, large tiles are fastest there
    if on_gpu:  # 32×32: the pointer and mask tiles of 64×64 spilled registers (Triton 3.9, sm_80/sm_90)
        return 32, max(16, min(32, triton.next_power_of_2(C)))
    # (the interpreter needs no minimum tile: channels fit exactly)
    bc = min(512, triton.next_power_of_2(C))
    return max(16, min((1 << 16) // bc, triton.next_power_of_2(M))), bc


def pool2d(rt, kernel, x, out, idx=None, prologue=None):
    """With idx (max pooling, for backward): also each maximum's window tap.
    prologue (as conv2d's: center, scale, shift, act, slope): x is a conv
    output whose deferred BN + act this pool applies as it loads."""
    N, C, H, W = x.shape
    Ho, Wo = out.shape[2], out.shape[3]
    bm, bc = _tiles(N * Ho * Wo, C, rt.gpu_tiles(x))
    i = idx if idx is not None else out
    iptrs, islope, iflags = _conv._prologue_args(prologue, x)
    rt.launch(kernel, (triton.cdiv(N * Ho * Wo, bm), triton.cdiv(C, bc)), x, out, i, *iptrs, N, C, H, W, Ho, Wo,
              islope, *x.stride(), *out.stride(), *i.stride(), ACC=rt.acc(x), STORE_IDX=idx is not None, **iflags,
              IDX64=rt.needs_int64(x, out), BLOCK_M=bm, BLOCK_C=bc, **_uncapped(rt, x, prologue))


def _uncapped(rt, x, bn):
    # With a deferred BN along, ptxas capped a max pool at 56 registers on sm_80 and spilled 4 bytes (Triton
    # 3.9, as the JIT specialises it): lift the cap, as bn_stats and the conv kernels do
    return {"maxnreg": 255} if bn is not None and rt.gpu_tiles(x) else {}


def pool2d_backward(rt, kernel, dy, idx, dx, grad_out=None, merge=None):
    """dx, the gradient of pool2d's input.  grad_out (a conv.BNGrad): the
    forward applied that deferred BN + act as it loaded (pool2d's prologue),
    so dx is the activation's gradient; returns the BN backward's (Σ g, Σ g·x̂
    per tile and channel, tile) for norm.channel_grad, or with merge (a
    norm.BNSums) has the last programs finish that backward into it, and
    returns it.  Otherwise None."""
    N, C, H, W = dx.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    bm, bc = _tiles(N * H * W, C, rt.gpu_tiles(dy))
    grid = (triton.cdiv(N * H * W, bm), triton.cdiv(C, bc))
    i = idx if idx is not None else dy
    optrs, oslope, ostrides, oflags = _conv._bng_args(grad_out, dx)
    pg = pgx = dx
    if grad_out is not None:
        pg, pgx = (torch.empty((grid[0], C), device=dx.device, dtype=reduce_dtype(rt, dx)) for _ in range(2))
    mptrs, mmeta = (dx,) * 6, dict(MERGE=False, OUT_AFFINE=False, OUT_TRAIN=False, OUT_CBIAS=False)
    if merge is not None:
        assert grad_out is not None, "merging a BN backward needs its partials"
        mptrs = (rt.counters(dx.device, merge_counters((grid[0], grid[1], 1), bm)), *bn_sums_operands(merge, dx))
        mmeta = dict(MERGE=True, OUT_AFFINE=merge.dgamma is not None, OUT_TRAIN=merge.train,
                     OUT_CBIAS=merge.dcbias is not None)
    rt.launch(kernel, grid, dy, i, dx, *optrs[:5], pg, pgx, *mptrs, N, C, H, W, Ho, Wo, oslope,
              *dy.stride(), *i.stride(), *dx.stride(), *ostrides, ACC=rt.acc(dy),
              **dict(zip(("OUT_BNG", "OUT_CENTER", "OUT_ACT"), oflags[:3])), **mmeta,
              IDX64=rt.needs_int64(dy, dx, *((grad_out.x,) if grad_out is not None else ())), BLOCK_M=bm, BLOCK_C=bc,
              **_uncapped(rt, dy, grad_out))
    if grad_out is None:
        return None
    return merge if merge is not None else (pg, pgx, bm)


def _adaptive_windows(n, no):
    return [(((o * n) // no), ((o + 1) * n + no - 1) // no) for o in range(no)]


def adaptive_avgpool2d(rt, kernel, x, out):
    N, C, H, W = x.shape
    Ho, Wo = out.shape[2], out.shape[3]
    bm, bc = _tiles(N * Ho * Wo, C, rt.gpu_tiles(x))
    max_kh = max(e - s for s, e in _adaptive_windows(H, Ho))
    max_kw = max(e - s for s, e in _adaptive_windows(W, Wo))
    rt.launch(kernel, (triton.cdiv(N * Ho * Wo, bm), triton.cdiv(C, bc)), x, out, N, C, H, W, Ho, Wo,
              *x.stride(), *out.stride(), MAX_KH=max_kh, MAX_KW=max_kw, ACC=rt.acc(x), BLOCK_M=bm, BLOCK_C=bc)


def _max_cover(n, no):
    """The most adaptive windows (and the span from floor(i·no/n)) one input index needs."""
    span = 1
    for i in range(n):
        holders = [o for o, (s, e) in enumerate(_adaptive_windows(n, no)) if s <= i < e]
        span = max(span, holders[-1] - (i * no) // n + 1)
    return span


def adaptive_avgpool2d_backward(rt, kernel, dy, dx):
    N, C, H, W = dx.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    bm, bc = _tiles(N * H * W, C, rt.gpu_tiles(dy))
    rt.launch(kernel, (triton.cdiv(N * H * W, bm), triton.cdiv(C, bc)), dy, dx, N, C, H, W, Ho, Wo,
              *dy.stride(), *dx.stride(), MAX_OH=_max_cover(H, Ho), MAX_OW=_max_cover(W, Wo), ACC=rt.acc(dy),
              BLOCK_M=bm, BLOCK_C=bc)


def _upsample_ratios(H, W, Ho, Wo, scale, align_corners):
    if align_corners:
        rh = (H - 1) / (Ho - 1) if Ho > 1 else 0.0
        rw = (W - 1) / (Wo - 1) if Wo > 1 else 0.0
        return rh, rw
    if scale is None:  # to a given size (torch's size=): the ratio of the sizes, as torch takes it
        return H / Ho, W / Wo
    return 1.0 / scale, 1.0 / scale


def upsample2d(rt, kernel, x, out, scale, align_corners):
    N, C, H, W = x.shape
    Ho, Wo = out.shape[2], out.shape[3]
    rh, rw = _upsample_ratios(H, W, Ho, Wo, scale, align_corners)
    bm, bc = _tiles(N * Ho * Wo, C, rt.gpu_tiles(x))
    rt.launch(kernel, (triton.cdiv(N * Ho * Wo, bm), triton.cdiv(C, bc)), x, out, N, C, H, W, Ho, Wo,
              float(rh), float(rw), *x.stride(), *out.stride(), ACC=rt.acc(x), BLOCK_M=bm, BLOCK_C=bc)


def upsample2d_backward(rt, kernel, dy, dx, scale, align_corners, bilinear):
    N, C, H, W = dx.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    rh, rw = _upsample_ratios(H, W, Ho, Wo, scale, align_corners)

    def span(r, no):  # candidate outputs per input index (see the template)
        if r <= 0:
            return 0.0, no + 3  # every output samples index 0
        inv = 1.0 / r
        return inv, (math.ceil(2.5 * inv) + 5 if bilinear else math.ceil(inv) + 3)

    inv_h, span_h = span(rh, Ho)
    inv_w, span_w = span(rw, Wo)
    bm, bc = _tiles(N * H * W, C, rt.gpu_tiles(dy))
    rt.launch(kernel, (triton.cdiv(N * H * W, bm), triton.cdiv(C, bc)), dy, dx, N, C, H, W, Ho, Wo,
              float(rh), float(rw), float(inv_h), float(inv_w), *dy.stride(), *dx.stride(),
              SPAN_H=span_h, SPAN_W=span_w, ACC=rt.acc(dy), BLOCK_M=bm, BLOCK_C=bc)
