"""The pipeline, one pass per line.

    text --parse--> Program --check_program--> (errors)
         --elaborate--> Net (layers, names) --infer_shapes--> Net (shapes, counts)

Every pass is a pure function from IR to IR; problems are collected in one
`Diagnostics` so a run reports all independent errors of a file.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import ir
from .diagnostics import Diagnostic, Diagnostics, NetdslError, Pos, did_you_mean
from .elaborate import check_program, elaborate
from .parser import load, load_text
from .shapes import infer_shapes


@dataclass
class Checked:
    program: ir.Program
    nets: list[ir.Net] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.diagnostics

    @property
    def sources(self) -> dict:
        return self.program.sources


def networks(prog: ir.Program) -> list[str]:
    return [n.name for n in prog.nets]


def front(prog: ir.Program, net: str, diags: Diagnostics, overrides=None, input_shape=None) -> ir.Net | None:
    """Spec -> checked graph for one network."""
    g = elaborate(prog, net, diags, overrides, input_shape)  # params, blocks, repeats, names
    if g is None:
        return None
    g = infer_shapes(g, diags)  # the conv formula, pooling rules, counts
    return g


def check_program_nets(prog: ir.Program, net: str | None = None, overrides: dict | None = None,
                       input_shape=None) -> Checked:
    diags = Diagnostics()
    check_program(prog, diags)  # unknown names, duplicates
    names = networks(prog)
    if net is not None:
        if net not in names:
            hint = did_you_mean(net, names) if names else ""
            diags.error(Pos(prog.file, 0, 0), f"no network named '{net}' in {prog.file}{hint}")
            return Checked(prog, [], diags.items)
        names = [net]
    overrides = dict(overrides or {})
    for name in overrides:
        if not any(p.name == name for n in names for p in prog.net(n).params):
            diags.error(Pos(prog.file, 0, 0), f"--set {name}: no network here has a parameter '{name}'"
                        + did_you_mean(name, [p.name for n in names for p in prog.net(n).params]))
    nets = []
    if not any(d.pos.line == 0 for d in diags.items):  # a bad --net/--set: nothing to check
        for name in names:
            nd = prog.net(name)
            own = {k: v for k, v in overrides.items() if any(p.name == k for p in nd.params)}
            g = front(prog, name, diags, own, input_shape)
            if g is not None:
                nets.append(g)
    return Checked(prog, nets, diags.items)


def check_file(path, net: str | None = None, overrides: dict | None = None, input_shape=None) -> Checked:
    """Parse, elaborate and shape-check every network of a file (or only `net`)."""
    return check_program_nets(load(path), net, overrides, input_shape)


def check_text(text: str, file: str = "<string>", net: str | None = None, overrides=None, input_shape=None) -> Checked:
    return check_program_nets(load_text(text, file), net, overrides, input_shape)


def checked_net(path_or_prog, net: str, overrides=None, input_shape=None) -> ir.Net:
    """One network, or NetdslError with every problem found."""
    prog = path_or_prog if isinstance(path_or_prog, ir.Program) else load(path_or_prog)
    res = check_program_nets(prog, net, overrides, input_shape)
    if not res.ok:
        raise NetdslError(res.diagnostics, res.sources)
    return res.nets[0]


def compile_program(prog: ir.Program, net: str | None = None, overrides=None, input_shape=None,
                    target: str = "triton", disable=()) -> tuple[str, list[ir.Net]]:
    """Spec -> Python source for every network of the file (or only `net`).

    front -> fuse (triton target) -> generate; raises NetdslError on any
    problem of the spec, switches.SwitchError on a bad `disable` (the fusions
    to switch off, switches.py; the torch target has none and ignores them)."""
    from .codegen import torch_module, triton_module
    from .fusion import fuse
    from .switches import check as check_switches

    disable = check_switches(disable)
    res = check_program_nets(prog, net, overrides, input_shape)
    if not res.ok:
        raise NetdslError(res.diagnostics, res.sources)
    import os

    source = os.path.basename(prog.file)  # output independent of where the spec was found
    if target == "torch":
        return torch_module.generate(res.nets, source), res.nets
    fused = [fuse(n) for n in res.nets]  # conv+bn+act, linear+act, bn+act, residual epilogues
    return triton_module.generate(fused, source, disable), fused
