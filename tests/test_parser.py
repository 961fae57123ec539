"""Grammar and parser: the syntax reads as documented and lands in the IR."""
import pytest

from netdsl import ir
from netdsl.diagnostics import NetdslError
from netdsl.parser import grammar_path, load_text, parse


def net_of(text):
    return parse(text, "t.net").nets[0]


def test_grammar_file_is_the_one_loaded():
    assert grammar_path().name == "netdsl.lark"
    assert grammar_path().parent.name == "grammars"


def test_chain_and_labels():
    n = net_of("net N input(3, 8, 8) {\n  c1: conv(4, 3) -> bn -> relu\n}")
    (chain,) = n.body
    assert [i.name for i in chain.items] == ["conv", "bn", "relu"]
    assert chain.items[0].label.parts == ("c1",)
    assert chain.items[0].pos.line == 2 and chain.items[0].pos.col == 7


def test_arrow_may_start_or_end_a_line_and_comments_anywhere():
    n = net_of("net N input(3, 8, 8) {\n  conv(4, 3)   # a -> b\n  -> relu ->  // trailing\n  # own line\n  bn\n}")
    assert [i.name for i in n.body[0].items] == ["conv", "relu", "bn"]


def test_floor_division_versus_slash_comment():
    n = net_of("net N(ch = 8) input(3, 8, 8) {\n  c = ch // 4   \n  conv(ch // 2, 3) // a comment\n}")
    assign, chain = n.body
    assert isinstance(assign, ir.Assign) and assign.value.op == "//"
    assert chain.items[0].args[0].value.op == "//"


def test_arguments_may_span_lines():
    n = net_of("net N input(3, 8, 8) {\n  conv(4,\n       3,\n       padding=1)\n}")
    assert len(n.body[0].items[0].args) == 3


def test_label_templates_parse_their_expression():
    n = net_of("net N input(3, 8, 8) {\n  for i in range(2) { layer{i + 1}: relu }\n}")
    rep = n.body[0].items[0]
    label = rep.body[0].items[0].label
    assert label.parts[0] == "layer"
    assert isinstance(label.parts[1], ir.Binary) and label.parts[1].op == "+"
    assert label.parts[1].pos.line == 2 and label.parts[1].pos.col == 29


def test_all_item_kinds():
    text = """
block B(a, b = 2) { relu }
net N(w = 4) input(3, 8, 8) {
    repeat 2 { relu }
    for v in [1, 2] { relu }
    if w > 2 { relu } else { if w > 1 { relu } else { tanh } }
    residual { relu } shortcut proj: { conv(3, 1) }
    concat { relu ; relu }
    add { relu ; relu }
    dense { relu }
    B(1, b=3)
}
net M input(4) = B(1)
"""
    prog = parse(text, "t.net")
    kinds = [type(s.items[0]).__name__ for s in prog.nets[0].body]
    assert kinds == ["Repeat", "Repeat", "If", "Residual", "Branches", "Branches", "DenseItem", "Call"]
    assert prog.nets[1].alias.name == "B"
    assert prog.blocks[0].params[1].default.value == 2


def test_numbers_strings_bools():
    n = net_of('net N(a = 1e-3, b = 2.5, c = true, d = "x", e = 7) input(3, 8, 8) { relu }')
    vals = [p.default.value for p in n.params]
    assert vals == [1e-3, 2.5, True, "x", 7]
    assert isinstance(vals[4], int)


def test_power_binds_tighter_than_multiplication():
    n = net_of("net N input(3, 8, 8) { x = 2 * 3 ** 2 }")
    e = n.body[0].value
    assert e.op == "*" and e.right.op == "**"


def test_import_merges_blocks(tmp_path):
    (tmp_path / "lib.net").write_text("block Stem(c) { conv(c, 3) -> relu }\n")
    main = tmp_path / "main.net"
    main.write_text('import "lib.net"\nnet N input(3, 8, 8) { Stem(4) }\n')
    from netdsl.parser import load

    prog = load(main)
    assert [b.name for b in prog.blocks] == ["Stem"]


def test_import_cycle_is_an_error(tmp_path):
    (tmp_path / "a.net").write_text('import "b.net"\n')
    (tmp_path / "b.net").write_text('import "a.net"\n')
    from netdsl.parser import load

    with pytest.raises(NetdslError, match="import cycle"):
        load(tmp_path / "a.net")


@pytest.mark.parametrize("text,line,col,fragment", [
    ("net N input(1, 2, 3) { relu relu }", 1, 29, "unexpected 'relu'"),
    ("net N { relu }", 1, 7, "needs its input shape"),
    ("net N input(1, 2, 3) { conv(1, 3 }", 1, 34, "missing a ')'"),
    ("net N input(1, 2, 3) {\n  relu\n", 2, 7, "no matching '}'"),
    ("net N input(1, 2, 3) { relu $ }", 1, 29, "unexpected character '$'"),
])
def test_syntax_errors_are_located(text, line, col, fragment):
    with pytest.raises(NetdslError) as ei:
        load_text(text, "s.net")
    (d,) = ei.value.diagnostics
    assert (d.pos.file, d.pos.line, d.pos.col) == ("s.net", line, col)
    assert d.message.startswith("syntax error: ")
    assert fragment in d.message


def test_labels_may_hold_hyphens_after_their_first_character():
    from netdsl import check_text
    res = check_text("net N input(3, 4, 4) {\n  for i in range(2) { block1-{i}: conv(4, 1) -> relu }\n"
                     "  x-y: conv(4, 1)->relu\n}\n", "h.net")
    assert not res.diagnostics
    from netdsl.report import state_keys
    assert state_keys(res.nets[0]) == ["block1-0.weight", "block1-0.bias", "block1-1.weight", "block1-1.bias",
                                       "x-y.weight", "x-y.bias"]
