"""Elementwise kernels over [N, C, H, W] tensors addressed by strides:
activations, add (an unfused residual), dropout with in-kernel random
numbers, a strided copy (a concat input, or a layout change), a channel
shuffle, a channel range placed among zeros (its gradient), and the
activation's backward (dy · act'(y), from the saved output y, or from the
saved input for the activations in FROM_INPUT), and a product with
broadcasting (`mul`: a size-1 dimension is read with stride 0).  MUL_GRAD is
the gradient of one factor of a broadcast product: dy times the other factor,
summed over the dimensions in which the factor was broadcast.  Dropout and
stochastic depth (which drops whole samples, or the whole batch) draw their
masks in the kernel; their backward applies the same op to dy with the same
seed and offset: the same mask."""
import triton

from . import ACT_CODES

ELEMENTWISE = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, other_ptr, y_ptr,
    # sizes
    N, C, H, W, slope, lo, hi, p, seed, offset, k0, k1,
    # strides
    sxn, sxc, sxh, sxw, son, soc, soh, sow, syn, syc, syh, syw,
    # meta-parameters
    ACC: tl.constexpr, OP: tl.constexpr, ACT: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    # OP: 0 = act(x), 1 = act(x + other), 2 = dropout(x), 3 = copy, 4 = x · act'(y = other),
    # 5 = x · act'(input = other), 6 = x · other, 7 = stochastic depth by sample (one draw a row),
    # 8 = stochastic depth of the whole batch (one draw), 9 = channel shuffle in k0 groups (y's channel
    # j·k0 + i is x's i·C/k0 + j), 10 = x holds y's channels [k0, k1), the others are 0 (a channel range's
    # gradient); hardtanh (ACT 11) clamps to [lo, hi]
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if IDX64:
        offs = offs.to(tl.int64)
    mask = offs < N * C * H * W
    w = offs % W
    h = (offs // W) % H
    c = (offs // (W * H)) % C
    n = offs // (W * H * C)
    cx = c
    x_mask = mask
    if OP == 9:
        cx = (c % k0) * (C // k0) + c // k0
    if OP == 10:
        cx = c - k0
        x_mask = mask & (c >= k0) & (c < k1)
    x = tl.load(x_ptr + n * sxn + cx * sxc + h * sxh + w * sxw, mask=x_mask, other=0.0)
    if OP == 3 or OP == 9 or OP == 10:
        y = x
    else:
        y = x.to(ACC)
        if OP == 1:
            y = y + tl.load(other_ptr + n * son + c * soc + h * soh + w * sow, mask=mask, other=0.0).to(ACC)
        if OP == 2:
            keep = tl.rand(seed, offs + offset) >= p
            y = tl.where(keep, y / (1.0 - p), 0.0)
        if OP == 7 or OP == 8:
            draw = n + offset if OP == 7 else n * 0 + offset
            keep = tl.rand(seed, draw) >= p
            y = tl.where(keep, y / (1.0 - p), 0.0)
        if OP == 4 or OP == 5 or OP == 6:
            other = tl.load(other_ptr + n * son + c * soc + h * soh + w * sow, mask=mask, other=0.0).to(ACC)
            if OP == 4:
                y = activation_grad(y, other, ACT, slope)
            elif OP == 5:
                y = activation_grad_input(y, other, ACT, lo, hi)
            else:
                y = y * other
        elif ACT == 11:
            y = tl.minimum(tl.maximum(y, lo), hi)
        else:
            y = activation(y, ACT, slope)
    tl.store(y_ptr + n * syn + c * syc + h * syh + w * syw, y.to(y_ptr.dtype.element_ty), mask=mask)
'''

MUL_GRAD = r'''
@triton.jit
def $NAME(
    # pointers
    dy_ptr, other_ptr, dx_ptr,
    # sizes
    N, C, H, W, RN, RC, RH, RW,
    # strides
    sdn, sdc, sdh, sdw, son, soc, soh, sow, sxn, sxc, sxh, sxw,
    # meta-parameters
    ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # dx is N×C×H×W; RN, RC, RH, RW are the product's extents along the
    # dimensions where dx has size 1 (1 elsewhere), so the product's element
    # for (n, c, h, w) and reduced index (rn, rc, rh, rw) is (n + rn, c + rc, h + rh, w + rw).
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    if IDX64:
        offs_o = offs_o.to(tl.int64)
    o_mask = offs_o < N * C * H * W
    w = offs_o % W
    h = (offs_o // W) % H
    c = (offs_o // (W * H)) % C
    n = offs_o // (W * H * C)
    R = RN * RC * RH * RW
    acc = tl.zeros((BLOCK_O,), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask = o_mask[:, None] & (offs_r < R)[None, :]
        rw = offs_r % RW
        rh = (offs_r // RW) % RH
        rc = (offs_r // (RW * RH)) % RC
        nr = n[:, None] + (offs_r // (RW * RH * RC))[None, :]
        cc = c[:, None] + rc[None, :]
        hh = h[:, None] + rh[None, :]
        ww = w[:, None] + rw[None, :]
        g = tl.load(dy_ptr + nr * sdn + cc * sdc + hh * sdh + ww * sdw, mask=mask, other=0.0)
        o = tl.load(other_ptr + nr * son + cc * soc + hh * soh + ww * sow, mask=mask, other=0.0)
        acc += tl.sum(g.to(ACC) * o.to(ACC), axis=1)
    tl.store(dx_ptr + n * sxn + c * sxc + h * sxh + w * sxw, acc.to(dx_ptr.dtype.element_ty), mask=o_mask)
'''


def elementwise(rt, kernel, op, x4, out4, other4=None, act=None, slope=0.01, bounds=(-1.0, 1.0), p=0.0, seed=0,
                offset=0, k0=0, k1=0):
    """Over out4's elements, which are x4's (but for OP 10, where x4 holds out4's channels [k0, k1))."""
    N, C, H, W = out4.shape
    total = N * C * H * W
    block = 1024 if rt.gpu_tiles(x4) else max(16, min(1 << 16, triton.next_power_of_2(total)))
    o = other4 if other4 is not None else x4
    rt.launch(kernel, (triton.cdiv(total, block),), x4, o, out4, N, C, H, W, float(slope), float(bounds[0]),
              float(bounds[1]), float(p), int(seed), int(offset), int(k0), int(k1), *x4.stride(), *o.stride(),
              *out4.stride(),
              OP=op, ACT=ACT_CODES[act], IDX64=rt.needs_int64(x4, out4, o), ACC=rt.acc(x4), BLOCK=block)


def mul_grad(rt, kernel, dy4, other4, dx4):
    """dx4 = Σ dy4 · other4 over the dimensions where dx4 has size 1 (other4
    is expanded to dy4's shape)."""
    N, C, H, W = dx4.shape
    RN, RC, RH, RW = (f if d == 1 else 1 for d, f in zip(dx4.shape, dy4.shape))
    R, outs = RN * RC * RH * RW, N * C * H * W
    if rt.gpu_tiles(dy4):
        block_o, block_r = 16, 64
    else:
        block_r = max(2, min(4096, triton.next_power_of_2(R)))
        block_o = max(2, min((1 << 16) // block_r, triton.next_power_of_2(outs)))
    rt.launch(kernel, (triton.cdiv(outs, block_o),), dy4, other4, dx4, N, C, H, W, RN, RC, RH, RW,
              *dy4.stride(), *other4.stride(), *dx4.stride(), ACC=rt.acc(dy4),
              IDX64=rt.needs_int64(dy4, other4, dx4), BLOCK_O=block_o, BLOCK_R=block_r)
