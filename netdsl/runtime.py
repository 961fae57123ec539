"""The small runtime that generated modules import.

It launches the generated Triton kernels: compiled on CUDA tensors, through
Triton's interpreter on CPU tensors (the same kernel source, no environment
variable needed).  Torch is only used here to allocate, view and check shapes;
every arithmetic op of a forward pass is a Triton kernel.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref

import torch
import torch.nn as nn

from .kernels import conv as _conv
from .kernels import elementwise as _ew
from .kernels import norm as _norm
from .kernels import pool as _pool
from .ops import window_out
from .tuning import register as register_tuned  # noqa: F401  (generated modules' baked-in tables)

# ------------------------------------------------------------------ launching

# Triton 3.6's interpreter converts 1-element arrays to ints; numpy warns each time.
warnings.filterwarnings("ignore", message="Conversion of an array with ndim > 0", category=DeprecationWarning)

_local = threading.local()
_interpreted: dict = {}
_dropout_calls = 0  # each dropout launch draws its own stretch of the random stream


class ShapeError(ValueError):
    """An input size that breaks a layer; names the layer and its spec line."""


@contextlib.contextmanager
def kernel_log():
    """Record every kernel launch made by netdsl modules inside the block:
    `with netdsl.kernel_log() as log: model(x)` -> log is a list of (name, grid)."""
    stack = getattr(_local, "logs", None)
    if stack is None:
        stack = _local.logs = []
    log: list = []
    stack.append(log)
    try:
        yield log
    finally:  # by identity: nested logs may hold equal contents
        del stack[next(i for i, entry in enumerate(stack) if entry is log)]


def _interpreter(kernel):
    # keyed by id: hashing a JITFunction computes its cache key, which fails
    # while the interpreter has triton.language patched
    entry = _interpreted.get(id(kernel))
    if entry is None or entry[0] is not kernel:
        from triton.runtime.interpreter import InterpretedFunction

        entry = _interpreted[id(kernel)] = (kernel, InterpretedFunction(kernel.fn))
    return entry[1]


_interp_lock = threading.RLock()


def _call_nested(jit_fn, *args, **kwargs):
    # InterpretedFunction.__call__ patches triton.language for the callee and
    # never restores it, which breaks later GPU compiles in this process; patch
    # in a scope of our own and restore it when the call returns.
    interp = _interpreter(jit_fn)
    try:
        from triton.runtime.interpreter import _patch_lang
    except ImportError:  # a Triton without the helper: its own (leaky) path
        return interp(*args, **kwargs)
    scope = _patch_lang(jit_fn.fn)
    try:
        return interp.rewrite()(*args, **kwargs)
    finally:
        scope.restore()


@contextlib.contextmanager
def _nested_jit_interpreted():
    """Inside an interpreted kernel, calls to other @triton.jit functions
    (triton.language's own tl.zeros, tl.sum, tl.sigmoid, ...) must run
    interpreted too.  Under TRITON_INTERPRET=1 Triton arranges this at import
    time for every kernel; here only CPU launches are interpreted, so the
    switch is made around each of them."""
    from triton.runtime.jit import JITFunction

    with _interp_lock:
        original = JITFunction.__call__
        JITFunction.__call__ = _call_nested
        try:
            yield
        finally:
            JITFunction.__call__ = original


def launch(kernel, grid, *args, **meta):
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    for log in getattr(_local, "logs", ()) or ():
        log.append((kernel.fn.__name__, tuple(grid)))
    plan = getattr(_local, "plan", None)
    if plan is not None:  # record only (ahead-of-time compilation, reports)
        # descriptions, not the tensors: holding them would change what
        # autograd's engine does (it copies a gradient someone else still holds)
        plan.append((kernel, tuple(TensorInfo.of(a) if isinstance(a, torch.Tensor) else a for a in args), meta))
        return
    if _compile_only is not None:
        compiled, mode = _compile_only
        compiled.append(_warmup(kernel, grid, args, meta, mode))
        return
    _local.in_launch = True
    try:
        if device.type == "cpu":
            if any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
                raise TypeError("bfloat16 needs a CUDA device: Triton's CPU interpreter has no bfloat16 "
                                "(float32 and float16 run on the CPU)")
            with _nested_jit_interpreted():
                try:
                    _interpreter(kernel)[grid](*args, **meta)
                except BaseException:
                    # a launch stopped part-way can leave merge counters counted: the next starts from zero
                    for key in [k for k in _COUNTERS if k[0] == str(device)]:
                        del _COUNTERS[key]
                    raise
        else:
            kernel[grid](*args, **meta)
    finally:
        _local.in_launch = False


class TensorInfo(tuple):
    """What a planned launch records of a tensor argument."""

    dtype = property(lambda self: self[0])
    shape = property(lambda self: self[1])
    stride = property(lambda self: self[2])
    data_ptr = property(lambda self: self[3])
    nbytes = property(lambda self: self[4])

    @classmethod
    def of(cls, t):
        return cls((t.dtype, tuple(t.shape), tuple(t.stride()), t.data_ptr(), t.numel() * t.element_size()))


def in_launch() -> bool:
    """True while a kernel runs (the interpreter moves data with torch ops then)."""
    return getattr(_local, "in_launch", False)


@contextlib.contextmanager
def plan_launches():
    """Run a forward without executing kernels, with the tile sizes a GPU would
    get, recording (kernel, args, meta) for each launch (tensors as TensorInfo)."""
    _local.plan = plan = []
    try:
        yield plan
    finally:
        _local.plan = None


# (launches made, triton.AsyncCompileMode or None) while launches compile only: process-wide, not per
# thread, because a CUDA backward launches from autograd's own thread
_compile_only = None


@contextlib.contextmanager
def compile_only(mode):
    """Launches inside the block, from any thread, compile their kernels
    (Triton's JIT, for its active driver's GPU) and run nothing; yields the
    list of what each returned.  mode: the triton.AsyncCompileMode whose pool
    takes the compiles.  What is computed is garbage: nothing may read it
    (parallel_compile.py)."""
    global _compile_only
    _compile_only = (compiled, _) = ([], mode)
    try:
        yield compiled
    finally:
        _compile_only = None


def _warmup(kernel, grid, args, meta, mode):
    """Compile (or find) what this launch would run: the launch's own specialisation."""
    from triton.runtime._async_compile import active_mode  # (every Triton netdsl supports, 3.6 on, has it)

    # the mode is a context variable, which a thread autograd started has never seen
    token = active_mode.set(mode) if active_mode.get() is None else None
    try:
        return kernel.warmup(*args, grid=grid, **meta)
    finally:
        if token is not None:
            active_mode.reset(token)


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
                y = module(x)
                if y.requires_grad:  # (a network with nothing to train has no backward)
                    y.backward(out_grad(y))
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


def dry() -> bool:
    """True while launches compute nothing (planned, or compiled only)."""
    return getattr(_local, "plan", None) is not None or _compile_only is not None


def gpu_tiles(x) -> bool:
    return x.is_cuda or dry()


def needs_int64(*tensors) -> bool:
    """True when an offset into any tensor can pass 2^31 - 1 elements."""
    for t in tensors:
        if t is not None and sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0) >= 2**31 - 1:
            return True
    return False


def acc(x):
    """The accumulation type of kernels reading x: fp64 for fp64 tensors
    (gradcheck), fp32 for everything else (fp16/bf16 included)."""
    import triton.language as tl

    return tl.float64 if x.dtype == torch.float64 else tl.float32


def stat_empty(C, like):
    """A per-channel fp32 buffer (fp64 for fp64 tensors): BN statistics stay fp32 under half precision."""
    return torch.empty(C, device=like.device, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)


def grid_merge(bn):
    """bn, where a conv's programs merge its batch statistics (and a dgrad's
    its backward's sums): the default; None with NETDSL_GRID_MERGE=0, which
    leaves them to bn_stats / channel_grad launches over the same partials
    (to rule the merges out when hunting a bug)."""
    return bn if os.environ.get("NETDSL_GRID_MERGE", "1") != "0" else None


def combo() -> bool:
    """True where a conv's input and weight gradients share one launch
    (kernels/conv.py's CONV2D_BACKWARD): the default; NETDSL_COMBO=0 gives
    each its own launch of the same kernel, one part on (to compare)."""
    return os.environ.get("NETDSL_COMBO", "1") != "0"


def wgrad_add() -> bool:
    """True where a 1×1 stride-1 conv's weight gradient may ride in its dgrad
    as atomic adds (kernels/conv.py's WGRAD_ADD): the default, except under
    torch.use_deterministic_algorithms (the adds' order varies, and so do the
    sums' last bits); NETDSL_WGRAD_ADD=0 keeps the wgrad's own programs."""
    return os.environ.get("NETDSL_WGRAD_ADD", "1") != "0" and not torch.are_deterministic_algorithms_enabled()


def batch_stats_empty(C, like):
    return _norm.BatchStats(*(stat_empty(C, like) for _ in range(4)))


# Arrival counters for the grid-wide merges (kernels/conv.py's MERGE_SLOTS and
# LAST_TO_ARRIVE), per device and stream: each launch leaves its counters at
# zero, and launches on one stream never overlap.
_COUNTERS: dict = {}


def counters(device, n):
    """n int32 counters, zero, for one launch on the current stream."""
    key = (str(device), torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    c = _COUNTERS.get(key)
    if c is None or c.numel() < n:
        c = _COUNTERS[key] = torch.zeros(max(n, 1024), device=device, dtype=torch.int32)
    return c


def precision(x) -> str:
    # fp32 tl.dot uses TF32 on GPUs unless told otherwise; follow torch's own
    # setting for convolutions (torch.backends.cudnn.allow_tf32).
    if x.dtype == torch.float64:
        return "ieee"
    if x.dtype != torch.float32:
        return "tf32"  # half inputs: the setting only matters for fp32 (ieee is fp32-only)
    if gpu_tiles(x) and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


# ------------------------------------------------------------------ tensors


def as4d(x):
    """[N, F] -> [N, F, 1, 1] view; [N, C, H, W] as is."""
    return x if x.dim() == 4 else x.view(x.shape[0], x.shape[1], 1, 1)


def empty(shape, like, channels_last=True):
    if len(shape) == 4 and channels_last:
        return torch.empty(shape, device=like.device, dtype=like.dtype, memory_format=torch.channels_last)
    return torch.empty(shape, device=like.device, dtype=like.dtype)


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


class Kernels:
    """The generic kernels of a generated file (BN statistics, folding, apply,
    elementwise, adaptive pooling), handed to the ops below."""

    def __init__(self, **kernels):
        self.__dict__.update(kernels)


# Eval BN folds per BN module, outside the module: it stays picklable and a
# deepcopy starts without them.
_FOLDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class ChannelStats:
    """Batch mean and variance per channel of a dense block's buffer, for its
    first `known` channels: every later layer's BN normalises the same data
    there, so each channel is reduced over once (see norm.bn_stats)."""

    __slots__ = ("mean", "var", "known")

    def __init__(self, buf):
        dt = _norm.reduce_dtype(_rt, buf)
        self.mean, self.var = (torch.empty(buf.shape[1], device=buf.device, dtype=dt) for _ in range(2))
        self.known = 0


def _bn_scale_shift(K, bn, y4, training, conv_bias=None, cache=True, partials=None, channel_stats=None):
    """(scale, shift, center, rstd): y = (x − center)·scale + shift; center is the
    batch mean in training (precision), None when folded to x·scale + shift
    (eval); rstd = 1/sqrt(var + eps) is what backward needs.  partials: the
    producing conv's per-tile sums (training), so y4 need not be read again.
    channel_stats (a ChannelStats): y4 is its buffer's first channels.
    partials may also be the BatchStats a conv's last programs merged (see
    conv2d's merge): then they are the result."""
    C = bn.num_features
    if training or bn.running_mean is None:
        if isinstance(partials, _norm.BatchStats):  # the producing conv merged them already
            return partials
        _norm.check_batch(bn, y4.shape)
        out = batch_stats_empty(C, y4)
        st = channel_stats if channel_stats is not None and partials is None and C <= channel_stats.mean.shape[0] \
            else None
        _norm.bn_stats(_rt, K.bn_stats, bn, y4, out, partials=partials,
                       cache=(st.mean, st.var, min(st.known, C)) if st is not None else None)
        if st is not None:
            st.known = max(st.known, C)
        return out
    # Eval: the fold only changes when a parameter or buffer does; torch bumps a
    # tensor's _version on every in-place write (optimizer steps, load_state_dict).
    # The tensors themselves are held by weak reference: a new tensor (say, from
    # torch.func.functional_call) at a freed one's address is not a hit.  Writes
    # through .data bypass _version: the autograd path (cache=False) never
    # caches, so training and gradcheck always see the current values.
    tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var, conv_bias)
    versions = tuple(t._version if t is not None else None for t in tensors)
    cached = _FOLDS.get(bn) if cache else None
    if cached is not None and cached[1] == versions and all(
            (r is None and t is None) or (r is not None and r() is t) for r, t in zip(cached[0], tensors)):
        return cached[2], cached[3], None, cached[4]
    rstd, scale, shift = (stat_empty(C, y4) for _ in range(3))
    _norm.bn_fold(_rt, K.bn_fold, bn, rstd, scale, shift, conv_bias=conv_bias)
    if cache and not dry():  # a planned (or only compiled) launch computed nothing
        refs = tuple(weakref.ref(t) if t is not None else None for t in tensors)
        _FOLDS[bn] = (refs, versions, scale, shift, rstd)
    return scale, shift, None, rstd


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
         leave=False, at=""):
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
    loads this conv's (conv2d's block), and stores it."""
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
    if bn is None:
        return _conv.conv2d(_rt, kernel, x, weight, out, shift=layer.bias, residual=residual,
                            act=act, slope=slope, **kw)
    if bn.training or bn.running_mean is None:
        raw = empty((N, layer.out_channels, Ho, Wo), x)
        _, partials = _conv.conv2d(_rt, kernel, x, weight, raw, shift=layer.bias, stats=True, merge=grid_merge(bn),
                                   **kw)
        scale, shift, mean, _ = _bn_scale_shift(K, bn, raw, True, partials=partials)
        _norm.channel_affine(_rt, K.channel_affine, raw, scale, shift, out, residual, act, slope, center=mean)
        return out
    scale, shift, _, _ = _bn_scale_shift(K, bn, out, False, conv_bias=layer.bias)
    return _conv.conv2d(_rt, kernel, x, weight, out, scale=scale, shift=shift, residual=residual,
                        act=act, slope=slope, **kw)


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
    return _conv.conv_transpose2d(_rt, kernel, x, weight, out, bias=layer.bias, groups=layer.groups)


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
    _conv.conv2d(_rt, kernel, as4d(x), w4, as4d(out), shift=layer.bias, act=act, slope=slope)
    return out


def batchnorm(K, bn, x, *, act=None, slope=0.01, residual=None, out=None, defer=False, at=""):
    """BN [+ residual] [+ act].  defer (the autograd forward, when the only
    consumer is a conv): the statistics only, and a Deferred whose apply and
    act the consumer conv does as it loads x (DenseNet's BN→ReLU→conv)."""
    _channels(x, bn.num_features, at)
    _check_residual(residual, x, at)
    if _grad.wanted(x, bn.weight, bn.bias, residual):
        _no_out(out)
        if defer and residual is None and x.dim() == 4:
            held = _grad.Deferred(bn, act, slope)
            batch_stats = bn.training or bn.running_mean is None
            held.set_stats(batch_stats, *_bn_scale_shift(K, bn, x, batch_stats, cache=False,
                                                         channel_stats=getattr(x, "_netdsl_stats", None)))
            held.raw = x
            return held
        return _grad.BatchNormFn.apply(x, bn.weight, bn.bias, residual, (K, bn, act, slope))
    x4 = as4d(x)
    if out is None:
        out = empty(tuple(x.shape), x)
    scale, shift, mean, _ = _bn_scale_shift(K, bn, x4, bn.training)
    _norm.channel_affine(_rt, K.channel_affine, x4, scale, shift, as4d(out),
                         as4d(residual) if residual is not None else None, act, slope, center=mean)
    return out


def activation(K, x, act, slope=0.01, out=None):
    if _grad.wanted(x):
        _no_out(out)
        return _grad.ActivationFn.apply(x, (K, act, slope))
    if out is None:
        out = empty(tuple(x.shape), x, channels_last=_is_cl(x))
    _ew.elementwise(_rt, K.elementwise, 0, as4d(x), as4d(out), act=act, slope=slope)
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


def copy(K, x, out):
    _ew.elementwise(_rt, K.elementwise, 3, as4d(x), as4d(out))
    return out


def dropout(K, x, p, training, out=None):
    if not training or p == 0.0:
        return x if out is None else copy(K, x, out)
    global _dropout_calls
    seed = torch.initial_seed() % (2**31 - 1)
    offset = (_dropout_calls * x.numel()) % (2**31 - x.numel() - 1)
    _dropout_calls += 1
    if _grad.wanted(x):
        _no_out(out)
        return _grad.DropoutFn.apply(x, (K, p, seed, offset))
    if out is None:
        out = empty(tuple(x.shape), x, channels_last=_is_cl(x))
    _ew.elementwise(_rt, K.elementwise, 2, as4d(x), as4d(out), p=p, seed=seed, offset=offset)
    return out


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


def upsample(kernel, x, scale, align_corners=False, *, bilinear, out=None, at=""):
    Ho, Wo = int(x.shape[2] * scale), int(x.shape[3] * scale)
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


def flatten(K, x):
    """torch.flatten(x, 1): a view when x is NCHW-contiguous, else one copy kernel."""
    if x.dim() == 2:
        return x
    if _grad.wanted(x):
        return _grad.FlattenFn.apply(x, K)
    if not x.is_contiguous():
        x = copy(K, x, torch.empty(x.shape, device=x.device, dtype=x.dtype))
    return x.view(x.shape[0], -1)


def _is_cl(x):
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _check_residual(r, out, at):
    if r is not None and tuple(r.shape) != tuple(out.shape):
        raise ShapeError(f"{at}: residual add of unequal shapes {list(out.shape)} and {list(r.shape)}")


def concat_buffer(x, channels: int, H: int, W: int):
    return empty((x.shape[0], channels, H, W), x)


def channel_range(buf, c0: int, c1: int):
    """buf[:, c0:c1] as a tensor of its own: the same memory, but not an
    autograd view of buf.  A concatenation's parts are written in place (a
    branch's last conv stores into its channels; a dense block's growing
    concatenations share one buffer), and autograd forbids a custom
    Function's output to be a view of a tensor that later changes; the later
    writes go to other channels."""
    t = torch.empty(0, device=buf.device, dtype=buf.dtype)
    return t.set_(buf.untyped_storage(), buf.storage_offset() + c0 * buf.stride(1),
                  (buf.shape[0], c1 - c0, *buf.shape[2:]), buf.stride())


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

    def _add(self, path: str, module: nn.Module) -> nn.Module:
        parent = self
        parts = path.split(".")
        for p in parts[:-1]:
            child = parent._modules.get(p)
            if child is None:
                child = nn.Module()
                parent.add_module(p, child)
            parent = child
        existing = parent._modules.get(parts[-1])
        if existing is not None:  # a stateless layer used twice, like torchvision's shared ReLU
            return existing
        parent.add_module(parts[-1], module)
        return module

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


class _RT:
    """What kernel launchers call back into (keeps kernels/ free of torch state)."""

    launch = staticmethod(launch)
    acc = staticmethod(acc)
    needs_int64 = staticmethod(needs_int64)
    precision = staticmethod(precision)
    gpu_tiles = staticmethod(gpu_tiles)
    batch_stats_empty = staticmethod(batch_stats_empty)
    counters = staticmethod(counters)
    combo = staticmethod(combo)
    wgrad_add = staticmethod(wgrad_add)


_rt = _RT()


from . import grad as _grad  # noqa: E402  (grad builds on the helpers above)
