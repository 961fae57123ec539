"""Batch norm (statistics, folding, running-stat updates, apply with fused
residual and activation), local response norm and softmax.

Training-mode batch norm is two launches after its producer: `bn_stats`
(per-channel mean and variance, two passes for accuracy, then scale/shift and
the running-stat update exactly as torch does it: unbiased variance, momentum,
num_batches_tracked += 1), and `channel_affine`, which applies
y = act((x − mean)·scale + shift + residual).  In eval mode `bn_fold` turns the
running statistics into scale/shift once (cached until a parameter or buffer
changes), and they go into the producing conv's epilogue when there is one.
"""
import triton

from . import ACT_CODES

# Tensors are seen as [N, C, H, W] (a [N, F] tensor as [N, F, 1, 1]).  Tiles are
# (pixels × channels), so channels_last memory is read along its fast axis.
BN_STATS = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, nbt_ptr, mean_ptr, scale_ptr, shift_ptr,
    # sizes
    N, C, H, W, eps, momentum,
    # strides
    sxn, sxc, sxh, sxw,
    # meta-parameters
    AFFINE: tl.constexpr, TRACK: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # ACC: the accumulation type; fp64 where torch's own kernels use double (CPU)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    M = N * H * W
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & c_mask[None, :]
        row = (offs_m // (H * W)) * sxn + ((offs_m // W) % H) * sxh + (offs_m % W) * sxw
        acc += tl.load(x_ptr + row[:, None] + offs_c[None, :] * sxc, mask=mask, other=0.0).to(ACC)
    mean = tl.sum(acc, axis=0) / M
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & c_mask[None, :]
        row = (offs_m // (H * W)) * sxn + ((offs_m // W) % H) * sxh + (offs_m % W) * sxw
        v = tl.load(x_ptr + row[:, None] + offs_c[None, :] * sxc, mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, v - mean[None, :], 0.0)
        acc += d * d
    var = (tl.sum(acc, axis=0) / M).to(tl.float32)
    mean = mean.to(tl.float32)
    # the apply kernel computes (x − mean)·scale + shift
    scale = 1.0 / tl.sqrt(var + eps)
    shift = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if AFFINE:
        scale = scale * tl.load(weight_ptr + offs_c, mask=c_mask, other=1.0).to(tl.float32)
        shift = tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(mean_ptr + offs_c, mean, mask=c_mask)
    tl.store(scale_ptr + offs_c, scale, mask=c_mask)
    tl.store(shift_ptr + offs_c, shift, mask=c_mask)
    if TRACK:  # running statistics exactly as torch: unbiased variance, momentum, batches tracked
        rm = tl.load(rmean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        rv = tl.load(rvar_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        new_rm = (1.0 - momentum) * rm + momentum * mean
        new_rv = (1.0 - momentum) * rv + momentum * (var * M / (M - 1.0))
        tl.store(rmean_ptr + offs_c, new_rm.to(rmean_ptr.dtype.element_ty), mask=c_mask)
        tl.store(rvar_ptr + offs_c, new_rv.to(rvar_ptr.dtype.element_ty), mask=c_mask)
        if tl.program_id(0) == 0:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
'''

BN_FOLD = r'''
@triton.jit
def $NAME(
    # pointers
    weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, conv_bias_ptr, scale_ptr, shift_ptr,
    # sizes
    C, eps,
    # meta-parameters
    AFFINE: tl.constexpr, CONV_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # eval mode: y = x·scale + shift from the running statistics, ready to fold
    # into a conv epilogue (with the conv's bias: scale·(conv + b − mean) + beta)
    offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs < C
    mean = tl.load(rmean_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    var = tl.load(rvar_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    scale = 1.0 / tl.sqrt(var + eps)
    if AFFINE:
        scale = scale * tl.load(weight_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    shift = -mean * scale
    if AFFINE:
        shift = shift + tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CONV_BIAS:
        shift = shift + scale * tl.load(conv_bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(scale_ptr + offs, scale, mask=mask)
    tl.store(shift_ptr + offs, shift, mask=mask)
'''

CHANNEL_AFFINE = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, center_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr,
    # sizes
    N, C, H, W, slope,
    # strides
    sxn, sxc, sxh, sxw, srn, src, srh, srw, syn, syc, syh, syw,
    # meta-parameters
    HAS_CENTER: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
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
    y = x.to(tl.float32)
    if HAS_CENTER:
        y = y - tl.load(center_ptr + offs_c, mask=c_mask, other=0.0)[None, :]
    y = y * tl.load(scale_ptr + offs_c, mask=c_mask, other=0.0)[None, :]
    y = y + tl.load(shift_ptr + offs_c, mask=c_mask, other=0.0)[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + (n * srn + h * srh + w * srw)[:, None] + offs_c[None, :] * src, mask=mask, other=0.0)
        y = y + r.to(tl.float32)
    y = activation(y, ACT, slope)
    tl.store(y_ptr + (n * syn + h * syh + w * syw)[:, None] + offs_c[None, :] * syc, y.to(y_ptr.dtype.element_ty), mask=mask)
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
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    SIZE = $SIZE
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = offs_m < N * H * W
    mask = m_mask[:, None] & (offs_c < C)[None, :]
    row = (offs_m // (H * W)) * sxn + ((offs_m // W) % H) * sxh + (offs_m % W) * sxw
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for j in range(SIZE):
        cj = offs_c + j - SIZE // 2
        ok = m_mask[:, None] & ((cj >= 0) & (cj < C))[None, :]
        v = tl.load(x_ptr + row[:, None] + cj[None, :] * sxc, mask=ok, other=0.0).to(tl.float32)
        acc += v * v
    x = tl.load(x_ptr + row[:, None] + offs_c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
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
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    m_mask = offs_m < N * H * W
    mask = m_mask[:, None] & (offs_c < C)[None, :]
    row = (offs_m // (H * W)) * sxn + ((offs_m // W) % H) * sxh + (offs_m % W) * sxw
    x = tl.load(x_ptr + row[:, None] + offs_c[None, :] * sxc, mask=mask, other=float("-inf")).to(tl.float32)
    x = tl.where(m_mask[:, None], x, 0.0)  # rows past the end: keep them finite
    x = x - tl.max(x, axis=1)[:, None]
    e = tl.where(mask, tl.exp(x), 0.0)
    y = e / tl.maximum(tl.sum(e, axis=1), 1e-30)[:, None]  # >= 1 on real rows
    yrow = (offs_m // (H * W)) * syn + ((offs_m // W) % H) * syh + (offs_m % W) * syw
    tl.store(y_ptr + yrow[:, None] + offs_c[None, :] * syc, y.to(y_ptr.dtype.element_ty), mask=mask)
'''


def _tiles(M, C, on_gpu):
    # the interpreter runs each program in Python: few, large tiles are fastest there
    if on_gpu:
        return 64, max(16, min(64, triton.next_power_of_2(C)))
    return max(16, min(4096, triton.next_power_of_2(M))), max(16, min(512, triton.next_power_of_2(C)))


def bn_stats(rt, kernel, bn, x4, mean, scale, shift):
    """Training: batch mean, scale and shift of `bn` over x4, and its running-stat update."""
    import triton.language as tl

    N, C, H, W = x4.shape
    bm, bc = _tiles(N * H * W, C, rt.gpu_tiles(x4))
    if rt.gpu_tiles(x4):
        bc = 16
    acc = tl.float32 if rt.gpu_tiles(x4) else tl.float64  # as torch: float on CUDA, double on CPU
    track = bn.running_mean is not None
    rt.launch(kernel, (triton.cdiv(C, bc),), x4,
              bn.weight if bn.affine else mean, bn.bias if bn.affine else mean,
              bn.running_mean if track else mean, bn.running_var if track else mean,
              bn.num_batches_tracked if track else mean, mean, scale, shift,
              N, C, H, W, float(bn.eps), float(bn.momentum if bn.momentum is not None else 0.0), *x4.stride(),
              AFFINE=bn.affine, TRACK=track and bn.training, ACC=acc, BLOCK_M=bm, BLOCK_C=bc)


def bn_fold(rt, kernel, bn, scale, shift, conv_bias=None):
    """Eval: scale/shift from the running statistics."""
    C = scale.shape[0]
    bc = max(16, min(1024, triton.next_power_of_2(C)))
    rt.launch(kernel, (triton.cdiv(C, bc),), bn.weight if bn.affine else scale, bn.bias if bn.affine else scale,
              bn.running_mean, bn.running_var, conv_bias if conv_bias is not None else scale, scale, shift,
              C, float(bn.eps), AFFINE=bn.affine, CONV_BIAS=conv_bias is not None, BLOCK_C=bc)


def channel_affine(rt, kernel, x4, scale, shift, out4, residual4=None, act=None, slope=0.01, center=None):
    N, C, H, W = x4.shape
    bm, bc = _tiles(N * H * W, C, rt.gpu_tiles(x4))
    r = residual4 if residual4 is not None else out4
    rt.launch(kernel, (triton.cdiv(N * H * W, bm), triton.cdiv(C, bc)),
              x4, center if center is not None else scale, scale, shift, r, out4, N, C, H, W, float(slope),
              *x4.stride(), *r.stride(), *out4.stride(), HAS_CENTER=center is not None, HAS_RES=residual4 is not None, ACT=ACT_CODES[act], IDX64=rt.needs_int64(x4, out4, r),
              BLOCK_M=bm, BLOCK_C=bc)


def lrn(rt, kernel, x4, out4, alpha, beta, k):
    N, C, H, W = x4.shape
    bm, bc = _tiles(N * H * W, C, rt.gpu_tiles(x4))
    rt.launch(kernel, (triton.cdiv(N * H * W, bm), triton.cdiv(C, bc)), x4, out4, N, C, H, W,
              float(alpha), float(beta), float(k), *x4.stride(), *out4.stride(), BLOCK_M=bm, BLOCK_C=bc)


def softmax(rt, kernel, x4, out4):
    N, C, H, W = x4.shape
    bc = max(16, triton.next_power_of_2(C))
    bm = 16 if rt.gpu_tiles(x4) else max(16, min(256, triton.next_power_of_2(N * H * W)))
    rt.launch(kernel, (triton.cdiv(N * H * W, bm),), x4, out4, N, C, H, W, *x4.stride(), *out4.stride(),
              BLOCK_M=bm, BLOCK_C=bc)
