"""Source positions and compiler errors.

Every error netdsl reports is a `Diagnostic`: a position, one sentence, and
optional notes (e.g. where a block was instantiated).  Errors are collected,
not raised one by one, so a run reports every independent problem of a file.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pos:
    file: str
    line: int
    col: int
    end_line: int = 0
    end_col: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


NOWHERE = Pos("<netdsl>", 0, 0)


@dataclass(frozen=True)
class Diagnostic:
    pos: Pos
    message: str
    notes: tuple[tuple[Pos, str], ...] = ()


class NetdslError(Exception):
    """Raised by the Python API when a spec has errors; carries all of them."""

    def __init__(self, diagnostics: list[Diagnostic], sources: dict[str, str] | None = None):
        self.diagnostics = list(diagnostics)
        self.sources = dict(sources or {})
        super().__init__(render_all(self.diagnostics, self.sources))


@dataclass
class Diagnostics:
    """An ordered, de-duplicated collection of errors."""

    items: list[Diagnostic] = field(default_factory=list)
    _seen: set = field(default_factory=set)

    def error(self, pos: Pos, message: str, notes: tuple[tuple[Pos, str], ...] = ()) -> None:
        key = (pos.file, pos.line, pos.col, message)
        if key not in self._seen:
            self._seen.add(key)
            self.items.append(Diagnostic(pos, message, tuple(notes)))

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)


def did_you_mean(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _excerpt(pos: Pos, sources: dict[str, str]) -> str:
    text = sources.get(pos.file)
    if text is None or pos.line <= 0:
        return ""
    lines = text.splitlines()
    if pos.line > len(lines):
        return ""
    line = lines[pos.line - 1].expandtabs(4).rstrip()
    width = 1
    if pos.end_line == pos.line and pos.end_col > pos.col:
        width = pos.end_col - pos.col
    width = max(1, min(width, len(line) - pos.col + 1))
    caret = " " * (pos.col - 1) + "^" + "~" * (width - 1)
    return f"    {line}\n    {caret}\n"


def render(d: Diagnostic, sources: dict[str, str]) -> str:
    out = f"{d.pos}: error: {d.message}\n" + _excerpt(d.pos, sources)
    for pos, note in d.notes:
        out += f"{pos}: note: {note}\n"
    return out


def render_all(diags, sources: dict[str, str]) -> str:
    return "".join(render(d, sources) for d in diags)
