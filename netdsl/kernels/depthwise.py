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
pass); the training forward keeps the implicit GEMM, whose epilogue also
leaves the batch-norm partial sums its backward fusions build on."""
import torch
import triton

from . import ACT_CODES
from .norm import reduce_dtype

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
    ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    $GEOMETRY
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if IDX64:  # past 2^31 elements
        offs_m = offs_m.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    m_mask = offs_m < N * Ho * Wo
    c_mask = offs_c < C
    ow = offs_m % Wo
    oh = (offs_m // Wo) % Ho
    n = offs_m // (Wo * Ho)
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
'''


def is_depthwise(attrs) -> bool:
    """A conv the direct kernel runs: one input channel per output channel."""
    return attrs["groups"] > 1 and attrs["groups"] == attrs["in_channels"] == attrs["out_channels"]


def depthwise2d(rt, kernel, x, weight, out, scale=None, shift=None, residual=None, act=None, slope=0.01,
                stats=False):
    """out[N, C, Ho, Wo] = act(depthwise_conv(x, weight) · scale + shift + residual).  With stats, returns
    (psum, pm2, tile): the per-tile partial sums norm.bn_stats merges into batch statistics."""
    N, C, H, W = x.shape
    Ho, Wo = out.shape[2], out.shape[3]
    M = N * Ho * Wo
    if rt.gpu_tiles(x):
        bm, bc = 32, max(16, min(64, triton.next_power_of_2(C)))
    else:  # the interpreter runs each program in Python: few, large tiles
        bc = min(512, triton.next_power_of_2(C))
        bm = max(2, min((1 << 16) // bc, triton.next_power_of_2(M)))
    r = residual if residual is not None else out
    grid = (triton.cdiv(M, bm), triton.cdiv(C, bc))
    psum = pm2 = out
    if stats:
        psum, pm2 = (torch.empty((grid[0], C), device=x.device, dtype=reduce_dtype(rt, x)) for _ in range(2))
    rt.launch(kernel, grid, x, weight,
              scale if scale is not None else out, shift if shift is not None else out, r, out, psum, pm2,
              N, C, H, W, Ho, Wo, float(slope), *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
              *r.stride(), *out.stride(), HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
              HAS_RES=residual is not None, ACT=ACT_CODES[act], STATS=stats, ACC=rt.acc(x),
              IDX64=rt.needs_int64(x, out, r), BLOCK_M=bm, BLOCK_C=bc)
    return (psum, pm2, bm) if stats else None
