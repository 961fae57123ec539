"""Batch norm (statistics, folding, running-stat updates, apply with fused
residual and activation), local response norm and softmax.

Training-mode batch norm's statistics: per-channel mean and variance (two
passes over the data, or a merge of a producing conv's per-tile partial sums),
then scale/shift and the running-stat update exactly as torch does it:
unbiased variance, momentum, num_batches_tracked += 1.  `bn_stats` computes
them where no conv's last programs did (bn_merge, bn_finish: shared with the
conv kernels).  `channel_affine` applies y = act((x − mean)·scale + shift +
residual).  In eval mode `bn_fold` turns the
running statistics into scale/shift once (cached until a parameter or buffer
changes), and they go into the producing conv's epilogue when there is one.
"""
from typing import NamedTuple

import torch
import triton

from . import ACT_CODES

# Tensors are seen as [N, C, H, W] (a [N, F] tensor as [N, F, 1, 1]).  Tiles are
# (pixels × channels), so channels_last memory is read along its fast axis.
BN_STATS = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, psum_ptr, pm2_ptr, count_ptr, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, nbt_ptr, mean_ptr, rstd_ptr,
    scale_ptr, shift_ptr, cmean_ptr, cvar_ptr,
    # sizes
    N, C, H, W, T, TILE, KNOWN, grid_m, n_fresh, eps, momentum,
    # strides
    sxn, sxc, sxh, sxw,
    # meta-parameters
    PARTIALS: tl.constexpr, AFFINE: tl.constexpr, TRACK: tl.constexpr, CACHED: tl.constexpr, SYNC: tl.constexpr,
    ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # ACC: the accumulation type; fp64 where torch's own kernels use double (CPU)
    # PARTIALS: the producing conv's epilogue left per-tile sums (T rows of TILE
    # pixels): one program per block of channels merges them, x is not read.
    # Otherwise the pixels are split: one program per tile of BLOCK_M pixels ×
    # BLOCK_C channels stores its tile's sum and squared deviations (a row of
    # psum / pm2), and the last of each column's programs to finish merges the
    # rows, as a conv's epilogue does (merge_column): the whole GPU reads x.
    # CACHED: the channels below KNOWN have their batch mean and variance in
    # cmean / cvar already (a dense block's buffer holds the same data under
    # every later layer's BN); x starts at channel KNOWN, and only the newer
    # channels are read, then cached.  Channel blocks from KNOWN // BLOCK_C on
    # are reduced (n_fresh columns of grid_m programs); each block below takes
    # its statistics from the cache (one program each, after those).
    # SYNC (a batch norm synchronised over processes): nothing is finished
    # here; this process's count, mean and variance go to scale / mean / rstd
    # (bn_keep), for the all-gather that BN_SYNC_FINISH's merge follows.
    M = N * H * W
    pid = tl.program_id(0)
    if PARTIALS:
        offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        mean, m2 = bn_merge(psum_ptr, pm2_ptr, offs_c, c_mask, C, 0, T, 1, TILE, M, ACC, BLOCK_M, BLOCK_C)
        if SYNC:
            bn_keep(mean, m2 / M, offs_c, c_mask, M, scale_ptr, mean_ptr, rstd_ptr)
        else:
            bn_finish(mean, m2 / M, offs_c, c_mask, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, nbt_ptr, mean_ptr,
                      rstd_ptr, scale_ptr, shift_ptr, M, eps, momentum, pid == 0, AFFINE, TRACK)
    elif pid < grid_m * n_fresh:
        pid_m = pid % grid_m
        col = pid // grid_m
        offs_c = (KNOWN // BLOCK_C + col) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        fresh = offs_c >= KNOWN
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if IDX64:  # past 2^31 elements
            offs_m = offs_m.to(tl.int64)
        mask = (offs_m < M)[:, None] & (c_mask & fresh)[None, :]
        row = (offs_m // (H * W)) * sxn + ((offs_m // W) % H) * sxh + (offs_m % W) * sxw
        v = tl.load(x_ptr + row[:, None] + (offs_c - KNOWN)[None, :] * sxc, mask=mask, other=0.0).to(ACC)
        cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(ACC)
        s = tl.sum(v, axis=0)
        d = tl.where(mask, v - (s / cnt)[None, :], 0.0)
        tl.store(psum_ptr + pid_m * C + offs_c, s.to(psum_ptr.dtype.element_ty), mask=c_mask)
        tl.store(pm2_ptr + pid_m * C + offs_c, tl.sum(d * d, axis=0).to(pm2_ptr.dtype.element_ty), mask=c_mask)
        last, mean, m2 = merge_column(psum_ptr, pm2_ptr, count_ptr, pid_m, col, 0, grid_m, n_fresh, 1, offs_c, c_mask,
                                      C, M, True, ACC, BLOCK_M, BLOCK_C)
        if last:
            var = m2 / M
            if CACHED:
                mean = tl.where(fresh, mean, tl.load(cmean_ptr + offs_c, mask=c_mask & ~fresh, other=0.0).to(ACC))
                var = tl.where(fresh, var, tl.load(cvar_ptr + offs_c, mask=c_mask & ~fresh, other=0.0).to(ACC))
                tl.store(cmean_ptr + offs_c, mean.to(cmean_ptr.dtype.element_ty), mask=c_mask & fresh)
                tl.store(cvar_ptr + offs_c, var.to(cvar_ptr.dtype.element_ty), mask=c_mask & fresh)
            if SYNC:
                bn_keep(mean, var, offs_c, c_mask, M, scale_ptr, mean_ptr, rstd_ptr)
            else:
                bn_finish(mean, var, offs_c, c_mask, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, nbt_ptr, mean_ptr,
                          rstd_ptr, scale_ptr, shift_ptr, M, eps, momentum, col == 0, AFFINE, TRACK)
    else:  # a block of cached channels only
        b = pid - grid_m * n_fresh
        offs_c = b * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        mean = tl.load(cmean_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)
        var = tl.load(cvar_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)
        bn_finish(mean, var, offs_c, c_mask, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, nbt_ptr, mean_ptr, rstd_ptr,
                  scale_ptr, shift_ptr, M, eps, momentum, (n_fresh == 0) & (b == 0), AFFINE, TRACK)
'''

# Batch mean and M2 (Σ squared deviations from it) of channels c, from
# per-tile partials: each row of psum / pm2 holds one tile's sum and its
# squared deviations from the tile's own mean.  The rows merged are
# t_begin, t_begin + STEP, ... below t_end; row r stands for min(M − r·TILE,
# STEP·TILE) pixels (TILE pixels a tile, M in all: with STEP > 1, each row
# already merged a group of STEP tiles).  One pass, Chan et al.'s pairwise
# merge of (count, mean, M2) a block of rows at a time: no cancellation, and
# one round trip per block (a merging program is alone on the critical path).
BN_MERGE = r'''
@triton.jit
def $NAME(psum_ptr, pm2_ptr, c, c_mask, C, t_begin, t_end, STEP, TILE, M, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
          BLOCK_C: tl.constexpr):
    n_a = tl.zeros((BLOCK_C,), dtype=ACC)  # pixels merged so far (the same for every channel)
    mean = tl.zeros((BLOCK_C,), dtype=ACC)
    m2 = tl.zeros((BLOCK_C,), dtype=ACC)
    for t0 in range(0, tl.cdiv(t_end - t_begin, STEP), BLOCK_T):
        rows = t_begin + (t0 + tl.arange(0, BLOCK_T)) * STEP
        t_ok = rows < t_end
        mask = t_ok[:, None] & c_mask[None, :]
        # .cg: from L2, where other programs' partials landed (see last_to_arrive)
        s = tl.load(psum_ptr + rows[:, None] * C + c[None, :], mask=mask, other=0.0, cache_modifier=".cg").to(ACC)
        q = tl.load(pm2_ptr + rows[:, None] * C + c[None, :], mask=mask, other=0.0, cache_modifier=".cg").to(ACC)
        cnt = tl.where(t_ok, tl.minimum(M - rows * TILE, STEP * TILE), 0).to(ACC)
        n_b = tl.sum(cnt, axis=0)
        mean_b = tl.sum(s, axis=0) / n_b
        d = tl.where(mask, s / tl.maximum(cnt, 1.0)[:, None] - mean_b[None, :], 0.0)
        m2_b = tl.sum(q + cnt[:, None] * d * d, axis=0)
        n = n_a + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n)
        m2 = m2 + m2_b + delta * delta * (n_a * n_b / n)
        n_a = n
    return mean, m2
'''

# The end of a training batch norm's statistics: mean and rstd (for backward),
# scale and shift (for the apply: (x − mean)·scale + shift), and the running
# statistics updated exactly as torch: unbiased variance, momentum, and
# num_batches_tracked += 1 by the one program where `first`.
BN_FINISH = r'''
@triton.jit
def $NAME(mean, var, c, c_mask, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, nbt_ptr, mean_ptr, rstd_ptr, scale_ptr,
          shift_ptr, M, eps, momentum, first, AFFINE: tl.constexpr, TRACK: tl.constexpr):
    STAT = mean_ptr.dtype.element_ty  # fp32, or fp64 for fp64 inputs
    var = var.to(STAT)
    mean = mean.to(STAT)
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = rstd
    shift = tl.zeros_like(mean)
    if AFFINE:
        scale = scale * tl.load(weight_ptr + c, mask=c_mask, other=1.0).to(STAT)
        shift = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(STAT)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(rstd_ptr + c, rstd, mask=c_mask)
    tl.store(scale_ptr + c, scale, mask=c_mask)
    tl.store(shift_ptr + c, shift, mask=c_mask)
    if TRACK:
        rm = tl.load(rmean_ptr + c, mask=c_mask, other=0.0).to(STAT)
        rv = tl.load(rvar_ptr + c, mask=c_mask, other=0.0).to(STAT)
        new_rm = (1.0 - momentum) * rm + momentum * mean
        new_rv = (1.0 - momentum) * rv + momentum * (var * M / (M - 1.0))
        tl.store(rmean_ptr + c, new_rm.to(rmean_ptr.dtype.element_ty), mask=c_mask)
        tl.store(rvar_ptr + c, new_rv.to(rvar_ptr.dtype.element_ty), mask=c_mask)
        if first:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
'''

# A synchronised batch norm's statistics over this process's batch, kept for
# the all-gather instead of finished: its count, mean and (biased) variance.
BN_KEEP = r'''
@triton.jit
def $NAME(mean, var, c, c_mask, M, count_ptr, mean_ptr, var_ptr):
    tl.store(count_ptr + c, (tl.zeros_like(mean) + M).to(count_ptr.dtype.element_ty), mask=c_mask)
    tl.store(mean_ptr + c, mean.to(mean_ptr.dtype.element_ty), mask=c_mask)
    tl.store(var_ptr + c, var.to(var_ptr.dtype.element_ty), mask=c_mask)
'''

# A batch norm synchronised over P processes (nn.SyncBatchNorm's): the
# statistics of the global batch from each process's count, mean and
# variance (bn_keep's rows, all-gathered in rank order), merged in that order
# by Chan et al.'s formula, so every process finishes with the same values
# bit for bit and a process with a smaller batch weighs less; then finished
# as a one-process batch norm is (BN_FINISH, the running statistics too).
BN_SYNC_FINISH = r'''
@triton.jit
def $NAME(
    # pointers
    stats_ptr, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, nbt_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr,
    # sizes
    P, C, eps, momentum,
    # meta-parameters
    AFFINE: tl.constexpr, TRACK: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    n = tl.zeros((BLOCK_C,), dtype=ACC)
    mean = tl.zeros((BLOCK_C,), dtype=ACC)
    m2 = tl.zeros((BLOCK_C,), dtype=ACC)
    for p in range(0, P):  # stats: [P, 3, C], each process's (count, mean, var)
        n_b = tl.load(stats_ptr + p * 3 * C + c, mask=c_mask, other=0.0).to(ACC)
        mean_b = tl.load(stats_ptr + p * 3 * C + C + c, mask=c_mask, other=0.0).to(ACC)
        var_b = tl.load(stats_ptr + p * 3 * C + 2 * C + c, mask=c_mask, other=0.0).to(ACC)
        total = n + n_b
        w = tl.where(total > 0, n_b / tl.maximum(total, 1.0), 0.0)  # (a process with an empty batch adds nothing)
        delta = mean_b - mean
        m2 = m2 + var_b * n_b + delta * delta * n * w
        mean = mean + delta * w
        n = total
    bn_finish(mean, m2 / n, c, c_mask, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, nbt_ptr, mean_ptr, rstd_ptr,
              scale_ptr, shift_ptr, n, eps, momentum, pid == 0, AFFINE, TRACK)
'''

# Per-channel sums of rows t_begin, t_begin + STEP, ... below t_end of two
# [rows, C] buffers of per-tile partials, one pass (each block reduced as it
# comes: in a conv's epilogue, few registers are free).
CHANNEL_SUMS = r'''
@triton.jit
def $NAME(pa_ptr, pb_ptr, c, c_mask, C, t_begin, t_end, STEP, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
          BLOCK_C: tl.constexpr):
    sa = tl.zeros((BLOCK_C,), dtype=ACC)
    sb = tl.zeros((BLOCK_C,), dtype=ACC)
    for t0 in range(0, tl.cdiv(t_end - t_begin, STEP), BLOCK_T):
        rows = t_begin + (t0 + tl.arange(0, BLOCK_T)) * STEP
        mask = (rows < t_end)[:, None] & c_mask[None, :]
        # .cg: from L2, where other programs' partials landed (see last_to_arrive)
        a = tl.load(pa_ptr + rows[:, None] * C + c[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        b = tl.load(pb_ptr + rows[:, None] * C + c[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        sa += tl.sum(a.to(ACC), axis=0)
        sb += tl.sum(b.to(ACC), axis=0)
    return sa, sb
'''

# The end of a batch norm's backward, from its sums over the batch of g (the
# gradient of its output, act' applied), g·x̂ and x̂: the parameter gradients
# dγ = Σg·x̂ and dβ = Σg, and coef (A, B, C per channel) of the input
# gradient dx = a·(g − Σg/M − x̂·Σg·x̂/M) = A·g + B + C·x̂ (a = γ·rstd; with
# fixed statistics dx = a·g).  CONV_BIAS: Σ dx, a conv bias's gradient.
BN_GRAD_FINISH = r'''
@triton.jit
def $NAME(sg, sgx, sx, c, c_mask, C, M, rstd, weight_ptr, dweight_ptr, dbias_ptr, dcbias_ptr, coef_ptr,
          AFFINE: tl.constexpr, TRAIN: tl.constexpr, CONV_BIAS: tl.constexpr):
    a = rstd
    if AFFINE:
        a = a * tl.load(weight_ptr + c, mask=c_mask, other=1.0).to(rstd.dtype)
        tl.store(dweight_ptr + c, sgx.to(dweight_ptr.dtype.element_ty), mask=c_mask)
        tl.store(dbias_ptr + c, sg.to(dbias_ptr.dtype.element_ty), mask=c_mask)
    b = tl.zeros_like(a)
    cc = tl.zeros_like(a)
    if TRAIN:
        b = -a * sg / M
        cc = -a * sgx / M
    tl.store(coef_ptr + c, a.to(coef_ptr.dtype.element_ty), mask=c_mask)
    tl.store(coef_ptr + C + c, b.to(coef_ptr.dtype.element_ty), mask=c_mask)
    tl.store(coef_ptr + 2 * C + c, cc.to(coef_ptr.dtype.element_ty), mask=c_mask)
    if CONV_BIAS:
        tl.store(dcbias_ptr + c, (a * sg + M * b + cc * sx).to(dcbias_ptr.dtype.element_ty), mask=c_mask)
'''

# A synchronised batch norm's backward: coef (A, B, C) of its input gradient
# from the group's sums (the second row of sums, all-reduced: the global
# batch's Σg, Σg·x̂ and count), as BN_GRAD_FINISH makes it from one
# process's.  CONV_BIAS: a producing conv bias's gradient, Σ dx over this
# process's batch, A·Σg + M·B + C·Σx̂ from the first row, where Σx̂ =
# M·(mean_p − mean)·rstd is not 0 (mean_p, this process's mean: lstats, as
# BN_STATS's SYNC keeps them).
BN_GRAD_SYNC_FINISH = r'''
@triton.jit
def $NAME(
    # pointers
    sums_ptr, mean_ptr, rstd_ptr, weight_ptr, lstats_ptr, dcbias_ptr, coef_ptr,
    # sizes
    C,
    # meta-parameters
    AFFINE: tl.constexpr, CONV_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    R = 2 * C + 1
    sg = tl.load(sums_ptr + R + c, mask=c_mask, other=0.0).to(ACC)
    sgx = tl.load(sums_ptr + R + C + c, mask=c_mask, other=0.0).to(ACC)
    m = tl.load(sums_ptr + R + 2 * C).to(ACC)
    rstd = tl.load(rstd_ptr + c, mask=c_mask, other=0.0).to(ACC)
    a = rstd
    if AFFINE:
        a = a * tl.load(weight_ptr + c, mask=c_mask, other=1.0).to(ACC)
    b = -a * sg / m
    cc = -a * sgx / m
    tl.store(coef_ptr + c, a.to(coef_ptr.dtype.element_ty), mask=c_mask)
    tl.store(coef_ptr + C + c, b.to(coef_ptr.dtype.element_ty), mask=c_mask)
    tl.store(coef_ptr + 2 * C + c, cc.to(coef_ptr.dtype.element_ty), mask=c_mask)
    if CONV_BIAS:
        m_p = tl.load(sums_ptr + 2 * C).to(ACC)
        sg_p = tl.load(sums_ptr + c, mask=c_mask, other=0.0).to(ACC)
        mean_p = tl.load(lstats_ptr + C + c, mask=c_mask, other=0.0).to(ACC)
        mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(ACC)
        sx = m_p * (mean_p - mean) * rstd
        tl.store(dcbias_ptr + c, (a * sg_p + m_p * b + cc * sx).to(dcbias_ptr.dtype.element_ty), mask=c_mask)
'''

BN_FOLD = r'''
@triton.jit
def $NAME(
    # pointers
    weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, conv_bias_ptr, rstd_ptr, scale_ptr, shift_ptr,
    # sizes
    C, eps,
    # meta-parameters
    ACC: tl.constexpr, AFFINE: tl.constexpr, CONV_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # eval mode: y = x·scale + shift from the running statistics, ready to fold
    # into a conv epilogue (with the conv's bias: scale·(conv + b − mean) + beta)
    offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs < C
    mean = tl.load(rmean_ptr + offs, mask=mask, other=0.0).to(ACC)
    var = tl.load(rvar_ptr + offs, mask=mask, other=1.0).to(ACC)
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = rstd
    if AFFINE:
        scale = scale * tl.load(weight_ptr + offs, mask=mask, other=1.0).to(ACC)
    shift = -mean * scale
    if AFFINE:
        shift = shift + tl.load(bias_ptr + offs, mask=mask, other=0.0).to(ACC)
    if CONV_BIAS:
        shift = shift + scale * tl.load(conv_bias_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(rstd_ptr + offs, rstd, mask=mask)
    tl.store(scale_ptr + offs, scale, mask=mask)
    tl.store(shift_ptr + offs, shift, mask=mask)
'''

# v > 0 for a tile of rows (pixels) × BLOCK_C channels from c0 on, one bit a
# channel, 8 channels a byte: bits[pixel, c // 8] holds channel c at bit c % 8
# (C a multiple of 8).  It is all a consumer's dgrad needs of a relu's (or a
# leaky relu's) output for act', at 1/32 of its fp32 bytes.
STORE_SIGN_BITS = r'''
@triton.jit
def $NAME(bits_ptr, v, offs_m, m_mask, c0, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pos = tl.reshape((v > 0.0).to(tl.int32), (BLOCK_M, BLOCK_C // 8, 8))
    byte = tl.sum(pos << tl.arange(0, 8)[None, None, :], axis=2)
    offs_b = c0 // 8 + tl.arange(0, BLOCK_C // 8)
    tl.store(bits_ptr + offs_m[:, None] * (C // 8) + offs_b[None, :], byte.to(tl.uint8),
             mask=m_mask[:, None] & (offs_b < C // 8)[None, :])
'''

CHANNEL_AFFINE = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, center_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, res_center_ptr, res_scale_ptr, res_shift_ptr, bits_ptr,
    # sizes
    N, C, H, W, slope,
    # strides
    sxn, sxc, sxh, sxw, srn, src, srh, srw, syn, syc, syh, syw,
    # meta-parameters
    ACC: tl.constexpr, HAS_CENTER: tl.constexpr, HAS_RES: tl.constexpr, RES_BN: tl.constexpr,
    RES_CENTER: tl.constexpr, ACT: tl.constexpr, BITS: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # RES_BN: the residual is a conv output whose own BN (a downsample's) was
    # deferred to here: normalised as it is loaded, never stored normalised.
    # BITS (a relu or leaky relu): also y > 0 as stored (store_sign_bits).
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    c_mask = offs_c < C
    mask = (offs_m < N * H * W)[:, None] & c_mask[None, :]
    n = offs_m // (H * W)
    h = (offs_m // W) % H
    w = offs_m % W
    x = tl.load(x_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + offs_c[None, :] * sxc, mask=mask, other=0.0)
    # (x − center)·scale + shift: the affine a conv's prologue applies to a deferred BN, without its act
    y = bn_act_prologue(x, mask, offs_c, c_mask, center_ptr, scale_ptr, shift_ptr, HAS_CENTER, 0, slope, ACC)
    if HAS_RES:
        r = tl.load(res_ptr + (n * srn + h * srh + w * srw)[:, None] + offs_c[None, :] * src, mask=mask, other=0.0)
        if RES_BN:
            r = bn_act_prologue(r, mask, offs_c, c_mask, res_center_ptr, res_scale_ptr, res_shift_ptr, RES_CENTER,
                                0, slope, ACC)
        y = y + r.to(ACC)
    y = activation(y, ACT, slope).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + (n * syn + h * syh + w * syw)[:, None] + offs_c[None, :] * syc, y, mask=mask)
    if BITS:
        store_sign_bits(bits_ptr, y, offs_m, offs_m < N * H * W, tl.program_id(1) * BLOCK_C, C, BLOCK_M, BLOCK_C)
'''

# PyTorch's LocalResponseNorm: b_c = a_c / (k + alpha/size · Σ a_j²)^beta over
# j in [c − size//2, c + (size−1)//2], zero outside the channels.
LRN = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, y_ptr,
    # sizes
    N, C, H, W, alpha, beta, k,
    # strides
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    # meta-parameters
    ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    SIZE = $SIZE
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:  # past 2^31 elements
        offs_m = offs_m.to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = offs_m < N * H * W
    mask = m_mask[:, None] & (offs_c < C)[None, :]
    row = (offs_m // (H * W)) * sxn + ((offs_m // W) % H) * sxh + (offs_m % W) * sxw
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for j in range(SIZE):
        cj = offs_c + j - SIZE // 2
        ok = m_mask[:, None] & ((cj >= 0) & (cj < C))[None, :]
        v = tl.load(x_ptr + row[:, None] + cj[None, :] * sxc, mask=ok, other=0.0).to(ACC)
        acc += v * v
    x = tl.load(x_ptr + row[:, None] + offs_c[None, :] * sxc, mask=mask, other=0.0).to(ACC)
    div = tl.exp(beta * tl.log(k + alpha / SIZE * acc))
    yrow = (offs_m // (H * W)) * syn + ((offs_m // W) % H) * syh + (offs_m % W) * syw
    tl.store(y_ptr + yrow[:, None] + offs_c[None, :] * syc, (x / div).to(y_ptr.dtype.element_ty), mask=mask)
'''

# Softmax over channels (dim 1), for every pixel; C fits one block.
SOFTMAX = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, y_ptr,
    # sizes
    N, C, H, W,
    # strides
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    # meta-parameters
    ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:  # past 2^31 elements
        offs_m = offs_m.to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    m_mask = offs_m < N * H * W
    mask = m_mask[:, None] & (offs_c < C)[None, :]
    row = (offs_m // (H * W)) * sxn + ((offs_m // W) % H) * sxh + (offs_m % W) * sxw
    x = tl.load(x_ptr + row[:, None] + offs_c[None, :] * sxc, mask=mask, other=float("-inf")).to(ACC)
    x = tl.where(m_mask[:, None], x, 0.0)  # rows past the end: keep them finite
    x = x - tl.max(x, axis=1)[:, None]
    e = tl.where(mask, tl.exp(x), 0.0)
    y = e / tl.maximum(tl.sum(e, axis=1), 1e-30)[:, None]  # >= 1 on real rows
    yrow = (offs_m // (H * W)) * syn + ((offs_m // W) % H) * syh + (offs_m % W) * syw
    tl.store(y_ptr + yrow[:, None] + offs_c[None, :] * syc, y.to(y_ptr.dtype.element_ty), mask=mask)
'''

# dx = y·(dy − Σ_c dy·y), per pixel over the channels.
SOFTMAX_BACKWARD = r'''
@triton.jit
def $NAME(
    # pointers
    y_ptr, dy_ptr, dx_ptr,
    # sizes
    N, C, H, W,
    # strides
    syn, syc, syh, syw, sdn, sdc, sdh, sdw, son, soc, soh, sow,
    # meta-parameters
    ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:  # past 2^31 elements
        offs_m = offs_m.to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask = (offs_m < N * H * W)[:, None] & (offs_c < C)[None, :]
    n = offs_m // (H * W)
    h = (offs_m // W) % H
    w = offs_m % W
    y = tl.load(y_ptr + (n * syn + h * syh + w * syw)[:, None] + offs_c[None, :] * syc, mask=mask, other=0.0).to(ACC)
    g = tl.load(dy_ptr + (n * sdn + h * sdh + w * sdw)[:, None] + offs_c[None, :] * sdc, mask=mask, other=0.0).to(ACC)
    dx = y * (g - tl.sum(g * y, axis=1)[:, None])
    tl.store(dx_ptr + (n * son + h * soh + w * sow)[:, None] + offs_c[None, :] * soc, dx.to(dx_ptr.dtype.element_ty), mask=mask)
'''


# Backward of y = act(BN(x) + residual), of y = act(conv + bias + residual)
# (NORM false) and of a bias alone: one pass over the channels' pixels for the
# per-channel sums, then CHANNEL_GRAD_APPLY for dx.  g = dy·act'(y) comes from
# the saved output, x̂ = (x − mean)·rstd is recomputed from the saved input.
# PARTIALS: the sums come per tile from a conv's dgrad epilogue instead.
CHANNEL_GRAD = r'''
@triton.jit
def $NAME(
    # pointers
    dy_ptr, y_ptr, x_ptr, mean_ptr, rstd_ptr, weight_ptr, scale_ptr, shift_ptr, g_ptr, pg_ptr, pgx_ptr, count_ptr,
    dweight_ptr, dbias_ptr, dcbias_ptr, coef_ptr, sums_ptr,
    # sizes
    N, C, H, W, T, slope,
    # strides
    sdn, sdc, sdh, sdw, syn, syc, syh, syw, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
    # meta-parameters
    ACC: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, TRAIN: tl.constexpr, AFFINE: tl.constexpr,
    Y_FROM_X: tl.constexpr, CENTER: tl.constexpr, STORE_G: tl.constexpr, PARTIALS: tl.constexpr,
    CONV_BIAS: tl.constexpr, SYNC: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # SYNC (a batch norm synchronised over processes): the sums Σg, Σg·x̂
    # and the count are also stored, twice, in sums ([2, 2C + 1]): one copy
    # to keep, one to all-reduce; BN_GRAD_SYNC_FINISH then makes coef from
    # the group's (dγ and dβ stay this process's, as nn.SyncBatchNorm's).
    # Y_FROM_X: the output y was never stored (its BN and activation were
    # deferred into the consumer's loads): recompute it as that prologue did,
    # y = act((x − mean)·scale + shift) (x·scale + shift when not CENTER)
    # PARTIALS: a dgrad's epilogue left Σg and Σg·x̂ per tile (T rows):
    # nothing per pixel is read, one program per block of channels.
    # Otherwise the pixels are split: a program per tile of BLOCK_M pixels ×
    # BLOCK_C channels (grid: tiles × channel blocks) stores its tile's sums (a
    # row of pg / pgx, and g with STORE_G), and the last of each column's
    # programs to finish sums the rows (merge_column) and finishes.
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    M = N * H * W
    if NORM:
        mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)
        rstd = tl.load(rstd_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)
    if PARTIALS:
        sg, sgx = channel_sums(pg_ptr, pgx_ptr, offs_c, c_mask, C, 0, T, 1, ACC, BLOCK_M, BLOCK_C)
        last = True
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if IDX64:  # past 2^31 elements
            offs_m = offs_m.to(tl.int64)
        mask = (offs_m < M)[:, None] & c_mask[None, :]
        n = offs_m // (H * W)
        h = (offs_m // W) % H
        w = offs_m % W
        g = tl.load(dy_ptr + (n * sdn + h * sdh + w * sdw)[:, None] + offs_c[None, :] * sdc, mask=mask, other=0.0)
        g = g.to(ACC)
        gx = tl.zeros_like(g)
        if NORM:
            x = tl.load(x_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + offs_c[None, :] * sxc, mask=mask, other=0.0)
            if Y_FROM_X:
                g, xh = bn_act_grad(g, x, mask, offs_c, c_mask, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, CENTER,
                                    ACT, slope, ACC, 1)
            else:
                xh = tl.where(mask, (x.to(ACC) - mean[None, :]) * rstd[None, :], 0.0)
        if not Y_FROM_X:
            if ACT != 0:
                y = tl.load(y_ptr + (n * syn + h * syh + w * syw)[:, None] + offs_c[None, :] * syc, mask=mask,
                            other=0.0)
                g = activation_grad(g, y.to(ACC), ACT, slope)
        if STORE_G:
            tl.store(g_ptr + (n * sgn + h * sgh + w * sgw)[:, None] + offs_c[None, :] * sgc,
                     g.to(g_ptr.dtype.element_ty), mask=mask)
        if NORM:
            gx = g * xh
        tl.store(pg_ptr + pid_m * C + offs_c, tl.sum(g, axis=0).to(pg_ptr.dtype.element_ty), mask=c_mask)
        tl.store(pgx_ptr + pid_m * C + offs_c, tl.sum(gx, axis=0).to(pgx_ptr.dtype.element_ty), mask=c_mask)
        last, sg, sgx = merge_column(pg_ptr, pgx_ptr, count_ptr, pid_m, pid_c, 0, tl.num_programs(0),
                                     tl.num_programs(1), 1, offs_c, c_mask, C, M, False, ACC, BLOCK_M, BLOCK_C)
    if last:
        if NORM:
            # (Σ x̂, for a conv bias's gradient: 0 with batch statistics, and unused without)
            bn_grad_finish(sg, sgx, tl.zeros_like(sg), offs_c, c_mask, C, M, rstd, weight_ptr, dweight_ptr, dbias_ptr,
                           dcbias_ptr, coef_ptr, AFFINE, TRAIN, CONV_BIAS)
            if SYNC:
                for r in range(0, 2):
                    row = sums_ptr + r * (2 * C + 1)
                    tl.store(row + offs_c, sg.to(sums_ptr.dtype.element_ty), mask=c_mask)
                    tl.store(row + C + offs_c, sgx.to(sums_ptr.dtype.element_ty), mask=c_mask)
                    tl.store(row + 2 * C + offs_c * 0, (tl.zeros_like(sg) + M).to(sums_ptr.dtype.element_ty),
                             mask=offs_c == 0)
        elif CONV_BIAS:
            tl.store(dcbias_ptr + offs_c, sg.to(dcbias_ptr.dtype.element_ty), mask=c_mask)
'''

CHANNEL_GRAD_APPLY = r'''
@triton.jit
def $NAME(
    # pointers
    dy_ptr, y_ptr, x_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, coef_ptr, res_ptr, dx_ptr, g_ptr,
    # sizes
    N, C, H, W, slope,
    # strides
    sdn, sdc, sdh, sdw, syn, syc, syh, syw, sxn, sxc, sxh, sxw, srn, src, srh, srw, son, soc, soh, sow,
    sgn, sgc, sgh, sgw,
    # meta-parameters
    ACC: tl.constexpr, ACT: tl.constexpr, TRAIN: tl.constexpr, Y_FROM_X: tl.constexpr, CENTER: tl.constexpr,
    STORE_G: tl.constexpr, HAS_RES: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # HAS_RES: res is x's gradient from its other consumers, added in (a fork's sum, without a launch of its own)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    c_mask = offs_c < C
    mask = (offs_m < N * H * W)[:, None] & c_mask[None, :]
    n = offs_m // (H * W)
    h = (offs_m // W) % H
    w = offs_m % W
    dy = tl.load(dy_ptr + (n * sdn + h * sdh + w * sdw)[:, None] + offs_c[None, :] * sdc, mask=mask, other=0.0)
    if Y_FROM_X:  # as in CHANNEL_GRAD; this is the prologue a conv's dgrad applies when it can
        x = tl.load(x_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + offs_c[None, :] * sxc, mask=mask, other=0.0)
        dx = bn_grad_prologue(dy, x, mask, offs_c, c_mask, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, coef_ptr, C,
                              CENTER, ACT, slope, TRAIN, ACC, 1)
    else:
        g = dy.to(ACC)
        if ACT != 0:
            y = tl.load(y_ptr + (n * syn + h * syh + w * syw)[:, None] + offs_c[None, :] * syc, mask=mask, other=0.0)
            g = activation_grad(g, y.to(ACC), ACT, slope)
        if STORE_G:  # the residual branch's gradient
            tl.store(g_ptr + (n * sgn + h * sgh + w * sgw)[:, None] + offs_c[None, :] * sgc,
                     g.to(g_ptr.dtype.element_ty), mask=mask)
        dx = tl.load(coef_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)[None, :] * g
        if TRAIN:
            x = tl.load(x_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + offs_c[None, :] * sxc, mask=mask, other=0.0)
            xh = (x.to(ACC) - tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)[None, :]) \
                * tl.load(rstd_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)[None, :]
            dx = dx + tl.load(coef_ptr + C + offs_c, mask=c_mask, other=0.0).to(ACC)[None, :] \
                + tl.load(coef_ptr + 2 * C + offs_c, mask=c_mask, other=0.0).to(ACC)[None, :] * xh
    if HAS_RES:
        dx = dx + tl.load(res_ptr + (n * srn + h * srh + w * srw)[:, None] + offs_c[None, :] * src, mask=mask,
                          other=0.0).to(ACC)
    tl.store(dx_ptr + (n * son + h * soh + w * sow)[:, None] + offs_c[None, :] * soc, dx.to(dx_ptr.dtype.element_ty), mask=mask)
'''

# dx_i = g_i·d_i^−β − (2αβ/size)·x_i·Σ_c g_c·x_c·d_c^(−β−1) over the channels c
# whose window holds i (c in [i − (size−1)//2, i + size//2]); d recomputed.
LRN_BACKWARD = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, dy_ptr, dx_ptr,
    # sizes
    N, C, H, W, alpha, beta, k,
    # strides
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, son, soc, soh, sow,
    # meta-parameters
    ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    SIZE = $SIZE
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:  # past 2^31 elements
        offs_m = offs_m.to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = offs_m < N * H * W
    mask = m_mask[:, None] & (offs_c < C)[None, :]
    n = offs_m // (H * W)
    h = (offs_m // W) % H
    w = offs_m % W
    xrow = n * sxn + h * sxh + w * sxw
    drow = n * sdn + h * sdh + w * sdw
    total = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for t in range(SIZE):
        c = offs_c + t - (SIZE - 1) // 2  # a channel whose window holds offs_c
        c_ok = m_mask[:, None] & ((c >= 0) & (c < C))[None, :]
        sq = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
        for j in range(SIZE):
            cj = c + j - SIZE // 2
            ok = c_ok & ((cj >= 0) & (cj < C))[None, :]
            v = tl.load(x_ptr + xrow[:, None] + cj[None, :] * sxc, mask=ok, other=0.0).to(ACC)
            sq += v * v
        d = k + alpha / SIZE * sq
        xc = tl.load(x_ptr + xrow[:, None] + c[None, :] * sxc, mask=c_ok, other=0.0).to(ACC)
        gc = tl.load(dy_ptr + drow[:, None] + c[None, :] * sdc, mask=c_ok, other=0.0).to(ACC)
        total += tl.where(c_ok, gc * xc * tl.exp((-beta - 1.0) * tl.log(d)), 0.0)
    sq = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for j in range(SIZE):
        cj = offs_c + j - SIZE // 2
        ok = m_mask[:, None] & ((cj >= 0) & (cj < C))[None, :]
        v = tl.load(x_ptr + xrow[:, None] + cj[None, :] * sxc, mask=ok, other=0.0).to(ACC)
        sq += v * v
    d = k + alpha / SIZE * sq
    x = tl.load(x_ptr + xrow[:, None] + offs_c[None, :] * sxc, mask=mask, other=0.0).to(ACC)
    g = tl.load(dy_ptr + drow[:, None] + offs_c[None, :] * sdc, mask=mask, other=0.0).to(ACC)
    dx = g * tl.exp(-beta * tl.log(d)) - 2.0 * alpha * beta / SIZE * x * total
    orow = n * son + h * soh + w * sow
    tl.store(dx_ptr + orow[:, None] + offs_c[None, :] * soc, dx.to(dx_ptr.dtype.element_ty), mask=mask)
'''


def _tiles(M, C, on_gpu):
    # the interpreter runs each program in Python: few, large tiles are fastest there
    if on_gpu:
        return 64, max(16, min(64, triton.next_power_of_2(C)))
    # (the interpreter needs no minimum tile: channels fit exactly)
    bc = min(512, triton.next_power_of_2(C))
    return max(16, min((1 << 16) // bc, triton.next_power_of_2(M))), bc


def _reduce_tiles(rt, x4):
    N, C, H, W = x4.shape
    bm, bc = _tiles(N * H * W, C, rt.gpu_tiles(x4))
    return bm, 16 if rt.gpu_tiles(x4) else bc


def _split_tiles(rt, x4, C, bc_max):
    """(BLOCK_M, BLOCK_C) of a split reduction over x4's pixels: one tile a
    program.  On a GPU, tiles of 64 pixels, so the grid covers the GPU
    (ResNet-50's stem BN backward at batch 256: 100,352 programs, where one
    program per 16 channels made 4); in the interpreter, few large tiles."""
    N, _, H, W = x4.shape
    if rt.gpu_tiles(x4):
        return 64, max(16, min(bc_max, triton.next_power_of_2(C)))
    return _tiles(N * H * W, C, False)


def merge_counters(grid, BM):
    """The counters a merging launch uses (merge_column over grid's first
    axis, conv.py's MERGE_SLOTS layout): one per group of BM tiles of each
    column of tiles, and one per column."""
    return grid[1] * grid[2] * (triton.cdiv(grid[0], BM) + 1)


def _split_partials(rt, x4, grid_m, C, columns, bm):
    """The [grid_m, C] rows of per-tile sums a split reduction merges, and its merge counters."""
    ps = reduce_dtype(rt, x4)
    a, b = (torch.empty((grid_m, C), device=x4.device, dtype=ps) for _ in range(2))
    return a, b, rt.counters(x4.device, merge_counters((grid_m, columns, 1), bm))


class BatchStats(NamedTuple):
    """A training batch norm's per-channel results: y = (x − mean)·scale + shift, rstd for backward."""
    scale: torch.Tensor
    shift: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor


class BNSums(NamedTuple):
    """What a batch norm's backward reduction gives (channel_grad, or a dgrad's
    last programs): coef (A, B, C per channel: dx = A·g + B + C·x̂), the
    parameter gradients and a producing conv bias's gradient (None where not
    wanted); weight is the BN's γ (None without affine), train whether it
    used batch statistics."""
    coef: torch.Tensor
    dgamma: object
    dbeta: object
    dcbias: object
    weight: object
    train: bool


def bn_sums_operands(sums: BNSums, dummy):
    """BN_GRAD_FINISH's pointers, in kernel order: (γ, dγ, dβ, dconv_bias, coef)."""
    return tuple(t if t is not None else dummy for t in (sums.weight, sums.dgamma, sums.dbeta, sums.dcbias)) \
        + (sums.coef,)


def check_batch(bn, shape):
    """torch's own check, before anything runs: a batch statistic needs two values per channel."""
    N, _, H, W = shape
    if N * H * W <= 1 and bn.training:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(shape)}")


def bn_operands(bn, st: BatchStats):
    """What BN_FINISH takes of a batch norm, in kernel order: (weight, bias,
    running mean, running var, batches tracked, mean, rstd, scale, shift),
    (eps, momentum), dict(AFFINE, TRACK)."""
    track = bn.running_mean is not None
    momentum = 0.0
    if track and bn.training:
        # momentum None: torch's cumulative average, 1 / batches tracked (after this one)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / (int(bn.num_batches_tracked) + 1)
    d = st.mean
    ptrs = (bn.weight if bn.affine else d, bn.bias if bn.affine else d, bn.running_mean if track else d,
            bn.running_var if track else d, bn.num_batches_tracked if track else d, st.mean, st.rstd, st.scale, st.shift)
    return ptrs, (float(bn.eps), float(momentum)), dict(AFFINE=bn.affine, TRACK=track and bn.training)


def bn_stats(rt, kernel, bn, x4, st: BatchStats, partials=None, cache=None, sync=False):
    """Training: batch mean, rstd, scale and shift of `bn` over x4 into st, and its
    running-stat update; from the producing conv's per-tile partials when given
    (x4 is then not read).  cache = (cmean, cvar, known): per-channel batch
    mean and variance of x4's data, valid for its first `known` channels;
    only the others are read, and their statistics are added to the cache.
    sync: only this process's count, mean and variance, into st's scale,
    mean and rstd (for bn_sync_finish, after an all-gather)."""
    N, C, H, W = x4.shape
    cmean, cvar, known = cache if cache is not None else (st.mean, st.mean, 0)
    grid_m = n_fresh = 1
    if partials is not None:
        bm, bc = _reduce_tiles(rt, x4)
        psum, pm2, tile = partials
        bm = min(bm, triton.next_power_of_2(psum.shape[0]))
        grid, count = (triton.cdiv(C, bc),), psum
    else:
        # 32 channels a tile on a GPU: with 64, ptxas used 203-211 registers (sm_90 and sm_80, 4 warps)
        bm, bc = _split_tiles(rt, x4, C - known, 32)
        grid_m, tile = triton.cdiv(N * H * W, bm), bm
        n_fresh = triton.cdiv(C, bc) - known // bc
        psum, pm2, count = _split_partials(rt, x4, grid_m, C, n_fresh, bm)
        grid = (grid_m * n_fresh + known // bc,)
    # with partials x4 is not read: pass a partials buffer in its place (what a launch touches stays exact);
    # with a cache, only the channels from `known` on
    x = psum if partials is not None else x4[:, known:] if known else x4
    ptrs, scalars, meta = bn_operands(bn, st)
    # Compiled as a GPU specialises it (n_fresh == 1 a constant: a dense layer's one fresh block of channels),
    # ptxas capped the split reduction at 96 registers on sm_90 and spilled 8 bytes (Triton 3.6,
    # DenseNet-121): lift the cap, as the conv kernels do
    options = {"maxnreg": 255} if rt.gpu_tiles(x4) else {}
    rt.launch(kernel, grid, x, psum, pm2, count, *ptrs, cmean, cvar,
              N, C, H, W, psum.shape[0] if partials is not None else 1, tile, known, grid_m, n_fresh, *scalars,
              *x4.stride(), PARTIALS=partials is not None, CACHED=cache is not None, SYNC=sync, **meta,
              ACC=reduce_acc(rt, x4), IDX64=rt.needs_int64(x4), BLOCK_M=bm, BLOCK_C=bc, **options)


def bn_sync_finish(rt, kernel, bn, stats, st: BatchStats):
    """A synchronised batch norm's statistics into st (and its running-stat
    update) from stats, [P, 3, C]: each process's bn_stats(sync=True)."""
    P, _, C = stats.shape
    ptrs, scalars, meta = bn_operands(bn, st)
    bc = min(triton.next_power_of_2(C), 128)
    rt.launch(kernel, (triton.cdiv(C, bc),), stats, *ptrs, P, C, *scalars, **meta, ACC=reduce_acc(rt, stats),
              BLOCK_C=bc)


def bn_grad_sync_finish(rt, kernel, sums, mean, rstd, weight, coef, lstats=None, dcbias=None):
    """coef of a synchronised batch norm's input gradient from sums (channel_grad's
    sync rows, the second all-reduced); dcbias (with lstats, this process's
    bn_stats(sync=True) of the conv output): the producing conv bias's gradient."""
    C = rstd.shape[0]
    bc = min(triton.next_power_of_2(C), 128)
    rt.launch(kernel, (triton.cdiv(C, bc),), sums, mean, rstd, weight if weight is not None else rstd,
              lstats if lstats is not None else rstd, dcbias if dcbias is not None else rstd, coef, C,
              AFFINE=weight is not None, CONV_BIAS=dcbias is not None, ACC=reduce_acc(rt, rstd), BLOCK_C=bc)


def reduce_acc(rt, x):
    """Per-channel reductions over a batch: float on CUDA, double on the CPU, as torch's."""
    import triton.language as tl

    return rt.acc(x) if rt.gpu_tiles(x) else tl.float64


def reduce_dtype(rt, x):
    """reduce_acc as a torch dtype: for the buffers of per-tile sums and per-channel statistics."""
    import triton.language as tl

    return torch.float64 if reduce_acc(rt, x) == tl.float64 else torch.float32


def bn_fold(rt, kernel, bn, rstd, scale, shift, conv_bias=None):
    """Eval: rstd, scale and shift from the running statistics."""
    C = scale.shape[0]
    bc = max(16, min(1024, triton.next_power_of_2(C)))
    rt.launch(kernel, (triton.cdiv(C, bc),), bn.weight if bn.affine else scale, bn.bias if bn.affine else scale,
              bn.running_mean, bn.running_var, conv_bias if conv_bias is not None else scale, rstd, scale, shift,
              C, float(bn.eps), ACC=rt.acc(scale), AFFINE=bn.affine, CONV_BIAS=conv_bias is not None, BLOCK_C=bc)


def relu_bits(out4, act):
    """The buffer channel_affine's BITS fills with act(...) > 0 for out4, or
    None where the activation needs more than its sign or C is no multiple of 8."""
    N, C, H, W = out4.shape
    if act not in ("relu", "leaky_relu") or C % 8:
        return None
    return torch.empty((N * H * W, C // 8), device=out4.device, dtype=torch.uint8)


def channel_affine(rt, kernel, x4, scale, shift, out4, residual4=None, act=None, slope=0.01, center=None,
                   res_affine=None, bits=None):
    """out = act((x − center)·scale + shift [+ residual]); res_affine = (center
    or None, scale, shift): the residual normalised the same way as it is
    loaded.  bits (relu_bits'): out > 0 is also stored there, a bit a channel."""
    N, C, H, W = x4.shape
    bm, bc = _tiles(N * H * W, C, rt.gpu_tiles(x4))
    if rt.gpu_tiles(x4) and res_affine is not None:
        bm = 32  # 64×64 spilled 76-92 bytes at 255 registers (sm_90 and sm_80, Triton 3.6)
    r = residual4 if residual4 is not None else out4
    rc, rs, rh = res_affine if res_affine is not None else (None, scale, shift)
    rt.launch(kernel, (triton.cdiv(N * H * W, bm), triton.cdiv(C, bc)),
              x4, center if center is not None else scale, scale, shift, r, out4, rc if rc is not None else rs, rs, rh,
              bits if bits is not None else out4,
              N, C, H, W, float(slope), *x4.stride(), *r.stride(), *out4.stride(), ACC=rt.acc(x4),
              HAS_CENTER=center is not None, HAS_RES=residual4 is not None, RES_BN=res_affine is not None,
              RES_CENTER=rc is not None, ACT=ACT_CODES[act], BITS=bits is not None, IDX64=rt.needs_int64(x4, out4, r),
              BLOCK_M=bm, BLOCK_C=bc)


def channel_grad(rt, kernel, dy4, *, y4=None, act=None, slope=0.01, x4=None, mean=None, rstd=None, weight=None,
                 deferred=None, train=False, g4=None, partials=None, dweight=None, dbias=None, dcbias=None, coef=None,
                 sync=None):
    """Per-channel sums of g = dy·act'(y) (and of g·x̂, x̂ with BN): the BN
    parameter gradients, a conv bias's gradient, and coef (A, B, C: dx =
    A·g + B + C·x̂) for CHANNEL_GRAD_APPLY or a conv's bn_grad_prologue.
    With g4, g is also written out.  deferred = (scale, shift, centered): y
    was never stored, it is recomputed as act((x − mean)·scale + shift)
    (not centered: x·scale + shift).  partials = (Σg, Σg·x̂ per tile, tile), from a
    dgrad's epilogue: dy4 is then not read (only its shape counts).  sync: a
    [2, 2C + 1] buffer for the sums of a batch norm synchronised over
    processes (see bn_grad_sync_finish)."""
    N, C, H, W = dy4.shape
    norm = mean is not None
    anyc = coef if coef is not None else (dcbias if dcbias is not None else mean)
    scale, shift, centered = deferred if deferred is not None else (anyc, anyc, False)
    if partials is not None:  # nothing per pixel is read: the partials stand in for those operands
        bm, bc = _reduce_tiles(rt, dy4)
        pg, pgx, _ = partials
        bm = min(bm, triton.next_power_of_2(pg.shape[0]))
        tensors, strides = (pg,) * 4, (0,) * 16
        grid, count = (1, triton.cdiv(C, bc)), pg
    else:
        # 32 channels a tile on a GPU: up to five tiles (dy, x, g, x̂, g·x̂) are live at once
        bm, bc = _split_tiles(rt, dy4, C, 32)
        grid = (triton.cdiv(N * H * W, bm), triton.cdiv(C, bc))
        pg, pgx, count = _split_partials(rt, dy4, grid[0], C, grid[1], bm)
        tensors = tuple(t if t is not None else dy4 for t in (dy4, y4, x4, g4))
        strides = tuple(v for t in tensors for v in t.stride())
    import triton.language as tl

    acc = rt.acc(dy4) if rt.gpu_tiles(dy4) else tl.float64  # as bn_stats: double sums on the CPU, as torch
    rt.launch(kernel, grid, *tensors[:3],
              mean if norm else anyc, rstd if norm else anyc, weight if weight is not None else anyc,
              scale, shift, tensors[3], pg, pgx, count,
              dweight if dweight is not None else anyc, dbias if dbias is not None else anyc,
              dcbias if dcbias is not None else anyc, coef if coef is not None else anyc,
              sync if sync is not None else anyc,
              N, C, H, W, pg.shape[0] if partials is not None else 1, float(slope), *strides,
              ACC=acc, ACT=ACT_CODES[act], NORM=norm, TRAIN=train, AFFINE=weight is not None,
              Y_FROM_X=deferred is not None, CENTER=centered, STORE_G=g4 is not None, PARTIALS=partials is not None,
              CONV_BIAS=dcbias is not None, SYNC=sync is not None, IDX64=rt.needs_int64(*tensors), BLOCK_M=bm,
              BLOCK_C=bc)


def channel_grad_apply(rt, kernel, dy4, coef, dx4, *, y4=None, act=None, slope=0.01, x4=None, mean=None, rstd=None,
                       deferred=None, train=False, g4=None, residual4=None):
    """dx = A·g + B + C·x̂ (coef from channel_grad) [+ residual4], g = dy·act'(y);
    with g4 also g (a residual's gradient); deferred as channel_grad's."""
    N, C, H, W = dy4.shape
    bm, bc = _tiles(N * H * W, C, rt.gpu_tiles(dy4))
    if rt.gpu_tiles(dy4):
        bm = 32  # five pointer tiles: 64×64 spilled under fp16 (sm_90, Triton 3.6)
    y4 = y4 if y4 is not None else dy4
    x4 = x4 if x4 is not None else dy4
    g = g4 if g4 is not None else dx4
    scale, shift, centered = deferred if deferred is not None else (coef, coef, False)
    r = residual4 if residual4 is not None else dx4
    rt.launch(kernel, (triton.cdiv(N * H * W, bm), triton.cdiv(C, bc)), dy4, y4, x4,
              mean if mean is not None else coef, rstd if rstd is not None else coef, scale, shift, coef, r, dx4, g,
              N, C, H, W, float(slope), *dy4.stride(), *y4.stride(), *x4.stride(), *r.stride(), *dx4.stride(),
              *g.stride(), ACC=rt.acc(dy4), ACT=ACT_CODES[act], TRAIN=train, Y_FROM_X=deferred is not None,
              CENTER=centered, STORE_G=g4 is not None, HAS_RES=residual4 is not None,
              IDX64=rt.needs_int64(dy4, y4, x4, dx4, g, r), BLOCK_M=bm, BLOCK_C=bc)


def lrn(rt, kernel, x4, out4, alpha, beta, k):
    N, C, H, W = x4.shape
    bm, bc = _tiles(N * H * W, C, rt.gpu_tiles(x4))
    rt.launch(kernel, (triton.cdiv(N * H * W, bm), triton.cdiv(C, bc)), x4, out4, N, C, H, W,
              float(alpha), float(beta), float(k), *x4.stride(), *out4.stride(), ACC=rt.acc(x4),
              IDX64=rt.needs_int64(x4, out4), BLOCK_M=bm, BLOCK_C=bc)


def lrn_backward(rt, kernel, x4, dy4, dx4, alpha, beta, k):
    N, C, H, W = x4.shape
    bm, bc = _tiles(N * H * W, C, rt.gpu_tiles(x4))
    if not rt.gpu_tiles(x4):
        bm = min(bm, 1024)  # SIZE² loads of a tile each: keep the interpreter's arrays modest
    rt.launch(kernel, (triton.cdiv(N * H * W, bm), triton.cdiv(C, bc)), x4, dy4, dx4, N, C, H, W,
              float(alpha), float(beta), float(k), *x4.stride(), *dy4.stride(), *dx4.stride(),
              ACC=rt.acc(x4), IDX64=rt.needs_int64(x4, dy4, dx4), BLOCK_M=bm, BLOCK_C=bc)


def _softmax_tiles(rt, x4):
    N, C, H, W = x4.shape
    bc = max(16, triton.next_power_of_2(C))
    bm = 16 if rt.gpu_tiles(x4) else max(16, min(256, triton.next_power_of_2(N * H * W)))
    return bm, bc


def softmax(rt, kernel, x4, out4):
    N, C, H, W = x4.shape
    bm, bc = _softmax_tiles(rt, x4)
    rt.launch(kernel, (triton.cdiv(N * H * W, bm),), x4, out4, N, C, H, W, *x4.stride(), *out4.stride(),
              ACC=rt.acc(x4), IDX64=rt.needs_int64(x4, out4), BLOCK_M=bm, BLOCK_C=bc)


def softmax_backward(rt, kernel, y4, dy4, dx4):
    N, C, H, W = y4.shape
    bm, bc = _softmax_tiles(rt, y4)
    rt.launch(kernel, (triton.cdiv(N * H * W, bm),), y4, dy4, dx4, N, C, H, W,
              *y4.stride(), *dy4.stride(), *dx4.stride(), ACC=rt.acc(y4), IDX64=rt.needs_int64(y4, dy4, dx4),
              BLOCK_M=bm, BLOCK_C=bc)
