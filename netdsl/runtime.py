"""The small runtime that generated modules import: one function an op
(conv, batch norm, pooling, ...), each launching the generated Triton kernels
through launch.py, or an autograd Function of grad.py where a gradient is
wanted.  Torch is only used here to allocate, view and check shapes; every
arithmetic op of a forward pass is a Triton kernel.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import grad as _grad
from .kernels import depthwise as _dw
from .kernels import elementwise as _ew
from .kernels import gate as _gate
from .kernels import groupnorm as _gn
from .kernels import layernorm as _ln
from .kernels import norm as _norm
from .kernels import pool as _pool
from .launch import (  # noqa: F401  (the generated modules' and the tools' rt.*)
    _COUNTERS, ChannelStats, Kernels, TensorInfo, distinct_bytes, _bn_scale_shift, _is_cl, _rt, acc, as4d, batch_stats_empty,
    channel_range, compile_only, concat_buffer, copy, counters, dry, empty, gpu_tiles, grid_merge,
    in_launch, kernel_log, launch, needs_int64, plan_launches, precision, shuffled_grid, stat_empty, tuned)
from .ops import window_out
from .traced import run as traced_run, tracing as traced  # noqa: F401  (the generated forward's traced path)
from .tuning import register as register_tuned  # noqa: F401  (generated modules' baked-in tables)

# ------------------------------------------------------------------ steps

_dropout_calls = 0  # each dropout launch draws its own stretch of the random stream


class ShapeError(ValueError):
    """An input size that breaks a layer; names the layer and its spec line."""


def one_step(module, x, train: bool = True, backward: bool | None = None, out_grad=torch.empty_like,
             keep_state: bool = False):
    """One step of module on x that leaves no trace: a forward in train or
    eval mode, and with backward (default: train) the backward of
    out_grad(y).  Afterwards the module's mode, its parameters' gradients and
    the dropout stream are as they were; with keep_state its state_dict too
    (where kernels ran, the running statistics moved).  For the callers that
    plan, compile or record a step (aot, parallel_compile, tune)."""
    global _dropout_calls
    was, calls = module.training, _dropout_calls
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    state = {k: v.clone() for k, v in module.state_dict().items()} if keep_state else None
    module.train(train)
    try:
        if train if backward is None else backward:
            with torch.enable_grad():
                for p in params:  # (a backward would add into them)
                    p.grad = None
                outs = [y for y in outputs(module(x)) if y.requires_grad]  # (several, for a network that
                if outs:  # returns a tuple or dict; none where it has nothing to train)
                    torch.autograd.backward(outs, [out_grad(y) for y in outs])
        else:
            with torch.no_grad():
                module(x)
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        _dropout_calls = calls  # the real next step draws what it would have drawn
        if state is not None:
            module.load_state_dict(state)
        module.train(was)


def outputs(y) -> list:
    """A network's output tensors: the tensor, or those of its tuple or dict (`return ...`), in order."""
    if isinstance(y, torch.Tensor):
        return [y]
    return [t for v in (y.values() if isinstance(y, dict) else y) for t in outputs(v)]


# ------------------------------------------------------------------ tensors






def check_input(x, shape, net: str):
    """The module's input: [N, C, H, W] (any H, W) or [N, F]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{net} expects a tensor, got {type(x).__name__}")
    if x.dim() != len(shape) + 1 or x.shape[1] != shape[0]:
        want = "×".join(str(d) for d in shape)
        raise ShapeError(f"{net} expects input [N, {', '.join(['C', 'H', 'W'][:len(shape)] if len(shape) == 3 else ['F'])}] "
                         f"with {shape[0]} channel{'s' if shape[0] != 1 else ''} (declared {want}), got {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{net} expects a floating-point input, got {x.dtype}")
    return x


def _spatial(x, kernel, stride, padding, dilation, ceil_mode, at):
    H, W = x.shape[2], x.shape[3]
    Ho = window_out(H, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    Wo = window_out(W, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    if Ho < 1 or Wo < 1:
        raise ShapeError(f"{at}: a {H}×{W} input is too small for this layer "
                         f"({kernel[0]}×{kernel[1]} window, stride {stride}, padding {padding}); "
                         f"the output would be {Ho}×{Wo}")
    return Ho, Wo


def _channels(x, want, at):
    if x.shape[1] != want:
        raise ShapeError(f"{at}: expects {want} input channels, got {x.shape[1]}")


# ------------------------------------------------------------------ ops




# Eval BN folds per BN module, outside the module: it stays picklable and a
# deepcopy starts without them.






def _pending_block(x):
    """The _BlockOut of x (or of the tensor x aliases through a fork) whose output is not written yet."""
    fork = _grad._fork_of(x)
    block = fork.block if fork is not None else getattr(x, "_netdsl_block", None)
    return block if block is not None and block.pending is not None else None


def _makes_block(layer, x):
    """Can this conv make its input, a residual block's output, as it loads it (conv2d's block)?"""
    dev = x.device.type
    casts = dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) != x.dtype
    return (isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (1, 1) and tuple(layer.stride) == (1, 1)
            and tuple(layer.padding) == (0, 0) and tuple(layer.dilation) == (1, 1) and layer.groups == 1
            and not casts)


def conv(K, kernel, layer, x, *, bn=None, act=None, slope=0.01, residual=None, out=None, defer=False, into=None,
         leave=False, gate=None, at=""):
    """conv [+ BN] [+ residual] [+ act].  Eval: one kernel, BN folded into the
    epilogue.  Training: the conv (whose epilogue leaves per-tile sums), BN
    statistics merged from those sums, then one apply kernel.  defer (the
    autograd forward, when the only consumer is a conv): no apply kernel, a
    Deferred whose BN + act the consumer conv applies as it loads.  x may be
    such a Deferred.  into = (buffer, c0) (the autograd forward, a
    concatenation's part): the output is stored in the buffer's channels from
    c0 on, where the concatenation finds it in place.  leave (the autograd
    forward, a residual block's last conv whose output's first consumer is a
    1×1 stride-1 conv): no apply kernel; that conv makes the output as it
    loads this conv's (conv2d's block), and stores it.  gate (the inference
    plan's gate_in_prologue): the conv reads x · gate, gate one value per
    sample and channel (squeeze-and-excitation's), as it loads x."""
    _channels(x, layer.in_channels, at)
    Ho, Wo = _spatial(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation, False, at)
    N = x.shape[0]
    if residual is not None and tuple(residual.shape) != (N, layer.out_channels, Ho, Wo):
        raise ShapeError(f"{at}: residual add of unequal shapes {[N, layer.out_channels, Ho, Wo]} and {list(residual.shape)}")
    inp = x if isinstance(x, _grad.Deferred) else None
    if inp is not None:
        x = inp.raw
    made = _pending_block(x) if inp is None else None
    if made is not None and not _makes_block(layer, x):
        made.materialize(K)  # (a consumer that cannot make it: the apply kernel after all)
        made = None
    # a downsample's conv output, its BN deferred into this conv's residual add
    rdef = residual if isinstance(residual, _grad.Deferred) else None
    if rdef is not None:
        if bn is None or rdef.act is not None:
            raise AssertionError("a deferred shortcut needs a BN apply to ride in, and no activation of its own")
        residual = rdef.raw
    x, weight = _autocast(K, x, layer.weight)
    if inp is not None or rdef is not None or _grad.wanted(x, weight, layer.bias, residual,
                                                           *((bn.weight, bn.bias) if bn is not None else ())):
        _no_out(out)
        if gate is not None:
            raise AssertionError(f"{at}: a gate rides in the inference plan's convs only")
        # defer: this BN + act go into the (only) consumer conv's loads
        held = _grad.Deferred(bn, act, slope) if defer and bn is not None and residual is None else None
        own_bn = bn is not None and held is None
        in_bn = inp.bn if inp is not None and inp.bn.affine else None
        res_bn = rdef.bn if rdef is not None and rdef.bn.affine else None
        y = _grad.ConvFn.apply(x, weight, layer.bias, bn.weight if own_bn else None, bn.bias if own_bn else None,
                               residual, in_bn.weight if in_bn else None, in_bn.bias if in_bn else None,
                               res_bn.weight if res_bn else None, res_bn.bias if res_bn else None,
                               (K, kernel, layer, bn, act, slope, (N, layer.out_channels, Ho, Wo), held, inp, rdef,
                                into, leave, made))
        if held is None:
            return y
        held.raw = y
        return held
    if made is not None:  # (no gradient wanted here after all: the plain kernels read x as it is)
        made.materialize(K)
    if out is None:
        out = empty((N, layer.out_channels, Ho, Wo), x)
    kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    if gate is not None:
        kw["gate"] = gate
    if bn is None:
        return tuned.conv2d(_rt, kernel, x, weight, out, shift=layer.bias, residual=residual,
                            act=act, slope=slope, **kw)
    if bn.training or bn.running_mean is None:
        raw = empty((N, layer.out_channels, Ho, Wo), x)
        _, partials = tuned.conv2d(_rt, kernel, x, weight, raw, shift=layer.bias, stats=True,
                                   merge=grid_merge(bn, K.rt),
                                   **kw)
        scale, shift, mean, _ = _bn_scale_shift(K, bn, raw, True, partials=partials)
        _norm.channel_affine(_rt, K.channel_affine, raw, scale, shift, out, residual, act, slope, center=mean)
        return out
    scale, shift, _, _ = _bn_scale_shift(K, bn, out, False, conv_bias=layer.bias)
    return tuned.conv2d(_rt, kernel, x, weight, out, scale=scale, shift=shift, residual=residual,
                        act=act, slope=slope, **kw)


def depthwise(K, kernel, layer, x, *, bn=None, act=None, slope=0.01, residual=None, out=None, stats=None,
              pool=False, at=""):
    """A depthwise conv [+ BN] [+ residual] [+ act] by the direct kernel.
    Eval: BN folded into the epilogue.  Train mode without gradients: the
    conv with its bias and the BN statistics' per-tile sums in its epilogue,
    their merge (bn_stats), one apply kernel.  The autograd forward's (no
    epilogue): the conv and its bias only, with its direct backward kernels;
    the generated code runs its batch norm next.  Given stats (True or
    False: the module's training mode) it returns (out, partials): with True
    the per-tile sums that batch norm takes its statistics from
    (rt.batchnorm's partials), so it never reads out for them; else None.
    pool (the inference plan's se_gate, no gradients): it returns (out,
    sums), sums the per-tile sums of out that se_gate pools (None where a
    train-mode batch norm after the conv makes out: se_gate pools out)."""
    if pool:
        if _grad.wanted(x, layer.weight, layer.bias) or stats is not None:
            raise AssertionError(f"{at}: a depthwise conv leaves pool sums in the inference forward only")
        if bn is not None and (bn.training or bn.running_mean is None):
            return depthwise(K, kernel, layer, x, bn=bn, act=act, slope=slope, residual=residual, out=out, at=at), None
    _channels(x, layer.in_channels, at)
    Ho, Wo = _spatial(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation, False, at)
    shape = (x.shape[0], layer.out_channels, Ho, Wo)
    if stats is False:
        return depthwise(K, kernel, layer, x, at=at), None
    if stats:
        if bn is not None or residual is not None or act is not None or out is not None:
            raise AssertionError(f"{at}: a depthwise conv that leaves its BN's sums takes no epilogue")
        x, weight = _autocast(K, x, layer.weight)
        if _grad.wanted(x, weight, layer.bias):
            y, *partials = _grad.DepthwiseFn.apply(x, weight, layer.bias, (K, kernel, shape, True))
            return y, tuple(partials)
        y = empty(shape, x)
        return y, _dw.depthwise2d(_rt, kernel, x, weight, y, shift=layer.bias, stats=True)
    if _grad.wanted(x, layer.weight, layer.bias):
        if bn is not None or residual is not None or act is not None or out is not None:
            raise AssertionError(f"{at}: the autograd forward's depthwise conv takes no epilogue")
        x, weight = _autocast(K, x, layer.weight)
        return _grad.DepthwiseFn.apply(x, weight, layer.bias, (K, kernel, shape, False))
    if residual is not None and tuple(residual.shape) != shape:
        raise ShapeError(f"{at}: residual add of unequal shapes {list(shape)} and {list(residual.shape)}")
    x, weight = _autocast(K, x, layer.weight)
    if out is None:
        out = empty(shape, x)
    if bn is None:
        sums = _dw.depthwise2d(_rt, kernel, x, weight, out, shift=layer.bias, residual=residual, act=act, slope=slope,
                               pool=pool)
        return (out, sums) if pool else out
    if bn.training or bn.running_mean is None:
        raw = empty(shape, x)
        partials = _dw.depthwise2d(_rt, kernel, x, weight, raw, shift=layer.bias, stats=True)
        scale, shift, mean, _ = _bn_scale_shift(K, bn, raw, True, partials=partials)
        _norm.channel_affine(_rt, K.channel_affine, raw, scale, shift, out, residual, act, slope, center=mean)
    else:
        scale, shift, _, _ = _bn_scale_shift(K, bn, out, False, conv_bias=layer.bias)
        sums = _dw.depthwise2d(_rt, kernel, x, weight, out, scale=scale, shift=shift, residual=residual, act=act,
                               slope=slope, pool=pool)
        return (out, sums) if pool else out
    return out


def se_gate(K, x, sums, squeeze, excite, *, act1=None, act2=None, slope1=0.01, slope2=0.01, at=""):
    """A squeeze-and-excitation gate [N, C, 1, 1] of x in one launch (the
    inference plan's se_gate): its global average pool, the squeeze conv
    and act1, the excite conv and act2.  sums: the per-tile sums of x its
    depthwise conv left (rt.depthwise's pool), or None to pool x itself."""
    N, C, H, W = x.shape
    if _grad.wanted(x, squeeze.weight, excite.weight):
        raise AssertionError(f"{at}: a fused gate runs in the inference forward only")
    _channels(x, squeeze.in_channels, at)
    if sums is not None:
        src, count = sums.transpose(1, 2), H * W  # [N, C, tiles]
    elif H == 1 or W == 1 or x.stride(2) == W * x.stride(3):  # the pixels as one strided dimension
        src = x.as_strided((N, C, H * W), (x.stride(0), x.stride(1), x.stride(3) if W > 1 else x.stride(2)),
                           x.storage_offset())
        count = H * W
    else:
        src, count = adaptive_avgpool(K, x, (1, 1), at=at).view(N, C, 1), 1
    w1, w2 = squeeze.weight, excite.weight
    out = torch.empty((N, C, 1, 1), device=x.device, dtype=x.dtype)
    _gate.se_gate(_rt, K.se_gate, src, count, (w1.view(w1.shape[0], w1.shape[1]), squeeze.bias),
                  (w2.view(w2.shape[0], w2.shape[1]), excite.bias), out, act1=act1, act2=act2, slope1=slope1,
                  slope2=slope2)
    return out


def conv_transpose(K, kernel, layer, x, *, out=None, at=""):
    _channels(x, layer.in_channels, at)
    H, W = x.shape[2], x.shape[3]
    dims = []
    for n, k, s, p, op, d in zip((H, W), layer.kernel_size, layer.stride, layer.padding,
                                 layer.output_padding, layer.dilation):
        dims.append((n - 1) * s - 2 * p + d * (k - 1) + op + 1)
    if min(dims) < 1:
        raise ShapeError(f"{at}: a {H}×{W} input gives a {dims[0]}×{dims[1]} output")
    x, weight = _autocast(K, x, layer.weight)
    if _grad.wanted(x, weight, layer.bias):
        _no_out(out)
        return _grad.ConvTransposeFn.apply(x, weight, layer.bias,
                                           (K, kernel, layer, (x.shape[0], layer.out_channels, *dims)))
    if out is None:
        out = empty((x.shape[0], layer.out_channels, *dims), x)
    return tuned.conv_transpose2d(_rt, kernel, x, weight, out, bias=layer.bias, groups=layer.groups)


def linear(K, kernel, layer, x, *, act=None, slope=0.01, out=None, at=""):
    """A linear layer is a 1×1 conv on a 1×1 image: the same GEMM kernel."""
    if x.dim() != 2 or x.shape[1] != layer.in_features:
        raise ShapeError(f"{at}: expects [N, {layer.in_features}] input features, got {list(x.shape)} "
                         "(a different input size changes what reaches this layer)")
    x, weight = _autocast(K, x, layer.weight)
    if _grad.wanted(x, weight, layer.bias):
        _no_out(out)
        return _grad.ConvFn.apply(x, weight, layer.bias, None, None, None, None, None, None, None,
                                  (K, kernel, layer, None, act, slope, (x.shape[0], layer.out_features), None, None,
                                   None, None, False, None))
    if out is None:
        out = torch.empty((x.shape[0], layer.out_features), device=x.device, dtype=x.dtype)
    w4 = weight.view(layer.out_features, layer.in_features, 1, 1)
    tuned.conv2d(_rt, kernel, as4d(x), w4, as4d(out), shift=layer.bias, act=act, slope=slope)
    return out


def batchnorm(K, bn, x, *, act=None, slope=0.01, residual=None, out=None, defer=False, partials=None, at=""):
    """BN [+ residual] [+ act].  defer (the autograd forward, when the only
    consumer is a conv): the statistics only, and a Deferred whose apply and
    act the consumer conv does as it loads x (DenseNet's BN→ReLU→conv).
    partials: the per-tile sums of x its producer's epilogue left (a direct
    depthwise conv's), which batch statistics come from instead of a pass over x."""
    _channels(x, bn.num_features, at)
    _check_residual(residual, x, at)
    batch_stats = bn.training or bn.running_mean is None
    partials = partials if batch_stats else None
    if _grad.wanted(x, bn.weight, bn.bias, residual):
        _no_out(out)
        if defer and residual is None and x.dim() == 4:
            held = _grad.Deferred(bn, act, slope)
            held.set_stats(batch_stats, *_bn_scale_shift(K, bn, x, batch_stats, cache=False, partials=partials,
                                                         channel_stats=getattr(x, "_netdsl_stats", None)))
            held.raw = x
            return held
        return _grad.BatchNormFn.apply(x, bn.weight, bn.bias, residual, (K, bn, act, slope, partials))
    x4 = as4d(x)
    if out is None:
        out = empty(tuple(x.shape), x)
    scale, shift, mean, _ = _bn_scale_shift(K, bn, x4, bn.training, partials=partials)
    _norm.channel_affine(_rt, K.channel_affine, x4, scale, shift, as4d(out),
                         as4d(residual) if residual is not None else None, act, slope, center=mean)
    return out


def activation(K, x, act, slope=0.01, bounds=(-1.0, 1.0), out=None):
    if _grad.wanted(x):
        _no_out(out)
        return _grad.ActivationFn.apply(x, (K, act, slope, bounds))
    if out is None:
        out = empty(tuple(x.shape), x, channels_last=_is_cl(x))
    _ew.elementwise(_rt, K.elementwise, 0, as4d(x), as4d(out), act=act, slope=slope, bounds=bounds)
    return out


def add(K, a, b, act=None, out=None, at=""):
    _check_residual(b, a, at)
    if _grad.wanted(a, b):
        _no_out(out)
        return _grad.AddFn.apply(a, b, (K, act))
    if out is None:
        out = empty(tuple(a.shape), a, channels_last=_is_cl(a))
    _ew.elementwise(_rt, K.elementwise, 1, as4d(a), as4d(out), other4=as4d(b), act=act)
    return out


def mul(K, a, b, out=None, at=""):
    """a · b with broadcasting (size-1 dimensions read with stride 0)."""
    if a.dim() != b.dim() or any(x != y and 1 not in (x, y) for x, y in zip(a.shape, b.shape)):
        raise ShapeError(f"{at}: mul of shapes that do not broadcast: {list(a.shape)} and {list(b.shape)}")
    if _grad.wanted(a, b):
        _no_out(out)
        return _grad.MulFn.apply(a, b, K)
    return _grad.mul(K, a, b, out)


def dropout(K, x, p, training, out=None, op=2):
    """op 2: dropout; 7 and 8: stochastic depth by sample and of the whole batch."""
    if not training or p == 0.0:
        return x if out is None else copy(K, x, out)
    global _dropout_calls
    seed = torch.initial_seed() % (2**31 - 1)
    offset = (_dropout_calls * x.numel()) % (2**31 - x.numel() - 1)
    _dropout_calls += 1
    if _grad.wanted(x):
        _no_out(out)
        return _grad.DropoutFn.apply(x, (K, op, p, seed, offset))
    if out is None:
        out = empty(tuple(x.shape), x, channels_last=_is_cl(x))
    _ew.elementwise(_rt, K.elementwise, op, as4d(x), as4d(out), p=p, seed=seed, offset=offset)
    return out


def stochastic_depth(K, x, p, mode, training, out=None):
    """torchvision's stochastic_depth: in training each sample (mode "row") or
    the whole batch ("batch") is zeroed with probability p, the rest scaled
    by 1 / (1 - p); the identity in eval."""
    return dropout(K, x, p, training, out, op=7 if mode == "row" else 8)


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d: a batch norm whose statistics and
    affine parameters are all fixed buffers, in eval mode whatever mode the
    network is in.  The Triton modules run it through the batch-norm kernels
    (it has a BatchNorm2d's attributes); its forward is the --target torch twin's."""

    affine = True
    momentum = 0.0

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), value))
        # (a pointer the batch-norm kernels take; not part of the state, as in torchvision)
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long), persistent=False)
        self.training = False

    @property
    def track_running_stats(self):
        return True

    def train(self, mode: bool = True):
        return self  # never trains

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict.pop(prefix + "num_batches_tracked", None)  # as torchvision's: BatchNorm2d checkpoints load
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"


class LayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d: layer norm over the channels of each pixel
    of an N×C×H×W tensor (of an N×C one, as nn.LayerNorm)."""

    def forward(self, x):
        if x.dim() != 4:
            return super().forward(x)
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _PointwiseConv:
    """A PixelLinear as the conv launchers see it: a 1×1 conv whose weight is a view of Linear's."""

    kernel_size, stride, padding, dilation, groups = (1, 1), (1, 1), (0, 0), (1, 1), 1

    def __init__(self, linear):
        self.in_channels, self.out_channels = linear.in_features, linear.out_features
        self.weight = linear.weight.view(linear.out_features, linear.in_features, 1, 1)
        self.bias = linear.bias


class PixelLinear(nn.Linear):
    """A Linear over the channels of each pixel of an N×C×H×W tensor, with
    Linear's weight [out, in] (ConvNeXt's pointwise MLP, between torch's
    permutes to channels-last and back)."""

    def forward(self, x):
        if x.dim() != 4:
            return super().forward(x)
        return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)

    def as_conv(self):
        return _PointwiseConv(self)


class StochasticDepth(nn.Module):
    """The --target torch twin's stochastic depth: torchvision.ops.StochasticDepth's computation."""

    def __init__(self, p: float, mode: str):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        size = [x.shape[0]] + [1] * (x.dim() - 1) if self.mode == "row" else [1] * x.dim()
        noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.p)
        if self.p < 1.0:
            noise.div_(1.0 - self.p)
        return x * noise

    def extra_repr(self):
        return f"p={self.p}, mode={self.mode}"


def pool(kernel, x, kernel_size, stride, padding, dilation=(1, 1), ceil_mode=False, *, max_pool, out=None, at="",
         K=None):
    """Max or average pooling.  x may be a Deferred a conv produced (the
    autograd forward of conv→BN→act→pool): the pool applies its BN + act as it
    loads, and its backward takes that BN's backward sums (needs K)."""
    inp = x if isinstance(x, _grad.Deferred) else None
    if inp is not None:
        if inp.back is None or K is None:
            raise AssertionError("a pool takes a deferred batch norm only from a conv")
        x = inp.raw
    Ho, Wo = _spatial(x, kernel_size, stride, padding, dilation, ceil_mode, at)
    in_bn = inp.bn if inp is not None and inp.bn.affine else None
    if inp is not None or _grad.wanted(x):
        _no_out(out)
        return _grad.PoolFn.apply(x, in_bn.weight if in_bn else None, in_bn.bias if in_bn else None,
                                  (kernel, max_pool, (x.shape[0], x.shape[1], Ho, Wo),
                                   kernel_size[0] * kernel_size[1], K, inp))
    if out is None:
        out = empty((x.shape[0], x.shape[1], Ho, Wo), x)
    _pool.pool2d(_rt, kernel, x, out)
    return out


def adaptive_avgpool(K, x, size, out=None, at=""):
    if _grad.wanted(x):
        _no_out(out)
        return _grad.AdaptiveAvgPoolFn.apply(x, (K, (x.shape[0], x.shape[1], *size)))
    if out is None:
        out = empty((x.shape[0], x.shape[1], *size), x)
    _pool.adaptive_avgpool2d(_rt, K.adaptive_avgpool, x, out)
    return out


def upsample(kernel, x, scale, align_corners=False, *, bilinear, size=None, out=None, at=""):
    """By scale, or (scale None) to size: (H, W), a named tensor's (`upsample(size=@name)`)."""
    Ho, Wo = (int(x.shape[2] * scale), int(x.shape[3] * scale)) if size is None else (int(size[0]), int(size[1]))
    if _grad.wanted(x):
        _no_out(out)
        return _grad.UpsampleFn.apply(x, (kernel, scale, align_corners, bilinear, (x.shape[0], x.shape[1], Ho, Wo)))
    if out is None:
        out = empty((x.shape[0], x.shape[1], Ho, Wo), x)
    _pool.upsample2d(_rt, kernel, x, out, scale, align_corners)
    return out


def lrn(kernel, layer, x, out=None, at=""):
    if _grad.wanted(x):
        _no_out(out)
        return _grad.LRNFn.apply(x, (kernel, layer))
    if out is None:
        out = empty(tuple(x.shape), x)
    _norm.lrn(_rt, kernel, x, out, layer.alpha, layer.beta, layer.k)
    return out


def softmax(K, x, out=None, at=""):
    if _grad.wanted(x):
        _no_out(out)
        return _grad.SoftmaxFn.apply(x, K)
    if out is None:
        out = empty(tuple(x.shape), x, channels_last=_is_cl(x))
    _norm.softmax(_rt, K.softmax, as4d(x), as4d(out))
    return out


def layernorm(K, ln, x, out=None, at=""):
    """Layer norm over each pixel's channels (ln: a LayerNorm2d)."""
    _channels(x, ln.normalized_shape[0], at)
    if _grad.wanted(x, ln.weight, ln.bias):
        _no_out(out)
        return _grad.LayerNormFn.apply(x, ln.weight, ln.bias, (K, ln.eps))
    if out is None:
        out = empty(tuple(x.shape), x, channels_last=_is_cl(x))
    _ln.layernorm(_rt, K.layernorm, as4d(x), ln.weight, ln.bias, as4d(out), ln.eps)
    return out


def groupnorm(K, gn, x, out=None, at=""):
    """Group norm (gn: an nn.GroupNorm)."""
    _channels(x, gn.num_channels, at)
    if _grad.wanted(x, gn.weight, gn.bias):
        _no_out(out)
        return _grad.GroupNormFn.apply(x, gn.weight, gn.bias, (K, gn.num_groups, gn.eps))
    if out is None:
        out = empty(tuple(x.shape), x, channels_last=_is_cl(x))
    _gn.groupnorm(_rt, K.groupnorm, as4d(x), gn.weight, gn.bias, as4d(out), gn.num_groups, gn.eps)
    return out


def layer_scale(K, x, gamma, out=None, at=""):
    """x · γ with γ one learnable value per channel (ConvNeXt's layer scale)."""
    _channels(x, gamma.shape[0], at)
    g = gamma.view(1, -1) if x.dim() == 2 else gamma.view(1, -1, 1, 1)
    if _grad.wanted(x, gamma):
        _no_out(out)
        return _grad.MulFn.apply(x, g, K)
    return _grad.mul(K, x, g, out)


def channels(K, x, start, stop, at=""):
    """Channels [start, stop) of x: a view, which consumers read through its strides."""
    if x.dim() != 4 or x.shape[1] < stop:
        raise ShapeError(f"{at}: channels({start}, {stop}) of an input of shape {list(x.shape)}")
    if _grad.wanted(x):
        return _grad.ChannelsFn.apply(x, (K, start, stop))
    return x[:, start:stop]


def split_channels(K, x, ranges, at=""):
    """x's channel ranges [start, stop), views; where a gradient is wanted, one
    autograd Function whose backward writes their gradients side by side."""
    for start, stop in ranges:
        if x.dim() != 4 or x.shape[1] < stop:
            raise ShapeError(f"{at}: channels({start}, {stop}) of an input of shape {list(x.shape)}")
    if _grad.wanted(x):
        return _grad.SplitChannelsFn.apply(x, (K, tuple(ranges)))
    return tuple(x[:, a:b] for a, b in ranges)


def channel_shuffle(K, x, groups, out=None, at=""):
    if x.dim() != 4 or x.shape[1] % groups:
        raise ShapeError(f"{at}: channel_shuffle in {groups} groups of an input of shape {list(x.shape)}")
    if _grad.wanted(x):
        _no_out(out)
        return _grad.ChannelShuffleFn.apply(x, (K, groups))
    return _grad.channel_shuffle(K, x, groups, out)


class Channels(nn.Module):
    """x[:, start:stop] (torchvision's ShuffleNetV2 takes halves with chunk)."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x):
        return x[:, self.start:self.stop]

    def extra_repr(self):
        return f"{self.start}, {self.stop}"


def flatten(K, x):
    """torch.flatten(x, 1): a view when x is NCHW-contiguous, else one copy kernel."""
    if x.dim() == 2:
        return x
    if _grad.wanted(x):
        return _grad.FlattenFn.apply(x, K)
    if not x.is_contiguous():
        x = copy(K, x, torch.empty(x.shape, device=x.device, dtype=x.dtype))
    return x.view(x.shape[0], -1)




def _check_residual(r, out, at):
    if r is not None and tuple(r.shape) != tuple(out.shape):
        raise ShapeError(f"{at}: residual add of unequal shapes {list(out.shape)} and {list(r.shape)}")






def concat(K, xs, into=None, at=""):
    """torch.cat(xs, 1) for the autograd forward (the inference forward writes
    branches straight into slices of one buffer instead).  into: a dense
    block's buffer, shared by its growing concatenations (see ConcatFn)."""
    for x in xs[1:]:
        if x.shape[0] != xs[0].shape[0] or x.shape[2:] != xs[0].shape[2:]:
            raise ShapeError(f"{at}: concat of unequal sizes {list(xs[0].shape)} and {list(x.shape)}")
    if _grad.wanted(*xs):
        return _grad.ConcatFn.apply((K, into), *xs)
    buf = concat_buffer(xs[0], sum(x.shape[1] for x in xs), xs[0].shape[2], xs[0].shape[3])
    c0 = 0
    for x in xs:
        copy(K, x, buf[:, c0:c0 + x.shape[1]])
        c0 += x.shape[1]
    return buf


def _autocast(K, x, weight):
    """Under torch.autocast, convs and linears take the autocast dtype, as
    torch's do: x and the weight are cast by a copy kernel (differentiable;
    the weight's gradient returns to its fp32 master copy).  Accumulation
    stays fp32 in the kernels, BN statistics stay fp32 buffers."""
    dev = x.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return x, weight
    dt = torch.get_autocast_dtype(dev)
    return cast(K, x, dt), cast(K, weight, dt)


def cast(K, t, dtype):
    """t in dtype, by the copy kernel (an autograd Function when a gradient can flow)."""
    if t.dtype == dtype or not t.is_floating_point():
        return t
    if _grad.wanted(t):
        return _grad.CastFn.apply(t, (K, dtype))
    out = torch.empty_like(t, dtype=dtype)
    copy(K, _grad._as4(t), _grad._as4(out))
    return out


def fork(K, x, n):
    """x for n consumers (the autograd forward): aliases whose gradients are
    summed by the elementwise kernel in backward."""
    if not _grad.wanted(x):
        return (x,) * n
    return _grad.ForkFn.apply(x, K, n)


def _no_out(out):
    if out is not None:  # generated autograd forwards never write into caller buffers
        raise RuntimeError("netdsl: out= buffers are for inference forwards only (no autograd)")


def attach_backward(kernel, **grads):
    """Give a generated forward kernel its backward kernels (dgrad/wgrad, or backward)."""
    kernel.netdsl_backward = Kernels(**grads)


def grad_wanted(module, x) -> bool:
    """The generated forward takes its autograd path only when a gradient can flow."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for p in module.parameters())


# ------------------------------------------------------------------ modules


class NetModule(nn.Module):
    """Base of generated networks: layers registered under their dotted spec
    names (so state_dict keys are torchvision's for the zoo)."""

    def _parent(self, parts) -> nn.Module:
        parent = self
        for p in parts[:-1]:
            child = parent._modules.get(p)
            if child is None:
                child = nn.Module()
                parent.add_module(p, child)
            parent = child
        return parent

    def _add(self, path: str, module: nn.Module) -> nn.Module:
        parts = path.split(".")
        parent = self._parent(parts)
        existing = parent._modules.get(parts[-1])
        if existing is not None:  # a stateless layer used twice, like torchvision's shared ReLU
            return existing
        parent.add_module(parts[-1], module)
        return module

    def _add_param(self, path: str, shape, value: float):
        """A bare parameter (a layer scale), filled with value, under its dotted name."""
        parts = path.split(".")
        self._parent(parts).register_parameter(parts[-1], nn.Parameter(torch.full(shape, float(value))))

    def param(self, path: str) -> nn.Parameter:
        *parents, last = path.split(".")
        return getattr(self.layer(".".join(parents)) if parents else self, last)

    def layer(self, path: str) -> nn.Module:
        m = self
        for p in path.split("."):
            m = m._modules[p]
        return m


def frozen_conv(in_channels, out_channels, kernel_size, groups, values, **kw):
    """A conv with literal weights that never train (requires_grad False)."""
    m = nn.Conv2d(in_channels, out_channels, kernel_size, groups=groups, bias=False, **kw)
    w = torch.tensor(values, dtype=torch.float32).view(m.weight.shape)
    m.weight = nn.Parameter(w, requires_grad=False)
    return m
