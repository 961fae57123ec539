"""Depthwise convolution (groups == input channels == output channels) as a
direct kernel: each output element is a sum over its window's taps of one
input channel, so there is no GEMM to feed.  The implicit GEMM of conv.py
would pad each group's one input channel to tl.dot's minimum block of 16
and waste 15/16 of every tile.

A program computes [BLOCK_M output pixels, BLOCK_C channels] (a
channels-last tile reads contiguous channels), walks the window's taps in
fp32 (ACC), and applies the conv epilogue: a per-channel scale (a folded
batch norm) and shift (bias or BN), a residual and an activation, or (a
train-mode batch norm after it) per-tile sums for the BN statistics.  The
inference plan uses it for every depthwise conv (the `depthwise_direct`
pass).  The training forward runs a depthwise conv followed by a batch norm
here too (the conv and its bias; the batch norm by its own kernels), with
two direct backward kernels: DEPTHWISE2D_DGRAD (each input element gathers
the outputs its taps reached) and DEPTHWISE2D_WGRAD (per-program partial
sums of dy·x for each tap, and of dy for the bias), whose partials
DEPTHWISE_WGRAD_SUM adds up in a fixed order: no atomics."""
import torch
import triton

from . import ACT_CODES
from .norm import reduce_dtype

PIXEL_TILE = r'''
@triton.jit
def $NAME(N, C, H, W, PER_SAMPLE: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # this program's [BLOCK_M pixels of an N×H×W grid, BLOCK_C channels]: (n, h, w, channels, pixel mask,
    # channel mask); offsets in int64 past 2^31 elements.  PER_SAMPLE: no tile spans two samples (each
    # sample's H·W pixels take cdiv(H·W, BLOCK_M) programs), so a tile's sums over its pixels are one sample's
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if PER_SAMPLE:
        tiles = tl.cdiv(H * W, BLOCK_M)
        offs_p = (tl.program_id(0) % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.zeros((BLOCK_M,), dtype=tl.int32) + tl.program_id(0) // tiles
        p_mask = offs_p < H * W
        if IDX64:
            offs_p = offs_p.to(tl.int64)
            n = n.to(tl.int64)
            offs_c = offs_c.to(tl.int64)
        return n, offs_p // W, offs_p % W, offs_c, p_mask, offs_c < C
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    return offs_m // (W * H), (offs_m // W) % H, offs_m % W, offs_c, offs_m < N * H * W, offs_c < C
'''

DEPTHWISE2D = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, w_ptr, scale_ptr, shift_ptr, r_ptr, y_ptr, psum_ptr, pm2_ptr,
    # sizes
    N, C, H, W, Ho, Wo, slope,
    # strides
    sxn, sxc, sxh, sxw, swc, swh, sww, srn, src, srh, srw, syn, syc, syh, syw,
    # meta-parameters
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr,
    POOL: tl.constexpr, ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # POOL (not with STATS): each tile also stores its per-channel sum of the stored output in row
    # program_id(0) of psum ([N, tiles per sample, C]: the tiles are per sample), for a global average pool
    # of y (a squeeze-and-excitation's) that then reads those sums instead of y
    $GEOMETRY
    n, oh, ow, offs_c, m_mask, c_mask = pixel_tile(N, C, Ho, Wo, POOL, IDX64, BLOCK_M, BLOCK_C)
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for kh in range(KH):
        ih = h0 + kh * DH
        for kw in range(KW):
            iw = w0 + kw * DW
            ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc,
                        mask=ok[:, None] & c_mask[None, :], other=0.0)
            w = tl.load(w_ptr + offs_c * swc + kh * swh + kw * sww, mask=c_mask, other=0.0)
            acc += x.to(ACC) * w.to(ACC)[None, :]
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)[None, :]
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)[None, :]
    mask = m_mask[:, None] & c_mask[None, :]
    if HAS_RES:
        acc = acc + tl.load(r_ptr + (n * srn + oh * srh + ow * srw)[:, None] + offs_c[None, :] * src, mask=mask,
                            other=0.0).to(ACC)
    acc = activation(acc, ACT, slope)
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + (n * syn + oh * syh + ow * syw)[:, None] + offs_c[None, :] * syc, y, mask=mask)
    if STATS:
        # a train-mode batch norm's first pass, on the stored values, as the conv kernels' (bn_stats merges
        # them): per channel, this tile's sum and squared deviations from the tile's mean
        PS = psum_ptr.dtype.element_ty
        v = tl.where(mask, y.to(PS), 0.0)
        sm = tl.sum(v, axis=0)
        cnt = tl.minimum(N * Ho * Wo - tl.program_id(0) * BLOCK_M, BLOCK_M).to(PS)
        d = tl.where(mask, v - (sm / cnt)[None, :], 0.0)
        tl.store(psum_ptr + tl.program_id(0) * C + offs_c, sm, mask=c_mask)
        tl.store(pm2_ptr + tl.program_id(0) * C + offs_c, tl.sum(d * d, axis=0), mask=c_mask)
    if POOL:
        PS = psum_ptr.dtype.element_ty
        tl.store(psum_ptr + tl.program_id(0) * C + offs_c, tl.sum(tl.where(mask, y.to(PS), 0.0), axis=0), mask=c_mask)
'''

DEPTHWISE2D_DGRAD = r'''
@triton.jit
def $NAME(
    # pointers
    dy_ptr, w_ptr, dx_ptr,
    # sizes
    N, C, H, W, Ho, Wo,
    # strides
    sdn, sdc, sdh, sdw, swc, swh, sww, sxn, sxc, sxh, sxw,
    # meta-parameters
    ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    $GEOMETRY
    # [BLOCK_M input pixels, BLOCK_C channels]: each gathers dy·w over the outputs whose window held it
    n, ih, iw, offs_c, m_mask, c_mask = pixel_tile(N, C, H, W, False, IDX64, BLOCK_M, BLOCK_C)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for kh in range(KH):
        th = ih + PH - kh * DH
        oh = th // SH
        for kw in range(KW):
            tw = iw + PW - kw * DW
            ow = tw // SW
            # (a negative th or tw is masked before its quotient matters)
            ok = m_mask & (th >= 0) & (tw >= 0) & (th % SH == 0) & (tw % SW == 0) & (oh < Ho) & (ow < Wo)
            dy = tl.load(dy_ptr + (n * sdn + oh * sdh + ow * sdw)[:, None] + offs_c[None, :] * sdc,
                         mask=ok[:, None] & c_mask[None, :], other=0.0)
            w = tl.load(w_ptr + offs_c * swc + kh * swh + kw * sww, mask=c_mask, other=0.0)
            acc += dy.to(ACC) * w.to(ACC)[None, :]
    tl.store(dx_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc,
             acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & c_mask[None, :])
'''

DEPTHWISE2D_WGRAD = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, dy_ptr, part_ptr,
    # sizes
    N, C, H, W, Ho, Wo,
    # strides
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
    # meta-parameters
    ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    $GEOMETRY
    # this program's [BLOCK_M output pixels] share of each channel's weight gradient, tap by tap, and of its
    # bias gradient: row program_id(0) of the partials, laid out [C, KH·KW + 1]
    TAPS: tl.constexpr = KH * KW
    n, oh, ow, offs_c, m_mask, c_mask = pixel_tile(N, C, Ho, Wo, False, IDX64, BLOCK_M, BLOCK_C)
    mask = m_mask[:, None] & c_mask[None, :]
    dy = tl.load(dy_ptr + (n * sdn + oh * sdh + ow * sdw)[:, None] + offs_c[None, :] * sdc, mask=mask,
                 other=0.0).to(ACC)
    row = part_ptr + tl.program_id(0) * C * (TAPS + 1) + offs_c * (TAPS + 1)
    for kh in range(KH):
        ih = oh * SH - PH + kh * DH
        for kw in range(KW):
            iw = ow * SW - PW + kw * DW
            ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc,
                        mask=ok[:, None] & c_mask[None, :], other=0.0)
            tl.store(row + kh * KW + kw, tl.sum(dy * x.to(ACC), axis=0).to(part_ptr.dtype.element_ty), mask=c_mask)
    tl.store(row + TAPS, tl.sum(dy, axis=0).to(part_ptr.dtype.element_ty), mask=c_mask)
'''

DEPTHWISE_WGRAD_SUM = r'''
@triton.jit
def $NAME(
    # pointers
    part_ptr, dw_ptr, db_ptr,
    # sizes
    T, C, TAPS,
    # meta-parameters
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr,
):
    # column j = c·(TAPS + 1) + tap of the partials, summed over their T rows in order: tap < TAPS is the
    # weight gradient's [c, 0, kh, kw], tap == TAPS the bias gradient's [c]
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    J = C * (TAPS + 1)
    j_mask = j < J
    acc = tl.zeros((BLOCK_J,), dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        v = tl.load(part_ptr + rows[:, None] * J + j[None, :], mask=(rows < T)[:, None] & j_mask[None, :], other=0.0)
        acc += tl.sum(v.to(ACC), axis=0)
    c = j // (TAPS + 1)
    tap = j % (TAPS + 1)
    tl.store(dw_ptr + c * TAPS + tap, acc.to(dw_ptr.dtype.element_ty), mask=j_mask & (tap < TAPS))
    if HAS_BIAS:
        tl.store(db_ptr + c, acc.to(db_ptr.dtype.element_ty), mask=j_mask & (tap == TAPS))
'''


def is_depthwise(attrs) -> bool:
    """A conv the direct kernel runs: one input channel per output channel."""
    return attrs["groups"] > 1 and attrs["groups"] == attrs["in_channels"] == attrs["out_channels"]


def _tiles(rt, x, M, C):
    return tile_sizes(rt.gpu_tiles(x), M, C)


def tile_sizes(on_gpu, M, C):
    """(BLOCK_M, BLOCK_C) of M pixels and C channels."""
    if on_gpu:
        return 32, max(16, min(64, triton.next_power_of_2(C)))
    # the interpreter runs each program in Python: few, large tiles
    bc = min(512, triton.next_power_of_2(C))
    return max(2, min((1 << 16) // bc, triton.next_power_of_2(M))), bc


def pool_tiles(on_gpu, HW, C) -> int:
    """The rows of pool sums a sample of HW output pixels and C channels gets (depthwise2d's pool)."""
    return triton.cdiv(HW, tile_sizes(on_gpu, HW, C)[0])


def depthwise2d(rt, kernel, x, weight, out, scale=None, shift=None, residual=None, act=None, slope=0.01,
                stats=False, pool=False):
    """out[N, C, Ho, Wo] = act(depthwise_conv(x, weight) · scale + shift + residual).  With stats, returns
    (psum, pm2, tile): the per-tile partial sums norm.bn_stats merges into batch statistics.  With pool,
    returns sums[N, T, C]: each sample's T tiles' per-channel sums of out (gate.se_gate's input)."""
    assert not (stats and pool), "a tile's pool sums are a sample's; its statistics' tiles span samples"
    N, C, H, W = x.shape
    Ho, Wo = out.shape[2], out.shape[3]
    M = N * Ho * Wo
    bm, bc = _tiles(rt, x, Ho * Wo if pool else M, C)
    r = residual if residual is not None else out
    grid = (N * triton.cdiv(Ho * Wo, bm) if pool else triton.cdiv(M, bm), triton.cdiv(C, bc))
    psum = pm2 = out
    if stats:
        psum, pm2 = (torch.empty((grid[0], C), device=x.device, dtype=reduce_dtype(rt, x)) for _ in range(2))
    if pool:
        psum = torch.empty((N, grid[0] // N, C), device=x.device, dtype=reduce_dtype(rt, x))
    rt.launch(kernel, grid, x, weight,
              scale if scale is not None else out, shift if shift is not None else out, r, out, psum, pm2,
              N, C, H, W, Ho, Wo, float(slope), *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
              *r.stride(), *out.stride(), HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
              HAS_RES=residual is not None, ACT=ACT_CODES[act], STATS=stats, POOL=pool, ACC=rt.acc(x),
              IDX64=rt.needs_int64(x, out, r), BLOCK_M=bm, BLOCK_C=bc)
    return (psum, pm2, bm) if stats else psum if pool else None


def depthwise2d_dgrad(rt, kernel, dy, weight, dx):
    """dx[N, C, H, W]: the input gradient of a depthwise conv, from dy[N, C, Ho, Wo]."""
    N, C, H, W = dx.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    bm, bc = _tiles(rt, dy, N * H * W, C)
    rt.launch(kernel, (triton.cdiv(N * H * W, bm), triton.cdiv(C, bc)), dy, weight, dx, N, C, H, W, Ho, Wo,
              *dy.stride(), weight.stride(0), weight.stride(2), weight.stride(3), *dx.stride(), ACC=rt.acc(dy),
              IDX64=rt.needs_int64(dy, dx), BLOCK_M=bm, BLOCK_C=bc)


def depthwise2d_wgrad(rt, kernel, sum_kernel, x, dy, dweight, dbias=None):
    """dweight[C, 1, KH, KW] (and dbias[C]) of a depthwise conv: per-program partials, then their sum."""
    N, C, H, W = x.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    taps = dweight.shape[2] * dweight.shape[3]
    bm, bc = _tiles(rt, dy, N * Ho * Wo, C)
    grid = (triton.cdiv(N * Ho * Wo, bm), triton.cdiv(C, bc))
    part = torch.empty((grid[0], C * (taps + 1)), device=x.device, dtype=reduce_dtype(rt, x))
    rt.launch(kernel, grid, x, dy, part, N, C, H, W, Ho, Wo, *x.stride(), *dy.stride(), ACC=rt.acc(dy),
              IDX64=rt.needs_int64(x, dy), BLOCK_M=bm, BLOCK_C=bc)
    J = C * (taps + 1)
    bj = 64 if rt.gpu_tiles(x) else min(4096, triton.next_power_of_2(J))
    bt = 16 if rt.gpu_tiles(x) else min(256, triton.next_power_of_2(grid[0]))
    rt.launch(sum_kernel, (triton.cdiv(J, bj),), part, dweight, dbias if dbias is not None else dweight,
              grid[0], C, taps, HAS_BIAS=dbias is not None, ACC=rt.acc(part), BLOCK_T=bt, BLOCK_J=bj)

