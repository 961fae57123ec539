"""Every error kind, with its exact location and sentence."""
import pytest

from netdsl import check_text
from netdsl.diagnostics import NetdslError, render


def errors(text):
    res = check_text(text, "e.net")
    return [(d.pos.line, d.pos.col, d.message) for d in res.diagnostics]


def only(text):
    errs = errors(text)
    assert len(errs) == 1, errs
    return errs[0]


def test_course_channel_mismatch():
    # F.conv2d(x, w=rand(16, 3, 5, 5)) on x of 1 channel, as on the course slide
    line, col, msg = only("net N input(1, 28, 28) {\n    conv(16, 5, in_channels=3, padding=1)\n}")
    assert (line, col) == (2, 5)
    assert msg == "conv expects 3 input channels (weight [16, 3, 5, 5]) but its input has 1 channel"


def test_literal_weights_fix_input_channels():
    w = "[[[1, 0], [0, 1]], [[1, 0], [0, 1]], [[1, 0], [0, 1]]]"  # [cin=3][2][2]
    line, col, msg = only(f"net N input(1, 8, 8) {{\n  conv(weight={w})\n}}")
    assert (line, col) == (2, 3) and "expects 3 input channels" in msg


def test_kernel_larger_than_padded_input():
    line, col, msg = only("net N input(3, 4, 4) {\n  relu\n  conv(8, 7, padding=1)\n}")
    assert (line, col) == (3, 3)
    assert msg == "the 7×7 kernel (dilation 1) is larger than its padded input (7 > 4 + 2·1)"


def test_spatial_size_reaching_zero():
    line, col, msg = only("net N input(3, 2, 2) {\n  conv_transpose(3, 3, padding=3)\n}")
    assert (line, col) == (2, 3) and "reaches -2" in msg


def test_pooling_shrinks_until_nothing_is_left():
    text = "net N input(3, 8, 8) {\n  repeat 4 { maxpool(2) }\n}"
    line, col, msg = only(text)
    assert (line, col) == (2, 14) and "larger than its padded input" in msg


def test_pool_padding_more_than_half_the_kernel():
    line, col, msg = only("net N input(3, 8, 8) {\n  maxpool(3, padding=2)\n}")
    assert (line, col) == (2, 3) and "more than half the kernel size" in msg
    assert only("net N input(3, 8, 8) {\n  avgpool(2, padding=2)\n}")[1] == 3


def test_residual_of_unequal_shapes():
    text = ("block R(c) {\n  residual { conv(c, 3, stride=2, padding=1) }\n}\n"
            "net N input(3, 8, 8) {\n  R(3)\n}")
    res = check_text(text, "e.net")
    (d,) = res.diagnostics
    assert (d.pos.line, d.pos.col) == (2, 3)
    assert d.message == "residual add of unequal shapes: the body gives 3×4×4 but the identity shortcut gives 3×8×8"
    assert d.notes[0][0].line == 5 and "in block 'R' used here" in d.notes[0][1]


def test_add_branches_of_unequal_shapes():
    line, col, msg = only("net N input(3, 8, 8) {\n  add {\n    conv(4, 1)\n    conv(5, 1)\n  }\n}")
    assert (line, col) == (2, 3) and msg == "add of unequal shapes: branch 1 gives 4×8×8 but branch 2 gives 5×8×8"


def test_concat_of_unequal_spatial_sizes():
    line, col, msg = only("net N input(3, 8, 8) {\n  concat {\n    conv(4, 3)\n    conv(4, 1)\n  }\n}")
    assert (line, col) == (2, 3)
    assert msg == "concat of unequal spatial sizes: branch 1 gives 4×6×6 but branch 2 gives 4×8×8"


def test_unknown_layer_with_suggestion():
    line, col, msg = only("net N input(3, 8, 8) {\n  cnov(4, 3)\n}")
    assert (line, col) == (2, 3) and msg == "unknown layer or block 'cnov'; did you mean 'conv'?"


def test_unknown_block_with_suggestion():
    line, col, msg = only("block ResBlk(c) { relu }\nnet N input(3, 8, 8) {\n  ResBlok(4)\n}")
    assert (line, col) == (3, 3) and "did you mean 'ResBlk'?" in msg


def test_unknown_parameter_name_with_suggestion():
    line, col, msg = only("net N(width = 4) input(3, 8, 8) {\n  conv(widht, 3)\n}")
    assert (line, col) == (2, 8) and msg == "unknown name 'widht'; did you mean 'width'?"


def test_unknown_keyword_argument():
    line, col, msg = only("net N input(3, 8, 8) {\n  conv(4, 3, strid=2)\n}")
    assert (line, col) == (2, 14) and msg == "conv has no argument 'strid'; did you mean 'stride'?"


def test_wrong_argument_type():
    line, col, msg = only('net N input(3, 8, 8) {\n  conv("a", 3)\n}')
    assert (line, col) == (2, 8) and msg == "conv's out_channels must be an integer >= 1, got \"a\""


def test_wrong_argument_count():
    line, col, msg = only("net N input(3, 8, 8) {\n  relu(1)\n}")
    assert (line, col) == (2, 8) and msg == "relu takes at most 0 positional arguments, got 1"
    line, col, msg = only("net N input(3, 8, 8) {\n  conv(4)\n}")
    assert (line, col) == (2, 3) and msg == "conv is missing its required argument 'kernel_size'"


def test_block_argument_errors():
    text = "block B(a, b) { conv(a, b) }\nnet N input(3, 8, 8) {\n  B(1)\n  B(1, 2, 3)\n}"
    errs = errors(text)
    assert (3, 3, "block 'B' is missing its required argument 'b'") in errs
    assert (4, 11, "block 'B' takes at most 2 positional arguments, got 3") in errs


def test_unbounded_recursion_is_an_error_at_the_call_that_goes_too_deep():
    text = "block A() { B() }\nblock B() { A() }\nnet N input(1, 4, 4) { A() }"
    res = check_text(text, "e.net")
    (d,) = res.diagnostics
    assert (d.pos.line, d.pos.col) == (2, 13)  # the 65th call, A() in B; the chain shows both blocks
    assert d.message == ("block calls nest deeper than 64: A -> B -> A -> B -> ... -> A -> B -> A "
                         "(a recursive block needs an `if` that stops it)")
    assert [(p.line, p.col, note) for p, note in d.notes] == [(3, 24, "in block 'A' used here")]


def test_self_recursion_that_branches_is_reported_once_and_quickly():
    # 2^64 leaves if every branch recursed to the limit: the first one ends the network's elaboration
    text = "block A() { concat { relu -> A() ; A() } }\nnet N input(1, 4, 4) { A() }\nnet M input(1, 4, 4) { A() }"
    (line, col, msg) = only(text)  # (both networks stop at the same call: one error)
    assert (line, col) == (1, 30) and msg.startswith("block calls nest deeper than 64: A -> A -> A")


def test_bounded_recursion_elaborates():
    """Each level decides with `if` whether to go deeper (a U-Net's levels)."""
    text = ("block Level(depth, c) {\n"
            "    if depth > 0 {\n"
            "        concat {\n"
            "            identity\n"
            "            conv(c, 3, padding=1) -> Level(depth - 1, 2 * c)\n"
            "        }\n"
            "    } else { relu }\n"
            "}\n"
            "net U(depth = 3) input(2, 8, 8) { Level(depth, 4) }\n")
    res = check_text(text, "u.net")
    assert res.ok, res.diagnostics
    (net,) = res.nets
    # depth 0: relu keeps c; each level above concatenates its input with the level below's output
    # c_out(d, c_in, c) = c_in + c_out(d - 1, c, 2c), c_out(0, c_in, _) = c_in
    assert net.body.out_shape == (2 + 4 + 8 + 16, 8, 8)
    names = [l.name for l in _layers(net.body)]
    # (a concat's branches number their items in its scope, as a chain does: identity 0, conv 1, Level 2)
    assert names == ["0.0", "0.1", "0.2.0", "0.2.1", "0.2.2.0", "0.2.2.1", "0.2.2.2.0"], names
    # 64 nested calls are allowed, 65 are not (constant widths: 2^64 channels would be an error of their own)
    flat = text.replace("2 * c", "c")
    assert check_text(flat.replace("depth = 3", "depth = 63"), "u.net").ok
    (d,) = check_text(flat.replace("depth = 3", "depth = 64"), "u.net").diagnostics
    assert (d.pos.line, d.pos.col) == (5, 38) and "nest deeper than 64: Level -> Level" in d.message


def _layers(node):
    from netdsl import ir

    if isinstance(node, ir.Layer):
        yield node
    for child in ir.children(node):
        yield from _layers(child)


def test_groups_must_divide_channels():
    line, col, msg = only("net N input(6, 8, 8) {\n  conv(8, 3, groups=4)\n}")
    assert msg == "groups=4 does not divide the 6 input channels"
    line, col, msg = only("net N input(8, 8, 8) {\n  conv(6, 3, groups=4)\n}")
    assert msg == "groups=4 does not divide the 6 output channels"


def test_linear_needs_flat_input():
    line, col, msg = only("net N input(3, 8, 8) {\n  linear(10)\n}")
    assert (line, col) == (2, 3) and "add `flatten` before it" in msg


def test_duplicate_names():
    line, col, msg = only("net N input(3, 8, 8) {\n  a: conv(3, 1)\n  a: conv(3, 1)\n}")
    assert (line, col) == (3, 3) and msg.startswith("name 'a' is already used")


def test_stateless_layers_may_share_a_name():
    assert errors("net N input(3, 8, 8) {\n  relu: relu\n  conv(3, 1)\n  relu: relu\n}") == []


def test_condition_must_be_boolean():
    line, col, msg = only("net N input(3, 8, 8) {\n  if 3 { relu }\n}")
    assert (line, col) == (2, 6) and "must be true or false" in msg


def test_division_by_zero():
    line, col, msg = only("net N(c = 0) input(3, 8, 8) {\n  conv(8 // c, 1)\n}")
    assert (line, col) == (2, 13) and msg == "division by zero"


def test_independent_errors_are_all_reported():
    text = ("net A input(1, 8, 8) {\n  conv(4, 3, strid=1)\n  conv(6, 3, groups=4)\n}\n"
            "net B input(1, 8, 8) {\n  maxpool(3, padding=2)\n}\n"
            "net C input(1, 8, 8) {\n  cnov(1, 1)\n}\n")
    assert [(l, c) for l, c, _ in errors(text)] == [(9, 3), (2, 14), (3, 3), (6, 3)]


def test_one_mistake_is_reported_once():
    # a bad stem must not cascade into every later layer
    text = "net N input(3, 32, 32) {\n  conv(0, 3)\n  conv(8, 3) -> bn -> relu\n  flatten -> linear(10)\n}"
    assert len(errors(text)) == 1


def test_block_errors_are_reported_once_per_location():
    text = "block B() { conv(4, 9) }\nnet N input(3, 4, 4) { B() -> B() }\nnet M input(3, 4, 4) { B() }"
    assert len(errors(text)) == 1


def test_course_testnet_as_written_is_rejected():
    # nn.Conv2d(1, 16, stride=1, padding=1) has no kernel size; Linear(1*14*14, 10) ignores 16 channels
    text = ("net TestNetAsWritten input(1, 28, 28) {\n"
            "    net: { conv(16, stride=1, padding=1) -> maxpool(2, 2) -> flatten -> linear(10, in_features=1 * 14 * 14) }\n"
            "}\n")
    line, col, msg = errors(text)[0]
    assert (line, col, msg) == (2, 12, "conv is missing its required argument 'kernel_size'")
    fixed = text.replace("conv(16, stride=1", "conv(16, 3, stride=1")
    assert errors(fixed) == [(2, 76, "linear expects 196 input features but its input has 3136")]


def test_course_resblk_bug_is_a_residual_shape_error():
    # The course's ResBlk adds a projection only when channels change; with a
    # stride-2 ResBlk(512, 512) PyTorch broadcasts a 512×1×1 map onto 512×2×2.
    from conftest import SPECS

    text = (SPECS / "resnet.net").read_text().replace(
        "shortcut extra: if ch_out != ch_in or stride != 1 {", "shortcut extra: if ch_out != ch_in {")
    res = check_text(text, "resnet.net", net="CifarResNet")
    (d,) = res.diagnostics
    assert d.message == "residual add of unequal shapes: the body gives 512×1×1 but the identity shortcut gives 512×2×2"
    assert text.splitlines()[d.pos.line - 1].strip().startswith("residual {")
    assert "blk4: ResBlk(512, 512, stride=2)" in text.splitlines()[d.notes[0][0].line - 1]


def test_rendering_shows_line_and_caret():
    res = check_text("net N input(3, 8, 8) {\n  cnov(4, 3)\n}", "e.net")
    out = render(res.diagnostics[0], res.sources)
    assert out == ("e.net:2:3: error: unknown layer or block 'cnov'; did you mean 'conv'?\n"
                   "      cnov(4, 3)\n"
                   "      ^~~~~~~~~~\n")


def test_label_must_be_a_valid_name():
    line, col, msg = only('net N input(3, 8, 8) {\n  for s in ["a..b"] { x{s}: relu }\n}')
    assert "not a valid layer name" in msg


def test_checked_net_raises_with_all_errors():
    from netdsl import checked_net
    from netdsl.parser import load_text

    with pytest.raises(NetdslError) as ei:
        checked_net(load_text("net N input(3, 8, 8) {\n  cnov\n  conv(4, 3, groups=3)\n}", "e.net"), "N")
    assert len(ei.value.diagnostics) == 2


def test_hardtanh_bounds_out_of_order():
    line, col, msg = only("net N input(3, 8, 8) {\n  conv(4, 3) -> hardtanh(1, -1)\n}")
    assert (line, col) == (2, 17)
    assert msg == "hardtanh's min_val must be below its max_val, got 1 and -1"
    assert only('net N input(3, 8, 8) {\n  gelu(approximate="erf")\n}')[2] == \
        "gelu's approximate must be one of 'none', 'tanh'; got \"erf\""


def test_mul_of_shapes_that_do_not_broadcast():
    text = "net N input(16, 8, 8) {\n    mul {\n        identity\n        global_avgpool -> conv(4, 1)\n    }\n}"
    line, col, msg = only(text)
    assert (line, col) == (2, 5)
    assert msg == "mul of shapes that do not broadcast: branch 1 gives 16×8×8 but branch 2 gives 4×1×1"
    assert only("net N input(3, 8, 8) {\n    mul { relu }\n}") == (2, 5, "mul needs at least 2 branches, one per line")
    # ranks must agree: a flattened branch does not broadcast against a C×H×W one
    assert "do not broadcast" in only("net N input(3, 1, 1) {\n  mul { identity ; flatten }\n}")[2]


def test_stochastic_depth_rate_out_of_range():
    assert only("net N input(3, 8, 8) {\n  conv(3, 1) -> stochastic_depth(1.5)\n}") == \
        (2, 34, "stochastic_depth's p must be in [0, 1], got 1.5")


def test_frozen_bn_on_a_flat_input():
    assert only("net N input(3, 4, 4) {\n  flatten -> frozen_bn\n}") == (2, 14, "frozen_bn needs a C×H×W input, got 48")
