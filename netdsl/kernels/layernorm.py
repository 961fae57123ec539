"""Layer norm over the channels of each pixel (ConvNeXt's LayerNorm2d, and
LayerNorm on a flat [N, C] input): y = (x − mean)·rstd·γ + β, with the
biased variance, as torch's layer_norm.

A program normalises BLOCK_M pixels with all their channels in one tile (a
channels-last activation is contiguous along them).  The training forward
keeps each pixel's mean and rstd; the backward recomputes x̂ from them:
dx = rstd·(g − mean_c(g) − x̂·mean_c(g·x̂)) with g = dy·γ, and writes each
program's column sums of dy·x̂ and dy, which LAYERNORM_PARAM_GRAD adds up
into dγ and dβ (no atomics: the same sums in the same order every run)."""
import triton

LAYERNORM = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, weight_ptr, bias_ptr, y_ptr, mean_ptr, rstd_ptr,
    # sizes
    N, C, H, W, eps,
    # strides
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    # meta-parameters
    AFFINE: tl.constexpr, SAVE: tl.constexpr, ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    if IDX64:  # past 2^31 elements
        offs_m = offs_m.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    m_mask = offs_m < N * H * W
    c_mask = offs_c < C
    mask = m_mask[:, None] & c_mask[None, :]
    n, h, w = offs_m // (H * W), (offs_m // W) % H, offs_m % W
    x = tl.load(x_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + offs_c[None, :] * sxc, mask=mask, other=0.0).to(ACC)
    mean = tl.sum(x, axis=1) / C
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    y = d * rstd[:, None]
    if AFFINE:
        gamma = tl.load(weight_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)
        beta = tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)
        y = y * gamma[None, :] + beta[None, :]
    tl.store(y_ptr + (n * syn + h * syh + w * syw)[:, None] + offs_c[None, :] * syc, y.to(y_ptr.dtype.element_ty),
             mask=mask)
    if SAVE:  # for the backward
        tl.store(mean_ptr + offs_m, mean, mask=m_mask)
        tl.store(rstd_ptr + offs_m, rstd, mask=m_mask)
'''

LAYERNORM_BACKWARD = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, dy_ptr, weight_ptr, mean_ptr, rstd_ptr, dx_ptr, pw_ptr, pb_ptr,
    # sizes
    N, C, H, W,
    # strides
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, son, soc, soh, sow,
    # meta-parameters
    AFFINE: tl.constexpr, ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # pw, pb: [programs, C] column sums of dy·x̂ and dy over this program's pixels
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    if IDX64:  # past 2^31 elements
        offs_m = offs_m.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    m_mask = offs_m < N * H * W
    c_mask = offs_c < C
    mask = m_mask[:, None] & c_mask[None, :]
    n, h, w = offs_m // (H * W), (offs_m // W) % H, offs_m % W
    x = tl.load(x_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + offs_c[None, :] * sxc, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + (n * sdn + h * sdh + w * sdw)[:, None] + offs_c[None, :] * sdc, mask=mask,
                 other=0.0).to(ACC)
    mean = tl.load(mean_ptr + offs_m, mask=m_mask, other=0.0).to(ACC)
    rstd = tl.load(rstd_ptr + offs_m, mask=m_mask, other=0.0).to(ACC)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if AFFINE:
        g = dy * tl.load(weight_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)[None, :]
    sg = tl.sum(g, axis=1) / C
    sgx = tl.sum(g * xhat, axis=1) / C
    dx = rstd[:, None] * (g - sg[:, None] - xhat * sgx[:, None])
    tl.store(dx_ptr + (n * son + h * soh + w * sow)[:, None] + offs_c[None, :] * soc, dx.to(dx_ptr.dtype.element_ty),
             mask=mask)
    if AFFINE:
        tl.store(pw_ptr + pid * C + offs_c, tl.sum(dy * xhat, axis=0), mask=c_mask)
        tl.store(pb_ptr + pid * C + offs_c, tl.sum(dy, axis=0), mask=c_mask)
'''

LAYERNORM_PARAM_GRAD = r'''
@triton.jit
def $NAME(
    # pointers
    pw_ptr, pb_ptr, dweight_ptr, dbias_ptr,
    # sizes
    T, C,
    # meta-parameters
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # dγ and dβ: the sums of the backward's T rows of per-program partials
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    sw, sb = channel_sums(pw_ptr, pb_ptr, c, c_mask, C, 0, T, 1, ACC, BLOCK_T, BLOCK_C)
    tl.store(dweight_ptr + c, sw.to(dweight_ptr.dtype.element_ty), mask=c_mask)
    tl.store(dbias_ptr + c, sb.to(dbias_ptr.dtype.element_ty), mask=c_mask)
'''

# channels beyond this do not fit one tile
MAX_CHANNELS = 1 << 14


def _tiles(rt, x4):
    N, C, H, W = x4.shape
    bc = max(2, triton.next_power_of_2(C))
    if bc > MAX_CHANNELS:
        raise ValueError(f"layer norm over {C} channels: at most {MAX_CHANNELS} fit the kernel's tile")
    # a GPU program holds about 4096 values; the interpreter runs each program in Python, so few large ones
    budget = 4096 if rt.gpu_tiles(x4) else 1 << 16
    return max(1, min(budget // bc, triton.next_power_of_2(N * H * W))), bc


def layernorm(rt, kernel, x4, weight, bias, out4, eps, mean=None, rstd=None):
    """out4 = layer_norm(x4) over its channels; mean and rstd ([N·H·W] fp32), where given, keep the statistics."""
    N, C, H, W = x4.shape
    bm, bc = _tiles(rt, x4)
    save = mean is not None
    w = weight if weight is not None else x4
    rt.launch(kernel, (triton.cdiv(N * H * W, bm),), x4, w, bias if bias is not None else w, out4,
              mean if save else x4, rstd if save else x4, N, C, H, W, float(eps), *x4.stride(), *out4.stride(),
              AFFINE=weight is not None, SAVE=save, ACC=rt.acc(x4), IDX64=rt.needs_int64(x4, out4),
              BLOCK_M=bm, BLOCK_C=bc)


def layernorm_backward(rt, backward, param_grad, x4, dy4, weight, mean, rstd, dx4, dweight=None, dbias=None):
    """dx4 and, for an affine norm, dweight and dbias (written, not added to)."""
    N, C, H, W = x4.shape
    bm, bc = _tiles(rt, x4)
    grid = triton.cdiv(N * H * W, bm)
    affine = weight is not None
    acc = rt.acc(x4)
    import torch

    partial = torch.float64 if x4.dtype == torch.float64 else torch.float32
    pw = torch.empty((grid, C) if affine else (1,), device=x4.device, dtype=partial)
    pb = torch.empty_like(pw)
    rt.launch(backward, (grid,), x4, dy4, weight if affine else x4, mean, rstd, dx4, pw, pb, N, C, H, W,
              *x4.stride(), *dy4.stride(), *dx4.stride(), AFFINE=affine, ACC=acc, IDX64=rt.needs_int64(x4, dy4, dx4),
              BLOCK_M=bm, BLOCK_C=bc)
    if affine:
        block_c = 64 if rt.gpu_tiles(x4) else max(2, min(512, triton.next_power_of_2(C)))
        block_t = 64 if rt.gpu_tiles(x4) else max(2, min((1 << 16) // block_c, triton.next_power_of_2(grid)))
        rt.launch(param_grad, (triton.cdiv(C, block_c),), pw, pb, dweight, dbias, grid, C, ACC=acc,
                  BLOCK_T=block_t, BLOCK_C=block_c)
