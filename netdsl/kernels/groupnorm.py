"""Group norm (torch's GroupNorm): the C channels in G groups; each sample's
group is normalised over its C/G channels and all their pixels, with the
biased variance, then scaled and shifted per channel.

One program per (sample, group) walks the group in [channels, pixels]
tiles: the mean, then the variance around it (two passes, as exact as
torch's), then the output.  The training forward keeps each group's mean
and rstd.  The backward recomputes x̂ from them: dx = rstd·(g − mean(g) −
x̂·mean(g·x̂)) over the group, g = dy·γ; it also writes each sample's
per-channel sums of dy·x̂ and dy, which layernorm.py's LAYERNORM_PARAM_GRAD
adds up over the batch into dγ and dβ (no atomics)."""
import triton

GROUPNORM = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, weight_ptr, bias_ptr, y_ptr, mean_ptr, rstd_ptr,
    # sizes
    N, C, H, W, G, eps,
    # strides
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    # meta-parameters
    AFFINE: tl.constexpr, SAVE: tl.constexpr, ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    n, g = pid // G, pid % G
    CG = C // G
    cl = tl.arange(0, BLOCK_C)
    c = g * CG + cl
    if IDX64:  # past 2^31 elements
        n = n.to(tl.int64)
        c = c.to(tl.int64)
    c_mask = cl < CG
    M = CG * H * W
    s = tl.zeros((BLOCK_C,), dtype=ACC)
    for p0 in range(0, H * W, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (p < H * W)[None, :]
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + ((p // W) * sxh + (p % W) * sxw)[None, :], mask=mask,
                    other=0.0).to(ACC)
        s += tl.sum(x, axis=1)
    mean = tl.sum(s, axis=0) / M
    s = tl.zeros((BLOCK_C,), dtype=ACC)
    for p0 in range(0, H * W, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (p < H * W)[None, :]
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + ((p // W) * sxh + (p % W) * sxw)[None, :], mask=mask,
                    other=0.0).to(ACC)
        d = tl.where(mask, x - mean, 0.0)
        s += tl.sum(d * d, axis=1)
    rstd = 1.0 / tl.sqrt(tl.sum(s, axis=0) / M + eps)
    scale = tl.zeros((BLOCK_C,), dtype=ACC) + rstd
    shift = tl.zeros((BLOCK_C,), dtype=ACC) - mean * rstd
    if AFFINE:  # y = x·scale[c] + shift[c]
        gamma = tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(ACC)
        beta = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(ACC)
        scale = scale * gamma
        shift = shift * gamma + beta
    for p0 in range(0, H * W, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (p < H * W)[None, :]
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + ((p // W) * sxh + (p % W) * sxw)[None, :], mask=mask,
                    other=0.0).to(ACC)
        y = x * scale[:, None] + shift[:, None]
        tl.store(y_ptr + n * syn + c[:, None] * syc + ((p // W) * syh + (p % W) * syw)[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=mask)
    if SAVE:  # for the backward
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)
'''

GROUPNORM_BACKWARD = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, dy_ptr, weight_ptr, mean_ptr, rstd_ptr, dx_ptr, pw_ptr, pb_ptr,
    # sizes
    N, C, H, W, G,
    # strides
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, son, soc, soh, sow,
    # meta-parameters
    AFFINE: tl.constexpr, ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # pw, pb: [N, C] sums of dy·x̂ and dy over each sample's pixels
    pid = tl.program_id(0)
    n, g = pid // G, pid % G
    CG = C // G
    cl = tl.arange(0, BLOCK_C)
    c = g * CG + cl
    if IDX64:  # past 2^31 elements
        n = n.to(tl.int64)
        c = c.to(tl.int64)
    c_mask = cl < CG
    M = CG * H * W
    mean = tl.load(mean_ptr + pid).to(ACC)
    rstd = tl.load(rstd_ptr + pid).to(ACC)
    gamma = tl.zeros((BLOCK_C,), dtype=ACC) + 1.0
    if AFFINE:
        gamma = tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(ACC)
    sg = tl.zeros((BLOCK_C,), dtype=ACC)
    sgx = tl.zeros((BLOCK_C,), dtype=ACC)
    sdx = tl.zeros((BLOCK_C,), dtype=ACC)
    sd = tl.zeros((BLOCK_C,), dtype=ACC)
    for p0 in range(0, H * W, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (p < H * W)[None, :]
        ph, pc = p // W, p % W
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + (ph * sxh + pc * sxw)[None, :], mask=mask,
                    other=0.0).to(ACC)
        dy = tl.load(dy_ptr + n * sdn + c[:, None] * sdc + (ph * sdh + pc * sdw)[None, :], mask=mask,
                     other=0.0).to(ACC)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        gg = dy * gamma[:, None]
        sg += tl.sum(gg, axis=1)
        sgx += tl.sum(gg * xhat, axis=1)
        sdx += tl.sum(dy * xhat, axis=1)
        sd += tl.sum(dy, axis=1)
    mg = tl.sum(sg, axis=0) / M
    mgx = tl.sum(sgx, axis=0) / M
    for p0 in range(0, H * W, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (p < H * W)[None, :]
        ph, pc = p // W, p % W
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + (ph * sxh + pc * sxw)[None, :], mask=mask,
                    other=0.0).to(ACC)
        dy = tl.load(dy_ptr + n * sdn + c[:, None] * sdc + (ph * sdh + pc * sdw)[None, :], mask=mask,
                     other=0.0).to(ACC)
        xhat = (x - mean) * rstd
        dx = rstd * (dy * gamma[:, None] - mg - xhat * mgx)
        tl.store(dx_ptr + n * son + c[:, None] * soc + (ph * soh + pc * sow)[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if AFFINE:
        tl.store(pw_ptr + n * C + c, sdx, mask=c_mask)
        tl.store(pb_ptr + n * C + c, sd, mask=c_mask)
'''


def _tiles(rt, x4, groups):
    N, C, H, W = x4.shape
    bc = max(2, triton.next_power_of_2(C // groups))
    # a GPU program holds about 4096 values; the interpreter runs each program in Python, so few large ones
    budget = 4096 if rt.gpu_tiles(x4) else 1 << 16
    return bc, max(2, min(max(1, budget // bc), triton.next_power_of_2(H * W)))


def groupnorm(rt, kernel, x4, weight, bias, out4, groups, eps, mean=None, rstd=None):
    """out4 = group_norm(x4); mean and rstd ([N·G], where given) keep the statistics."""
    N, C, H, W = x4.shape
    bc, bp = _tiles(rt, x4, groups)
    save = mean is not None
    w = weight if weight is not None else x4
    rt.launch(kernel, (N * groups,), x4, w, bias if bias is not None else w, out4, mean if save else x4,
              rstd if save else x4, N, C, H, W, groups, float(eps), *x4.stride(), *out4.stride(),
              AFFINE=weight is not None, SAVE=save, ACC=rt.acc(x4), IDX64=rt.needs_int64(x4, out4),
              BLOCK_C=bc, BLOCK_P=bp)


def groupnorm_backward(rt, backward, param_grad, x4, dy4, weight, mean, rstd, dx4, groups, dweight=None,
                       dbias=None):
    """dx4 and, for an affine norm, dweight and dbias (written, not added to)."""
    import torch

    N, C, H, W = x4.shape
    bc, bp = _tiles(rt, x4, groups)
    affine = weight is not None
    acc = rt.acc(x4)
    partial = torch.float64 if x4.dtype == torch.float64 else torch.float32
    pw = torch.empty((N, C) if affine else (1,), device=x4.device, dtype=partial)
    pb = torch.empty_like(pw)
    rt.launch(backward, (N * groups,), x4, dy4, weight if affine else x4, mean, rstd, dx4, pw, pb, N, C, H, W,
              groups, *x4.stride(), *dy4.stride(), *dx4.stride(), AFFINE=affine, ACC=acc,
              IDX64=rt.needs_int64(x4, dy4, dx4), BLOCK_C=bc, BLOCK_P=bp)
    if affine:
        block_c = 64 if rt.gpu_tiles(x4) else max(2, min(512, triton.next_power_of_2(C)))
        block_t = 64 if rt.gpu_tiles(x4) else max(2, min((1 << 16) // block_c, triton.next_power_of_2(N)))
        rt.launch(param_grad, (triton.cdiv(C, block_c),), pw, pb, dweight, dbias, N, C, ACC=acc,
                  BLOCK_T=block_t, BLOCK_C=block_c)
