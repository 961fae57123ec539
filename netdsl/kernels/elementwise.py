"""Elementwise kernels over [N, C, H, W] tensors addressed by strides:
activations, add (an unfused residual), dropout with in-kernel random
numbers, a strided copy (a concat input, or a layout change), and the
activation's backward (dy · act'(y), from the saved output y).  Dropout's
backward is dropout of dy with the same seed and offset: the same mask."""
import triton

from . import ACT_CODES

ELEMENTWISE = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, other_ptr, y_ptr,
    # sizes
    N, C, H, W, slope, p, seed, offset,
    # strides
    sxn, sxc, sxh, sxw, son, soc, soh, sow, syn, syc, syh, syw,
    # meta-parameters
    ACC: tl.constexpr, OP: tl.constexpr, ACT: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    # OP: 0 = act(x), 1 = act(x + other), 2 = dropout(x), 3 = copy, 4 = x · act'(other)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if IDX64:
        offs = offs.to(tl.int64)
    mask = offs < N * C * H * W
    w = offs % W
    h = (offs // W) % H
    c = (offs // (W * H)) % C
    n = offs // (W * H * C)
    x = tl.load(x_ptr + n * sxn + c * sxc + h * sxh + w * sxw, mask=mask, other=0.0)
    if OP == 3:
        y = x
    else:
        y = x.to(ACC)
        if OP == 1:
            y = y + tl.load(other_ptr + n * son + c * soc + h * soh + w * sow, mask=mask, other=0.0).to(ACC)
        if OP == 2:
            keep = tl.rand(seed, offs + offset) >= p
            y = tl.where(keep, y / (1.0 - p), 0.0)
        if OP == 4:
            out = tl.load(other_ptr + n * son + c * soc + h * soh + w * sow, mask=mask, other=0.0).to(ACC)
            y = activation_grad(y, out, ACT, slope)
        else:
            y = activation(y, ACT, slope)
    tl.store(y_ptr + n * syn + c * syc + h * syh + w * syw, y.to(y_ptr.dtype.element_ty), mask=mask)
'''


def elementwise(rt, kernel, op, x4, out4, other4=None, act=None, slope=0.01, p=0.0, seed=0, offset=0):
    N, C, H, W = x4.shape
    total = N * C * H * W
    block = 1024 if rt.gpu_tiles(x4) else max(16, min(1 << 16, triton.next_power_of_2(total)))
    o = other4 if other4 is not None else x4
    rt.launch(kernel, (triton.cdiv(total, block),), x4, o, out4, N, C, H, W, float(slope), float(p),
              int(seed), int(offset), *x4.stride(), *o.stride(), *out4.stride(),
              OP=op, ACT=ACT_CODES[act], IDX64=rt.needs_int64(x4, out4, o), ACC=rt.acc(x4), BLOCK=block)
