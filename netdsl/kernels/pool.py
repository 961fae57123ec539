"""Pooling and resampling: max/avg pooling (padding, dilation, ceil_mode,
count_include_pad as torch), adaptive average pooling, nearest and bilinear
upsampling.  Tiles are (output pixels × channels)."""
import triton

POOL2D = r'''
@triton.jit
def $NAME(
    # pointers
    x_ptr, y_ptr,
    # sizes
    N, C, H, W, Ho, Wo,
    # strides
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    # meta-parameters
    IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
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
    if IS_MAX:
        acc = tl.full((BLOCK_M, BLOCK_C), float("-inf"), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for kh in range(KH):
        ih = h0 + kh * DH
        for kw in range(KW):
            iw = w0 + kw * DW
            ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            mask = ok[:, None] & c_mask[None, :]
            v = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc,
                        mask=mask, other=float("-inf") if IS_MAX else 0.0).to(tl.float32)
            if IS_MAX:
                acc = tl.maximum(acc, v)
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
        acc = acc / tl.maximum(count, 1).to(tl.float32)[:, None]
    y_off = (n * syn + oh * syh + ow * syw)[:, None] + offs_c[None, :] * syc
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & c_mask[None, :])
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
    MAX_KH: tl.constexpr, MAX_KW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
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
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for kh in range(MAX_KH):
        ih = hs + kh
        for kw in range(MAX_KW):
            iw = ws + kw
            ok = m_mask & (ih < he) & (iw < we)
            acc += tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc,
                           mask=ok[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    acc = acc / ((he - hs) * (we - ws)).to(tl.float32)[:, None]
    y_off = (n * syn + oh * syh + ow * syw)[:, None] + offs_c[None, :] * syc
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & c_mask[None, :])
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
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
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
            sh = oh.to(tl.float32) * rh
            sw = ow.to(tl.float32) * rw
        else:
            sh = tl.maximum((oh.to(tl.float32) + 0.5) * rh - 0.5, 0.0)
            sw = tl.maximum((ow.to(tl.float32) + 0.5) * rw - 0.5, 0.0)
        h0 = sh.to(tl.int32)
        w0 = sw.to(tl.int32)
        h1 = tl.minimum(h0 + 1, H - 1)
        w1 = tl.minimum(w0 + 1, W - 1)
        lh = (sh - h0.to(tl.float32))[:, None]
        lw = (sw - w0.to(tl.float32))[:, None]
        v00 = tl.load(x_ptr + (base + h0 * sxh + w0 * sxw)[:, None] + cols, mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(x_ptr + (base + h0 * sxh + w1 * sxw)[:, None] + cols, mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(x_ptr + (base + h1 * sxh + w0 * sxw)[:, None] + cols, mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(x_ptr + (base + h1 * sxh + w1 * sxw)[:, None] + cols, mask=mask, other=0.0).to(tl.float32)
        y = (1.0 - lh) * ((1.0 - lw) * v00 + lw * v01) + lh * ((1.0 - lw) * v10 + lw * v11)
    else:
        ih = tl.minimum((oh.to(tl.float32) * rh).to(tl.int32), H - 1)
        iw = tl.minimum((ow.to(tl.float32) * rw).to(tl.int32), W - 1)
        y = tl.load(x_ptr + (base + ih * sxh + iw * sxw)[:, None] + cols, mask=mask, other=0.0)
    y_off = (n * syn + oh * syh + ow * syw)[:, None] + offs_c[None, :] * syc
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)
'''


def _tiles(M, C, on_gpu):
    # the interpreter runs each program in Python: few, large tiles are fastest there
    if on_gpu:  # 32×32: the pointer and mask tiles of 64×64 spilled registers (Triton 3.9, sm_80/sm_90)
        return 32, max(16, min(32, triton.next_power_of_2(C)))
    return max(16, min(4096, triton.next_power_of_2(M))), max(16, min(512, triton.next_power_of_2(C)))


def pool2d(rt, kernel, x, out):
    N, C, H, W = x.shape
    Ho, Wo = out.shape[2], out.shape[3]
    bm, bc = _tiles(N * Ho * Wo, C, rt.gpu_tiles(x))
    rt.launch(kernel, (triton.cdiv(N * Ho * Wo, bm), triton.cdiv(C, bc)), x, out, N, C, H, W, Ho, Wo,
              *x.stride(), *out.stride(), IDX64=rt.needs_int64(x, out), BLOCK_M=bm, BLOCK_C=bc)


def adaptive_avgpool2d(rt, kernel, x, out):
    N, C, H, W = x.shape
    Ho, Wo = out.shape[2], out.shape[3]
    bm, bc = _tiles(N * Ho * Wo, C, rt.gpu_tiles(x))
    max_kh = max(((o + 1) * H + Ho - 1) // Ho - (o * H) // Ho for o in range(Ho))
    max_kw = max(((o + 1) * W + Wo - 1) // Wo - (o * W) // Wo for o in range(Wo))
    rt.launch(kernel, (triton.cdiv(N * Ho * Wo, bm), triton.cdiv(C, bc)), x, out, N, C, H, W, Ho, Wo,
              *x.stride(), *out.stride(), MAX_KH=max_kh, MAX_KW=max_kw, BLOCK_M=bm, BLOCK_C=bc)


def upsample2d(rt, kernel, x, out, scale, align_corners):
    N, C, H, W = x.shape
    Ho, Wo = out.shape[2], out.shape[3]
    if align_corners:
        rh = (H - 1) / (Ho - 1) if Ho > 1 else 0.0
        rw = (W - 1) / (Wo - 1) if Wo > 1 else 0.0
    else:
        rh = rw = 1.0 / scale
    bm, bc = _tiles(N * Ho * Wo, C, rt.gpu_tiles(x))
    rt.launch(kernel, (triton.cdiv(N * Ho * Wo, bm), triton.cdiv(C, bc)), x, out, N, C, H, W, Ho, Wo,
              float(rh), float(rw), *x.stride(), *out.stride(), BLOCK_M=bm, BLOCK_C=bc)
