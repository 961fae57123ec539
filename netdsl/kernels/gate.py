"""A squeeze-and-excitation gate in one launch: g = act2(W2 · act1(W1 · mean(x) + b1) + b2),
one value per sample and channel, from x's global average pool.

The two convs of a gate are 1×1 convs on a 1×1 image: C → R → C, with R a
few dozen channels.  As launches of the implicit GEMM they would each be one
tiny tile after a pool launch of its own; here one program per sample sums
its pool, runs both matrix-vector products over channel blocks (the weights
are read from L2 by every sample's program) and stores the gate.

The pool's input is a [N, C, P] view of rows to sum and divide by `count`:
the pixels of x itself, or (the plan's `se_gate` pass) the per-tile sums
the depthwise conv that makes x left in its epilogue, a few rows per sample
instead of H·W.  No tl.dot: a matrix-vector product has no 16-wide operand."""
import triton

from . import ACT_CODES

SE_GATE = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, g_ptr,
    # sizes
    C, R, P, inv_count, slope1, slope2,
    # strides
    sxn, sxc, sxp, sw1r, sw1c, sw2c, sw2r, sgn, sgc,
    # meta-parameters
    ACT1: tl.constexpr, ACT2: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACC: tl.constexpr,
    IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    n = tl.program_id(0)
    if IDX64:
        n = n.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    # the squeeze: h = act1(W1 · mean + b1), accumulated over blocks of channels, each block's mean first
    h = tl.zeros((BLOCK_R,), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        s = tl.zeros((BLOCK_C,), dtype=ACC)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            v = tl.load(x_ptr + n * sxn + offs_p[:, None] * sxp + offs_c[None, :] * sxc,
                        mask=(offs_p < P)[:, None] & c_mask[None, :], other=0.0)
            s += tl.sum(v.to(ACC), axis=0)
        w1 = tl.load(w1_ptr + offs_r[:, None] * sw1r + offs_c[None, :] * sw1c, mask=r_mask[:, None] & c_mask[None, :],
                     other=0.0)
        h += tl.sum(w1.to(ACC) * (s * inv_count)[None, :], axis=1)
    if HAS_B1:
        h += tl.load(b1_ptr + offs_r, mask=r_mask, other=0.0).to(ACC)
    h = tl.where(r_mask, activation(h, ACT1, slope1), 0.0)
    # the excitation: g = act2(W2 · h + b2), block by block of channels
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        w2 = tl.load(w2_ptr + offs_c[:, None] * sw2c + offs_r[None, :] * sw2r, mask=c_mask[:, None] & r_mask[None, :],
                     other=0.0)
        g = tl.sum(w2.to(ACC) * h[None, :], axis=1)
        if HAS_B2:
            g += tl.load(b2_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)
        g = activation(g, ACT2, slope2)
        tl.store(g_ptr + n * sgn + offs_c * sgc, g.to(g_ptr.dtype.element_ty), mask=c_mask)
'''

# The widest squeeze (R) one program holds: a [BLOCK_R, BLOCK_C] weight tile stays in registers.
MAX_SQUEEZE = 1024


def se_gate(rt, kernel, src, count, squeeze, excite, out, act1=None, act2=None, slope1=0.01, slope2=0.01):
    """out[N, C, 1, 1] = act2(excite(act1(squeeze(Σ_p src[n, :, p] / count)))).  src: [N, C, P], any
    strides (x's pixels, or per-tile sums); squeeze and excite: the 1×1 convs' (weight, bias) pairs."""
    (w1, b1), (w2, b2) = squeeze, excite
    N, C, P = src.shape
    R = w1.shape[0]
    assert R <= MAX_SQUEEZE and tuple(w1.shape[:2]) == (R, C) and tuple(w2.shape[:2]) == (C, R), \
        "a gate squeezes C channels to R ≤ MAX_SQUEEZE and back"
    br = max(16, triton.next_power_of_2(R))
    on_gpu = rt.gpu_tiles(src)
    bc = max(2, min(128, 2048 // br)) if on_gpu else min(1024, triton.next_power_of_2(C))
    bp = 32 if on_gpu else min(1024, triton.next_power_of_2(P))
    rt.launch(kernel, (N,), src, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, out,
              C, R, P, 1.0 / count, float(slope1), float(slope2),
              *src.stride(), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), out.stride(0), out.stride(1),
              ACT1=ACT_CODES[act1], ACT2=ACT_CODES[act2], HAS_B1=b1 is not None, HAS_B2=b2 is not None,
              ACC=rt.acc(src), IDX64=rt.needs_int64(src, out), BLOCK_P=bp, BLOCK_C=bc, BLOCK_R=br)
