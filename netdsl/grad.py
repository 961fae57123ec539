"""Training: one torch.autograd.Function per fused forward kernel, whose
backward runs generated Triton kernels.

What each saves for backward (the rest is recomputed):
- conv / linear: its input and weight; with an activation, its output (the
  ReLU mask, and the sigmoid/tanh derivative, come from it); with batch norm,
  also the conv's raw output and the per-channel mean and rstd (x̂ is
  recomputed from them).
- batch norm alone: its input, its output (with an activation), mean, rstd.
- activation, add + activation, softmax: the output.  add, dropout (the
  mask is regenerated from its seed), flatten, concat, avg pooling,
  upsampling: nothing but shapes.  max pooling: the window tap of each
  maximum (int8).  LRN: its input.

A tensor with several consumers (a residual block's input, inception
branches, dense-block features) goes through ForkFn, whose backward sums the
consumers' gradients with the add kernel: autograd's engine never computes.

Where a conv's own batch norm runs its backward: never as a pass that writes
the conv output's gradient.  Its per-channel coefficients (dx = A·g + B +
C·x̂) come from one reduction, and the conv's dgrad and wgrad apply them as
they load g.  That reduction's sums come from a neighbour's epilogue where
one can take them: the consumer conv's dgrad (a deferred BN, see Deferred),
or the dgrad that completes a forked block output's gradient (_BlockOut),
whose last programs also finish the reduction (norm.BNSums); otherwise from
a pass over dy (writing g = dy·act'(y) on the way).  A conv
without BN applies act' as its dgrad and wgrad load dy, and its wgrad sums
the bias's gradient: its backward has no pass of its own.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import launch as rt
from .kernels import FROM_INPUT
from .kernels import conv as _conv
from .kernels import depthwise as _dw
from .kernels import elementwise as _ew
from .kernels import groupnorm as _gn
from .kernels import layernorm as _ln
from .kernels import norm as _norm
from .kernels import pool as _pool

_rt = rt._rt


def wanted(*tensors) -> bool:
    """Autograd bookkeeping only where a gradient can flow (never under no_grad / inference_mode)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _grad_like(x):
    return rt.empty(tuple(x.shape), x, channels_last=x.dim() == 4)


def _backward_of(kernel):
    bw = getattr(kernel, "netdsl_backward", None)
    if bw is None:
        raise RuntimeError(f"kernel {kernel.fn.__name__} has no backward kernels attached; "
                           "regenerate the module with this netdsl version")
    return bw


# ------------------------------------------------------------------ batch norm


class _BN:
    """Forward of y = act(BN(raw) + residual) with the statistics backward needs."""

    @staticmethod
    def forward(K, bn, raw4, out4, residual4, act, slope, partials=None, res_affine=None, channel_stats=None,
                bits=None):
        batch_stats = bn.training or bn.running_mean is None
        # eval: the fixed statistics folded to x·scale + shift, centred on the running mean for backward
        scale, shift, center, rstd = rt._bn_scale_shift(K, bn, raw4, batch_stats, cache=False,
                                                        partials=partials if batch_stats else None,
                                                        channel_stats=channel_stats)
        _norm.channel_affine(_rt, K.channel_affine, raw4, scale, shift, out4, residual4, act, slope, center=center,
                             res_affine=res_affine, bits=bits)
        return (center if batch_stats else bn.running_mean), rstd, batch_stats

    @staticmethod
    def backward(K, bn, dy4, out4, raw4, mean, rstd, batch_stats, act, slope, *, need_dx, need_res,
                 need_affine, conv_bias=None, deferred=None, sibling=None, partials=None):
        """(draw, dresidual, dgamma, dbeta, dconv_bias), None where not needed.
        sibling: raw's gradient from its other consumers, added into draw.
        deferred = (scale, shift, centered): the output was never stored
        (deferred BN), act' comes from y recomputed from raw4 as the
        consumer's prologue made it.  partials: the sums, from a dgrad's
        epilogue (see channel_grad)."""
        y4 = out4 if act is not None and deferred is None else None
        coef, dgamma, dbeta, dcb = _bn_sums(K, bn, dy4, raw4, mean, rstd, batch_stats, conv_bias, y4=y4, act=act,
                                            slope=slope, deferred=deferred, partials=partials)
        draw = g = None
        if need_dx or need_res:
            draw = _grad_like(raw4)
            g = _grad_like(raw4) if need_res else None
            _norm.channel_grad_apply(_rt, K.channel_grad_apply, dy4, coef, draw, y4=y4, act=act, slope=slope,
                                     x4=raw4, mean=mean, rstd=rstd, deferred=deferred, train=batch_stats, g4=g,
                                     residual4=sibling if need_dx else None)
        if not need_affine:
            dgamma = dbeta = None
        return draw, g, dgamma, dbeta, dcb

    @staticmethod
    def backward_for_conv(K, bn, dy4, out4, raw4, mean, rstd, batch_stats, act, slope, *, need_g, need_affine,
                          conv_bias=None):
        """The backward of a conv's own BN (+ residual) + act, left for the
        conv's dgrad and wgrad to apply as they load (no apply pass, raw's
        gradient never stored): one reduction pass gives the coefficients,
        writing g = dy·act'(y) on the way where the kernels or the residual
        need it.  (g, BNGrad for grad_in, dgamma, dbeta, dconv_bias)."""
        g = _grad_like(raw4) if act is not None and need_g else None
        coef, dgamma, dbeta, dcb = _bn_sums(K, bn, dy4, raw4, mean, rstd, batch_stats, conv_bias,
                                            y4=out4 if act is not None else None, act=act, slope=slope, g4=g)
        if not need_affine:
            dgamma = dbeta = None
        # g is what the residual gets, and what the prologue reads: act' is already in it
        return (g if act is not None else dy4), _act_free_bn_grad(raw4, mean, rstd, batch_stats, coef), \
            dgamma, dbeta, dcb


def _bn_sums_empty(bn, like, mean, train, conv_bias=None):
    """The buffers of a BN backward's reduction, as a norm.BNSums.  Parameter
    gradients are stored in the parameters' dtype, sums stay fp32."""
    coef = torch.empty(3 * bn.num_features, device=like.device, dtype=mean.dtype)
    dgamma, dbeta = (torch.empty_like(bn.weight), torch.empty_like(bn.bias)) if bn.affine else (None, None)
    dcb = torch.empty_like(conv_bias) if conv_bias is not None else None
    return _norm.BNSums(coef, dgamma, dbeta, dcb, bn.weight if bn.affine else None, train)


def _bn_sums(K, bn, dy4, x4, mean, rstd, train, conv_bias=None, **kw):
    """A BN backward's reduction (channel_grad; kw: how g is formed, or the
    partials that stand in for the pass): (coef, dgamma, dbeta, dconv_bias).
    partials may also be the BNSums a dgrad's last programs filled: the result."""
    if isinstance(kw.get("partials"), _norm.BNSums):
        return kw["partials"][:4]
    s = _bn_sums_empty(bn, x4, mean, train, conv_bias)
    group = rt.synced(bn) if train else None
    if group is None:
        _norm.channel_grad(_rt, K.channel_grad, dy4, x4=x4, mean=mean, rstd=rstd, weight=s.weight, train=train,
                           dweight=s.dgamma, dbias=s.dbeta, dcbias=s.dcbias, coef=s.coef, **kw)
        return s[:4]
    # synchronised over processes: the input gradient's coefficients from the group's sums (one all-reduce),
    # the parameter gradients from this process's, as nn.SyncBatchNorm's
    C = bn.num_features
    sums = torch.empty((2, 2 * C + 1), device=x4.device, dtype=_norm.reduce_dtype(_rt, x4))
    _norm.channel_grad(_rt, K.channel_grad, dy4, x4=x4, mean=mean, rstd=rstd, weight=s.weight, train=train,
                       dweight=s.dgamma, dbias=s.dbeta, coef=s.coef, sync=sums, **kw)
    if not rt.dry():
        torch.distributed.all_reduce(sums[1], group=group)
    # (a conv bias's gradient needs this process's mean of x, which its Σ x̂ comes from)
    lstats = rt.local_stats(K, bn, x4) if s.dcbias is not None else None
    _norm.bn_grad_sync_finish(_rt, K.bn_grad_sync_finish, sums, mean, rstd, s.weight, s.coef, lstats, s.dcbias)
    return s[:4]


def _act_free_bn_grad(raw4, mean, rstd, train, coef=None):
    """A BN's backward for the kernels' prologue, on g with act' already in it."""
    return _conv.BNGrad(raw4, mean, rstd, mean, mean, False, None, 0.0, train, coef)


# ------------------------------------------------------------------ conv / linear


class Deferred:
    """A train-forward conv output whose batch norm and activation are not
    applied yet: the consumer conv applies them as it loads (CONV2D's
    prologue), so the activation is never written, read back, or kept for
    backward.  raw is the autograd-tracked conv output; the statistics are
    what the BN computed (its running statistics are already updated).

    back (a _Back, when a conv produced raw): the backward is deferred too.
    The consumer's dgrad takes the BN backward's sums in its epilogue, and the
    gradient it hands back is the activation's, not raw's; the producer's
    dgrad and wgrad apply the BN backward (coef, from back) as they load it."""

    __slots__ = ("raw", "bn", "act", "slope", "batch_stats", "mean", "rstd", "center", "scale", "shift", "back")

    def __init__(self, bn, act, slope):
        self.bn, self.act, self.slope, self.raw, self.back = bn, act, slope, None, None

    shape = property(lambda self: self.raw.shape)
    device = property(lambda self: self.raw.device)
    dtype = property(lambda self: self.raw.dtype)

    def prologue(self):
        return self.center, self.scale, self.shift, self.act, self.slope

    def set_stats(self, batch_stats, scale, shift, center, rstd):
        """What rt._bn_scale_shift gave (eval: folded scale/shift, centred on the running mean for backward)."""
        self.batch_stats, self.scale, self.shift, self.center, self.rstd = batch_stats, scale, shift, center, rstd
        self.mean = center if batch_stats else self.bn.running_mean

    def recompute(self):
        """(scale, shift, centered): how y is recomputed from raw in backward."""
        return self.scale, self.shift, self.center is not None

    def bn_grad(self, raw4, coef=None):
        return _conv.BNGrad(raw4, self.mean, self.rstd, self.scale, self.shift, self.center is not None, self.act,
                            self.slope, self.batch_stats, coef)

    def stats_only(self):
        """A copy without raw, for the producer's ctx (raw is its output: holding
        it there would be a reference cycle through the graph); back is shared."""
        d = Deferred(self.bn, self.act, self.slope)
        for k in self.__slots__[4:]:
            setattr(d, k, getattr(self, k))
        return d


class _Back:
    """What the consumer's backward leaves for the producer's: the deferred
    BN's input-gradient coefficients (A, B, C per channel), and the gradient
    of the producing conv's bias, when it has one."""

    __slots__ = ("coef", "dcbias", "conv_bias")

    def __init__(self, conv_bias):
        self.coef, self.dcbias, self.conv_bias = None, None, conv_bias


def _in_place(into, shape, x):
    """The channels of a concatenation's buffer a part is stored in (into =
    (buffer, c0)), or None where the buffer does not fit (autocast's dtype)."""
    buf, c0 = into
    N, C, H, W = shape
    if buf.dtype != x.dtype or buf.device != x.device or buf.shape[0] != N or tuple(buf.shape[2:]) != (H, W) \
            or c0 + C > buf.shape[1]:
        return None
    return rt.channel_range(buf, c0, c0 + C)


class _BlockOut:
    """A stored y = act(BN(raw) + residual) of a conv (a residual block's
    output), for its consumers' backward: the last of them to run (a conv
    whose dgrad adds the others' gradients) also takes y's act' and this BN's
    sums in its epilogue and hands back g = dy·act'(y).  bits: y > 0 as the
    apply kernel stored it, a bit a channel (a residual block's relu), which
    is all that dgrad reads of y for act'.  The producing conv
    then finds its BN backward done (coef, dgamma, dbeta on the record) and
    applies it as its dgrad and wgrad load g: no reduction pass over dy."""

    __slots__ = ("raw", "bn", "act", "slope", "batch_stats", "mean", "rstd", "back", "task", "g", "dgamma", "dbeta",
                 "bits", "pending")

    def __init__(self, raw4, bn, act, slope, batch_stats, mean, rstd, conv_bias, bits=None):
        self.raw, self.bn, self.act, self.slope, self.batch_stats = raw4, bn, act, slope, batch_stats
        self.mean, self.rstd, self.back, self.bits = mean, rstd, _Back(conv_bias), bits
        self.task = self.g = self.dgamma = self.dbeta = self.pending = None

    # pending = (center, scale, shift, residual, res_affine, y): y is not written yet.  Its next conv (a 1×1,
    # stride 1) makes it as it loads raw and stores it (conv.BlockInput), instead of an apply kernel here.

    def block_input(self):
        """(the prologue, the conv.BlockInput) for the conv that makes y; y counts as written from then on."""
        center, scale, shift, residual, res_affine, y = self.pending
        self.pending = None
        return (center, scale, shift, self.act, self.slope), _conv.BlockInput(residual, res_affine, rt.as4d(y),
                                                                           self.bits)

    def materialize(self, K):
        """Write y with an apply kernel after all: a consumer that cannot make it came first."""
        center, scale, shift, residual, res_affine, y = self.pending
        self.pending = None
        _norm.channel_affine(_rt, K.channel_affine, self.raw, scale, shift, rt.as4d(y), residual, self.act,
                             self.slope, center=center, res_affine=res_affine, bits=self.bits)

    def bn_grad(self, coef=None):
        """The BN's backward on g (act' already in it)."""
        return _act_free_bn_grad(self.raw, self.mean, self.rstd, self.batch_stats, coef)

    def done_for(self, dy):
        """Did this backward pass's taker produce dy (g, with the sums taken)?"""
        g = self.g
        return (g is not None and self.task == torch._C._current_graph_task_id() and dy.data_ptr() == g.data_ptr()
                and dy.shape == g.shape and dy.stride() == g.stride() and dy.dtype == g.dtype)


class ConvFn(torch.autograd.Function):
    """y = act(BN(conv(x, W) + b) + residual), BN / residual / act optional;
    also linear (a 1×1 conv on [N, F, 1, 1] views).

    spec.defer (a Deferred): return the conv output and leave BN + act to the
    consumer; its backward then receives the gradient of the conv output.
    spec.inp (a Deferred): x is such an output; this conv applies its BN + act
    while loading, and its backward runs that BN's backward (in_weight and
    in_bias are the BN's parameters).  spec.rdef (a Deferred, no act): the
    residual is such an output (a downsample's), normalised by this conv's BN
    apply as it adds it; its backward leaves that BN's coefficients on
    rdef.back (res_weight and res_bias are its parameters)."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, residual, in_weight, in_bias, res_weight, res_bias, spec):
        K, kernel, layer, bn, act, slope, out_shape, defer, inp, rdef, into, leave, made = spec
        linear = isinstance(layer, torch.nn.Linear)
        x4 = rt.as4d(x)
        w4 = weight.view(*weight.shape, 1, 1) if linear else weight
        if linear:
            out = torch.empty(out_shape, device=x.device, dtype=x.dtype)
            kw = {}
        else:
            out = _in_place(into, out_shape, x) if into is not None and defer is None else None
            out = out if out is not None else rt.empty(out_shape, x)
            kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        if inp is not None:
            kw["prologue"] = inp.prologue()
        if made is not None:  # x is a residual block's output, made (and stored) here as it is loaded
            kw["prologue"], kw["block"] = made.block_input()
            x4 = made.raw
        out4, res4 = rt.as4d(out), rt.as4d(residual) if residual is not None else None
        raw = mean = rstd = block = None
        if bn is None:
            rt.tuned.conv2d(_rt, kernel, x4, w4, out4, shift=bias, residual=res4, act=act, slope=slope, **kw)
        else:
            raw = out if defer is not None else rt.empty(out_shape, x)
            raw4 = rt.as4d(raw)
            batch_stats = bn.training or bn.running_mean is None
            partials = None
            if batch_stats:
                _, partials = rt.tuned.conv2d(_rt, kernel, x4, w4, raw4, shift=bias, stats=True,
                                           merge=rt.grid_merge(bn, K.rt), **kw)
            else:
                rt.tuned.conv2d(_rt, kernel, x4, w4, raw4, shift=bias, **kw)
            if defer is not None:
                defer.set_stats(batch_stats, *rt._bn_scale_shift(K, bn, raw4, batch_stats, cache=False,
                                                                 partials=partials))
                defer.back = _Back(layer.bias)
            else:
                # a residual block's output: its act' for the consumers' backward as sign bits (see _BlockOut)
                bits = _norm.relu_bits(out4, act) if residual is not None and not linear else None
                res_affine = (rdef.center, rdef.scale, rdef.shift) if rdef is not None else None
                leave = leave and residual is not None and not linear
                if leave:  # the statistics only: the next conv makes the output as it loads (_BlockOut.pending)
                    scale, shift, center, rstd = rt._bn_scale_shift(
                        K, bn, raw4, batch_stats, cache=False, partials=partials if batch_stats else None)
                    mean = center if batch_stats else bn.running_mean
                else:
                    mean, rstd, batch_stats = _BN.forward(K, bn, raw4, out4, res4, act, slope, partials,
                                                          res_affine=res_affine, bits=bits)
                if not linear:  # for a forked output's last consumer: see _BlockOut
                    block = _BlockOut(raw4, bn, act, slope, batch_stats, mean, rstd, layer.bias, bits)
                    if leave:
                        block.pending = (center, scale, shift, res4, res_affine, out.detach())
                    out._netdsl_block = block
            ctx.stats = batch_stats
        ctx.block = block
        keep_out = act is not None and defer is None
        ctx.save_for_backward(x, weight, out if keep_out else None, raw, mean, rstd,
                              residual if rdef is not None else None)
        # the Deferred holds this Function's output: keep a copy without it
        # (the output on ctx would be a reference cycle through the graph)
        ctx.spec = spec[:7] + (defer.stats_only() if defer is not None else None, inp,
                               rdef.stats_only() if rdef is not None else None)
        ctx.linear = linear
        ctx.forks = (_fork_of(x), _fork_of(residual))
        ctx.concat = getattr(x, "_netdsl_concat", None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        K, kernel, layer, bn, act, slope, _, defer, inp, rdef = ctx.spec
        x, weight, out, raw, mean, rstd, rraw = ctx.saved_tensors
        nx, nw, nb, ngamma, nbeta, nres, nin_w, nin_b, nres_w, nres_b, _ = ctx.needs_input_grad
        dy4 = rt.as4d(dy)
        out4 = rt.as4d(out) if out is not None else None
        dbias = dgamma = dbeta = dres = None
        need_dx = nx or nin_w or nin_b  # a deferred input's BN parameters need dx too
        need_draw = need_dx or nw
        grad_in = None  # a deferred BN's backward, applied as dgrad and wgrad load dy
        wgrad_db = None  # the bias's gradient, summed by the wgrad
        if defer is not None:  # dy is the gradient of the deferred activation, not of this conv's output
            if defer.back.coef is None:
                raise RuntimeError("a deferred batch norm's backward ran before its consumer's")
            grad_in = defer.bn_grad(rt.as4d(raw), defer.back.coef)
            dbias = defer.back.dcbias if nb else None
            defer.back.dcbias = None  # (held here too, AccumulateGrad would copy it)
            draw = dy4
        elif bn is not None and ctx.block is not None and ctx.block.done_for(dy):
            # the last consumer's dgrad took act' and this BN's sums: dy is g
            block, draw = ctx.block, dy4
            grad_in = block.bn_grad(block.back.coef)
            dgamma, dbeta = (block.dgamma, block.dbeta) if ngamma or nbeta else (None, None)
            dbias = block.back.dcbias if nb else None
            dres = dy if nres else None
            # let go of the gradients: AccumulateGrad takes a gradient over (no copy) only if nothing else holds it
            block.g = block.task = block.dgamma = block.dbeta = block.back.dcbias = None
        elif bn is not None:
            draw, grad_in, dgamma, dbeta, dbias = _BN.backward_for_conv(
                K, bn, dy4, out4, rt.as4d(raw), mean, rstd, ctx.stats, act, slope, need_g=need_draw or nres,
                need_affine=ngamma or nbeta, conv_bias=layer.bias if nb else None)
            if nres:  # the residual's gradient is g, before the BN backward
                dres = draw
        elif nres and act is not None:  # the residual's gradient is g = dy·act'(y) itself: one pass writes it
            draw = _grad_like(dy4)
            if nb:  # (and sums it for the bias)
                dbias = torch.empty_like(layer.bias)
                _norm.channel_grad(_rt, K.channel_grad, dy4, y4=out4, act=act, slope=slope, g4=draw, dcbias=dbias)
            else:
                _ew.elementwise(_rt, K.elementwise, 4, dy4, draw, other4=out4, act=act, slope=slope)
        else:  # act' applied as dgrad and wgrad load dy; the bias's sum taken by the wgrad
            draw = dy4
            grad_in = _conv.ActGrad(out4, act, slope) if act is not None else None
            if nb:
                dbias = torch.empty_like(layer.bias)
                if nw:
                    wgrad_db = dbias
                else:  # no wgrad to take it
                    _norm.channel_grad(_rt, K.channel_grad, dy4, y4=out4, act=act, slope=slope, dcbias=dbias)
        if bn is None and nres:
            dres = draw
        bw = _backward_of(kernel)
        w4 = weight.view(*weight.shape, 1, 1) if ctx.linear else weight
        groups = 1 if ctx.linear else layer.groups
        dx = dw = din_w = din_b = None
        # x's deferred BN: its backward's sums in the dgrad's epilogue, its apply left to the producing conv
        pass_back = inp is not None and inp.back is not None
        xfork, rfork = ctx.forks
        sibling = block = merge = grad_out = out_mask = None
        if need_dx:
            dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if ctx.linear else _grad_like(x)
            # a sibling consumer's gradient of x, summed into dx by the dgrad's epilogue (with a deferred
            # input, dx is the activation's gradient at first: the BN backward's apply adds it instead)
            sibling = xfork.take() if xfork is not None and nx and not ctx.linear and inp is None else None
            # with every consumer's gradient of x in, the block that produced x gets its backward's sums here
            block = xfork.block if sibling is not None and xfork.complete() else None
            # (a deferred BN's sums come from the epilogue whoever produced its input: no pass over dx for them;
            # the dgrad's last programs also finish that BN's backward)
            rec = inp if inp is not None else block
            if rec is not None and rt.grid_merge(rec.bn, K.rt) is not None:
                merge = _bn_sums_empty(rec.bn, x, rec.mean, rec.batch_stats, _bias_wanting_grad(rec.back))
            grad_out = inp.bn_grad(rt.as4d(x)) if inp is not None else block.bn_grad() if block is not None else None
            out_mask = (block.bits if block.bits is not None else rt.as4d(x), block.act, block.slope) \
                if block is not None else None
        if nw:
            dw = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
        got = rsums = None
        pointwise = _pointwise(layer, ctx.linear)
        # the deferred shortcut BN's backward sums, over the same gradient (dres is draw): in the dgrad's loads
        res_sums = (rt.as4d(rraw), rdef.mean, rdef.rstd) \
            if rdef is not None and dres is not None and dx is not None and pointwise and not ctx.linear \
            and _conv.same_view(rt.as4d(dres), draw) else None
        if dx is not None or dw is not None:  # both gradients in one launch
            got = rt.tuned.conv2d_backward(
                K.rt, bw.backward, draw, w4, rt.as4d(x), dx=rt.as4d(dx) if dx is not None else None,
                dw=(dw.view(*dw.shape, 1, 1) if ctx.linear else dw) if dw is not None else None, groups=groups,
                prologue=inp.prologue() if inp is not None else None, grad_in=grad_in, grad_out=grad_out,
                residual=sibling, out_mask=out_mask, merge=merge, dbias=wgrad_db, pointwise=pointwise,
                **(dict(res_sums=res_sums) if res_sums is not None else {}))
            if res_sums is not None:
                got, rsums = got
        if need_dx:
            if pass_back:
                din_w, din_b = _deferred_bn_sums(K, inp, rt.as4d(x), got)
            elif block is not None:
                block.dgamma, block.dbeta = _deferred_bn_sums(K, block, block.raw, got)
                block.g, block.task = dx, torch._C._current_graph_task_id()
        if pass_back:  # dx stays the deferred activation's gradient: what the producer expects
            dx = dx if nx else None
            din_w, din_b = (din_w, din_b) if nin_w or nin_b else (None, None)
        elif inp is not None and dx is not None:  # dx so far is the gradient of the deferred activation
            dx, _, din_w, din_b, _ = _BN.backward(
                K, inp.bn, rt.as4d(dx), None, rt.as4d(x), inp.mean, inp.rstd, inp.batch_stats, inp.act, inp.slope,
                need_dx=nx, need_res=False, need_affine=nin_w or nin_b, deferred=inp.recompute(),
                sibling=_sibling_grad(xfork, ctx.concat, x) if nx else None, partials=got)
        if xfork is not None and nx and dx is not None and not pass_back:
            xfork.offer(dx)
        dres_w = dres_b = None
        if rdef is not None and dres is not None:  # dres is the deferred shortcut BN's output gradient
            dres_w, dres_b = _deferred_bn_sums(K, rdef, rt.as4d(rraw), partials=rsums) if rsums is not None \
                else _deferred_bn_sums(K, rdef, rt.as4d(rraw), dy4=rt.as4d(dres))
            dres_w, dres_b = (dres_w, dres_b) if nres_w or nres_b else (None, None)
        if dres is not None and ctx.linear:
            dres = dres.view(dy.shape)
        if dres is not None and rfork is not None:
            rfork.offer(dres)
        return dx, dw, dbias, dgamma, dbeta, dres, din_w, din_b, dres_w, dres_b, None


def _pointwise(layer, linear) -> bool:
    """A 1×1, stride-1, unpadded, ungrouped conv (or a linear, one on a 1×1 image)."""
    return linear or (tuple(layer.kernel_size) == (1, 1) and tuple(layer.stride) == (1, 1)
                      and layer.padding in ((0, 0), "valid", "same") and layer.groups == 1)


def _deferred_bn_sums(K, inp, x4, partials=None, dy4=None):
    """The deferred BN's backward from its dgrad's per-tile sums (or, with
    dy4, from one pass over its output gradient, act-free): its parameters'
    gradients, and (on inp.back) the coefficients of its input gradient and
    the producing conv's bias gradient."""
    back = inp.back
    # (with partials nothing per pixel is read: x4 stands in for dy4's shape)
    back.coef, dgamma, dbeta, back.dcbias = _bn_sums(
        K, inp.bn, dy4 if dy4 is not None else x4, x4, inp.mean, inp.rstd, inp.batch_stats,
        _bias_wanting_grad(back), partials=partials)
    return dgamma, dbeta


def _bias_wanting_grad(back):
    """The producing conv's bias, where a BN backward's reduction must also give its gradient."""
    cb = back.conv_bias if back is not None else None
    return cb if cb is not None and cb.requires_grad else None


class BatchNormFn(torch.autograd.Function):
    """y = act(BN(x) + residual), BatchNorm2d on [N, C, H, W] or BatchNorm1d on [N, F]."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, residual, spec):
        K, bn, act, slope, partials = spec  # partials: x's per-tile sums, from its producer's epilogue
        out = rt.empty(tuple(x.shape), x)
        x4, out4 = rt.as4d(x), rt.as4d(out)
        mean, rstd, batch_stats = _BN.forward(K, bn, x4, out4, rt.as4d(residual) if residual is not None else None,
                                              act, slope, partials, channel_stats=getattr(x, "_netdsl_stats", None))
        ctx.save_for_backward(x, out if act is not None else None, mean, rstd)
        ctx.spec, ctx.stats = spec[:4], batch_stats
        ctx.fork, ctx.concat = _fork_of(x), getattr(x, "_netdsl_concat", None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        K, bn, act, slope = ctx.spec
        x, out, mean, rstd = ctx.saved_tensors
        nx, ngamma, nbeta, nres, _ = ctx.needs_input_grad
        dx, dres, dgamma, dbeta, _ = _BN.backward(
            K, bn, rt.as4d(dy), rt.as4d(out) if out is not None else None, rt.as4d(x), mean, rstd, ctx.stats,
            act, slope, need_dx=nx, need_res=nres, need_affine=ngamma or nbeta,
            sibling=_sibling_grad(ctx.fork, ctx.concat, x) if nx and x.dim() == 4 else None)
        if ctx.fork is not None and dx is not None:
            ctx.fork.offer(dx)
        view = (lambda t: t.view(x.shape) if t is not None else None)
        return view(dx), dgamma, dbeta, view(dres), None


class ConvTransposeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec):
        K, kernel, layer, out_shape = spec
        out = rt.empty(out_shape, x)
        rt.tuned.conv_transpose2d(_rt, kernel, x, weight, out, bias=bias, groups=layer.groups)
        ctx.save_for_backward(x, weight)
        ctx.spec = spec
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        K, kernel, layer, _ = ctx.spec
        x, weight = ctx.saved_tensors
        nx, nw, nb, _ = ctx.needs_input_grad
        bw = _backward_of(kernel)
        dx = dw = db = None
        if nx:  # the adjoint of a transposed conv is the conv with its geometry
            dx = _grad_like(x)
            rt.tuned.conv2d(_rt, bw.dgrad, dy, weight, dx, stride=layer.stride, padding=layer.padding,
                         dilation=layer.dilation, groups=layer.groups)
        if nw:  # roles swap: x plays the conv's output gradient, dy its input
            dw = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
            rt.tuned.conv2d_wgrad(_rt, bw.wgrad, x, dy, dw, groups=layer.groups)
        if nb:
            db = torch.empty_like(layer.bias)
            _norm.channel_grad(_rt, K.channel_grad, dy, dcbias=db)
        return dx, dw, db, None


# ------------------------------------------------------------------ elementwise


class ActivationFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec):
        K, act, slope, bounds = spec
        out = rt.empty(tuple(x.shape), x, channels_last=rt._is_cl(x))
        _ew.elementwise(_rt, K.elementwise, 0, rt.as4d(x), rt.as4d(out), act=act, slope=slope, bounds=bounds)
        ctx.save_for_backward(x if act in FROM_INPUT else out)  # what the derivative is computed from
        ctx.spec = spec
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        K, act, slope, bounds = ctx.spec
        (saved,) = ctx.saved_tensors
        dx = rt.empty(tuple(dy.shape), saved, channels_last=rt._is_cl(saved))
        _ew.elementwise(_rt, K.elementwise, 5 if act in FROM_INPUT else 4, rt.as4d(dy), rt.as4d(dx),
                        other4=rt.as4d(saved), act=act, slope=slope, bounds=bounds)
        return dx, None


class MulFn(torch.autograd.Function):
    """a · b with broadcasting; each factor's gradient is dy times the other,
    summed over the dimensions in which that factor was broadcast."""

    @staticmethod
    def forward(ctx, a, b, K):
        ctx.save_for_backward(a, b)
        ctx.K = K
        return mul(K, a, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        wants = ctx.needs_input_grad
        return (_mul_grad(ctx.K, dy, b, a) if wants[0] else None,
                _mul_grad(ctx.K, dy, a, b) if wants[1] else None, None)


def mul(K, a, b, out=None):
    """out = a · b, of the broadcast shape, in the layout of the full-size factor."""
    shape = tuple(max(x, y) for x, y in zip(a.shape, b.shape))
    if out is None:
        big = a if tuple(a.shape) == shape else b
        out = rt.empty(shape, big, channels_last=rt._is_cl(big))
    o4 = rt.as4d(out)
    _ew.elementwise(_rt, K.elementwise, 6, rt.as4d(a).expand(o4.shape), o4, other4=rt.as4d(b).expand(o4.shape))
    return out


def _mul_grad(K, dy, other, like):
    """The gradient of factor `like` in like · other, from the product's gradient dy."""
    dy4 = rt.as4d(dy)
    dx = rt.empty(tuple(like.shape), like, channels_last=rt._is_cl(like))
    if tuple(like.shape) == tuple(dy.shape):
        _ew.elementwise(_rt, K.elementwise, 6, dy4, rt.as4d(dx), other4=rt.as4d(other).expand(dy4.shape))
    else:
        _ew.mul_grad(_rt, K.mul_grad, dy4, rt.as4d(other).expand(dy4.shape), rt.as4d(dx))
    return dx


class AddFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, spec):
        K, act = spec
        out = rt.empty(tuple(a.shape), a, channels_last=rt._is_cl(a))
        _ew.elementwise(_rt, K.elementwise, 1, rt.as4d(a), rt.as4d(out), other4=rt.as4d(b), act=act)
        ctx.save_for_backward(out if act is not None else None)
        ctx.spec = spec
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        K, act = ctx.spec
        (out,) = ctx.saved_tensors
        g = dy
        if act is not None:
            g = rt.empty(tuple(dy.shape), out, channels_last=rt._is_cl(out))
            _ew.elementwise(_rt, K.elementwise, 4, rt.as4d(dy), rt.as4d(g), other4=rt.as4d(out), act=act)
        return g, g, None


class DropoutFn(torch.autograd.Function):
    """Dropout (op 2) or stochastic depth (ops 7 and 8: by sample, whole batch)."""

    @staticmethod
    def forward(ctx, x, spec):
        K, op, p, seed, offset = spec
        out = rt.empty(tuple(x.shape), x, channels_last=rt._is_cl(x))
        _ew.elementwise(_rt, K.elementwise, op, rt.as4d(x), rt.as4d(out), p=p, seed=seed, offset=offset)
        ctx.spec = spec
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # the same seed and offset draw the same mask
        K, op, p, seed, offset = ctx.spec
        dx = rt.empty(tuple(dy.shape), dy, channels_last=rt._is_cl(dy))
        _ew.elementwise(_rt, K.elementwise, op, rt.as4d(dy), rt.as4d(dx), p=p, seed=seed, offset=offset)
        return dx, None


class FlattenFn(torch.autograd.Function):
    """torch.flatten(x, 1); a copy kernel where x is not NCHW-contiguous.
    Backward: a view of the gradient, or a copy where it is not contiguous."""

    @staticmethod
    def forward(ctx, x, K):
        ctx.shape, ctx.K = tuple(x.shape), K
        if x.is_contiguous():
            return x.view(x.shape[0], -1)
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        rt.copy(K, x, out)
        return out.view(x.shape[0], -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        if dy.is_contiguous():  # an NCHW view of it is the gradient (the layer before reads through strides)
            return dy.view(ctx.shape), None
        dx = torch.empty(ctx.shape, device=dy.device, dtype=dy.dtype)
        rt.copy(ctx.K, rt.as4d(dy), rt.as4d(dx.view(dy.shape)))
        return dx, None


class _ForkPass:
    """What a fork's consumers have done in the current backward pass."""

    __slots__ = ("task", "offered", "absorbed")

    def __init__(self):
        self.task, self.offered, self.absorbed = None, {}, set()

    def current(self):
        # gradients from an earlier pass (one that never reached the fork) must not be taken
        task = torch._C._current_graph_task_id()
        if self.task != task:
            self.task, self.offered, self.absorbed = task, {}, set()
        return self


class _ForkGrads:
    """One alias of a fork.  Its consumer offers the gradient it computed; a
    consumer whose kernel can add a tensor in its epilogue (a conv's dgrad)
    takes a sibling's offered gradient and returns the sum, so ForkFn need
    not add them: one launch and one pass over the gradient fewer."""

    __slots__ = ("index", "state", "n", "block")

    def __init__(self, index, state, n, block):
        self.index, self.state, self.n, self.block = index, state, n, block

    def complete(self):
        """Are all the siblings' gradients absorbed into this alias's (it runs last)?"""
        absorbed = self.state.current().absorbed
        return len(absorbed) == self.n - 1 and self.index not in absorbed

    def offer(self, g):
        """This alias's gradient (only read from now on)."""
        self.state.current().offered[self.index] = g

    def offers(self):
        """The siblings' offered gradients not absorbed yet: [(alias, gradient)]."""
        st = self.state.current()
        return [(i, g) for i, g in st.offered.items() if i != self.index and i not in st.absorbed]

    def absorb(self, i):
        """Alias i's gradient is now part of another's: ForkFn does not add it again."""
        self.state.current().absorbed.add(i)

    def take(self):
        """A sibling's offered gradient to add into this alias's, or None."""
        for i, g in self.offers():
            self.absorb(i)
            return g
        return None


def _sibling_grad(fork, concat, x):
    """x's gradient from its other consumers, for a kernel to add into x's own
    (or None): a fork sibling's offer; or, where x is a concatenation of forked
    tensors (a dense block's features), a later concatenation's gradient
    whose first channels line up with every one of x's parts (each part was
    offered a slice of it), taken as one tensor and absorbed part by part."""
    if fork is not None:
        return fork.take()
    if concat is None:
        return None
    base, picks = None, []
    for part, c0, c1 in concat:
        if part is None:
            return None
        found = None
        for i, g in part.offers():
            b = g._base
            if b is None or b.dim() != 4 or b.shape[1] < x.shape[1] or b.shape[0] != x.shape[0] \
                    or b.shape[2:] != x.shape[2:] or g.stride() != b.stride() or g.shape[1] != c1 - c0 \
                    or g.storage_offset() != b.storage_offset() + c0 * b.stride(1) \
                    or (base is not None and b is not base):
                continue
            found = (i, b)
            break
        if found is None:
            return None
        base = found[1]
        picks.append((part, found[0]))
    for part, i in picks:
        part.absorb(i)
    return base[:, 0:x.shape[1]]


def _fork_of(t):
    return getattr(t, "_netdsl_fork", None)


class ForkFn(torch.autograd.Function):
    """One tensor for several consumers (a residual block's input, inception
    branches, dense-block features): backward sums their gradients with the
    add kernel, so autograd's engine never sums gradients with torch ops.
    Each alias carries a _ForkGrads: a consumer conv adds a sibling's
    gradient in its dgrad epilogue, and that sibling's is not summed again."""

    @staticmethod
    def forward(ctx, x, K, n):
        ctx.set_materialize_grads(False)  # an unused alias gives None, not a zero-filled tensor
        ctx.K = K
        ctx.state = _ForkPass()
        outs = tuple(x.view_as(x) for _ in range(n))
        block = getattr(x, "_netdsl_block", None)
        for i, o in enumerate(outs):
            o._netdsl_fork = _ForkGrads(i, ctx.state, n, block)
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        absorbed = ctx.state.current().absorbed
        ctx.state.__init__()  # drop the offered gradients; a second pass (retain_graph) starts afresh
        live = [g for i, g in enumerate(grads) if g is not None and i not in absorbed]
        if not live:
            return None, None, None
        total = live[0]
        for g in live[1:]:
            total = _sum(ctx.K, total, g)
        return total, None, None


def _sum(K, a, b):
    """a + b, a fresh tensor in a's layout (a forked tensor's gradients)."""
    out = rt.empty(tuple(a.shape), a, channels_last=rt._is_cl(a))
    _ew.elementwise(_rt, K.elementwise, 1, rt.as4d(a), rt.as4d(out), other4=rt.as4d(b))
    return out


class CastFn(torch.autograd.Function):
    """A dtype cast by the copy kernel (autocast); backward casts the gradient back."""

    @staticmethod
    def forward(ctx, t, spec):
        K, dtype = spec
        out = torch.empty_like(t, dtype=dtype)
        rt.copy(K, _as4(t), _as4(out))
        ctx.K, ctx.dtype = K, t.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        dx = torch.empty_like(dy, dtype=ctx.dtype)
        rt.copy(ctx.K, _as4(dy), _as4(dx))
        return dx, None


def _as4(t):
    """Any tensor of up to 4 dims as [N, C, H, W] (a bias [C] as [1, C, 1, 1])."""
    while t.dim() < 4:
        t = t.unsqueeze(0) if t.dim() == 1 else t.unsqueeze(-1)
    return t


class ConcatFn(torch.autograd.Function):
    """torch.cat(xs, 1) by copy kernels; its backward is free: channel slices.

    Into a dense block's buffer (spec's into), the concatenations of a block
    share one buffer: each is its first channels, and copies only the
    features not there yet, so a block of L layers copies L features, not
    L²/2, and keeps one buffer for backward, not L.  Into an inception's
    buffer, each branch whose last kernel is a conv stored its output there
    already (see _in_place): only the others are copied."""

    @staticmethod
    def forward(ctx, spec, *xs):
        K, into = spec
        N, _, H, W = xs[0].shape
        total = sum(x.shape[1] for x in xs)
        if into is not None and (into.dtype != xs[0].dtype or into.device != xs[0].device):
            into = None  # (autocast: the parts are in the convs' dtype, the buffer in the input's)
        if into is None:
            buf, filled = rt.concat_buffer(xs[0], total, H, W), {}
        else:
            buf = rt.channel_range(into, 0, total)
            filled = into.__dict__.setdefault("_netdsl_filled", {})  # channels → the tensor copied there
        c0 = 0
        ctx.bounds = []
        for x in xs:
            c1 = c0 + x.shape[1]
            key, src = (c0, c1), (x.data_ptr(), x._version, tuple(x.shape), x.stride())
            dst = buf[:, c0:c1]
            in_place = x.data_ptr() == dst.data_ptr() and x.stride() == dst.stride() and x.dtype == dst.dtype
            if filled.get(key) != src and not in_place:  # (a branch's last conv stored it there: see _in_place)
                rt.copy(K, x, dst)
                filled[key] = src
            ctx.bounds.append((_fork_of(x), c0, c1))
            c0 = c1
        buf._netdsl_concat = ctx.bounds  # for its consumer's backward: see _sibling_grad
        if into is not None:  # its BNs share the per-channel batch statistics: see rt.ChannelStats
            if getattr(into, "_netdsl_stats", None) is None:
                into._netdsl_stats = rt.ChannelStats(into)
            buf._netdsl_stats = into._netdsl_stats
        return buf

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        grads = tuple(dy[:, c0:c1] for _, c0, c1 in ctx.bounds)
        for (fork, _, _), g in zip(ctx.bounds, grads):
            if fork is not None:  # an earlier dense layer's BN backward can add it, with its neighbours, in one go
                fork.offer(g)
        return (None, *grads)


# ------------------------------------------------------------------ pooling, resampling, normalization


class PoolFn(torch.autograd.Function):
    """Max or average pooling.  spec.inp (a Deferred a conv produced): x is
    that conv's output, whose BN + act this pool applies as it loads (a
    stem's conv→BN→ReLU→maxpool: the activation is never written); its
    backward hands back the activation's gradient, takes the BN backward's
    sums in its epilogue and leaves the coefficients on inp.back for the
    producing conv's dgrad and wgrad to apply (in_weight and in_bias are the
    BN's parameters)."""

    @staticmethod
    def forward(ctx, x, in_weight, in_bias, spec):
        kernel, is_max, out_shape, taps, K, inp = spec
        out = rt.empty(out_shape, x)
        idx = None
        if is_max:
            idx = torch.empty(out_shape, device=x.device, dtype=torch.int8 if taps <= 127 else torch.int32,
                              memory_format=torch.channels_last)
        _pool.pool2d(_rt, kernel, x, out, idx=idx, prologue=inp.prologue() if inp is not None else None)
        ctx.save_for_backward(idx, x if inp is not None else None)
        # (the Deferred holds x, an output of the graph: keep a copy without it)
        ctx.spec = spec[:5] + (inp.stats_only() if inp is not None else None,)
        ctx.shape, ctx.fork = tuple(x.shape), _fork_of(x)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        kernel, K, inp = ctx.spec[0], ctx.spec[4], ctx.spec[5]
        idx, raw = ctx.saved_tensors
        dx = rt.empty(ctx.shape, dy)
        grad_out = merge = None
        if inp is not None:
            grad_out = inp.bn_grad(rt.as4d(raw))
            if rt.grid_merge(inp.bn, K.rt) is not None:
                merge = _bn_sums_empty(inp.bn, raw, inp.mean, inp.batch_stats, _bias_wanting_grad(inp.back))
        got = _pool.pool2d_backward(_rt, _backward_of(kernel).backward, dy, idx, dx, grad_out=grad_out, merge=merge)
        din_w = din_b = None
        if inp is not None:  # dx stays the deferred activation's gradient: what the producer expects
            din_w, din_b = _deferred_bn_sums(K, inp, rt.as4d(raw), got)
            _, nin_w, nin_b, _ = ctx.needs_input_grad
            din_w, din_b = (din_w, din_b) if nin_w or nin_b else (None, None)
        if ctx.fork is not None:  # an inception branch: a sibling conv's dgrad can add it
            ctx.fork.offer(dx)
        return dx, din_w, din_b, None


class AdaptiveAvgPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec):
        K, out_shape = spec
        out = rt.empty(out_shape, x)
        _pool.adaptive_avgpool2d(_rt, K.adaptive_avgpool, x, out)
        ctx.spec, ctx.shape = spec, tuple(x.shape)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        K, _ = ctx.spec
        dx = rt.empty(ctx.shape, dy)
        _pool.adaptive_avgpool2d_backward(_rt, K.adaptive_avgpool_backward, dy, dx)
        return dx, None


class UpsampleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec):
        kernel, scale, align, bilinear, out_shape = spec
        out = rt.empty(out_shape, x)
        _pool.upsample2d(_rt, kernel, x, out, scale, align)
        ctx.spec, ctx.shape = spec, tuple(x.shape)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        kernel, scale, align, bilinear, _ = ctx.spec
        dx = rt.empty(ctx.shape, dy)
        _pool.upsample2d_backward(_rt, _backward_of(kernel).backward, dy, dx, scale, align, bilinear)
        return dx, None


class LRNFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec):
        kernel, layer = spec
        out = rt.empty(tuple(x.shape), x)
        _norm.lrn(_rt, kernel, x, out, layer.alpha, layer.beta, layer.k)
        ctx.save_for_backward(x)
        ctx.spec = spec
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        kernel, layer = ctx.spec
        (x,) = ctx.saved_tensors
        dx = _grad_like(x)
        _norm.lrn_backward(_rt, _backward_of(kernel).backward, x, dy, dx, layer.alpha, layer.beta, layer.k)
        return dx, None


class SoftmaxFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, K):
        out = rt.empty(tuple(x.shape), x, channels_last=rt._is_cl(x))
        _norm.softmax(_rt, K.softmax, rt.as4d(x), rt.as4d(out))
        ctx.save_for_backward(out)
        ctx.K = K
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (out,) = ctx.saved_tensors
        dx = rt.empty(tuple(dy.shape), out, channels_last=rt._is_cl(out))
        _norm.softmax_backward(_rt, ctx.K.softmax_backward, rt.as4d(out), rt.as4d(dy), rt.as4d(dx))
        return dx, None


class DepthwiseFn(torch.autograd.Function):
    """A depthwise conv (+ bias) by the direct kernel; keeps its input and
    weight.  With stats, it also returns the per-tile sums of its output its
    epilogue left for the batch norm after it (psum, pm2: no gradient flows
    through them).  Backward: the direct input-gradient kernel, and the
    weight and bias gradients' partial sums and their in-order sum."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec):
        K, kernel, shape, stats = spec
        out = rt.empty(shape, x)
        partials = _dw.depthwise2d(_rt, kernel, x, weight, out, shift=bias, stats=stats)
        ctx.save_for_backward(x, weight)
        ctx.spec, ctx.has_bias = spec, bias is not None
        if not stats:
            return out
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*partials[:2])
        return out, *partials  # (the tile, a number, passes through as it is)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *_):
        x, weight = ctx.saved_tensors
        K, kernel, _, _ = ctx.spec
        if dy is None:  # (the output went unused)
            return None, None, None, None
        bw = _backward_of(kernel)
        wants = ctx.needs_input_grad
        dx = dw = db = None
        if wants[0]:
            dx = rt.empty(tuple(x.shape), dy)
            _dw.depthwise2d_dgrad(_rt, bw.dgrad, dy, weight, dx)
        if wants[1] or wants[2]:
            dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
            db = torch.empty((weight.shape[0],), device=dy.device, dtype=weight.dtype) if ctx.has_bias else None
            _dw.depthwise2d_wgrad(_rt, bw.wgrad, K.depthwise_wgrad_sum, x, dy, dw, db)
        return dx, dw if wants[1] else None, db if wants[2] else None, None


class LayerNormFn(torch.autograd.Function):
    """Layer norm over channels; keeps its input and each pixel's mean and rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec):
        K, eps = spec
        out = rt.empty(tuple(x.shape), x, channels_last=rt._is_cl(x))
        x4 = rt.as4d(x)
        M = x4.shape[0] * x4.shape[2] * x4.shape[3]
        mean, rstd = (rt.stat_empty(M, x) for _ in range(2))
        _ln.layernorm(_rt, K.layernorm, x4, weight, bias, rt.as4d(out), eps, mean, rstd)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.K = K
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        K = ctx.K
        dx = rt.empty(tuple(x.shape), x, channels_last=rt._is_cl(x))
        dw = db = None
        if weight is not None:
            dw, db = torch.empty_like(weight), torch.empty_like(weight)
        _ln.layernorm_backward(_rt, K.layernorm_backward, K.layernorm_param_grad, rt.as4d(x), rt.as4d(dy), weight,
                               mean, rstd, rt.as4d(dx), dw, db)
        wants = ctx.needs_input_grad
        return dx if wants[0] else None, dw if wants[1] else None, db if wants[2] else None, None


class ChannelsFn(torch.autograd.Function):
    """x[:, start:stop], a view; its gradient is dy placed in those channels, zeros elsewhere (one kernel)."""

    @staticmethod
    def forward(ctx, x, spec):
        K, start, stop = spec
        ctx.spec, ctx.shape, ctx.cl = spec, tuple(x.shape), rt._is_cl(x)
        return x[:, start:stop]

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        K, start, stop = ctx.spec
        dx = rt.empty(ctx.shape, dy, channels_last=ctx.cl)
        _ew.elementwise(_rt, K.elementwise, 10, dy, dx, k0=start, k1=stop)
        return dx, None


class SplitChannelsFn(torch.autograd.Function):
    """Disjoint channel ranges of x, views.  Backward: one tensor with each
    range's gradient copied into its channels (the first range's by the kernel
    that also writes zeros everywhere else, where the ranges leave channels
    out or a range got no gradient)."""

    @staticmethod
    def forward(ctx, x, spec):
        K, ranges = spec
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.shape, ctx.cl = spec, tuple(x.shape), rt._is_cl(x)
        return tuple(x[:, a:b] for a, b in ranges)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        K, ranges = ctx.spec
        got = [(r, g) for r, g in zip(ranges, grads) if g is not None]
        if not got:
            return None, None
        dx = rt.empty(ctx.shape, got[0][1], channels_last=ctx.cl)
        covered = sum(b - a for (a, b), _ in got) == ctx.shape[1]
        for i, ((a, b), g) in enumerate(got):
            if i == 0 and not covered:
                _ew.elementwise(_rt, K.elementwise, 10, g, dx, k0=a, k1=b)
            else:
                rt.copy(K, g, dx[:, a:b])
        return dx, None


def channel_shuffle(K, x, groups, out=None):
    """torchvision's channel_shuffle: out's channel j·groups + i is x's channel i·C/groups + j."""
    if out is None:
        out = rt.empty(tuple(x.shape), x, channels_last=rt._is_cl(x))
    _ew.elementwise(_rt, K.elementwise, 9, x, out, k0=groups)
    return out


class ChannelShuffleFn(torch.autograd.Function):
    """Its gradient is the inverse shuffle: a shuffle in C/groups groups."""

    @staticmethod
    def forward(ctx, x, spec):
        K, groups = spec
        ctx.spec = spec
        return channel_shuffle(K, x, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        K, groups = ctx.spec
        return channel_shuffle(K, dy, dy.shape[1] // groups), None


class GroupNormFn(torch.autograd.Function):
    """Group norm; keeps its input and each (sample, group)'s mean and rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec):
        K, groups, eps = spec
        out = rt.empty(tuple(x.shape), x, channels_last=rt._is_cl(x))
        mean, rstd = (rt.stat_empty(x.shape[0] * groups, x) for _ in range(2))
        _gn.groupnorm(_rt, K.groupnorm, rt.as4d(x), weight, bias, rt.as4d(out), groups, eps, mean, rstd)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.spec = spec
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        K, groups, _ = ctx.spec
        dx = rt.empty(tuple(x.shape), x, channels_last=rt._is_cl(x))
        dw = db = None
        if weight is not None:
            dw, db = torch.empty_like(weight), torch.empty_like(weight)
        _gn.groupnorm_backward(_rt, K.groupnorm_backward, K.layernorm_param_grad, rt.as4d(x), rt.as4d(dy), weight,
                               mean, rstd, rt.as4d(dx), groups, dw, db)
        wants = ctx.needs_input_grad
        return dx if wants[0] else None, dw if wants[1] else None, db if wants[2] else None, None
