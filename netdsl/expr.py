"""Evaluating spec expressions: integer/float/bool/string arithmetic, lists,
indexing and a few functions.  Nothing a spec says is ever run as Python."""
from __future__ import annotations

import math
import operator

from . import ir
from .diagnostics import Pos, did_you_mean
from .ops import show


class EvalError(Exception):
    def __init__(self, pos: Pos, message: str):
        super().__init__(message)
        self.pos = pos
        self.message = message


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
          "//": operator.floordiv, "%": operator.mod, "**": operator.pow}
_ORDER = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}

# Results larger than this are surely a mistake (and would make shape arithmetic crawl).
_LIMIT = 1 << 62


def evaluate(e: ir.Expr, env: dict):
    if isinstance(e, ir.Const):
        return e.value
    if isinstance(e, ir.Name):
        if e.id not in env:
            raise EvalError(e.pos, f"unknown name '{e.id}'{did_you_mean(e.id, env)}")
        return env[e.id]
    if isinstance(e, ir.TupleExpr):
        return tuple(evaluate(x, env) for x in e.items)
    if isinstance(e, ir.ListExpr):
        return [evaluate(x, env) for x in e.items]
    if isinstance(e, ir.Unary):
        v = evaluate(e.operand, env)
        if e.op == "not":
            return not _bool(v, e.operand.pos, "operand of 'not'")
        if not _num(v):
            raise EvalError(e.pos, f"cannot negate {show(v)}")
        return -v
    if isinstance(e, ir.Binary):
        return _binary(e, env)
    if isinstance(e, ir.Index):
        base, idx = evaluate(e.base, env), evaluate(e.index, env)
        if not isinstance(base, (list, tuple, str)):
            raise EvalError(e.base.pos, f"cannot index {show(base)}")
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise EvalError(e.index.pos, f"an index must be an integer, got {show(idx)}")
        if not -len(base) <= idx < len(base):
            raise EvalError(e.index.pos, f"index {idx} is out of range for a list of length {len(base)}")
        return base[idx]
    if isinstance(e, ir.Func):
        return _func(e, [evaluate(a, env) for a in e.args])
    raise EvalError(getattr(e, "pos", None), "not an expression")


def _bool(v, pos, what):
    if not isinstance(v, bool):
        raise EvalError(pos, f"{what} must be true or false, got {show(v)}")
    return v


def _binary(e: ir.Binary, env):
    if e.op in ("and", "or"):
        left = _bool(evaluate(e.left, env), e.left.pos, f"operand of '{e.op}'")
        if (e.op == "and" and not left) or (e.op == "or" and left):
            return left
        return _bool(evaluate(e.right, env), e.right.pos, f"operand of '{e.op}'")
    a, b = evaluate(e.left, env), evaluate(e.right, env)
    if e.op == "==":
        return a == b
    if e.op == "!=":
        return a != b
    if e.op in _ORDER:
        if not (_num(a) and _num(b)):
            raise EvalError(e.pos, f"cannot compare {show(a)} {e.op} {show(b)}")
        return _ORDER[e.op](a, b)
    if e.op == "+" and isinstance(a, list) and isinstance(b, list):
        return a + b
    if e.op == "*" and isinstance(a, list) and isinstance(b, int) and not isinstance(b, bool):
        return a * b
    if not (_num(a) and _num(b)):
        raise EvalError(e.pos, f"cannot apply '{e.op}' to {show(a)} and {show(b)}")
    if e.op in ("/", "//", "%") and b == 0:
        raise EvalError(e.right.pos, "division by zero")
    if e.op == "**" and (abs(b) > 64 or (b < 0 and a == 0)):
        raise EvalError(e.pos, f"exponent {show(b)} is out of range")
    v = _ARITH[e.op](a, b)
    if _num(v) and abs(v) > _LIMIT:
        raise EvalError(e.pos, f"value {v:g} is too large")
    return v


def _func(e: ir.Func, args):
    n = e.name
    if n == "len":
        if len(args) != 1 or not isinstance(args[0], (list, tuple, str)):
            raise EvalError(e.pos, "len() takes one list")
        return len(args[0])
    if n in ("min", "max"):
        vals = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        if not vals or not all(_num(v) for v in vals):
            raise EvalError(e.pos, f"{n}() takes numbers")
        return (min if n == "min" else max)(vals)
    if n in ("int", "float", "ceil", "floor"):
        if len(args) != 1 or not _num(args[0]):
            raise EvalError(e.pos, f"{n}() takes one number")
        if n in ("ceil", "floor"):
            return math.ceil(args[0]) if n == "ceil" else math.floor(args[0])
        return int(args[0]) if n == "int" else float(args[0])
    if n == "range":
        if not 1 <= len(args) <= 3 or not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            raise EvalError(e.pos, "range() takes one to three integers")
        r = range(*args)
        if len(r) > 100_000:
            raise EvalError(e.pos, f"range of {len(r)} items is too long")
        return list(r)
    if n == "type":
        if len(args) != 1:
            raise EvalError(e.pos, "type() takes one value")
        v = args[0]
        return "bool" if isinstance(v, bool) else type(v).__name__
    raise EvalError(e.pos, f"unknown function '{n}'{did_you_mean(n, FUNCTIONS)}")


FUNCTIONS = ("len", "min", "max", "int", "float", "ceil", "floor", "range", "type")
