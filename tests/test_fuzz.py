"""Random and mutated spec texts never produce a traceback: only clean,
located errors or a valid result."""
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netdsl import check_text
from netdsl.diagnostics import NetdslError, render_all

from conftest import SPECS

SEEDS = [(SPECS / f).read_text() for f in ("lenet.net", "resnet.net", "course.net", "googlenet.net")]
TOKENS = ["conv", "(", ")", "{", "}", "->", ":", ",", "=", "\n", ";", "3", "0", "-1", "64", "1e-5", '"M"',
          "residual", "shortcut", "concat", "add", "dense", "repeat", "for", "in", "if", "else", "range(3)",
          "true", "false", "//", "#", "*", "**", "[", "]", "x", "net", "block", "input", "relu", "bn",
          "linear", "flatten", "maxpool", "stride=", "groups=", "weight=", "len(", "type(", "{i}"]


def assert_clean(text):
    try:
        res = check_text(text, "fuzz.net")
    except NetdslError as e:
        assert e.diagnostics
        assert all(d.message for d in e.diagnostics)
        return
    text_out = render_all(res.diagnostics, res.sources)
    for d in res.diagnostics:
        assert d.pos.file == "fuzz.net" and d.message
    assert "Traceback" not in text_out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_specs(data):
    src = data.draw(st.sampled_from(SEEDS))
    rnd = random.Random(data.draw(st.integers(0, 2**32 - 1)))
    chars = list(src)
    for _ in range(data.draw(st.integers(1, 6))):
        op = rnd.choice(["delete", "insert", "dup", "swapnum"])
        i = rnd.randrange(len(chars))
        if op == "delete":
            del chars[i:i + rnd.randint(1, 8)]
        elif op == "insert":
            chars[i:i] = list(rnd.choice(TOKENS))
        elif op == "dup":
            j = min(len(chars), i + rnd.randint(1, 30))
            chars[i:i] = chars[i:j]
        else:
            if chars[i].isdigit():
                chars[i] = rnd.choice("0123456789")
    assert_clean("".join(chars))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=40))
def test_token_soup(tokens):
    assert_clean("net N input(3, 16, 16) {\n" + " ".join(tokens) + "\n}\n")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text(text):
    assert_clean(text)
