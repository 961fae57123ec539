"""The netdsl IR: frozen dataclasses with source positions.

Two levels share this module:
- the *spec* level, built straight from the parse tree (expressions, items,
  blocks, nets), still parametric;
- the *graph* level, produced by elaboration: concrete layers (`Layer`) with
  dotted names, arranged in sequences (`Seq`), parallel joins (`Join`) and
  dense blocks (`Dense`).  Shape inference fills in shapes and counts; the
  fusion pass groups layers into kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from .diagnostics import Pos

# ---------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Const:
    value: Any  # int, float, bool or str
    pos: Pos


@dataclass(frozen=True)
class Name:
    id: str
    pos: Pos


@dataclass(frozen=True)
class Unary:
    op: str  # "-", "not"
    operand: "Expr"
    pos: Pos


@dataclass(frozen=True)
class Binary:
    op: str  # + - * / // % ** == != < <= > >= and or
    left: "Expr"
    right: "Expr"
    pos: Pos


@dataclass(frozen=True)
class TupleExpr:
    items: tuple["Expr", ...]
    pos: Pos


@dataclass(frozen=True)
class ListExpr:
    items: tuple["Expr", ...]
    pos: Pos


@dataclass(frozen=True)
class Index:
    base: "Expr"
    index: "Expr"
    pos: Pos


@dataclass(frozen=True)
class Func:
    name: str  # len, min, max, int, float
    args: tuple["Expr", ...]
    pos: Pos


Expr = Union[Const, Name, Unary, Binary, TupleExpr, ListExpr, Index, Func]

# ---------------------------------------------------------------- spec items


@dataclass(frozen=True)
class Label:
    """`name:` before an item; parts are literal text or `{expr}` pieces."""

    parts: tuple[Union[str, Expr], ...]
    pos: Pos


@dataclass(frozen=True)
class Arg:
    name: str | None  # None for positional
    value: Expr
    pos: Pos


@dataclass(frozen=True)
class Call:
    """A builtin layer (`conv(64, 3)`) or a block instance (`ResBlk(64, 128)`)."""

    name: str
    args: tuple[Arg, ...]
    label: Label | None
    pos: Pos


@dataclass(frozen=True)
class Group:
    body: tuple["Stmt", ...]
    label: Label | None
    pos: Pos


@dataclass(frozen=True)
class Repeat:
    """`repeat n { }` (var None) or `for v in iterable { }`."""

    var: str | None
    iterable: Expr
    body: tuple["Stmt", ...]
    label: Label | None
    pos: Pos


@dataclass(frozen=True)
class If:
    cond: Expr
    then: tuple["Stmt", ...]
    orelse: tuple["Stmt", ...]
    label: Label | None
    pos: Pos


@dataclass(frozen=True)
class Residual:
    """body(x) + shortcut(x); the shortcut is the identity when absent or empty."""

    body: tuple["Stmt", ...]
    shortcut: "Item | None"
    label: Label | None
    pos: Pos


@dataclass(frozen=True)
class Branches:
    """`concat { }` / `add { }` / `mul { }`: every statement is a branch fed the same input."""

    kind: str  # "concat" | "add" | "mul"
    body: tuple["Stmt", ...]
    label: Label | None
    pos: Pos


@dataclass(frozen=True)
class DenseItem:
    """`dense { }`: each statement sees the concatenation of all earlier outputs."""

    body: tuple["Stmt", ...]
    label: Label | None
    pos: Pos


@dataclass(frozen=True)
class Read:
    """`@name` starting a line: the tensor named there, in place of what the chain carried."""

    tensor: Label  # the name after '@', with its {expr} parts
    label: Label | None
    pos: Pos


@dataclass(frozen=True)
class Write:
    """`as @name`: names the tensor the chain carries at that point (which goes on unchanged)."""

    tensor: Label
    label: Label | None
    pos: Pos


Item = Union[Call, Group, Repeat, If, Residual, Branches, DenseItem, Read, Write]


@dataclass(frozen=True)
class Chain:
    items: tuple[Item, ...]
    pos: Pos


@dataclass(frozen=True)
class Assign:
    name: str
    value: Expr
    pos: Pos


@dataclass(frozen=True)
class Output:
    key: str | None  # a dict key, or None in a tuple
    tensor: Label
    pos: Pos
    training: bool = False  # `@aux if training`: returned in training mode only


@dataclass(frozen=True)
class Return:
    """`return @a, @b` or `return "0": @a, ...`: a network's outputs (a tuple, or a dict with keys)."""

    outputs: tuple[Output, ...]
    pos: Pos


Stmt = Union[Chain, Assign, Return]


@dataclass(frozen=True)
class Param:
    name: str
    default: Expr | None
    pos: Pos


@dataclass(frozen=True)
class BlockDef:
    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt, ...]
    pos: Pos


@dataclass(frozen=True)
class NetDef:
    """A network: parameters, an input shape (C, H, W or F), and a body.

    `alias` is set for `net X input(...) = Block(args)`: the block's layers are
    laid out at the root (no name prefix), so templates like ResNet(...) serve
    several networks."""

    name: str
    params: tuple[Param, ...]
    input: tuple[Arg, ...]
    body: tuple[Stmt, ...]
    alias: Call | None
    pos: Pos


@dataclass(frozen=True)
class Import:
    path: str
    pos: Pos


@dataclass(frozen=True)
class Program:
    """One parsed file, with the blocks of its imports merged in."""

    file: str
    imports: tuple[Import, ...]
    blocks: tuple[BlockDef, ...]
    nets: tuple[NetDef, ...]
    sources: dict = field(default_factory=dict, compare=False, hash=False)

    def block(self, name: str) -> BlockDef | None:
        for b in self.blocks:
            if b.name == name:
                return b
        return None

    def net(self, name: str) -> NetDef | None:
        for n in self.nets:
            if n.name == name:
                return n
        return None


# ---------------------------------------------------------------- graph level

Shape = tuple  # (C, H, W) or (F,); an entry is None where an error made it unknown


@dataclass(frozen=True)
class Tensor:
    """A parameter or buffer a layer owns, relative to the layer's name."""

    suffix: str  # "weight", "running_mean", ...; "" for a bare parameter (the layer's name is its key)
    shape: tuple[int, ...]
    kind: str  # "param", "frozen" (param with requires_grad False), "buffer"

    def key(self, layer: str) -> str:
        """Its state_dict key, for the layer named layer."""
        return f"{layer}.{self.suffix}" if self.suffix else layer


@dataclass(frozen=True)
class Layer:
    name: str  # dotted module path, e.g. "layer1.0.conv1"
    op: str  # builtin op name, e.g. "conv"
    attrs: dict = field(hash=False)
    pos: Pos
    trace: tuple = ()  # (call site, block name) of enclosing block instances, outermost first
    in_shape: Shape | None = None
    out_shape: Shape | None = None
    tensors: tuple[Tensor, ...] = ()
    params: int = 0
    macs: int = 0


@dataclass(frozen=True)
class Seq:
    items: tuple["Node", ...]
    in_shape: Shape | None = None
    out_shape: Shape | None = None


@dataclass(frozen=True)
class Join:
    """Parallel branches fed the same input, joined by "add", "mul" (with
    broadcasting: squeeze-and-excitation's x · gate(x)), "concat" or
    "residual" (an add whose second branch is the shortcut, empty = identity).

    `fused` (set by the fusion pass): the add happens in the epilogue of the
    body's last kernel, which then takes the shortcut as its residual input."""

    kind: str
    branches: tuple[Seq, ...]
    name: str  # scope the join lives in (for tables and kernel names)
    pos: Pos
    trace: tuple = ()
    in_shape: Shape | None = None
    out_shape: Shape | None = None
    fused: bool = False


@dataclass(frozen=True)
class Dense:
    """DenseNet block: step k sees concat(input, out_0, ..., out_{k-1})."""

    steps: tuple[Seq, ...]
    name: str
    pos: Pos
    trace: tuple = ()
    in_shape: Shape | None = None
    out_shape: Shape | None = None


@dataclass(frozen=True)
class Fused:
    """Several layers run as one kernel (or one conv + its BN statistics in
    training): `conv`/`linear` with an optional BN and activation, or a
    standalone `bn` with an activation.  `residual`: the epilogue also adds the
    enclosing residual's shortcut before the activation."""

    kind: str  # "conv" | "linear" | "bn"
    layers: tuple[Layer, ...]  # the main layer, then its BN if any
    act: Layer | None = None
    residual: bool = False

    @property
    def main(self) -> Layer:
        return self.layers[0]

    @property
    def bn(self) -> Layer | None:
        return next((l for l in self.layers if l.op == "bn"), None) if self.kind != "bn" else self.layers[0]

    @property
    def in_shape(self):
        return self.layers[0].in_shape

    @property
    def out_shape(self):
        return self.layers[-1].out_shape if self.act is None else self.act.out_shape

    @property
    def pos(self):
        return self.layers[0].pos

    def describe(self) -> str:
        ops = ["linear" if l.attrs.get("pixel_linear") else l.op for l in self.layers]  # (a per-pixel linear)
        parts = ops + (["add"] if self.residual else []) + ([self.act.op] if self.act else [])
        return "_".join(parts)


Node = Union[Layer, Seq, Join, Dense, Fused]


@dataclass(frozen=True)
class NetOutput:
    """One of a network's outputs: a named tensor, under a dict key or at its place in a tuple."""

    key: str | None
    tensor: str
    pos: Pos
    training: bool = False  # returned, and computed, in training mode only (Inception's auxiliary head)


@dataclass(frozen=True)
class Net:
    """`outputs`: a NetOutput each for a network that returns named tensors
    (`return ...`); () returns what its body ends with.
    `tensors`: each named tensor's shape, filled in by shape inference."""

    name: str
    input_shape: Shape
    body: Seq
    pos: Pos
    params: dict = field(hash=False, default_factory=dict)  # resolved net parameters
    outputs: tuple = ()
    tensors: dict = field(hash=False, default_factory=dict, compare=False)

    @property
    def out_shape(self):
        """The shape of its only output, or of its first."""
        return self.output_shapes[0][1]

    @property
    def output_shapes(self) -> list:
        """(key, shape) for each output: key is None for its body's result or a tuple's item."""
        if not self.outputs:
            return [(None, self.body.out_shape)]
        return [(o.key, self.tensors.get(o.tensor)) for o in self.outputs]


def children(node: Node) -> tuple:
    """The sub-nodes of a Seq, Join or Dense, in execution order; () for a layer or kernel."""
    if isinstance(node, Seq):
        return node.items
    if isinstance(node, Join):
        return node.branches
    if isinstance(node, Dense):
        return node.steps
    return ()


def walk_layers(node: Node):
    """Every Layer under node, in execution order."""
    if isinstance(node, Layer):
        yield node
    elif isinstance(node, Fused):
        yield from node.layers
        if node.act is not None:
            yield node.act
    for child in children(node):
        yield from walk_layers(child)
