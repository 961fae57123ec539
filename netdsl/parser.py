"""Parse netdsl source text straight into the spec-level IR.

`parse(text, file)` returns a `Program` or raises `NetdslError` with a located
syntax error.  `load(path)` also follows `import "other.net"` and merges the
imported blocks.
"""
from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

import lark
from lark import Lark, Token, Transformer, v_args

from . import ir
from .diagnostics import Diagnostic, Diagnostics, NetdslError, Pos

# ------------------------------------------------------------------ grammar


def grammar_path() -> Path:
    """grammars/netdsl.lark of a source checkout, else the copy installed with the package."""
    here = Path(__file__).resolve().parent.parent / "grammars" / "netdsl.lark"
    if here.is_file():
        return here
    return Path(str(resources.files("netdsl.grammars").joinpath("netdsl.lark")))


class _Layout:
    """Drop line breaks inside (...) and [...], so argument lists can span lines."""

    always_accept = ("_NL",)

    def process(self, stream):
        depth = 0
        for tok in stream:
            kind = tok.type
            if kind in ("LPAR", "LSQB"):
                depth += 1
            elif kind in ("RPAR", "RSQB"):
                depth = max(0, depth - 1)
            elif kind == "_NL" and depth:
                continue
            yield tok


@functools.lru_cache(maxsize=None)
def _lark() -> Lark:
    return Lark(
        grammar_path().read_text(),
        parser="lalr",
        lexer="contextual",
        postlex=_Layout(),
        propagate_positions=True,
        maybe_placeholders=True,
        cache=_cache_file(),
    )


def _cache_file():
    # Lark's cache keys on the grammar text; a per-user file keeps start-up fast
    # (`netdsl check` is meant to answer in well under half a second).
    try:
        d = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "netdsl"
        d.mkdir(parents=True, exist_ok=True)
        return str(d / f"grammar-lark{lark.__version__}.cache")
    except OSError:
        return False


# ------------------------------------------------------------------ tree -> IR


def _pos(file, meta) -> Pos:
    if getattr(meta, "empty", True):
        return Pos(file, 0, 0)
    return Pos(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _tpos(file, tok: Token) -> Pos:
    return Pos(file, tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + len(tok))


def _label_parts(text: str, file: str, pos: Pos) -> tuple:
    """Split `denselayer{i + 1}` into ("denselayer", <expr i + 1>)."""
    parts, rest, col = [], text, pos.col
    while "{" in rest:
        head, rest = rest.split("{", 1)
        inner, rest = rest.split("}", 1)
        if head:
            parts.append(head)
        col += len(head) + 1
        sub = _parse_fragment(inner, file, Pos(file, pos.line, col))
        parts.append(sub)
        col += len(inner) + 1
    if rest:
        parts.append(rest)
    return tuple(parts)


def _parse_fragment(text: str, file: str, at: Pos) -> ir.Expr:
    """Parse the expression inside a label's braces, positions shifted to `at`."""
    src = "net _ input(" + text + ") { }"
    try:
        prog = _Builder(file).transform(_lark().parse(src))
    except (lark.exceptions.UnexpectedInput, lark.exceptions.VisitError):
        raise NetdslError([Diagnostic(at, f"bad expression in label: '{{{text}}}'")])
    expr = prog.nets[0].input[0].value
    if len(prog.nets[0].input) != 1:
        raise NetdslError([Diagnostic(at, f"bad expression in label: '{{{text}}}'")])
    return _shift(expr, at)


def _shift(e, at: Pos):
    """Move positions of a fragment parsed on its own line to where it stands."""
    import dataclasses

    def fix(p: Pos) -> Pos:
        off = len("net _ input(")
        return Pos(at.file, at.line, at.col + p.col - 1 - off, at.line, at.col + p.end_col - 1 - off)

    changes = {}
    for f in dataclasses.fields(e):
        v = getattr(e, f.name)
        if isinstance(v, Pos):
            changes[f.name] = fix(v)
        elif isinstance(v, tuple):
            changes[f.name] = tuple(_shift(x, at) if dataclasses.is_dataclass(x) else x for x in v)
        elif dataclasses.is_dataclass(v):
            changes[f.name] = _shift(v, at)
    return dataclasses.replace(e, **changes)


def _number(text: str):
    if any(c in text for c in ".eE"):
        return float(text)
    return int(text)


@v_args(inline=True, meta=True)
class _Builder(Transformer):
    """Lark parse tree -> spec IR.  Method names are the grammar's aliases."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _p(self, meta):
        return _pos(self.file, meta)

    # -- top level
    def start(self, meta, *defs):
        imports = tuple(d for d in defs if isinstance(d, ir.Import))
        blocks = tuple(d for d in defs if isinstance(d, ir.BlockDef))
        nets = tuple(d for d in defs if isinstance(d, ir.NetDef))
        return ir.Program(self.file, imports, blocks, nets)

    def import_(self, meta, path):
        return ir.Import(path[1:-1], self._p(meta))

    def block_def(self, meta, name, params, body):
        return ir.BlockDef(str(name), params or (), body, _tpos(self.file, name))

    def net_def(self, meta, name, params, args, body):
        alias = body if isinstance(body, ir.Call) else None
        stmts = () if alias else body
        return ir.NetDef(str(name), params or (), args, stmts, alias, _tpos(self.file, name))

    def net_alias(self, meta, call):
        return call

    def params(self, meta, *ps):
        return tuple(ps)

    def param(self, meta, name, default):
        return ir.Param(str(name), default, _tpos(self.file, name))

    def body(self, meta, *stmts):
        return tuple(s for s in stmts if s is not None)

    def assign(self, meta, name, value):
        return ir.Assign(str(name), value, _tpos(self.file, name))

    def chain(self, meta, *items):
        return ir.Chain(tuple(items), self._p(meta))

    def label(self, meta, tok):
        pos = _tpos(self.file, tok)
        return ir.Label(_label_parts(str(tok), self.file, pos), pos)

    def item(self, meta, label, atom):
        import dataclasses

        return dataclasses.replace(atom, label=label) if label is not None else atom

    # -- items (label filled in by `item`)
    def call(self, meta, name, args):
        return ir.Call(str(name), args or (), None, _call_pos(self.file, name, meta))

    def group(self, meta, body):
        return ir.Group(body, None, self._p(meta))

    def repeat(self, meta, count, body):
        return ir.Repeat(None, count, body, None, self._p(meta))

    def for_(self, meta, var, iterable, body):
        return ir.Repeat(str(var), iterable, body, None, self._p(meta))

    def if_(self, meta, cond, then, orelse):
        if isinstance(orelse, ir.If):
            orelse = (ir.Chain((orelse,), orelse.pos),)
        return ir.If(cond, then, orelse or (), None, self._p(meta))

    def residual(self, meta, body, shortcut):
        return ir.Residual(body, shortcut, None, self._p(meta))

    def concat(self, meta, body):
        return ir.Branches("concat", body, None, self._p(meta))

    def add(self, meta, body):
        return ir.Branches("add", body, None, self._p(meta))

    def mul(self, meta, body):
        return ir.Branches("mul", body, None, self._p(meta))

    def dense(self, meta, body):
        return ir.DenseItem(body, None, self._p(meta))

    def args(self, meta, *items):
        return tuple(a if isinstance(a, ir.Arg) else ir.Arg(None, a, a.pos) for a in items)

    def kwarg(self, meta, name, value):
        return ir.Arg(str(name), value, _tpos(self.file, name))

    def kwarg_tensor(self, meta, name, tok):  # `upsample(size=@c2)`: a tensor's size
        return ir.Arg(str(name), ir.Read(self._tensor(tok), None, _tpos(self.file, tok)), _tpos(self.file, name))

    # -- named tensors
    def _tensor(self, tok) -> ir.Label:
        pos = _tpos(self.file, tok)
        after = Pos(self.file, pos.line, pos.col + 1, pos.end_line, pos.end_col)
        return ir.Label(_label_parts(str(tok)[1:], self.file, after), pos)

    def read(self, meta, tok):
        return ir.Read(self._tensor(tok), None, _tpos(self.file, tok))

    def write(self, meta, tok):
        return ir.Write(self._tensor(tok), None, self._p(meta))

    def return_(self, meta, *outputs):
        return ir.Return(tuple(outputs), self._p(meta))

    def output(self, meta, key, tok, training):
        return ir.Output(None if key is None else str(key)[1:-1], self._tensor(tok), _tpos(self.file, key or tok),
                         bool(training))

    def training(self, meta):
        return True

    # -- expressions
    def number(self, meta, tok):
        return ir.Const(_number(str(tok)), _tpos(self.file, tok))

    def string(self, meta, tok):
        return ir.Const(str(tok)[1:-1], _tpos(self.file, tok))

    def true(self, meta):
        return ir.Const(True, self._p(meta))

    def false(self, meta):
        return ir.Const(False, self._p(meta))

    def name(self, meta, tok):
        return ir.Name(str(tok), _tpos(self.file, tok))

    def tuple_(self, meta, *items):
        return ir.TupleExpr(tuple(i for i in items if i is not None), self._p(meta))

    def list_(self, meta, *items):
        return ir.ListExpr(tuple(i for i in items if i is not None), self._p(meta))

    def index(self, meta, base, idx):
        return ir.Index(base, idx, self._p(meta))

    def func(self, meta, name, *args):
        return ir.Func(str(name), tuple(a for a in args if a is not None), self._p(meta))

    def neg(self, meta, operand):
        return ir.Unary("-", operand, self._p(meta))

    def not_op(self, meta, operand):
        return ir.Unary("not", operand, self._p(meta))

    def binary(self, meta, *children):
        # children: e0 OP e1 OP e2 ..., folded to the left
        acc = children[0]
        for i in range(1, len(children), 2):
            acc = ir.Binary(str(children[i]), acc, children[i + 1], self._p(meta))
        return acc

    def compare_op(self, meta, left, op=None, right=None):
        if op is None:
            return left
        return ir.Binary(str(op), left, right, self._p(meta))

    def power_op(self, meta, base, op=None, exp=None):
        if exp is None:
            return base
        return ir.Binary("**", base, exp, self._p(meta))

    def or_op(self, meta, *xs):
        acc = xs[0]
        for x in xs[1:]:
            acc = ir.Binary("or", acc, x, self._p(meta))
        return acc

    def and_op(self, meta, *xs):
        acc = xs[0]
        for x in xs[1:]:
            acc = ir.Binary("and", acc, x, self._p(meta))
        return acc


def _call_pos(file, name_tok, meta) -> Pos:
    p = _pos(file, meta)
    return Pos(file, name_tok.line, name_tok.column, p.end_line or name_tok.line, p.end_col or name_tok.end_column)


# ------------------------------------------------------------------ syntax errors

_TERMINAL_WORDS = {
    "NAME": "a name", "LABEL": "a label", "NUMBER": "a number", "STRING": "a string",
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'", "RBRACE": "'}'",
    "COMMA": "','", "EQUAL": "'='", "COLON": "':'", "_ARROW": "'->'", "_NL": "a new line",
    "COMP_OP": "a comparison", "ADD_OP": "'+' or '-'", "MUL_OP": "'*', '/', '//' or '%'",
    "MINUS": "'-'", "PLUS": "'+'", "$END": "the end of the file", "POW_OP": "'**'",
}

# Common mistakes, matched by example (Lark's match_examples), with the sentence to show.
_EXAMPLES = {
    "a layer is missing '->' or a line break before the next layer": [
        "net N input(1, 2, 3) { relu relu }",
        "net N input(1, 2, 3) { conv(1, 3) relu }",
    ],
    "a network needs its input shape: write `net Name input(C, H, W) { ... }`": [
        "net N { relu }",
        "net N(a = 1) { relu }",
    ],
    "an argument list is missing a ')' or a ','": [
        "net N input(1, 2, 3) { conv(1, 3 }",
        "net N input(1, 2, 3) { conv(1 3) }",
    ],
    "a '{' has no matching '}'": [
        "net N input(1, 2, 3) { relu",
        "net N input(1, 2, 3) { relu\n",
        "block B() { relu",
        "block B() { relu\n",
        "block B() {\n",
    ],
}


def _describe(tok) -> str:
    if tok is None or tok.type == "$END":
        return "end of file"
    if tok.type == "_NL":
        return "the end of the line" if "\n" in tok else "';'"
    return f"'{tok}'"


def _syntax_error(e: lark.exceptions.UnexpectedInput, text: str, file: str) -> Diagnostic:
    hint = None
    if isinstance(e, lark.exceptions.UnexpectedToken):
        try:
            hint = e.match_examples(_lark().parse, _EXAMPLES, use_accepts=True)
        except Exception:  # match_examples re-parses; it must never mask the real error
            hint = None
        tok = e.token
        line, col = tok.line, tok.column
        if not isinstance(line, int) or line < 1:  # end of input
            lines = text.splitlines() or [""]
            line, col = len(lines), len(lines[-1]) + 1
        expected = set(e.expected)
        if e.interactive_parser is not None:  # the lexer's set also holds always-accepted tokens
            try:
                expected = set(e.interactive_parser.accepts()) or expected
            except Exception:
                pass
        words = sorted({_TERMINAL_WORDS.get(t, f"'{t.lower()}'" if t.isupper() else t) for t in expected})
        listed = ", ".join(words[:8]) + (", ..." if len(words) > 8 else "")
        msg = f"unexpected {_describe(tok)}; expected {listed}"
        if tok.type == "$END" and "RBRACE" in expected:
            msg, hint = "unexpected end of file: a '{' has no matching '}'", None
    elif isinstance(e, lark.exceptions.UnexpectedCharacters):
        line, col = e.line, e.column
        msg = f"unexpected character '{e.char}'"
    else:
        line, col = getattr(e, "line", 1), getattr(e, "column", 1)
        msg = "unexpected end of the file"
    if hint:
        msg = f"{msg} ({hint})"
    return Diagnostic(Pos(file, line, col), "syntax error: " + msg)


# ------------------------------------------------------------------ entry points


def parse(text: str, file: str = "<string>") -> ir.Program:
    """Source text -> Program (imports not yet followed)."""
    try:
        tree = _lark().parse(text)
        prog = _Builder(file).transform(tree)
    except lark.exceptions.UnexpectedInput as e:
        raise NetdslError([_syntax_error(e, text, file)], {file: text}) from None
    except lark.exceptions.VisitError as e:
        if isinstance(e.orig_exc, NetdslError):
            raise NetdslError(e.orig_exc.diagnostics, {file: text}) from None
        raise
    return ir.Program(prog.file, prog.imports, prog.blocks, prog.nets, {file: text})


def parse_file(path: str | os.PathLike) -> ir.Program:
    path = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise NetdslError([Diagnostic(Pos(path, 0, 0), f"cannot read file: {e.strerror}")]) from None
    return parse(text, path)


def load(path: str | os.PathLike) -> ir.Program:
    """Parse a file and follow its imports; imported blocks become visible."""
    return _load(str(path), ())


def load_text(text: str, file: str = "<string>") -> ir.Program:
    return _resolve_imports(parse(text, file), ())


def _load(path: str, stack: tuple[str, ...]) -> ir.Program:
    return _resolve_imports(parse_file(path), stack + (os.path.abspath(path),))


def _resolve_imports(prog: ir.Program, stack: tuple[str, ...]) -> ir.Program:
    diags = Diagnostics()
    sources = dict(prog.sources)
    blocks = list(prog.blocks)
    base = os.path.dirname(prog.file) if os.path.exists(prog.file) else "."
    for imp in prog.imports:
        target = os.path.normpath(os.path.join(base, imp.path))
        if os.path.abspath(target) in stack:
            diags.error(imp.pos, f"import cycle: '{imp.path}' imports this file back")
            continue
        if not os.path.isfile(target):
            diags.error(imp.pos, f"cannot import '{imp.path}': no such file")
            continue
        try:
            sub = _load(target, stack)
        except NetdslError as e:
            sources.update(e.sources)
            for d in e.diagnostics:
                diags.error(d.pos, d.message, d.notes)
            continue
        sources.update(sub.sources)
        known = {b.name for b in blocks}
        blocks.extend(b for b in sub.blocks if b.name not in known)
    if diags:
        raise NetdslError(diags.items, sources)
    return ir.Program(prog.file, prog.imports, tuple(blocks), prog.nets, sources)
