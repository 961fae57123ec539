"""Elaboration: spec IR -> graph IR for one network.

Evaluates parameters and expressions, instantiates blocks, unrolls `repeat` /
`for`, picks `if` branches, and gives every layer its dotted module name:
`name:` labels a layer or group, unlabeled items are numbered by position like
nn.Sequential.  A labeled item (or a block instance) opens a name scope;
unlabeled groups, loops and ifs are transparent.

The pass is pure: it reads the Program and returns a `Net` (or None when the
net could not be set up at all), appending problems to `diags`.
"""
from __future__ import annotations

import re

from . import ir
from .diagnostics import Diagnostics, Pos, did_you_mean
from .expr import EvalError, evaluate
from .ops import OPS, REQUIRED, ArgError, TensorSize, show, stateless

_COMPONENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*|[0-9]+")
_TENSOR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Blocks may recurse (pix2pix's UnetSkipConnectionBlock, a U-Net written as
# the block it is), each level choosing with `if` whether to go deeper; a
# chain of block calls deeper than this is an error, not a hang.
MAX_DEPTH = 64


class _TooDeep(Exception):
    """Block calls nested past MAX_DEPTH: ends the network's elaboration (a
    recursion that branches would otherwise report the same error at every
    leaf of an exponential tree)."""

    def __init__(self, pos, message, trace):
        super().__init__(message)
        self.pos, self.message, self.trace = pos, message, trace


def _chain(names) -> str:
    """A call chain, its middle elided: A -> B -> A -> ... -> B -> A."""
    names = list(names)
    shown = names if len(names) <= 8 else names[:4] + ["..."] + names[-3:]
    return " -> ".join(shown)

# ------------------------------------------------------------------ static checks


def _calls(stmts):
    """Every Call inside a body, through all nested items and both if-branches."""
    for st in stmts:
        if isinstance(st, ir.Chain):
            for it in st.items:
                yield from _item_calls(it)


def _item_calls(it):
    if isinstance(it, ir.Call):
        yield it
    elif isinstance(it, ir.If):
        yield from _calls(it.then)
        yield from _calls(it.orelse)
    elif isinstance(it, ir.Residual):
        yield from _calls(it.body)
        if it.shortcut is not None:
            yield from _item_calls(it.shortcut)
    elif isinstance(it, (ir.Group, ir.Repeat, ir.Branches, ir.DenseItem)):
        yield from _calls(it.body)


def check_program(prog: ir.Program, diags: Diagnostics) -> None:
    """File-wide checks: duplicate definitions, unknown layers and blocks.
    (A block may call itself, directly or through others: elaboration
    bounds the depth, MAX_DEPTH.)"""
    seen: dict[str, ir.Pos] = {}
    for d in (*prog.blocks, *prog.nets):
        if d.name in OPS:
            diags.error(d.pos, f"'{d.name}' is a builtin layer and cannot be redefined")
        elif d.name in seen and d.pos.file == prog.file:
            diags.error(d.pos, f"'{d.name}' is already defined at {seen[d.name]}")
        seen.setdefault(d.name, d.pos)
    blocks = {b.name: b for b in prog.blocks}
    known = list(OPS) + list(blocks)
    bodies = [(b.name, b.body) for b in prog.blocks]
    bodies += [(n.name, n.body + ((ir.Chain((n.alias,), n.pos),) if n.alias else ())) for n in prog.nets]
    for _, body in bodies:
        for c in _calls(body):
            if c.name not in OPS and c.name not in blocks:
                diags.error(c.pos, f"unknown layer or block '{c.name}'{did_you_mean(c.name, known)}")


# ------------------------------------------------------------------ scopes


class _Scope:
    """A module path prefix with nn.Sequential-style numbering of its slots."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.count = 0
        self.taken: dict[str, tuple[str, Pos]] = {}

    def full(self, local: str) -> str:
        return f"{self.prefix}.{local}" if self.prefix else local

    def slot(self, label: str | None, kind: str, pos: Pos, diags: Diagnostics, trace) -> str:
        local = label if label is not None else str(self.count)
        self.count += 1
        prev = self.taken.get(local)
        if prev is not None and not (prev[0] == kind and stateless(kind)):
            diags.error(pos, f"name '{self.full(local)}' is already used by the item at {prev[1]}", _notes(trace))
        self.taken.setdefault(local, (kind, pos))
        return self.full(local)


def _label_pos(it) -> Pos:
    return it.label.pos if it.label is not None else it.pos


def _notes(trace):
    return tuple((p, f"in block '{name}' used here") for p, name in reversed(trace))


# ------------------------------------------------------------------ elaboration


class _Elaborator:
    def __init__(self, prog: ir.Program, diags: Diagnostics):
        self.prog = prog
        self.blocks = {b.name: b for b in prog.blocks}
        self.diags = diags
        # named tensors (`as @name`): one namespace a network, blocks included
        self.tensors: dict[str, Pos] = {}
        self.hidden: set = set()  # named in a residual's body, while its shortcut (which runs first) elaborates

    # -- helpers
    def err(self, pos, msg, trace):
        self.diags.error(pos, msg, _notes(trace))

    def label(self, label: ir.Label | None, env) -> str | None:
        if label is None:
            return None
        text = ""
        for part in label.parts:
            if isinstance(part, str):
                text += part
            else:
                v = evaluate(part, env)
                if isinstance(v, bool) or not isinstance(v, (int, str)):
                    raise EvalError(part.pos, f"a label part must be an integer or a string, got {show(v)}")
                text += str(v)
        if not all(_COMPONENT.fullmatch(c) for c in text.split(".")):
            raise EvalError(label.pos, f"'{text}' is not a valid layer name (letters, digits, '_' and '-', "
                                       "dotted parts)")
        return text

    def tensor_name(self, label: ir.Label, env) -> str:
        text = "".join(p if isinstance(p, str) else str(self._part(p, env)) for p in label.parts)
        if not _TENSOR.fullmatch(text):
            raise EvalError(label.pos, f"'@{text}' is not a valid tensor name (letters, digits and '_')")
        return text

    @staticmethod
    def _part(part, env):
        v = evaluate(part, env)
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise EvalError(part.pos, f"a name part must be an integer or a string, got {show(v)}")
        return v

    def read(self, label: ir.Label, env, trace) -> str:
        """The name of a tensor read at label, which must be written before."""
        name = self.tensor_name(label, env)
        if name in self.hidden:
            raise EvalError(label.pos, f"@{name} is named in this residual's body, which runs after its shortcut")
        if name not in self.tensors:
            raise EvalError(label.pos, f"@{name} is read before it is written (`as @{name}` names a tensor)"
                                       f"{did_you_mean(name, list(self.tensors))}")
        return name

    def bind(self, params, args, what: str, env):
        """Match call arguments to parameters: positional first, then keywords."""
        values: dict = {}
        names = [p.name for p in params]
        positional = [a for a in args if a.name is None]
        if any(a.name is None for a in args[len(positional):]):
            bad = next(a for a in args[len(positional):] if a.name is None)
            raise EvalError(bad.pos, "a positional argument cannot follow a keyword argument")
        if len(positional) > len(params):
            raise EvalError(positional[len(params)].pos,
                            f"{what} takes at most {len(params)} positional argument{'s' if len(params) != 1 else ''}, got {len(positional)}")
        for p, a in zip(params, positional):
            values[p.name] = (evaluate(a.value, env), a.value.pos)
        for a in args[len(positional):]:
            if a.name not in names:
                raise EvalError(a.pos, f"{what} has no argument '{a.name}'{did_you_mean(a.name, names)}")
            if a.name in values:
                raise EvalError(a.pos, f"{what} got argument '{a.name}' twice")
            if isinstance(a.value, ir.Read):  # `upsample(size=@c2)`: that tensor's height and width
                if (what, a.name) != ("upsample", "size"):
                    raise EvalError(a.value.pos, f"{what}'s {a.name} cannot be a tensor; only upsample(size=@name) "
                                                 "takes one")
                values[a.name] = (TensorSize(self.read(a.value.tensor, env, ())), a.value.pos)
                continue
            values[a.name] = (evaluate(a.value, env), a.value.pos)
        return values

    # -- nets
    def net(self, nd: ir.NetDef, overrides: dict, input_override) -> ir.Net | None:
        env: dict = {}
        trace: tuple = ()
        try:
            for p in nd.params:
                if p.name in overrides:
                    v = overrides[p.name]
                    if p.default is not None:
                        d = evaluate(p.default, env)
                        if type(d) is not type(v) and not (isinstance(d, float) and isinstance(v, int)):
                            raise EvalError(p.pos, f"--set {p.name}={show(v)} does not match the parameter's type (default {show(d)})")
                    env[p.name] = v
                elif p.default is None:
                    raise EvalError(p.pos, f"network '{nd.name}' needs a value for '{p.name}' (use --set {p.name}=...)")
                else:
                    env[p.name] = evaluate(p.default, env)
            if input_override is not None:
                shape = tuple(input_override)
            else:
                if any(a.name is not None for a in nd.input):
                    raise EvalError(nd.pos, "input() takes positional sizes: input(C, H, W) or input(F)")
                shape = tuple(evaluate(a.value, env) for a in nd.input)
            if len(shape) not in (1, 3) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
                raise EvalError(nd.input[0].pos if nd.input else nd.pos,
                                f"the input must be C, H, W or F positive integers, got {show(shape)}")
        except EvalError as e:
            self.err(e.pos, e.message, trace)
            return None
        scope = _Scope("")
        if nd.alias is not None and nd.alias.name not in self.blocks:
            if nd.alias.name in OPS:
                self.err(nd.alias.pos, f"`net {nd.name} ... = {nd.alias.name}(...)` needs a block, not a builtin layer; "
                                       "write the layer in a body instead", trace)
            return None  # an unknown name is reported by check_program
        body, ret = nd.body, None
        if body and isinstance(body[-1], ir.Return):
            body, ret = body[:-1], body[-1]
        try:
            if nd.alias is not None:
                nodes = self.block_call(nd.alias, env, scope, trace, inline=True)
            else:
                nodes = self.stmts(body, env, scope, trace)
        except EvalError as e:  # (the alias's own arguments: a body reports its errors where they are)
            self.err(e.pos, e.message, trace)
            return None
        except _TooDeep as e:
            self.err(e.pos, e.message, e.trace)
            return None
        outputs = self.outputs(ret, env) if ret is not None else ()
        return ir.Net(nd.name, shape, ir.Seq(tuple(nodes)), nd.pos, dict(env), outputs)

    def outputs(self, ret: ir.Return, env) -> tuple:
        keyed = [o.key is not None for o in ret.outputs]
        if any(keyed) and not all(keyed):
            self.err(ret.pos, "give every output a key (`return \"a\": @x, \"b\": @y`) or none", ())
            return ()
        out, keys = [], {}
        for o in ret.outputs:
            try:
                name = self.read(o.tensor, env, ())
            except EvalError as e:
                self.err(e.pos, e.message, ())
                continue
            if o.key is not None and o.key in keys:
                self.err(o.pos, f"output key \"{o.key}\" is already used at {keys[o.key]}", ())
                continue
            keys[o.key] = o.pos
            out.append(ir.NetOutput(o.key, name, o.pos, o.training))
        if out and all(o.training for o in out):
            self.err(ret.pos, "a network needs an output outside training mode", ())
            return ()
        return tuple(out)

    # -- bodies
    def stmts(self, body, env, scope, trace) -> list:
        out = []
        for st in body:
            if isinstance(st, ir.Assign):
                try:
                    env[st.name] = evaluate(st.value, env)
                except EvalError as e:
                    self.err(e.pos, e.message, trace)
                    env[st.name] = None
                continue
            if isinstance(st, ir.Return):
                self.err(st.pos, "`return` ends a network's body: it cannot stand in a block or a group, "
                                 "or before other lines", trace)
                continue
            for i, it in enumerate(st.items):
                if isinstance(it, ir.Read) and i > 0:
                    self.err(it.pos, "a read of a named tensor must start a line: here it would drop the tensor "
                                     "the chain carries", trace)
                out += self.item(it, env, scope, trace)
        return out

    def item(self, it, env, scope: _Scope, trace) -> list:
        try:
            label = self.label(it.label, env)
            if isinstance(it, ir.Call):
                if it.name in self.blocks:
                    return self.block_call(it, env, scope, trace, label=label)
                if it.name not in OPS:  # reported once by check_program
                    return [self.poison(it, scope, trace)]
                return [self.layer(it, env, scope, trace, label)]
            if isinstance(it, ir.Group):
                return self.stmts(it.body, env, self.sub(scope, label, "group", _label_pos(it), trace), trace)
            if isinstance(it, ir.Repeat):
                return self.repeat(it, env, scope, trace, label)
            if isinstance(it, ir.If):
                chosen = it.then if self.condition(it, env) else it.orelse
                if not chosen:
                    return []
                return self.stmts(chosen, env, self.sub(scope, label, "group", _label_pos(it), trace), trace)
            if isinstance(it, (ir.Read, ir.Write)):
                if it.label is not None:
                    raise EvalError(it.label.pos, "a named tensor takes no label: it is not a layer")
                return [self.named(it, env, trace)]
            if isinstance(it, ir.Residual):
                inner = self.sub(scope, label, "group", _label_pos(it), trace)
                before = set(self.tensors)
                body = self.stmts(it.body, env, inner, trace)
                hidden, self.hidden = self.hidden, self.hidden | (set(self.tensors) - before)
                try:
                    short = self.item(it.shortcut, env, inner, trace) if it.shortcut is not None else []
                finally:
                    self.hidden = hidden
                return [ir.Join("residual", (ir.Seq(tuple(body)), ir.Seq(tuple(short))), inner.prefix, it.pos, trace)]
            if isinstance(it, ir.Branches):
                inner = self.sub(scope, label, "group", _label_pos(it), trace)
                branches = self.branches(it.body, env, inner, trace)
                least = 1 if it.kind == "concat" else 2
                if len(branches) < least:
                    raise EvalError(it.pos, f"{it.kind} needs at least {least} branches, one per line")
                return [ir.Join(it.kind, tuple(branches), inner.prefix, it.pos, trace)]
            if isinstance(it, ir.DenseItem):
                inner = self.sub(scope, label, "group", _label_pos(it), trace)
                steps = self.branches(it.body, env, inner, trace)
                return [ir.Dense(tuple(steps), inner.prefix, it.pos, trace)]
        except EvalError as e:
            self.err(e.pos, e.message, trace)
            return [self.poison(it, scope, trace)]
        raise AssertionError(f"unhandled item {type(it).__name__}")

    def named(self, it, env, trace) -> ir.Layer:
        """A read (`@name`) or a write (`as @name`) of a named tensor, as a layer that owns nothing."""
        if isinstance(it, ir.Read):
            name = self.read(it.tensor, env, trace)
            return ir.Layer(f"@{name}", "read", {"tensor": name}, it.pos, trace)
        name = self.tensor_name(it.tensor, env)
        if name in self.tensors:
            raise EvalError(it.tensor.pos, f"@{name} is already named at {self.tensors[name]} (a network's tensor "
                                           "names are one namespace: give it an {expr} part to tell copies apart)")
        self.tensors[name] = it.tensor.pos
        return ir.Layer(f"@{name}", "name", {"tensor": name}, it.pos, trace)

    def poison(self, it, scope, trace) -> ir.Layer:
        """Stands in for an item that had an error: its output shape is unknown,
        so nothing after it reports a consequential error."""
        return ir.Layer(scope.full("?"), "unknown", {}, it.pos, trace)

    def sub(self, scope, label, kind, pos, trace) -> _Scope:
        if label is None:
            return scope
        return _Scope(scope.slot(label, kind, pos, self.diags, trace))

    def branches(self, body, env, scope, trace) -> list:
        """One Seq per statement of `concat`/`add`/`dense`, after unrolling:
        an unlabeled for/repeat/if/group standing alone on a line contributes
        one branch per statement of its body (so `for` can make dense layers)."""
        out = []
        for st in body:
            if isinstance(st, ir.Assign):
                self.stmts((st,), env, scope, trace)
                continue
            it = st.items[0] if len(st.items) == 1 else None
            if it is not None and it.label is None and isinstance(it, (ir.Repeat, ir.If, ir.Group)):
                try:
                    out += self.unrolled(it, env, scope, trace)
                except EvalError as e:
                    self.err(e.pos, e.message, trace)
                continue
            out.append(ir.Seq(tuple(self.stmts((st,), env, scope, trace))))
        return out

    def unrolled(self, it, env, scope, trace) -> list:
        if isinstance(it, ir.Group):
            return self.branches(it.body, env, scope, trace)
        if isinstance(it, ir.If):
            return self.branches(it.then if self.condition(it, env) else it.orelse, env, scope, trace)
        out = []
        for v in self.iteration(it, env):
            if it.var is not None:
                env[it.var] = v
            out += self.branches(it.body, env, scope, trace)
        return out

    def condition(self, it: ir.If, env) -> bool:
        cond = evaluate(it.cond, env)
        if not isinstance(cond, bool):
            raise EvalError(it.cond.pos, f"an if condition must be true or false, got {show(cond)}")
        return cond

    def iteration(self, it: ir.Repeat, env) -> list:
        n = evaluate(it.iterable, env)
        if it.var is None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise EvalError(it.iterable.pos, f"repeat needs a count >= 0, got {show(n)}")
            return [None] * n
        if not isinstance(n, (list, tuple)):
            raise EvalError(it.iterable.pos, f"for needs a list or range(...), got {show(n)}")
        return list(n)

    def repeat(self, it: ir.Repeat, env, scope, trace, label) -> list:
        values = self.iteration(it, env)
        inner = self.sub(scope, label, "group", _label_pos(it), trace)
        out = []
        for v in values:
            if it.var is not None:
                env[it.var] = v
            out += self.stmts(it.body, env, inner, trace)
        return out

    # -- layers and blocks
    def layer(self, call: ir.Call, env, scope, trace, label) -> ir.Layer:
        spec = OPS[call.name]
        given = self.bind(spec.params, call.args, call.name, env)
        attrs = {}
        weight_given = "weight" in given
        for p in spec.params:
            if p.name in given:
                value, vpos = given[p.name]
                try:
                    attrs[p.name] = p.check(value, f"{call.name}'s {p.name}")
                except ArgError as e:
                    raise EvalError(vpos, str(e)) from None
            elif p.default is REQUIRED:
                if call.name == "conv" and weight_given and p.name in ("out_channels", "kernel_size"):
                    attrs[p.name] = None
                    continue
                raise EvalError(call.pos, f"{call.name} is missing its required argument '{p.name}'")
            else:
                attrs[p.name] = p.check(p.default, p.name) if p.default is not None else None
        if call.name == "conv" and weight_given and ("out_channels" in given or "kernel_size" in given):
            raise EvalError(call.pos, "a conv with literal weights takes its channels and kernel size from them; drop out_channels and kernel_size")
        if call.name == "conv" and attrs["weight"] is not None:
            w = attrs["weight"]
            if attrs["scale"] != 1.0:
                w = {"shape": w["shape"], "values": tuple(v * attrs["scale"] for v in w["values"])}
            attrs["weight"] = w
            attrs["bias"] = False
        op = call.name
        if op == "frozen_bn":  # the kernels run it as a batch norm that never leaves eval mode
            op, attrs = "bn", dict(attrs, momentum=0.0, affine=True, track_running_stats=True, frozen=True)
        if op == "linear" and attrs["over"] == "channels":  # each pixel's: the kernels run it as a 1×1 conv
            op, attrs = "conv", dict(out_channels=attrs["out_features"], kernel_size=(1, 1), stride=(1, 1),
                                     padding=(0, 0), dilation=(1, 1), groups=1, bias=attrs["bias"],
                                     in_channels=attrs["in_features"], weight=None, scale=1.0, pixel_linear=True)
        name = scope.slot(label, op, _label_pos(call), self.diags, trace)
        return ir.Layer(name, op, attrs, call.pos, trace)

    def block_call(self, call: ir.Call, env, scope, trace, label=None, inline=False) -> list:
        block = self.blocks[call.name]
        if len(trace) >= MAX_DEPTH:
            chain = _chain([name for _, name in trace] + [block.name])
            # at the call that went too deep, with a note at the network's first call (not 64 of them)
            raise _TooDeep(call.pos, f"block calls nest deeper than {MAX_DEPTH}: {chain} "
                                     f"(a recursive block needs an `if` that stops it)", trace[:1])
        given = self.bind(block.params, call.args, f"block '{block.name}'", env)
        benv: dict = {}
        for p in block.params:
            if p.name in given:
                benv[p.name] = given[p.name][0]
            elif p.default is not None:
                benv[p.name] = evaluate(p.default, benv)
            else:
                raise EvalError(call.pos, f"block '{block.name}' is missing its required argument '{p.name}'")
        inner = scope if inline else _Scope(scope.slot(label, "block", _label_pos(call), self.diags, trace))
        return self.stmts(block.body, benv, inner, trace + ((call.pos, block.name),))


def elaborate(prog: ir.Program, net: str, diags: Diagnostics, overrides: dict | None = None,
              input_shape=None) -> ir.Net | None:
    """Program + network name -> graph IR (unchecked shapes)."""
    nd = prog.net(net)
    if nd is None:
        raise KeyError(net)
    return _Elaborator(prog, diags).net(nd, dict(overrides or {}), input_shape)
