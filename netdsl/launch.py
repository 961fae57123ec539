"""Launching netdsl's kernels, below the ops of runtime.py and the autograd
Functions of grad.py (both import this, neither is imported here).

A launch runs compiled on CUDA tensors and through Triton's interpreter on
CPU tensors (the same kernel source, no environment variable needed); it can
instead be planned (recorded, nothing run) or compiled only.  Beside the
launch itself: the tensors and per-channel buffers kernels are handed, the
switches launchers consult (`_RT`), and the batch-norm statistics and folds
every BN op starts from.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
import weakref

import torch

from . import tuning
from .kernels import elementwise as _ew
from .kernels import norm as _norm

# ------------------------------------------------------------------ launching

# Triton 3.6's interpreter converts 1-element arrays to ints; numpy warns each time.
warnings.filterwarnings("ignore", message="Conversion of an array with ndim > 0", category=DeprecationWarning)

_local = threading.local()
_interpreted: dict = {}


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


_shuffle = None  # a random.Random while shuffled_grid() is on


@contextlib.contextmanager
def shuffled_grid(seed: int):
    """Interpreted launches inside the block run their grid's programs in a
    seeded random order.  Triton's interpreter always runs them in one order
    (x, then y, then z), while a GPU runs them in any: kernels whose programs
    meet through counters and atomics (grid-wide merges, split-K, weight
    gradients added into by many programs) must give the same result in every
    order, and this is how the tests check it on the CPU.

    The interpreter still walks its grid in its own order; each index it
    sets is mapped through a permutation of the grid drawn for that launch."""
    from triton.runtime import interpreter as ti

    global _shuffle
    import random

    builder = ti.interpreter_builder
    own_dim, own_idx = builder.set_grid_dim, builder.set_grid_idx
    patched = {k: v for k, v in vars(builder).items() if k in ("set_grid_dim", "set_grid_idx")}
    order = {}

    def set_grid_dim(nx, ny, nz):
        perm = list(range(nx * ny * nz))
        _shuffle.shuffle(perm)
        order.update(dims=(nx, ny, nz), perm=perm)
        return own_dim(nx, ny, nz)

    def set_grid_idx(x, y, z):
        _, ny, nz = order["dims"]
        k = order["perm"][(x * ny + y) * nz + z]
        return own_idx(k // (ny * nz), k // nz % ny, k % nz)

    with _interp_lock:
        previous = _shuffle
        _shuffle = random.Random(seed)
        builder.set_grid_dim, builder.set_grid_idx = set_grid_dim, set_grid_idx
        try:
            yield
        finally:
            del builder.set_grid_dim, builder.set_grid_idx  # the class's own methods again
            vars(builder).update(patched)  # (or an enclosing block's)
            _shuffle = previous


def launch(kernel, grid, *args, **meta):
    if getattr(_local, "shapes_only", False):  # (traced.py's fake forward: its outputs' shapes, nothing else)
        return
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
        return cls((t.dtype, tuple(t.shape), tuple(t.stride()), t.data_ptr(), distinct_bytes(t)))


def distinct_bytes(t) -> int:
    """The bytes of the elements a tensor addresses: a broadcast view's (stride 0) once each."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride != 0 else min(size, 1)
    return n * t.element_size()


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


def dry() -> bool:
    """True while launches compute nothing (planned, compiled only, or a trace's shapes)."""
    return getattr(_local, "plan", None) is not None or _compile_only is not None \
        or getattr(_local, "shapes_only", False)


@contextlib.contextmanager
def thread_flag(local, name: str):
    """local.<name> true for the with-block, then as it was (blocks may nest)."""
    was = getattr(local, name, False)
    setattr(local, name, True)
    try:
        yield
    finally:
        setattr(local, name, was)


def shapes_only():
    """Launch nothing and record nothing: a forward on fake (or symbolic) tensors for its outputs' shapes."""
    return thread_flag(_local, "shapes_only")


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
    """A buffer of C statistics (per channel, pixel or group) in fp32 (fp64 for fp64 tensors): statistics stay
    fp32 under half precision."""
    return torch.empty(C, device=like.device, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)


def grid_merge(bn, rt):
    """bn, where a conv's programs merge its batch statistics (and a dgrad's
    its backward's sums): the default; None where the module was compiled
    with grid_merge off, which leaves them to bn_stats / channel_grad launches
    over the same partial sums, and for a batch norm synchronised over
    processes (whose sums are all-reduced between the two).  rt: the
    module's _RT (K.rt)."""
    return bn if "grid_merge" not in rt.disabled and synced(bn) is None else None


def synced(bn):
    """The process group a train-mode nn.SyncBatchNorm (netdsl.build(...,
    sync_bn=True)) takes its batch statistics over, when torch.distributed
    runs more than one process in it; else None (statistics of this
    process's batch, as nn.SyncBatchNorm's own with one process)."""
    if not (isinstance(bn, torch.nn.SyncBatchNorm) and bn.training and torch.distributed.is_available()
            and torch.distributed.is_initialized()):
        return None
    group = bn.process_group or torch.distributed.group.WORLD
    return group if torch.distributed.get_world_size(group) > 1 else None


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


def _is_cl(x):
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


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


# ------------------------------------------------------------------ what launchers call back into


class _RT:
    """What kernel launchers call back into (keeps kernels/ free of torch
    state), with the fusions a generated module was compiled without
    (switches.py): each module's K.rt."""

    launch = staticmethod(launch)
    acc = staticmethod(acc)
    needs_int64 = staticmethod(needs_int64)
    precision = staticmethod(precision)
    gpu_tiles = staticmethod(gpu_tiles)
    batch_stats_empty = staticmethod(batch_stats_empty)
    counters = staticmethod(counters)
    shapes_only = staticmethod(lambda: getattr(_local, "shapes_only", False))

    def __init__(self, disabled=frozenset()):
        self.disabled = frozenset(disabled)

    def combo(self) -> bool:
        """True where a conv's input and weight gradients share one launch
        (kernels/conv.py's CONV2D_BACKWARD); with combo off, each gets its own
        launch of the same kernel, one part on."""
        return "combo" not in self.disabled

    def wgrad_add(self) -> bool:
        """True where a 1×1 stride-1 conv's weight gradient may ride in its
        dgrad as atomic adds (kernels/conv.py's WGRAD_ADD): not with wgrad_add
        off, nor under torch.use_deterministic_algorithms (the adds' order
        varies, and so do the sums' last bits)."""
        return "wgrad_add" not in self.disabled and not torch.are_deterministic_algorithms_enabled()


_rt = _RT()  # every fusion on: for the launchers' own tests and the tools


# the conv launchers, each with the tuned configuration for its shape where there is one
tuned = tuning.launchers()


# ------------------------------------------------------------------ batch-norm statistics


class Kernels:
    """The generic kernels of a generated file (BN statistics, folding, apply,
    elementwise, adaptive pooling), handed to the ops; disable: the fusions
    the file was compiled without (switches.py), as `self.rt`."""

    def __init__(self, disable=(), **kernels):
        self.__dict__.update(kernels)
        self.rt = _RT(frozenset(disable))


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
        group = synced(bn)
        if group is not None:
            return _synced_stats(K, bn, y4, partials, group, out)
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


def _synced_stats(K, bn, y4, partials, group, out):
    """A synchronised batch norm's statistics: this process's count, mean and
    variance, all-gathered, then merged in rank order (norm.bn_sync_finish)."""
    C = bn.num_features
    local = local_stats(K, bn, y4, partials)
    P = torch.distributed.get_world_size(group)
    stats = torch.empty((P, 3, C), device=local.device, dtype=local.dtype)
    if not dry():
        torch.distributed.all_gather(list(stats.unbind(0)), local, group=group)
    _norm.bn_sync_finish(_rt, K.bn_sync_finish, bn, stats, out)
    return out


def local_stats(K, bn, y4, partials=None):
    """[3, C]: the count, mean and variance per channel of this process's y4
    (from the producing conv's partials when given), for a synchronised batch norm."""
    C = bn.num_features
    local = torch.empty((3, C), device=y4.device, dtype=_norm.reduce_dtype(_rt, y4))
    _norm.bn_stats(_rt, K.bn_stats, bn, y4, _norm.BatchStats(local[0], local[0], local[1], local[2]),
                   partials=partials, sync=True)
    return local


def copy(K, x, out):
    _ew.elementwise(_rt, K.elementwise, 3, as4d(x), as4d(out))
    return out
